"""Benchmark: LUT pruning of one class (``common.lut.prune``) against the direct pair loop.

Data: one class of 3,000 L2-normalised 2048-d vectors in sub-clusters of varied spread (within-
cluster similarities from ~0.6 to ~0.99, so the greedy prunes a fair share at the thresholds used).

Compared, in the same process:
- the direct pair loop (the greedy of Yang et al. 2022 as the reference code runs it): items in id
  order, each kept item computes its similarity to every later still-kept item, one pair at a
  time, and removes those above the threshold. Two per-pair similarities are timed:
  ``numpy``: ``float32(dot)`` of float64 copies (the rule's own definition, the fastest honest
  loop), and ``torch``: ``F.cosine_similarity`` of two float32 tensors per pair, as a PyTorch
  reference computes it. The numpy loop runs in full (its result must be identical to
  ``lut.prune``'s); the torch loop runs in full on a subset (``--subset`` items, also checked),
  its cost per evaluated pair measured there and its time at full size extrapolated from the
  number of pairs the loop evaluates there (counted exactly from the similarity matrix and the
  greedy's outcome, and checked against the numpy loop's count);
- the bare float32 similarity product ``X @ X.T`` of the class (the floor any exact method pays);
- ``lut.prune`` (blocked products, exact recheck inside the float32 rounding band, vectorised scan).

Usage:  python benchmarks/bench_prune.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# numpy's BLAS (the reference similarities below) would keep its threads spinning after each call
# and steal the 2 cores from torch's timed products; the benchmark's numpy work needs no threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.retrieval.prune import prune  # noqa: E402


def clustered_class(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 unit vectors in sub-clusters of ~30 items with spreads 0.1..0.8."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, n // 30)
    centres = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=1)
    sigma = 0.1 + 0.7 * torch.rand(k, generator=g)
    which = torch.randint(0, k, (n,), generator=g)
    noise = torch.randn(n, dim, generator=g) / dim ** 0.5
    X = torch.nn.functional.normalize(centres[which] + sigma[which, None] * noise, dim=1)
    return X.numpy().astype(np.float32)


def pair_loop(X: np.ndarray, t: float) -> tuple[np.ndarray, int]:
    """The reference's greedy, one pair at a time (similarity: float64 dot rounded to float32)."""
    n = X.shape[0]
    X64 = X.astype(np.float64)
    alive = [True] * n
    pairs = 0
    for i in range(n):
        if not alive[i]:
            continue
        xi = X64[i]
        for j in range(i + 1, n):
            if alive[j]:
                pairs += 1
                if np.float32(np.dot(xi, X64[j])) > t:
                    alive[j] = False
    return np.array(alive), pairs


def pair_loop_torch(X: np.ndarray, t: float) -> tuple[np.ndarray, int]:
    """The same greedy with one ``torch.nn.functional.cosine_similarity`` call per pair (float32)."""
    n = X.shape[0]
    T = torch.from_numpy(X)
    alive = [True] * n
    pairs = 0
    cos = torch.nn.functional.cosine_similarity
    for i in range(n):
        if not alive[i]:
            continue
        for j in range(i + 1, n):
            if alive[j]:
                pairs += 1
                if cos(T[i], T[j], dim=0).item() > t:
                    alive[j] = False
    return np.array(alive), pairs


def pairs_evaluated(S: np.ndarray, keep: np.ndarray, t: float) -> int:
    """How many pairs the pair loop evaluates, from the similarities and the greedy's outcome:
    item j is compared with every kept i < j up to and including its first kept dominator."""
    n = S.shape[0]
    kept_idx = np.flatnonzero(keep)
    dom = (S[kept_idx] > t) & (kept_idx[:, None] < np.arange(n)[None, :])  # (kept, n)
    first = np.where(dom.any(0), kept_idx[np.argmax(dom, axis=0)], n)  # first kept dominator of j (n: none)
    limit = np.minimum(np.arange(n), first + 1)  # j meets kept i < limit
    return int(np.searchsorted(kept_idx, limit).sum())


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 items, 200-item pair-loop subset")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--subset", type=int, default=None, help="items the torch pair loop runs on in full")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    args = ap.parse_args()
    n = args.n or (1000 if args.quick else 3000)
    sub = args.subset or (200 if args.quick else 400)
    repeats = 3
    print(f"one class of {n:,} x {args.dim} float32; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"thresholds {args.thresholds}")

    X = clustered_class(n, args.dim)
    Xt = torch.from_numpy(X)
    lab = np.zeros(n, dtype=np.int64)
    prune(X[:64], lab[:64], None, 0.9)  # warm-up
    t_bare = best_of(lambda: Xt @ Xt.T, repeats)
    S = (X.astype(np.float64) @ X.astype(np.float64).T).astype(np.float32)
    print(f"bare float32 similarity product X @ X.T ({n:,} x {n:,}): {t_bare:.3f} s")

    summary = []
    for t in args.thresholds:
        keep_sub = prune(X[:sub], lab[:sub], None, t)
        keep = prune(X, lab, None, t)
        t_prune = best_of(lambda t=t: prune(X, lab, None, t), repeats)
        pairs_full = pairs_evaluated(S, keep, t)
        same_blocks = bool(np.array_equal(keep, prune(X, lab, None, t, block_size=256)))
        print(f"\nthreshold {t:g}: kept {int(keep.sum()):,} of {n:,} ({100 * keep.mean():.1f}%); the pair loop "
              f"evaluates {pairs_full:,} of the {n * (n - 1) // 2:,} pairs")
        print(f"  lut.prune: {t_prune:.3f} s = {t_prune / t_bare:.2f}x the bare product "
              f"(identical with block_size 256: {same_blocks})")
        ok = same_blocks
        t0 = time.perf_counter()  # the numpy pair loop at full size: measured, and the identity check
        ref_full, pairs_run = pair_loop(X, t)
        t_loop_np = time.perf_counter() - t0
        same_full = bool(np.array_equal(ref_full, keep)) and pairs_run == pairs_full
        print(f"  pair loop (numpy), run in full: {t_loop_np:.1f} s = {1e6 * t_loop_np / pairs_run:.2f} us/pair; "
              f"identical to lut.prune: {same_full}; lut.prune is {t_loop_np / t_prune:,.0f}x faster")
        summary.append((t, "numpy", t_loop_np / t_prune))
        ok = ok and same_full
        t0 = time.perf_counter()
        ref_sub, pairs_sub = pair_loop_torch(X[:sub], t)
        t_loop_sub = time.perf_counter() - t0
        same = bool(np.array_equal(ref_sub, keep_sub))
        per_pair = t_loop_sub / max(pairs_sub, 1)
        t_loop_full = per_pair * pairs_full
        print(f"  pair loop (torch): {1e6 * per_pair:.2f} us/pair (run in full on {sub} items, {pairs_sub:,} pairs, "
              f"identical to lut.prune: {same}) -> {t_loop_full:.1f} s at {n:,} items (extrapolated); "
              f"lut.prune is {t_loop_full / t_prune:,.0f}x faster")
        summary.append((t, "torch", t_loop_full / t_prune))
        if not ok:
            raise SystemExit("MISMATCH between lut.prune and the pair loop")
    print("\nsummary: bare product {:.3f} s; ".format(t_bare)
          + "; ".join(f"t={t:g} {name} loop / lut.prune = {r:,.0f}x" for t, name, r in summary))

if __name__ == "__main__":
    main()
