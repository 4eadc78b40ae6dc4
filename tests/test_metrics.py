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
