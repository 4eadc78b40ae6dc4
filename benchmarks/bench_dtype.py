"""Benchmark: float16 stored vectors (``extract.dtype: float16``) against float32, at scale.

The gallery is ``benchmarks/bench_scale.py``'s synthetic clustered one (``--n`` x ``--dim``
L2-normalised vectors in ``--classes`` classes of Zipf sizes, classes as centres in a
``--latent``-dimensional subspace with spread and isotropic noise) and ``--queries`` queries from
the same classes. In one run, against the float32 baseline:

- **accuracy**: exact top-1 search (full similarity rows, argmax) of the queries against the
  float32 gallery and against the float16 gallery as the store returns it (each value rounded to
  float16, read back as float32 exactly, not re-normalised), with the queries in float32 (predict
  mode: queries are embedded afresh) and rounded to float16 too (evaluate mode: the test split's
  vectors come from the same store); the baseline is float32 queries against the float32 gallery: share of queries whose top-1 gallery image / class is the
  float32 search's, top-1 class accuracy of both, max and mean |similarity difference| over every
  query-gallery pair and over the top-1 similarities;
- **pruning**: the LUT rule (``common.lut.prune``, stage 06) on the first ``--prune-n`` vectors
  of both galleries (the rule's cost grows with the square of a class's size) at each of
  ``--thresholds``: vectors kept, and how many gallery images one keeps and the other does not;
- **store**: the SQLite store written as stage 04 writes it (``FeatureStore.write_vectors``, 2,048
  vectors per transaction), streamed back checked (``verify_store``) and loaded whole
  (``load_matrix``) for each dtype: vectors/s and bytes, with ratios float16 / float32.

Usage:  python benchmarks/bench_dtype.py [--quick] [--n 200000] [--dim 2048]
        (200,000 x 2048: 1.5 GiB of float32 in memory, about 2.5 GiB of stores on disk)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import add_data_args, make_data, peak_gib  # noqa: E402

from common.model.extract import WRITE_CHUNK_ROWS  # noqa: E402
from common.retrieval.prune import prune  # noqa: E402
from common.store.maintenance import store_bytes, verify_store  # noqa: E402
from common.store.sqlite import FeatureStore  # noqa: E402

QUERY_BLOCK = 50  # queries per similarity block (50 x N float32 per dtype)


def as_stored(X: np.ndarray) -> np.ndarray:
    """What a float16 store gives back for ``X``: each value rounded to float16, as float32."""
    return X.astype("<f2").astype(np.float32)


def compare(Q32: np.ndarray, Q16: np.ndarray, X32: np.ndarray, X16: np.ndarray, labels: np.ndarray,
            q_labels: np.ndarray) -> dict:
    """Exact top-1 search of ``Q32`` against the float32 gallery and of ``Q16`` against the float16
    one, and how they differ."""
    n = Q32.shape[0]
    top32, top16 = np.empty(n, np.int64), np.empty(n, np.int64)
    s32, s16 = np.empty(n, np.float32), np.empty(n, np.float32)
    max_diff, sum_diff = 0.0, 0.0
    t = {"float32": 0.0, "float16": 0.0}
    for s in range(0, n, QUERY_BLOCK):
        q = Q32[s:s + QUERY_BLOCK]
        t0 = time.perf_counter()
        a = q @ X32.T  # (b, N)
        t1 = time.perf_counter()
        b = Q16[s:s + QUERY_BLOCK] @ X16.T
        t["float32"] += t1 - t0
        t["float16"] += time.perf_counter() - t1
        rows = np.arange(q.shape[0])
        top32[s:s + len(q)], top16[s:s + len(q)] = a.argmax(1), b.argmax(1)
        s32[s:s + len(q)], s16[s:s + len(q)] = a[rows, top32[s:s + len(q)]], b[rows, top16[s:s + len(q)]]
        d = np.abs(a - b)
        max_diff = max(max_diff, float(d.max()))
        sum_diff += float(d.sum(dtype=np.float64))
    return {
        "same_top1_image": float((top32 == top16).mean()),
        "same_top1_class": float((labels[top32] == labels[top16]).mean()),
        "accuracy_float32": float((labels[top32] == q_labels).mean()),
        "accuracy_float16": float((labels[top16] == q_labels).mean()),
        "max_abs_similarity_diff": max_diff,
        "mean_abs_similarity_diff": sum_diff / (n * X32.shape[0]),
        "max_abs_top1_similarity_diff": float(np.abs(s32 - s16).max()),
        "mean_abs_top1_similarity_diff": float(np.abs(s32 - s16).mean()),
        "search_seconds": t,
    }


def store_figures(db: Path, X: np.ndarray, dtype: str) -> dict:
    """Write ``X`` as stage 04 does (one transaction per chunk), stream it back checked, load it."""
    n, dim = X.shape
    with FeatureStore(db, create=True) as store:
        store.sync_images(SimpleNamespace(path=f"/data/img_{i:08d}.jpg", label=f"class_{i % 300:03d}",
                                          split="train", sha256="0" * 64) for i in range(n))
        info, _ = store.register_model(checkpoint_sha256="f" * 64, embedding="encoder", backbone="seresnext50_32x4d",
                                       dim=dim, mean=[0.1] * 3, std=[0.2] * 3, image_size=224, pad_fill=0,
                                       classes=[f"class_{i:03d}" for i in range(300)], checkpoint_path="best.pt",
                                       dtype=dtype)
        t0 = time.perf_counter()
        for s in range(0, n, WRITE_CHUNK_ROWS):
            store.write_vectors(info.id, np.arange(s + 1, min(s + WRITE_CHUNK_ROWS, n) + 1), X[s:s + WRITE_CHUNK_ROWS])
        store.mark_complete(info.id)
        write_s = time.perf_counter() - t0
    size = store_bytes(db)
    t0 = time.perf_counter()
    assert verify_store(db, info.id) == n
    stream_s = time.perf_counter() - t0
    with FeatureStore(db) as store:
        t0 = time.perf_counter()
        M = store.load_matrix("train", info.id)[2]
        load_s = time.perf_counter() - t0
    want = X if dtype == "float32" else as_stored(X)
    assert M.dtype == np.float32 and np.array_equal(M, want)  # read back exactly as stored
    del M
    return {"bytes": size, "vector_bytes": n * dim * (2 if dtype == "float16" else 4),
            "write_per_s": n / write_s, "stream_per_s": n / stream_s, "load_per_s": n / load_s,
            "write_s": write_s, "stream_s": stream_s, "load_s": load_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20,000 vectors (a smoke run)")
    add_data_args(ap, 200_000)
    ap.add_argument("--thresholds", default="0.6,0.7,0.8", help="pruning thresholds compared (comma-separated)")
    ap.add_argument("--prune-n", type=int, default=50_000, help="gallery vectors pruned (the first ones)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()
    if a.quick:
        a.n = 20_000
    start = t0 = time.perf_counter()
    X, labels, Q, q_labels = make_data(a)
    print(f"gallery {a.n:,} x {a.dim} ({X.nbytes / 2**30:.2f} GiB float32), {a.classes} classes "
          f"(Zipf, {np.bincount(labels).max():,} down to {np.bincount(labels).min():,}), {a.queries:,} queries; "
          f"made in {time.perf_counter() - t0:.1f} s")
    X16 = as_stored(X)
    n16 = np.linalg.norm(X16.astype(np.float64), axis=1)
    print(f"float16 rounding: |norm - 1| max {np.abs(n16 - 1).max():.2e}, mean {np.abs(n16 - 1).mean():.2e}; "
          f"|value difference| max {np.abs(X16 - X).max():.2e}")
    res: dict = {"n": a.n, "dim": a.dim, "classes": a.classes, "queries": a.queries,
                 "norm_max_abs_dev": float(np.abs(n16 - 1).max())}
    for qname, queries in (("queries float32 (predict mode)", Q), ("queries float16 (evaluate mode)", as_stored(Q))):
        c = compare(Q, queries, X, X16, labels, q_labels)
        res[qname] = c
        print(f"{qname}: same top-1 image {c['same_top1_image']:.4f}, same top-1 class {c['same_top1_class']:.4f}; "
              f"top-1 class accuracy float32 {c['accuracy_float32']:.4f}, float16 {c['accuracy_float16']:.4f}; "
              f"|similarity difference| over all pairs max {c['max_abs_similarity_diff']:.2e}, mean "
              f"{c['mean_abs_similarity_diff']:.2e}; of the top-1 similarity max "
              f"{c['max_abs_top1_similarity_diff']:.2e}, mean {c['mean_abs_top1_similarity_diff']:.2e}")
    res.update(_measure_prune(X, X16, labels, min(a.prune_n, a.n), a.thresholds))
    del X16
    res.update(_measure_stores(X))
    r32, r16 = res["float32"], res["float16"]
    ratios = {k: r16[k] / r32[k] for k in ("bytes", "write_per_s", "stream_per_s", "load_per_s")}
    res["ratios_float16_over_float32"] = ratios
    print("float16 / float32: store bytes {bytes:.3f}x, write {write_per_s:.2f}x, stream {stream_per_s:.2f}x, "
          "load {load_per_s:.2f}x".format(**ratios))
    print(f"peak RSS {peak_gib():.2f} GiB; {time.perf_counter() - start:.0f} s in all")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


def _measure_prune(X: np.ndarray, X16: np.ndarray, labels: np.ndarray, m: int, thresholds: str) -> dict:
    """The LUT of the first ``m`` vectors at each threshold, pruned as float32 and as float16."""
    res = {}
    for t in (float(x) for x in thresholds.split(",")):
        t0 = time.perf_counter()
        k32 = prune(X[:m], labels[:m], None, t)
        t1 = time.perf_counter()
        k16 = prune(X16[:m], labels[:m], None, t)
        t2 = time.perf_counter()
        p = {"kept_float32": int(k32.sum()), "kept_float16": int(k16.sum()), "kept_only_float32": int((k32 & ~k16).sum()),
             "kept_only_float16": int((k16 & ~k32).sum()), "seconds_float32": t1 - t0, "seconds_float16": t2 - t1}
        res[f"prune {t:g}"] = p
        print(f"prune at {t:g}: kept {p['kept_float32']:,} (float32) / {p['kept_float16']:,} (float16) of {m:,}; "
              f"kept by one only: {p['kept_only_float32']:,} / {p['kept_only_float16']:,} "
              f"({(p['kept_only_float32'] + p['kept_only_float16']) / max(1, p['kept_float32']):.2%} of the LUT); "
              f"{t1 - t0:.1f} s / {t2 - t1:.1f} s")
    return res


def _measure_stores(X: np.ndarray) -> dict:
    """A SQLite store of ``X`` as float32 and as float16: size, write, stream and load rates."""
    res = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_dtype_"))
    try:
        for dtype in ("float32", "float16"):
            f = store_figures(tmp / f"{dtype}.sqlite", X, dtype)
            res[dtype] = f
            print(f"SQLite store, {dtype}: {f['bytes'] / 2**30:.3f} GiB ({f['vector_bytes'] / 2**30:.3f} GiB of vectors); "
                  f"write {f['write_per_s']:,.0f} vectors/s ({f['write_s']:.1f} s), stream checked "
                  f"{f['stream_per_s']:,.0f}/s ({f['stream_s']:.1f} s), load_matrix {f['load_per_s']:,.0f}/s "
                  f"({f['load_s']:.1f} s)")
            (tmp / f"{dtype}.sqlite").unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
