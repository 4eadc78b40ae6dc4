"""Benchmark: exact search against FAISS indexes (``common.search``) on a gallery of a million vectors.

A synthetic clustered gallery of ``--n`` x ``--dim`` L2-normalised float32 vectors in ``--classes``
classes of Zipf sizes (size of class r proportional to 1 / r), and ``--queries`` queries drawn from
the same classes. Each class is a centre in a ``--latent``-dimensional subspace (random orthonormal
axes of the full space) plus within-class spread in that subspace (``--spread``) and isotropic noise
in every dimension (``--noise``): trained embeddings have a low intrinsic dimension, and classes
overlap (exact top-1 accuracy is printed). The figures depend on that choice: a gallery of higher
intrinsic dimension needs a larger ``pca_dim`` or none.

In one run, as ratios against the baseline:

- exact: ``common.retrieval.topk`` (stage 07's exact search: float32 matrix products of blocks of
  queries with the whole gallery in memory), queries/s;
- ``search.pca_dim`` alone: exact search in the PCA space, before and after exact rescoring;
- each index of ``--indexes`` built by ``common.search.build_index`` with the pipeline's
  parameters (``--pca-dim``, ``--nlist``, ``--nprobe``, ...): build time, the index's size,
  the process's resident memory after the build and its peak (``resource.getrusage``), queries/s of
  ``AnnIndex.search`` as stage 07 runs it (``--candidates`` proposed by the index, rescored
  exactly against the gallery), and agreement with exact search: same top-1 image, same top-1
  class.

Usage:  python benchmarks/bench_scale.py [--quick] [--indexes ivf,ivfpq,hnsw] [--pca-dim 256]
        (full size: about 8 GiB for the gallery, 11 GiB peak; run it alone)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.config.schema import SearchConfig  # noqa: E402
from common.retrieval import search as retrieval_search  # noqa: E402
from common.retrieval.ann import ADD_CHUNK, AnnIndex, _faiss, agreement, build_index  # noqa: E402

GEN_CHUNK = 50_000  # gallery rows generated at a time


def rss_gib() -> float:
    """Resident memory of this process now (GiB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_gib() -> float:
    """Peak resident memory of this process so far (GiB; ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def zipf_sizes(total: int, n_classes: int) -> np.ndarray:
    """Class sizes proportional to 1 / rank, at least 2, summing to ``total``."""
    w = 1.0 / np.arange(1, n_classes + 1)
    s = np.maximum(2, np.floor(w / w.sum() * total)).astype(np.int64)
    s[0] += total - s.sum()
    return s


class Synthetic:
    """The clustered gallery and queries, generated chunk by chunk (deterministic per seed)."""

    def __init__(self, dim: int, latent: int, n_classes: int, spread: float, noise: float, seed: int):
        rng = np.random.default_rng(seed)
        basis, _ = np.linalg.qr(rng.standard_normal((dim, latent)))  # (D, L) orthonormal columns
        self.axes = np.ascontiguousarray(basis.T, dtype=np.float32)  # (L, D)
        c = rng.standard_normal((n_classes, latent)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.dim, self.latent, self.spread, self.noise = dim, latent, spread, noise

    def draw(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        z = self.centres[labels] + rng.standard_normal((labels.size, self.latent), dtype=np.float32) * np.float32(
            self.spread / np.sqrt(self.latent))
        x = z @ self.axes  # (n, D)
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(self.noise / np.sqrt(self.dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def make_data(a: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    syn = Synthetic(a.dim, a.latent, a.classes, a.spread, a.noise, a.seed)
    sizes = zipf_sizes(a.n, a.classes)
    labels = np.random.default_rng(a.seed + 1).permutation(np.repeat(np.arange(a.classes), sizes))
    X = np.empty((a.n, a.dim), dtype=np.float32)
    for i, s in enumerate(range(0, a.n, GEN_CHUNK)):
        X[s:s + GEN_CHUNK] = syn.draw(labels[s:s + GEN_CHUNK], np.random.default_rng([a.seed, 2, i]))
    q_labels = np.random.default_rng(a.seed + 3).choice(labels, a.queries)  # queries follow the class sizes
    Q = syn.draw(q_labels, np.random.default_rng([a.seed, 4]))
    return X, labels, Q, q_labels


def add_data_args(ap: argparse.ArgumentParser, n: int) -> None:
    """The options ``make_data`` reads (the synthetic gallery and its queries); ``n``: default size."""
    ap.add_argument("--n", type=int, default=n, help="gallery vectors")
    ap.add_argument("--dim", type=int, default=2048, help="vector dimension")
    ap.add_argument("--classes", type=int, default=300, help="classes (Zipf sizes)")
    ap.add_argument("--queries", type=int, default=1000, help="queries")
    ap.add_argument("--latent", type=int, default=32, help="intrinsic dimension of the classes")
    ap.add_argument("--spread", type=float, default=1.0, help="within-class spread (norm, latent space)")
    ap.add_argument("--noise", type=float, default=0.3, help="isotropic noise (norm, full space)")
    ap.add_argument("--seed", type=int, default=0)


def main() -> None:
    a = _parse_args()
    t0 = time.perf_counter()
    X, labels, Q, q_labels = make_data(a)
    print(f"gallery {a.n:,} x {a.dim} ({X.nbytes / 2**30:.2f} GiB float32) in {a.classes} classes "
          f"(largest {np.bincount(labels).max():,}, smallest {np.bincount(labels).min():,}), {a.queries:,} queries; "
          f"generated in {time.perf_counter() - t0:.1f} s; RSS {rss_gib():.2f} GiB")
    results, er, t_exact = _measure_exact(X, labels, Q, q_labels, a)
    if a.pca_dim:
        results["pca_flat"] = pca_effect(X, Q, labels, er, t_exact, a)
    for kind in [k for k in a.indexes.split(",") if k]:
        results[kind] = _measure_index(kind, X, labels, Q, er, t_exact, a)
        if a.json:  # after every index: a later one running out of time or memory keeps these
            a.json.write_text(json.dumps(results, indent=1))


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(ap, 1_000_000)
    ap.add_argument("--indexes", default="ivf,ivfpq,hnsw", help="comma-separated search.index values")
    ap.add_argument("--pca-dim", type=int, default=256, help="search.pca_dim (0: none)")
    ap.add_argument("--nlist", type=int, default=0, help="search.nlist (0: the default rule)")
    ap.add_argument("--nprobe", default="8,16,32,64", help="search.nprobe values to measure (comma-separated)")
    ap.add_argument("--pq-m", type=int, default=SearchConfig.pq_m, help="search.pq_m")
    ap.add_argument("--hnsw-m", type=int, default=SearchConfig.hnsw_m, help="search.hnsw_m")
    ap.add_argument("--ef-construction", type=int, default=SearchConfig.ef_construction, help="search.ef_construction")
    ap.add_argument("--ef-search", default="32,64,128,256", help="search.ef_search values to measure (comma-separated)")
    ap.add_argument("--train-size", type=int, default=SearchConfig.train_size, help="search.train_size")
    ap.add_argument("--candidates", type=int, default=SearchConfig.candidates, help="search.candidates")
    ap.add_argument("--block-size", type=int, default=256, help="exact search: queries per matrix product")
    ap.add_argument("--k", type=int, default=10, help="neighbours per query")
    ap.add_argument("--quick", action="store_true", help="a 50,000-vector gallery and 500 queries (sanity check)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()
    if a.quick:
        a.n, a.queries = 50_000, 500
    return a


def _measure_exact(X: np.ndarray, labels: np.ndarray, Q: np.ndarray, q_labels: np.ndarray,
                   a: argparse.Namespace) -> tuple[dict, np.ndarray, float]:
    """Exact search, the reference: the results so far, its neighbours and its seconds."""
    retrieval_search.topk(Q[:8], X, a.k, a.block_size)  # warm-up
    t0 = time.perf_counter()
    es, er = retrieval_search.topk(Q, X, a.k, a.block_size)
    t_exact = time.perf_counter() - t0
    exact_qps = a.queries / t_exact
    acc = float(np.mean(labels[er[:, 0]] == q_labels))
    print(f"exact (retrieval.topk, block {a.block_size}): {t_exact:.1f} s, {exact_qps:,.1f} queries/s; "
          f"top-1 class accuracy {acc:.4f}; peak RSS {peak_gib():.2f} GiB")
    results = {"n": a.n, "dim": a.dim, "classes": a.classes, "queries": a.queries, "threads": _threads(),
               "exact": {"seconds": t_exact, "qps": exact_qps, "top1_accuracy": acc, "peak_rss_gib": peak_gib()}}
    return results, er, t_exact


def _measure_index(kind: str, X: np.ndarray, labels: np.ndarray, Q: np.ndarray, er: np.ndarray, t_exact: float,
                   a: argparse.Namespace) -> dict:
    """One ``search.index`` kind: its build, size and, at each query setting, speed and agreement with exact search."""
    scfg = SimpleNamespace(**{**SearchConfig().__dict__, "index": kind, "nlist": a.nlist or None,
                              "pq_m": a.pq_m, "hnsw_m": a.hnsw_m, "ef_construction": a.ef_construction,
                              "train_size": a.train_size, "pca_dim": a.pca_dim or None,
                              "candidates": a.candidates})
    rss0 = rss_gib()
    ann = build_index(X, scfg, seed=a.seed)
    rss1 = rss_gib()
    with tempfile.TemporaryDirectory() as tmp:
        ann.save(Path(tmp) / "i.faiss")
        size = (Path(tmp) / "i.faiss").stat().st_size / 2**30
    print(f"{kind:6s} {ann.description}: build {ann.build_seconds:.1f} s, index {size:.3f} GiB on disk "
          f"(+{rss1 - rss0:.2f} GiB RSS, peak {peak_gib():.2f} GiB)")
    out = {"factory": ann.description, "build_seconds": ann.build_seconds, "index_gib": size,
           "rss_growth_gib": rss1 - rss0, "peak_rss_gib": peak_gib(), "search": []}
    knob = "ef_search" if kind == "hnsw" else "nprobe"
    for v in [int(x) for x in (a.ef_search if kind == "hnsw" else a.nprobe).split(",")]:
        ann.set_query_params(SimpleNamespace(**{**scfg.__dict__, "nprobe": v, "ef_search": v}))
        ann.search(Q[:8], a.k, X)  # warm-up
        t0 = time.perf_counter()
        _, rows = ann.search(Q, a.k, X)
        t_ann = time.perf_counter() - t0
        agr = agreement(er, rows, labels)
        r = {knob: v, "seconds": t_ann, "qps": a.queries / t_ann, "speedup": t_exact / t_ann, **agr}
        out["search"].append(r)
        print(f"       {knob} {v:4d}: search {t_ann:.2f} s, {r['qps']:,.0f} queries/s = {r['speedup']:.1f}x exact; "
              f"same top-1 image {agr['same_image']:.4f}, same top-1 class {agr['same_class']:.4f}", flush=True)
    del ann
    return out

def pca_effect(X: np.ndarray, Q: np.ndarray, labels: np.ndarray, exact_rows: np.ndarray, t_exact: float,
               a: argparse.Namespace) -> dict:
    """What ``search.pca_dim`` alone costs: exact search in the PCA space (``PCA<d>,L2norm,Flat``, fitted on
    the same sample as the indexes), top-1 as is and after rescoring ``--candidates`` exactly."""
    faiss = _faiss()
    t0 = time.perf_counter()
    index = faiss.index_factory(a.dim, f"PCA{a.pca_dim},L2norm,Flat", faiss.METRIC_INNER_PRODUCT)
    m = min(a.n, a.train_size)
    index.train(X[np.sort(np.random.default_rng(a.seed).choice(a.n, m, replace=False))])
    for s in range(0, a.n, ADD_CHUNK):
        index.add(X[s:s + ADD_CHUNK])
    ann = AnnIndex(index, "flat", f"PCA{a.pca_dim},L2norm,Flat", a.dim, time.perf_counter() - t0,
                          candidates=a.candidates)
    _, raw = ann.raw_search(Q, 1)
    t0 = time.perf_counter()
    _, rows = ann.search(Q, a.k, X)
    t_ann = time.perf_counter() - t0
    r = {"factory": ann.description, "build_seconds": ann.build_seconds, "qps": a.queries / t_ann,
         "speedup": t_exact / t_ann, "raw": agreement(exact_rows, raw, labels),
         "rescored": agreement(exact_rows, rows, labels)}
    print(f"pca    {ann.description} (exact search in the PCA space; the effect of search.pca_dim alone): built in "
          f"{ann.build_seconds:.1f} s; {r['qps']:,.0f} queries/s = {r['speedup']:.1f}x exact; same top-1 image / class "
          f"{r['raw']['same_image']:.4f} / {r['raw']['same_class']:.4f} as projected, "
          f"{r['rescored']['same_image']:.4f} / {r['rescored']['same_class']:.4f} after rescoring {a.candidates}",
          flush=True)
    return r


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
