"""Metrics: equal to scikit-learn on the same predictions; MAP@R and precision@1 known answers."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from common.evaluate import metrics as M
from common.evaluate import metrics as evaluate_metrics
from common.evaluate.metrics import (
    classification_metrics,
    confusion,
    map_at_r_from_neighbours,
    per_class,
    rejection_metrics,
    retrieval_metrics,
    topk_accuracy,
)


def _sk_labels(y_true, y_pred):
    # sklearn's default label set, with the "unknown" marker (-1) left out
    return sorted((set(y_true.tolist()) | set(y_pred.tolist())) - {evaluate_metrics.UNKNOWN})


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rejected", [False, True])
def test_classification_metrics_equal_sklearn(seed, rejected):
    rng = np.random.default_rng(seed)
    C = 12
    y_true = rng.integers(0, 9, size=300)  # classes 9..11 never occur in y_true
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 11, size=300))  # class 11 never predicted
    y_pred[y_pred == 4] = 5  # class 4 is in y_true but never predicted
    if rejected:
        y_pred[rng.random(300) < 0.1] = evaluate_metrics.UNKNOWN
    got = classification_metrics(y_true, y_pred, C)
    labels = _sk_labels(y_true, y_pred)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        assert got[f"{avg}_precision"] == pytest.approx(p, abs=1e-12)
        assert got[f"{avg}_recall"] == pytest.approx(r, abs=1e-12)
        assert got[f"{avg}_f1"] == pytest.approx(f, abs=1e-12)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about predicted classes absent from y_true
        assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred), abs=1e-12)


def test_per_class_equals_sklearn_report():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 6, 200)
    y_pred = np.where(rng.random(200) < 0.5, y_true, rng.integers(0, 7, 200))
    pc = per_class(y_true, y_pred, 8)
    labels = _sk_labels(y_true, y_pred)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    np.testing.assert_allclose(pc["precision"][labels], p, atol=1e-12)
    np.testing.assert_allclose(pc["recall"][labels], r, atol=1e-12)
    np.testing.assert_allclose(pc["f1"][labels], f, atol=1e-12)
    np.testing.assert_array_equal(pc["support"][labels], s)
    assert list(np.flatnonzero(pc["present"])) == labels
    cm = confusion(y_true, y_pred, 8)
    np.testing.assert_array_equal(cm[:, :8], skm.confusion_matrix(y_true, y_pred, labels=list(range(8))))


def test_topk_accuracy_equals_sklearn():
    rng = np.random.default_rng(4)
    scores = rng.random((150, 10))  # continuous: no ties
    y_true = rng.integers(0, 10, 150)
    cand = np.argsort(-scores, axis=1)
    for k in (1, 3, 5):
        assert topk_accuracy(y_true, cand[:, :k]) == pytest.approx(
            skm.top_k_accuracy_score(y_true, scores, k=k, labels=list(range(10))), abs=1e-12)
    got = classification_metrics(y_true, cand[:, 0], 10, candidates=cand, top_k=5)
    assert got["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y_true, scores, k=5), abs=1e-12)


def test_rejection_metrics_known_answer():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    raw = np.array([0, 1, 1, 1, 0, 2])
    accepted = np.array([True, False, True, False, False, True])
    out = rejection_metrics(y_true, raw, accepted)
    assert out["rejection_rate"] == pytest.approx(0.5)
    assert out["n_rejected"] == 3
    assert out["accepted_accuracy"] == pytest.approx(1.0)  # queries 0, 2, 5 are right
    assert out["rejected_error_rate"] == pytest.approx(2 / 3)  # of 1, 3, 4 only 3 was right
    final = np.where(accepted, raw, evaluate_metrics.UNKNOWN)
    m = classification_metrics(y_true, final, 3)
    assert m["accuracy"] == pytest.approx(0.5)  # rejected queries are errors


def test_map_at_r_known_answer():
    # PML's docstring example style: R = 4 relevant items; hits at ranks 1, 3, 4 (rank 2 wrong)
    # AP@R = (1/4) * (1/1 + 2/3 + 3/4) = 0.6041666...
    nl = np.array([[1, 0, 1, 1, 1, 0],
                   [0, 1, 1, 0, 0, 0]])
    q = np.array([1, 1])
    ap = map_at_r_from_neighbours(nl, q, np.array([4, 2]))
    assert ap[0] == pytest.approx((1 + 2 / 3 + 3 / 4) / 4)  # the hit at rank 5 is beyond R
    assert ap[1] == pytest.approx((0 + 1 / 2) / 2)  # R = 2: one hit at rank 2
    assert np.isnan(map_at_r_from_neighbours(nl[:1], q[:1], np.array([0])))[0]


def _brute_topk(queries, gallery, k, block_size=4096, device=None):
    sims = queries @ gallery.T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, 1), idx


def test_retrieval_metrics_known_answer():
    # 1-D "embeddings" on the unit circle: angles make the ranking obvious
    ang_g = np.array([0.0, 0.1, 0.2, 1.5, 1.6, 3.0])
    g_lab = np.array([0, 0, 1, 1, 1, 2])
    ang_q = np.array([0.05, 1.55, 0.21, 2.0])
    q_lab = np.array([0, 1, 0, 3])  # class 3 has no gallery item: a "lone" query, left out
    G = np.stack([np.cos(ang_g), np.sin(ang_g)], 1).astype(np.float32)
    Q = np.stack([np.cos(ang_q), np.sin(ang_q)], 1).astype(np.float32)
    out = retrieval_metrics(Q, q_lab, G, g_lab, _brute_topk)
    # q0 (class 0, R=2): neighbours 0,1 -> AP 1, P@1 1
    # q1 (class 1, R=3): order 3/4 (equidistant, tie to lower index), 2 -> AP 1, P@1 1
    # q2 (class 0, R=2): nearest is item 2 (0.2, class 1), then 1 (0.1, class 0): AP = (0 + 1/2)/2
    assert out["precision_at_1"] == pytest.approx(2 / 3)
    assert out["map_at_r"] == pytest.approx((1 + 1 + 0.25) / 3)
    assert out["n_lone_queries"] == 1


def test_retrieval_metrics_blocks_give_same_answer(monkeypatch):
    rng = np.random.default_rng(5)
    G = rng.normal(size=(60, 8)).astype(np.float32)
    Q = rng.normal(size=(25, 8)).astype(np.float32)
    gl, ql = rng.integers(0, 4, 60), rng.integers(0, 4, 25)
    a = retrieval_metrics(Q, ql, G, gl, _brute_topk)
    monkeypatch.setattr(M, "MAP_AT_R_CELLS", 20)  # forces one query per search block
    b = retrieval_metrics(Q, ql, G, gl, _brute_topk)
    assert a == b


# ----------------------------------------------------------------------------- uncertainty (issue 20, item 3)


@pytest.mark.parametrize("k,n", [(14, 15), (0, 10), (10, 10), (1, 1), (37, 412), (5000, 7000)])
def test_wilson_equals_scipy(k, n):
    from scipy.stats import binomtest

    ref = binomtest(k, n).proportion_ci(0.95, method="wilson")
    lo, hi = M.wilson(k, n)
    assert lo == pytest.approx(float(ref.low), abs=1e-12) and hi == pytest.approx(float(ref.high), abs=1e-12)


def test_wilson_hand_checked_and_edges():
    # 14 of 15 (the test set): centre (p + z^2/2n) / (1 + z^2/n), worked by hand to 4 places
    lo, hi = M.wilson(14, 15)
    assert (round(lo, 4), round(hi, 4)) == (0.7018, 0.9881)
    assert M.wilson(0, 5)[0] == 0.0 and M.wilson(5, 5)[1] == 1.0
    assert all(np.isnan(M.wilson(0, 0)))
    with pytest.raises(ValueError):
        M.wilson(6, 5)


def _brute_bootstrap(y_true, y_pred, C, n_boot, seed):
    # the textbook bootstrap: resample the queries with replacement, recompute the metrics
    rng = np.random.default_rng(seed)
    vals = {k: [] for k in ("macro_f1", "macro_precision", "weighted_f1", "balanced_accuracy")}
    for _ in range(n_boot):
        i = rng.integers(0, y_true.size, y_true.size)
        m = classification_metrics(y_true[i], y_pred[i], C)
        for k in vals:
            vals[k].append(m[k])
    return {k: np.percentile(v, [2.5, 97.5]) for k, v in vals.items()}


def test_bootstrap_of_the_confusion_cells_equals_resampling_queries():
    rng = np.random.default_rng(5)
    C = 9
    y_true = rng.integers(0, C, 600)
    y_pred = np.where(rng.random(600) < 0.7, y_true, rng.integers(-1, C, 600))
    got = M.bootstrap_class_metrics(y_true, y_pred, C, n_boot=2000, seed=1)
    ref = _brute_bootstrap(y_true, y_pred, C, 2000, seed=2)
    point = classification_metrics(y_true, y_pred, C)
    for k, (lo, hi) in ref.items():
        width = hi - lo
        assert got[k][0] == pytest.approx(lo, abs=0.1 * width) and got[k][1] == pytest.approx(hi, abs=0.1 * width)
        assert got[k][0] < point[k] < got[k][1]
    # a fixed seed: the same predictions give the same interval
    assert M.bootstrap_class_metrics(y_true, y_pred, C, n_boot=2000, seed=1) == got


def test_bootstrap_mean_equals_resampling_and_is_bounded(monkeypatch):
    rng = np.random.default_rng(6)
    ap = np.r_[np.ones(300), rng.random(200), np.full(5, np.nan)]  # many equal values, NaN = lone queries
    lo, hi = M.bootstrap_mean(ap, n_boot=3000)
    v = ap[np.isfinite(ap)]
    means = v[rng.integers(0, v.size, (3000, v.size))].mean(1)
    rlo, rhi = np.percentile(means, [2.5, 97.5])
    assert lo == pytest.approx(rlo, abs=0.1 * (rhi - rlo)) and hi == pytest.approx(rhi, abs=0.1 * (rhi - rlo))
    # the work bound: resamples x distinct values stays under BOOT_WORK (never below BOOT_MIN_SAMPLES)
    drawn = []
    orig = M._multinomial_blocks

    def spy(counts, n_boot, rng):
        drawn.append(n_boot * counts.size)
        yield from orig(counts, n_boot, rng)

    monkeypatch.setattr(M, "_multinomial_blocks", spy)
    monkeypatch.setattr(M, "BOOT_WORK", 20_000)
    M.bootstrap_mean(rng.random(1000))
    assert drawn == [M.BOOT_MIN_SAMPLES * 1000]
    M.bootstrap_mean(rng.random(50))
    assert drawn[-1] == 20_000 // 50 * 50


def test_uncertainty_baselines_and_top_k_marked():
    # the case: 15 test images, 6 classes, top-5
    y = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    pred = y.copy()
    pred[0] = 1
    cand = np.array([[p, *[c for c in range(6) if c != p][:4]] for p in pred])
    u = M.uncertainty(y, pred, 6, cand, top_k=5)
    assert u["chance_accuracy"] == pytest.approx(1 / 6) and u["chance_top5_accuracy"] == pytest.approx(5 / 6)
    assert u["majority_class_accuracy"] == pytest.approx(5 / 15) and u["top5_uninformative"] is True
    assert u["accuracy_ci95"] == pytest.approx(list(M.wilson(14, 15)))
    for k in ("macro_f1", "macro_precision", "macro_recall", "weighted_f1", "balanced_accuracy"):
        lo, hi = u[f"{k}_ci95"]
        assert 0 <= lo <= hi <= 1
    assert not M.baselines(np.arange(20) % 20, 20, 5)["top5_uninformative"]  # 5 < 20 / 2
    line = M.headline_line({**classification_metrics(y, pred, 6, cand, 5), **u}, 5)
    assert "accuracy 0.9333 [0.702, 0.988]" in line and "uninformative" in line and "chance 0.1667" in line


def test_retrieval_and_rejection_metrics_carry_intervals():
    Q = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1]]
    G = np.eye(4, dtype=np.float32)
    m = retrieval_metrics(Q, np.array([0, 1, 2, 3, 1, 1]), G, np.array([0, 1, 2, 3]), _brute_topk)
    assert m["precision_at_1"] == pytest.approx(5 / 6)
    assert m["precision_at_1_ci95"] == pytest.approx(list(M.wilson(5, 6)))
    lo, hi = m["map_at_r_ci95"]
    assert lo <= m["map_at_r"] <= hi
    r = rejection_metrics(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), np.array([True, True, False, True]))
    assert r["rejection_rate_ci95"] == pytest.approx(list(M.wilson(1, 4)))
    assert r["accepted_accuracy_ci95"] == pytest.approx(list(M.wilson(3, 3)))
