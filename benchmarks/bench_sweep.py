"""Benchmark: stage 05's threshold sweep and stage 06's pruning at DYB-PlanktonNet scale.

Data (synthetic, clustered so that pruning is non-trivial): a train gallery of 33,000 x 2048
L2-normalised float32 vectors in 87 classes of Zipf-like sizes (7,760 down to 2, as imbalanced as
DYB-PlanktonNet), each class made of overlapping sub-clusters of varied spread (see
``make_data``), and 7,000 val queries drawn from the same sub-clusters.

Timed, in the same process:
- the floor: the bare float32 matrix products the sweep cannot avoid -- every val query against the
  whole gallery, and every class's own similarity matrix ``X_c @ X_c.T``;
- stage 06: ``lut.prune`` at one threshold (the one the sweep chose);
- stage 05: the full sweep over the 21 thresholds 0.80..1.00 -- ``lut.prune_sweep`` (every
  threshold's LUT), ``lut.nearest_kept`` (every val query's nearest kept items at every
  threshold), the latency timing, the metrics table and the choice (``lut.rule=tolerance``);
- peak memory (``ru_maxrss``) of the whole process.

Usage:  python benchmarks/bench_sweep.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no spinning numpy BLAS threads beside torch's

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.config.schema import LutConfig  # noqa: E402
from common.retrieval.prune import prune, prune_sweep  # noqa: E402
from common.retrieval.sweep import (  # noqa: E402
    LATENCY_QUERIES,
    choose_threshold,
    measure_latency,
    nearest_kept,
    sweep_rows,
    threshold_grid,
)


def zipf_sizes(n_classes: int, total: int, largest: int, smallest: int = 2) -> np.ndarray:
    """Heavy-tailed class sizes from ``largest`` down to ``smallest`` summing to ``total``:
    ``log n_r`` falls from ``log largest`` to ``log smallest`` as ``((r - 1) / (C - 1)) ** p``,
    with ``p`` found by bisection (a pure power law cannot hit all three figures of DYB)."""
    x = np.linspace(0.0, 1.0, n_classes)
    span = np.log(largest) - np.log(smallest)

    def sizes_for(p: float) -> np.ndarray:
        return np.round(np.exp(np.log(largest) - span * x ** p)).astype(np.int64)

    lo, hi = 0.05, 20.0
    for _ in range(200):
        p = (lo + hi) / 2
        lo, hi = (lo, p) if sizes_for(p).sum() > total else (p, hi)
    sizes = sizes_for(p)
    sizes[1] += total - sizes.sum()  # exact total, on the second class
    return sizes


def make_data(sizes: np.ndarray, n_val: int, dim: int, seed: int = 0):
    """Gallery (N, D), labels, shuffled image ids, and val queries (n_val, D) with labels.

    Each class is a set of sub-clusters (~40 items each); sub-cluster centres of different classes
    share "super" centres (so classes overlap: top-1 accuracy ~0.87), and the items spread around
    their centre mostly within a shared 16-d subspace (so similarities vary as real embeddings do,
    instead of concentrating as isotropic noise in 2048-d would)."""
    g = torch.Generator().manual_seed(seed)
    normalize = torch.nn.functional.normalize
    n = int(sizes.sum())
    labels = np.repeat(np.arange(sizes.size), sizes)
    n_sub = np.maximum(1, sizes // 40)
    first = np.r_[0, np.cumsum(n_sub)[:-1]]
    K = int(n_sub.sum())
    supers = normalize(torch.randn(max(4, K // 6), dim, generator=g), dim=1)
    sub_c = normalize(supers[torch.randint(0, supers.shape[0], (K,), generator=g)]
                      + 0.35 * torch.randn(K, dim, generator=g) / dim ** 0.5, dim=1)
    basis = torch.linalg.qr(torch.randn(dim, 16, generator=g))[0].T  # (16, D) orthonormal
    sigma = 0.2 + 0.8 * torch.rand(K, generator=g)  # spread of each sub-cluster
    rng = np.random.default_rng(seed)
    which = torch.from_numpy(first[labels] + rng.integers(0, n_sub[labels]))

    def draw(w: torch.Tensor) -> torch.Tensor:
        out = torch.empty(w.numel(), dim)
        for a in range(0, w.numel(), 4096):  # bounded temporaries
            ww = w[a:a + 4096]
            z = torch.randn(ww.numel(), 16, generator=g) / 4.0 @ basis
            e = torch.randn(ww.numel(), dim, generator=g) / dim ** 0.5
            out[a:a + 4096] = normalize(sub_c[ww] + sigma[ww, None] * (z + 0.3 * e), dim=1)
        return out

    X = draw(which).numpy()
    vi = rng.integers(0, n, n_val)  # val queries follow the gallery's class balance
    V = draw(which[torch.from_numpy(vi)]).numpy()
    ids = rng.permutation(n).astype(np.int64) + 1
    return X, labels, ids, V, labels[vi]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8,000-vector gallery, 30 classes, 1,500 queries")
    ap.add_argument("--dim", type=int, default=2048)
    args = ap.parse_args()
    if args.quick:
        n_classes, total, largest, n_val = 30, 8000, 2000, 1500
    else:
        n_classes, total, largest, n_val = 87, 33000, 7760, 7000
    lcfg = LutConfig()
    thresholds = threshold_grid(lcfg)
    dev = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    sizes = zipf_sizes(n_classes, total, largest)
    X, y, ids, V, yv = make_data(sizes, n_val, args.dim)
    print(f"gallery {X.shape[0]:,} x {args.dim} in {n_classes} classes (sizes {sizes.max():,} .. {sizes.min()}), "
          f"{V.shape[0]:,} val queries; {len(thresholds)} thresholds {thresholds[0]:g}..{thresholds[-1]:g}")

    t_qg, t_cls = _measure_floor(X, V, y, sizes, lcfg.block_size)
    t_floor = t_qg + t_cls
    rows, i, keeps, t_sweep = _measure_sweep(X, y, ids, V, yv, thresholds, lcfg, n_classes, args.dim, dev, t_floor)
    t_prune, same = _measure_prune(X, y, ids, rows[i]["threshold"], keeps[i], lcfg, dev, t_cls)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (ru_maxrss): {peak_mb:,.0f} MB (the data alone: {(X.nbytes + V.nbytes) / 2**20:,.0f} MB)")
    print(f"\nsummary: sweep {t_sweep:.1f} s (floor {t_floor:.1f} s, {t_sweep / t_floor:.2f}x), stage 06 prune "
          f"{t_prune:.2f} s, peak {peak_mb / 1024:.2f} GB, load average {os.getloadavg()[0]:.2f}")
    if not same:
        raise SystemExit("MISMATCH between prune and prune_sweep")


def _measure_floor(X: np.ndarray, V: np.ndarray, y: np.ndarray, sizes: np.ndarray,
                   block_size: int) -> tuple[float, float]:
    """The floor: bare float32 products, val x gallery and per class; their seconds."""
    Xt, Vt = torch.from_numpy(X), torch.from_numpy(V)
    _ = Vt[:256] @ Xt.T  # warm-up
    t0 = time.perf_counter()
    for a in range(0, V.shape[0], block_size):
        _ = Vt[a:a + block_size] @ Xt.T
    t_qg = time.perf_counter() - t0
    del _
    order = np.argsort(y, kind="stable")
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    t0 = time.perf_counter()
    for s, n in zip(starts, sizes):
        Xc = Xt[torch.from_numpy(order[s:s + n])]
        _ = Xc @ Xc.T
    t_cls = time.perf_counter() - t0
    del _, Xc
    print(f"floor: val x gallery product {t_qg:.2f} s + per-class X_c @ X_c.T {t_cls:.2f} s = {t_qg + t_cls:.2f} s")
    return t_qg, t_cls


def _measure_sweep(X: np.ndarray, y: np.ndarray, ids: np.ndarray, V: np.ndarray, yv: np.ndarray,
                   thresholds: list[float], lcfg: LutConfig, n_classes: int, dim: int, dev: torch.device,
                   t_floor: float) -> tuple[list[dict], int, list, float]:
    """Stage 05: the sweep, timed step by step, and its table; (rows, chosen row, keeps, seconds)."""
    t0 = time.perf_counter()
    keeps = prune_sweep(X, y, ids, thresholds, lcfg.block_size, dev)
    t_prune_all = time.perf_counter() - t0
    t1 = time.perf_counter()
    nb, qst = nearest_kept(V, X, keeps, lcfg.knn_k, lcfg.block_size, dev)
    t_q = time.perf_counter() - t1
    t1 = time.perf_counter()
    lat = measure_latency(V[:LATENCY_QUERIES], X, [int(k.sum()) for k in keeps], lcfg.knn_k,
                          lcfg.block_size, dev)
    t_lat = time.perf_counter() - t1
    t1 = time.perf_counter()
    rows = sweep_rows(thresholds, keeps, y, yv, nb, n_classes, lcfg.knn_temperature, dim, lat)
    i, reason = choose_threshold(rows, types.SimpleNamespace(**vars(lcfg)))
    t_rows = time.perf_counter() - t1
    t_sweep = time.perf_counter() - t0
    print(f"\nstage 05 sweep: {t_sweep:.2f} s = {t_sweep / t_floor:.2f}x the floor "
          f"(prune at {len(thresholds)} thresholds {t_prune_all:.2f} s, val neighbours {t_q:.2f} s "
          f"[top-{qst['top_m']} lists, {qst['fallback_queries']:,} exact fallbacks], latency timing {t_lat:.2f} s, "
          f"metrics and choice {t_rows:.2f} s)")
    print(f"  {'t':>5} {'kept':>7} {'%':>6} {'top-1':>7} {'k-NN':>7} {'F1':>7} {'ms/q':>6}")
    for r in rows:
        print(f"  {r['threshold']:5.2f} {r['n_kept']:7,} {100 * r['fraction_kept']:6.1f} {r['top1_accuracy']:7.4f} "
              f"{r['knn_accuracy']:7.4f} {r['macro_f1']:7.4f} {r['latency_ms']:6.3f}")
    print(f"  chosen: {reason}")
    return rows, i, keeps, t_sweep


def _measure_prune(X: np.ndarray, y: np.ndarray, ids: np.ndarray, t: float, swept: np.ndarray, lcfg: LutConfig,
                   dev: torch.device, t_cls: float) -> tuple[float, bool]:
    """Stage 06 at the chosen threshold: its seconds, and whether it keeps what the sweep kept."""
    prune(X[:64], y[:64], ids[:64], t)
    t0 = time.perf_counter()
    keep = prune(X, y, ids, t, lcfg.block_size, dev)
    t_prune = time.perf_counter() - t0
    same = bool(np.array_equal(keep, swept))
    print(f"\nstage 06 prune at {t:g}: {t_prune:.2f} s = {t_prune / t_cls:.2f}x the per-class products; kept "
          f"{int(keep.sum()):,} of {keep.size:,}; identical to the sweep's LUT at {t:g}: {same}")
    return t_prune, same

if __name__ == "__main__":
    main()
