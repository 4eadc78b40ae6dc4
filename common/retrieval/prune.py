"""LUT pruning of the train gallery (Yang et al. 2022) and the search for its threshold.

The rule (Yang et al. 2022, supplementary material; the reference code's pair loop)
-----------------------------------------------------------------------------------
Within each class separately, the gallery items are taken in ascending image id. Each item that
is still kept removes every *later* item of the same class whose cosine similarity to it is
strictly greater than the threshold ``t``. Classes never prune each other; the first item of a
class is always kept, so every class keeps at least one item. Similarity exactly equal to ``t``
does not prune. ``t`` is compared as given (a float64), never rounded to float32: at ``t = 0.8``
a similarity of ``float32(0.8)`` (0.800000011920929, above 0.8) prunes.

The similarity the rule is defined on: ``s(i, j) = float32(x_i . x_j)``, the exact dot product of
the stored float32 vectors rounded once to float32 (``common.retrieval.similarity``: float64 dot
products, exact integers where their error could straddle a rounding boundary). A float32 matrix
product of another shape or on another device may round its last bit differently; this
definition makes the rule independent of that.

How it is decided (``prune_class``): products ``A`` of reduced-precision codes of the vectors
(``common.retrieval.codes``: bf16, int8 or float32, ``search.precision``), with the proven bound
``lower(A) <= s <= upper(A)``: ``A > lower^-1(t)`` gives ``s > t``; ``A < upper^-1(t)`` gives
``s < t``; only pairs with ``A`` in between (the band) need ``s``: their float32 dot products
first, and ``s`` itself where those are within their own bound of ``t``. The band's ends are
rounded inwards to the grid of ``A``'s dtype (``codes._round_in``: exact for values of that dtype;
at bf16 near t = 0.95 a grid step, 2^-8, is about the bound's own width). So every decision is
``s(i, j) > t`` exactly, and the result is identical to a direct pair loop on ``s``
(``tests/retrieval/test_lut.py``, ``tests/retrieval/test_exact_search.py``) for any precision, block size and device.

How it is fast
--------------
Per class, rows are processed in steps of T rows in id order (T = ``lut.block_size`` on a GPU; at
most ``PRUNE_TILE`` = 512 on the CPU, where smaller steps skip more work). For step ``b``:
1. the rows of ``b`` dominated by a kept item of an earlier step are found by products
   (kept-so-far x T, ``lut.block_size`` kept rows at a time) and a column max;
2. the greedy is resolved among the remaining rows of the step: one (c x c) product, then a
   scan over the rows in order that applies a kept row's whole "prunes" row as one vector
   operation (only rows that prune anything are visited): O(T) vector ops, not a loop over pairs.
In both, the band's pairs get their float32 dot products from one dense product of their distinct
rows and columns where that stays small (``_exceeds``: they crowd into a few rows and columns),
else row by row from gathered pairs.
The products of a class's upper triangle by steps (``n (n + T) / 2`` entries: 2 bytes each for bf16
codes) are computed once, on the worker threads in step order while the greedy passes already use
the first ones, and reused for every threshold when they take at most ``PRUNE_CACHE_BYTES``; a larger class is recomputed per step for the kept rows only. Memory:
one class's vectors and codes, plus those blocks or ``block_size x T`` products; never
``n_class x n_class`` beyond the cache. The element-wise steps run on one thread and only the
products on all threads (``similarity._threads``: on a loaded machine a parallel region of a small
op can wait a whole scheduler quantum; one prune of 8,000 vectors measured 2.9 s with two threads
for everything, 0.2 s like this). Of a prune at t = 0.95 (bf16 codes, one class of 3,000 x 2,048,
one thread, 2026-12-07): the codes 11 ms, the triangle's products 24 ms, the greedy passes
(dominance maxima, band rescoring, the scan) 18 ms: 0.23x a bare float32 ``X @ X.T`` on one thread
(233 ms); two threads: docs/measured.md.

The sweep (stage 05) prunes at every threshold of a grid with the same cached blocks (the
similarities do not depend on the threshold); the greedy's outcome is not monotone in ``t``, so
every threshold is run, each on a worker thread (they share only the blocks; a pool of their own,
waiting on the products' pool). What bounds it: the codes and the triangle's products once, then
one greedy pass per threshold, the passes sharing the two cores with the products.

Queries (stage 05): the val x gallery similarities are computed once, in blocks of queries; each
query keeps its ``M`` nearest gallery items (``choose_top_m``), and for each threshold its nearest
*kept* items are the first kept ones of that list; queries whose list holds fewer than ``k`` kept
items take an exact masked top-k of the similarity block still in memory. The result equals a
search of the pruned gallery (``retrieval.search.topk``; ties to the lower row).

Stage 05's table (``threshold_sweep.csv``, one row per threshold): ``n_kept``, ``fraction_kept``,
``size_mb`` (float32), ``min_kept_per_class`` (over the gallery's classes), val ``top1_accuracy``
(nearest kept item), ``knn_accuracy`` (DINO's weighted vote of ``lut.knn_k`` kept items,
``exp(sim / lut.knn_temperature)``), ``macro_precision`` / ``macro_recall`` / ``macro_f1`` of the
top-1 predictions (sklearn, ``zero_division=0``, over the classes present in the val truth or the
predictions), and ``latency_ms``: measured search time per query (a batch of ``LATENCY_QUERIES``
val vectors, ``retrieval.search.topk`` with ``k = lut.knn_k``) against a gallery of that size.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..runtime.device import _device, full_fp32
from .codes import RHO, Codes, _f32_error, _gallery_codes, _lower_inv, _mm, _round_in, _upper_inv, exact_pairs
from .exact import as_tensor
from .similarity import U32, U64, _dots32, _exact_dots, _parallel, _rows, _submit, _threads, _workers

DOT_ELEMENTS = 1 << 18  # vector elements of each side of the band pairs gathered at a time (1 MiB of float32: in L2)
DENSE_FACTOR = 64  # band pairs take one dense product of their distinct rows and columns up to this many entries per pair
DENSE_ELEMENTS = 1 << 22  # ... and up to this many entries in all (16 MiB of float32)
PRUNE_TILE = 512  # rows per greedy step on the CPU (at most; smaller steps skip more work: the fastest in benchmarks/bench_prune.py)
PRUNE_CACHE_BYTES = 2 * 2**30  # a class's product blocks are kept for every threshold up to this size; larger classes are recomputed per step
SWEEP_CACHE_BYTES = PRUNE_CACHE_BYTES  # stage 05's name for it (prune_sweep's default)


def exact_similarity(X: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``s(rows[p], cols[p])`` for each pair p of rows of ``X``: the similarity the rule is defined on
    (``codes.exact_pairs``)."""
    return exact_pairs(X, rows, X, cols)


def similarity_margin(dim: int, max_norm_sq: float = 1.0) -> float:
    """Worst-case |float32 matrix product - s(i, j)| for vectors of norm^2 <= ``max_norm_sq``: ``gamma_D``
    times the norms (Higham 2002, section 3.1) plus the rounding of ``s`` itself (2^-22 covers it). The
    float32 search paths (GPU, ``sweep.nearest_kept``) rank by such products; the kernel's own bound
    is ``codes._error_terms``."""
    nu = dim * U32
    if nu >= 0.5:
        raise ValueError(f"dimension {dim} too large for a float32 error bound")
    return nu / (1.0 - nu) * max_norm_sq + 2.0 ** -22


# ----------------------------------------------------------------------------- one class (the kernel)


def _band(t: float, E: float, rho: float, dtype: torch.dtype) -> tuple[float, float]:
    """``(lo, hi)`` in ``dtype``: for products ``A`` of ``dtype``, ``A > hi`` proves ``s > t``, ``A < lo``
    proves ``s < t``. Rounded inwards (``codes._round_in``: exact for values of ``dtype``): at bf16 the
    band then holds 4 values of the grid near t = 0.95 instead of 6."""
    x = torch.tensor([t], dtype=torch.float64)
    e = torch.tensor([E], dtype=torch.float64)
    lo = _round_in(_upper_inv(x, e, rho), dtype, up=False)
    hi = _round_in(_lower_inv(x, e, rho), dtype, up=True)
    return float(lo), float(hi)


def _greedy_scan(A: np.ndarray) -> np.ndarray:
    """The greedy in id order on a strictly upper-triangular 'prunes' matrix ``A`` (c, c) bool:
    item i, if still alive, removes every j > i with ``A[i, j]``. Returns the alive mask."""
    alive = np.ones(A.shape[0], dtype=bool)
    active = np.flatnonzero(A.any(1))  # rows that prune something; the others change nothing
    notA = ~A[active]
    for r, i in enumerate(active.tolist()):
        if alive[i]:
            np.logical_and(alive, notA[r], out=alive)  # one vector op per kept row
    return alive


class _Blocks:
    """The products of one class by steps of ``tile`` columns: ``get(b, rows)`` = ``A[rows, tile b]``,
    from a cache of the column blocks ``A[0:end_b, tile b]`` when one was made, else computed."""

    def __init__(self, c: Codes, tile: int, cache: bool):
        self.c, self.tile = c, tile
        n = len(c)
        self.cols = None
        if cache:  # started on the workers in step order: the greedy can start on the first ones
            starts = list(range(0, n, tile))
            self.cols = _submit(lambda a: self._mm(slice(0, min(n, a + tile)), a), starts, _workers(c.X.device))

    def _mm(self, rows: Any, a: int) -> torch.Tensor:
        """Products of code rows ``rows`` (a slice or indices) with the step's columns ``a:a + tile``."""
        c, e = self.c, min(len(self.c), a + self.tile)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)

        return _mm(pick(c.low), pick(c.scale), c.low[a:e], None if c.scale is None else c.scale[a:e])

    @staticmethod
    def nbytes(n: int, tile: int, itemsize: int) -> int:
        return itemsize * sum(min(n, a + tile) * (min(n, a + tile) - a) for a in range(0, n, tile))

    def get(self, b: int, rows: torch.Tensor) -> torch.Tensor:
        if self.cols is not None:
            return self.cols[b].result().index_select(0, rows)
        return self._mm(rows, b * self.tile)


def _exceeds(c: Codes, rows: torch.Tensor, cols: torch.Tensor, t: float, stats: dict) -> torch.Tensor:
    """``s(rows[p], cols[p]) > t`` for pairs inside the band of the products: float32 dot products
    first, the exact ``s`` where they do not decide (within their own bound of ``t``).

    The band's pairs crowd into a few rows and columns (a near-duplicate group, the columns of a
    step whose maximum is near ``t``), so their float32 products come from one dense product of the
    distinct rows with the distinct columns when that is at most ``DENSE_FACTOR`` times the pairs (and
    ``DENSE_ELEMENTS`` in all): a matrix product costs ~0.05 us per entry here, a gathered pair ~5 us.
    Otherwise the two rows of each pair are gathered into this thread's buffers, ``DOT_ELEMENTS`` at
    a time. Either way a float32 sum of D products, bounded by ``codes._f32_error``."""
    P, D = rows.numel(), c.dim
    res = torch.zeros(P, dtype=torch.bool, device=rows.device)
    if P == 0:
        return res
    ur, ir = torch.unique(rows, return_inverse=True)
    uc, ic = torch.unique(cols, return_inverse=True)
    cells = ur.numel() * uc.numel()
    if cells <= min(DENSE_FACTOR * P, DENSE_ELEMENTS):
        d = torch.mm(c.X.index_select(0, ur), c.X.index_select(0, uc).t())[ir, ic].double()
        _decide_pairs(c, rows, cols, d, t, res, 0, None, None, stats)
    else:
        sub = max(1, DOT_ELEMENTS // max(1, D))
        for a in range(0, P, sub):
            r, q = rows[a:a + sub], cols[a:a + sub]
            x, y = _rows(c.X, r, "prune_x"), _rows(c.X, q, "prune_y")
            _decide_pairs(c, r, q, _dots32(x, y).double(), t, res, a, x, y, stats)
    stats["float32_pairs"] = stats.get("float32_pairs", 0) + P
    return res


def _decide_pairs(c: Codes, r: torch.Tensor, q: torch.Tensor, d: torch.Tensor, t: float, res: torch.Tensor, a: int,
                  x: torch.Tensor | None, y: torch.Tensor | None, stats: dict) -> None:
    """Into ``res[a:a + len(r)]``: ``s > t`` for pairs ``(r, q)`` with float32 dot products ``d``; where
    ``d`` and its bound straddle ``t``, the exact ``s`` (from the gathered rows ``x``, ``y`` when given)."""
    e = _f32_error(c, c, r, q, d)
    res[a:a + r.numel()] = d - e > t
    near = torch.nonzero((d - e <= t) & (d + e > t)).flatten()
    if near.numel():
        nn = c.norm[r[near]] * c.norm[q[near]]
        xs = x[near] if x is not None else c.X.index_select(0, r[near])
        ys = y[near] if y is not None else c.X.index_select(0, q[near])
        res[a + near] = _exact_dots(xs, ys, nn).double() > t
        stats["exact_pairs"] = stats.get("exact_pairs", 0) + int(near.numel())


def _dominated(c: Codes, A: torch.Tensor, rows: torch.Tensor, a: int, dom: torch.Tensor, t: float, lo: float,
               hi: float, stats: dict) -> None:
    """Step 1 of ``_prune_one``: marks in ``dom`` the columns of a step (``a + j``) that a kept row
    ``rows[i]`` prunes, from their products ``A`` (rows x step): a column maximum above ``hi`` proves
    it; below ``lo`` rules it out; the entries in the band of the other columns are decided exactly."""
    top = A.amax(0)
    dom |= top > hi
    near = torch.nonzero(~dom & (top >= lo)).flatten()
    if near.numel():
        i, j = torch.nonzero(A[:, near] >= lo, as_tuple=True)  # all <= hi: their column's top is
        hit = _exceeds(c, rows[i], a + near[j], t, stats)
        dom[near[j[hit]]] = True


def _prune_one(c: Codes, blocks: _Blocks, t: float, lo: float, hi: float, chunk: int, stats: dict) -> np.ndarray:
    """Keep mask of one class at threshold ``t``: the LUT greedy (``retrieval.prune``), steps of ``blocks.tile``
    rows; 1. the rows of a step pruned by a kept row of an earlier step, 2. the greedy within the step
    (one (m, m) block of the step's other rows: sure entries above ``hi``, band entries exact)."""
    n, tile, dev = len(c), blocks.tile, c.X.device
    keep = torch.zeros(n, dtype=torch.bool, device=dev)
    for b, a in enumerate(range(0, n, tile)):
        dom = torch.zeros(min(n, a + tile) - a, dtype=torch.bool, device=dev)
        kept = torch.nonzero(keep[:a]).flatten()
        for c0 in range(0, kept.numel(), chunk):  # kept rows x step columns, chunk rows at a time
            _dominated(c, blocks.get(b, kept[c0:c0 + chunk]), kept[c0:c0 + chunk], a, dom, t, lo, hi, stats)
        cand = torch.nonzero(~dom).flatten()
        if cand.numel() == 0:
            continue
        A = blocks.get(b, a + cand).index_select(1, cand)  # (m, m) among the step's open rows
        P = (A > hi).triu_(1)
        i, j = torch.nonzero(((A >= lo) & ~P).triu_(1), as_tuple=True)
        if i.numel():
            P[i, j] = _exceeds(c, a + cand[i], a + cand[j], t, stats)
        alive = torch.from_numpy(_greedy_scan(P.cpu().numpy())).to(dev)
        keep[a + cand[alive]] = True
    return keep.cpu().numpy()


def prune_class(X: Any, thresholds: Sequence[float], *, precision: str = "auto", tile: int = PRUNE_TILE,
                chunk: int = 4096, cache_bytes: int = PRUNE_CACHE_BYTES, stats: dict | None = None) -> np.ndarray:
    """the LUT greedy (``retrieval.prune``) on one class at every threshold: keep masks (T, n) bool.

    ``X`` (n, D): the class's vectors in image-id order (or their ``Codes``). Each decision is
    ``s(i, j) > t`` exactly (module docstring), so the masks are those of the pair loop on ``s``
    for any precision, ``tile`` or ``chunk``. The product blocks of the upper triangle are computed
    once (for every threshold) when they take at most ``cache_bytes`` (bf16 codes: 2 bytes per pair;
    at bf16 speed this beats skipping the pruned rows' products), else per step for the kept rows
    only. ``stats`` gains ``float32_pairs`` / ``exact_pairs`` (band pairs recomputed) and ``precision``."""
    c = _gallery_codes(X, precision)
    st = stats if stats is not None else {}
    st["precision"] = c.precision
    n = len(c)
    keeps = np.zeros((len(thresholds), n), dtype=bool)
    if n == 0:
        return keeps
    D = c.dim
    gamma = 0.0 if c.precision == "int8" else D * U32 / (1.0 - D * U32)
    ne, mm, nn = float(c.resid.max()), float(c.lnorm.max()), float(c.norm.max())
    E = (nn * ne + ne * mm + gamma * mm * mm + U32 * nn * nn + D * 2.0 ** -125 * (1 + 2 * mm)) * (1.0 + 8 * U64)
    dtype = torch.float32 if c.precision != "bf16" else torch.bfloat16
    with full_fp32(), _threads(c.X.device):
        item = 2 if c.precision == "bf16" else 4
        blocks = _Blocks(c, tile, _Blocks.nbytes(n, tile, item) <= cache_bytes)

        def one(ti: int) -> tuple[np.ndarray, dict]:
            own: dict = {}  # counts per threshold, added up below (the workers share no dict)
            lo, hi = _band(float(thresholds[ti]), E, RHO[c.precision], dtype)
            return _prune_one(c, blocks, float(thresholds[ti]), lo, hi, chunk, own), own

        # The greedy passes run while the workers make the later blocks (step by step a pass waits only
        # for the block it needs). One threshold: here. Several: they share the blocks and nothing else,
        # so each runs on a worker of its own pool (it waits on the products' pool, never on its own),
        # the highest thresholds first (more rows stay kept there: the longest passes start first).
        order = sorted(range(len(thresholds)), key=lambda i: -float(thresholds[i]))
        for ti, (keep, own) in zip(order, _parallel(one, order, _workers(c.X.device), kind="prune_greedy")):
            keeps[ti] = keep
            for key, v in own.items():
                st[key] = st.get(key, 0) + v
    return keeps


# ----------------------------------------------------------------------------- whole gallery


def class_order(labels: np.ndarray, ids: np.ndarray | None = None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Row order by (class, image id) and the ``(start, end)`` slice of each class in it."""
    labels = np.asarray(labels)
    ids = np.arange(labels.size) if ids is None else np.asarray(ids)
    if ids.shape != labels.shape:
        raise ValueError(f"ids {ids.shape} and labels {labels.shape} differ in length")
    order = np.lexsort((ids, labels))
    ls = labels[order]
    starts = np.flatnonzero(np.r_[True, ls[1:] != ls[:-1]]) if ls.size else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], ls.size]
    return order, list(zip(starts.tolist(), ends.tolist()))


def _class_rows(X: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """The rows of one class (no copy when they are already all of ``X`` in order)."""
    if rows.size == X.shape[0] and (rows.size < 2 or bool((np.diff(rows) == 1).all())) and rows[0] == 0:
        return X
    return X.index_select(0, torch.from_numpy(rows).to(X.device))


def _classes(vectors: Any, labels: np.ndarray, ids: Any, device: Any) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """``(rows, X_c)`` of every class, rows in (class, image id) order. A gallery streamed from the
    store (``retrieval.streamed.StoreMatrix``) is read one class at a time (memory: the largest class)."""
    from .streamed import is_streamed

    order, slices = class_order(labels, None if ids is None else np.asarray(ids))
    if is_streamed(vectors):
        for s, e in slices:
            rows = order[s:e]
            yield rows, as_tensor(vectors.rows(rows), device)
        return
    X = as_tensor(vectors, device)
    if X.ndim != 2:
        raise ValueError(f"vectors must be (N, D), got {tuple(X.shape)}")
    for s, e in slices:
        rows = order[s:e]
        yield rows, _class_rows(X, rows)


def _prune_all(vectors: Any, labels: Any, ids: Any, thresholds: Sequence[float], block_size: int, device: Any,
               cache_bytes: int) -> np.ndarray:
    """Keep masks (T, N) of every class at every threshold (``prune_class`` per class)."""
    from .codes import search_precision

    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    labels = np.asarray(labels)
    keeps = np.zeros((len(thresholds), labels.size), dtype=bool)
    dev = _device(vectors, device)
    # on the CPU at most PRUNE_TILE rows per step (smaller steps skip the products of pruned rows)
    tile = max(1, block_size if dev.type != "cpu" else min(block_size, PRUNE_TILE))
    for rows, Xc in _classes(vectors, labels, ids, dev):
        precision = search_precision(Xc.shape[1], Xc.device)
        keeps[:, rows] = prune_class(Xc, [float(t) for t in thresholds], precision=precision, tile=tile,
                                     chunk=block_size, cache_bytes=cache_bytes)
    return keeps


def prune(vectors: Any, labels: Any, ids: Any = None, threshold: float = 0.9, block_size: int = 4096,
          device: Any = None) -> np.ndarray:
    """The LUT rule (module docstring) at one threshold: keep mask (N,) bool in the input's row order.

    Args:
        vectors: (N, D) float32 L2-normalised gallery vectors (numpy or torch), or a
            ``retrieval.streamed.StoreMatrix`` (read from the store one class at a time).
        labels: (N,) class of each row (any sortable values).
        ids: (N,) image ids giving the order within a class (None: row order).
        threshold: cosine similarity; a later item is removed when ``s > threshold``.
        block_size: rows per block (memory, see the module docstring).
        device: torch device (None: CPU).
    """
    return _prune_all(vectors, labels, ids, [threshold], block_size, device, PRUNE_CACHE_BYTES)[0]


def prune_sweep(vectors: Any, labels: Any, ids: Any, thresholds: Sequence[float], block_size: int = 4096,
                device: Any = None, cache_bytes: int = SWEEP_CACHE_BYTES) -> np.ndarray:
    """``prune`` at every threshold: keep masks (T, N) bool, each identical to ``prune`` at that
    threshold; a class's product blocks are computed once and reused (module docstring)."""
    return _prune_all(vectors, labels, ids, thresholds, block_size, device, cache_bytes)
