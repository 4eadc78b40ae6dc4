"""Exact search over a gallery streamed from the store (``common.streaming``): the same answers as
the in-memory search, block by block, with bounded memory. Stages 05-07 streamed on the demo run:
tests/e2e/test_streamed_stages.py."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import ROOT

from common.evaluate.decide import classify
from common.evaluate.metrics import retrieval_metrics
from common.retrieval import search as retrieval_search
from common.retrieval.search import search_classes
from common.retrieval.streamed import StoreMatrix, block_rows
from common.store.containers import Vectors, merge, subset
from common.store.maintenance import open_store
from common.store.sqlite import FeatureStore

DIM = 24
CLASSES = ["a", "b", "c", "d", "e"]


def _store(path: Any, n: int = 300, seed: int = 0, dup: bool = True, dtype: str = "float32") -> tuple[FeatureStore, int]:
    """A store of ``n`` clustered unit vectors in train/val/test/extra, with exact duplicates (ties)."""
    rng = np.random.default_rng(seed)
    splits = rng.choice(["train", "train", "extra", "val", "test"], n)
    labels = rng.integers(0, len(CLASSES), n)
    centres = rng.normal(size=(len(CLASSES), DIM))
    X = centres[labels] + 0.8 * rng.normal(size=(n, DIM))
    if dup:
        X[10:20] = X[0]  # ten copies of one vector (one class): ties across blocks
        labels[10:20] = labels[0]
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    st = open_store(path, create=True)
    rows = [SimpleNamespace(path=f"/img/{i:04d}.png", label=CLASSES[labels[i]], split=str(splits[i]), sha256=f"{i}")
            for i in rng.permutation(n)]  # ids are given in path order: splits interleave
    st.sync_images(rows)
    info, _ = st.register_model(checkpoint_sha256="c" * 64, embedding="encoder", backbone="t", dim=DIM,
                                mean=[0, 0, 0], std=[1, 1, 1], image_size=8, pad_fill=0, classes=CLASSES,
                                checkpoint_path="x.pt", dtype=dtype)
    recs = st.images()
    st.write_vectors(info.id, [r.id for r in recs], X[[int(r.path[5:9]) for r in recs]])
    st.mark_complete(info.id)
    return st, info.id


def _gallery(st: FeatureStore, path: Path, mid: int, rows_per_block: int) -> tuple[Vectors, Vectors]:
    """(in memory, streamed) train + extra gallery."""
    mem = merge(st.load_split("train", mid, CLASSES), st.load_split("extra", mid, CLASSES))
    ids, labels, paths = st.split_rows(("train", "extra"), mid)
    sm = StoreMatrix(path, mid, ("train", "extra"), ids, DIM, rows_per_block)
    streamed = Vectors(sm, np.array([CLASSES.index(v) for v in labels]), paths, ids)
    return mem, streamed


def _same_lists(s1, i1, s2, i2) -> None:
    """The same neighbour lists: equal rows, except that rows whose similarities are equal to the
    last float32 bits (exact duplicates: a blocked product may round them differently) may swap."""
    np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-6)
    key = lambda s, i: np.lexsort((i, -np.round(s.astype(np.float64), 5)), axis=1)  # noqa: E731
    assert np.array_equal(np.take_along_axis(i1, key(s1, i1), 1), np.take_along_axis(i2, key(s2, i2), 1))


@pytest.mark.parametrize("rows_per_block,dtype", [(1, "float32"), (7, "float32"), (64, "float16"),
                                                  (10_000, "float32")])
def test_streamed_search_equals_in_memory(tmp_path, rows_per_block, dtype):
    p = tmp_path / "f.sqlite"
    st, mid = _store(p, dtype=dtype)
    mem, streamed = _gallery(st, p, mid, rows_per_block)
    assert np.array_equal(mem.ids, streamed.ids) and mem.paths == streamed.paths
    assert np.array_equal(mem.labels, streamed.labels) and streamed.X.shape == mem.X.shape
    q = np.concatenate([st.load_split("val", mid, CLASSES).X, mem.X[:3]])  # gallery rows as queries: ties
    for k in (1, 5, 40, 10_000):
        s1, i1 = retrieval_search.topk(q, mem.X, k, block_size=16)
        s2, i2 = retrieval_search.topk(q, streamed.X, k, block_size=16)
        _same_lists(s1, i1, s2, i2)
    a = search_classes(q, mem, len(CLASSES), 16)
    b = search_classes(q, streamed, len(CLASSES), 16)
    assert np.array_equal(a.idx, b.idx)
    np.testing.assert_allclose(a.sims, b.sims, rtol=0, atol=1e-6)
    for method in ("top1", "knn"):
        kw = dict(method=method, top_k=3, k=7, temperature=0.07, reject_below=None, block_size=16)
        d1, d2 = classify(q, mem, len(CLASSES), **kw), classify(q, streamed, len(CLASSES), **kw)
        assert np.array_equal(d1.raw, d2.raw) and np.array_equal(d1.candidates, d2.candidates)
        assert np.array_equal(d1.nn_idx, d2.nn_idx)
    # the ten duplicates of row 0: ties go to the lower gallery row, as in one pass
    dup = np.flatnonzero((mem.X == mem.X[0]).all(1))
    if dup.size > 1:
        _, i = retrieval_search.topk(mem.X[:1], streamed.X, dup.size)
        assert i[0].tolist() == dup.tolist()
    # MAP@R and precision@1 in few passes
    y = st.load_split("val", mid, CLASSES).labels
    qv = st.load_split("val", mid, CLASSES).X
    r1 = retrieval_metrics(qv, y, mem.X, mem.labels, retrieval_search.topk, block_size=16)
    r2 = retrieval_metrics(qv, y, streamed.X, streamed.labels, retrieval_search.topk, block_size=16)
    assert r1 == pytest.approx(r2, abs=1e-12)
    st.close()


def test_streamed_from_postgres_equals_in_memory(pg_store):
    """The same blocks, rows and neighbours from a PostgreSQL store (server-side cursors, one per split)."""
    st, mid = _store(pg_store, dtype="float16")
    mem, streamed = _gallery(st, pg_store, mid, 9)
    assert np.array_equal(np.concatenate([x for _, x in streamed.X.blocks()]), mem.X)
    q = st.load_split("val", mid, CLASSES).X
    _same_lists(*retrieval_search.topk(q, mem.X, 6), *retrieval_search.topk(q, streamed.X, 6))
    st.close()


def test_streamed_subset_and_refusals(tmp_path):
    p = tmp_path / "f.sqlite"
    st, mid = _store(p, dup=False)
    mem, streamed = _gallery(st, p, mid, 5)
    keep = mem.labels != 2
    m2, s2 = subset(mem, keep), subset(streamed, keep)
    assert isinstance(s2.X, StoreMatrix) and len(s2) == len(m2) and np.array_equal(s2.X.ids, m2.ids)
    keep2 = np.arange(len(m2)) % 3 != 0  # a subset of a subset
    m3, s3 = subset(m2, keep2), subset(s2, keep2)
    q = st.load_split("test", mid, CLASSES).X
    assert np.array_equal(retrieval_search.topk(q, m3.X, 4)[1], retrieval_search.topk(q, s3.X, 4)[1])
    blocks = list(s3.X.blocks())
    assert np.array_equal(np.concatenate([x for _, x in blocks]), m3.X)
    assert [b for b, _ in blocks] == list(np.cumsum([0] + [x.shape[0] for _, x in blocks])[:-1])
    with pytest.raises(TypeError, match="streamed from the store"):
        np.asarray(streamed.X)  # never loaded by accident
    with pytest.raises(TypeError, match="boolean mask"):
        streamed.X[3]
    # the store changed under a streamed gallery: refused, not silently mixed
    recs = st.images("train")
    st.sync_images([SimpleNamespace(path=r.path, label=r.label, split=r.split, sha256=r.sha256)
                    for r in st.images() if r.id != recs[0].id])
    with pytest.raises(Exception, match="changed since its rows were listed|incomplete"):
        retrieval_search.topk(q, streamed.X, 3)
    st.close()


def test_block_rows():
    assert block_rows(2048, 0) == 256  # search.max_memory_gib: 0 -> small blocks
    assert block_rows(2048, 16 * 2**30) == 8192  # 64 MiB of vectors
    assert block_rows(2048, 2**28) == 8192 and block_rows(2048, 2**24) == 512


def test_streamed_search_memory_is_bounded(tmp_path):
    """Peak RSS of a streamed top-k over 60,000 x 512 vectors (117 MiB) stays far below loading them."""
    p = tmp_path / "big.sqlite"
    rng = np.random.default_rng(1)
    n = 60_000
    with FeatureStore(p, create=True) as st:
        st.sync_images([SimpleNamespace(path=f"/i/{i:06d}", label="ab"[i % 2], split="train", sha256="s")
                        for i in range(n)])
        info, _ = st.register_model(checkpoint_sha256="c" * 64, embedding="encoder", backbone="t", dim=512,
                                    mean=[0, 0, 0], std=[1, 1, 1], image_size=8, pad_fill=0, classes=["a", "b"],
                                    checkpoint_path="x.pt")
        ids = [r.id for r in st.images()]
        for a in range(0, n, 10_000):
            X = rng.normal(size=(min(10_000, n - a), 512)).astype(np.float32)
            st.write_vectors(info.id, ids[a:a + 10_000], X / np.linalg.norm(X, axis=1, keepdims=True))
        st.mark_complete(info.id)
    code = textwrap.dedent(f"""
        import resource, sys, threading, time, numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        from common.store.sqlite import FeatureStore
        from common.retrieval.search import topk
        from common.retrieval.streamed import StoreMatrix
        st = FeatureStore({str(p)!r}); mid = st.current_model().id
        ids, _, _ = st.split_rows(("train",), mid)
        q = np.random.default_rng(0).normal(size=(200, 512)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        topk(q[:2], np.eye(512, dtype=np.float32), 1)  # warm up torch
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
        base, peak, done = rss(), [0], []
        def watch():
            while not done:
                peak[0] = max(peak[0], rss()); time.sleep(0.002)
        t = threading.Thread(target=watch); t.start()
        if sys.argv[1] == "stream":
            s, i = topk(q, StoreMatrix({str(p)!r}, mid, ("train",), ids, 512, 2048), 10)
        else:
            s, i = topk(q, st.load_split("train", mid, ["a", "b"]).X, 10)
        done.append(1); t.join()
        print((max(peak[0], rss()) - base) / 2**20, i[:, 0].sum())
    """)
    out = {}
    for how in ("stream", "load"):
        r = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out[how] = r.stdout.split()
    assert out["stream"][1] == out["load"][1]  # the same neighbours
    grow_stream, grow_load = float(out["stream"][0]), float(out["load"][0])
    assert grow_load > 100, out  # loading holds the 117 MiB matrix
    assert grow_stream < 40, out  # streaming holds about one 4 MiB block (and its similarities)


def test_prune_and_sweep_streamed_equal_in_memory(tmp_path):
    """Stages 05-06's library on a gallery that stays in the store: pruning class by class and the
    sweep's val neighbours (with the exact fallback) equal the in-memory ones."""
    from common.retrieval.prune import prune, prune_sweep
    from common.retrieval.sweep import nearest_kept

    p = tmp_path / "f.sqlite"
    st, mid = _store(p, n=400)
    mem, streamed = _gallery(st, p, mid, 16)
    ts = [0.0, 0.3, 0.6, 0.9, 1.0]
    for t in ts:
        assert np.array_equal(prune(mem.X, mem.labels, mem.ids, t, 8), prune(streamed.X, streamed.labels,
                                                                                        streamed.ids, t, 8))
    k1 = prune_sweep(mem.X, mem.labels, mem.ids, ts, 8)
    k2 = prune_sweep(streamed.X, streamed.labels, streamed.ids, ts, 8)
    assert np.array_equal(k1, k2) and k1[0].sum() < k1[-1].sum()
    q = st.load_split("val", mid, CLASSES).X
    for top_m in (None, 3):  # 3: most queries need the exact fallback at the sparse thresholds
        n1, s1 = nearest_kept(q, mem.X, k1, 5, 16, top_m=top_m)
        n2, s2 = nearest_kept(q, streamed.X, k2, 5, 16, top_m=top_m)
        assert s1 == s2 and (top_m is None or s1["fallback_queries"] > 0)
        for (a_s, a_i), (b_s, b_i) in zip(n1, n2):
            _same_lists(a_s, a_i, b_s, b_i)
    st.close()
