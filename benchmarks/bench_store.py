"""Benchmark: the feature store (``common.features``) at DYB-PlanktonNet scale, and stage 04's balance.

1. Write: 33,000 x 2048 synthetic L2-normalised float32 vectors (the DYB gallery: 70 % of 47k
   images), random labels of 87 classes, written as stage 04 writes them (``write_vectors`` in
   chunks of ``WRITE_CHUNK_ROWS`` rows, one transaction each, then ``mark_complete``; the time
   includes closing the store, i.e. the final WAL checkpoint) against the reference pattern: plain
   sqlite3, one ``INSERT`` per row with a ``torch.save``d tensor blob (``io.BytesIO``), a commit every
   256 rows (default rollback journal).
2. Load: the whole gallery as one float32 matrix (``load_matrix("train", model)``) against the
   pattern's read-back (``SELECT`` every row, ``torch.load`` per row, ``torch.stack``); best of a few
   runs, warm page cache for both. Peak memory of the load is measured two ways: tracemalloc
   (Python and numpy allocations) in this process, and the peak-RSS growth (VmHWM, reset just
   before the load) of a fresh subprocess that only opens the store and loads it.
3. ``content_digest`` of the store (stage 04's manifest digest, recomputed by every later
   stage's freshness check).
4. Stage 04's balance: embedding throughput on this CPU (``common.extract.embed_batch`` on random
   images, timm ``test_resnet`` at 32 px and ``seresnext50_32x4d`` at 224 px, batch 16, random
   weights, a few batches) and the ratio of store write throughput to embedding throughput.

5. ``--postgres``: SQLite and PostgreSQL (a server started by ``pgserver`` in a temporary
   folder) at ``--n`` vectors (default 200,000 x 2048 = 1.6 GiB; 1,000,000 is 8 GiB): write as
   stage 04 does (chunks of ``WRITE_CHUNK_ROWS``, generated on the fly so the writer holds one
   chunk; PostgreSQL: binary ``COPY``), then stream every vector back through ``verify_store``
   (checked block by block, bounded memory) and load the whole matrix (``load_matrix``); against
   the baselines in the same run: one ``INSERT`` per row (one ``execute`` each, and psycopg's
   pipelined ``executemany``; a commit per chunk) on ``--baseline-n`` rows (default ``--n``).
   vectors/s and the peak RSS growth of each step.

Usage:  python benchmarks/bench_store.py [--quick]
        python benchmarks/bench_store.py --postgres [--n 200000] [--baseline-n N]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.model.extract import WRITE_CHUNK_ROWS  # noqa: E402  (stage 04's rows per write transaction)
from common.store.maintenance import content_digest  # noqa: E402
from common.store.sqlite import FeatureStore  # noqa: E402

N_CLASSES = 87  # DYB-PlanktonNet
PATTERN_COMMIT_EVERY = 256  # the reference pattern commits every this many rows


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dim), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    labels = [f"class_{i:02d}" for i in rng.integers(0, N_CLASSES, n)]
    paths = [f"/data/DYB-PlanktonNet/img_{i:06d}.jpg" for i in range(n)]  # sorted = index order = image id order
    return X, labels, paths


def fresh(path: Path) -> Path:
    """``path`` with any earlier database (and its WAL files) removed."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


def best(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


# ----------------------------------------------------------------------------- reference pattern


def pattern_write(db: Path, X: np.ndarray, labels: list[str], paths: list[str]) -> float:
    import torch

    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE features (id INTEGER PRIMARY KEY, path TEXT, label TEXT, feature BLOB)")
    conn.commit()
    t0 = time.perf_counter()
    for i in range(X.shape[0]):
        buf = io.BytesIO()
        torch.save(torch.from_numpy(X[i]), buf)
        conn.execute("INSERT INTO features (path, label, feature) VALUES (?, ?, ?)", (paths[i], labels[i], buf.getvalue()))
        if (i + 1) % PATTERN_COMMIT_EVERY == 0:
            conn.commit()
    conn.commit()
    conn.close()
    return time.perf_counter() - t0


def pattern_read(db: Path) -> np.ndarray:
    import torch

    conn = sqlite3.connect(db)
    vecs, labels = [], []
    for label, blob in conn.execute("SELECT label, feature FROM features ORDER BY id"):
        vecs.append(torch.load(io.BytesIO(blob)))
        labels.append(label)
    conn.close()
    return torch.stack(vecs).numpy()


# ----------------------------------------------------------------------------- the store


def store_write(db: Path, X: np.ndarray, labels: list[str], paths: list[str]) -> tuple[float, float, float, int]:
    """(sync images s, write vectors s, close s, model id)."""
    t0 = time.perf_counter()
    store = FeatureStore(db, create=True)
    store.sync_images(SimpleNamespace(path=p, label=lab, split="train", sha256="0" * 64) for p, lab in zip(paths, labels))
    info, _ = store.register_model(checkpoint_sha256="f" * 64, embedding="encoder", backbone="seresnext50_32x4d",
                                   dim=X.shape[1], mean=[0.1] * 3, std=[0.2] * 3, image_size=224, pad_fill=0,
                                   classes=sorted(set(labels)), checkpoint_path="best.pt")
    todo = np.array([r.id for r in store.missing_vectors(info.id)], dtype=np.int64)
    t1 = time.perf_counter()
    for i in range(0, todo.size, WRITE_CHUNK_ROWS):
        store.write_vectors(info.id, todo[i:i + WRITE_CHUNK_ROWS], X[i:i + WRITE_CHUNK_ROWS])
    store.mark_complete(info.id)
    t2 = time.perf_counter()
    store.close()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, info.id


def rss_of_load(db: Path, model_id: int) -> dict[str, float] | None:
    """Memory growth (MiB) of ``load_matrix`` in a fresh subprocess, from /proc/self/status (Linux).

    The peak RSS mark (VmHWM) is reset just before the load (``/proc/self/clear_refs``), so
    ``peak`` is the peak resident growth during the load; ``anon`` is the growth of anonymous
    memory (the matrix and any copies), ``file`` that of mapped file pages (none unless SQLite
    memory-maps the file). None where /proc is unavailable.
    """
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from common.store.sqlite import FeatureStore

def status():
    out = {{}}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024
    return out

s = FeatureStore({str(db)!r})
s.model_info({model_id})
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = status()
ids, labels, X = s.load_matrix("train", {model_id})
after = status()
print(json.dumps({{"peak": after["VmHWM"] - before["VmRSS"], "anon": after["RssAnon"] - before["RssAnon"],
                  "file": after["RssFile"] - before["RssFile"], "matrix": X.nbytes / 2**20}}))
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, OSError):
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def embed_rate(backbone: str, size: int, batch: int, batches: int) -> float:
    """Images/s of ``embed_batch`` on random input (random weights, eval mode, this CPU)."""
    import timm
    import torch

    from common.model.embed import embed_batch

    class Enc(torch.nn.Module):  # the encoder part of a SupConModel: timm backbone, pooled features
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)

        def encoder(self, x):
            return self.backbone(x)

    model = Enc().eval()
    x = torch.randn(batch, 3, size, size)
    embed_batch(model, x, "encoder", "off", torch.device("cpu"))  # warm-up
    t0 = time.perf_counter()
    for _ in range(batches):
        embed_batch(model, x, "encoder", "off", torch.device("cpu"))
    return batch * batches / (time.perf_counter() - t0)


def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024
    return out


def _peak_growth(fn, *args):
    """(result, seconds, peak RSS growth in MiB during ``fn(*args)``): VmHWM reset just before (Linux)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status()["VmRSS"]
    t0 = time.perf_counter()
    out = fn(*args)
    secs = time.perf_counter() - t0
    return out, secs, _status()["VmHWM"] - before


def _chunk(i: int, rows: int, dim: int) -> np.ndarray:
    X = np.random.default_rng(1000 + i).standard_normal((rows, dim), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X


def _write_store(target, n: int, dim: int, vectors: bool = True) -> tuple[float, int]:
    """(seconds spent in write_vectors + mark_complete, model id); vectors made chunk by chunk
    (``vectors=False``: only the images and the model)."""
    from common.store.maintenance import open_store

    with open_store(target, create=True) as store:
        store.sync_images(SimpleNamespace(path=f"/data/img_{i:08d}.jpg", label=f"class_{i % N_CLASSES:02d}",
                                          split="train", sha256="0" * 64) for i in range(n))
        info, _ = store.register_model(checkpoint_sha256="f" * 64, embedding="encoder", backbone="seresnext50_32x4d",
                                       dim=dim, mean=[0.1] * 3, std=[0.2] * 3, image_size=224, pad_fill=0,
                                       classes=[f"class_{i:02d}" for i in range(N_CLASSES)], checkpoint_path="best.pt")
        spent = 0.0
        if not vectors:
            return spent, info.id
        for k, s in enumerate(range(0, n, WRITE_CHUNK_ROWS)):
            rows = min(WRITE_CHUNK_ROWS, n - s)
            X = _chunk(k, rows, dim)
            t0 = time.perf_counter()
            store.write_vectors(info.id, np.arange(s + 1, s + rows + 1), X)
            spent += time.perf_counter() - t0
        t0 = time.perf_counter()
        store.mark_complete(info.id)
    return spent + time.perf_counter() - t0, info.id


def _load_shape(target, model_id: int) -> tuple[int, int]:
    from common.store.maintenance import open_store

    with open_store(target) as st:
        return st.load_matrix("train", model_id)[2].shape


def _row_inserts(url: str, n: int, dim: int, pipelined: bool) -> float:
    """Seconds to write ``n`` vectors into a fresh store's ``vectors`` table (same table, keys and
    foreign keys as ``write_vectors``) as one INSERT per row, a commit per chunk: psycopg's
    ``executemany`` (pipelined: no wait for each row's answer) or one ``execute`` per row."""
    import psycopg
    from sqlalchemy.engine import make_url

    from common.store.maintenance import remove_store
    from common.store.postgres import PgStore

    target = PgStore(url, "bench_rows")
    remove_store(target)
    _write_store(target, n, dim, vectors=False)
    u = make_url(url)
    with psycopg.connect(dbname=u.database, user=u.username, host=u.query["host"],
                         options="-c search_path=bench_rows") as conn:
        spent = 0.0
        for k, s in enumerate(range(0, n, WRITE_CHUNK_ROWS)):
            rows = min(WRITE_CHUNK_ROWS, n - s)
            X = _chunk(k, rows, dim)
            t0 = time.perf_counter()
            sql = "INSERT INTO vectors (image_id, model_id, vector) VALUES (%s, %s, %s)"
            with conn.cursor() as cur:
                if pipelined:
                    cur.executemany(sql, [(s + i + 1, 1, X[i].tobytes()) for i in range(rows)])
                else:
                    for i in range(rows):
                        cur.execute(sql, (s + i + 1, 1, X[i].tobytes()))
            conn.commit()
            spent += time.perf_counter() - t0
    remove_store(target)
    return spent


def bench_postgres(n: int, dim: int, baseline_n: int) -> None:
    import pgserver

    from common.store.maintenance import content_digest, verify_store
    from common.store.postgres import PgStore

    gib = n * dim * 4 / 2**30
    print(f"feature store on SQLite and PostgreSQL: {n:,} x {dim} float32 vectors ({gib:.2f} GiB), "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench_pg_", dir=os.environ.get("BENCH_TMP", "/tmp")) as tmp:
        tmp = Path(tmp)
        srv = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
        try:
            url = f"postgresql+psycopg://postgres@/postgres?host={tmp / 'pg'}"
            targets = {"SQLite": tmp / "features.sqlite", "PostgreSQL": PgStore(url, "bench")}
            rates = {}
            for name, target in targets.items():
                (secs, mid), _, peak_w = _peak_growth(_write_store, target, n, dim)
                checked, t_stream, peak_s = _peak_growth(verify_store, target, mid)
                assert checked == n
                shape, t_load, peak_l = _peak_growth(_load_shape, target, mid)
                assert shape == (n, dim)
                _, t_dig, _ = _peak_growth(content_digest, target)
                rates[name] = (n / secs, n / t_stream, n / t_load)
                print(f"\n## {name}")
                print(f"write (write_vectors, {WRITE_CHUNK_ROWS} rows per transaction): {secs:.1f} s = {n / secs:,.0f} "
                      f"vectors/s; peak RSS +{peak_w:.0f} MiB")
                print(f"stream every vector, checked (verify_store): {t_stream:.1f} s = {n / t_stream:,.0f} vectors/s; "
                      f"peak RSS +{peak_s:.0f} MiB (bounded: blocks of {2} MiB)")
                print(f"load the whole matrix (load_matrix): {t_load:.1f} s = {n / t_load:,.0f} vectors/s; peak RSS "
                      f"+{peak_l:.0f} MiB = {peak_l / (n * dim * 4 / 2**20):.2f}x the matrix")
                print(f"content_digest: {t_dig:.1f} s")
            pg_w = rates["PostgreSQL"][0]
            print(f"\n## baseline: one INSERT per row on PostgreSQL ({baseline_n:,} rows, a commit per "
                  f"{WRITE_CHUNK_ROWS} rows)")
            for pipelined, what in ((False, "one execute per row"), (True, "executemany, pipelined")):
                t_rows = _row_inserts(url, baseline_n, dim, pipelined)
                base = baseline_n / t_rows
                print(f"{what}: {t_rows:.1f} s = {base:,.0f} vectors/s; COPY / this: {pg_w / base:.2f}x")
            print(f"PostgreSQL / SQLite: write "
                  f"{pg_w / rates['SQLite'][0]:.2f}x, stream {rates['PostgreSQL'][1] / rates['SQLite'][1]:.2f}x, "
                  f"load {rates['PostgreSQL'][2] / rates['SQLite'][2]:.2f}x")
        finally:
            srv.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4,000 vectors, fewer repeats (a smoke run)")
    ap.add_argument("--postgres", action="store_true", help="SQLite and PostgreSQL at --n vectors (section 5)")
    ap.add_argument("--n", type=int, default=200_000, help="--postgres: vectors written and streamed")
    ap.add_argument("--dim", type=int, default=2048, help="--postgres: vector length")
    ap.add_argument("--baseline-n", type=int, default=None, help="--postgres: rows of the row-INSERT baselines "
                    "(default --n)")
    args = ap.parse_args()
    if args.postgres:
        bench_postgres(args.n, args.dim, min(args.baseline_n or args.n, args.n))
        return
    n, dim = (4000, 2048) if args.quick else (33000, 2048)
    repeat = 2 if args.quick else 3
    pat_repeat = 1 if args.quick else 2
    import torch

    print(f"feature store benchmark: {n} x {dim} float32 vectors, {N_CLASSES} classes; "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    X, labels, paths = synthetic(n, dim)
    with tempfile.TemporaryDirectory(prefix="bench_store_", dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        our_w, size_our, mid = _measure_write(tmp, X, labels, paths, repeat, pat_repeat)
        store = _measure_load(tmp, X, labels, mid, repeat, pat_repeat)
        # --- digest
        t_dig, _ = best(lambda: content_digest(tmp / "features.sqlite"), repeat)
        print(f"\n## content_digest: {t_dig:.3f} s ({size_our / t_dig:,.0f} MiB/s of store)")
        store.close()
    _measure_stage04(our_w, args.quick)


def _measure_write(tmp: Path, X: np.ndarray, labels: list, paths: list, repeat: int,
                   pat_repeat: int) -> tuple[float, float, int]:
    """## write: the pattern against the store; returns the store's vectors/s, its file MiB and model id."""
    n, dim = X.shape
    # best of a few runs each, fresh files (the machine and its disk are shared)
    t_pat_w = min(pattern_write(fresh(tmp / "pattern.sqlite"), X, labels, paths) for _ in range(pat_repeat))
    runs = [store_write(fresh(tmp / "features.sqlite"), X, labels, paths) for _ in range(repeat)]
    t_sync, t_vec, t_close, mid = min(runs, key=lambda r: r[1] + r[2])
    t_store_w = t_vec + t_close
    pat_w, our_w = n / t_pat_w, n / t_store_w
    size_pat = (tmp / "pattern.sqlite").stat().st_size / 2**20
    size_our = (tmp / "features.sqlite").stat().st_size / 2**20
    print("\n## write")
    print(f"pattern (INSERT per row, torch.save blob, commit every {PATTERN_COMMIT_EVERY} rows): "
          f"{t_pat_w:.2f} s = {pat_w:,.0f} vectors/s, file {size_pat:.0f} MiB")
    print(f"store   (write_vectors, {WRITE_CHUNK_ROWS} rows per transaction, incl. the final checkpoint): "
          f"{t_store_w:.2f} s = {our_w:,.0f} vectors/s ({n * dim * 4 / 2**20 / t_store_w:,.0f} MiB/s), "
          f"file {size_our:.0f} MiB")
    print(f"        of which transactions {t_vec:.2f} s ({n / t_vec:,.0f} vectors/s), closing (WAL checkpoint "
          f"+ fsync) {t_close:.2f} s; sync_images of {n} image rows beforehand {t_sync:.2f} s")
    print(f"ratio store / pattern: {our_w / pat_w:.1f}x  (target >= 4x)")
    return our_w, size_our, mid


def _measure_load(tmp: Path, X: np.ndarray, labels: list, mid: int, repeat: int, pat_repeat: int) -> FeatureStore:
    """## load: the whole gallery as one matrix, the pattern against the store, and the load's peak
    memory; returns the store, still open."""
    n, mib = X.shape[0], X.nbytes / 2**20
    t_pat_r, Xp = best(lambda: pattern_read(tmp / "pattern.sqlite"), pat_repeat)
    assert np.array_equal(Xp, X)
    del Xp
    store = FeatureStore(tmp / "features.sqlite")
    t_our_r, (ids, labs, Xo) = best(lambda: store.load_matrix("train", mid), repeat)
    assert np.array_equal(Xo, X) and labs == labels and ids.tolist() == list(range(1, n + 1))
    del Xo, ids, labs
    t_open_r, _ = best(lambda: FeatureStore(tmp / "features.sqlite").load_matrix("train", mid), repeat)
    tracemalloc.start()
    ids, labs, Xo = store.load_matrix("train", mid)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del Xo, ids, labs
    rss = rss_of_load(tmp / "features.sqlite", mid)
    print("\n## load (whole gallery as one float32 matrix)")
    print(f"pattern (SELECT, torch.load per row, torch.stack): {t_pat_r:.2f} s = {n / t_pat_r:,.0f} vectors/s")
    print(f"store   load_matrix('train'): {t_our_r:.3f} s = {n / t_our_r:,.0f} vectors/s "
          f"({mib / t_our_r:,.0f} MiB/s); opening the store too: {t_open_r:.3f} s")
    print(f"ratio store / pattern: {t_pat_r / t_our_r:.1f}x  (target >= 10x; whole gallery < 0.5 s: "
          f"{'yes' if t_our_r < 0.5 else 'NO'})")
    print(f"peak memory of the load (matrix = {mib:.0f} MiB; target < 2x):")
    print(f"  tracemalloc peak (Python + numpy allocations, this process): {peak / 2**20:.0f} MiB = "
          f"{peak / X.nbytes:.2f}x the matrix")
    if rss is not None:
        print(f"  fresh process, /proc/self/status: peak RSS +{rss['peak']:.0f} MiB = {rss['peak'] / mib:.2f}x the "
              f"matrix (anonymous +{rss['anon']:.0f} MiB, mapped file pages +{rss['file']:.0f} MiB)")
    return store


def _measure_stage04(our_w: float, quick: bool) -> None:
    """## stage 04: embedding rates (random weights, CPU) against the store's write rate."""
    print("\n## stage 04: embedding vs store writes (CPU, random weights, batch 16, no AMP)")
    rates = {"test_resnet @ 32 px": embed_rate("test_resnet", 32, 16, 5 if quick else 20)}
    rates["seresnext50_32x4d @ 224 px"] = embed_rate("seresnext50_32x4d", 224, 16, 1 if quick else 3)
    for name, r in rates.items():
        print(f"{name}: {r:,.1f} images/s embedded; store writes {our_w:,.0f} vectors/s = "
              f"{our_w / r:,.0f}x the embedding rate")

if __name__ == "__main__":
    main()
