"""Stage 07 logic: retrieval classification, rejection, outputs, comparison, predict mode."""
from __future__ import annotations

import csv
import json
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from common.config.load import load_config
from common.config.schema import InferenceConfig, ModelConfig
from common.data.listing import list_images
from common.errors import UserError
from common.evaluate import decide as evaluate_decide
from common.evaluate import metrics as evaluate_metrics
from common.evaluate.decide import classify
from common.evaluate.evaluation import EvalInputs, evaluate
from common.evaluate.prediction import predict
from common.model.embed import embed_paths
from common.retrieval.search import search_classes
from common.stages import SPECS
from common.stages import inference as stages_inference
from common.stages.inference.evaluate import write_evaluation
from common.stages.inference.load import hold_out, load_query_model, load_store_data
from common.stages.inference.predict import Queries, write_outputs
from common.store.containers import Vectors

# ----------------------------------------------------------------------------- helpers


def brute_topk(queries, gallery, k, block_size=4096, device=None):
    sims = np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, 1).astype(np.float32), idx.astype(np.int64)


def brute_knn_vote(sims, idx, gallery_labels, n_classes, temperature):
    scores = np.zeros((sims.shape[0], n_classes))
    np.add.at(scores, (np.arange(sims.shape[0])[:, None], np.asarray(gallery_labels)[idx]), np.exp(sims / temperature))
    return scores.argmax(1), scores


@pytest.fixture
def brute(monkeypatch):
    """Brute-force stand-ins for common.retrieval, so these tests check this module's logic alone."""
    monkeypatch.setattr(evaluate_decide, "topk", brute_topk)
    monkeypatch.setattr(evaluate_decide, "knn_vote", brute_knn_vote)


def clustered(n_per_class, n_classes=5, dim=16, spread=0.5, seed=0, centres_seed=0):
    centres = np.random.default_rng(centres_seed).normal(size=(n_classes, dim))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centres[y] + spread * rng.normal(size=(y.size, dim))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), y


def vectors(X, y, prefix):
    return Vectors(X, y, [f"/data/{prefix}/{i:04d}.png" for i in range(len(y))])


def icfg(**kw):
    cfg = InferenceConfig()
    cfg.embedding_map = "pca"
    cfg.classifiers = []
    cfg.linear_epochs = 5
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def evaluate_and_write(inp, cfg, output, seed=0):
    """What evaluate mode does: the library's evaluation, then the driver's writers."""
    return write_evaluation(evaluate(inp, cfg, seed=seed), inp, cfg, output, seed)


def out_in(tmp_path):
    def output(*parts, digest="sha256"):
        p = tmp_path.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
    return output


def read_csv(p):
    with open(p, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- classification


def test_top1_candidates_are_distinct_classes_ranked_by_nearest_member(brute):
    Xg, yg = clustered(8, seed=1)
    Xq, yq = clustered(6, seed=2)
    g = vectors(Xg, yg, "g")
    d = classify(Xq, g, 6, method="top1", top_k=5, k=5, temperature=0.07, reject_below=None, block_size=7)
    s, i = brute_topk(Xq, Xg, len(yg))
    np.testing.assert_array_equal(d.nn_idx, i[:, 0])
    np.testing.assert_array_equal(d.raw, yg[i[:, 0]])
    np.testing.assert_allclose(d.best_sim, s[:, 0], rtol=1e-5)
    for q in range(len(yq)):  # expected: classes in order of first appearance in the full ranking
        order = list(dict.fromkeys(yg[i[q]].tolist()))
        assert d.candidates[q].tolist() == order[:5]
        assert (np.diff(d.cand_sims[q]) <= 1e-7).all()
    assert (d.candidates[:, 0] == d.raw).all() and d.accepted.all()


def test_exact_ties_go_to_the_lower_gallery_row():
    # duplicated gallery vectors (DYB holds duplicates): equal similarities, within and across classes
    base = np.eye(6, dtype=np.float32)
    G = base[[3, 1, 3, 2, 1, 3, 0]]
    yg = np.array([2, 1, 0, 1, 1, 2, 0])  # row 0 (class 2) and row 2 (class 0) are the same vector
    q = base[[3, 1]]
    cs = search_classes(q, vectors(G, yg, "g"), 3, block_size=1)
    assert cs.idx[0].tolist() == [2, 1, 0]  # class 0: row 2; class 1: rows 1, 3, 4 all at 0 -> 1; class 2: 0 < 5
    assert cs.idx[1].tolist() == [2, 1, 0]  # class 1: rows 1 and 4 tie at 1.0 -> row 1
    d = evaluate_decide.decide(cs, 3, None)
    assert d.nn_idx.tolist() == [0, 1] and d.raw.tolist() == [2, 1]  # row 0 (class 2) beats row 2 (class 0)
    assert d.candidates[0].tolist() == [2, 0, 1]


def test_knn_method_uses_the_vote_and_ranks_the_winner_first(brute):
    Xg, yg = clustered(10, spread=0.9, seed=3)
    Xq, _ = clustered(5, spread=0.9, seed=4)
    g = vectors(Xg, yg, "g")
    d = classify(Xq, g, 5, method="knn", top_k=3, k=7, temperature=0.1, reject_below=None, block_size=64)
    s, i = brute_topk(Xq, Xg, 7)
    pred, _ = brute_knn_vote(s, i, yg, 5, 0.1)
    np.testing.assert_array_equal(d.raw, pred)
    assert (d.candidates[:, 0] == pred).all()
    assert d.candidates.shape == (len(Xq), 3)


def test_rejection_labels_low_similarity_unknown(brute):
    Xg, yg = clustered(5, seed=5)
    Xq, _ = clustered(4, seed=6)
    g = vectors(Xg, yg, "g")
    free = classify(Xq, g, 5, method="top1", top_k=5, k=5, temperature=0.07, reject_below=None, block_size=64)
    thr = float(np.median(free.best_sim))
    d = classify(Xq, g, 5, method="top1", top_k=5, k=5, temperature=0.07, reject_below=thr, block_size=64)
    np.testing.assert_array_equal(d.accepted, free.best_sim >= thr)
    np.testing.assert_array_equal(d.final, np.where(free.best_sim >= thr, free.raw, evaluate_metrics.UNKNOWN))
    np.testing.assert_array_equal(d.raw, free.raw)


def test_fewer_gallery_classes_than_top_k_pads(brute):
    g = vectors(np.eye(4, dtype=np.float32)[[0, 1]], np.array([0, 2]), "g")
    d = classify(np.eye(4, dtype=np.float32)[[1]], g, 4, method="top1", top_k=5, k=3, temperature=0.1,
                   reject_below=None, block_size=8)
    assert d.candidates.tolist() == [[2, 0, -1, -1]]


def test_real_retrieval_module_agrees_with_brute_force():
    Xg, yg = clustered(7, seed=7)
    Xq, _ = clustered(3, seed=8)
    g = vectors(Xg, yg, "g")
    for method in ("top1", "knn"):
        d = classify(Xq, g, 5, method=method, top_k=5, k=5, temperature=0.07, reject_below=None, block_size=4)
        s, i = brute_topk(Xq, Xg, 5)
        want = yg[i[:, 0]] if method == "top1" else brute_knn_vote(s, i, yg, 5, 0.07)[0]
        np.testing.assert_array_equal(d.raw, want)


# ----------------------------------------------------------------------------- evaluate mode


def _eval_inputs(seed=0, n_test=8):
    Xtr, ytr = clustered(20, spread=0.8, seed=seed + 10)
    Xv, yv = clustered(6, spread=0.8, seed=seed + 11)
    Xte, yte = clustered(n_test, spread=0.8, seed=seed + 12)
    train = vectors(Xtr, ytr, "train")
    lut = Vectors(Xtr[::2], ytr[::2], train.paths[::2])  # a "pruned" gallery
    return EvalInputs(classes=[f"class_{c}" for c in "abcde"], test=vectors(Xte, yte, "test"), gallery=lut,
                        train=train, val=vectors(Xv, yv, "val"), model_id="model-1", facts=[("run", "t")])


def test_evaluate_writes_consistent_artefacts(brute, tmp_path):
    inp = _eval_inputs()
    cfg = icfg(reject_below=0.5, classifiers=["linear", "logreg"], worst_classes=2)
    m = evaluate_and_write(inp, cfg, out_in(tmp_path), seed=0)
    for f in ("predictions.csv", "metrics.json", "classification_report.csv", "confusion_matrix.png",
              "embedding_map.png", "comparison.csv", "report.html", "classifiers/linear.safetensors",
              "classifiers/logreg.skops", "classifiers/classes.json", "classifiers/sha256.json"):
        assert (tmp_path / f).is_file(), f
    rows = read_csv(tmp_path / "predictions.csv")
    assert len(rows) == len(inp.test)
    names = inp.classes
    y = np.array([names.index(r["true_label"]) for r in rows])
    pred = np.array([evaluate_metrics.UNKNOWN if r["predicted_label"] == "unknown" else names.index(r["predicted_label"]) for r in rows])
    acc = np.array([int(r["accepted"]) for r in rows]).astype(bool)
    assert ((pred == evaluate_metrics.UNKNOWN) == ~acc).all()
    sims = np.array([float(r["similarity"]) for r in rows])
    assert (acc == (sims >= 0.5)).all()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
    labels = sorted(set(y) | set(pred) - {evaluate_metrics.UNKNOWN})
    assert saved["macro_f1"] == pytest.approx(skm.f1_score(y, pred, labels=labels, average="macro",
                                                          zero_division=0), abs=1e-6)
    top5 = np.array([[names.index(r[f"top{j}_label"]) for j in range(1, 6)] for r in rows])
    assert saved["top5_accuracy"] == pytest.approx((top5 == y[:, None]).any(1).mean(), abs=1e-6)
    assert saved["rejection_rate"] == pytest.approx(1 - acc.mean(), abs=1e-6)
    if acc.any():
        assert saved["accepted_accuracy"] == pytest.approx((pred[acc] == y[acc]).mean(), abs=1e-6)
    assert saved["gallery_size"] == len(inp.gallery) and saved["images_per_s"] > 0
    assert 0 <= saved["map_at_r"] <= 1 and 0 <= saved["precision_at_1"] <= 1
    assert m["report"].endswith("report.html") and m["accuracy"] == saved["accuracy"]
    assert saved["classifiers"]["linear"]["selected_on"] == "val"
    # issue 20 item 3: every headline figure with its 95 % interval, and the levels to beat
    from common.evaluate.metrics import wilson

    assert saved["accuracy_ci95"] == pytest.approx(list(wilson(int((pred == y).sum()), len(y))), abs=1e-6)
    for k in ("top5_accuracy", "macro_f1", "balanced_accuracy", "map_at_r", "precision_at_1", "rejection_rate"):
        lo, hi = saved[f"{k}_ci95"]
        assert lo <= saved[k] + 1e-6 and saved[k] <= hi + 1e-6, k
    assert saved["chance_accuracy"] == pytest.approx(1 / 5) and saved["top5_uninformative"] is True
    html = (tmp_path / "report.html").read_text()
    assert "chance level (uniform guess)" in html and "majority-class accuracy" in html
    assert f"{saved['accuracy']:.4f} [{saved['accuracy_ci95'][0]:.3f}, {saved['accuracy_ci95'][1]:.3f}]" in html
    assert "at least half the classes" in html
    comp = {r["method"]: r for r in read_csv(tmp_path / "comparison.csv")}
    assert comp["retrieval_top1"]["fit_time_s"] == "" and float(comp["linear"]["fit_time_s"]) >= 0  # nothing fitted
    rep = {r["class"]: r for r in read_csv(tmp_path / "classification_report.csv")}
    p, r_, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for c, pp, rr, ff, ss in zip(labels, p, r_, f, s):
        row = rep[names[c]]
        assert float(row["precision"]) == pytest.approx(pp, abs=1e-6)
        assert float(row["recall"]) == pytest.approx(rr, abs=1e-6)
        assert float(row["f1"]) == pytest.approx(ff, abs=1e-6)
        assert int(row["support"]) == ss


def test_comparison_table_equals_recomputation_from_predictions(brute, tmp_path):
    inp = _eval_inputs(seed=1)
    cfg = icfg(classifiers=["linear", "logreg", "svm", "random_forest"], method="knn", k=5)
    evaluate_and_write(inp, cfg, out_in(tmp_path), seed=0)
    rows = read_csv(tmp_path / "predictions.csv")
    comp = read_csv(tmp_path / "comparison.csv")
    assert [c["method"] for c in comp] == ["retrieval_top1", "retrieval_knn", "linear", "logreg", "svm",
                                           "random_forest"]
    names = inp.classes
    y = np.array([names.index(r["true_label"]) for r in rows])
    for c in comp:
        pred = np.array([names.index(r[f"pred_{c['method']}"]) for r in rows])
        assert float(c["accuracy"]) == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6), c["method"]
        labels = sorted(set(y) | set(pred))
        assert float(c["macro_f1"]) == pytest.approx(
            skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0), abs=1e-6), c["method"]
        assert float(c["balanced_accuracy"]) == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-6)
        assert int(c["model_size_bytes"]) > 0 and float(c["predict_ms_per_image"]) >= 0
    # the headline prediction (k-NN, no rejection) is the k-NN column
    assert all(r["predicted_label"] == r["pred_retrieval_knn"] for r in rows)
    for c in comp[2:]:
        f = tmp_path / "classifiers" / ("linear.safetensors" if c["method"] == "linear" else f"{c['method']}.skops")
        assert int(c["model_size_bytes"]) == f.stat().st_size


def test_empty_gallery_and_unlabelled_test_are_user_errors(brute, tmp_path):
    inp = _eval_inputs()
    inp.gallery = Vectors(inp.gallery.X[:0], inp.gallery.labels[:0], [])
    with pytest.raises(UserError, match="gallery is empty"):
        evaluate(inp, icfg())
    inp = _eval_inputs()
    inp.test.labels[0] = -1
    with pytest.raises(UserError, match="no label"):
        evaluate(inp, icfg())


def test_gallery_of_another_checkpoint_is_refused():
    from common.stages.artefacts import require_same_checkpoint

    require_same_checkpoint("sha-a", "sha-a", "queries")
    with pytest.raises(UserError, match="another checkpoint.*sha-b.*sha-a"):
        require_same_checkpoint("sha-b", "sha-a", "queries embedded with best.pt")


# ----------------------------------------------------------------------------- predict mode (vectors)


def test_list_images_recursive_skips_hidden(tmp_path):
    (tmp_path / "a" / ".hidden").mkdir(parents=True)
    for p in ("a/x.png", "a/.y.png", "a/.hidden/z.png", "b.JPG", "notes.txt"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(b"")
    images, others = list_images(tmp_path)
    assert sorted(Path(p).relative_to(tmp_path.resolve()).as_posix() for p in images) == ["a/x.png", "b.JPG"]
    assert [Path(p).name for p, _ in others] == ["notes.txt"]
    with pytest.raises(UserError, match="not a folder"):
        list_images(tmp_path / "missing")


def test_predict_vectors_writes_error_rows_and_classifier_columns(brute, tmp_path):
    from common.evaluate.classifiers import fit_classifiers

    inp = _eval_inputs()
    q = Vectors(inp.test.X[:5], np.full(5, -1), inp.test.paths[:5])
    fitted = fit_classifiers(["logreg"], inp.train.X, inp.train.labels, inp.val.X, inp.val.labels, 5,
                               epochs=1, lr=0.1, batch_size=32)
    cfg = icfg(mode="predict", input="/x")
    pred = predict(q, inp.gallery, inp.classes, cfg, classifiers=fitted, timing={"decode_embed_s": 0.5})
    m = write_outputs(out_in(tmp_path), pred, Queries({p: "x" for p in [*q.paths, "/x/bad.png"]},
                                                      [("/x/bad.png", "cannot identify image file")], Path("/")),
                      cfg, name="x", facts=[("gallery", "lut (10 vectors)")])
    rows = read_csv(tmp_path / "predictions.csv")
    assert len(rows) == 6 and "true_label" not in rows[0] and "pred_logreg" in rows[0]
    assert rows[-1]["path"] == "/x/bad.png" and rows[-1]["error"] == "cannot identify image file"
    assert rows[-1]["accepted"] == "0" and rows[0]["error"] == ""
    assert m["n_images"] == 5 and m["n_unreadable"] == 1 and m["images_per_s"] > 0
    html = (tmp_path / "report.html").read_text()
    # issue 20 item 5: the doubtful strip under its own title (no "Worst classes" in predict mode), the gallery once
    assert "<h2>Most doubtful queries beside their nearest gallery image</h2>" in html and "Worst classes" not in html
    assert html.count("<td>gallery</td>") == 1


# ----------------------------------------------------------------------------- predict mode (images)


def _tiny_model():
    """A stand-in with SupConModel's ``encoder`` (timm test_resnet, 96-d pooled features)."""
    import timm
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0)

        def encoder(self, x):
            return self.backbone(x)

    torch.manual_seed(0)
    return Tiny().eval()


def _image_folder(root: Path, n: int = 6) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("sub" if i % 2 else "") / f"img{i}.png"
        sub.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(sub)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / ".hidden.png").write_bytes(b"")
    (root / "README.txt").write_text("notes")
    return root


def test_predict_mode_on_a_folder_with_a_corrupt_image(brute, tmp_path):
    from common.data.transforms import eval_transform

    folder = _image_folder(tmp_path / "new")
    images, others = list_images(folder)
    assert len(images) == 7 and [Path(p).name for p, _ in others] == ["README.txt"]
    model = _tiny_model()
    tf = eval_transform(32, [0.5] * 3, [0.25] * 3, 0)
    X, ok, errors, timing = embed_paths(images, model, tf, 32, embedding="encoder", batch_size=4, num_workers=0,
                                          device="cpu")
    assert X.shape == (6, 96) and np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    assert [Path(p).name for p, _ in errors] == ["broken.png"] and "broken.png" in errors[0][1]
    assert sorted(Path(images[i]).name for i in ok) == [f"img{i}.png" for i in range(6)]
    assert timing["decode_embed_s"] >= timing["embed_s"] > 0
    # the same image embedded alone gives the same vector (batching does not change results)
    X1, _, _, _ = embed_paths([images[ok[2]]], model, tf, 32, embedding="encoder", batch_size=1,
                                num_workers=0, device="cpu")
    np.testing.assert_allclose(X1[0], X[2], atol=1e-5)
    rng = np.random.default_rng(1)
    G = rng.normal(size=(30, 96)).astype(np.float32)
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    gallery = Vectors(G, np.arange(30) % 3, [f"/gallery/{i}.png" for i in range(30)])
    q = Vectors(X, np.full(len(ok), -1), [images[i] for i in ok])
    cfg = icfg(mode="predict", input=str(folder))
    pred = predict(q, gallery, ["a", "b", "c"], cfg, timing=timing)
    bad = [*errors, *others]
    m = write_outputs(out_in(tmp_path / "out"), pred, Queries({p: "s" for p in [*q.paths, *(p for p, _ in bad)]},
                                                              bad, folder), cfg, name="in")
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert len(rows) == 8
    bad = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(bad) == {"broken.png", "README.txt"}
    good = [r for r in rows if not r["error"]]
    assert all(r["predicted_label"] in "abc" and r["nearest_gallery_path"].startswith("/gallery/") for r in good)
    assert m["n_images"] == 6 and m["n_unreadable"] == 2


# ----------------------------------------------------------------------------- a tiny feature store


def make_store(tmp_path: Path, per_split=(12, 4, 5), n_classes=3, dim=16, sha="a" * 64,
               lut_sha: str | None = None) -> tuple[Path, Path, Path, int]:
    """splits.csv, a stage-04 folder (features.sqlite with one complete model + model.json) and stage
    06's lut.sqlite of every other train image (embedded by ``lut_sha``, default the same checkpoint)."""
    from common.fileio import write_json
    from common.stages.prune import write_lut_store
    from common.store.sqlite import FeatureStore

    tmp_path.mkdir(parents=True, exist_ok=True)
    classes = [f"sp{c}" for c in range(n_classes)]
    rows = []
    for split, n in zip(("train", "val", "test"), per_split):
        for c in classes:
            for i in range(n):
                rows.append({"path": str(tmp_path / "img" / c / f"{split}_{i}.png"), "label": c, "split": split,
                             "sha256": f"{split}{c}{i}", "width": 10, "height": 10, "mode": "RGB"})
    splits = tmp_path / "splits.csv"
    with open(splits, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    stage04 = tmp_path / "04_extract_features"
    stage04.mkdir(parents=True, exist_ok=True)
    store_path = stage04 / "features.sqlite"
    centres = np.random.default_rng(0).normal(size=(n_classes, dim))
    rng = np.random.default_rng(1)
    model_args = dict(embedding="encoder", backbone="test_resnet", dim=dim, mean=[0.5] * 3, std=[0.25] * 3,
                      image_size=32, pad_fill=0, classes=classes, checkpoint_path="best.pt")
    with FeatureStore(store_path, create=True) as store:
        store.sync_images([types.SimpleNamespace(**r) for r in rows])
        info, _ = store.register_model(checkpoint_sha256=sha, **model_args)
        recs = store.images()
        X = centres[[classes.index(r.label) for r in recs]] + 0.4 * rng.normal(size=(len(recs), dim))
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        store.write_vectors(info.id, [r.id for r in recs], X.astype(np.float32))
        store.mark_complete(info.id)
        train = store.load_split("train", info.id, classes)
    write_json(stage04 / "model.json", {"model_id": info.id, "checkpoint": str(tmp_path / "best.pt"),
                                        "checkpoint_sha256": sha, **model_args})
    kept = Vectors(train.X[::2], train.labels[::2], train.paths[::2], train.ids[::2])
    lut_path = tmp_path / "lut.sqlite"
    if lut_sha is None:
        write_lut_store(lut_path, store_path, info.id, kept)
    else:  # a LUT of another checkpoint
        with FeatureStore(lut_path, create=True) as lut:
            lut.sync_images([types.SimpleNamespace(**r) for r in rows if r["split"] == "train"][::2])
            other, _ = lut.register_model(checkpoint_sha256=lut_sha, **model_args)
            lut.write_vectors(other.id, [r.id for r in lut.images()], kept.X)
            lut.mark_complete(other.id)
    return splits, stage04, lut_path, info.id


def test_load_store_data_lut_and_full(tmp_path):
    splits, stage04, lut_path, mid = make_store(tmp_path)
    lut = load_store_data(stage04, splits, lut_path)
    full = load_store_data(stage04, splits, None)
    assert lut.classes == ["sp0", "sp1", "sp2"] and lut.model_id == mid
    assert (len(full.train), len(full.val), len(full.test)) == (36, 12, 15)
    assert len(full.gallery) == 36 and len(lut.gallery) == 18
    assert set(lut.gallery.paths) <= set(full.train.paths)
    for i, p in enumerate(lut.gallery.paths):  # each LUT row is the same vector as its train row
        j = full.train.paths.index(p)
        np.testing.assert_array_equal(lut.gallery.X[i], full.train.X[j])
        assert lut.gallery.labels[i] == full.train.labels[j] == int(Path(p).parent.name[2:])
    assert all(Path(p).name.startswith("test_") for p in full.test.paths)
    no_test = load_store_data(stage04, splits, None, test=False)  # predict mode never reads the test split
    assert len(no_test.test) == 0 and no_test.test.X.shape == (0, full.val.X.shape[1]) and len(no_test.val) == 12


def test_hold_out_refuses_a_name_that_is_not_a_gallery_class(tmp_path):
    splits, stage04, lut_path, mid = make_store(tmp_path)
    data = load_store_data(stage04, splits, lut_path)
    with pytest.raises(UserError, match=r"^inference.unknown_classes: 'q' is not a class of the gallery \(sp0, sp1"):
        hold_out(data, ["q"])
    assert len(hold_out(data, ["sp1"]).unknown_test) == 5


def test_lut_of_another_model_is_refused(tmp_path):
    splits, stage04, lut_path, mid = make_store(tmp_path, lut_sha="b" * 64)
    with pytest.raises(UserError, match="another checkpoint"):
        load_store_data(stage04, splits, lut_path)
    # model.json naming another checkpoint than the store's vectors
    splits, stage04, lut_path, mid = make_store(tmp_path / "second")
    meta = json.loads((stage04 / "model.json").read_text())
    (stage04 / "model.json").write_text(json.dumps(meta | {"checkpoint_sha256": "c" * 64}))
    with pytest.raises(UserError, match="another checkpoint"):
        load_store_data(stage04, splits, lut_path)


def test_evaluate_from_a_tiny_store(brute, tmp_path):
    splits, stage04, lut_path, mid = make_store(tmp_path)
    data = load_store_data(stage04, splits, lut_path)
    inp = EvalInputs(classes=data.classes, test=data.test, gallery=data.gallery, train=data.train, val=data.val,
                       model_id=data.model_id, facts=data.facts)
    m = evaluate_and_write(inp, icfg(classifiers=["logreg"]), out_in(tmp_path / "out"))
    assert m["n_queries"] == 15 and m["gallery_size"] == 18 and m["accuracy"] > 0.6
    saved = json.loads((tmp_path / "out" / "classifiers" / "classes.json").read_text())
    assert saved["model_id"] == mid and saved["classes"] == data.classes


# ----------------------------------------------------------------------------- the stage's main, wired


def _checkpoint(path: Path, classes, seed: int) -> Path:
    """A stage-03 checkpoint of a tiny SupConModel (timm test_resnet, 96-d encoder, 32 px)."""
    import dataclasses

    import torch

    from common.model.checkpoint import CHECKPOINT_FORMAT
    from common.model.network import build_model

    mc = ModelConfig(backbone="test_resnet", pretrained="none", image_size=32, feat_dim=16)
    torch.manual_seed(seed)
    model = build_model(mc)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                "config": {"model": dataclasses.asdict(mc), "data": {"pad_fill": 0}},
                "classes": list(classes), "stats": {"mean": [0.5] * 3, "std": [0.25] * 3}, "epoch": 1}, path)
    return path


class FakeCtx:
    """The parts of common.stage.Context that stage 07 uses, over a hand-made run folder."""

    def __init__(self, run: Path, cfg):
        self.run_dir, self.cfg = run, cfg
        self.outputs = []

    @property
    def dir(self) -> Path:
        return SPECS["07_inference"].folder(self.run_dir, self.cfg)

    def upstream(self, name, required=True):
        p = self.run_dir / name
        return p if p.is_dir() else (None if not required else pytest.fail(f"missing {name}"))

    def output(self, *parts, digest="sha256"):
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.outputs.append("/".join(parts))
        return p

    def device(self):
        import torch

        return torch.device("cpu")


def _run_folder(tmp_path: Path, mode: str, **inference):
    from common.fileio import sha256_file

    run = tmp_path / "run"
    classes = ["sp0", "sp1", "sp2"]
    ck = _checkpoint(run / "03_main_supcon" / "checkpoints" / "best.pt", classes, seed=0)
    for d in ("01_random_split_dataset", "02_mean_std_variables", "06_prune_features"):
        (run / d).mkdir(parents=True, exist_ok=True)
    splits, stage04, lut_path, mid = make_store(run, dim=96, sha=sha256_file(ck))
    meta = json.loads((stage04 / "model.json").read_text())
    (stage04 / "model.json").write_text(json.dumps(meta | {"checkpoint": str(ck)}))
    splits.rename(run / "01_random_split_dataset" / "splits.csv")
    lut_path.rename(run / "06_prune_features" / "lut.sqlite")
    cfg = load_config(overrides=[f"inference.mode={mode}", "inference.embedding_map=pca",
                                   "inference.linear_epochs=2", *[f"inference.{k}={v}" for k, v in inference.items()]])
    return FakeCtx(run, cfg), ck


def test_stage_evaluate_mode_wired(tmp_path):  # real common.retrieval
    ctx, _ = _run_folder(tmp_path, "evaluate", classifiers="[logreg]", reject_below=0.2)
    m = stages_inference.main(ctx)
    assert set(m) >= {"accuracy", "macro_f1", "report"} and m["report"].endswith("report.html")
    assert json.loads((ctx.dir / "metrics.json").read_text())["gallery_size"] == 18  # the LUT, not all 36
    assert {"predictions.csv", "comparison.csv", "classifiers/logreg.skops", "classifiers/sha256.json"} <= set(ctx.outputs)


def test_stage_predict_mode_on_images_and_saved_classifiers(tmp_path, caplog):
    from common.fileio import write_json

    ctx, _ = _run_folder(tmp_path, "evaluate", classifiers="[logreg]")
    stages_inference.main(ctx)  # fits and saves the classifier
    evaluation = ctx.dir
    write_json(evaluation / "manifest.json", {"status": "ok"})  # the wrapper's mark of a finished evaluation
    before = {p.name: p.read_bytes() for p in evaluation.iterdir() if p.is_file()}
    folder = _image_folder(tmp_path / "new")
    ctx.cfg = load_config(overrides=["inference.mode=predict", f"inference.input={folder}",
                                       "inference.classifiers=[logreg]", "data.num_workers=0"])
    assert ctx.dir == evaluation / "predict" / "new"  # inference.name defaults to the input folder's name
    with caplog.at_level("INFO", logger="common.stages.inference"):
        m = stages_inference.main(ctx)
    assert "using the classifiers the evaluation saved" in caplog.text  # loaded (checked), not refitted
    assert m["n_images"] == 6 and m["n_unreadable"] == 2
    rows = read_csv(ctx.dir / "predictions.csv")
    assert len(rows) == 8 and all(r["pred_logreg"] in ("sp0", "sp1", "sp2") for r in rows if not r["error"])
    # trap: predict mode deleted the evaluation's confusion matrix, comparison, report and predictions
    assert {p.name: p.read_bytes() for p in evaluation.iterdir() if p.is_file()} == before
    assert (evaluation / "comparison.csv").is_file() and (evaluation / "confusion_matrix.png").is_file()
    # a changed model file is refused, never loaded
    with open(evaluation / "classifiers" / "logreg.skops", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(UserError, match="sha256"):
        stages_inference.main(ctx)


def test_stage_refuses_queries_from_another_checkpoint(tmp_path):
    ctx, ck = _run_folder(tmp_path, "evaluate")
    folder = _image_folder(tmp_path / "new")
    ctx.cfg = load_config(overrides=["inference.mode=predict", f"inference.input={folder}",
                                       "inference.classifiers=[]"])
    _checkpoint(ck, ["sp0", "sp1", "sp2"], seed=1)  # retrained: other weights, other sha256
    with pytest.raises(UserError, match="another checkpoint"):
        stages_inference.main(ctx)


def test_queries_use_the_checkpoints_preprocessing_and_a_gallery_of_another_is_refused(tmp_path):
    """Issue 17 #1: the queries are embedded as the checkpoint was trained (its recorded
    preprocessing); a store an earlier version filled with other statistics is refused."""
    import sqlite3

    ctx, ck = _run_folder(tmp_path, "evaluate")
    ctx.cfg = load_config(overrides=["inference.mode=predict", f"inference.input={_image_folder(tmp_path / 'new')}",
                                       "inference.classifiers=[]", "data.pad_fill=255"])  # the config is never used
    data = load_store_data(ctx.run_dir / "04_extract_features", ctx.run_dir / "01_random_split_dataset" /
                              "splits.csv", None)
    _, transform = load_query_model(ctx, data)
    steps = [t for t in transform.transforms]
    assert "fill=0" in repr(steps[0]) and list(steps[-1].mean) == [0.5] * 3  # the checkpoint's, not data.pad_fill
    con = sqlite3.connect(ctx.run_dir / "04_extract_features" / "features.sqlite")
    con.execute("UPDATE models SET mean = '[0.4, 0.5, 0.5]'")
    con.commit()
    con.close()
    with pytest.raises(UserError, match=r"another preprocessing .*rerun 04_extract_features.py --force"):
        stages_inference.main(ctx)


def test_predict_applies_the_size_checks_of_stage_01(tmp_path):
    """Issue 11 #10: predict mode decoded and classified an image stage 01 rejects."""
    import torch
    from PIL import Image

    from common.model.network import build_model

    folder = tmp_path / "new"
    folder.mkdir()
    Image.new("L", (64, 64), 40).save(folder / "ok.png")
    Image.new("L", (300, 300), 40).save(folder / "huge.png")  # 90,000 pixels
    Image.new("L", (64, 2), 40).save(folder / "thin.png")
    model = build_model(ModelConfig(backbone="test_resnet", pretrained="none", image_size=32, feat_dim=16)).eval()
    from common.data.transforms import eval_transform

    tf = eval_transform(32, [0.5] * 3, [0.25] * 3, 0)
    paths = [str(folder / n) for n in ("ok.png", "huge.png", "thin.png")]
    X, ok, errors, _ = embed_paths(paths, model, tf, 32, embedding="encoder", batch_size=2, num_workers=0,
                                   device=torch.device("cpu"), min_side=4, max_pixels=10_000)
    assert ok == [0] and X.shape[0] == 1
    reasons = dict(errors)
    assert "more than data.max_pixels=10,000" in reasons[paths[1]]
    assert "shorter than data.min_side=4" in reasons[paths[2]]
# ----------------------------------------------------------------------------- the scientist's loop (vectors)


def test_predict_samples_counts_ecotaxa_review_corrections(brute, tmp_path):
    from PIL import Image

    inp = _eval_inputs()
    n = 6
    paths = []
    for i in range(n):
        p = tmp_path / "in" / ("st1" if i < 4 else "st2") / f"q{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(p)
        paths.append(str(p))
    gpaths = []
    for i in range(len(inp.gallery)):
        p = tmp_path / "gallery" / f"g{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (0, i, 0)).save(p)
        gpaths.append(str(p))
    gallery = Vectors(inp.gallery.X, inp.gallery.labels, gpaths)
    q = Vectors(inp.test.X[:n], np.full(n, -1), paths)
    samples = ["st1"] * 4 + ["st2"] * 2
    cfg = icfg(mode="predict", input=str(tmp_path / "in"), reject_below="auto", reject_keep=0.9, ood_k=3)
    pred = predict(q, gallery, inp.classes, cfg, val=inp.val, timing={"decode_embed_s": 0.1})
    bad = str(tmp_path / "in" / "st2" / "bad.png")
    m = write_outputs(out_in(tmp_path / "out"), pred, Queries({**dict(zip(paths, samples)), bad: "st2"},
                                                              [(bad, "broken")], tmp_path / "in"), cfg, name="cruise")
    out = tmp_path / "out"
    rows = read_csv(out / "predictions.csv")
    assert [r["sample"] for r in rows] == [*samples, "st2"] and rows[-1]["error"] == "broken"
    good = rows[:n]
    for r in good:
        assert float(r["margin"]) >= 0  # top1: the predicted class is the nearest
        assert float(r["knn_similarity"]) <= float(r["similarity"]) + 1e-6
        sims = [float(r[f"neighbour{j}_similarity"]) for j in range(1, 6)]
        assert sims == sorted(sims, reverse=True) and sims[0] == pytest.approx(float(r["similarity"]), abs=1e-5)
        assert r["neighbour1_path"] == r["nearest_gallery_path"]
    # auto: the cut keeps >= 90% of the correct val predictions, chosen on val
    cut = m["reject_cut"]
    assert m["reject_score"] == "similarity" and cut == pytest.approx(m["val_cuts"]["similarity"])
    assert all((r["predicted_label"] == "unknown") == (float(r["similarity"]) < cut) for r in good)
    counts = read_csv(out / "sample_counts.csv")
    assert [c["sample"] for c in counts] == ["st1", "st2"]
    assert [int(c["total"]) for c in counts] == [4, 2] and [int(c["unreadable"]) for c in counts] == [0, 1]
    for c in counts:
        assert sum(int(c[k]) for k in [*inp.classes, "unknown"]) == int(c["total"])
    assert (out / "sample_counts.png").stat().st_size > 0
    with zipfile.ZipFile(out / "ecotaxa_cruise.zip") as zf:
        tsv = zf.read("ecotaxa_cruise.tsv").decode("utf-8-sig").splitlines()
        assert sorted(zf.namelist()) == sorted(["ecotaxa_cruise.tsv", *(f"st{1 + (i >= 4)}/q{i}.png" for i in range(n))])
    assert len(tsv) == 2 + n and tsv[2].split("\t")[0] == "st1/q0.png"
    eco_rows = [dict(zip(tsv[0].split("\t"), r.split("\t"))) for r in tsv[2:]]
    assert [r["sample_id"] for r in eco_rows] == [f"cruise_{s}" for s in samples]
    assert all(r["object_id"].startswith("cruise_q") for r in eco_rows)
    assert m["ecotaxa"]["rows"] == n and m["ecotaxa"]["unmatched_classes"] == sorted(
        {r["object_annotation_category"] for r in eco_rows} - {""})
    assert "exactly one taxon" in (out / "report.html").read_text()  # no taxa map: the names EcoTaxa may not match
    sheet = read_csv(out / "corrections.csv")
    assert list(sheet[0]) == ["path", "predicted", "validated"] and {r["path"] for r in sheet} == set(paths)
    doubtful_first = [r["predicted"] == "unknown" for r in sheet]
    assert doubtful_first == sorted(doubtful_first, reverse=True)  # rejected ones lead
    from common.report.review import Review, review_key

    page = (out / "review.html").read_text()
    data = json.loads(page.split('id="review-data">', 1)[1].split("</script>", 1)[0])
    assert len(data["items"]) == n and data["rows"] == [[r["path"], r["predicted"]] for r in sheet]
    assert data["images"][0][0].startswith("data:image/") and data["images"][0][1:3] == [8, 8]
    assert data["classes"] == inp.classes
    # "Save for EcoTaxa (zip)": the bundle's own rows of the items, in the page's order (not the bundle's)
    e = data["ecotaxa"]
    assert e["header"] == tsv[0].split("\t") and e["row"] == list(range(n)) and e["why"] == [] and e["taxa"] is None
    files = e["columns"][0]  # img_file_name: distinct, so stored as it is
    assert all(Path(p).as_posix().endswith("/" + f) for (p, _), f in zip(data["rows"], files))
    assert sorted(files) == sorted(r["img_file_name"] for r in eco_rows)
    keyed = Review("", "", "cruise", [], [], rows=[(r["path"], r["predicted"]) for r in sheet])
    assert data["key"].startswith("plankton-review/v1/cruise/") and data["key"] == review_key(keyed)
    assert m["n_images"] == n and m["samples"]["st2"]["unreadable"] == 1


def test_evaluate_with_unknown_classes_reports_both_scores(brute, tmp_path):
    inp = _eval_inputs(n_test=10)
    out_c = 4  # class_e leaves the gallery: its test images are unknowns
    keep = inp.gallery.labels != out_c
    inp.gallery = Vectors(inp.gallery.X[keep], inp.gallery.labels[keep], [p for p, k in zip(inp.gallery.paths, keep) if k])
    known = inp.test.labels != out_c
    unknown = Vectors(inp.test.X[~known], inp.test.labels[~known], [p for p, k in zip(inp.test.paths, known) if not k])
    inp.test = Vectors(inp.test.X[known], inp.test.labels[known], [p for p, k in zip(inp.test.paths, known) if k])
    inp.val = Vectors(inp.val.X[inp.val.labels != out_c], inp.val.labels[inp.val.labels != out_c],
                        [p for p, lab in zip(inp.val.paths, inp.val.labels) if lab != out_c])
    inp.unknown_test, inp.unknown_classes = unknown, ["class_e"]
    m = evaluate_and_write(inp, icfg(reject_below="auto", reject_score="knn", ood_k=3), out_in(tmp_path))
    u = json.loads((tmp_path / "metrics.json").read_text())["unknown_classes"]
    assert u["classes"] == ["class_e"] and u["n_unknown"] == 10 and u["n_known"] == 40
    for score in ("similarity", "knn"):
        s = u["scores"][score]
        assert 0 <= s["auroc"] <= 1 and 0 <= s["fpr_at_95_tpr"] <= 1 and s["cut"] == pytest.approx(m["val_cuts"][score])
    assert m["reject_score"] == "knn" and m["reject_cut"] == pytest.approx(m["val_cuts"]["knn"])
    rows = read_csv(tmp_path / "predictions.csv")
    assert len(rows) == 40 and all((r["accepted"] == "1") == (float(r["knn_similarity"]) >= m["reject_cut"])
                                   for r in rows)
    assert "Unknown classes: class_e" in (tmp_path / "report.html").read_text()


def test_predict_name_defaults_to_the_input_name(tmp_path):
    from common.stages import predict_name

    (tmp_path / "cruise_42").mkdir()
    (tmp_path / "list.csv").write_text("path\n")
    for inp, want in ((tmp_path / "cruise_42", "cruise_42"), (tmp_path / "list.csv", "list")):
        cfg = load_config(overrides=["inference.mode=predict", f"inference.input={inp}"])
        assert predict_name(cfg) == want
    cfg = load_config(overrides=["inference.mode=predict", f"inference.input={tmp_path}", "inference.name=x"])
    assert predict_name(cfg) == "x"


def test_load_store_data_streamed(tmp_path):
    """``max_memory_gib=0``: the gallery and the train split stay in the store (``StoreMatrix``)
    with the rows, labels and paths of the loaded ones; val and test are loaded."""
    from common.retrieval.streamed import StoreMatrix

    splits, stage04, lut_path, mid = make_store(tmp_path)
    for lp in (lut_path, None):
        mem = load_store_data(stage04, splits, lp)
        st = load_store_data(stage04, splits, lp, max_memory_gib=0.0)
        assert isinstance(st.gallery.X, StoreMatrix) and isinstance(st.train.X, StoreMatrix)
        assert isinstance(st.val.X, np.ndarray) and isinstance(st.test.X, np.ndarray)
        for a, b in ((mem.gallery, st.gallery), (mem.train, st.train)):
            assert np.array_equal(a.ids, b.ids) and np.array_equal(a.labels, b.labels) and a.paths == b.paths
            assert np.array_equal(np.concatenate([x for _, x in b.X.blocks()]), a.X)
        assert any("streamed from" in str(v) for _, v in st.facts)
        big = load_store_data(stage04, splits, lp, max_memory_gib=1.0)  # fits: loaded
        assert isinstance(big.gallery.X, np.ndarray)
