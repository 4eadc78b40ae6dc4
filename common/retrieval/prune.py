"""LUT pruning of the train gallery (Yang et al. 2022) and the search for its threshold.

The rule (Yang et al. 2022, supplementary material; the reference code's pair loop)
-----------------------------------------------------------------------------------
Within each class separately, the gallery items are taken in ascending image id. Each item that
is still kept removes every *later* item of the same class whose cosine similarity to it is
strictly greater than the threshold ``t``. Classes never prune each other; the first item of a
class is always kept, so every class keeps at least one item. Similarity exactly equal to ``t``
does not prune. ``t`` is compared as given (a float64), never rounded to float32: at ``t = 0.8``
a similarity of ``float32(0.8)`` (0.800000011920929, above 0.8) prunes.

The similarity the rule is defined on: ``s(i, j) = float32(x_i . x_j)``, the dot product of the
stored float32 vectors evaluated in float64 (each product is exact in float64; the sum's error
is ~1e-13) and rounded once to float32. A float32 matrix product of another shape or on another
device may round its last bit differently; this definition makes the rule independent of that.
The code computes similarities by fast float32 matrix products and trusts a comparison only when
the value is farther from ``t`` than the product's worst-case rounding error
(``similarity_margin``: ``gamma_D * max|x|^2`` with ``gamma_D = D u / (1 - D u)``, Higham 2002
section 3.1, plus the final rounding); the few pairs inside that band are recomputed exactly as above.
So the result is identical to a direct pair loop on ``s`` (``tests/test_lut.py`` checks it), for
any block size and device.

How it is fast
--------------
Per class, rows are processed in steps of T rows in id order (T = ``lut.block_size`` on a GPU; at
most ``CPU_TILE`` = 512 on the CPU, where smaller steps skip more work: the lower triangle and the
products of already pruned rows). For step ``b``:
1. the rows of ``b`` dominated by a kept item of an earlier step are found by products
   (kept-so-far x T, ``lut.block_size`` kept rows at a time) and a column max;
2. the greedy is resolved among the remaining rows of the step: one (c x c) product, then a
   scan over the rows in order that applies a kept row's whole "prunes" row as one vector
   operation (only rows that prune anything are visited): O(T) vector ops, not a loop over pairs.
Memory per step: at most ``block_size x T`` float32 similarities, ``block_size x D`` gathered
vectors and a ``T x T`` bool matrix, plus ``n_class`` bools and one class's vectors; never
``n_class x n_class``. On the CPU the many small element-wise steps run on one thread and only the
products on all threads (``_Threads``: on a loaded machine a parallel region of a small op can
wait a whole scheduler quantum).

The sweep (stage 05) prunes at every threshold of a grid. The similarities of a class do not
depend on the threshold, so ``prune_sweep`` computes each class's column blocks ``S[0:b_end, b]``
(the upper triangle by steps, ``n (n + T) / 2`` float32: 128 MB for a class of 7,760 on the CPU) once and
reruns only the comparisons and the scan per threshold; a class whose blocks exceed
``SWEEP_CACHE_BYTES`` is recomputed per threshold instead. The greedy's outcome is not monotone in
``t``, so every threshold is run.

Queries (stage 05): the val x gallery similarities are computed once, in blocks of queries; each
query keeps its ``M`` nearest gallery items (``choose_top_m``), and for each threshold its nearest
*kept* items are the first kept ones of that list; queries whose list holds fewer than ``k`` kept
items take an exact masked top-k of the similarity block still in memory. The result equals a
search of the pruned gallery (``retrieval.topk``; ties to the lower row).

Stage 05's table (``threshold_sweep.csv``, one row per threshold): ``n_kept``, ``fraction_kept``,
``size_mb`` (float32), ``min_kept_per_class`` (over the gallery's classes), val ``top1_accuracy``
(nearest kept item), ``knn_accuracy`` (DINO's weighted vote of ``lut.knn_k`` kept items,
``exp(sim / lut.knn_temperature)``), ``macro_precision`` / ``macro_recall`` / ``macro_f1`` of the
top-1 predictions (sklearn, ``zero_division=0``, over the classes present in the val truth or the
predictions), and ``latency_ms``: measured search time per query (a batch of ``LATENCY_QUERIES``
val vectors, ``retrieval.topk`` with ``k = lut.knn_k``) against a gallery of that size.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..runtime.device import _device, full_fp32
from .exact import as_tensor

UNIT_ROUNDOFF = 2.0 ** -24  # float32 unit roundoff u
ROUNDING_SLACK = 2.0 ** -22  # final float32 rounding of s(i, j) plus the rounding of t +- margin to float32
SWEEP_CACHE_BYTES = 2 * 2**30  # stage 05: a class's cached similarity blocks may take this much; larger classes are recomputed per threshold
CPU_TILE = 512  # on the CPU the greedy steps through at most this many rows at once (fastest in benchmarks/bench_prune.py)


# ----------------------------------------------------------------------------- exact similarity


def similarity_margin(dim: int, max_norm_sq: float = 1.0) -> float:
    """Worst-case |float32 matrix product - s(i, j)| for vectors of norm^2 <= ``max_norm_sq``.

    Any summation order of D float32 products errs by at most ``gamma_D * sum|x_k y_k|``
    (Higham 2002, "Accuracy and Stability of Numerical Algorithms", section 3.1) and
    ``sum|x_k y_k| <= |x| |y|``; ``ROUNDING_SLACK`` covers the rounding of ``s`` itself to float32
    and of the compared bounds ``t +- margin``.
    """
    nu = dim * UNIT_ROUNDOFF
    if nu >= 0.5:
        raise ValueError(f"dimension {dim} too large for a float32 error bound")
    return nu / (1.0 - nu) * max_norm_sq + ROUNDING_SLACK


def exact_similarity(X: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``s(rows[p], cols[p])`` for each pair p: float64 dot products of the float32 vectors, rounded
    to float32 (the similarity the pruning rule is defined on)."""
    out = torch.empty(rows.numel(), dtype=torch.float32, device=X.device)
    step = max(1, (1 << 22) // max(1, X.shape[1]))  # pairs per chunk: bounds the float64 temporaries
    for a in range(0, rows.numel(), step):
        r, c = rows[a:a + step], cols[a:a + step]
        out[a:a + step] = (X[r].double() * X[c].double()).sum(1).float()
    return out


def exceeds(s: torch.Tensor, t: float) -> torch.Tensor:
    """``s > t`` for float32 similarities ``s`` and the threshold ``t`` as given (float64).

    Comparing a float32 tensor with a Python float rounds the float to float32; ``float32(t)``
    can lie above ``t`` (0.8, 0.99), which would spare a pair whose similarity is exactly
    ``float32(t)``. The comparison is therefore made in float64, where every float32 is exact.
    """
    return s.double() > float(t)


def float32_down(x: float) -> float:
    """The largest float32 value ``<= x`` (a Python float)."""
    f = np.float32(x)
    if float(f) > x:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


def float32_up(x: float) -> float:
    """The smallest float32 value ``>= x`` (a Python float)."""
    f = np.float32(x)
    if float(f) < x:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


def band_bounds(t: float, margin: float) -> tuple[float, float]:
    """``(lo, hi)``: the uncertainty band ``[t - margin, t + margin]`` widened outwards to float32
    values, so comparing a float32 block with them (in float32) loses nothing to rounding: a
    product above ``hi`` has ``s > t``, one below ``lo`` has ``s < t``."""
    return float32_down(float(t) - margin), float32_up(float(t) + margin)


# ----------------------------------------------------------------------------- one class


class _Threads:
    """CPU threading of the greedy: its many small element-wise steps run on one thread, only the
    matrix products on all of torch's threads. On a shared, loaded machine every parallel region
    of a small op can wait a scheduler quantum for a descheduled thread (measured here: one prune
    of 8,000 vectors 2.9 s with two threads for everything, 0.2 s like this)."""

    def __init__(self, device: torch.device):
        self.n = torch.get_num_threads()
        self.active = device.type == "cpu" and self.n > 1

    def __enter__(self) -> "_Threads":
        if self.active:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            torch.set_num_threads(self.n)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` on all threads."""
        if not self.active:
            return a @ b
        torch.set_num_threads(self.n)
        try:
            return a @ b
        finally:
            torch.set_num_threads(1)


def _greedy_scan(A: np.ndarray) -> np.ndarray:
    """The greedy in id order on a strictly upper-triangular 'prunes' matrix ``A`` (c, c) bool:
    item i, if still alive, removes every j > i with ``A[i, j]``. Returns the alive mask."""
    alive = np.ones(A.shape[0], dtype=bool)
    active = np.flatnonzero(A.any(1))  # rows that prune something; the others change nothing
    if active.size == 0:
        return alive
    notA = ~A[active]
    for r, i in enumerate(active.tolist()):
        if alive[i]:
            np.logical_and(alive, notA[r], out=alive)  # one vector op per kept row
    return alive


def _resolve(X: torch.Tensor, S: torch.Tensor, hi: float, lo: float, t: float,
             row_ids: torch.Tensor, col_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``S > t`` decided exactly: entries within ``[lo, hi]`` (``band_bounds``) of a float32 block ``S`` (rows
    ``row_ids``, columns ``col_ids`` of ``X``) are recomputed by ``exact_similarity``. ``mask``
    (same shape, bool) restricts which uncertain entries matter (others stay False)."""
    A = S > hi
    U = (S >= lo) & (S <= hi)
    if mask is not None:
        U &= mask
    r, c = torch.nonzero(U, as_tuple=True)
    if r.numel():
        A[r, c] = exceeds(exact_similarity(X, row_ids[r], col_ids[c]), t)
    return A


def tile_rows(block_size: int, device: torch.device) -> int:
    """Rows per greedy step: ``block_size`` on a GPU; on the CPU at most ``CPU_TILE`` (smaller
    steps skip the products of pruned rows and of the lower triangle, and cost little there)."""
    return max(1, block_size if device.type == "cuda" else min(block_size, CPU_TILE))


class _ClassBlocks:
    """The similarity column blocks of one class, ``S[0:end_b, b]`` float32, computed once."""

    def __init__(self, X: torch.Tensor, tile: int, th: _Threads):
        n = X.shape[0]
        self.cols = [th.mm(X[:min(n, a + tile)], X[a:min(n, a + tile)].T) for a in range(0, n, tile)]

    @staticmethod
    def nbytes(n: int, tile: int) -> int:
        return 4 * sum(min(n, a + tile) * (min(n, a + tile) - a) for a in range(0, n, tile))


def _prune_class(X: torch.Tensor, t: float, tile: int, chunk: int, margin: float, th: _Threads,
                 cache: _ClassBlocks | None = None) -> np.ndarray:
    """Keep mask (n,) of one class whose rows ``X`` (n, D) are already in id order.

    Steps of ``tile`` rows; the kept rows of earlier steps are compared ``chunk`` at a time
    (memory: ``chunk x tile`` float32 similarities, ``chunk x D`` gathered vectors)."""
    n, dev = X.shape[0], X.device
    lo, hi = band_bounds(t, margin)
    keep = torch.zeros(n, dtype=torch.bool, device=dev)
    for bi, a in enumerate(range(0, n, tile)):
        b = min(n, a + tile)
        dom = torch.zeros(b - a, dtype=torch.bool, device=dev)
        kept = torch.nonzero(keep[:a]).flatten()
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        Xb = X[a:b]
        for c0 in range(0, kept.numel(), chunk):  # 1. dominated by kept items of earlier steps
            rows = kept[c0:c0 + chunk]
            S = cache.cols[bi].index_select(0, rows) if cache else th.mm(X.index_select(0, rows), Xb.T)  # (r, tile)
            top = S.amax(0)  # (tile,) most similar kept item of each column
            dom |= top > hi
            near = torch.nonzero((top >= lo) & ~dom).flatten()  # columns whose decision needs the exact value
            if near.numel():
                r, c = torch.nonzero(S[:, near] >= lo, as_tuple=True)
                pending.append((rows[r], near[c]))
        if pending:
            pr = torch.cat([p[0] for p in pending])
            pc = torch.cat([p[1] for p in pending])
            sel = ~dom[pc]  # only columns not already dominated for sure need the exact value
            pr, pc = pr[sel], pc[sel]
            if pr.numel():
                dom[pc[exceeds(exact_similarity(X, pr, a + pc), t)]] = True
        cand = torch.nonzero(~dom).flatten()  # 2. the greedy within the step, among the others
        if cand.numel() == 0:
            continue
        ci = a + cand
        if cache is not None:
            S = cache.cols[bi][a:b].index_select(0, cand).index_select(1, cand)
        else:
            Xc = X.index_select(0, ci)
            S = th.mm(Xc, Xc.T)  # (c, c)
        upper = torch.ones(S.shape, dtype=torch.bool, device=dev).triu_(1)
        A = _resolve(X, S, hi, lo, t, ci, ci, upper) & upper
        alive = _greedy_scan(A.cpu().numpy())
        keep[ci[torch.from_numpy(alive).to(dev)]] = True
    return keep.cpu().numpy()


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


def _prepare(vectors: Any, device: Any) -> tuple[torch.Tensor, float]:
    """The vectors as a float32 tensor on ``device``, and the rounding margin for them."""
    X = as_tensor(vectors, device)
    if X.ndim != 2:
        raise ValueError(f"vectors must be (N, D), got {tuple(X.shape)}")
    # largest squared norm, from a float32 sum (relative error <= gamma_D, hence the factor)
    max_sq = float(X.square().sum(1).max()) if X.shape[0] else 1.0
    max_sq *= 1.0 + 2 * X.shape[1] * UNIT_ROUNDOFF
    return X, similarity_margin(X.shape[1], max(max_sq, 1.0))


def _class_rows(X: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """The rows of one class (no copy when they are already all of ``X`` in order)."""
    if rows.size == X.shape[0] and (rows.size < 2 or bool((np.diff(rows) == 1).all())) and rows[0] == 0:
        return X
    return X.index_select(0, torch.from_numpy(rows).to(X.device))


def _classes(vectors: Any, labels: np.ndarray, ids: Any, device: Any) -> Iterator[tuple[np.ndarray, torch.Tensor, float]]:
    """``(rows, X_c, margin)`` of every class, rows in (class, image id) order. A gallery streamed
    from the store (``common.streaming.StoreMatrix``) is read one class at a time (memory: the
    largest class), each class with its own rounding margin (any valid margin gives the same
    decisions: it only chooses which similarities are recomputed exactly)."""
    from .streamed import is_streamed

    order, slices = class_order(labels, None if ids is None else np.asarray(ids))
    if is_streamed(vectors):
        for s, e in slices:
            rows = order[s:e]
            Xc, margin = _prepare(vectors.rows(rows), device)
            yield rows, Xc, margin
        return
    X, margin = _prepare(vectors, device)
    for s, e in slices:
        rows = order[s:e]
        yield rows, _class_rows(X, rows), margin


def prune(vectors: Any, labels: Any, ids: Any = None, threshold: float = 0.9, block_size: int = 4096,
          device: Any = None) -> np.ndarray:
    """The LUT rule (module docstring) at one threshold: keep mask (N,) bool in the input's row order.

    Args:
        vectors: (N, D) float32 L2-normalised gallery vectors (numpy or torch), or a
            ``common.streaming.StoreMatrix`` (read from the store one class at a time).
        labels: (N,) class of each row (any sortable values).
        ids: (N,) image ids giving the order within a class (None: row order).
        threshold: cosine similarity; a later item is removed when ``s > threshold``.
        block_size: rows per block (memory, see the module docstring).
        device: torch device (None: CPU).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    labels = np.asarray(labels)
    keep = np.zeros(labels.size, dtype=bool)
    dev = _device(vectors, device)
    with full_fp32():
        tile = tile_rows(block_size, dev)
        with _Threads(dev) as th:
            for rows, Xc, margin in _classes(vectors, labels, ids, dev):
                keep[rows] = _prune_class(Xc, float(threshold), tile, block_size, margin, th)
    return keep


def prune_sweep(vectors: Any, labels: Any, ids: Any, thresholds: Sequence[float], block_size: int = 4096,
                device: Any = None, cache_bytes: int = SWEEP_CACHE_BYTES) -> np.ndarray:
    """``prune`` at every threshold: keep masks (T, N) bool, each identical to ``prune`` at that
    threshold; a class's similarity blocks are computed once and reused (module docstring)."""
    labels = np.asarray(labels)
    keeps = np.zeros((len(thresholds), labels.size), dtype=bool)
    dev = _device(vectors, device)
    with full_fp32():
        tile = tile_rows(block_size, dev)
        with _Threads(dev) as th:
            for rows, Xc, margin in _classes(vectors, labels, ids, dev):
                n = rows.size
                fits = _ClassBlocks.nbytes(n, tile) <= cache_bytes
                cache = _ClassBlocks(Xc, tile, th) if fits and n > 1 else None
                for ti, t in enumerate(thresholds):
                    keeps[ti, rows] = _prune_class(Xc, float(t), tile, block_size, margin, th, cache)
                del cache, Xc
    return keeps
