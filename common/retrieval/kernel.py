"""Exact similarity search whose candidates come from a reduced-precision product (bf16 or int8).

The similarity
--------------
For two float32 vectors ``x``, ``y`` of length D (the stored vectors; a float16 store is widened to
float32 first) the similarity is

    s(x, y) = fl32(x . y)

the float32 nearest to the exact real dot product (ties to even). It depends on the two vectors
alone: not on how many rows share a matrix product, on threads, blocking, device or BLAS. Every
result of this module is defined on ``s`` alone, with the project's total order (similarity
descending, then row ascending), so it is identical whatever the precision, block sizes or path:

- ``topk``: the ``min(k, G)`` rows of largest ``s`` of every query (``common.retrieval.topk``'s order);
- ``class_best``: per class the row of largest ``s``, ties to the lower row
  (``common.inference.search_classes``);
- ``prune_class``: the LUT greedy of ``common.lut`` (in id order, a kept item removes every later
  item with ``s(i, j) > t``, ``t`` a float64 compared exactly).

``common.lut`` defines ``s`` as the float64 dot product rounded once to float32; the two agree
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

The bound (why the candidates hold the answer)
----------------------------------------------
For a vector ``x``, its code ``x~``: ``bf16``: each coordinate rounded to the nearest bfloat16;
``int8``: ``x~ = c a`` with integers ``a_k`` in
[-127, 127] and a float32 scale ``c = max_k |x_k| / 127``; ``fp32``: ``x~ = x``. At quantisation
three numbers per row are computed and rounded up: ``n_x >= |x|``, ``e_x >= |x - x~|`` (Euclidean
norms from float32 sums of squares, widened by their worst-case error; the bf16 residual is exact in
float32, the int8 one is widened by its rounding) and ``m_x = n_x + e_x >= |x~|``.

The product gives ``A(q, g)`` for every pair: ``fp32`` / ``bf16``: the matrix product of the
codes accumulated in float32 (``bf16``: then rounded to nearest bfloat16, as every torch CPU and
CUDA kernel does); ``int8``: the exact integer product ``N`` of the codes, times ``c_q c_g`` in
float32. With ``u = 2^-24``, ``gamma_D = D u / (1 - D u)`` (0 for int8), ``tau = D 2^-125 (1 + m_q + m_g)``,
``rho = 2^-8 / (1 - 2^-8)`` (bf16), ``4u`` (int8), 0 (fp32), and

    E(q, g) = n_q e_g + e_q m_g + gamma_D m_q m_g + u n_q n_g + tau,

**claim**: ``|s(q, g) - A(q, g)| <= E(q, g) + rho |A(q, g)|``.

*Proof.* Let ``x = q . g``, ``x~ = q~ . g~`` (exact reals) and ``a`` the product's value before
its output rounding (the float32 accumulation; int8: ``c_q c_g N`` exactly). Then

1. ``|s - x| <= u |x| <= u |q| |g| <= u n_q n_g``  (rounding to nearest float32; Cauchy-Schwarz);
2. ``x - x~ = q . (g - g~) + (q - q~) . g~``, so ``|x - x~| <= |q| |g - g~| + |q - q~| |g~| <= n_q e_g + e_q m_g``
   (Cauchy-Schwarz twice);
3. ``|a - x~| <= gamma_D sum_k |q~_k g~_k| + tau <= gamma_D m_q m_g + tau``: D float32 operations
   on the products in any order, fused or not (Higham eq. 3.5); bf16 x bf16 products are exact in
   float32, so the bf16 product is this sum of exact terms; ``tau`` covers underflow: at most 2^-126
   per operation with flush-to-zero, and a kernel that reads subnormal inputs as zero changes a term
   ``q~_k g~_k`` by at most ``2^-126 (|q~_k| + |g~_k|)``. int8: ``N`` is exact (``|N| <= 127^2 D < 2^31``), ``a = x~``;
4. bf16: ``|A - a| <= 2^-8 |a|`` and ``|a| <= |A| / (1 - 2^-8)``, so ``|A - a| <= rho |A|``;
   int8: ``A`` rounds ``a`` at most three times (``N`` to float32, ``c_q c_g``, the product):
   ``|A - a| <= ((1 + u)^3 - 1) |a| <= 4u |A|``; fp32: ``A = a``.

The triangle inequality over 1-4 gives the claim. []

So with ``lower(A) = A - E - rho |A|`` and ``upper(A) = A + E + rho |A|``, both strictly increasing
in ``A`` (``rho < 1``): ``lower(A(q, g)) <= s(q, g) <= upper(A(q, g))``. Here ``E`` is taken per query
with the gallery's maxima of ``e_g``, ``m_g``, ``n_g`` (one number per query, never smaller).

- **Top-k.** Let ``A_k`` be the k-th largest ``A(q, .)`` and ``T`` the k-th largest ``s(q, .)``. The k rows
  of largest ``A`` have ``s >= lower(A) >= lower(A_k)``, so ``T >= lower(A_k)``. A row with
  ``upper(A) < lower(A_k)`` has ``s < T``: strictly below the k-th best, it is in no top-k under any
  tie rule. So the rows with ``A >= theta = upper^-1(lower(A_k))`` hold the whole top-k; their ``s``
  are computed exactly and ordered, and the answer is the top-k of ``s``. (Blocked: ``A_k`` over
  the blocks seen so far is at most the final one, so the running ``theta`` only rises and the
  rows kept on the way are a superset; the final ``theta`` filters them.)
- **Best per class**: the same with k = 1 within each class.
- **Pruning**: ``A > lower^-1(t)`` gives ``s > t``; ``A < upper^-1(t)`` gives ``s < t``; only pairs
  with ``A`` in between need ``s``.

``theta`` and the band ends are computed in float64 (a few operations on numbers below 2^7: error
below 2^-44), moved outwards by ``2^-40 (1 + |value|)`` and rounded outwards to the dtype ``A`` is
compared in, so the comparisons only ever admit more candidates.

Rescoring. The candidates of a query are whatever its window holds (a handful on spread-out
data, more where many items crowd the k-th similarity). Round 1: each query's k candidates of
largest ``A`` get their exact ``s``; the k-th largest of those, ``F``, is a lower bound on the k-th
best ``s`` (k rows reach it), so round 2 keeps only the other candidates with ``upper(A) >= F``
(a window about half as wide: ``F`` is close to the k-th best itself). Round 2 first computes
float32 dot products of the gathered rows, bounded like step 1 and 3 of the proof with
``x~ = x`` (``|s - d| <= (gamma_D + u) n_q n_g + tau``, ~2.4e-4 at D = 2048), and computes ``s``
only for the rows whose upper bound still reaches the k-th largest lower bound. (Best per class:
the same with k = 1 per query and class.)

Fallback. A query whose candidates exceed ``max_candidates`` is searched again with
``precision="fp32"`` (window ~``2 gamma_D``), whose candidates are not capped: still identical,
only slower for that query.

Speed. The products are blocked (``query_block`` queries x ``block_rows`` gallery rows) and each
block is read once more, for the maxima of groups of ``GROUP`` columns; the k largest group maxima
are k distinct entries, so with the running k best they bound the k-th largest ``A`` from below
and give ``theta`` before the block's entries are looked at; only groups whose maximum reaches
``theta`` are compared. The running k best are merged from those entries (FAISS keeps a heap per
query in the same way). On a CPU with AMX or AVX512-BF16 oneDNN's bf16 product runs several times
faster than float32; ``precision="auto"`` times one small product of each kind once per process
and logs the choice (``choose_precision``). The products run on all of torch's threads, every
other step on one (``_threads``). Float32 products are computed at full precision (no TF32 / bf16
shortcut), which the bound assumes. The products of a span and the rescoring's gathered rows go to
buffers each thread keeps for its next search (``_scratch``: at most ``SCAN_BYTES`` plus a few MiB;
a fresh buffer of that size is page-faulted in on every search), and the rows are gathered
``DOT_ELEMENTS`` at a time so that they are still in cache when their dot products are taken.

Inputs: numpy arrays or torch tensors (computation on the gallery's device); outputs: numpy.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..runtime.device import cpu_flags, full_fp32
from .exact import as_tensor

log = logging.getLogger(__name__)


__all__ = ["PRECISIONS", "Codes", "quantize", "choose_precision", "matmul_flags", "exact_pairs", "topk", "class_best",
           "topk_blocks", "class_best_blocks", "prune_class"]

PRECISIONS = ("auto", "fp32", "bf16", "int8")
U32 = 2.0 ** -24  # float32 unit roundoff
U64 = 2.0 ** -53  # float64 unit roundoff
RHO = {"fp32": 0.0, "bf16": 2.0 ** -8 / (1 - 2.0 ** -8), "int8": 4 * U32}  # relative error of A's output rounding
SAFE = 2.0 ** -40  # float64 slack on computed thresholds (their own rounding is below 2^-44)
BF16_MAX = 3.3e38  # coordinates at or above this would round to an infinite bfloat16
QUERY_BLOCK = 4096  # queries per product block (fewer passes over the gallery; AMX runs best on tall blocks)
GROUP = 128  # columns per maximum in the first pass over a block of products (_group_max)
BLOCK_ROWS = 2048  # gallery rows per product block (QUERY_BLOCK x BLOCK_ROWS bf16 = 16 MiB of output, in L3)
MIN_CANDIDATES = 256  # a query may rescore at least this many candidates before it falls back to fp32
DOT_ROWS = 32  # rows converted to float64 at a time by _exact_dots off the CPU
SCAN_BYTES = 320 * 2**20  # products kept at a time by topk's scan (4096 queries x 33,000 rows of bf16: 270 MB)
RESCORE_QUERIES = 256  # queries rescored per work item (fewer, larger steps: -12% CPU time against 64)
DOT_ELEMENTS = 1 << 18  # vector elements gathered at a time for dot products (1 MiB of float32: in L2)
PAIR_CHUNK = 1 << 20  # vector elements gathered at a time when rescoring (4 MiB of float32)
PRUNE_TILE = 512  # rows per greedy step of prune_class (lut.CPU_TILE: the fastest on a CPU)
PRUNE_CACHE_BYTES = 2 * 2**30  # prune_class keeps a class's product blocks up to this size for several thresholds
AUTO_GAIN = 1.5  # auto: a reduced precision is used when its product is at least this much faster than fp32
_CHOICE: dict[tuple[str, int], str] = {}  # precision chosen per (device type, dimension), once per process


# ----------------------------------------------------------------------------- codes


@dataclass(frozen=True)
class Codes:
    """Rows ready for search: the float32 rows, their reduced-precision codes and per-row bounds.

    ``X`` (N, D) float32; ``low``: the codes (``X`` itself for fp32, bfloat16, or int8); ``scale``
    (N,) float32 for int8 (else None); ``norm`` >= |x|, ``lnorm`` >= |x~|, ``resid`` >= |x - x~|,
    each (N,) float64 (module docstring). Made by ``quantize``; reusable for any number of searches.
    """

    precision: str
    X: torch.Tensor
    low: torch.Tensor
    scale: torch.Tensor | None
    norm: torch.Tensor
    lnorm: torch.Tensor
    resid: torch.Tensor

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])

    def take(self, rows: Any) -> "Codes":
        """The codes of ``rows`` (indices or a bool mask), in that order; nothing is recomputed."""
        r = torch.as_tensor(np.asarray(rows) if not isinstance(rows, torch.Tensor) else rows, device=self.X.device)
        if r.dtype == torch.bool:
            r = torch.nonzero(r).flatten()
        X, low, norm, lnorm, resid = (t.index_select(0, r) for t in (self.X, self.low, self.norm, self.lnorm,
                                                                       self.resid))
        scale = None if self.scale is None else self.scale.index_select(0, r)
        return Codes(self.precision, X, low, scale, norm, lnorm, resid)

    def as_fp32(self) -> "Codes":
        """The same rows searched at float32 (the fallback): codes = rows, no residual."""
        if self.precision == "fp32":
            return self
        return Codes("fp32", self.X, self.X, None, self.norm, self.norm, torch.zeros_like(self.norm))


def _norm_up(x: torch.Tensor) -> torch.Tensor:
    """Row norms of float32 rows, as float64 rounded up. The float32 sum of squares errs by at most
    ``gamma_D`` relatively in any order (Higham eq. 3.5), plus ``D 2^-149`` for underflow."""
    D = x.shape[1]
    ss = (x * x).sum(1, dtype=torch.float32).double()
    return torch.sqrt(ss / (1.0 - (D + 1) * U32) + D * 2.0 ** -149) * (1.0 + 4 * U32)


def _code_rows(X: torch.Tensor, precision: str, low: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor,
                                                                             torch.Tensor]:
    """Codes of a few rows written into ``low``; returns ``(scale, norm, resid)`` (module docstring)."""
    norm = _norm_up(X)
    if precision == "bf16":
        low.copy_(X)  # rounds to nearest bfloat16
        return None, norm, _norm_up(X - low.float())  # exact in float32: x and its rounding are within 2x (Sterbenz)
    amax = X.abs().amax(1) if X.shape[1] else torch.zeros(X.shape[0], device=X.device)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    low.copy_(torch.round(X / scale[:, None]).clamp_(-127, 127))
    # x - c a in float32: c a and the difference are each rounded (relative u), so per coordinate
    # |x - c a| <= (1 + u) |r| + u |c a|, and |c a| <= |x| + |x - c a|
    r = _norm_up(X - low.float() * scale[:, None])
    return scale, norm, ((1 + U32) * r + U32 * norm) / (1 - U32) * (1 + 4 * U64)


def quantize(X: Any, precision: str = "auto", device: Any = None) -> Codes:
    """``Codes`` of the rows of ``X`` (N, D) (numpy or torch; float16 is widened exactly).

    ``precision``: ``fp32``, ``bf16``, ``int8`` or ``auto`` (``choose_precision``). Raises
    ``ValueError`` for a non-finite value or a shape other than (N, D). ``lnorm`` is taken as
    ``norm + resid`` (triangle inequality: |x~| <= |x| + |x - x~|)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    X = as_tensor(X, device)
    if X.ndim != 2:
        raise ValueError(f"expected an (N, D) matrix, got shape {tuple(X.shape)}")
    lo, hi = (float(v) for v in torch.aminmax(X)) if X.numel() else (0.0, 0.0)  # nan propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("vectors hold a non-finite value (inf or nan)")
    if precision == "bf16" and max(-lo, hi) >= BF16_MAX:
        raise ValueError("vectors too large for bfloat16 codes: use precision fp32")
    if precision == "auto":
        precision = choose_precision(X.shape[1], X.device)
    N = X.shape[0]
    step = max(1, PAIR_CHUNK // max(1, X.shape[1]))  # rows at a time: the temporaries stay in cache
    norm, resid = (torch.empty(N, dtype=torch.float64, device=X.device) for _ in range(2))
    if precision == "fp32":
        def norms(a: int) -> None:
            norm[a:a + step] = _norm_up(X[a:a + step])
        with _threads(X.device):
            _parallel(norms, range(0, N, step), _workers(X.device))
        return Codes("fp32", X, X, None, norm, norm, torch.zeros_like(norm))
    low = torch.empty(X.shape, dtype=torch.bfloat16 if precision == "bf16" else torch.int8, device=X.device)
    scale = torch.empty(N, device=X.device) if precision == "int8" else None

    def code(a: int) -> None:  # the codes of rows a:a + step, into disjoint slices (on the workers)
        sc, norm[a:a + step], resid[a:a + step] = _code_rows(X[a:a + step], precision, low[a:a + step])
        if scale is not None:
            scale[a:a + step] = sc
    with _threads(X.device):
        _parallel(code, range(0, N, step), _workers(X.device))
    return Codes(precision, X, low, scale, norm, norm + resid, resid)


# ----------------------------------------------------------------------------- the products


_TL = threading.local()  # per thread: ``outer``, torch's thread count while a search runs its steps on one
_POOLS: dict[int, ThreadPoolExecutor] = {}  # worker threads per count, made once per process


def _outer(default: int) -> int:
    return getattr(_TL, "outer", 0) or default


@contextlib.contextmanager
def _threads(device: torch.device) -> Iterator[None]:
    """Element-wise steps (comparisons, maxima, gathers, float64 dot products) on one CPU thread, the
    matrix products (``_product``) on all of torch's threads: on a shared, loaded machine every
    parallel region of a small step can wait a scheduler quantum for a descheduled thread
    (``common.lut._Threads`` measured 15x on one prune; a top-10 search here 3x). ``topk`` runs its
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


def _parallel(fn: Any, items: Sequence[Any], n: int) -> list[Any]:
    """``[fn(x) for x in items]`` on ``n`` worker threads, each running torch on one thread and taking
    the next item when done with one. Rather than torch's threads inside each operation: a block's
    steps are many short operations, and on a shared machine each parallel region waits for its
    slowest thread (a descheduled one: a scheduler quantum), while a worker that is held up here
    only takes fewer items. The operations release the GIL; results come back in order."""
    if n <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    pool = _POOLS.get(n)
    if pool is None:
        pool = _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="exact_search", initializer=torch.set_num_threads,
                                              initargs=(1,))
    inference = torch.is_inference_mode_enabled()  # thread-local: the workers take the caller's

    def run(x: Any) -> Any:
        with torch.inference_mode(inference):
            return fn(x)
    return list(pool.map(run, items))


def _mm(ql: torch.Tensor, qs: torch.Tensor | None, gl: torch.Tensor, gs: torch.Tensor | None) -> torch.Tensor:
    """``A`` of code rows ``ql`` against code rows ``gl`` (scales ``qs``, ``gs`` for int8), on all threads."""
    with _all_threads():
        if qs is not None:
            n = torch._int_mm(ql, gl.t())  # exact int32 (VNNI / AMX through oneDNN)
            return n.to(torch.float32).mul_(qs[:, None]).mul_(gs[None, :])
        return torch.nn.functional.linear(ql, gl)  # q g^T; oneDNN's path, faster than mm here


def _product(q: Codes, g: Codes, g0: int, g1: int) -> torch.Tensor:
    """``A`` (len(q), g1 - g0) of the queries against gallery rows ``g0:g1`` (float32 or bfloat16)."""
    return _mm(q.low, q.scale, g.low[g0:g1], None if g.scale is None else g.scale[g0:g1])


def _query_codes(queries: torch.Tensor, g: Codes) -> Codes:
    return quantize(queries, g.precision)


def _error_terms(q: Codes, g: Codes) -> torch.Tensor:
    """``E`` per query (float64, (len(q),)) against every row of ``g`` (module docstring)."""
    D = q.dim
    gamma = 0.0 if g.precision == "int8" else D * U32 / (1.0 - D * U32)
    if len(g) == 0:
        return torch.zeros(len(q), dtype=torch.float64, device=q.X.device)
    ne, mm, nn = float(g.resid.max()), float(g.lnorm.max()), float(g.norm.max())
    E = q.norm * ne + q.resid * mm + gamma * q.lnorm * mm + U32 * q.norm * nn + D * 2.0 ** -125 * (1 + q.lnorm + mm)
    return E * (1.0 + 8 * U64)


def _upper_inv(y: torch.Tensor, E: torch.Tensor, rho: float) -> torch.Tensor:
    """The smallest ``A`` with ``A + E + rho |A| >= y`` (float64)."""
    z = y - E
    return torch.where(z >= 0, z / (1.0 + rho), z / (1.0 - rho))


def _lower_inv(y: torch.Tensor, E: torch.Tensor, rho: float) -> torch.Tensor:
    """The largest ``A`` with ``A - E - rho |A| <= y`` (float64)."""
    z = y + E
    return torch.where(z >= 0, z / (1.0 - rho), z / (1.0 + rho))


def _lower(A: torch.Tensor, E: torch.Tensor, rho: float) -> torch.Tensor:
    """``A - E - rho |A|`` (float64); -inf (no k-th value yet) stays -inf."""
    return torch.where(torch.isinf(A), A, A - E - rho * A.abs())


def _round_out(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``x`` (float64) moved outwards by ``SAFE (1 + |x|)`` and rounded outwards to ``dtype``."""
    x = x + (SAFE if up else -SAFE) * (1.0 + x.abs().nan_to_num(0.0, 0.0, 0.0))
    y = x.to(dtype)
    inf = torch.full_like(y, math.inf if up else -math.inf)
    wrong = (y.double() < x) if up else (y.double() > x)
    return torch.where(wrong, torch.nextafter(y, inf), y)


def _candidate_threshold(kth: torch.Tensor, E: torch.Tensor, rho: float) -> torch.Tensor:
    """``theta`` (float32, rounded down) per query from the k-th largest ``A`` seen so far."""
    return _round_out(_upper_inv(_lower(kth.double(), E, rho), E, rho), torch.float32, up=False)


def choose_precision(dim: int, device: Any = "cpu") -> str:
    """``auto``: bf16 when its product is ``AUTO_GAIN`` times faster than float32 on this machine, else
    int8 when it is, else fp32 (measured once per process on one (256 x dim) x (dim x 2048) product
    of each kind; the choice and the timings are logged). bf16 comes first: its bound is 2^-8
    relative per coordinate whatever the vector, while int8's step is set by each vector's largest
    coordinate, which on embeddings gives a window several times wider (more candidates to rescore)."""
    dev = torch.device(device)
    key = (dev.type, int(dim))
    if key in _CHOICE:
        return _CHOICE[key]
    gen = torch.Generator().manual_seed(0)
    X = torch.nn.functional.normalize(torch.randn(2048 + 256, max(dim, 1), generator=gen), dim=1).to(dev)
    times = {}
    with full_fp32():
        for kind in ("fp32", "bf16", "int8"):
            try:
                c = quantize(X, kind)
                q, g = c.take(torch.arange(256)), c.take(torch.arange(256, 2048 + 256))
                _product(q, g, 0, len(g))  # warm-up: first-call set-up is not the kind's cost
                best = math.inf
                for _ in range(3):
                    t0 = time.perf_counter()
                    _product(q, g, 0, len(g))
                    best = min(best, time.perf_counter() - t0)
                times[kind] = best
            except (RuntimeError, NotImplementedError) as e:  # a kind this build or device lacks
                log.debug("precision %s unavailable: %s", kind, e)
    fast = [k for k in ("bf16", "int8") if k in times and times[k] * AUTO_GAIN <= times["fp32"]]
    choice = fast[0] if fast else "fp32"
    _CHOICE[key] = choice
    log.info("exact search precision %s (one 256 x 2048 x %d product: %s; CPU flags: %s)", choice, dim,
             ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in times.items()), " ".join(matmul_flags()) or "unknown")
    return choice


def matmul_flags() -> list[str]:
    """The CPU's matrix-product flags (AVX-512, VNNI, BF16, AMX), sorted (empty where unknown)."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx_vnni")))


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


def exact_pairs(X: Any, rows: Any, Y: Any, cols: Any, nn: torch.Tensor | None = None) -> torch.Tensor:
    """``s(X[rows[p]], Y[cols[p]])`` for every p: float32 (P,), the similarity of the module docstring.
    ``nn`` (P,) float64, optional: bounds ``>= |x| |y|`` of the pairs (else computed)."""
    X = as_tensor(X)
    Y = as_tensor(Y, X.device)
    rows = torch.as_tensor(rows, dtype=torch.int64, device=X.device).flatten()
    cols = torch.as_tensor(cols, dtype=torch.int64, device=X.device).flatten()
    out = torch.empty(rows.numel(), dtype=torch.float32, device=X.device)
    step = max(1, PAIR_CHUNK // max(1, X.shape[1]))
    for a in range(0, rows.numel(), step):
        x, y = X.index_select(0, rows[a:a + step]), Y.index_select(0, cols[a:a + step])
        out[a:a + step] = _exact_dots(x, y, _norm_up(x) * _norm_up(y) if nn is None else nn[a:a + step])
    return out


def _gathered(q: Codes, g: Codes, r: torch.Tensor, c: torch.Tensor,
              dots: bool = True) -> Iterator[tuple[slice, torch.Tensor, ...]]:
    """Pairs ``(r, c)`` grouped by ``r``, a chunk of whole rows at a time: ``(pairs, x (U, D), Y (U, m, D),
    gi, pos, d)``: the chunk's distinct query rows, their gallery rows gathered once and padded to the
    longest list (``Y[gi, pos]`` is pair p's row), and (``dots``) the float32 dot products ``d`` of the
    pairs (error at most ``gamma_D |x| |y|``). At most ``PAIR_CHUNK`` gathered elements per chunk."""
    P, D, dev = r.numel(), q.dim, q.X.device
    if P == 0:
        return
    u, cnt = torch.unique_consecutive(r, return_counts=True)
    gid = torch.repeat_interleave(torch.arange(u.numel(), device=dev), cnt)
    pos = torch.arange(P, device=dev) - (torch.cumsum(cnt, 0) - cnt)[gid]
    cl = cnt.tolist()
    ends = np.cumsum(cl).tolist()
    g0 = 0
    while g0 < len(cl):
        g1, m = g0 + 1, cl[g0]
        while g1 < len(cl) and (g1 + 1 - g0) * max(m, cl[g1]) * D <= PAIR_CHUNK:
            m, g1 = max(m, cl[g1]), g1 + 1
        sl = slice(ends[g0] - cl[g0], ends[g1 - 1])
        gi, ps = gid[sl] - g0, pos[sl]
        pad = c[sl.start].repeat((g1 - g0) * m).view(g1 - g0, m)  # padding: any valid row
        pad[gi, ps] = c[sl]
        Y = g.X.index_select(0, pad.flatten()).view(g1 - g0, m, D)
        x = q.X.index_select(0, u[g0:g1])
        d = torch.bmm(Y, x.unsqueeze(2)).squeeze(2)[gi, ps] if dots else None  # (pairs,) float32
        yield sl, x, Y, gi, ps, d
        g0 = g1


def _by_list_length(r: torch.Tensor) -> torch.Tensor:
    """A permutation of pairs that keeps each row's pairs together, rows ordered by how many they have
    (so a chunk of ``_gathered`` pads little)."""
    n = torch.bincount(r)
    return torch.argsort(n[r] * (int(r.max()) + 1) + r, stable=True)


def _f32_error(q: Codes, g: Codes, r: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """A bound on ``|s - d|`` for float32 dot products ``d`` of pairs ``(r, c)``: ``(gamma_D + u) |q| |g| + tau``
    (steps 1 and 3 of the proof with ``q~ = q``), widened by the float64 rounding of ``d -+ bound``."""
    D = q.dim
    e = (D * U32 / (1.0 - D * U32) + U32) * q.norm[r] * g.norm[c] * (1.0 + 8 * U64)
    e = e + D * 2.0 ** -125 * (1 + q.norm[r] + g.norm[c])
    return e + 2.0 ** -50 * (d.abs() + e)


def _kth_largest(key: torch.Tensor, v: torch.Tensor, n_keys: int, k: int) -> torch.Tensor:
    """The k-th largest ``v`` of each key (n_keys,), -inf for a key with fewer than k values."""
    out = torch.full((n_keys,), -math.inf, dtype=v.dtype, device=v.device)
    if k == 1:
        return out.scatter_reduce_(0, key, v, "amax")
    p = torch.argsort(v, descending=True, stable=True)
    p = p[torch.argsort(key[p], stable=True)]
    sel = _rank_in_row(key[p], n_keys) == k - 1
    out[key[p][sel]] = v[p][sel]
    return out


def _rescore(q: Codes, g: Codes, r: torch.Tensor, c: torch.Tensor, key: torch.Tensor, n_keys: int, k: int,
             floor: torch.Tensor, stats: dict) -> tuple[torch.Tensor, ...]:
    """Of the candidate pairs ``(r, c)``, those that can still be in the top-k of their ``key`` (a key
    never spans two queries) after float32 dot products, with their exact ``s``: ``(r, c, s, key)``.

    Bounds ``lo <= s <= hi`` per pair: the k pairs of a key with the largest ``lo`` have ``s`` at least
    the k-th largest ``lo``, so the key's k-th best ``s`` is at least that, and at least ``floor[key]``
    (a bound from elsewhere); a pair with ``hi`` below both is out. The float32 window (~2.4e-4 at
    D = 2048) leaves few pairs for float64, whose rows come from the chunk already gathered."""
    p = _by_list_length(r) if r.numel() else r
    r, c, key = r[p], c[p], key[p]
    keep = torch.zeros(r.numel(), dtype=torch.bool, device=r.device)
    s = torch.empty(r.numel(), dtype=torch.float32, device=r.device)
    for sl, x, Y, gi, ps, d in _gathered(q, g, r, c):
        d = d.double()
        e = _f32_error(q, g, r[sl], c[sl], d)
        ks = key[sl]
        ok = torch.nonzero(d + e >= torch.maximum(_kth_largest(ks, d - e, n_keys, k), floor)[ks]).flatten()
        keep[sl.start + ok] = True
        s[sl.start + ok] = _exact_dots(x[gi[ok]], Y[gi[ok], ps[ok]], q.norm[r[sl][ok]] * g.norm[c[sl][ok]])
    stats["float32_pairs"] = stats.get("float32_pairs", 0) + int(r.numel())
    return r[keep], c[keep], s[keep], key[keep]


def _exact_top(q: Codes, g: Codes, r: torch.Tensor, c: torch.Tensor, v: torch.Tensor, key: torch.Tensor,
               n_keys: int, k: int, E_key: torch.Tensor, stats: dict) -> tuple[torch.Tensor, ...]:
    """Exact ``s`` for enough of the candidates ``(r, c)`` (product values ``v``, grouped by ``key``)
    to hold every key's top-k: ``(r, c, s, key)``.

    Round 1: each key's k candidates of largest ``A`` get ``s``; their k-th largest, ``F``, is a lower
    bound on the key's k-th best ``s``. Round 2: of the other candidates, only those with
    ``upper(A) >= F`` can still enter (``_rescore``). ``F`` is about the k-th best ``s`` itself, so this
    window is about half the candidate window ``2E``."""
    p = _order_rows(key, v, c)
    r, c, v, key = r[p], c[p], v[p], key[p]
    first = _rank_in_row(key, n_keys) < k
    r1, c1 = r[first], c[first]  # sorted by query: each query row is gathered once
    s1 = torch.empty(r1.numel(), dtype=torch.float32, device=r.device)
    for sl, x, Y, gi, ps, _ in _gathered(q, g, r1, c1, dots=False):
        s1[sl] = _exact_grouped(x, Y, gi, ps, q.norm[r1[sl]] * g.norm[c1[sl]])
    floor = _kth_largest(key[first], s1.double(), n_keys, k)
    theta = _round_out(_upper_inv(floor, E_key, RHO[g.precision]), torch.float32, up=False)
    rest = torch.nonzero(~first & (v >= theta[key])).flatten()
    r2, c2, s2, k2 = _rescore(q, g, r[rest], c[rest], key[rest], n_keys, k, floor, stats)
    stats["candidates"] = stats.get("candidates", 0) + int(r.numel())
    stats["exact_pairs"] = stats.get("exact_pairs", 0) + int(first.sum()) + int(r2.numel())
    return torch.cat([r[first], r2]), torch.cat([c[first], c2]), torch.cat([s1, s2]), torch.cat([key[first], k2])


def _order_rows(r: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Permutation sorting pairs by (row ascending, similarity descending, column ascending)."""
    p = torch.argsort(c, stable=True)
    p = p[torch.argsort(s[p], descending=True, stable=True)]
    return p[torch.argsort(r[p], stable=True)]


def _rank_in_row(r_sorted: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Position of each entry within its row, for entries sorted by row."""
    counts = torch.bincount(r_sorted, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(r_sorted.numel(), device=r_sorted.device) - starts[r_sorted]


_KEYS = {torch.bfloat16: (torch.int16, -128), torch.float32: (torch.int32, -(1 << 23))}  # int view, -inf's bits


def _group_max(A: torch.Tensor, group: int) -> torch.Tensor:
    """Maxima of consecutive groups of ``group`` columns of ``A`` (B, w), the last group possibly
    shorter: (B, ceil(w / group)) in ``A``'s dtype, except that a group of negative entries only
    gets -inf (a lower bound on its maximum: ``_hits`` and the k-th largest stay valid). One pass
    over ``A``, on the integers of the same bits: a non-negative float's bits order like its value
    and a negative float's bits are negative integers, so the integer maximum of a group is its
    float maximum whenever that is >= +0 (several times faster than a float maximum of bfloat16)."""
    B, w = A.shape
    kt, ninf = _KEYS[A.dtype]
    K = A.view(kt)
    n = w // group * group
    parts = [K[:, :n].view(B, n // group, group).amax(2)] if n else []
    if n < w:
        parts.append(K[:, n:].amax(1, keepdim=True))
    km = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    return km.masked_fill_(km < 0, ninf).view(A.dtype)


def _hits(A: torch.Tensor, gm: torch.Tensor, group: int, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(rows, cols)``, sorted by row, of the entries of ``A`` at or above their row's
    ``theta`` (float32; +inf: none), given the group maxima ``gm`` (``_group_max``): only the groups
    whose maximum reaches ``theta`` are compared (a few per row, once its neighbours have been met);
    every group of a row whose ``theta`` is <= 0 (``gm`` gives negative groups -inf)."""
    t = _round_out(theta.double(), A.dtype, up=False)  # exact comparisons in A's dtype
    gr, gg = torch.nonzero((gm >= t[:, None]) | (t <= 0)[:, None], as_tuple=True)
    if 4 * gr.numel() > gm.numel():  # most groups: compare the block directly
        return torch.nonzero(A >= t[:, None], as_tuple=True)
    B, w = A.shape
    full = w // group
    inner = gg < full
    r1, g1 = gr[inner], gg[inner]
    h, j = torch.nonzero(A[:, :full * group].unflatten(1, (full, group))[r1, g1] >= t[r1, None], as_tuple=True)
    rows, cols = r1[h], g1[h] * group + j
    r2 = gr[~inner]  # the block's last, shorter group
    if r2.numel():
        h, j = torch.nonzero(A[r2, full * group:] >= t[r2, None], as_tuple=True)
        p = torch.argsort(torch.cat([rows, r2[h]]), stable=True)
        rows, cols = torch.cat([rows, r2[h]])[p], torch.cat([cols, full * group + j])[p]
    return rows, cols


def _scan_group(block_rows: int) -> int:
    """Columns per group maximum in ``topk``'s scan: ``GROUP``, or the largest power of two that divides
    ``block_rows`` if smaller (every block but the last is a whole number of groups)."""
    return min(GROUP, block_rows & -block_rows)


def _padded_product(q: Codes, g: Codes, g0: int, g1: int, group: int,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, gm)``: the products of rows ``g0:g1``, padded with -inf columns to whole groups, and their
    group maxima (``_group_max``). ``out``: a (len(q), padded width) buffer of the product's dtype to
    write ``A`` into (bf16 / fp32 codes on a CPU), else a fresh tensor."""
    if out is None:
        A = _product(q, g, g0, g1)
        pad = -A.shape[1] % group
        if pad:
            A = torch.cat([A, A.new_full((A.shape[0], pad), -math.inf)], 1)
    else:
        A, w = out, g1 - g0
        torch.mm(q.low, g.low[g0:g1].t(), out=A[:, :w])  # the same oneDNN product as _mm's linear
        A[:, w:] = -math.inf
    return A, _group_max(A, group)


def _top_entries(As: list[torch.Tensor], gm: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """The k largest entries (B, k) float32 among the entries of each row's k groups of largest maximum
    (``gm`` (B, n_groups): the maxima of the blocks ``As``, each of ``As[0]``'s width but the last).
    Each is a lower bound on the k-th largest entry of the row; when no group maximum was replaced
    by -inf they are the k largest themselves: a group holding one of them has a maximum at least as
    large, and at most k groups can (ties aside)."""
    B, per = gm.shape[0], As[0].shape[1] // group
    kk = min(k, gm.shape[1])
    gi = torch.topk(gm, kk, dim=1).indices  # (B, kk)
    ent = torch.empty((B, kk, group), dtype=As[0].dtype, device=gm.device)
    blk = torch.div(gi, per, rounding_mode="floor")
    for b in torch.unique(blk).tolist():
        rr, jj = torch.nonzero(blk == b, as_tuple=True)
        ent[rr, jj] = As[b].view(B, -1, group)[rr, gi[rr, jj] - b * per]
    top = torch.topk(ent.view(B, kk * group), min(k, kk * group), dim=1).values.float()
    if top.shape[1] < k:
        top = torch.cat([top, top.new_full((B, k - top.shape[1]), -math.inf)], 1)
    return top


def _block_hits(A: torch.Tensor, gm: torch.Tensor, g0: int, t: torch.Tensor, group: int,
                G: int) -> tuple[torch.Tensor, ...]:
    """``(rows, cols, A)`` of the entries of a padded block (first row ``g0``) at or above their row's ``t``
    (in ``A``'s dtype; +inf: none), by row: only the groups whose maximum reaches ``t`` are read, every
    group of a row with ``t <= 0`` (``gm`` gives negative groups -inf)."""
    B = A.shape[0]
    rr, gg = torch.nonzero((gm >= t[:, None]) | (t <= 0)[:, None], as_tuple=True)
    ent = A.view(B, -1, group)[rr, gg]
    h, j = torch.nonzero(ent >= t[rr, None], as_tuple=True)
    rows, cols, v = rr[h], g0 + gg[h] * group + j, ent[h, j].float()
    inside = cols < G  # the padding is -inf: below any finite t
    return rows[inside], cols[inside], v[inside]


def _scan(q: Codes, g: Codes, E: torch.Tensor, k: int, block_rows: int, cap: int | None,
          n: int) -> tuple[torch.Tensor, ...]:
    """Candidate pairs of a block of queries against the whole gallery (module docstring, top-k):
    ``(rows, cols, A, over)``: the pairs with ``A >= theta`` of their query, by row then column, and the
    queries whose candidates exceeded ``cap`` (their pairs are left out: they fall back to fp32).

    Up to ``SCAN_BYTES`` of products are kept at a time (a "span" of blocks). Per span: 1. each block's
    products and group maxima (``_padded_product``, on the workers); 2. the k-th largest entry from
    the k groups of largest maxima (``_top_entries``), merged with the k largest of earlier spans
    (k distinct entries: a lower bound on the k-th largest ``A``), which gives ``theta``; 3. the
    entries at or above ``theta``, from the groups whose maximum reaches it (``_block_hits``, on the
    workers). The final ``theta`` filters what earlier spans let in."""
    B, G = len(q), len(g)
    dev, rho = q.X.device, RHO[g.precision]
    group = _scan_group(block_rows)
    item = 2 if g.precision == "bf16" else 4
    starts = list(range(0, G, block_rows))
    span = max(1, SCAN_BYTES // max(1, B * block_rows * item))
    best = torch.full((B, k), -math.inf, device=dev)  # the k largest A of earlier spans
    count = torch.zeros(B, dtype=torch.int64, device=dev)
    over = torch.zeros(B, dtype=torch.bool, device=dev)
    found: list[tuple[torch.Tensor, ...]] = []
    width = -(-block_rows // group) * group
    buf = None  # the span's products, reused (_scratch): float32 / bf16 codes on a CPU
    if dev.type == "cpu" and g.scale is None:
        buf = _scratch("span", (min(span, len(starts)), B, width), g.low.dtype, dev)
    for s0 in range(0, len(starts), span):
        blocks = starts[s0:s0 + span]
        out = _parallel(lambda x: _padded_product(q, g, x[1], min(G, x[1] + block_rows), group,
                                                  None if buf is None else buf[x[0]]), list(enumerate(blocks)), n)
        As = [a for a, _ in out]
        gms = [m for _, m in out]
        gm = torch.cat(gms, 1) if len(gms) > 1 else gms[0]
        if k == 1:  # a group maximum is an entry: the largest is the row's
            best = torch.maximum(best, gm.amax(1, keepdim=True).float())
        else:  # on the workers, a share of the queries each
            cut = [B * i // n for i in range(n + 1)] if n > 1 else [0, B]
            top = _parallel(lambda x, gm=gm, As=As: _top_entries([a[x[0]:x[1]] for a in As], gm[x[0]:x[1]], k, group),
                            list(zip(cut[:-1], cut[1:])), n)
            best = torch.topk(torch.cat([best, torch.cat(top)], 1), k, dim=1).values
        t = _round_out(_candidate_threshold(best[:, k - 1], E, rho).masked_fill_(over, math.inf).double(),
                       As[0].dtype, up=False)
        parts = _parallel(lambda x, t=t: _block_hits(*x, t, group, G), list(zip(As, gms, blocks)), n)
        del out, As
        r, c, v = (torch.cat(x) for x in zip(*parts))
        if cap is not None and r.numel():
            count += torch.bincount(r, minlength=B)
            over |= count > cap
        found.append((r, c, v))
    theta = _candidate_threshold(best[:, k - 1], E, rho).masked_fill_(over, math.inf)
    r, c, v = (torch.cat(x) for x in zip(*found))
    ok = v >= theta[r]  # the final theta (over: +inf) drops what earlier spans let in
    r, c, v = r[ok], c[ok], v[ok]
    p = torch.argsort(r, stable=True)  # blocks came in row order: columns stay ascending per query
    return r[p], c[p], v[p], over


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
        b = bufs[key] = torch.empty(n, dtype=dtype, device=device)
    return b[:n].view(shape)


def _rows(X: torch.Tensor, idx: torch.Tensor, slot: str) -> torch.Tensor:
    """``X[idx]`` (len(idx), D) into this thread's buffer ``slot`` on a CPU (``_scratch``: valid until the
    thread's next gather into that slot), a fresh tensor elsewhere."""
    if X.device.type != "cpu":
        return X.index_select(0, idx)
    return torch.index_select(X, 0, idx, out=_scratch(slot, (idx.numel(), X.shape[1]), X.dtype, X.device))


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


def _rescore_rows(q: Codes, g: Codes, r: torch.Tensor, c: torch.Tensor, v: torch.Tensor, a: int, b: int, k: int,
                  E: torch.Tensor, stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k ``(sims (b - a, k), idx)`` of queries ``a:b`` from their candidates ``(r, c, v)`` (rows
    ``r - a`` relative to ``a``, by row; every query holds at least k, or none: one that fell back).

    Round 1: each query's k candidates of largest ``A`` get ``s``; their smallest, ``F``, is a lower
    bound on the k-th best ``s`` (k rows reach it). Round 2: of the other candidates, only those with
    ``upper(A) >= F`` can still enter; they get float32 dot products ``d`` (bound ``_f32_error``) and
    ``s`` where ``d`` plus its bound still reaches ``F``. The answer: the top-k of the exact values by
    (similarity descending, row ascending)."""
    nq, D, dev = b - a, q.dim, q.X.device
    counts = torch.bincount(r, minlength=nq)
    pos = torch.arange(r.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[r]
    w = max(k, int(counts.max()) if r.numel() else 0)
    V = torch.full((nq, w), -math.inf, device=dev)
    C = torch.zeros((nq, w), dtype=torch.int64, device=dev)
    V[r, pos], C[r, pos] = v, c
    top = torch.topk(V, k, dim=1).indices  # round 1: any k candidates give a valid F; these give a high one
    c1 = C.gather(1, top)
    x = q.X[a:b]
    nn = q.norm[a:b, None] * g.norm[c1]
    sub = max(1, DOT_ELEMENTS // (k * D))  # queries whose gathered rows stay in cache while their dots are taken
    d1 = torch.cat([_dots64(x[u:u + sub], _rows(g.X, c1[u:u + sub].flatten(), "g").view(-1, k, D))
                    for u in range(0, nq, sub)])
    s1 = _round_dots(d1.flatten(), nn.flatten(), D, lambda p: (x[p // k].cpu().numpy(),
                                                               g.X[c1.flatten()[p]].cpu().numpy())).view(nq, k)
    F = s1.amin(1).double()
    th = _round_out(_upper_inv(F, E[a:b], RHO[g.precision]), torch.float32, up=False)
    rest = V >= th[:, None]
    rest.scatter_(1, top, False)
    i2, j2 = torch.nonzero(rest, as_tuple=True)
    S, Cs = s1, c1
    if i2.numel():
        c2 = C[i2, j2]
        sub = max(1, DOT_ELEMENTS // D)
        d = torch.cat([_dots32(_rows(x, i2[u:u + sub], "q"), _rows(g.X, c2[u:u + sub], "g"))
                       for u in range(0, i2.numel(), sub)]).double()
        qq = Codes(q.precision, x, x, None, q.norm[a:b], q.norm[a:b], q.resid[a:b])  # rows relative to a
        e = _f32_error(qq, g, i2, c2, d)
        near = torch.nonzero(d + e >= F[i2]).flatten()
        stats["float32_pairs"] = stats.get("float32_pairs", 0) + int(i2.numel())
        if near.numel():
            i2, c2 = i2[near], c2[near]
            s2 = _exact_rows(_rows(x, i2, "q"), _rows(g.X, c2, "g").unsqueeze(1),
                             (q.norm[a + i2] * g.norm[c2])[:, None]).flatten()
            cnt2 = torch.bincount(i2, minlength=nq)
            p2 = torch.arange(i2.numel(), device=dev) - (torch.cumsum(cnt2, 0) - cnt2)[i2]
            m2 = int(cnt2.max())
            S2 = torch.full((nq, m2), -math.inf, device=dev)
            C2 = torch.full((nq, m2), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
            S2[i2, p2], C2[i2, p2] = s2, c2
            S, Cs = torch.cat([s1, S2], 1), torch.cat([c1, C2], 1)
    stats["exact_pairs"] = stats.get("exact_pairs", 0) + nq * k + (int(near.numel()) if i2.numel() else 0)
    o = torch.sort(Cs, dim=1, stable=True).indices  # row ascending, then similarity descending (stable)
    S, Cs = S.gather(1, o), Cs.gather(1, o)
    o = torch.sort(S, dim=1, descending=True, stable=True).indices[:, :k]
    return S.gather(1, o), Cs.gather(1, o)


def _topk_codes(q: Codes, g: Codes, k: int, block_rows: int, cap: int | None,
                stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of a block of queries: ``(sims (B, k) float32, idx (B, k) int64)``."""
    B, dev = len(q), q.X.device
    n = _workers(dev)
    E = _error_terms(q, g)
    r, c, v, over = _scan(q, g, E, k, block_rows, cap, n)
    stats["candidates"] = stats.get("candidates", 0) + int(r.numel())
    counts = torch.bincount(r, minlength=B)
    ends = torch.cumsum(counts, 0).tolist()
    step = RESCORE_QUERIES

    def work(a: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = min(B, a + step)
        p0, p1 = (ends[a - 1] if a else 0), ends[b - 1]
        return _rescore_rows(q, g, r[p0:p1] - a, c[p0:p1], v[p0:p1], a, b, k, E, stats)

    parts = _parallel(work, range(0, B, step), n)
    sims = torch.cat([s for s, _ in parts])
    idx = torch.cat([i for _, i in parts])
    bad = torch.nonzero(over).flatten()
    if bad.numel():  # the window held too many rows for these queries: float32 products, no cap
        stats["fallback_queries"] = stats.get("fallback_queries", 0) + int(bad.numel())
        sims[bad], idx[bad] = _topk_codes(q.take(bad).as_fp32(), g.as_fp32(), k, block_rows, None, stats)
    return sims, idx


def _gallery_codes(gallery: Any, precision: str) -> Codes:
    if isinstance(gallery, Codes):
        if precision not in ("auto", gallery.precision):
            raise ValueError(f"gallery codes are {gallery.precision}, precision {precision!r} was asked")
        return gallery
    return quantize(gallery, precision)


def _cap(max_candidates: int | None, k: int) -> int:
    return max(MIN_CANDIDATES, 16 * k) if max_candidates is None else int(max_candidates)


def topk(queries: Any, gallery: Any, k: int, *, precision: str = "auto", keep: Any = None,
         query_block: int = QUERY_BLOCK, block_rows: int = BLOCK_ROWS, max_candidates: int | None = None,
         stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of every query among the gallery rows, by ``s`` (module docstring).

    Args:
        queries: (Q, D) float vectors (numpy or torch).
        gallery: (G, D) float vectors, or their ``Codes`` (``quantize``; reused across searches).
        k: neighbours per query; clamped to the rows searched.
        precision: ``auto``, ``fp32``, ``bf16`` or ``int8`` (of the candidate products; the
            answer is the same for each).
        keep: (G,) bool, or row indices: search only those rows (indices still refer to ``gallery``).
        query_block, block_rows: product block (memory ``query_block x block_rows``).
        max_candidates: per query, more candidates than this send the query to fp32 (None: the
            larger of ``MIN_CANDIDATES`` and ``16 k``).
        stats: a dict to add counts to (``candidates``, ``fallback_queries``, ``precision``).

    Returns:
        ``(sims (Q, k') float32, idx (Q, k') int64)``, k' = min(k, rows searched), each row by
        similarity descending, ties to the lower gallery row: ``common.retrieval.topk``'s answer.
    """
    if k < 1 or query_block < 1 or block_rows < 1:
        raise ValueError(f"topk: k, query_block and block_rows must be >= 1, got {k}, {query_block}, {block_rows}")
    g = _gallery_codes(gallery, precision)
    rows = None
    if keep is not None:
        rows = torch.as_tensor(np.asarray(keep) if not isinstance(keep, torch.Tensor) else keep, device=g.X.device)
        rows = torch.nonzero(rows).flatten() if rows.dtype == torch.bool else rows.to(torch.int64)
        g = g.take(rows)
    q_all = as_tensor(queries, g.X.device)
    if q_all.ndim != 2 or (q_all.shape[0] and len(g) and q_all.shape[1] != g.dim):
        raise ValueError(f"topk: expected (Q, D) queries for a (G, {g.dim}) gallery, got {tuple(q_all.shape)}")
    Q, kk = q_all.shape[0], min(k, len(g))
    sims, idx = np.empty((Q, kk), np.float32), np.empty((Q, kk), np.int64)
    st = stats if stats is not None else {}
    st["precision"] = g.precision
    if Q == 0 or kk == 0:
        return sims, idx
    with full_fp32(), _threads(g.X.device):
        for a in range(0, Q, query_block):
            qc = _query_codes(q_all[a:a + query_block], g)
            s, i = _topk_codes(qc, g, kk, block_rows, _cap(max_candidates, kk), st)
            sims[a:a + len(qc)] = s.cpu().numpy()
            idx[a:a + len(qc)] = (i if rows is None else rows[i]).cpu().numpy()
    return sims, idx


# ----------------------------------------------------------------------------- best per class


def _class_candidates(q: Codes, g: Codes, E: torch.Tensor, cls: torch.Tensor, n_cls: int, block_rows: int,
                      cap: int | None) -> tuple[torch.Tensor, ...]:
    """Candidate pairs for the best row of every class (``cls`` (G,): class of each gallery row,
    0..n_cls-1, rows grouped by class). Returns ``(rows, cols, A, over)`` as ``_candidates``; per block,
    each class's piece of the products gets a max (the running best ``A`` of the class) and one
    comparison with its ``theta``."""
    B, G = len(q), len(g)
    dev, rho = q.X.device, RHO[g.precision]
    best = torch.full((B, n_cls), -math.inf, device=dev)  # largest A per class so far
    count = torch.zeros(B, dtype=torch.int64, device=dev)
    over = torch.zeros(B, dtype=torch.bool, device=dev)
    starts = torch.nonzero(torch.diff(cls, prepend=cls[:1] - 1)).flatten().tolist()
    found = []
    for g0 in range(0, G, block_rows):
        g1 = min(G, g0 + block_rows)
        A = _product(q, g, g0, g1)
        cuts = [g0] + [b for b in starts if g0 < b < g1] + [g1]
        for lo, hi in zip(cuts[:-1], cuts[1:]):  # each class's piece of the block
            piece, ci = A[:, lo - g0:hi - g0], int(cls[lo])
            gm = _group_max(piece, GROUP)
            best[:, ci] = torch.maximum(best[:, ci], gm.amax(1).float())
            r, c = _hits(piece, gm, GROUP, _candidate_threshold(best[:, ci], E, rho).masked_fill_(over, math.inf))
            if r.numel():
                found.append((r, c + lo, piece[r, c].float()))
                if cap is not None:
                    count += torch.bincount(r, minlength=B)
                    over |= count > cap
    if not found:
        return (*(torch.zeros(0, dtype=torch.int64, device=dev),) * 2, torch.zeros(0, device=dev), over)
    theta = _candidate_threshold(best, E[:, None], rho)
    r, c, v = (torch.cat(x) for x in zip(*found))
    ok = (v >= theta[r, cls[c]]) & ~over[r]
    return r[ok], c[ok], v[ok], over


def _class_best_codes(q: Codes, g: Codes, cls: torch.Tensor, n_cls: int, block_rows: int, cap: int | None,
                      stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sims (B, n_cls), cols (B, n_cls))`` over class-grouped gallery codes (every class present)."""
    B = len(q)
    E = _error_terms(q, g)
    r, c, v, over = _class_candidates(q, g, E, cls, n_cls, block_rows, cap)
    key = r * n_cls + cls[c]  # one group per (query, class)
    r, c, s, key = _exact_top(q, g, r, c, v, key, B * n_cls, 1, E.repeat_interleave(n_cls), stats)
    p = _order_rows(key, s, c)
    key, s, c = key[p], s[p], c[p]
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    sims = torch.full((B * n_cls,), -math.inf, dtype=torch.float32, device=q.X.device)
    cols = torch.full((B * n_cls,), -1, dtype=torch.int64, device=q.X.device)
    sims[key[first]], cols[key[first]] = s[first], c[first]
    sims, cols = sims.view(B, n_cls), cols.view(B, n_cls)
    bad = torch.nonzero(over).flatten()
    if bad.numel():
        stats["fallback_queries"] = stats.get("fallback_queries", 0) + int(bad.numel())
        sims[bad], cols[bad] = _class_best_codes(q.take(bad).as_fp32(), g.as_fp32(), cls, n_cls, block_rows,
                                                 None, stats)
    return sims, cols


def class_best(queries: Any, gallery: Any, labels: Any, n_classes: int, *, precision: str = "auto",
               query_block: int = QUERY_BLOCK, block_rows: int = BLOCK_ROWS, max_candidates: int | None = None,
               stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The nearest gallery row of every class for every query, by ``s`` (module docstring).

    ``labels`` (G,) class index of each gallery row in [0, n_classes). Returns ``(sims (Q, C)
    float32, -inf where the class has no row; rows (Q, C) int64, -1 there)``, ties to the lower
    row: ``common.inference.search_classes``'s answer. Other arguments as ``topk``
    (``max_candidates`` None: the larger of ``MIN_CANDIDATES`` and 4 per class present)."""
    g = _gallery_codes(gallery, precision)
    lab = np.asarray(labels, dtype=np.int64)
    if lab.shape != (len(g),):
        raise ValueError(f"class_best: {lab.size} labels for {len(g)} gallery rows")
    if lab.size and (lab.min() < 0 or lab.max() >= n_classes):
        raise ValueError(f"class_best: labels must lie in [0, {n_classes}), got {lab.min()}..{lab.max()}")
    q_all = as_tensor(queries, g.X.device)
    Q = q_all.shape[0]
    sims, idx = np.full((Q, n_classes), -np.inf, np.float32), np.full((Q, n_classes), -1, np.int64)
    st = stats if stats is not None else {}
    st["precision"] = g.precision
    if Q == 0 or len(g) == 0:
        return sims, idx
    order = np.argsort(lab, kind="stable")  # classes contiguous, rows in order within each
    present, cls = np.unique(lab[order], return_inverse=True)
    gs, cls_t = g.take(order), torch.from_numpy(cls).to(g.X.device)
    cap = max(MIN_CANDIDATES, 4 * present.size) if max_candidates is None else int(max_candidates)
    with full_fp32(), _threads(g.X.device):
        for a in range(0, Q, query_block):
            qc = _query_codes(q_all[a:a + query_block], g)
            s, c = _class_best_codes(qc, gs, cls_t, present.size, block_rows, cap, st)
            sims[a:a + len(qc), present] = s.cpu().numpy()
            idx[a:a + len(qc), present] = order[c.cpu().numpy()]
    return sims, idx


# ----------------------------------------------------------------------------- streamed galleries


def topk_blocks(queries: Any, blocks: Iterable[tuple[int, Any]], k: int, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """``topk`` over a gallery given as consecutive blocks ``(first_row, X_block)`` (a
    ``common.streaming.StoreMatrix``'s ``blocks()``): each block searched exactly, the running lists
    merged by (similarity descending, row ascending). ``s`` does not depend on the blocking, so the
    answer is ``topk`` on the whole matrix. ``kw``: ``topk``'s keyword arguments (not ``keep``)."""
    q = as_tensor(queries)
    Q = q.shape[0]
    vals, rows = np.empty((Q, 0), np.float32), np.empty((Q, 0), np.int64)
    for first, X in blocks:
        v, i = topk(q, X, k, **kw)
        vals, rows = np.concatenate([vals, v], 1), np.concatenate([rows, i + first], 1)
        o = np.lexsort((rows, -vals.astype(np.float64)), axis=1)[:, :k]
        vals, rows = np.take_along_axis(vals, o, 1), np.take_along_axis(rows, o, 1)
    return vals, rows


def class_best_blocks(queries: Any, blocks: Iterable[tuple[int, Any]], labels: Any, n_classes: int,
                      **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """``class_best`` over a gallery given as consecutive blocks ``(first_row, X_block)``; ``labels``
    (G,) covers the whole gallery. Blocks come in row order, so an equal similarity keeps the
    earlier (lower) row: the answer of ``class_best`` on the whole matrix."""
    q = as_tensor(queries)
    lab = np.asarray(labels, dtype=np.int64)
    sims = np.full((q.shape[0], n_classes), -np.inf, np.float32)
    idx = np.full((q.shape[0], n_classes), -1, np.int64)
    for first, X in blocks:
        s, i = class_best(q, X, lab[first:first + len(X)], n_classes, **kw)
        better = s > sims
        sims, idx = np.where(better, s, sims), np.where(better, i + first, idx)
    return sims, idx


# ----------------------------------------------------------------------------- pruning


def _band(t: float, E: float, rho: float, dtype: torch.dtype) -> tuple[float, float]:
    """``(lo, hi)`` in ``dtype``: ``A > hi`` proves ``s > t``, ``A < lo`` proves ``s < t``."""
    x = torch.tensor([t], dtype=torch.float64)
    e = torch.tensor([E], dtype=torch.float64)
    lo = _round_out(_upper_inv(x, e, rho), dtype, up=False)
    hi = _round_out(_lower_inv(x, e, rho), dtype, up=True)
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
        if cache:  # on the workers, the largest blocks first (they finish together)
            starts = list(range(0, n, tile))[::-1]
            self.cols = _parallel(lambda a: self._mm(slice(0, min(n, a + tile)), a), starts, _workers(c.X.device))[::-1]

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
            return self.cols[b].index_select(0, rows)
        return self._mm(rows, b * self.tile)


def _exceeds(c: Codes, rows: torch.Tensor, cols: torch.Tensor, t: float, stats: dict) -> torch.Tensor:
    """``s(rows[p], cols[p]) > t`` for pairs inside the band of the products (``rows`` sorted): float32
    dot products first, the exact ``s`` where they do not decide (within their own bound of ``t``)."""
    res = torch.zeros(rows.numel(), dtype=torch.bool, device=rows.device)
    for sl, x, Y, gi, ps, d in _gathered(c, c, rows, cols):
        d = d.double()
        e = _f32_error(c, c, rows[sl], cols[sl], d)
        res[sl] = d - e > t
        near = torch.nonzero((d - e <= t) & (d + e > t)).flatten()
        if near.numel():
            nn = c.norm[rows[sl][near]] * c.norm[cols[sl][near]]
            res[sl.start + near] = _exact_dots(x[gi[near]], Y[gi[near], ps[near]], nn).double() > t
            stats["exact_pairs"] = stats.get("exact_pairs", 0) + int(near.numel())
    stats["float32_pairs"] = stats.get("float32_pairs", 0) + int(rows.numel())
    return res


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
    """Keep mask of one class at threshold ``t``: ``common.lut``'s greedy, steps of ``blocks.tile``
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
    """``common.lut``'s greedy on one class at every threshold: keep masks (T, n) bool.

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
        for ti, t in enumerate(thresholds):
            lo, hi = _band(float(t), E, RHO[c.precision], dtype)
            keeps[ti] = _prune_one(c, blocks, float(t), lo, hi, chunk, st)
    return keeps
