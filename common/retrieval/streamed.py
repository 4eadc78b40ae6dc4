"""Exact search over a gallery that stays in the feature store: memory bounded by one block.

A gallery whose vectors do not fit in memory (``search.max_memory_gib``) is not loaded: stage 07
gets a ``StoreMatrix``, which stands where the (G, D) float32 matrix would (``Vectors.X``): it has
a shape, and yields its rows a block at a time from the store (``store.sqlite.FeatureStore.iter_blocks``: one
read snapshot, every vector checked), in image-id order, which is the order of the in-memory
gallery (``store.containers.merge``). The gallery's labels, ids and paths stay in memory (about 250
bytes per image with its path string, against ``4 * D`` for its vector).

Exact search then runs block by block, with running results merged after each block:

- ``topk``: the ``k`` best rows of every query. Each block's own top-k (where it pays,
  ``search.use_kernel``: the exact kernel, ``kernel.topk``; else a float32 product and
  ``exact.block_topk``; ties to the lower row) is merged with the running list and ordered by
  (similarity descending, row ascending): the same total order as ``search.topk`` on the whole
  matrix, so the answer is the same rows (the kernel's similarities are exact; a float32 product
  over a block may differ from the whole-matrix product in the last bit).
- ``class_best``: the nearest row of every class for every query (``search.search_classes``):
  a running (Q, C) maximum, replaced only by a strictly larger similarity, so ties stay with the
  lower row as in one pass. Float32 products, as ``search_classes`` (the kernel's ``class_best``
  is not faster).

Every search is one pass over the store; the queries, the running lists and one block's
similarities (``block_size`` queries x ``block_rows``) are in memory. A ``StoreMatrix`` refuses to
become a numpy array (``__array__`` raises), so code that would quietly load the whole gallery
fails in the tests instead.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)


STREAM_BLOCK_BYTES = 64 * 2**20  # vector bytes per block read from the store (at most)
MIN_BLOCK_ROWS = 256  # rows per block at least (search.max_memory_gib: 0 streams in blocks of this many rows)
GIB = 2**30


def block_rows(dim: int, budget_bytes: float) -> int:
    """Rows per streamed block: a quarter of the memory budget, at most ``STREAM_BLOCK_BYTES``,
    at least ``MIN_BLOCK_ROWS``."""
    return max(MIN_BLOCK_ROWS, int(min(STREAM_BLOCK_BYTES, budget_bytes / 4)) // (4 * max(1, dim)))


def fits(n_rows: int, dim: int, max_memory_gib: float) -> bool:
    """True when ``n_rows`` float32 vectors of ``dim`` fit in ``search.max_memory_gib``."""
    return n_rows * dim * 4 <= max_memory_gib * GIB


class StoreMatrix:
    """The (N, D) float32 vectors of some splits of one model in a feature store, read a block at
    a time. ``mask`` (N,) bool keeps a subset of the rows (``store.containers.subset``)."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, target: Any, model_id: int, splits: tuple[str, ...], ids: np.ndarray, dim: int,
                 rows_per_block: int, mask: np.ndarray | None = None):
        self.target = target  # a SQLite path or a features.PgStore
        self.model_id = int(model_id)
        self.splits = tuple(splits)
        self.all_ids = np.asarray(ids, dtype=np.int64)  # every row of the splits, in store order
        self.dim = int(dim)
        self.rows_per_block = int(rows_per_block)
        self.mask = None if mask is None else np.asarray(mask, dtype=bool)
        if self.mask is not None and self.mask.shape != self.all_ids.shape:
            raise ValueError(f"mask of {self.mask.shape} rows for {self.all_ids.size} rows")
        self.passes = 0  # full reads of the store so far (for the log and the tests)

    @property
    def shape(self) -> tuple[int, int]:
        n = int(self.all_ids.size if self.mask is None else self.mask.sum())
        return (n, self.dim)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.dim * 4

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"StoreMatrix({self.target}, splits {'+'.join(self.splits)}, {self.shape[0]} x {self.dim})"

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(f"{self!r} is streamed from the store ({self.nbytes / GIB:.2f} GiB): it is never loaded "
                        "whole (raise search.max_memory_gib to hold it in memory)")

    def __getitem__(self, key: Any) -> "StoreMatrix":
        """Boolean row selection only (what ``store.containers.subset`` does): a new ``StoreMatrix``."""
        key = np.asarray(key)
        if key.dtype != bool or key.shape != (self.shape[0],):
            raise TypeError(f"{self!r}: only a boolean mask of its {self.shape[0]} rows selects rows")
        full = np.zeros(self.all_ids.size, dtype=bool)
        kept = np.flatnonzero(self.mask) if self.mask is not None else np.arange(self.all_ids.size)
        full[kept[key]] = True
        return StoreMatrix(self.target, self.model_id, self.splits, self.all_ids, self.dim, self.rows_per_block, full)

    @property
    def ids(self) -> np.ndarray:
        return self.all_ids if self.mask is None else self.all_ids[self.mask]

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of the (masked) rows ``rows``, in that order, read from the store (stages
        05-06 read one class at a time)."""
        from ..store.maintenance import open_store

        with open_store(self.target) as store:
            return store.load_vectors(self.ids[np.asarray(rows, dtype=np.int64)], self.model_id)

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, X (m, D) float32)`` for consecutive blocks of the (masked) rows."""
        from ..errors import UserError
        from ..store.maintenance import open_store

        t0 = time.perf_counter()
        k = 0  # rows of the unmasked order read so far
        out = 0  # rows yielded so far
        with open_store(self.target) as store:
            for ids, X in store.iter_blocks(self.splits, self.model_id, self.rows_per_block):
                m = ids.size
                if k + m > self.all_ids.size or not np.array_equal(ids, self.all_ids[k:k + m]):
                    raise UserError(f"{self.target} changed since its rows were listed: rerun the stage")
                if self.mask is not None:
                    X = X[self.mask[k:k + m]]
                k += m
                if X.shape[0]:
                    yield out, X
                    out += X.shape[0]
        if k != self.all_ids.size:
            raise UserError(f"{self.target} changed since its rows were listed: rerun the stage")
        self.passes += 1
        log.debug("streamed %d x %d vectors from %s in %.2f s", out, self.dim, self.target, time.perf_counter() - t0)


def is_streamed(x: Any) -> bool:
    return isinstance(x, StoreMatrix)


def topk(queries: Any, gallery: StoreMatrix, k: int, block_size: int = 4096,
         device: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``retrieval.topk`` over a streamed gallery: ``(sims (Q, k'), idx (Q, k'))``, k' = min(k, G),
    rows sorted by similarity descending, ties to the lower row; one pass over the store."""
    import torch

    from .codes import search_precision
    from .exact import as_tensor, block_topk, sort_desc_stable
    from .kernel import topk as kernel_topk
    from .codes import use_kernel

    if k < 1:
        raise ValueError(f"topk: k must be >= 1, got {k}")
    if block_size < 1:
        raise ValueError(f"topk: block_size must be >= 1, got {block_size}")
    dev = torch.device(device) if device is not None else (
        queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu"))
    q = as_tensor(queries, dev)
    G = len(gallery)
    Q, kk = q.shape[0], min(k, G)
    if q.ndim != 2 or (Q and q.shape[1] != gallery.dim):
        raise ValueError(f"topk: expected (Q, {gallery.dim}) queries, got {tuple(q.shape)}")
    if Q == 0 or kk == 0:
        return np.empty((Q, kk), np.float32), np.empty((Q, kk), np.int64)
    vals = torch.empty((Q, 0), dtype=torch.float32, device=dev)
    rows = torch.empty((Q, 0), dtype=torch.int64, device=dev)
    precision = search_precision(q.shape[1], dev) if use_kernel(Q, kk, dev) else None
    with torch.inference_mode():
        for start, X in gallery.blocks():
            bk = min(kk, X.shape[0])
            if precision is not None:  # the exact kernel on the block (search.use_kernel: where it pays)
                v, i = kernel_topk(q, X, bk, precision=precision, query_block=block_size)
                nv, ni = torch.from_numpy(v).to(dev), torch.from_numpy(i).to(dev) + start
            else:
                gt = as_tensor(X, dev).t()
                nv = torch.empty((Q, bk), dtype=torch.float32, device=dev)
                ni = torch.empty((Q, bk), dtype=torch.int64, device=dev)
                for a in range(0, Q, block_size):
                    v, i = block_topk(q[a:a + block_size] @ gt, bk)
                    nv[a:a + v.shape[0]], ni[a:a + v.shape[0]] = v, i + start
            vals, rows = sort_desc_stable(torch.cat([vals, nv], 1), torch.cat([rows, ni], 1))
            vals, rows = vals[:, :kk].contiguous(), rows[:, :kk].contiguous()
    return vals.cpu().numpy(), rows.cpu().numpy()


def class_best(queries: np.ndarray, gallery: StoreMatrix, labels: np.ndarray, n_classes: int, block_size: int,
               device: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The nearest row of every class for every query over a streamed gallery: ``(sims (Q, C)
    float32, -inf where the class is absent; rows (Q, C) int64, -1)``, ties to the lower row."""
    import torch

    Q, C = queries.shape[0], n_classes
    sims = np.full((Q, C), -np.inf, dtype=np.float32)
    idx = np.full((Q, C), -1, dtype=np.int64)
    if not Q or not len(gallery):
        return sims, idx
    from .exact import ClassSlices, as_tensor, class_max_block

    dev = torch.device(device) if device is not None else torch.device("cpu")
    labels = np.asarray(labels, dtype=np.int64)
    best = torch.full((Q, C), -torch.inf, dtype=torch.float32, device=dev)
    arg = torch.full((Q, C), -1, dtype=torch.int64, device=dev)
    q_all = as_tensor(queries, "cpu")
    with torch.inference_mode():
        for start, X in gallery.blocks():
            sl = ClassSlices.of(labels[start:start + X.shape[0]])
            cls = torch.from_numpy(sl.classes).to(dev)
            gt = as_tensor(X[sl.order], dev).t()
            for a in range(0, Q, block_size):
                s = q_all[a:a + block_size].to(dev) @ gt
                v, j = class_max_block(s, sl, start)
                cur_v, cur_j = best[a:a + s.shape[0]][:, cls], arg[a:a + s.shape[0]][:, cls]
                better = v > cur_v  # strictly: an equal similarity keeps the earlier (lower) row
                best[a:a + s.shape[0], cls] = torch.where(better, v, cur_v)
                arg[a:a + s.shape[0], cls] = torch.where(better, j, cur_j)
    sims[:] = best.cpu().numpy()
    idx[:] = arg.cpu().numpy()
    return sims, idx


def describe(g: StoreMatrix, path: Path | str | None = None) -> str:
    return (f"streamed from {path or g.target} in blocks of {g.rows_per_block} rows "
            f"({g.nbytes / GIB:.2f} GiB not held in memory)")
