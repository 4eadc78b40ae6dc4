"""common.retrieval: exact top-k and DINO's weighted vote against brute-force numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import unit_rows

from common.retrieval import search as retrieval_search
from common.retrieval.search import knn_vote


def _data(q=37, g=53, d=8, seed=0, dup=True):
    rng = np.random.default_rng(seed)
    G = unit_rows(rng.normal(size=(g, d)))
    if dup:  # duplicated gallery rows: exact ties that straddle the top-k cut
        G[10:20] = G[3]
        G[40:45] = G[7]
    Q = unit_rows(rng.normal(size=(q, d)))
    Q[:5] = G[3]  # queries equal to a duplicated row: similarity 1.0 ten times over
    return Q, G


def _brute(Q, G, k):
    """Reference: the same float32 similarities (torch matmul), numpy stable argsort on (-sim)."""
    s = (torch.from_numpy(Q) @ torch.from_numpy(G).T).numpy()
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]  # stable: equal sims keep index order
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("k,block", [(1, 4096), (5, 7), (12, 1), (53, 16), (80, 10)])
def test_topk_equals_brute_force(k, block):
    Q, G = _data()
    s, i = retrieval_search.topk(Q, G, k, block_size=block)
    bs, bi = _brute(Q, G, min(k, G.shape[0]))
    assert s.dtype == np.float32 and i.dtype == np.int64
    assert s.shape == (Q.shape[0], min(k, G.shape[0]))
    np.testing.assert_array_equal(i, bi)
    # float32 products of other shapes may round the last bit differently
    np.testing.assert_allclose(s, bs, rtol=0, atol=1e-6)


def test_topk_ties_go_to_the_lower_index():
    Q, G = _data()
    _, i = retrieval_search.topk(Q[:5], G, 4)
    # G[3] and G[10:20] are the same vector: the lowest indices win, in index order
    np.testing.assert_array_equal(i, np.tile([3, 10, 11, 12], (5, 1)))


def test_topk_accepts_torch_and_handles_empty():
    Q, G = _data(dup=False)
    s1, i1 = retrieval_search.topk(torch.from_numpy(Q), torch.from_numpy(G), 3)
    s2, i2 = retrieval_search.topk(Q, G, 3)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-6)
    s, i = retrieval_search.topk(Q[:0], G, 3)
    assert s.shape == (0, 3) and i.shape == (0, 3)
    s, i = retrieval_search.topk(Q, G[:0], 3)
    assert s.shape == (Q.shape[0], 0)
    with pytest.raises(ValueError):
        retrieval_search.topk(Q, G, 0)


def _brute_vote(sims, idx, labels, C, T):
    scores = np.zeros((sims.shape[0], C))
    for r in range(sims.shape[0]):
        for s, j in zip(sims[r], idx[r]):
            scores[r, labels[j]] += np.exp(np.float64(s) / T)
    return scores.argmax(1), scores


def test_knn_vote_equals_loop():
    Q, G = _data(dup=False, q=30, g=60)
    labels = np.random.default_rng(1).integers(0, 6, size=G.shape[0])
    s, i = retrieval_search.topk(Q, G, 7)
    for T in (0.07, 0.5, 0.01):
        pred, scores = knn_vote(s, i, labels, 7, T)
        bp, bs = _brute_vote(s, i, labels, 7, T)
        np.testing.assert_array_equal(pred, bp)
        np.testing.assert_allclose(scores, bs, rtol=1e-12)
        assert scores[:, 6].sum() == 0  # a class nobody voted for
    # torch labels work too (the training loop passes tensors)
    pred_t, _ = knn_vote(torch.from_numpy(s), torch.from_numpy(i), torch.from_numpy(labels), 7, 0.07)
    np.testing.assert_array_equal(pred_t, _brute_vote(s, i, labels, 7, 0.07)[0])


def test_knn_vote_tie_goes_to_lower_class_and_weights_favour_close_items():
    sims = np.array([[0.5, 0.5], [0.9, 0.1], [0.1, 0.9]], np.float32)
    idx = np.array([[1, 0], [0, 1], [0, 1]])
    labels = np.array([2, 1])
    pred, _ = knn_vote(sims, idx, labels, 3, 0.1)
    np.testing.assert_array_equal(pred, [1, 2, 1])
    with pytest.raises(ValueError):
        knn_vote(sims, idx, labels, 2, 0.1)  # label 2 out of range
