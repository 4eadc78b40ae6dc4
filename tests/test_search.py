"""common.search: FAISS indexes over unit vectors, exact rescoring, agreement with exact search."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from common import retrieval, search
from common.config import SearchConfig
from common.errors import ConfigError, UserError


def clustered(n: int, dim: int, n_classes: int, seed: int = 0, noise: float = 0.35):
    """Unit vectors around ``n_classes`` random centres (labels = centre)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, n_classes, n)
    X = centres[labels] + noise * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), labels


def cfg(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{**SearchConfig().__dict__, **kw})


@pytest.fixture(scope="module")
def data():
    X, y = clustered(6300, 64, 20, seed=1)  # queries: the last 300, from the same classes
    return X[:6000], y[:6000], X[6000:], y[6000:]


@pytest.mark.parametrize("kind,kw", [("ivf", {}), ("ivfpq", {"pq_m": 16}), ("hnsw", {}),
                                     ("ivf", {"pca_dim": 32})])
def test_index_agrees_with_exact_search(data, kind, kw):
    X, y, Q, _ = data
    sc = cfg(index=kind, **kw)
    ann = search.build_index(X, sc, seed=0, progress=False)
    ann.set_query_params(sc)
    assert ann.ntotal == len(X) and ann.dim == 64
    sims, rows = ann.search(Q, 5, X)
    es, er = retrieval.topk(Q, X, 5)
    agr = search.agreement(er, rows, y)
    assert agr["n_queries"] == len(Q)
    assert agr["same_class"] >= 0.99 and agr["same_image"] >= 0.9, agr
    # the similarities are exact dot products of the proposed rows, sorted descending
    np.testing.assert_allclose(sims, np.einsum("qkd,qd->qk", X[rows], Q), rtol=0, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 0).all()
    same = rows[:, 0] == er[:, 0]
    np.testing.assert_allclose(sims[same, 0], es[same, 0], atol=1e-5)


def test_save_and_load_give_the_same_answers(tmp_path, data):
    X, _, Q, _ = data
    sc = cfg(index="ivf", nprobe=4)
    ann = search.build_index(X, sc, seed=3, progress=False)
    ann.set_query_params(sc)
    ann.save(tmp_path / "g.faiss")
    back = search.load_index(tmp_path / "g.faiss", "ivf", sc)
    a = ann.search(Q, 10, X)
    b = back.search(Q, 10, X)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    # query-time knobs come from the configuration given at load time
    wide = search.load_index(tmp_path / "g.faiss", "ivf", cfg(index="ivf", nprobe=10_000))
    assert search._faiss().extract_index_ivf(wide.index).nprobe == search.auto_nlist(len(X))


def test_a_file_that_is_not_an_index_is_a_one_line_error(tmp_path):
    p = tmp_path / "lut.faiss"
    p.write_bytes(b"not an index at all")
    with pytest.raises(UserError) as e:
        search.load_index(p, "ivf", cfg(index="ivf"))
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_short_neighbour_lists_are_padded():
    X, y = clustered(50, 16, 2, seed=4)
    ann = search.build_index(X, cfg(index="hnsw"), progress=False)
    ann.set_query_params(cfg(index="hnsw", candidates=10))
    sims, rows = ann.search(X[:3], 80, X)  # more than the gallery holds
    assert rows.shape == (3, 50) and (rows >= 0).all()
    assert rows[0, 0] == 0 and sims[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_class_best_takes_the_first_item_of_each_class():
    sims = np.array([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, -np.inf, -np.inf]], np.float32)
    rows = np.array([[3, 0, 1, 2], [2, 1, -1, -1]])
    labels = np.array([0, 1, 1, 0])
    s, r = search.class_best(sims, rows, labels, 3)
    np.testing.assert_array_equal(r, [[3, 1, -1], [-1, 2, -1]])
    np.testing.assert_array_equal(s, np.array([[0.9, 0.7, -np.inf], [-np.inf, 0.5, -np.inf]], np.float32))


def test_agreement_counts_image_and_class():
    labels = np.array([0, 0, 1])
    agr = search.agreement(np.array([[0], [2], [1]]), np.array([[0], [1], [1]]), labels)
    assert agr == {"same_image": pytest.approx(2 / 3), "same_class": pytest.approx(2 / 3), "n_queries": 3}


def test_parameters_are_checked_against_the_data():
    with pytest.raises(ConfigError, match="search.pq_m"):
        search.factory_string("ivfpq", 100, 5000, cfg(pq_m=64))
    with pytest.raises(UserError, match="search.pq_bits"):
        search.factory_string("ivfpq", 128, 100, cfg(pq_m=16))
    with pytest.raises(ConfigError, match="search.pca_dim"):
        search.factory_string("ivf", 64, 5000, cfg(pca_dim=64))
    with pytest.raises(UserError, match="search.nlist"):
        search.factory_string("ivf", 64, 50, cfg(nlist=100))
    assert search.factory_string("ivfpq", 2048, 10**6, cfg(pca_dim=256, pq_m=32)) == ("PCA256,L2norm,IVF4000,PQ32x8np", 4000)
    assert search.factory_string("hnsw", 64, 10, cfg(hnsw_m=16)) == ("HNSW16", 0)
    assert search.auto_nlist(1000) == 25 and search.auto_nlist(10) == 1


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_search_restricted_to_kept_rows_finds_the_pruned_gallerys_neighbours(data, kind):
    X, y, Q, _ = data
    sc = cfg(index=kind, pca_dim=32)
    ann = search.build_index(X, sc, progress=False)
    ann.set_query_params(sc)
    keep = np.zeros(len(X), bool)
    keep[::4] = True
    sims, rows = ann.search(Q, 3, X, keep=keep)
    assert keep[rows].all()
    _, er = retrieval.topk(Q, X[keep], 3)
    exact_rows = np.flatnonzero(keep)[er]
    assert search.agreement(exact_rows, rows, y)["same_class"] >= 0.99
