"""Stage 04 (common/extract.py): a tiny timm model at 32 px on a dozen images in tmp_path."""
from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config.load import load_config
from common.config.schema import Config
from common.errors import ImageReadError, UserError
from common.fileio import sha256_file
from common.store.maintenance import content_digest
from common.store.sqlite import FeatureStore

CLASSES = ["copepod", "diatom", "noctiluca"]
N_IMAGES = 12
STATS = {"mean": [0.2, 0.25, 0.3], "std": [0.2, 0.22, 0.25]}


def _cfg(**over: str) -> Config:
    base = {"model.backbone": "test_resnet", "model.image_size": "32", "model.feat_dim": "16",
            "data.num_workers": "0", "extract.batch_size": "5", "run.device": "cpu",
            "extract.cpu_precision": "fp32",  # the vectors equal the model's own float32 output
            "data.pad_fill": "0"}  # the reference transform below pads with 0 (the default before auto)
    base.update(over)
    return load_config([], [f"{k}={v}" for k, v in base.items()])


def _write_images(root: Path) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        label = CLASSES[i % 3]
        p = root / label / f"img_{i:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        h, w = 20 + 3 * i, 30 - i  # odd shapes: padding to a square matters
        if i % 4 == 0:
            Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8), mode="L").save(p)
        else:
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        rows.append({"path": str(p), "label": label, "split": ("train", "train", "val", "test")[i % 4],
                     "sha256": sha256_file(p), "width": w, "height": h, "mode": "L" if i % 4 == 0 else "RGB"})
    return rows


def _write_splits(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "split", "sha256", "width", "height", "mode"])
        w.writeheader()
        w.writerows(rows)
    return path


def _checkpoint(path: Path, cfg: Config, classes: list[str], seed: int) -> Path:
    """A checkpoint in the documented format (docs/INTERNALS.md), random weights."""
    from common.model.network import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model)
    torch.save({"format": "plankton-supcon/1", "model": model.state_dict(), "optimizer": {}, "scheduler": {},
                "scaler": {}, "epoch": 1, "step": 1, "rng": {}, "config": cfg.to_dict(), "classes": classes,
                "stats": STATS, "metrics": {}}, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    rows = _write_images(root / "images")
    splits = _write_splits(root / "splits.csv", rows)
    cfg = _cfg()
    ck_a = _checkpoint(root / "a.pt", cfg, CLASSES, seed=0)
    ck_b = _checkpoint(root / "b.pt", cfg, CLASSES, seed=1)
    return {"root": root, "rows": rows, "splits": splits, "cfg": cfg, "a": ck_a, "b": ck_b}


def _extract(data, store: Path, ckpt: Path | None = None, splits: Path | None = None, cfg=None, **kw) -> dict:
    from common.model.extract import extract_features

    return extract_features(ckpt or data["a"], splits or data["splits"], store, cfg or data["cfg"],
                            device="cpu", **kw)


def _reference(data, ckpt: Path, embedding: str = "encoder") -> dict[str, np.ndarray]:
    """Each image embedded alone, straight from the model: path -> L2-normalised float32 vector."""
    from common.data.images import load_rgb
    from common.data.transforms import eval_transform
    from common.model.checkpoint import load_checkpoint_model

    model, ck = load_checkpoint_model(ckpt, map_location="cpu")
    tf = eval_transform(32, STATS["mean"], STATS["std"], 0)
    out = {}
    with torch.inference_mode():
        for r in data["rows"]:
            x = tf(load_rgb(r["path"]))[None]
            v = model.encoder(x) if embedding == "encoder" else model(x)
            out[r["path"]] = torch.nn.functional.normalize(v.float(), dim=1)[0].numpy()
    return out


def _vectors(store_path: Path, model_id: int) -> dict[str, np.ndarray]:
    with FeatureStore(store_path) as s:
        ids, labels, X = s.load_matrix(None, model_id)
        path_of = {r.id: r.path for r in s.images()}
    return {path_of[int(i)]: X[k] for k, i in enumerate(ids)}


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """One uninterrupted run with checkpoint a: (store path, metrics)."""
    store = tmp_path_factory.mktemp("full") / "features.sqlite"
    return store, _extract(data, store)


def test_round_trip_equals_the_model(data, full_run):
    store, m = full_run
    assert m["vectors_written"] == m["vectors"] == N_IMAGES and m["dim"] == 96 and m["embedding"] == "encoder"
    assert m["images_per_s"] > 0 and m["checkpoint_sha256"] == sha256_file(data["a"])
    got, want = _vectors(store, m["model_id"]), _reference(data, data["a"])
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=0, atol=1e-6)
    with FeatureStore(store) as s:
        info = s.model_info(m["model_id"])
        assert info.complete and info.backbone == "test_resnet" and info.image_size == 32
        assert info.classes == CLASSES and np.allclose(info.mean, STATS["mean"])
        assert {r.split for r in s.images("val")} == {"val"} and len(s.images()) == N_IMAGES


def test_the_checkpoints_own_preprocessing_is_used(data, tmp_path):
    """Issue 17 #1: the vectors are made with the preprocessing the checkpoint records (a checkpoint
    of this version) or derives from its stats and config (an earlier one, as ``data["a"]``)."""
    from common.data.images import load_rgb
    from common.data.transforms import eval_transform
    from common.model.checkpoint import checkpoint_preprocessing, load_checkpoint_model

    ck = torch.load(data["a"], weights_only=True)
    pre = {"mean": [0.6, 0.5, 0.4], "std": [0.3, 0.35, 0.4], "image_size": 32, "pad_fill": 255, "channels": "RGB"}
    torch.save({**ck, "preprocessing": pre}, tmp_path / "new.pt")
    m = _extract(data, tmp_path / "f.sqlite", ckpt=tmp_path / "new.pt")
    model, loaded = load_checkpoint_model(tmp_path / "new.pt")
    assert checkpoint_preprocessing(loaded, "new.pt").as_dict() == pre
    assert checkpoint_preprocessing(ck, "a.pt").as_dict() == {**STATS, "image_size": 32, "pad_fill": 0,
                                                               "channels": "RGB"}  # derived
    tf = eval_transform(32, pre["mean"], pre["std"], 255)
    got = _vectors(tmp_path / "f.sqlite", m["model_id"])
    with torch.inference_mode():
        for r in data["rows"][:4]:
            want = torch.nn.functional.normalize(model.encoder(tf(load_rgb(r["path"]))[None]).float(), dim=1)[0]
            np.testing.assert_allclose(got[r["path"]], want.numpy(), rtol=0, atol=1e-6)
    with FeatureStore(tmp_path / "f.sqlite") as s:
        info = s.model_info(m["model_id"])
        assert np.allclose(info.mean, pre["mean"]) and info.pad_fill == 255
    torch.save({**ck, "preprocessing": {**pre, "channels": "L"}}, tmp_path / "grey.pt")
    with pytest.raises(UserError, match="not 3-channel RGB"):
        _extract(data, tmp_path / "g.sqlite", ckpt=tmp_path / "grey.pt")


def test_bf16_on_the_cpu_is_close_and_recorded(data, full_run, tmp_path):
    store32, m32 = full_run
    m = _extract(data, tmp_path / "f.sqlite", cfg=_cfg(**{"extract.cpu_precision": "bf16"}))
    assert m["cpu_precision"] == "bf16" and m32["cpu_precision"] == "fp32"
    got, want = _vectors(tmp_path / "f.sqlite", m["model_id"]), _vectors(store32, m32["model_id"])
    cos = [float(np.dot(got[p], want[p])) for p in want]
    assert min(cos) >= 0.999 and max(abs(c - 1) for c in cos) > 0  # close, and really bf16
    for v in got.values():
        assert abs(np.linalg.norm(v) - 1) < 1e-6  # normalised in float32 after the forward


def test_head_embedding(data, tmp_path):
    m = _extract(data, tmp_path / "f.sqlite", cfg=_cfg(**{"extract.embedding": "head"}))
    assert m["dim"] == 16 and m["embedding"] == "head"
    got, want = _vectors(tmp_path / "f.sqlite", m["model_id"]), _reference(data, data["a"], "head")
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=0, atol=1e-6)


def test_class_list_mismatch_names_both(data, tmp_path):
    ck = _checkpoint(tmp_path / "other.pt", data["cfg"], ["copepod", "diatom", "radiolaria"], seed=0)
    with pytest.raises(UserError) as e:
        _extract(data, tmp_path / "f.sqlite", ckpt=ck)
    msg = str(e.value)
    assert "other.pt" in msg and "splits.csv" in msg and "radiolaria" in msg and "noctiluca" in msg


def test_resume_after_interruption(data, full_run, tmp_path, monkeypatch):
    store = tmp_path / "f.sqlite"
    calls = {"n": 0}
    original = FeatureStore.write_vectors

    def dies_on_second_chunk(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *a, **kw)

    monkeypatch.setattr(FeatureStore, "write_vectors", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        _extract(data, store, chunk_rows=4)
    monkeypatch.undo()
    with FeatureStore(store) as s:
        (model,) = s.models()
        assert not model.complete and s.counts()["vectors"] == 4  # the first chunk was committed
        with pytest.raises(UserError, match="04_extract_features.py"):
            s.load_matrix("train", model.id)
    m = _extract(data, store, chunk_rows=4)
    assert m["vectors_written"] == N_IMAGES - 4 and m["vectors"] == N_IMAGES and m["model_id"] == model.id
    full_store, full = full_run
    got, want = _vectors(store, m["model_id"]), _vectors(full_store, full["model_id"])
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=0, atol=1e-6)


def test_rerun_writes_nothing(data, tmp_path):
    store = tmp_path / "f.sqlite"
    first = _extract(data, store)
    before = (sha256_file(store), content_digest(store))
    again = _extract(data, store)
    assert again["vectors_written"] == 0 and again["model_id"] == first["model_id"] and again["vectors"] == N_IMAGES
    assert (sha256_file(store), content_digest(store)) == before  # not a byte changed


def test_new_checkpoint_replaces_the_old_and_splits_are_followed(data, tmp_path):
    store = tmp_path / "f.sqlite"
    a = _extract(data, store)
    b = _extract(data, store, ckpt=data["b"])
    assert b["model_id"] != a["model_id"] and b["models_replaced"] == 1 and b["vectors_written"] == N_IMAGES
    with FeatureStore(store) as s:
        assert [m.id for m in s.models()] == [b["model_id"]]
        c = s.counts()
        assert (c["models"], c["vectors"]) == (1, N_IMAGES)
    want = _reference(data, data["b"])
    for p, v in _vectors(store, b["model_id"]).items():
        np.testing.assert_allclose(v, want[p], rtol=0, atol=1e-6)
    # two images leave the splits: they leave the store; nothing else is embedded again
    splits = _write_splits(tmp_path / "splits.csv", data["rows"][:-2])
    r = _extract(data, store, ckpt=data["b"], splits=splits)
    assert (r["vectors_written"], r["images_removed"], r["vectors"]) == (0, 2, N_IMAGES - 2)
    assert set(_vectors(store, r["model_id"])) == {x["path"] for x in data["rows"][:-2]}


def test_unreadable_image_is_named(data, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = data["rows"] + [{**data["rows"][0], "path": str(bad), "sha256": sha256_file(bad)}]
    splits = _write_splits(tmp_path / "splits.csv", rows)
    for workers in ("0", "1"):
        with pytest.raises(ImageReadError, match="broken.png"):
            _extract(data, tmp_path / f"f{workers}.sqlite", splits=splits, cfg=_cfg(**{"data.num_workers": workers}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, args: dict) -> None:
    import torch.distributed as dist

    from common.model.extract import extract_features

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # chunks of 11 and 1 images: rank 1 has nothing to embed in the second
        m = extract_features(args["ckpt"], args["splits"], args["store"], args["cfg"], device="cpu",
                             rank=rank, world_size=world, chunk_rows=11)
        if rank == 0:
            Path(args["out"]).write_text(json.dumps(m))
        try:  # an unreadable image on one rank stops every rank, with its name
            extract_features(args["ckpt"], args["bad_splits"], args["bad_store"], args["cfg"],
                             device="cpu", rank=rank, world_size=world, chunk_rows=5)
            outcome = "finished"
        except Exception as e:  # noqa: BLE001 - recorded for the test to check
            outcome = f"{type(e).__name__}: {e}"
        Path(f"{args['out']}.{rank}").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(data, full_run, tmp_path):
    import torch.multiprocessing as mp

    store = tmp_path / "f.sqlite"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    bad_splits = _write_splits(tmp_path / "bad.csv", [{**data["rows"][0], "path": str(bad)}, *data["rows"]])
    args = {"ckpt": str(data["a"]), "splits": str(data["splits"]), "store": str(store),
            "cfg": data["cfg"], "out": str(tmp_path / "m.json"), "bad_splits": str(bad_splits),
            "bad_store": str(tmp_path / "bad.sqlite")}
    mp.spawn(_ddp_worker, args=(2, _free_port(), args), nprocs=2, join=True)
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["world_size"] == 2 and m["vectors_written"] == N_IMAGES
    full_store, full = full_run
    got, want = _vectors(store, m["model_id"]), _vectors(full_store, full["model_id"])
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=0, atol=1e-6)
    with FeatureStore(store) as s, FeatureStore(full_store) as f:
        assert [(r.id, r.path) for r in s.images()] == [(r.id, r.path) for r in f.images()]
    outcomes = [(tmp_path / f"m.json.{r}").read_text() for r in range(2)]
    assert all("broken.png" in o for o in outcomes), outcomes
    assert sum(o.startswith("ImageReadError") for o in outcomes) == 1, outcomes


def test_gallery_extra_images_are_stored_as_extra_and_embedded_once(data, tmp_path):
    from PIL import Image

    from common.data.extras import list_extras

    extra = tmp_path / "extra"
    rng = np.random.default_rng(5)
    for i, label in enumerate(["diatom", "new_taxon", "new_taxon"]):
        p = extra / label / f"e{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (25, 25, 3), dtype=np.uint8)).save(p)
    extras = list_extras([extra])
    store = tmp_path / "features.sqlite"
    first = _extract(data, store, extras=extras[:1])
    assert first["vectors_written"] == N_IMAGES + 1 and first["extra_images"] == 1
    again = _extract(data, store, extras=extras)  # two more: only those are embedded
    assert again["vectors_written"] == 2 and again["vectors"] == N_IMAGES + 3
    with FeatureStore(store) as s:
        rows = s.images("extra")
        assert [(Path(r.path).name, r.label) for r in rows] == [("e0.png", "diatom"), ("e1.png", "new_taxon"),
                                                                ("e2.png", "new_taxon")]
        assert s.model_info(again["model_id"]).classes == CLASSES  # the checkpoint's own classes
    vecs = _vectors(store, again["model_id"])
    assert all(np.isclose(np.linalg.norm(vecs[r.path]), 1, atol=1e-5) for r in rows)
    # an image both in the splits and in data.gallery_extra is refused, naming it
    from common.data.extras import ExtraImage

    dup = ExtraImage(data["rows"][0]["path"], "diatom", data["rows"][0]["sha256"], str(extra))
    with pytest.raises(UserError, match="already in .*splits.csv"):
        _extract(data, tmp_path / "other.sqlite", extras=[dup])
