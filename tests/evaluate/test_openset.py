"""Open-set scores, the val cut and the unknown-class metrics (common/openset.py), against scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from common.errors import UserError
from common.evaluate.openset import keep_cut, kth_similarity, ood_metrics, resolve, unknown_report


def test_keep_cut_keeps_the_share_and_is_the_largest_such_cut():
    rng = np.random.default_rng(0)
    for n in (1, 7, 20, 101):
        s = rng.normal(size=n)
        for keep in (0.5, 0.9, 0.95, 1.0):
            t = keep_cut(s, keep)
            assert (s >= t).mean() >= keep - 1e-12
            higher = s[s > t]
            if higher.size:  # the next score up keeps less than the share
                assert (s >= higher.min()).mean() < keep
    assert keep_cut(np.array([0.1, 0.2, 0.3, 0.4]), 0.75) == pytest.approx(0.2)
    assert keep_cut(np.array([]), 0.95) is None


def test_auroc_and_fpr95_agree_with_sklearn():
    rng = np.random.default_rng(1)
    known = np.round(rng.normal(1.0, 1.0, 300), 2)  # rounded: ties across the two sets
    unknown = np.round(rng.normal(0.0, 1.0, 200), 2)
    m = ood_metrics(known, unknown)
    y = np.r_[np.ones(known.size), np.zeros(unknown.size)]
    s = np.r_[known, unknown]
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, s))
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    assert m["fpr_at_95_tpr"] == pytest.approx(fpr[np.searchsorted(tpr, 0.95, side="left")])
    perfect = ood_metrics(np.array([0.9, 0.8]), np.array([0.1, 0.2]))
    assert perfect == {"auroc": 1.0, "fpr_at_95_tpr": 0.0}
    assert np.isnan(ood_metrics(np.array([1.0]), np.array([]))["auroc"])


def test_kth_similarity_is_the_kth_exact_neighbour():
    rng = np.random.default_rng(2)
    G = rng.normal(size=(30, 8)).astype(np.float32)
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    Q = G[:4] + 0.1 * rng.normal(size=(4, 8)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    kth, sims, idx = kth_similarity(Q, G, 5, block_size=3)
    want = np.sort(Q.astype(np.float64) @ G.T.astype(np.float64), axis=1)[:, ::-1]
    np.testing.assert_allclose(kth, want[:, 4], atol=1e-5)
    assert sims.shape == (4, 5) and idx.shape == (4, 5)
    kth_all, _, _ = kth_similarity(Q, G[:3], 10, block_size=8)  # k above the gallery size: the last one
    np.testing.assert_allclose(kth_all, np.sort(Q @ G[:3].T, axis=1)[:, 0], atol=1e-5)


def test_resolve_rules():
    cuts = {"similarity": 0.7, "knn": 0.5}
    off = resolve(None, "similarity", 0.95, cuts)
    assert off.cut is None and off.accept({"similarity": np.array([-1.0])}).all()
    auto = resolve("auto", "knn", 0.95, cuts)
    assert auto.cut == 0.5 and "auto" in auto.source
    assert auto.accept({"knn": np.array([0.4, 0.5, 0.6])}).tolist() == [False, True, True]
    fixed = resolve(0.8, "similarity", 0.95, cuts)
    assert fixed.cut == 0.8 and fixed.accept({"similarity": np.array([0.79, 0.8])}).tolist() == [False, True]
    with pytest.raises(UserError, match="inference.reject_below: auto"):
        resolve("auto", "similarity", 0.95, {"similarity": None})


def test_unknown_report_counts():
    known = {"similarity": np.array([0.9, 0.8, 0.7, 0.6])}
    unknown = {"similarity": np.array([0.65, 0.5])}
    correct = np.array([True, True, False, True])
    r = unknown_report(known, unknown, correct, {"similarity": 0.68})["similarity"]
    assert r["known_accuracy"] == pytest.approx(2 / 4)  # 0.6 (correct) is rejected, 0.7 is wrong
    assert r["known_accepted_accuracy"] == pytest.approx(2 / 3)
    assert r["unknown_rejected"] == 1.0 and r["cut"] == 0.68
    assert r["auroc"] == pytest.approx(skm.roc_auc_score([1, 1, 1, 1, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.65, 0.5]))


def test_an_automatic_cut_from_few_val_predictions_is_flagged():
    import dataclasses

    from common.config.schema import InferenceConfig
    from common.evaluate.openset import MIN_CUT_PREDICTIONS, _rejection_facts, few_predictions_warning, rejection_rule
    from common.store.containers import Vectors

    assert few_predictions_warning(MIN_CUT_PREDICTIONS, 0.95) is None
    assert "only 5 correct val predictions (fewer than 30)" in few_predictions_warning(5, 0.95)
    rng = np.random.default_rng(0)
    G = rng.standard_normal((12, 8)).astype(np.float32)
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    gallery = Vectors(G, np.arange(12) % 3, [f"g{i}" for i in range(12)])
    for n_val, flagged in ((6, True), (40, False)):
        # copies of gallery vectors: every val prediction is correct, n_val of them
        val = Vectors(np.tile(G, (4, 1))[:n_val], np.tile(gallery.labels, 4)[:n_val], [f"v{i}" for i in range(n_val)])
        for reject_below in ("auto", None):
            icfg = dataclasses.replace(InferenceConfig(), reject_below=reject_below, k=1, ood_k=1)
            rule = rejection_rule(icfg, val, gallery, 3)
            facts = _rejection_facts(rule)
            assert ("reject_warning" in facts) == (flagged and reject_below == "auto")
