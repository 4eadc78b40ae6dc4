"""Reading a feature store's vectors: whole splits, chosen images, or block by block.

``VectorReads`` is mixed into ``common.store.sqlite.FeatureStore`` (and so ``PgFeatureStore``);
it uses the store's ``path``, its read transactions and dialect hooks (``read_tx``, ``sql``,
``id_param``, ``stream_cursor``) and the model checks of ``common.store.models.ModelTable``.
``decode`` is the one place stored bytes become numbers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from ..errors import UserError
from .containers import Vectors, check_unit_vectors
from .schema import (
    _SQL_ALL_COUNT,
    _SQL_ALL_ROWS,
    _SQL_IDS_ROWS,
    _SQL_SPLIT_COUNT,
    _SQL_SPLIT_ROWS,
    DTYPES,
    READ_BLOCK_BYTES,
    SPLITS,
    STAGE,
    _split_list,
    raw_connection,
)

if TYPE_CHECKING:
    import sqlite3


class VectorReads:
    """The vector reads of a feature store (a mixin of ``FeatureStore``)."""

    def _dtype_of(self, dim: int) -> str:
        """The dtype of the vectors of ``dim`` values in this store (from ``models``; one per
        dimension, else ``UserError``): what ``decode`` reads when its caller does not say."""
        got = {m.dtype for m in self.models() if m.dim == int(dim)}
        if len(got) != 1:
            held = "; ".join(m.describe() for m in self.models()) or "no model"
            raise UserError(f"{self.path} holds {held}: which vectors of dim {dim} to read is ambiguous: rerun {STAGE}")
        return got.pop()

    def decode(self, blobs: Sequence[bytes], ids: np.ndarray, dim: int, out: np.ndarray | None = None,
                dtype: str | None = None) -> np.ndarray:
        """The vectors of ``blobs`` (one per id) as float32 (m, dim), into ``out`` when given;
        checked finite and unit-norm (``check_unit_vectors``). The one place blobs become numbers.

        ``dtype``: the model's (``ModelInfo.dtype``; looked up from ``dim`` when None). float16
        values convert to float32 exactly and are not re-normalised: every reader (and the LUT
        that stage 06 writes back as float16) sees the numbers as stored."""
        dtype = dtype or self._dtype_of(dim)
        np_dtype = np.dtype(DTYPES[dtype])
        m = len(blobs)
        blob = b"".join(blobs)
        if len(blob) != m * dim * np_dtype.itemsize:
            raise UserError(f"{self.path}: stored vectors are not {dim} {dtype} values each: rerun {STAGE} with --force")
        X = np.frombuffer(blob, dtype=np_dtype).reshape(m, dim)
        if out is not None:
            out[...] = X
            X = out
        elif np_dtype != np.float32:
            X = X.astype(np.float32)
        check_unit_vectors(X, ids, self.path)
        return X

    def _fill(self, cur: sqlite3.Cursor, out: np.ndarray, ids: np.ndarray, labels: list[str] | None,
              dtype: str | None = None) -> int:
        """Stream (id[, label], blob) rows into preallocated arrays, a block of rows at a time."""
        n, dim = out.shape
        block = max(1, READ_BLOCK_BYTES // (4 * dim))  # float32 rows of ``out`` per block
        k = 0
        while True:
            rows = cur.fetchmany(block)
            if not rows:
                break
            m = len(rows)
            if k + m > n:
                raise RuntimeError(f"{self.path} changed while it was read")
            cols = list(zip(*rows))
            ids[k:k + m] = cols[0]
            self.decode(cols[-1], ids[k:k + m], dim, out[k:k + m], dtype)
            if labels is not None:
                labels.extend(cols[1])
            k += m
        return k

    def count_vectors(self, splits: Sequence[str], model_id: int) -> int:
        """How many images of ``splits`` have a vector of ``model_id`` (no row is read)."""
        with self.read_tx() as conn:
            return int(raw_connection(conn).execute(self.sql(
                "SELECT count(*) FROM images i JOIN vectors v ON v.image_id = i.id AND v.model_id = ? "
                f"WHERE i.split IN ({_split_list(splits)})"), (int(model_id),)).fetchone()[0])

    def split_rows(self, splits: Sequence[str], model_id: int) -> tuple[np.ndarray, list[str], list[str]]:
        """(image ids, labels, paths) of the images of ``splits`` that have a vector of ``model_id``,
        by image id: the rows ``iter_blocks`` yields, in its order (no vector is read)."""
        info = self.require_complete(model_id)
        with self.read_tx() as conn:
            rows = raw_connection(conn).execute(self.sql(
                "SELECT i.id, i.label, i.path FROM images i JOIN vectors v ON v.image_id = i.id AND v.model_id = ? "
                f"WHERE i.split IN ({_split_list(splits)}) ORDER BY i.id"), (info.id,)).fetchall()
        return (np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)), [r[1] for r in rows],
                [r[2] for r in rows])

    def iter_blocks(self, splits: Sequence[str], model_id: int, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every vector of ``splits`` by image id (the order of ``split_rows``, and of ``load_split``
        merged by ``common.store.containers.merge``), as blocks ``(ids (m,), X float32 (m, D))`` of at most
        ``block_rows`` rows, checked, in one read snapshot: memory holds about one block whatever the
        store's size (``common.retrieval.streamed``'s exact search).

        Each split is read by its own cursor in id order (the ``images_split`` index: no sort of
        vector blobs), and the splits are interleaved by id block by block.
        """
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        info = self.require_complete(model_id)
        dim = info.dim
        with self.read_tx() as conn:
            # which split each row of the id order comes from: two small arrays, read in chunks
            # (the split as its index in ``splits``: no Python object per row is kept)
            cases = " ".join(f"WHEN '{s}' THEN {k}" for k, s in enumerate(splits))
            cur = self.stream_cursor(conn)
            cur.execute(self.sql(
                f"SELECT i.id, CASE i.split {cases} END FROM images i JOIN vectors v ON v.image_id = i.id "
                f"AND v.model_id = ? WHERE i.split IN ({_split_list(splits)}) ORDER BY i.id"), (info.id,))
            parts = []
            while chunk := cur.fetchmany(65536):
                parts.append(np.array(chunk, dtype=np.int64).reshape(-1, 2))
            cur.close()
            pairs = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
            order, which = pairs[:, 0].copy(), pairs[:, 1].copy()
            del parts, pairs
            curs = []
            try:
                for split in splits:
                    cur = self.stream_cursor(conn)
                    cur.execute(self.sql(_SQL_SPLIT_ROWS), (info.id, split))
                    curs.append(cur)
                for a in range(0, order.size, block_rows):
                    ids = order[a:a + block_rows]
                    w = which[a:a + block_rows]
                    X = np.empty((ids.size, dim), dtype=np.float32)
                    for s, cur in enumerate(curs):
                        sel = np.flatnonzero(w == s)
                        if not sel.size:
                            continue
                        got = cur.fetchmany(sel.size)
                        if len(got) != sel.size or any(int(g[0]) != int(i) for g, i in zip(got, ids[sel])):
                            raise UserError(f"{self.path} changed while it was read: rerun the stage")
                        X[sel] = self.decode([g[-1] for g in got], ids[sel], dim, None, info.dtype)
                    yield ids, X
            finally:
                for cur in curs:
                    cur.close()

    def load_split(self, split: str | None, model_id: int, classes: Sequence[str]) -> Vectors:
        """One split's ``Vectors`` (class indices in ``classes``, paths and ids), ordered by image id."""
        ids, labels, X = self.load_matrix(split, model_id)
        from ..data.labels import class_index  # here: the store module imports no torch (data does)

        y = class_index(labels, classes, lambda v: f"{self.path}: label {v!r} of the {split or 'whole'} store is not a "
                        f"class of the model: rerun {STAGE}")
        path_of = {r.id: r.path for r in self.images(split)}
        return Vectors(X, y, [path_of[int(i)] for i in ids], ids)

    def load_matrix(self, split: str | None, model_id: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(image ids int64 (N,), labels (N,), vectors float32 (N, D)) of one split (all when
        None) for a complete model, ordered by image id."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        info = self.require_complete(model_id)
        with self.read_tx() as conn:
            if split is None:
                n = raw_connection(conn).execute(self.sql(_SQL_ALL_COUNT), (info.id,)).fetchone()[0]
                cur = self.stream_cursor(conn)
                cur.execute(self.sql(_SQL_ALL_ROWS), (info.id,))
            else:
                n = raw_connection(conn).execute(self.sql(_SQL_SPLIT_COUNT), (info.id, split)).fetchone()[0]
                cur = self.stream_cursor(conn)
                cur.execute(self.sql(_SQL_SPLIT_ROWS), (info.id, split))
            X = np.empty((n, info.dim), dtype=np.float32)
            ids = np.empty(n, dtype=np.int64)
            labels: list[str] = []
            k = self._fill(cur, X, ids, labels, info.dtype)
            cur.close()
        if k != n:
            raise RuntimeError(f"{self.path} changed while it was read")
        return ids, labels, X

    def load_vectors(self, image_ids: Sequence[int] | np.ndarray, model_id: int) -> np.ndarray:
        """float32 (N, D) vectors of ``image_ids`` (in that order) for a complete model."""
        info = self.require_complete(model_id)
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        uniq = np.unique(ids)
        X = np.empty((uniq.size, info.dim), dtype=np.float32)
        got = np.empty(uniq.size, dtype=np.int64)
        with self.read_tx() as conn:
            cur = self.stream_cursor(conn)
            cur.execute(self.sql(_SQL_IDS_ROWS), (info.id, self.id_param(uniq)))
            k = self._fill(cur, X, got, None, info.dtype)
            cur.close()
        if k != uniq.size:
            missing = np.setdiff1d(uniq, got[:k])
            raise UserError(f"{self.path}: images {missing[:5].tolist()} have no vector of {info.describe()}: "
                            f"rerun {STAGE}")
        if uniq.size == ids.size and (ids.size < 2 or bool((np.diff(ids) > 0).all())):
            return X
        return X[np.searchsorted(uniq, ids)]

    def labels_of(self, image_ids: Sequence[int] | np.ndarray) -> list[str]:
        """Labels of ``image_ids``, in that order."""
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        with self.read_tx() as conn:
            lab = dict(raw_connection(conn).execute(self.sql("SELECT id, label FROM images WHERE id IN "
                                                  "(SELECT value FROM json_each(?))"),
                                          (self.id_param(np.unique(ids)),)).fetchall())
        try:
            return [lab[int(i)] for i in ids]
        except KeyError as e:
            raise UserError(f"{self.path} has no image {e.args[0]}: rerun {STAGE}") from None
