"""The exact similarity ``s`` of two stored vectors, and the threads and buffers of the exact search.

Part of the reduced-precision exact search (``common.retrieval.codes``: the codes and the bound;
``common.retrieval.kernel``: top-k and best per class; ``common.retrieval.prune``: the LUT greedy).

The similarity
--------------
For two float32 vectors ``x``, ``y`` of length D (the stored vectors; a float16 store is widened to
float32 first) the similarity is

    s(x, y) = fl32(x . y)

the float32 nearest to the exact real dot product (ties to even). It depends on the two vectors
alone: not on how many rows share a matrix product, on threads, blocking, device or BLAS. Every
result of the exact search is defined on ``s`` alone, with the project's total order (similarity
descending, then row ascending), so it is identical whatever the precision, block sizes or path:

- ``kernel.topk``: the ``min(k, G)`` rows of largest ``s`` of every query (``retrieval.search.topk``);
- ``kernel.class_best``: per class the row of largest ``s``, ties to the lower row;
- ``prune.prune_class``: the LUT greedy (in id order, a kept item removes every later item with
  ``s(i, j) > t``, ``t`` a float64 compared exactly).

The LUT rule defines ``s`` as the float64 dot product rounded once to float32; the two agree
except when the float64 sum's own error (~1e-13) straddles a float32 rounding boundary, a case
this definition settles. A plain float32 matrix product can differ from ``s`` in the last bit
(its summation order depends on the shapes): that is why the results here are defined on ``s``.

Computing s (``exact_pairs``)
-----------------------------
``d`` = the float64 dot product: each ``x_k y_k`` is exact in float64 and the sum errs by at
most ``gamma64_D * sum_k |x_k y_k| <= gamma64_D |x| |y|`` in any order (``gamma64_n = n 2^-53 /
(1 - n 2^-53)``; Higham 2002, "Accuracy and Stability of Numerical Algorithms", eq. 3.5). When
``d`` plus or minus that error holds no float32 rounding boundary (the midpoint of two consecutive
float32 values), ``fl32(d) = s``. Otherwise (rare: exact midpoints, or sums within ~1e-13 of one)
``s`` is computed in Python integers: every float32 is an integer multiple of 2^-149, so
``x . y = N 2^-298`` with ``N`` an exact integer, rounded to float32 by exact comparisons.

Threads and buffers. Element-wise steps (comparisons, maxima, gathers, float64 dot products) run
on one CPU thread and the matrix products on all of torch's threads (``_threads``,
``_all_threads``); the blocks of a search run on ``_workers`` threads (``_parallel``). Gathered rows
go to buffers each thread keeps for its next search (``_scratch``): a fresh buffer of megabytes is
page-faulted in on every search.
"""
from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from typing import Any, Iterator, Sequence

import numpy as np
import torch

U32 = 2.0 ** -24  # float32 unit roundoff
U64 = 2.0 ** -53  # float64 unit roundoff
DOT_ROWS = 32  # rows converted to float64 at a time by _exact_dots off the CPU

_TL = threading.local()  # per thread: ``outer``, torch's thread count while a search runs its steps on one
_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}  # worker threads per kind and count, made once per process


def _sum_squares(x: torch.Tensor) -> torch.Tensor:
    """Float32 sums of squares of float32 rows (N,): numpy's einsum on a CPU (one pass, no (N, D)
    temporary), torch's sum elsewhere; either errs by at most ``gamma_D`` relatively in any order of
    float32 (or wider) operations (Higham eq. 3.5), plus ``D 2^-149`` for underflow."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
        xn = x.detach().numpy()
        return torch.from_numpy(np.einsum("ij,ij->i", xn, xn))
    return (x * x).sum(1, dtype=torch.float32)


def _norm_bound(ss: torch.Tensor, D: int) -> torch.Tensor:
    """Upper bounds (float64) on the norms of rows of length ``D`` whose float32 sums of squares are ``ss``
    (``_sum_squares``); the division covers the sum's error, the last factor the float64 steps."""
    return torch.sqrt(ss.double() / (1.0 - (D + 1) * U32) + D * 2.0 ** -149) * (1.0 + 4 * U32)


def _norm_up(x: torch.Tensor) -> torch.Tensor:
    """Row norms of float32 rows, as float64 rounded up (``_sum_squares``, ``_norm_bound``)."""
    return _norm_bound(_sum_squares(x), x.shape[1])



# ----------------------------------------------------------------------------- threads


def _outer(default: int) -> int:
    return getattr(_TL, "outer", 0) or default


@contextlib.contextmanager
def _threads(device: torch.device) -> Iterator[None]:
    """Element-wise steps (comparisons, maxima, gathers, float64 dot products) on one CPU thread, the
    matrix products (``_product``) on all of torch's threads: on a shared, loaded machine every
    parallel region of a small step can wait a scheduler quantum for a descheduled thread
    (the LUT greedy measured 15x on one prune; a top-10 search here 3x). ``topk`` runs its
    blocks on ``_workers`` instead, each on one thread."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1 or getattr(_TL, "outer", 0):
        yield
        return
    _TL.outer = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _TL.outer = 0


@contextlib.contextmanager
def _all_threads() -> Iterator[None]:
    """Inside ``_threads``: a matrix product on all threads again (long enough that a late thread
    costs little of it; the passes over its output measured slower on two threads here)."""
    n = getattr(_TL, "outer", 0)
    if not n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def _workers(device: torch.device) -> int:
    """Worker threads for the blocks of a search: torch's thread count on a CPU, else 1."""
    return _outer(torch.get_num_threads()) if device.type == "cpu" else 1


def _pool(n: int, kind: str = "exact_search") -> ThreadPoolExecutor:
    """The ``n`` worker threads of ``kind`` (made once per process; a task of one kind may wait on the
    futures of another kind, never of its own)."""
    pool = _POOLS.get((kind, n))
    if pool is None:
        pool = _POOLS[(kind, n)] = ThreadPoolExecutor(n, thread_name_prefix=kind, initializer=torch.set_num_threads,
                                                      initargs=(1,))
    return pool


def _in_caller_mode(fn: Any) -> Any:
    inference = torch.is_inference_mode_enabled()  # thread-local: the workers take the caller's

    def run(x: Any) -> Any:
        with torch.inference_mode(inference):
            return fn(x)
    return run


def _parallel(fn: Any, items: Sequence[Any], n: int, kind: str = "exact_search") -> list[Any]:
    """``[fn(x) for x in items]`` on ``n`` worker threads, each running torch on one thread and taking
    the next item when done with one. Rather than torch's threads inside each operation: a block's
    steps are many short operations, and on a shared machine each parallel region waits for its
    slowest thread (a descheduled one: a scheduler quantum), while a worker that is held up here
    only takes fewer items. The operations release the GIL; results come back in order. ``kind``: the
    pool (``_pool``)."""
    if n <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    return list(_pool(n, kind).map(_in_caller_mode(fn), items))


def _submit(fn: Any, items: Sequence[Any], n: int) -> list[Future]:
    """``fn(x)`` of every item started on ``n`` worker threads (as ``_parallel``), in order, without
    waiting: their futures, for a caller that uses the first results while the workers make the next
    ones. Never wait on them from a task of the same pool (its workers could all be waiting)."""
    if n <= 1:
        out = []
        for x in items:
            f: Future = Future()
            f.set_result(fn(x))
            out.append(f)
        return out
    run = _in_caller_mode(fn)
    pool = _pool(n)
    return [pool.submit(run, x) for x in items]


def _scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of ``shape`` for this thread, reused by later calls with the same ``slot`` (its contents are
    overwritten by them). A fresh allocation of megabytes is a fresh mapping, page-faulted and zeroed
    by the kernel on first touch: for the row gathers of the rescoring that costs as much as the gather
    itself (measured 2-3x a gather into a reused buffer here). Kept per thread: the workers run in parallel."""
    n = math.prod(shape)
    bufs = getattr(_TL, "bufs", None)
    if bufs is None:
        bufs = _TL.bufs = {}
    key = (slot, dtype, device)
    b = bufs.get(key)
    if b is None or b.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: written in and out of inference mode alike
            b = bufs[key] = torch.empty(n, dtype=dtype, device=device)
    return b[:n].view(shape)


def _rows(X: torch.Tensor, idx: torch.Tensor, slot: str) -> torch.Tensor:
    """``X[idx]`` (len(idx), D) into this thread's buffer ``slot`` on a CPU (``_scratch``: valid until the
    thread's next gather into that slot), a fresh tensor elsewhere."""
    if X.device.type != "cpu":
        return X.index_select(0, idx)
    return torch.index_select(X, 0, idx, out=_scratch(slot, (idx.numel(), X.shape[1]), X.dtype, X.device))



# ----------------------------------------------------------------------------- the exact similarity


def _round_f32_exact(N: int, shift: int) -> float:
    """``N / 2^shift`` rounded to the nearest float32, ties to even (exact rational arithmetic)."""
    v = Fraction(N, 1 << shift)
    f = np.float32(float(v))  # float() rounds correctly to float64; to float32 it may be one ulp off
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    best = min(cands, key=lambda c: (abs(Fraction(float(c)) - v), int(np.array(c).view(np.uint32)) & 1))
    return float(best)


def _exact_one(a: np.ndarray, b: np.ndarray) -> float:
    """``s(a, b)`` in integers: each float32 is an integer multiple of 2^-149."""
    ai = [int(v) for v in (a.astype(np.float64) * 2.0 ** 149).tolist()]
    bi = [int(v) for v in (b.astype(np.float64) * 2.0 ** 149).tolist()]
    return _round_f32_exact(sum(x * y for x, y in zip(ai, bi)), 298)


def _round_dots(d: torch.Tensor, nn: torch.Tensor, D: int, rows_of: Any) -> torch.Tensor:
    """``s`` from float64 dot products ``d`` (P,) of float32 rows, given ``nn[p] >= |x| |y|``: ``fl32(d)``
    where ``d`` plus or minus its error (``gamma64_D nn``, doubled to cover the rounding of ``d -+ err``)
    holds no float32 rounding boundary; the rest in integers (``_exact_one(*rows_of(p))``)."""
    err = 2 * D * U64 / (1.0 - D * U64) * nn + 2.0 ** -52 * d.abs() + 2.0 ** -1000
    f = d.to(torch.float32)
    below = (f.double() + torch.nextafter(f, torch.full_like(f, -math.inf)).double()) / 2
    above = (f.double() + torch.nextafter(f, torch.full_like(f, math.inf)).double()) / 2
    for p in torch.nonzero(~((d - err > below) & (d + err < above))).flatten().tolist():
        f[p] = _exact_one(*rows_of(p))  # the sum may straddle a rounding boundary: integers decide
    return f


def _exact_dots(x: torch.Tensor, y: torch.Tensor, nn: torch.Tensor) -> torch.Tensor:
    """``s(x[p], y[p])`` of float32 rows (P, D), given ``nn[p] >= |x[p]| |y[p]|`` (float64). (The float64
    work stays in cache: numpy's buffered casts, or ``DOT_ROWS`` rows at a time.)"""
    if x.device.type == "cpu":
        d = torch.from_numpy(np.einsum("ij,ij->i", x.numpy(), y.numpy(), dtype=np.float64))
    else:
        d = torch.cat([torch.linalg.vecdot(x[a:a + DOT_ROWS].double(), y[a:a + DOT_ROWS].double())
                       for a in range(0, x.shape[0], DOT_ROWS)] or [torch.zeros(0, dtype=torch.float64)])
    return _round_dots(d, nn, x.shape[1], lambda p: (x[p].cpu().numpy(), y[p].cpu().numpy()))


def _exact_grouped(x: torch.Tensor, Y: torch.Tensor, gi: torch.Tensor, ps: torch.Tensor,
                   nn: torch.Tensor) -> torch.Tensor:
    """``s(x[gi[p]], Y[gi[p], ps[p]])`` for rows gathered by ``_gathered`` (x (U, D), Y (U, m, D)), without
    copying them pair by pair: every padded entry is computed, for lists that are all wanted."""
    if x.device.type == "cpu":
        d = torch.from_numpy(np.einsum("umd,ud->um", Y.numpy(), x.numpy(), dtype=np.float64))[gi, ps]
    else:
        d = torch.bmm(Y.double(), x.double().unsqueeze(2)).squeeze(2)[gi, ps]
    return _round_dots(d, nn, x.shape[1], lambda p: (x[gi[p]].cpu().numpy(), Y[gi[p], ps[p]].cpu().numpy()))


def _dots64(x: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Float64 dot products of ``x`` (U, D) with each of ``Y[u]`` (U, m, D): (U, m), from float32 rows
    (each product exact in float64; the sum errs by at most ``gamma64_D |x| |y|``)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.einsum("umd,ud->um", Y.numpy(), x.numpy(), dtype=np.float64))
    return torch.bmm(Y.double(), x.double().unsqueeze(2)).squeeze(2)


def _dots32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Float32 dot products of the rows of ``x`` and ``y`` (P, D): (P,), in some order of float32 (or
    wider) operations, so within ``gamma_D |x| |y|`` of the exact value (numpy's einsum: one pass, no
    (P, D) temporary, twice as fast as ``torch.linalg.vecdot`` on a CPU)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.einsum("pd,pd->p", x.numpy(), y.numpy()))
    return torch.linalg.vecdot(x, y)


def _exact_rows(x: torch.Tensor, Y: torch.Tensor, nn: torch.Tensor) -> torch.Tensor:
    """``s(x[u], Y[u, j])`` (U, m) float32 (``_round_dots``), given ``nn >= |x| |y|`` (U, m)."""
    d = _dots64(x, Y)
    U, m = d.shape
    s = _round_dots(d.flatten(), nn.flatten(), x.shape[1],
                    lambda p: (x[p // m].cpu().numpy(), Y[p // m, p % m].cpu().numpy()))
    return s.view(U, m)

