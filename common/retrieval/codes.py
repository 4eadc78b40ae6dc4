"""Reduced-precision codes of the stored vectors, and the bound that makes searching them exact.

The exact search (``common.retrieval.kernel``: top-k and best per class; ``common.retrieval.prune``:
the LUT greedy) generates candidates with a product of the codes (bf16 or int8) and rescores them
with the exact similarity ``s`` (``common.retrieval.similarity``). This module holds the codes
(``quantize``), the product ``A`` of two sets of codes (``_product``), and the bound on ``|s - A|``
with its proof, which every search decision rests on.

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

``theta`` (the candidate threshold) and the band ends are computed in float64 (a few operations on
numbers below 2^7: error below 2^-44) and moved outwards by ``2^-40 (1 + |value|)``; a value compared
with ``A`` in ``A``'s dtype is then rounded to that dtype: outwards (``_round_out``), or inwards where
only values of that dtype are compared with it (``_round_in``: ``A >= ceil(x) <=> A >= x`` for such
``A``), so the comparisons only ever admit more candidates than the real-number ones.

Precision. On a CPU with AMX or AVX512-BF16 oneDNN's bf16 product runs several times faster than
float32; ``precision="auto"`` times one small product of each kind once per process and logs the
choice (``choose_precision``). Float32 products are computed at full precision (no TF32 / bf16
shortcut: ``runtime.device.full_fp32``), which the bound assumes.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from ..runtime.device import cpu_flags, full_fp32
from .exact import as_tensor
from .similarity import (U32, U64, _all_threads, _exact_dots, _norm_bound, _norm_up, _parallel, _scratch, _sum_squares,
                         _threads, _workers)

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
RHO = {"fp32": 0.0, "bf16": 2.0 ** -8 / (1 - 2.0 ** -8), "int8": 4 * U32}  # relative error of A's output rounding
SAFE = 2.0 ** -40  # float64 slack on computed thresholds (their own rounding is below 2^-44)
BF16_MAX = 3.3e38  # coordinates at or above this would round to an infinite bfloat16
PAIR_CHUNK = 1 << 20  # vector elements gathered at a time when rescoring (4 MiB of float32)
CODE_CHUNK = 1 << 18  # vector elements coded at a time by one worker (1 MiB of float32: it and its temporaries stay in L2)
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


def _code_rows(X: torch.Tensor, precision: str, low: torch.Tensor, scale: torch.Tensor | None, ss: torch.Tensor,
               ss_resid: torch.Tensor) -> None:
    """Codes of a few rows written into ``low`` (int8: and ``scale``), the float32 sums of squares of the
    rows into ``ss`` and of their residuals ``x - x~`` into ``ss_resid`` (``quantize`` bounds them)."""
    ss.copy_(_sum_squares(X))
    if precision == "bf16":
        low.copy_(X)  # rounds to nearest bfloat16
        # x~ - x is exact in float32: x and its rounding are within 2x (Sterbenz); in this thread's
        # buffer (a fresh temporary of a megabyte is page-faulted in at every call: similarity._scratch)
        d = _scratch("code_resid", tuple(X.shape), torch.float32, X.device) if X.device.type == "cpu" else None
        ss_resid.copy_(_sum_squares(d.copy_(low).sub_(X) if d is not None else X - low.float()))
        return
    amax = X.abs().amax(1) if X.shape[1] else torch.zeros(X.shape[0], device=X.device)
    scale.copy_(torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)))
    low.copy_(torch.round(X / scale[:, None]).clamp_(-127, 127))
    ss_resid.copy_(_sum_squares(X - low.float() * scale[:, None]))


def _check_values(X: torch.Tensor, precision: str) -> None:
    """Raises ``ValueError`` for a non-finite value, or one too large for bf16 codes."""
    lo, hi = (float(v) for v in torch.aminmax(X)) if X.numel() else (0.0, 0.0)  # nan propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("vectors hold a non-finite value (inf or nan)")
    if precision == "bf16" and max(-lo, hi) >= BF16_MAX:
        raise ValueError("vectors too large for bfloat16 codes: use precision fp32")


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
    if precision == "auto":
        precision = choose_precision(X.shape[1], X.device)
    N = X.shape[0]
    step = max(1, CODE_CHUNK // max(1, X.shape[1]))  # rows at a time: the temporaries stay in cache
    ss, ss_resid = (torch.zeros(N, dtype=torch.float32, device=X.device) for _ in range(2))
    low = X if precision == "fp32" else torch.empty(X.shape, dtype=torch.bfloat16 if precision == "bf16"
                                                    else torch.int8, device=X.device)
    scale = torch.empty(N, device=X.device) if precision == "int8" else None

    def code(a: int) -> None:  # the codes of rows a:a + step, into disjoint slices (on the workers)
        if precision == "fp32":
            ss[a:a + step] = _sum_squares(X[a:a + step])
            return
        _code_rows(X[a:a + step], precision, low[a:a + step], None if scale is None else scale[a:a + step],
                   ss[a:a + step], ss_resid[a:a + step])
    with _threads(X.device):
        _parallel(code, range(0, N, step), _workers(X.device))
    D = X.shape[1]
    norm = _norm_bound(ss, D)
    # A finite float32 sum of squares proves every coordinate finite and below 2^64 (so below BF16_MAX):
    # the separate pass over the values is needed only when a norm is not finite.
    if N and not bool(torch.isfinite(norm).all()):
        _check_values(X, precision)
    if precision == "fp32":
        return Codes("fp32", X, X, None, norm, norm, torch.zeros_like(norm))
    resid = _norm_bound(ss_resid, D)
    if precision == "int8":
        # x - c a in float32: c a and the difference are each rounded (relative u), so per coordinate
        # |x - c a| <= (1 + u) |r| + u |c a|, and |c a| <= |x| + |x - c a|
        resid = ((1 + U32) * resid + U32 * norm) / (1 - U32) * (1 + 4 * U64)
    return Codes(precision, X, low, scale, norm, norm + resid, resid)


# ----------------------------------------------------------------------------- the products and the bound


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


def _round_in(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``x`` (float64) moved outwards by ``SAFE (1 + |x|)`` (``up``: upwards) and then rounded *inwards* to
    ``dtype``: ``x'`` = x - slack rounded up (``up`` False), x + slack rounded down (``up`` True). For values
    ``A`` of ``dtype`` this is exact: ``A >= ceil(x') <=> A >= x'`` and ``A > floor(x') <=> A > x'``,
    while ``_round_out`` admits one more value of the grid (at bf16 near 0.95 a step is 2^-8, about
    the width of the bound itself: a third of the prune band). Use it only for comparisons of values
    of ``dtype`` (``A >= lo``, ``A > hi``)."""
    x = x + (SAFE if up else -SAFE) * (1.0 + x.abs().nan_to_num(0.0, 0.0, 0.0))
    y = x.to(dtype)
    inf = torch.full_like(y, -math.inf if up else math.inf)
    wrong = (y.double() > x) if up else (y.double() < x)
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


_SETTING: dict[str, Any] = {"precision": "auto", "logged": False}  # search.precision of this process (a stage)


def set_precision(precision: str) -> None:
    """``search.precision`` for the exact searches of this process (a stage sets it before it runs):
    ``auto`` (``choose_precision``), ``fp32``, ``bf16`` or ``int8``. A speed knob: every answer is the
    same. The precision used is logged once, at the next search."""
    if precision not in PRECISIONS:
        raise ValueError(f"search.precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    _SETTING.update(precision=precision, logged=False)


def search_precision(dim: int, device: Any = "cpu") -> str:
    """The precision of the next exact search of ``dim``-vectors on ``device``: ``search.precision``
    (``set_precision``; ``auto``: ``choose_precision``). Off the CPU always fp32: the bf16 / int8
    bounds rest on how the CPU kernels round and accumulate, which no GPU run has checked yet."""
    dev = torch.device(device)
    asked = _SETTING["precision"]
    if dev.type != "cpu":
        chosen = "fp32"
    else:
        chosen = choose_precision(dim, dev) if asked == "auto" else asked
    if not _SETTING["logged"]:
        _SETTING["logged"] = True
        log.info("exact search: candidates from %s products on %s, rescored exactly (search.precision %s)", chosen,
                 dev.type, asked)
    return chosen


def matmul_flags() -> list[str]:
    """The CPU's matrix-product flags (AVX-512, VNNI, BF16, AMX), sorted (empty where unknown)."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx_vnni")))



# ----------------------------------------------------------------------------- exact similarity of pairs


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


def _f32_error(q: Codes, g: Codes, r: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """A bound on ``|s - d|`` for float32 dot products ``d`` of pairs ``(r, c)``: ``(gamma_D + u) |q| |g| + tau``
    (steps 1 and 3 of the proof with ``q~ = q``), widened by the float64 rounding of ``d -+ bound``."""
    D = q.dim
    e = (D * U32 / (1.0 - D * U32) + U32) * q.norm[r] * g.norm[c] * (1.0 + 8 * U64)
    e = e + D * 2.0 ** -125 * (1 + q.norm[r] + g.norm[c])
    return e + 2.0 ** -50 * (d.abs() + e)


def _gallery_codes(gallery: Any, precision: str) -> Codes:
    if isinstance(gallery, Codes):
        if precision not in ("auto", gallery.precision):
            raise ValueError(f"gallery codes are {gallery.precision}, precision {precision!r} was asked")
        return gallery
    return quantize(gallery, precision)


# Where the exact kernel (kernel.topk) pays, measured on this 2-core AVX512-BF16 machine under load
# 11-12 (bf16 codes; the gallery's codes are made at each call, which costs about as much as a
# float32 product of 250-600 queries, the rest of the search 0.2-0.65x that product):
# G = 20,000, D = 2,048: 1,000 queries: top-1 1.75x, top-10 1.33x the float32 product; 600 queries:
# top-20 0.88x, top-40 0.81x; 1,000 queries: top-100 0.58x, top-1000 0.16x (each of the k best is
# rescored in float64); 128 queries, top-10: 0.29x; 32 queries: 0.11x. G = 6,000, D = 512, 600
# queries (bench_retrieval --quick): top-1 0.62x, top-10 0.64x. A prepared gallery (retrieval.search.prepare)
# no longer pays the codes at each call, so there the kernel may pay from fewer queries: not measured yet.
KERNEL_MIN_QUERIES = 1024  # fewer queries than this: one float32 product per block
KERNEL_MAX_K = 16  # a larger k: one float32 product per block


def use_kernel(n_queries: int, k: int, device: torch.device) -> bool:
    """Whether an exact top-``k`` of ``n_queries`` queries runs on the reduced-precision kernel
    (``kernel.topk``) rather than one float32 product per block of queries: on a CPU, for at least
    ``KERNEL_MIN_QUERIES`` queries and ``k <= KERNEL_MAX_K`` (where it pays; the answer is the same)."""
    return device.type == "cpu" and n_queries >= KERNEL_MIN_QUERIES and k <= KERNEL_MAX_K
