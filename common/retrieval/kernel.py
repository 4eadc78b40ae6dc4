"""Exact top-k and best-per-class search whose candidates come from a reduced-precision product.

Every result is defined on the exact similarity ``s`` (``common.retrieval.similarity``) with the
project's total order (similarity descending, then row ascending), so it is identical whatever the
precision, block sizes or path:

- ``topk``: the ``min(k, G)`` rows of largest ``s`` of every query (``retrieval.search.topk``'s order);
- ``class_best``: per class the row of largest ``s``, ties to the lower row
  (``retrieval.search.search_classes``'s answer);
- ``topk_blocks`` / ``class_best_blocks``: the same over a gallery given block by block (streamed).

The candidates come from the product ``A`` of the codes (``common.retrieval.codes``), whose bound
``lower(A) <= s <= upper(A)`` is proven there. From it:

- **Top-k.** Let ``A_k`` be the k-th largest ``A(q, .)`` and ``T`` the k-th largest ``s(q, .)``. The k rows
  of largest ``A`` have ``s >= lower(A) >= lower(A_k)``, so ``T >= lower(A_k)``. A row with
  ``upper(A) < lower(A_k)`` has ``s < T``: strictly below the k-th best, it is in no top-k under any
  tie rule. So the rows with ``A >= theta = upper^-1(lower(A_k))`` hold the whole top-k; their ``s``
  are computed exactly and ordered, and the answer is the top-k of ``s``. (Blocked: ``A_k`` over
  the blocks seen so far is at most the final one, so the running ``theta`` only rises and the
  rows kept on the way are a superset; the final ``theta`` filters them.)
- **Best per class**: the same with k = 1 within each class.

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
query in the same way). The products run on all of torch's threads, every other step on one
(``similarity._threads``). The products of a span and the rescoring's gathered rows go to buffers
each thread keeps for its next search (``similarity._scratch``: at most ``SCAN_BYTES`` plus a few
MiB), and the rows are gathered ``DOT_ELEMENTS`` at a time so that they are still in cache when
their dot products are taken.

Inputs: numpy arrays or torch tensors (computation on the gallery's device); outputs: numpy.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from ..runtime.device import full_fp32
from .codes import (PRECISIONS, RHO, Codes, _candidate_threshold, _error_terms, _f32_error, _gallery_codes,
                    _gathered, _product, _query_codes, _round_out, _upper_inv, choose_precision, exact_pairs,
                    matmul_flags, quantize)
from .exact import as_tensor
from .similarity import (_dots32, _dots64, _exact_dots, _exact_grouped, _exact_rows, _parallel, _round_dots, _rows,
                         _scratch, _threads, _workers)

__all__ = ["PRECISIONS", "Codes", "quantize", "choose_precision", "matmul_flags", "exact_pairs", "topk", "class_best",
           "topk_blocks", "class_best_blocks"]

QUERY_BLOCK = 4096  # queries per product block (fewer passes over the gallery; AMX runs best on tall blocks)
GROUP = 128  # columns per maximum in the first pass over a block of products (_group_max)
BLOCK_ROWS = 2048  # gallery rows per product block (QUERY_BLOCK x BLOCK_ROWS bf16 = 16 MiB of output, in L3)
MIN_CANDIDATES = 256  # a query may rescore at least this many candidates before it falls back to fp32
SCAN_BYTES = 320 * 2**20  # products kept at a time by topk's scan (4096 queries x 33,000 rows of bf16: 270 MB)
RESCORE_QUERIES = 256  # queries rescored per work item (fewer, larger steps: -12% CPU time against 64)
DOT_ELEMENTS = 1 << 20  # vector elements gathered at a time for dot products (4 MiB of float32; measured on a
# 2-core Xeon, top-10 of 3,000 x 33,000 x 2,048: 0.40 s against 0.43 s at 1 << 18, fewer calls per query block)

# ----------------------------------------------------------------------------- candidates and rescoring


def _by_list_length(r: torch.Tensor) -> torch.Tensor:
    """A permutation of pairs that keeps each row's pairs together, rows ordered by how many they have
    (so a chunk of ``_gathered`` pads little)."""
    n = torch.bincount(r)
    return torch.argsort(n[r] * (int(r.max()) + 1) + r, stable=True)


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
        similarity descending, ties to the lower gallery row: ``retrieval.search.topk``'s answer.
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
    row: ``retrieval.search.search_classes``'s answer. Other arguments as ``topk``
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
    ``retrieval.streamed.StoreMatrix``'s ``blocks()``): each block searched exactly, the running lists
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


