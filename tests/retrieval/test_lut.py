"""common.lut: the LUT rule against a direct pair loop, the sweep against per-threshold runs,
threshold rules, the grid, and stages 05/06 over a hand-made feature store."""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import unit_rows

from common.config.load import load_config
from common.config.schema import LutConfig
from common.errors import ConfigError, UserError
from common.retrieval import search as retrieval_search
from common.retrieval.prune import exact_similarity, prune, prune_sweep, similarity_margin
from common.retrieval.search import knn_vote
from common.retrieval.sweep import (
    SWEEP_COLUMNS,
    choose_threshold,
    gini,
    kept_ids_sha256,
    nearest_kept,
    suggested_reject_below,
    sweep_rows,
    threshold_grid,
)
from common.stages import SPECS
from common.stages import prune as stages_prune
from common.stages import threshold as stages_threshold

# ----------------------------------------------------------------------------- data and the reference


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def clustered(n=240, n_classes=4, dim=16, seed=0):
    """Classes of sub-clusters (so within-class similarities straddle the thresholds), with exact
    duplicates (similarity 1 or a hair off it in float32) and shuffled image ids."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    sub = rng.integers(0, 3, n)
    centres = rng.normal(size=(n_classes, 3, dim))
    X = centres[labels, sub] + rng.uniform(0.2, 0.8, size=(n, 1)) * rng.normal(size=(n, dim))
    X = unit_rows(X)
    for src, dst in ((5, range(40, 46)), (9, range(100, 103)), (17, range(n - 3, n - 1))):
        X[list(dst)] = X[src]
        labels[list(dst)] = labels[src]
    ids = rng.permutation(n) * 3 + 11  # ids are not row order
    return X, labels, ids


def dyadic(n=60, n_classes=2, dim=16, seed=1):
    """Vectors of four entries +-0.5: norm exactly 1, every similarity a multiple of 0.25, all
    exact in float32 -- so thresholds 0.5 / 0.75 / 1.0 meet exact ties everywhere."""
    rng = np.random.default_rng(seed)
    X = np.zeros((n, dim), np.float32)
    for r in range(n):
        X[r, rng.choice(dim // 2, 4, replace=False)] = 0.5 * rng.choice([-1, 1], 4)  # overlap often
    y = rng.integers(0, n_classes, n)
    X[20:24], y[20:24] = X[3], y[3]  # duplicates: similarity exactly 1.0
    return X, y, np.arange(n)


def pair_loop(X, labels, ids, t):
    """The reference rule, item by item: s(i, j) = float32 of the float64 dot product, compared
    with ``t`` in float64 (a float32 array compared with a Python float would round ``t``)."""
    S = (X.astype(np.float64) @ X.astype(np.float64).T).astype(np.float32).astype(np.float64)
    keep = np.zeros(len(X), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = rows[np.argsort(ids[rows], kind="stable")]
        alive = [True] * rows.size
        for a in range(rows.size):
            if alive[a]:
                for b in range(a + 1, rows.size):
                    if alive[b] and S[rows[a], rows[b]] > t:
                        alive[b] = False
        keep[rows[np.array(alive)]] = True
    return keep


def tie_thresholds(X, labels, ids, per_class=2):
    """Thresholds that decide an item's fate by a hair: for an item j, its most similar earlier
    item i* of the class gives t = s(i*, j) (an exact tie: j is not pruned by i*) and the float32
    value just below it (j is pruned by i* if i* is kept). These fall inside the float32
    products' rounding band, so the exact recheck decides them."""
    S = (X.astype(np.float64) @ X.astype(np.float64).T).astype(np.float32)
    rng = np.random.default_rng(3)
    out = []
    for c in np.unique(labels):
        r = np.flatnonzero(labels == c)
        r = r[np.argsort(ids[r], kind="stable")]
        if r.size < 3:
            continue
        for p in rng.choice(np.arange(1, r.size), min(per_class, r.size - 1), replace=False):
            s = S[r[:p], r[p]].max()
            out += [float(s), float(np.nextafter(s, np.float32(-2)))]
    return out


# ----------------------------------------------------------------------------- the rule


def test_prune_equals_pair_loop_clustered():
    X, y, ids = clustered()
    ts = [0.3, 0.6, 0.8, 0.9, 0.99, 1.0] + tie_thresholds(X, y, ids)
    for t in ts:
        want = pair_loop(X, y, ids, t)
        if t == 0.8:
            assert 0.1 * len(X) < want.sum() < 0.9 * len(X)  # pruning does something on this data
        for block in (1, 5, 32, 4096):  # blocks of one item, smaller than a class, all of a class
            got = prune(X, y, ids, t, block_size=block)
            assert np.array_equal(got, want), (t, block, np.flatnonzero(got != want))


def test_prune_equals_pair_loop_exact_ties():
    X, y, ids = dyadic()
    S = X @ X.T
    for t in (0.25, 0.5, 0.75, 1.0):
        assert (np.triu(S, 1) == t).any()  # the threshold value itself occurs: equal does not prune
        want = pair_loop(X, y, ids, t)
        for block in (1, 7, 4096):
            assert np.array_equal(prune(X, y, ids, t, block_size=block), want), (t, block)
    # identical vectors have similarity exactly 1.0: kept at t = 1.0, pruned just below it
    Xd = np.repeat(X[:1], 5, axis=0)
    assert prune(Xd, np.zeros(5), None, 1.0).all()
    assert prune(Xd, np.zeros(5), None, 0.999999).tolist() == [True, False, False, False, False]


def test_thresholds_are_not_rounded_to_float32():
    """For every threshold of the default grid, pairs whose similarity is float32(t) and one ulp
    either side: prune and prune_sweep decide like the pair loop in float64. float32(t) lies above
    t for 0.8 and 0.99 (among others), so such a pair must be pruned although it equals t in float32."""
    grid = threshold_grid(LutConfig())
    vecs, labels, cases = [], [], []
    for t in grid:
        s0 = np.float32(t)
        for s in (np.nextafter(s0, np.float32(-2)), s0, np.nextafter(s0, np.float32(2))):
            if s > 1:
                continue
            b = np.array([s, np.sqrt(1.0 - np.float64(s) ** 2)], dtype=np.float32)
            vecs += [np.array([1.0, 0.0], np.float32), b]  # a . b = s exactly, in any precision
            labels += [len(cases)] * 2
            cases.append((t, s))
    X, y = np.stack(vecs), np.array(labels)
    ids = np.arange(len(X))
    # the similarity the code computes (fast product and exact recheck) is s itself
    Xt = torch.from_numpy(X)
    first, second = torch.arange(0, len(X), 2), torch.arange(1, len(X), 2)
    s_all = np.array([s for _, s in cases], np.float32)
    np.testing.assert_array_equal(exact_similarity(Xt, first, second).numpy(), s_all)
    np.testing.assert_array_equal((Xt[first] * Xt[second]).sum(1).numpy(), s_all)
    np.testing.assert_array_equal(np.diag(X[0::2] @ X[1::2].T), s_all)
    for t in (0.8, 0.99):  # the cases the float32-rounded comparison got wrong exist
        assert float(np.float32(t)) > t and not np.float32(t) > np.float32(t)
        i = cases.index((t, np.float32(t)))
        assert not pair_loop(X, y, ids, t)[2 * i + 1]  # s = float32(t) > t: the later item goes
    sweep = prune_sweep(X, y, ids, grid, block_size=4096)
    for ti, t in enumerate(grid):
        want = pair_loop(X, y, ids, t)
        for i, (_, s) in enumerate(cases):
            assert want[2 * i + 1] == (not float(s) > t)
        for block in (1, 4096):
            got = prune(X, y, ids, t, block_size=block)
            assert np.array_equal(got, want), (t, block, [cases[i // 2] for i in np.flatnonzero(got != want)])
        assert np.array_equal(sweep[ti], want), (t, [cases[i // 2] for i in np.flatnonzero(sweep[ti] != want)])


def test_classes_never_prune_each_other_and_each_keeps_its_first():
    X, y, ids = clustered()
    Xs = np.concatenate([X, X])  # every vector also in a second copy of the classes
    ys = np.concatenate([y, y + 10])
    ids2 = np.concatenate([ids, ids + 10_000])
    for t in (-1.0, 0.7):
        k = prune(Xs, ys, ids2, t, block_size=16)
        assert np.array_equal(k[:len(X)], k[len(X):])  # identical twins in other classes survive alike
        assert np.array_equal(k[:len(X)], prune(X, y, ids, t, block_size=16))
    k = prune(X, y, ids, -1.0, block_size=8)  # prunes everything it can
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        assert k[rows].sum() >= 1 and k[rows[np.argmin(ids[rows])]]  # the lowest id is always kept


def test_margin_band_is_used_and_bound_holds():
    X, y, ids = clustered(dim=64)
    m = similarity_margin(64)
    S32 = (torch.from_numpy(X) @ torch.from_numpy(X).T).numpy()
    exact = X.astype(np.float64) @ X.astype(np.float64).T
    assert np.abs(S32 - exact).max() < m  # the worst-case bound covers the float32 product
    rows = torch.arange(10)
    np.testing.assert_array_equal(exact_similarity(torch.from_numpy(X), rows, rows + 1).numpy(),
                                  exact[np.arange(10), np.arange(10) + 1].astype(np.float32))


@pytest.mark.parametrize("block", [3, 4096])
def test_sweep_equals_prune_per_threshold(block):
    X, y, ids = clustered()
    ts = [0.5, 0.8, 0.9, 1.0] + tie_thresholds(X, y, ids)
    keeps = prune_sweep(X, y, ids, ts, block_size=block)
    for i, t in enumerate(ts):
        assert np.array_equal(keeps[i], prune(X, y, ids, t, block_size=block))
    # a class too large for the cache is recomputed per threshold, with the same result
    np.testing.assert_array_equal(prune_sweep(X, y, ids, ts, block_size=block, cache_bytes=0), keeps)


# ----------------------------------------------------------------------------- the sweep's queries


def _independent(Q, yq, G, yg, ids, t, k, n_classes, T):
    """Prune at t, then classify against the pruned gallery from scratch."""
    keep = prune(G, yg, ids, t, block_size=16)
    gi = np.flatnonzero(keep)
    s, i = retrieval_search.topk(Q, G[gi], k)
    return keep, s, gi[i]


@pytest.mark.parametrize("top_m", [None, 2])
def test_nearest_kept_and_rows_equal_independent_prune_and_classify(top_m):
    G, yg, ids = clustered(n=200, seed=4)
    rng = np.random.default_rng(5)
    yq = rng.integers(0, 4, 50)
    Q = unit_rows(G[rng.integers(0, 200, 50)] + 0.3 * rng.normal(size=(50, G.shape[1])))
    ts, k = [0.4, 0.8, 0.95, 1.0], 5
    keeps = prune_sweep(G, yg, ids, ts, block_size=16)
    nb, stats = nearest_kept(Q, G, keeps, k, block_size=7, top_m=top_m)
    if top_m == 2:
        assert stats["fallback_queries"] > 0  # the exact fallback path ran
    rows = sweep_rows(ts, keeps, yg, yq, nb, 4, 0.07, G.shape[1])
    for ti, t in enumerate(ts):
        keep, s, idx = _independent(Q, yq, G, yg, ids, t, k, 4, 0.07)
        np.testing.assert_array_equal(keeps[ti], keep)
        np.testing.assert_array_equal(nb[ti][1], idx)
        np.testing.assert_allclose(nb[ti][0], s, atol=1e-6)
        pred = yg[idx[:, 0]]
        knn, _ = knn_vote(s, idx, yg, 4, 0.07)
        from sklearn.metrics import f1_score
        r = rows[ti]
        assert r["n_kept"] == keep.sum() and r["min_kept_per_class"] == np.bincount(yg[keep]).min()
        assert r["top1_accuracy"] == pytest.approx(np.mean(pred == yq))
        assert r["knn_accuracy"] == pytest.approx(np.mean(knn == yq))
        assert r["macro_f1"] == pytest.approx(f1_score(yq, pred, average="macro", zero_division=0))
        assert r["size_mb"] == pytest.approx(keep.sum() * G.shape[1] * 4 / 2**20)


def test_nearest_kept_clamps_k_to_a_tiny_gallery():
    G = unit_rows(np.random.default_rng(0).normal(size=(6, 8)))
    keeps = np.array([[True] * 6, [True, False, False, False, False, True]])
    nb, _ = nearest_kept(G, G, keeps, 4)
    assert nb[0][1].shape == (6, 4) and nb[1][1].shape == (6, 2)
    assert set(np.unique(nb[1][1])) <= {0, 5}


# ----------------------------------------------------------------------------- rules and grid


def _row(t, n, f1, acc):
    return {"threshold": t, "n_kept": n, "fraction_kept": n / 1000, "macro_f1": f1, "top1_accuracy": acc}


TABLE = [_row(0.80, 200, 0.800, 0.85), _row(0.85, 350, 0.902, 0.90), _row(0.90, 500, 0.910, 0.93),
         _row(0.95, 800, 0.905, 0.94), _row(1.00, 1000, 0.910, 0.92)]


@pytest.mark.parametrize("rule,extra,want", [
    ("tolerance", {"tolerance": 0.01}, 0.85),   # smallest gallery with F1 >= 0.90
    ("tolerance", {"tolerance": 0.0}, 0.90),    # F1 ties at 0.91: the smaller gallery
    ("max_f1", {}, 0.90),
    ("max_accuracy", {}, 0.95),
    ("target_size", {"target_size": 799}, 0.90),
    ("target_size", {"target_size": 400}, 0.85),
])
def test_choose_threshold_rules(rule, extra, want):
    lcfg = types.SimpleNamespace(**{**vars(LutConfig()), "rule": rule, **extra})
    i, reason = choose_threshold(TABLE, lcfg)
    assert TABLE[i]["threshold"] == want and rule in reason and f"{want:g}" in reason


def test_sweep_warnings_edges_and_flat():
    from common.retrieval.sweep import sweep_warnings

    lcfg = types.SimpleNamespace(**{**vars(LutConfig()), "grid_start": 0.8, "grid_stop": 1.0})
    assert sweep_warnings(TABLE, 2, lcfg) == []  # inside the grid, F1 varies
    low = sweep_warnings(TABLE, 0, lcfg)
    assert len(low) == 1 and "lowest of the grid (lut.grid_start=0.8)" in low[0]
    high = sweep_warnings(TABLE, 4, lcfg)
    assert len(high) == 1 and "highest of the grid (lut.grid_stop=1)" in high[0]
    flat = [_row(t, n, 0.75, 0.8) for t, n in ((0.8, 200), (0.9, 500), (1.0, 1000))]
    w = sweep_warnings(flat, 0, lcfg)
    assert len(w) == 2 and "flat" in w[1] and "0.7500" in w[1]
    listed = types.SimpleNamespace(**{**vars(lcfg), "thresholds": [0.8, 0.9, 1.0]})
    assert "(lut.thresholds)" in sweep_warnings(flat, 2, listed)[0]
    assert sweep_warnings(TABLE[:1], 0, lcfg) == []  # one threshold: nothing to say


def test_choose_threshold_errors():
    lcfg = types.SimpleNamespace(**{**vars(LutConfig()), "rule": "target_size"})
    with pytest.raises(ConfigError, match="target_size"):
        choose_threshold(TABLE, lcfg)
    lcfg.target_size = 100
    with pytest.raises(UserError, match="200 vectors"):
        choose_threshold(TABLE, lcfg)


def test_threshold_grid_exact_values():
    g = threshold_grid(LutConfig())
    assert len(g) == 21 and g[0] == 0.8 and g[-1] == 1.0
    assert g == [round(0.8 + i / 100, 2) for i in range(21)]
    assert all(t == float(f"{t:.2f}") for t in g)  # 0.83 itself, not 0.8300000000000001
    assert threshold_grid(LutConfig(grid_start=0.9, grid_stop=0.95, grid_step=0.025)) == [0.9, 0.925, 0.95]
    assert threshold_grid(LutConfig(thresholds=[0.95, 0.9, 0.95])) == [0.9, 0.95]
    with pytest.raises(ConfigError, match="grid_step"):
        threshold_grid(LutConfig(grid_step=0.0))
    with pytest.raises(ConfigError, match="grid_stop"):
        threshold_grid(LutConfig(grid_start=1.0, grid_stop=0.9))


def test_reject_level_gini_and_digest():
    sims = np.linspace(0, 1, 101)
    assert suggested_reject_below(sims, np.ones(101, bool)) == pytest.approx(0.05)
    assert suggested_reject_below(sims, np.zeros(101, bool)) is None
    assert gini([5, 5, 5]) == 0 and gini([0, 0, 9]) == pytest.approx(2 / 3)
    assert kept_ids_sha256([3, 1, 2]) == kept_ids_sha256(np.array([1, 2, 3]))


# ----------------------------------------------------------------------------- stages 05 and 06


class FakeCtx:
    """The parts of common.stage.Context that stages 05/06 use, over a hand-made run folder."""

    def __init__(self, run: Path, name: str, cfg):
        self.run_dir, self.name, self.cfg, self.dir = run, name, cfg, run / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.outputs = []

    def upstream(self, name, required=True):
        p = self.run_dir / name
        assert p.is_dir(), f"missing {name}"
        return p

    def output(self, *parts, digest="sha256"):
        self.outputs.append("/".join(parts))
        return self.dir.joinpath(*parts)

    def device(self):
        return torch.device("cpu")


def _run_folder(tmp_path):
    from common.fileio import write_json
    from common.store.sqlite import FeatureStore

    run = tmp_path / "run"
    (run / "04_extract_features").mkdir(parents=True)
    X, y, _ = clustered(n=150, n_classes=3, dim=16, seed=7)
    splits = np.where(np.arange(150) % 3 == 0, "val", "train")
    classes = ["c0", "c1", "c2"]
    recs = [types.SimpleNamespace(path=f"/img/{i:04d}.png", label=classes[y[i]], split=str(splits[i]),
                                  sha256=f"{i:064x}") for i in range(150)]
    with FeatureStore(run / "04_extract_features" / "features.sqlite", create=True) as store:
        store.sync_images(recs)
        info, _ = store.register_model(checkpoint_sha256="a" * 64, embedding="encoder", backbone="test_resnet",
                                       dim=16, mean=[0.5] * 3, std=[0.25] * 3, image_size=32, pad_fill=0,
                                       classes=classes, checkpoint_path="/ck/best.pt", epoch=1)
        by_path = {r.path: r.id for r in store.images()}
        store.write_vectors(info.id, [by_path[r.path] for r in recs], X)
        store.mark_complete(info.id)
    write_json(run / "04_extract_features" / "model.json", {
        "model_id": info.id, "checkpoint": "/ck/best.pt", "checkpoint_sha256": "a" * 64, "backbone": "test_resnet",
        "embedding": "encoder", "dim": 16, "classes": classes})
    return run, info.id


def test_stages_05_and_06_over_a_store(tmp_path):
    from common.store.sqlite import FeatureStore

    run, mid = _run_folder(tmp_path)
    cfg = load_config(overrides=["lut.rule=max_f1", "lut.knn_k=3", "lut.grid_start=0.5", "lut.grid_step=0.05"])
    ctx5 = FakeCtx(run, "05_lut_threshold", cfg)
    m5 = stages_threshold.main(ctx5)
    assert set(ctx5.outputs) == {"threshold_sweep.csv", "threshold.json", "threshold_sweep.png"}
    tj = json.loads((ctx5.dir / "threshold.json").read_text())
    assert tj["model_id"] == mid and tj["rule"] == "max_f1" and tj["threshold"] == m5["threshold"]
    assert tj["thresholds"] == threshold_grid(cfg.lut) and len(tj["thresholds"]) == 11
    assert tj["suggested_reject_below"] is not None and tj["reason"]
    assert tj["warnings"] == m5["warnings"]  # the grid's cautions, also in the log and stage 07's report
    i = tj["thresholds"].index(tj["threshold"])
    assert any("of the grid" in w for w in tj["warnings"]) == (i in (0, len(tj["thresholds"]) - 1))
    lines = (ctx5.dir / "threshold_sweep.csv").read_text().splitlines()
    assert lines[0].split(",") == SWEEP_COLUMNS and len(lines) == 12

    ctx6 = FakeCtx(run, "06_prune_features", cfg)
    m6 = stages_prune.main(ctx6)
    lj = json.loads((ctx6.dir / "lut.json").read_text())
    with FeatureStore(run / "04_extract_features" / "features.sqlite") as store:
        full = store.load_split("train", mid, ["c0", "c1", "c2"])
    keep = prune(full.X, full.labels, full.ids, tj["threshold"])
    # stage 06's own artefact: a self-contained store of the kept rows (paths, labels, vectors)
    with FeatureStore(ctx6.dir / "lut.sqlite") as lut_store:
        info = lut_store.current_model()
        assert info.checkpoint_sha256 == "a" * 64 and lut_store.counts()["images"] == int(keep.sum())
        got = lut_store.load_split("train", info.id, ["c0", "c1", "c2"])
    assert got.paths == [p for p, k in zip(full.paths, keep) if k]
    np.testing.assert_array_equal(got.X, full.X[keep])
    np.testing.assert_array_equal(got.labels, full.labels[keep])
    assert lj["threshold"] == tj["threshold"] and lj["n_after"] == int(keep.sum()) == m6["n_after"]
    assert lj["n_before"] == 100 and lj["kept_ids_sha256"] == kept_ids_sha256(full.ids[keep])
    assert lj["threshold_source"] == str(ctx5.dir / "threshold.json")  # where the threshold comes from
    assert "lut.sqlite" in ctx6.outputs
    # stage 06 writes nothing in stage 04's folder
    assert sorted(p.name for p in (run / "04_extract_features").iterdir()) == ["features.sqlite", "model.json"]
    summary = (ctx6.dir / "prune_summary.csv").read_text().splitlines()
    assert summary[0] == "class,before,after,fraction_kept" and len(summary) == 4

    # prune.threshold wins over threshold.json, and then stage 05 is not an upstream
    cfg2 = load_config(overrides=["prune.threshold=1.0"])
    assert SPECS["06_prune_features"].upstream(cfg2) == ("04_extract_features",)
    assert SPECS["06_prune_features"].upstream(cfg) == ("04_extract_features", "05_lut_threshold")
    ctx6b = FakeCtx(run, "06_prune_features", cfg2)
    assert stages_prune.main(ctx6b)["threshold"] == 1.0
    assert json.loads((ctx6b.dir / "lut.json").read_text())["threshold_source"] == "prune.threshold"


def test_stage_05_refuses_an_empty_val_split(tmp_path, monkeypatch):
    from common.store.containers import Vectors

    run, _ = _run_folder(tmp_path)
    cfg = load_config(overrides=["lut.thresholds=[0.9]"])
    ctx = FakeCtx(run, "05_lut_threshold", cfg)
    from common.stages.artefacts import ModelStore

    orig = ModelStore.load

    def no_val(self, splits, classes, max_memory_gib=None):
        v = orig(self, splits, classes, max_memory_gib)
        return Vectors(v.X[:0], v.labels[:0], [], v.ids[:0]) if tuple(splits) == ("val",) else v

    monkeypatch.setattr(ModelStore, "load", no_val)
    with pytest.raises(UserError, match="no val vectors"):
        stages_threshold.main(ctx)


def test_stage_07_reads_stage_05s_cautions(tmp_path):
    from common.stages.inference.load import threshold_warnings

    assert threshold_warnings(None) == [] and threshold_warnings(tmp_path) == []  # no stage 05: nothing to say
    (tmp_path / "threshold.json").write_text(json.dumps({"threshold": 0.8, "warnings": ["the sweep is flat"]}))
    assert threshold_warnings(tmp_path) == ["the sweep is flat"]
