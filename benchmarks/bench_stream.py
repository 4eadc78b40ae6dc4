"""Benchmark: exact search over a gallery streamed from the store (``common.streaming``) against
loading it whole, in the same run.

A store of ``--n`` x ``--dim`` random unit vectors (SQLite; ``--postgres`` adds a PostgreSQL
store on a ``pgserver`` server) and ``--queries`` query vectors. Each way runs in a fresh
subprocess (so its peak RSS is its own):

- ``load``: ``load_matrix`` then the two exact searches of stage 07 (``retrieval.topk`` for the
  k-NN vote and open-set scores, ``inference.search_classes`` for the per-class nearest items);
- ``stream``: the same two searches on a ``StoreMatrix`` (``search.max_memory_gib`` below the
  gallery): each is one pass over the store in blocks of ``block_rows(dim, budget)`` rows.

Reported: seconds (load, each search, total), peak RSS growth over the process's RSS before the
first read (VmHWM, reset just before), and whether both ways found the same neighbours.

Usage: python benchmarks/bench_stream.py [--n 200000] [--dim 2048] [--queries 1000] [--postgres]
       python benchmarks/bench_stream.py --n 1000000 --ways stream
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_store import N_CLASSES, _chunk, _peak_growth, _write_store  # noqa: E402


def child(target_json: str, model_id: int, how: str, queries: int, k: int, budget_gib: float, out: str) -> None:
    """One way, in this (fresh) process: prints a JSON line of seconds and peak RSS growth."""
    from common.retrieval.search import search_classes, topk
    from common.retrieval.streamed import GIB, StoreMatrix, block_rows
    from common.store.maintenance import open_store
    from common.store.postgres import PgStore

    t = json.loads(target_json)
    target = PgStore(**t) if isinstance(t, dict) else Path(t)
    classes = [f"class_{i:02d}" for i in range(N_CLASSES)]
    with open_store(target) as st:
        dim = st.model_info(model_id).dim
    Q = _chunk(99_999, queries, dim)
    from common.store.containers import Vectors

    warm = Vectors(np.eye(dim, dtype=np.float32)[:N_CLASSES], np.arange(N_CLASSES), [""] * N_CLASSES)
    topk(Q[:2], warm.X, 1)  # warm up torch (first calls allocate thread pools)
    search_classes(Q[:2], warm, N_CLASSES, 1024)

    def run():
        t0 = time.perf_counter()
        with open_store(target) as st:
            if how == "load":
                g = st.load_split("train", model_id, classes)
            else:
                ids, labels, paths = st.split_rows(("train",), model_id)
                index = {c: i for i, c in enumerate(classes)}
                g = Vectors(StoreMatrix(target, model_id, ("train",), ids, dim, block_rows(dim, budget_gib * GIB)),
                            np.array([index[v] for v in labels]), paths, ids)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        s, i = topk(Q, g.X, k, block_size=1024)
        t_topk = time.perf_counter() - t0
        t0 = time.perf_counter()
        cs = search_classes(Q, g, N_CLASSES, 1024)
        t_cls = time.perf_counter() - t0
        return g, s, i, cs, t_load, t_topk, t_cls

    (g, s, i, cs, t_load, t_topk, t_cls), secs, grow = _peak_growth(run)
    np.savez(out, s=s, i=i, cs=cs.sims, ci=cs.idx)
    print(json.dumps({"how": how, "load_s": t_load, "topk_s": t_topk, "class_best_s": t_cls, "total_s": secs,
                      "peak_growth_mib": grow, "rows_per_block": getattr(g.X, "rows_per_block", None)}))


def compare(a: str, b: str) -> dict[str, float]:
    x, y = np.load(a), np.load(b)
    return {"same_topk_rows": float((x["i"] == y["i"]).mean()), "same_class_best_rows": float((x["ci"] == y["ci"]).mean()),
            "max_sim_diff": float(max(np.abs(x["s"] - y["s"]).max(), np.abs(x["cs"] - y["cs"]).max()))}


def bench(target, model_id: int, a: argparse.Namespace, tmp: Path, name: str) -> list[dict]:
    rows = []
    tj = json.dumps(str(target) if isinstance(target, Path) else {"url": target.url, "schema": target.schema})
    for how in a.ways:
        r = subprocess.run([sys.executable, __file__, "--child", tj, str(model_id), how, str(a.queries), str(a.k),
                            str(a.budget_gib), str(tmp / f"{name}_{how}.npz")], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{name} {how} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    gib = a.n * a.dim * 4 / 2**30
    print(f"\n{name}: {a.n:,} x {a.dim} vectors ({gib:.2f} GiB), {a.queries} queries, k={a.k}, "
          f"blocks of {rows[-1]['rows_per_block']} rows")
    print(f"{'':<8} {'load s':>8} {'top-k s':>8} {'class s':>8} {'total s':>8} {'peak RSS +MiB':>14}")
    for r in rows:
        print(f"{r['how']:<8} {r['load_s']:>8.2f} {r['topk_s']:>8.2f} {r['class_best_s']:>8.2f} {r['total_s']:>8.2f} "
              f"{r['peak_growth_mib']:>14.0f}")
    if len(rows) < 2:
        return rows
    load, stream = rows
    same = compare(str(tmp / f"{name}_load.npz"), str(tmp / f"{name}_stream.npz"))
    rows.append(same)
    print(f"stream / load: time {stream['total_s'] / load['total_s']:.2f}x, peak memory "
          f"{stream['peak_growth_mib'] / max(load['peak_growth_mib'], 1):.3f}x; same top-k rows {same['same_topk_rows']:.4f}, "
          f"same per-class rows {same['same_class_best_rows']:.4f}, max |sim diff| {same['max_sim_diff']:.2e}")
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, tj, mid, how, q, k, budget, out = sys.argv
        child(tj, int(mid), how, int(q), int(k), float(budget), out)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--budget-gib", type=float, default=16.0, help="search.max_memory_gib (sets the block size)")
    ap.add_argument("--postgres", action="store_true", help="also a PostgreSQL store (pgserver)")
    ap.add_argument("--ways", nargs="+", choices=("load", "stream"), default=["load", "stream"],
                    help="stream alone shows the bound where loading would not fit")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        db = tmp / "features.sqlite"
        t0 = time.perf_counter()
        _, mid = _write_store(db, a.n, a.dim)
        print(f"wrote {a.n:,} vectors to SQLite in {time.perf_counter() - t0:.1f} s")
        bench(db, mid, a, tmp, "SQLite")
        if a.postgres:
            import pgserver

            from common.store.postgres import PgStore

            srv = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
            try:
                url = f"postgresql+psycopg://postgres@/postgres?host={tmp / 'pg'}"
                target = PgStore(url, "bench")
                t0 = time.perf_counter()
                _, mid = _write_store(target, a.n, a.dim)
                print(f"wrote {a.n:,} vectors to PostgreSQL in {time.perf_counter() - t0:.1f} s")
                bench(target, mid, a, tmp, "PostgreSQL")
            finally:
                srv.cleanup()


if __name__ == "__main__":
    main()
