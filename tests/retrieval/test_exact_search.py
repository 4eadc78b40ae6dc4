"""common.retrieval.kernel / codes / similarity / prune_class: the exact similarity, the bound, and
every search identical to the float32 path (retrieval.search.topk, search_classes, retrieval.prune
prune / prune_sweep) on adversarial data:
ties, exact duplicates, near-threshold pairs, tiny and large classes, float16 stores, k above the
gallery, one class, and the fp32 fallback."""
from __future__ import annotations

import logging
from fractions import Fraction

import numpy as np
import pytest
import torch

from helpers import unit_rows

from common.retrieval import codes as C
from common.retrieval import kernel as X
from common.retrieval.prune import prune, prune_class, prune_sweep
from common.retrieval.search import search_classes
from common.retrieval.search import topk as search_topk
from common.store.containers import Vectors

PRECISIONS = ["fp32", "bf16", "int8"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- data and references


def exact_ref(a: np.ndarray, b: np.ndarray) -> np.float32:
    """s(a, b) from fractions: the float32 nearest to the exact dot product, ties to even."""
    v = sum((Fraction(float(x)) * Fraction(float(y)) for x, y in zip(a, b)), Fraction(0))
    f = np.float32(float(v))
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - v), int(np.array(c).view(np.uint32)) & 1))


def sims_ref(Q: np.ndarray, G: np.ndarray) -> np.ndarray:
    """The similarity matrix: float64 products rounded to float32. The float64 sum errs by ~1e-16
    here (D <= 64), far less than a float32 rounding boundary is likely to be near on this data;
    ``test_exact_pairs_*`` checks the rounding itself against fractions."""
    return (Q.astype(np.float64) @ G.astype(np.float64).T).astype(np.float32)


def topk_ref(Q: np.ndarray, G: np.ndarray, k: int, keep: np.ndarray | None = None):
    """By similarity descending, ties to the lower gallery row (``search_topk``'s order)."""
    S = sims_ref(Q, G).astype(np.float64)
    if keep is not None:
        S[:, ~keep] = -np.inf
    cols = np.broadcast_to(np.arange(G.shape[0]), S.shape)
    order = np.lexsort((cols, -S), axis=1)[:, :min(k, G.shape[0] if keep is None else int(keep.sum()))]
    return np.take_along_axis(S, order, 1).astype(np.float32), order


def class_ref(Q: np.ndarray, G: np.ndarray, labels: np.ndarray, C: int):
    S = sims_ref(Q, G)
    sims = np.full((len(Q), C), -np.inf, np.float32)
    idx = np.full((len(Q), C), -1, np.int64)
    for c in range(C):
        cols = np.flatnonzero(labels == c)
        if cols.size:
            j = np.argmax(S[:, cols], 1)  # first of equal maxima: the lower row
            sims[:, c], idx[:, c] = S[np.arange(len(Q)), cols[j]], cols[j]
    return sims, idx


def dyadic(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Entries in {0, +-0.25, +-0.5}: every product and sum exact in float32 and bfloat16, so the
    float32 path computes ``s`` itself, and similarities tie everywhere."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-2, 3, size=(n, dim)) * 0.25).astype(np.float32)


def gallery(n=400, d=32, seed=0):
    """Unit vectors with exact duplicates (ties straddling any cut) and queries equal to them."""
    rng = np.random.default_rng(seed)
    G = unit_rows(rng.normal(size=(n, d)))
    G[10:20] = G[3]
    G[200:203] = G[150]
    Q = unit_rows(rng.normal(size=(37, d)) + 0.5 * G[rng.integers(0, n, 37)])
    Q[:4] = G[3]
    Q[4] = G[150]
    return Q, G


# ----------------------------------------------------------------------------- the similarity


def test_exact_pairs_rounds_correctly_at_and_near_midpoints():
    """1 + 2^-24 is the midpoint of 1 and the next float32: ties to even give 1.0. One more 2^-60
    puts the exact sum above the midpoint (round up), though its float64 sum is the midpoint itself."""
    a = np.array([[1.0, 2.0 ** -24, 0.0], [1.0, 2.0 ** -24, 2.0 ** -60], [1.0, 2.0 ** -24, -2.0 ** -60]], np.float32)
    b = np.ones((3, 3), np.float32)
    s = X.exact_pairs(a, [0, 1, 2], b, [0, 1, 2]).numpy()
    assert s[0] == np.float32(1.0)
    assert s[1] == np.nextafter(np.float32(1.0), np.float32(2))
    assert s[2] == np.float32(1.0)
    for i in range(3):
        assert s[i] == exact_ref(a[i], b[i])


def test_exact_pairs_equals_fractions_on_random_and_float16_data():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(40, 24)).astype(np.float32)
    B = unit_rows(rng.normal(size=(30, 24))).astype(np.float16).astype(np.float32)
    r, c = rng.integers(0, 40, 200), rng.integers(0, 30, 200)
    s = X.exact_pairs(A, r, B, c).numpy()
    assert all(s[p] == exact_ref(A[r[p]], B[c[p]]) for p in range(200))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_bound_holds_for_the_products(precision):
    """|s - A| <= E + rho |A| for every pair (the docstring's claim, with this build's kernels)."""
    rng = np.random.default_rng(2)
    G = unit_rows(rng.normal(size=(300, 64)))
    G[:50] = unit_rows(np.abs(G[:50]) ** 3)  # heavy-tailed rows: large int8 residuals
    Q = unit_rows(rng.normal(size=(20, 64)) + G[:20])
    g, q = X.quantize(G, precision), X.quantize(Q, precision)
    A = X._product(q, g, 0, len(g)).double()
    S = torch.from_numpy(sims_ref(Q, G)).double()
    E = X._error_terms(q, g)[:, None]
    assert bool(((S - A).abs() <= E + X.RHO[precision] * A.abs()).all())
    assert float((S - A).abs().max()) > 0 or precision == "fp32"


def test_float32_level_bound_holds_on_wide_dynamic_range():
    """The float32 dot products of the rescoring (gathered and batched; row by row) within ``_f32_error`` of s, on
    rows mixing 1.0 with many tiny entries (where float32 sums drop bits)."""
    rng = np.random.default_rng(6)
    G = (rng.normal(size=(200, 80)) * 2.0 ** rng.integers(-30, 1, size=(200, 80))).astype(np.float32)
    G[:, 0] = 1.0
    Q = np.abs(rng.normal(size=(6, 80))).astype(np.float32)
    q, g = X.quantize(Q, "fp32"), X.quantize(G, "fp32")
    r = torch.arange(6).repeat_interleave(200)
    c = torch.arange(200).repeat(6)
    S = torch.from_numpy(sims_ref(Q, G)).double().flatten()
    for sl, _, _, _, _, d in X._gathered(q, g, r, c):
        d = d.double()
        assert bool(((S[sl] - d).abs() <= X._f32_error(q, g, r[sl], c[sl], d)).all())
    d = X._dots32(q.X[r], g.X[c]).double()  # topk's round 2
    assert bool(((S - d).abs() <= X._f32_error(q, g, r, c, d)).all())


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        X.quantize(np.array([[1.0, np.nan]], np.float32), "bf16")
    with pytest.raises(ValueError, match="precision"):
        X.quantize(np.eye(2, dtype=np.float32), "fp16")
    with pytest.raises(ValueError, match="too large"):
        X.quantize(np.array([[3.4e38, 0.0]], np.float32), "bf16")


def test_auto_precision_is_measured_once_and_logged(caplog, monkeypatch):
    monkeypatch.setattr(C, "_CHOICE", {})
    with caplog.at_level(logging.INFO, logger="common.retrieval"):
        p = X.choose_precision(48)
        assert X.choose_precision(48) == p
    assert p in PRECISIONS
    assert sum("exact search precision" in r.message for r in caplog.records) == 1
    assert X.quantize(np.eye(48, dtype=np.float32)).precision == p


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("k", [1, 4, 12, 400, 1000])
def test_topk_equals_reference(precision, k):
    Q, G = gallery()
    st: dict = {}
    s, i = X.topk(Q, G, k, precision=precision, query_block=8, block_rows=64, stats=st)
    ws, wi = topk_ref(Q, G, k)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == (len(Q), min(k, len(G)))
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_array_equal(s, ws)
    assert st["precision"] == precision and "fallback_queries" not in st
    if k == 4:  # duplicates of G[3]: the lowest rows, in order
        np.testing.assert_array_equal(i[:4], np.tile([3, 10, 11, 12], (4, 1)))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_topk_and_class_best_where_every_similarity_is_negative(precision):
    """Queries opposite the whole gallery (all similarities < 0, some -0.0 products): the scan's
    integer group maxima hold only non-negative groups, so these rows must compare every group."""
    rng = np.random.default_rng(7)
    G = unit_rows(np.abs(rng.normal(size=(300, 16))))
    G[:, 3] = 0.0
    Q = -unit_rows(np.abs(rng.normal(size=(9, 16))))
    Q[0] = 0.0
    Q[0, 3] = 1.0  # orthogonal to every row: all similarities +0.0 (ties: the lowest rows)
    for k in (1, 5):
        s, i = X.topk(Q, G, k, precision=precision, block_rows=64)
        ws, wi = topk_ref(Q, G, k)
        np.testing.assert_array_equal(i, wi)
        np.testing.assert_array_equal(s, ws)
    lab = np.arange(300) % 4
    s, i = X.class_best(Q, G, lab, 4, precision=precision, block_rows=64)
    ws, wi = class_ref(Q, G, lab, 4)
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_array_equal(s, ws)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_topk_on_worker_threads_spans_and_chunks(precision, monkeypatch):
    """Two worker threads, products kept a few blocks at a time (several spans) and a few queries per
    rescoring item: the same answer, and torch's thread count is left as it was."""
    monkeypatch.setattr(X, "SCAN_BYTES", 37 * 64 * 4 * 3)  # three blocks of 64 rows per span
    monkeypatch.setattr(X, "RESCORE_QUERIES", 5)
    monkeypatch.setattr(C, "PAIR_CHUNK", 32 * 7)  # the queries' codes made seven rows at a time
    Q, G = gallery(seed=8)
    torch.set_num_threads(2)
    for k in (1, 7, 30):
        st: dict = {}
        s, i = X.topk(Q, G, k, precision=precision, block_rows=64, stats=st)
        assert torch.get_num_threads() == 2
        ws, wi = topk_ref(Q, G, k)
        np.testing.assert_array_equal(i, wi)
        np.testing.assert_array_equal(s, ws)
        assert st["candidates"] >= k * len(Q)
    s, i = X.topk(Q[:1], G, 7, precision=precision, block_rows=64)  # one query: a worker gets no rows
    ws, wi = topk_ref(Q[:1], G, 7)
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_array_equal(s, ws)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_topk_reused_buffers_hold_nothing_stale(precision, monkeypatch):
    """The span's product buffer and the rescoring's gather buffers are reused by every later search on
    the thread (``_scratch``). A search whose products are near 1 everywhere (queries equal to rows),
    then searches with a shorter last block (its padding columns hold the earlier products unless
    rewritten), all-negative similarities (every group is compared, padding included), fewer queries
    and rows gathered a few at a time: each equals the reference."""
    monkeypatch.setattr(X, "DOT_ELEMENTS", 16 * 3)  # three gathered rows per float32 / float64 dot chunk
    rng = np.random.default_rng(11)
    G = unit_rows(np.abs(rng.normal(size=(256, 16))))
    Q = -unit_rows(np.abs(rng.normal(size=(9, 16))))
    for q, g, k in ((G[:40], G, 3), (Q, G[:150], 1), (Q, G[:150], 5), (G[100:103], G[:150], 7)):
        s, i = X.topk(q, g, k, precision=precision, block_rows=128)
        ws, wi = topk_ref(q, g, k)
        np.testing.assert_array_equal(i, wi)
        np.testing.assert_array_equal(s, ws)


def test_topk_equals_retrieval_topk_where_float32_is_exact():
    """Dyadic vectors: search_topk's float32 products are the exact similarities, ties everywhere."""
    G, Q = dyadic(300), dyadic(25, seed=1)
    for k in (1, 7, 50):
        want = search_topk(Q, G, k, block_size=16)
        for p in PRECISIONS:
            got = X.topk(Q, G, k, precision=p, block_rows=40)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_topk_fallback_to_fp32_is_used_and_identical(precision):
    Q, G = gallery(seed=3)
    st: dict = {}
    s, i = X.topk(Q, G, 5, precision=precision, max_candidates=5, stats=st)  # every window holds more
    assert st["fallback_queries"] > len(Q) // 2
    ws, wi = topk_ref(Q, G, 5)
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_array_equal(s, ws)


def test_topk_float16_store_keep_mask_and_codes_reuse():
    Q, G = gallery(seed=4)
    G16 = G.astype(np.float16).astype(np.float32)  # a float16 store: many exact duplicates of values
    keep = np.random.default_rng(0).random(len(G)) < 0.3
    keep[3] = keep[10] = True
    codes = X.quantize(G16, "bf16")
    for kp in (None, keep, np.flatnonzero(keep)):
        s, i = X.topk(Q, codes, 6, keep=kp)
        ws, wi = topk_ref(Q, G16, 6, None if kp is None else keep)
        np.testing.assert_array_equal(i, wi)
        np.testing.assert_array_equal(s, ws)
    with pytest.raises(ValueError, match="codes are bf16"):
        X.topk(Q, codes, 3, precision="int8")


def test_topk_empty_and_streamed_blocks():
    Q, G = gallery(seed=5)
    s, i = X.topk(Q[:0], G, 3)
    assert s.shape == (0, 3) and i.shape == (0, 3)
    s, i = X.topk(Q, G[:0], 3)
    assert s.shape == (len(Q), 0)
    blocks = [(a, G[a:a + 57]) for a in range(0, len(G), 57)]
    for k in (1, 9):
        got = X.topk_blocks(Q, iter(blocks), k, precision="bf16")
        want = topk_ref(Q, G, k)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


# ----------------------------------------------------------------------------- best per class


def labelled(n=500, C=9, seed=0):
    """Classes of very different sizes (one of a single row, one absent), duplicates across rows."""
    rng = np.random.default_rng(seed)
    lab = rng.choice(C, n, p=np.r_[0.5, 0.3, np.full(C - 2, 0.2 / (C - 2))])
    lab[lab == 4] = 0  # class 4 absent
    lab[lab == 6] = 1
    lab[77] = 6  # class 6: one row
    centres = rng.normal(size=(C, 24))
    G = unit_rows(centres[lab] + rng.normal(size=(n, 24)))
    G[100:105], lab[100:105] = G[7], lab[7]
    Q = unit_rows(rng.normal(size=(41, 24)) + centres[rng.integers(0, C, 41)])
    Q[:3] = G[7]
    return Q, G, lab, C


@pytest.mark.parametrize("precision", PRECISIONS)
def test_class_best_equals_reference(precision):
    Q, G, lab, C = labelled()
    st: dict = {}
    s, i = X.class_best(Q, G, lab, C, precision=precision, query_block=16, block_rows=37, stats=st)
    ws, wi = class_ref(Q, G, lab, C)
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_array_equal(s, ws)
    assert (i[:, 4] == -1).all() and np.isneginf(s[:, 4]).all() and (i[:, 6] == 77).all()
    assert (i[:3, lab[7]] == 7).all()  # G[7] and its duplicates 100..104: the lower row


def test_class_best_equals_search_classes_where_float32_is_exact():
    G, Q = dyadic(400, seed=2), dyadic(30, seed=3)
    lab = np.random.default_rng(0).integers(0, 5, 400)
    want = search_classes(Q, Vectors(G, lab, [str(j) for j in range(400)]), 6, block_size=7)
    for p in PRECISIONS:
        s, i = X.class_best(Q, G, lab, 6, precision=p, block_rows=50)
        np.testing.assert_array_equal(i, want.idx)
        np.testing.assert_array_equal(s, want.sims)


def test_class_best_single_class_fallback_and_blocks():
    Q, G, lab, C = labelled(seed=1)
    one = np.zeros(len(G), np.int64)
    s, i = X.class_best(Q, G, one, 1, precision="int8")
    ws, wi = topk_ref(Q, G, 1)
    np.testing.assert_array_equal(i[:, 0], wi[:, 0])
    np.testing.assert_array_equal(s[:, 0], ws[:, 0])
    st: dict = {}
    s, i = X.class_best(Q, G, lab, C, precision="bf16", max_candidates=3, stats=st)
    assert st["fallback_queries"] > 0
    ws, wi = class_ref(Q, G, lab, C)
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_array_equal(s, ws)
    blocks = [(a, G[a:a + 61]) for a in range(0, len(G), 61)]
    s, i = X.class_best_blocks(Q, iter(blocks), lab, C, precision="bf16")
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_array_equal(s, ws)
    with pytest.raises(ValueError, match="labels"):
        X.class_best(Q, G, lab, 3)


# ----------------------------------------------------------------------------- pruning


def pair_loop(X_: np.ndarray, t: float) -> np.ndarray:
    """The LUT rule item by item, one class in id order, on s (compared with t in float64)."""
    S = sims_ref(X_, X_).astype(np.float64)
    alive = np.ones(len(X_), bool)
    for a in range(len(X_)):
        if alive[a]:
            alive[a + 1:] &= ~(S[a, a + 1:] > t)
    return alive


def near_threshold_class(n=300, d=32, seed=0):
    """A class in tight sub-clusters (similarities 0.5..1) with exact duplicates, and thresholds on
    and within 1e-7 of the similarity of existing pairs (the float32 value itself, one float32 ulp
    below, and float64 values a hair either side), where only the exact value decides."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d))
    Xc = unit_rows(centres[rng.integers(0, 6, n)] + rng.uniform(0.1, 0.7, (n, 1)) * rng.normal(size=(n, d)))
    Xc[40:44] = Xc[5]
    S = sims_ref(Xc, Xc)
    ts = [0.5, 0.8, 0.9, 0.95, 1.0]
    for i, j in rng.integers(0, n, size=(6, 2)):
        s = S[min(i, j), max(i, j)]
        if s < 0.999:
            ts += [float(s), float(np.nextafter(s, np.float32(-2))), float(s) - 3e-8, float(s) + 3e-8]
    return Xc, ts


@pytest.mark.parametrize("precision", PRECISIONS)
def test_prune_class_equals_pair_loop_near_thresholds(precision):
    Xc, ts = near_threshold_class()
    st: dict = {}
    keeps = prune_class(Xc, ts, precision=precision, tile=37, chunk=50, stats=st)  # cached blocks
    for t, keep in zip(ts, keeps):
        want = pair_loop(Xc, t)
        assert np.array_equal(keep, want), (t, np.flatnonzero(keep != want))
        got = prune_class(Xc, [t], precision=precision, tile=64, chunk=30, cache_bytes=0)[0]  # kept rows only
        assert np.array_equal(got, want)
    assert st.get("exact_pairs", 0) > 0 or precision == "fp32"  # near-threshold pairs reached exact values


@pytest.mark.parametrize("precision", PRECISIONS)
def test_prune_class_band_pairs_gathered_pair_by_pair(precision, monkeypatch):
    """The band pairs' other path (``prune._exceeds`` without the dense product: rows gathered pair by
    pair, five pairs at a time, so exact values are decided at offsets inside later chunks): the
    pair loop's keep masks, and the same band pairs rescored as with the dense product."""
    from common.retrieval import prune as lut

    Xc, ts = near_threshold_class(seed=3)
    dense: dict = {}
    want = prune_class(Xc, ts, precision=precision, tile=37, stats=dense)
    monkeypatch.setattr(lut, "DENSE_FACTOR", 0)
    monkeypatch.setattr(lut, "DOT_ELEMENTS", 32 * 5)
    st: dict = {}
    keeps = prune_class(Xc, ts, precision=precision, tile=37, stats=st)
    for t, keep, w in zip(ts, keeps, want):
        assert np.array_equal(keep, pair_loop(Xc, t)) and np.array_equal(keep, w), t
    assert st["float32_pairs"] == dense["float32_pairs"] > 0
    assert st.get("exact_pairs", 0) > 0 or precision == "fp32"


def test_prune_class_ties_duplicates_and_lut_identity():
    """Dyadic vectors: similarities exactly equal to the thresholds (equal does not prune), duplicates
    at 1.0; and random classes of very different sizes: lut.prune and prune_sweep, class by class."""
    D = dyadic(120, seed=4)
    D = D[np.linalg.norm(D, axis=1) > 0]
    for t in (0.25, 0.5, 1.0):
        for p in PRECISIONS:
            assert np.array_equal(prune_class(D, [t], precision=p)[0], pair_loop(D, t)), (t, p)
    rng = np.random.default_rng(5)
    lab = rng.choice(4, 400, p=[0.85, 0.1, 0.045, 0.005])
    lab[:2] = 3
    G = unit_rows(rng.normal(size=(4, 24))[lab] + rng.uniform(0.2, 0.9, (400, 1)) * rng.normal(size=(400, 24)))
    ids = rng.permutation(400)
    ts = [0.6, 0.8, 0.9]
    sweep = prune_sweep(G, lab, ids, ts)
    for ti, t in enumerate(ts):
        got = np.zeros(400, bool)
        for c in range(4):
            rows = np.flatnonzero(lab == c)
            rows = rows[np.argsort(ids[rows])]
            got[rows] = prune_class(G[rows], ts, precision="bf16")[ti]
        assert np.array_equal(got, prune(G, lab, ids, t)) and np.array_equal(got, sweep[ti])


def test_prune_class_and_quantize_on_worker_threads(monkeypatch):
    """Two workers: codes quantized in chunks of a few rows (the same codes as on one thread),
    the product blocks of the class made on the workers, the same keep masks as the pair loop."""
    monkeypatch.setattr(C, "CODE_CHUNK", 32 * 7)  # seven rows per quantize chunk
    Xc, ts = near_threshold_class(seed=2)
    for p in PRECISIONS:
        one = X.quantize(Xc, p)  # one thread (the fixture)
        torch.set_num_threads(2)
        c = X.quantize(Xc, p)
        for a, b in ((one.low, c.low), (one.norm, c.norm), (one.resid, c.resid), (one.scale, c.scale)):
            assert (a is None and b is None) or torch.equal(a, b)
        keeps = prune_class(c, ts, tile=37)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        for t, keep in zip(ts, keeps):
            assert np.array_equal(keep, pair_loop(Xc, t)), (p, t)


# ----------------------------------------------------------------------------- the entry points


class _Blocks:
    """A gallery given block by block (what ``streamed.topk`` reads of a ``StoreMatrix``)."""

    def __init__(self, G: np.ndarray, rows: int):
        self.G, self.rows, self.dim = G, rows, G.shape[1]

    def __len__(self) -> int:
        return len(self.G)

    def blocks(self):
        for a in range(0, len(self.G), self.rows):
            yield a, self.G[a:a + self.rows]


def test_search_topk_runs_the_kernel_where_it_pays_with_the_same_answer(monkeypatch, caplog):
    from common.retrieval import search, streamed

    monkeypatch.setattr(C, "KERNEL_MIN_QUERIES", 40)  # the rule, on few queries
    monkeypatch.setattr(C, "_SETTING", dict(C._SETTING))  # search.precision comes back afterwards
    rng = np.random.default_rng(11)
    _, G = gallery(seed=11)
    Q = unit_rows(rng.normal(size=(43, G.shape[1])) + 0.5 * G[rng.integers(0, len(G), 43)])
    Q[:4] = G[3]  # ties straddling the cut
    calls = []
    real = X.topk
    monkeypatch.setattr(X, "topk", lambda *a, **kw: calls.append(kw["precision"]) or real(*a, **kw))
    for p in PRECISIONS:
        search.set_precision(p)
        with caplog.at_level(logging.INFO, logger="common.retrieval"):
            for k in (1, C.KERNEL_MAX_K):
                ws, wi = topk_ref(Q, G, k)
                for got in (search.topk(Q, G, k, block_size=200), streamed.topk(Q, _Blocks(G, 150), k, 200)):
                    np.testing.assert_array_equal(got[1], wi)
                    np.testing.assert_array_equal(got[0], ws)
        assert sum("exact search: candidates from" in r.message for r in caplog.records) == 1  # once per stage
        caplog.clear()
    search.set_precision("auto")
    per = 2 * (1 + 3)  # two k, each: the in-memory search and three streamed blocks
    assert calls == ["fp32"] * per + ["bf16"] * per + ["int8"] * per
    # few queries or a large k: the float32 product, the same neighbours
    for q, k in ((Q[:C.KERNEL_MIN_QUERIES - 1], 3), (Q, C.KERNEL_MAX_K + 1)):
        ws, wi = topk_ref(q, G, k)
        s, i = search.topk(q, G, k)
        np.testing.assert_array_equal(i, wi)
        np.testing.assert_allclose(s, ws, rtol=0, atol=1e-6)
    assert len(calls) == 3 * per
    with pytest.raises(ValueError, match="search.precision"):
        search.set_precision("fp16")


# ----------------------------------------------------------------------------- prepared galleries


def test_prepared_gallery_gives_the_unprepared_and_fp32_answer_and_codes_once(monkeypatch):
    """search.prepare: the kernel's codes made once for any number of searches, the answer that of the
    unprepared gallery and of float32 codes (ties straddling the cut), on the kernel and the float32 path."""
    from common.retrieval import search

    monkeypatch.setattr(C, "KERNEL_MIN_QUERIES", 30)
    monkeypatch.setattr(C, "_SETTING", dict(C._SETTING))
    Q, G = gallery(seed=12)
    made = []
    real = C.quantize
    monkeypatch.setattr(C, "quantize", lambda *a, **kw: made.append(len(a[0])) or real(*a, **kw))
    for p in PRECISIONS:
        search.set_precision(p)
        g = search.prepare(G)
        assert search.prepare(g) is g and len(g) == len(G) and g.shape == G.shape
        for k in (1, 5, C.KERNEL_MAX_K, C.KERNEL_MAX_K + 3):  # the last: the float32 product
            ws, wi = topk_ref(Q, G, k)
            got = search.topk(Q, g, k, block_size=16)
            plain = search.topk(Q, G, k, block_size=16)
            np.testing.assert_array_equal(got[1], wi)
            np.testing.assert_array_equal(got[1], plain[1])
            np.testing.assert_array_equal(got[0], plain[0])
            if k <= C.KERNEL_MAX_K:
                np.testing.assert_array_equal(got[0], ws)
                fp32 = X.topk(Q, G, k, precision="fp32")
                np.testing.assert_array_equal(got[0], fp32[0])
                np.testing.assert_array_equal(got[1], fp32[1])
        assert g.coded == 1  # three kernel searches of the prepared gallery, one set of codes
    search.set_precision("auto")
    # per precision: the prepared gallery coded once; the unprepared gallery and the fp32 reference
    # (kernel.topk on the rows) coded at each of their three kernel searches
    assert made.count(len(G)) == 3 * (1 + 3 + 3)


def test_prepared_gallery_changed_in_place_is_coded_again(monkeypatch):
    """A prepared torch gallery changed in place (directly or through a view) gets new codes at its
    next search, so it never answers with the old rows' codes; a new gallery object gets its own."""
    from common.retrieval import search

    monkeypatch.setattr(C, "KERNEL_MIN_QUERIES", 30)
    monkeypatch.setattr(C, "_SETTING", dict(C._SETTING))
    search.set_precision("bf16")
    Q, G = gallery(seed=13)
    Gt = torch.from_numpy(G.copy())
    g = search.prepare(Gt)
    search.topk(Q, g, 3)
    assert g.coded == 1
    # move the queries' nearest rows far away: stale codes would still offer them as candidates,
    # and the rows far from every query would never be rescored
    wi0 = topk_ref(Q, Gt.numpy(), 3)[1]
    Gt[torch.from_numpy(np.unique(wi0))] = torch.from_numpy(-G[np.unique(wi0)])
    ws, wi = topk_ref(Q, Gt.numpy(), 3)
    s, i = search.topk(Q, g, 3)
    assert g.coded == 2
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_array_equal(s, ws)
    Gt[:5].mul_(-1.0)  # in place through a view: the same version counter
    ws, wi = topk_ref(Q, Gt.numpy(), 3)
    s, i = search.topk(Q, g, 3)
    assert g.coded == 3
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_array_equal(s, ws)
    search.topk(Q, g, 3)
    assert g.coded == 3  # unchanged since: the codes are reused
    search.set_precision("auto")


def test_prepared_vectors_search_rows_follow_the_vectors():
    """prepare_vectors / search_rows: the prepared rows while ``X`` is the array they were made from;
    ``X`` rebound to another array: that array (never the old codes)."""
    from common.retrieval import search

    Q, G = gallery(seed=14)
    v = Vectors(G, np.zeros(len(G), np.int64), [str(i) for i in range(len(G))])
    assert search.search_rows(v) is v.X
    pv = search.prepare_vectors(v)
    assert isinstance(pv, Vectors) and search.prepare_vectors(pv) is pv
    assert isinstance(search.search_rows(pv), search.PreparedGallery)
    np.testing.assert_array_equal(pv.labels, v.labels)
    other = unit_rows(np.random.default_rng(1).normal(size=G.shape))
    pv.X = other
    assert search.search_rows(pv) is other
    np.testing.assert_array_equal(search.topk(Q, search.search_rows(pv), 2)[1], topk_ref(Q, other, 2)[1])
