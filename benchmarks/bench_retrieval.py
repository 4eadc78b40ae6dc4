"""Benchmark: exact search against FAISS flat, stage 07's retrieval at DYB-PlanktonNet scale, and
predict mode end to end.

0. Exact search (``common.retrieval.kernel``), one process, the machine's CPU flags printed first:
   3,000 queries against 33,000 x 2048 (synthetic clustered vectors as below), top-1 and top-10 by
   ``faiss.IndexFlatIP``, by a float32 product per block of queries (``float32_topk``: the path
   ``retrieval.search.topk`` takes where the kernel does not pay), by the entry point
   ``retrieval.search.topk`` as the stages call it (the kernel, ``search.precision`` auto, on a gallery
   prepared once outside the timed region by ``retrieval.search.prepare``, like FAISS's ``add``; the
   preparation's time is printed) and on an unprepared gallery (its codes made at every call), and
   by ``kernel.topk`` on ready codes at each precision (bf16 / int8 candidates rescored exactly, or fp32); the bare float32 and bf16
   products (all queries x gallery) and the compute floors (the product's FLOPs at the peak rate
   of a cache-resident block). Identity checks: the same neighbours in the same order as
   the float32 product, bit-identical answers across precisions and from the entry point, and the
   exact similarity (float64 products rounded to float32) on a subset of queries. Then LUT pruning of
   one class of 3,000 x 2048 (``bench_prune``'s data): ``retrieval.prune.prune`` / ``prune_sweep``
   (the kernel's ``prune_class`` at the auto precision) and ``prune_class`` at bf16 and fp32 (float32
   products) against the bare float32 ``X @ X.T``, with identical keep masks. Section 0's figures are medians of interleaved
   rounds (``--repeat``, default 5), with the load average before and after.
1. Retrieval: a gallery of 33,000 x 2048 and 7,000 queries (synthetic clustered vectors,
   L2-normalised, 87 classes as imbalanced as DYB's) classified by ``common.evaluate.decide.classify``
   (exact search, bounded blocks) against
   - the reference pattern: one query at a time, each reading every gallery vector back from a
     SQLite table (``SELECT label, vec FROM gallery``) and computing similarities in numpy
     (timed on a subset of queries and extrapolated per query; its predictions must be identical
     to ours on that subset), and
   - the bare float32 matrix product of all queries with the gallery (the floor).
2. Predict mode end to end: a folder of synthetic images decoded, embedded (timm ``test_resnet``
   at 64 px, and a few images through ``seresnext50_32x4d`` at 224 px) and searched, with the share
   of time spent decoding, embedding and searching.

Usage:  python benchmarks/bench_retrieval.py [--quick] [--exact-only] [--threads N] [--repeat N]
"""
from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.evaluate.decide import classify  # noqa: E402
from common.retrieval.search import search_classes  # noqa: E402
from common.store.containers import Vectors  # noqa: E402

DYB_CLASS_MAX, DYB_CLASS_MIN, DYB_CLASSES = 7760, 2, 87  # DYB-PlanktonNet's largest and smallest class
NOISE = 4.0  # noise norm relative to the class centre's: overlapping classes, top-1 accuracy below 1


def class_sizes(total: int, n_classes: int = DYB_CLASSES) -> np.ndarray:
    """Class sizes falling geometrically from DYB's largest to its smallest class, scaled to ``total``."""
    s = np.exp(np.linspace(np.log(DYB_CLASS_MAX), np.log(DYB_CLASS_MIN), n_classes))
    s = np.maximum(1, np.floor(s / s.sum() * total)).astype(np.int64)
    s[0] += total - s.sum()
    return s


def clustered(n: int, centres: np.ndarray, sizes: np.ndarray, noise: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Vectors around per-class centres (``n`` in all, split like ``sizes``), L2-normalised."""
    labels = np.repeat(np.arange(len(sizes)), sizes)[:n]
    X = rng.standard_normal((labels.size, centres.shape[1]), dtype=np.float32) * np.float32(noise)
    X += centres[labels]
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, labels


def best_interleaved(fns: dict, repeat: int) -> tuple[dict, dict]:
    """Smallest wall time of each function over ``repeat`` rounds, run in turn (the machine is
    shared: interleaving exposes every contender to the same load), and each one's last result."""
    times = {k: [] for k in fns}
    out = {}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}, out


def reference_predict(db: Path, queries: np.ndarray) -> tuple[np.ndarray, float]:
    """The reference pattern: per query, SELECT every gallery blob and compute similarities in numpy."""
    con = sqlite3.connect(db)
    preds = []
    t0 = time.perf_counter()
    for q in queries:
        rows = con.execute("SELECT label, vec FROM gallery ORDER BY id").fetchall()
        labels = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        G = np.vstack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
        preds.append(labels[int(np.argmax(G @ q))])
    dt = time.perf_counter() - t0
    con.close()
    return np.array(preds), dt


def machine_line() -> str:
    """The CPU model, its matrix-product flags, the cores torch uses and the load average."""
    import os

    import torch

    from common.retrieval.kernel import matmul_flags

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{model}; {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
            f"flags: {' '.join(matmul_flags()) or 'none found'}; load average (1/5/15 min) {load}")


def peak_products(dim: int) -> dict:
    """Ten products of one cache-resident 2048 x 2048 x dim block per dtype, for ``rounds_interleaved``:
    their best time gives the kernel's peak rate (``10 * 2 * 2048^2 * dim`` FLOPs)."""
    import torch

    out = {}
    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, dim).to(dtype), torch.randn(2048, dim).to(dtype)
        out[f"peak block products {name}"] = lambda a=a, b=b: [torch.nn.functional.linear(a, b) for _ in range(10)]
    return out


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def exact_data(n_gallery: int, n_query: int, dim: int):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((DYB_CLASSES, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    G, _ = clustered(n_gallery, centres, class_sizes(n_gallery), NOISE / np.sqrt(dim), rng)
    Q, _ = clustered(n_query, centres, class_sizes(n_query), NOISE / np.sqrt(dim), rng)
    return Q, G


def rounds_interleaved(fns: dict, repeat: int) -> tuple[dict, dict]:
    """Every wall time of each function over ``repeat`` rounds, run in turn (the machine is shared:
    interleaving exposes every contender to the same load), and each one's last result."""
    times = {k: [] for k in fns}
    out = {}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return times, out


def load_line() -> str:
    import os

    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def float32_topk(Q: np.ndarray, G: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by one float32 product per block of queries and ``exact.block_topk`` (ties to the lower
    row): what ``retrieval.search.topk`` runs where the kernel does not pay (a GPU, few queries, large k)."""
    import torch

    from common.retrieval.exact import block_topk

    g = torch.from_numpy(G)
    out = [block_topk(torch.from_numpy(Q[a:a + block]) @ g.T, k) for a in range(0, len(Q), block)]
    return torch.cat([v for v, _ in out]).numpy(), torch.cat([i for _, i in out]).numpy()


def bench_exact(n_gallery: int, n_query: int, dim: int, repeat: int, check_queries: int) -> None:
    """Section 0: exact search against FAISS flat, the project's float32 top-k and the floors, every
    figure the median of ``repeat`` interleaved rounds in this one process."""
    import faiss
    import torch

    from common.retrieval import kernel as X
    from common.retrieval import search as retrieval
    from common.retrieval.codes import search_precision

    Q, G = exact_data(n_gallery, n_query, dim)
    print(f"\n## Exact search: {n_query:,} queries x {n_gallery:,} x {dim}\n{machine_line()}")
    index = faiss.IndexFlatIP(dim)
    index.add(G)
    codes, t_quant = {}, {}
    for p in ("fp32", "bf16", "int8"):
        t_quant[p], codes[p] = _timed(lambda p=p: X.quantize(G, p))
    auto = X.choose_precision(dim)
    prepared = retrieval.prepare(G)  # what stage 07 searches: the gallery's codes made at its first search, once
    t_prepare, _ = _timed(lambda: prepared.codes(search_precision(dim)))
    qt, gt = torch.from_numpy(Q), torch.from_numpy(G)
    qb, gb = qt.bfloat16(), codes["bf16"].low
    fns = {"bare float32 product (Q x G)": lambda: qt @ gt.T, "bare bf16 product": lambda: qb @ gb.T}
    for k in (1, 10):
        fns[f"faiss.IndexFlatIP k={k}"] = lambda k=k: index.search(Q, k)
        fns[f"float32 product + block_topk k={k}"] = lambda k=k: float32_topk(Q, G, k)
        fns[f"retrieval.search.topk k={k}"] = lambda k=k: retrieval.topk(Q, prepared, k)
        fns[f"search.topk, not prepared k={k}"] = lambda k=k: retrieval.topk(Q, G, k)
        for p in ("bf16", "int8", "fp32"):
            fns[f"kernel.topk {p} k={k}"] = lambda k=k, p=p: X.topk(Q, codes[p], k)
    peaks = peak_products(dim)
    load0 = load_line()
    times, res = rounds_interleaved({**fns, **peaks}, repeat)
    t = {k: float(np.median(v)) for k, v in times.items()}
    flops, block = 2.0 * n_query * n_gallery * dim, 10 * 2.0 * 2048 * 2048 * dim
    floor32 = flops / block * min(times.pop("peak block products float32"))
    floor16 = flops / block * min(times.pop("peak block products bf16"))
    print(f"load average (1/5/15 min) before the rounds {load0}, after {load_line()}; {repeat} interleaved rounds, "
          f"medians (min in brackets)")
    print(f"auto precision here: {auto}; quantising the gallery (once per gallery, like FAISS's add): "
          + ", ".join(f"{p} {v:.2f} s" for p, v in t_quant.items())
          + f"; retrieval.search.prepare's codes ({search_precision(dim)}, once, outside the timed rows) "
            f"{t_prepare:.2f} s")
    print(f"compute floor (the product's FLOPs at the best rate of a cache-resident 2048 x 2048 block, measured in "
          f"the same rounds): float32 {floor32:.2f} s, bf16 {floor16:.2f} s")
    print(f"{'':40s} {'seconds':>8s} {'(min)':>7s} {'FAISS/this':>10s} {'/bare fp32':>10s} {'/fp32 floor':>11s}")
    for name, v in times.items():
        k = 10 if name.endswith("k=10") else 1
        f, m = t[f"faiss.IndexFlatIP k={k}"], t[name]
        print(f"{name:40s} {m:8.3f} {min(v):7.3f} {f / m:10.2f} {m / t['bare float32 product (Q x G)']:10.2f} "
              f"{m / floor32:11.2f}")
    for k in (1, 10):
        f, m, e = f"faiss.IndexFlatIP k={k}", f"kernel.topk {auto} k={k}", f"retrieval.search.topk k={k}"
        print(f"goal k={k}: FAISS / retrieval.search.topk (what the stages call, gallery prepared) = "
              f"{t[f] / t[e]:.2f}x of the medians, {min(times[f]) / min(times[e]):.2f}x of the best rounds; "
              f"FAISS / kernel.topk ({auto}, the auto choice) = {t[f] / t[m]:.2f}x, {min(times[f]) / min(times[m]):.2f}x "
              f"(wanted >= 3; a loaded machine slows FAISS's threads more)")
    exact_identity(Q, G, res, codes, check_queries)
    exact_class_best(Q, G, codes["bf16"], repeat)


def exact_class_best(Q, G, codes, repeat: int) -> None:
    """The best row of each of the 87 classes per query: ``retrieval.search.search_classes`` (float32) and
    ``kernel.class_best`` (bf16 candidates): one exact dot product per (query, class) at least."""
    from common.retrieval import kernel as X

    lab = np.repeat(np.arange(DYB_CLASSES), class_sizes(len(G)))[:len(G)]
    gallery = Vectors(G, lab, [str(i) for i in range(len(G))])
    times, res = rounds_interleaved({"search_classes": lambda: search_classes(Q, gallery, DYB_CLASSES, 4096),
                                     "class_best": lambda: X.class_best(Q, codes, lab, DYB_CLASSES)}, repeat)
    t = {k: float(np.median(v)) for k, v in times.items()}
    same = np.array_equal(res["class_best"][1], res["search_classes"].idx)
    print(f"best per class ({DYB_CLASSES} classes, medians): retrieval.search.search_classes {t['search_classes']:.2f} s, "
          f"kernel.class_best bf16 {t['class_best']:.2f} s ({t['search_classes'] / t['class_best']:.2f}x); "
          f"same rows: {same} (every (query, class) needs one exact dot product: the full (Q, C) matrix costs "
          f"{len(Q) * DYB_CLASSES:,} gathered rows)")


def exact_identity(Q, G, res: dict, codes: dict, check_queries: int) -> None:
    """Identity checks of section 0 (raises SystemExit on a mismatch between precisions or with s)."""
    from common.retrieval import kernel as X

    ok = True
    for k in (1, 10):
        ref = res[f"float32 product + block_topk k={k}"]
        same = {p: res[f"kernel.topk {p} k={k}"] for p in ("bf16", "int8", "fp32")}
        same["entry"] = res[f"retrieval.search.topk k={k}"]
        same["unprepared"] = res[f"search.topk, not prepared k={k}"]
        agree = all(np.array_equal(v[0], same["fp32"][0]) and np.array_equal(v[1], same["fp32"][1])
                    for v in same.values())
        like_ref = float(np.mean(np.all(same["fp32"][1] == ref[1], axis=1)))
        fa = res[f"faiss.IndexFlatIP k={k}"][1]
        print(f"k={k}: bf16 / int8 / fp32 / retrieval.search.topk (prepared and not) answers bit-identical: {agree}; same neighbours "
              f"in the same order as the float32 product for {100 * like_ref:.2f}% of queries (float32 products may differ from s in the "
              f"last bit); as FAISS: {100 * float(np.mean(np.all(same['fp32'][1] == fa, axis=1))):.2f}%")
        sub = np.arange(0, len(Q), max(1, len(Q) // check_queries))[:check_queries]
        S = (Q[sub].astype(np.float64) @ G.astype(np.float64).T).astype(np.float32).astype(np.float64)
        cols = np.broadcast_to(np.arange(G.shape[0]), S.shape)
        want = np.lexsort((cols, -S), axis=1)[:, :k]
        exact = np.array_equal(same["bf16"][1][sub], want) and np.array_equal(
            same["bf16"][0][sub], np.take_along_axis(S, want, 1).astype(np.float32))
        print(f"k={k}: identical to the exact similarity (float64 products rounded to float32, ties to the lower "
              f"row) on {sub.size} queries: {exact}")
        ok = ok and agree and exact
    st: dict = {}
    X.topk(Q, codes["bf16"], 10, stats=st)
    print(f"bf16 top-10 rescoring: {st.get('candidates', 0) / len(Q):.1f} candidates per query, "
          f"{st.get('float32_pairs', 0) / len(Q):.1f} float32 and {st.get('exact_pairs', 0) / len(Q):.1f} float64 "
          f"dot products per query, {st.get('fallback_queries', 0)} queries fell back to fp32")
    st = {}
    X.topk(Q, codes["int8"], 10, stats=st)
    print(f"int8 top-10: {st.get('candidates', 0) / len(Q):.1f} candidates per query, "
          f"{st.get('fallback_queries', 0)} of {len(Q)} queries fell back to fp32 (the int8 window is wider)")
    if not ok:
        raise SystemExit("exact search differs between precisions or from the exact similarity: a bug")


def bench_exact_prune(n: int, dim: int, thresholds: list[float], repeat: int) -> None:
    """Section 0, pruning: one class, ``retrieval.prune.prune`` / ``prune_sweep`` (the kernel at the auto
    precision) and ``prune_class`` at bf16 and fp32 against X @ X.T."""
    import torch
    from bench_prune import clustered_class

    from common.retrieval import kernel as X
    from common.retrieval import prune as lut
    from common.retrieval.prune import prune_class

    Xc = clustered_class(n, dim)
    lab = np.zeros(n, np.int64)
    xt = torch.from_numpy(Xc)
    fns = {"bare float32 X @ X.T": lambda: xt @ xt.T}
    for t in thresholds:
        fns[f"lut.prune t={t:g}"] = lambda t=t: lut.prune(Xc, lab, None, t)
        fns[f"prune_class bf16 t={t:g}"] = lambda t=t: prune_class(Xc, [t], precision="bf16")[0]
        fns[f"prune_class fp32 t={t:g}"] = lambda t=t: prune_class(Xc, [t], precision="fp32")[0]
    fns["lut.prune_sweep (all thresholds)"] = lambda: lut.prune_sweep(Xc, lab, None, thresholds)
    fns["prune_class bf16 (all)"] = lambda: prune_class(Xc, thresholds, precision="bf16")
    fns["prune_class fp32 (all)"] = lambda: prune_class(Xc, thresholds, precision="fp32")
    codes = X.quantize(Xc, "bf16")
    fns["  of which: bf16 codes (quantize)"] = lambda: X.quantize(Xc, "bf16")
    fns["  of which: bf16 upper-triangle products"] = lambda: [  # prune_class's blocks of 512 columns
        torch.nn.functional.linear(codes.low[:a + 512], codes.low[a:a + 512]) for a in range(0, n, 512)]
    load0 = load_line()
    times, res = rounds_interleaved(fns, repeat)
    t = {k: float(np.median(v)) for k, v in times.items()}
    print(f"\n## LUT pruning: one class of {n:,} x {dim}, thresholds {thresholds}; load average {load0} before, "
          f"{load_line()} after; medians of {repeat} interleaved rounds")
    bare = t["bare float32 X @ X.T"]
    for name, v in t.items():
        print(f"{name:40s} {v:8.3f} s  {v / bare:6.2f}x the bare product")
    same = all(np.array_equal(res[f"lut.prune t={x:g}"], res[f"prune_class {p} t={x:g}"])
               for x in thresholds for p in ("bf16", "fp32")) and all(
        np.array_equal(res["lut.prune_sweep (all thresholds)"], res[f"prune_class {p} (all)"]) for p in ("bf16", "fp32"))
    st: dict = {}
    prune_class(Xc, thresholds, precision="bf16", stats=st)
    print(f"identical keep masks (per threshold and sweep): {same}; kept "
          + ", ".join(f"{int(m.sum()):,}" for m in res["prune_class bf16 (all)"])
          + f"; the sweep recomputed {st.get('float32_pairs', 0):,} pairs in float32 and "
            f"{st.get('exact_pairs', 0):,} exactly")
    if not same:
        raise SystemExit("prune_class differs between precisions or from retrieval.prune: a bug")


def bench_retrieval(n_gallery: int, n_query: int, dim: int, ref_queries: int, repeat: int) -> None:
    import torch

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((DYB_CLASSES, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    G, g_lab = clustered(n_gallery, centres, class_sizes(n_gallery), NOISE / np.sqrt(dim), rng)
    Q, q_lab = clustered(n_query, centres, class_sizes(n_query), NOISE / np.sqrt(dim), rng)
    gallery = Vectors(G, g_lab, [f"g{i}" for i in range(len(g_lab))])
    C = DYB_CLASSES
    print(f"\n## Retrieval: gallery {len(g_lab):,} x {dim}, {len(q_lab):,} queries, {C} classes, "
          f"{torch.get_num_threads()} torch threads")

    def bare():
        gt = torch.from_numpy(G)
        for s in range(0, len(Q), 4096):
            torch.from_numpy(Q[s:s + 4096]) @ gt.T

    def ours(method):
        return classify(Q, gallery, C, method=method, top_k=5, k=10, temperature=0.07, reject_below=None,
                          block_size=4096)
    t, res = best_interleaved({"bare": bare, "top1": lambda: ours("top1"), "knn": lambda: ours("knn")}, repeat)
    t_bare, t_top1, t_knn, d1, dk = t["bare"], t["top1"], t["knn"], res["top1"], res["knn"]

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "gallery.sqlite"
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE gallery (id INTEGER PRIMARY KEY, label INTEGER, vec BLOB)")
        con.executemany("INSERT INTO gallery VALUES (?, ?, ?)",
                        ((i, int(g_lab[i]), G[i].tobytes()) for i in range(len(g_lab))))
        con.commit()
        con.close()
        sub = np.random.default_rng(1).choice(len(q_lab), ref_queries, replace=False)
        ref_pred, t_ref_sub = reference_predict(db, Q[sub])
    t_ref = t_ref_sub / ref_queries * len(q_lab)
    same = bool(np.array_equal(ref_pred, d1.raw[sub]))
    acc1 = float((d1.raw == q_lab).mean())
    print(f"bare float32 matmul (all queries x gallery)    {t_bare:8.2f} s")
    print(f"ours, top-1 + 5 candidate classes              {t_top1:8.2f} s   "
          f"{len(q_lab) / t_top1:8.0f} queries/s   ratio to bare matmul {t_top1 / t_bare:.2f}x")
    print(f"ours, weighted 10-NN vote + candidates         {t_knn:8.2f} s   "
          f"{len(q_lab) / t_knn:8.0f} queries/s   ratio to bare matmul {t_knn / t_bare:.2f}x")
    print(f"reference: per-query SQLite SELECT + numpy     {t_ref:8.2f} s   (extrapolated from {ref_queries} "
          f"queries: {1000 * t_ref_sub / ref_queries:.0f} ms/query)")
    print(f"speed-up of ours (top-1) over the reference    {t_ref / t_top1:8.1f}x")
    print(f"identical predictions on the {ref_queries} reference queries: {same}; top-1 accuracy {acc1:.4f} "
          f"(k-NN {float((dk.raw == q_lab).mean()):.4f})")
    if not same:
        raise SystemExit("predictions differ from the reference: a bug")


def make_images(folder: Path, n: int, rng) -> list[str]:
    """Synthetic dark-field 'plankton': bright ellipses on black, PNG, varied sizes."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(60, 200, 2))
        im = Image.new("RGB", (w, h), (0, 0, 0))
        d = ImageDraw.Draw(im)
        x0, y0 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
        d.ellipse([x0, y0, w - 1 - x0 // 2, h - 1 - y0 // 2], fill=tuple(int(c) for c in rng.integers(80, 255, 3)))
        p = folder / f"img_{i:04d}.png"
        im.save(p)
        paths.append(str(p))
    return paths


def bench_predict(backbone: str, size: int, n_images: int, n_gallery: int, batch: int) -> None:
    import timm
    import torch

    from common.data.transforms import eval_transform

    rng = np.random.default_rng(2)

    class Encoder(torch.nn.Module):  # SupConModel's ``encoder``: the backbone's pooled output
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)

        def encoder(self, x):
            return self.backbone(x)

    model = Encoder().eval()
    dim = model.backbone.num_features
    G, g_lab = clustered(n_gallery, rng.standard_normal((DYB_CLASSES, dim), dtype=np.float32),
                         class_sizes(n_gallery), 1.0, rng)
    gallery = Vectors(G, g_lab, [f"g{i}" for i in range(len(g_lab))])
    tf = eval_transform(size, [0.1] * 3, [0.2] * 3, 0)  # pad to square, resize, normalise (as stage 04)

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp) / "new", n_images, rng)
        from common.model.embed import embed_paths  # the predict-mode loop (decoding errors reported, not fatal)
        embed_paths(paths[:2], model, tf, size, embedding="encoder", batch_size=2, num_workers=0,
                    device="cpu")  # warm-up: imports and first-call allocations are not per-image costs
        t0 = time.perf_counter()
        X, ok, errors, timing = embed_paths(paths, model, tf, size, embedding="encoder", batch_size=batch,
                                            num_workers=0, device="cpu")  # common.model.embed.embed_batch
        d = classify(X, gallery, DYB_CLASSES, method="top1", top_k=5, k=10, temperature=0.07,
                       reject_below=None, block_size=4096)
        total = time.perf_counter() - t0
    dec, emb, srch = timing["loader_wait_s"], timing["embed_s"], d.seconds
    print(f"\n## Predict mode end to end: {n_images} images, {backbone} at {size} px ({dim}-d), "
          f"gallery {len(g_lab):,}, batch {batch}, CPU, 0 workers")
    print(f"{n_images / total:8.1f} images/s   mean latency {1000 * total / n_images:.1f} ms/image (amortised)")
    print(f"time shares: decode+transform {dec / total:5.1%}   embed {emb / total:5.1%}   "
          f"search {srch / total:5.1%}   other {(total - dec - emb - srch) / total:5.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a minute)")
    ap.add_argument("--exact-only", action="store_true", help="section 0 only (exact search and pruning)")
    ap.add_argument("--threads", type=int, default=None, help="torch and FAISS threads (default: torch's default)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds of section 0 (medians reported)")
    a = ap.parse_args()
    if a.threads:
        import faiss
        import torch

        torch.set_num_threads(a.threads)
        faiss.omp_set_num_threads(a.threads)
    if a.quick:
        bench_exact(6_000, 600, 512, repeat=2, check_queries=50)
        bench_exact_prune(1_000, 512, [0.8, 0.9], repeat=2)
    else:
        bench_exact(33_000, 3_000, 2048, repeat=a.repeat, check_queries=200)
        bench_exact_prune(3_000, 2048, [0.8, 0.9, 0.95], repeat=a.repeat)
    if a.exact_only:
        return
    if a.quick:
        bench_retrieval(6_000, 1_500, 512, ref_queries=10, repeat=2)
        bench_predict("test_resnet", 64, 64, 6_000, 32)
    else:
        bench_retrieval(33_000, 7_000, 2048, ref_queries=20, repeat=3)
        bench_predict("test_resnet", 64, 200, 33_000, 64)
        bench_predict("seresnext50_32x4d", 224, 16, 33_000, 16)


if __name__ == "__main__":
    main()
