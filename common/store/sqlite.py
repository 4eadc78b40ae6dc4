"""The feature store: one SQLite file, SQLAlchemy 2 over it.

Stage 04's ``features.sqlite`` holds every image of every split (train, val, test) and the
gallery-only images of ``data.gallery_extra`` (split ``extra``; gallery = train + extra), the
model that embedded them (checkpoint sha256, backbone, embedding kind, dimension, normalisation)
and one vector per image and model (float32, or float16 with ``extract.dtype: float16``). Stage 06's pruned look-up table (LUT, Yang et al.
2022), ``lut.sqlite``, is a store of the same schema holding only the kept gallery images: a
self-contained gallery. Any SQLite client can read it: the schema is ``SCHEMA_SQL`` below,
created verbatim (its comments are kept in ``sqlite_master``, so ``sqlite3 features.sqlite .schema`` shows them).

Rules the code keeps (and a reader of the file can rely on):

- **Vectors** are ``dim`` little-endian values of the model's ``models.dtype``, L2-normalised:
  float32, ``4 * dim`` bytes (``np.frombuffer(blob, "<f4")``), or float16, ``2 * dim`` bytes
  (``"<f2"``); never pickled tensors. Writes round to the model's dtype and check the norms of
  the values as stored; reads convert them to float32 exactly (``decode``, never re-normalised),
  so every reader sees float32 matrices and a float16 store's LUT holds the same bytes.
- **One checkpoint's vectors are never compared with another's**: every load takes a model id;
  ``require_model`` / ``check_same_model`` raise ``UserError`` naming both checkpoints and
  dimensions when they differ, and writing vectors of another dimension is refused.
- **A model is complete only when every image has its vector**: ``models.complete`` is set to 1
  by ``mark_complete`` in one transaction that first checks that no image lacks a vector. Adding
  images or vectors resets it to 0. Loaders refuse an incomplete model (an interrupted
  extraction) with a message to rerun ``04_extract_features.py``.
- **Every read checks every vector**: finite and unit-norm (``check_unit_vectors``), so a
  corrupted file is refused naming the image and the stage to rerun, whatever SQLite says.
- ``meta`` holds ``schema_version``, ``format``, and ``model.<id>.status`` (``extracting`` or
  ``complete``, kept in step with ``models.complete``). A store of another version is refused;
  one of version 2 (before ``models.dtype``) is upgraded in place by ``upgrade_store`` (stage 04
  calls it): one ``ALTER TABLE ... ADD COLUMN`` with ``DEFAULT 'float32'``, no vector touched.

API (``FeatureStore(path)`` opens an existing store, ``create=True`` makes one; a context manager).
This module holds the plumbing (transactions, dialect hooks), the images and the writes; the
model-table methods are ``common.store.models.ModelTable``'s and the vector reads
``common.store.reads.VectorReads``' (mixins of ``FeatureStore``):

- reading: ``images(split=None) -> [ImageRecord]``, ``load_matrix(split, model_id) -> (ids int64,
  labels list[str], float32 (N, D))`` (split None = every split), ``load_vectors(ids, model_id)``,
  ``labels_of(ids)``, ``counts()``, ``schema()``;
- models: ``models()``, ``model_info(id) -> ModelInfo``, ``find_model(sha256, embedding)``,
  ``current_model(embedding=None)`` (the most recent complete one), ``require_complete(id)``,
  ``require_model(sha256, embedding, dim)``, ``check_same_model(a, b)``;
- ``load_split(split, model_id, classes) -> Vectors`` (class indices, paths and ids);
- writing (stage 04): ``sync_images(rows)``, ``register_model(...)``, ``missing_vectors(model_id)``,
  ``write_vectors(model_id, ids, vectors)``, ``mark_complete(model_id)``;
- ``content_digest(path)``: the manifest digest (images, complete models, vectors);
  ``verify_store(path, model_id)``: every vector checked, streamed.

Speed (``benchmarks/bench_store.py``): vectors are written with one ``executemany`` per
transaction, numpy rows bound as BLOBs directly (no per-row bytes object); ``load_matrix`` streams the blobs into a
preallocated (N, D) array, one ``b"".join`` + ``np.frombuffer`` per block of rows. WAL journal,
``synchronous=NORMAL`` and a 64 KiB page (an 8 KiB vector of 2048 floats then sits in its leaf
page with no overflow chain: 7 rows per page) are set by a SQLAlchemy ``connect`` event.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import bindparam, create_engine, event, func, insert, select, update
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError

from ..errors import UserError
from .containers import ImageRecord, ModelInfo, SyncReport, _now
from .models import ModelTable
from .reads import VectorReads
from .schema import (
    _SQL_INSERT_VECTOR,
    _SQL_MISSING,
    DTYPES,
    FORMAT,
    NORM_TOLERANCE,
    SCHEMA_SQL,
    SCHEMA_VERSION,
    SPLITS,
    STAGE,
    UPGRADABLE,
    images_t,
    meta_t,
    models_t,
    raw_connection,
    vectors_t,
)

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 60.0  # wait this long for another process's write lock before failing

# Set on every new connection, before anything else (SQLAlchemy "connect" event). page_size only
# takes effect on a new, empty database, so it is in force when the tables are created; WAL must
# come after it. With WAL, synchronous=NORMAL syncs at checkpoints only: a crash can lose the last
# transactions but never corrupts the file, and an extraction resumes from the last chunk.
PRAGMAS = (
    "PRAGMA page_size = 65536",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA temp_store = MEMORY",
    # cache_size and mmap_size stay at SQLite's defaults (2 MiB, no memory map): vectors are read
    # once, in order, so a larger cache only adds memory, and measured loads were no faster with
    # either (benchmarks/bench_store.py; a memory map also puts the whole file in the RSS).
)


def _json_ids(ids: np.ndarray) -> str:
    return json.dumps(ids.tolist())


def _as_matrix(vectors: Any) -> np.ndarray:
    """Vectors as a C-contiguous little-endian float32 (N, D) array (torch tensors accepted)."""
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().float().cpu().numpy()
    return np.ascontiguousarray(vectors, dtype="<f4")


# ----------------------------------------------------------------------------- the store


def _engine(path: Path) -> Engine:
    # pysqlite's own transaction handling is switched off (isolation_level=None) and BEGIN is
    # emitted by the "begin" event (SQLAlchemy's documented recipe for pysqlite): DDL and reads
    # then run inside real transactions, and writers take the lock up front (BEGIN IMMEDIATE).
    url = URL.create("sqlite", database=str(path))  # no string formatting: any character in the path is safe
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        for pragma in PRAGMAS:
            cur.execute(pragma)
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")

    return engine


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes an SQLite store takes on disk: the file and its WAL, if any."""
    return sum(Path(f"{path}{suffix}").stat().st_size for suffix in ("", "-wal") if Path(f"{path}{suffix}").is_file())


class FeatureStore(ModelTable, VectorReads):
    """The feature store in one SQLite file. ``FeatureStore(path)`` opens an existing store;
    ``create=True`` creates it when the file is missing or empty (stage 04).

    Raises ``UserError`` naming the file when it is missing, not a feature store, or of another
    schema version. Use as a context manager or call ``close()``.
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = False, any_version: bool = False):
        self.path = Path(path)
        self.version = SCHEMA_VERSION  # of the file; another only with any_version (see _check_version)
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if not exists and not create:
            raise UserError(f"feature store {self.path} is missing: run {STAGE}")
        if not exists:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = _engine(self.path)
        try:
            with self.read_tx() as conn:
                tables = {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables and create:
                self._create_schema()
            elif "meta" not in tables:
                raise UserError(f"{self.path} is not a feature store (no meta table): delete it and rerun {STAGE}")
            else:
                self._check_version(any_version)
        except DBAPIError as e:
            self.engine.dispose()
            raise UserError(f"{self.path} is not a readable SQLite feature store ({e.orig}): "
                            f"delete it and rerun {STAGE}") from None
        except BaseException:
            self.engine.dispose()
            raise

    # -- plumbing

    def close(self) -> None:
        """Close every connection (the last one checkpoints the WAL into the file)."""
        self.engine.dispose()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r})"

    @contextlib.contextmanager
    def read_tx(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot (WAL) for every statement inside."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def write_tx(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE): committed as a whole, or rolled back."""
        with self.engine.connect().execution_options(write=True) as conn, conn.begin():
            yield conn

    # dialect hooks (PgFeatureStore overrides them): SQL text, id lists, streaming cursor
    dialect = "sqlite"
    shared = False  # True when several processes (ranks, nodes) may write vectors at once

    def sql(self, sql: str) -> str:
        """Hot-path SQL (written with ``?`` and ``json_each``) in this store's dialect."""
        return sql

    def id_param(self, ids: np.ndarray) -> Any:
        """An id list as the one parameter of ``json_each(?)``."""
        return _json_ids(ids)

    def stream_cursor(self, conn: Connection) -> Any:
        """A DBAPI cursor that fetches rows block by block (``fetchmany``)."""
        return raw_connection(conn).cursor()

    def _create_schema(self) -> None:
        with self.write_tx() as conn:
            for stmt in SCHEMA_SQL:
                conn.exec_driver_sql(stmt)
            conn.execute(insert(meta_t), [{"key": "schema_version", "value": str(SCHEMA_VERSION)},
                                          {"key": "format", "value": FORMAT},
                                          {"key": "created", "value": _now()}])
        # a temporary file written then renamed (fileio.atomic_path: stage 06's lut.sqlite): its name means
        # nothing to the reader of the log, the stage names the final file
        log.log(logging.DEBUG if self.path.name.endswith(".tmp") else logging.INFO,
                "created feature store %s (schema version %d)", self.path, SCHEMA_VERSION)

    def _check_version(self, any_version: bool = False) -> None:
        """Refuse a store of another schema version. ``any_version`` lets a version of
        ``UPGRADABLE`` open (``self.version`` says which), for ``upgrade_store`` and
        ``content_digest`` only: the other methods assume the current schema."""
        with self.read_tx() as conn:
            v = conn.execute(select(meta_t.c.value).where(meta_t.c.key == "schema_version")).scalar()
        if v == str(SCHEMA_VERSION):
            return
        if v in {str(u) for u in UPGRADABLE}:
            if any_version:
                self.version = int(v)
                return
            raise UserError(f"{self.path} is a feature store of schema version {v}, written by an older version of "
                            f"this tool (this code reads version {SCHEMA_VERSION}): rerun {STAGE}, which upgrades "
                            "it in place (no image is embedded again), then the stages after it")
        raise UserError(f"{self.path} has feature-store schema version {v}, this code reads version "
                        f"{SCHEMA_VERSION}: delete it and rerun {STAGE}")

    def schema(self) -> list[str]:
        """The CREATE statements of the file, as stored in ``sqlite_master`` (tables and indexes;
        not SQLite's own ``sqlite_sequence``, which AUTOINCREMENT keys create)."""
        with self.read_tx() as conn:
            return [r[0] for r in conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]

    def meta(self, key: str) -> str | None:
        """The ``meta`` value of ``key`` (None when absent)."""
        with self.read_tx() as conn:
            return conn.execute(select(meta_t.c.value).where(meta_t.c.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        """Set a ``meta`` value (not part of ``content_digest``)."""
        with self.write_tx() as conn:
            raw_connection(conn).execute(self.sql("INSERT INTO meta (key, value) VALUES (?, ?) "
                                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value"), (key, value))

    def counts(self) -> dict[str, int]:
        """Row counts of every table."""
        out = {}
        with self.read_tx() as conn:
            for t in (meta_t, images_t, models_t, vectors_t):
                out[t.name] = int(conn.execute(select(func.count()).select_from(t)).scalar_one())
        return out

    # -- images

    def images(self, split: str | None = None) -> list[ImageRecord]:
        """Image rows (of one split, or all when None), ordered by id."""
        q = select(images_t).order_by(images_t.c.id)
        if split is not None:
            q = q.where(images_t.c.split == split)
        with self.read_tx() as conn:
            return [ImageRecord(*r) for r in conn.execute(q)]

    def sync_images(self, rows: Iterable[Any]) -> SyncReport:
        """Make the images table equal ``rows`` (objects with ``path, label, split, sha256``, e.g.
        ``common.data.splits.SplitRow``), in one transaction.

        Kept paths keep their id. New paths get ids in path order. A removed path loses its row,
        its vectors. A path whose file content changed (sha256) loses its vectors. When images were added or changed every model becomes incomplete.
        """
        want: dict[str, tuple[str, str, str]] = {}
        for r in rows:
            if r.split not in SPLITS:
                raise UserError(f"image {r.path}: split must be one of {'/'.join(SPLITS)}, got {r.split!r}")
            if r.path in want:
                raise UserError(f"image {r.path} is listed twice in the splits")
            want[r.path] = (r.label, r.split, r.sha256 or "")
        with self.write_tx() as conn:
            have = {r.path: r for r in (ImageRecord(*x) for x in conn.execute(select(images_t)))}
            removed = np.array(sorted(have[p].id for p in have.keys() - want.keys()), dtype=np.int64)
            added = sorted(want.keys() - have.keys())
            content, moved = [], []
            for p, (label, split, sha) in want.items():
                old = have.get(p)
                if old is None:
                    continue
                if old.sha256 != sha:
                    content.append({"i": old.id, "label": label, "split": split, "sha256": sha})
                elif old.label != label or old.split != split:
                    moved.append({"i": old.id, "label": label, "split": split, "sha256": sha})
            report = SyncReport(added=len(added), removed=int(removed.size), content_changed=len(content),
                                moved=len(moved), total=len(want))
            if not report.changed:
                return report
            if removed.size:
                raw_connection(conn).execute(self.sql("DELETE FROM images WHERE id IN (SELECT value FROM json_each(?))"),
                                   (self.id_param(removed),))  # cascades to vectors
            if content:
                ids = np.array([c["i"] for c in content], dtype=np.int64)
                raw_connection(conn).execute(self.sql("DELETE FROM vectors WHERE image_id IN (SELECT value FROM json_each(?))"),
                                   (self.id_param(ids),))
            upd = (update(images_t).where(images_t.c.id == bindparam("i"))
                   .values(label=bindparam("label"), split=bindparam("split"), sha256=bindparam("sha256")))
            if content or moved:
                conn.execute(upd, content + moved)
            if added:
                conn.execute(insert(images_t), [{"path": p, "label": want[p][0], "split": want[p][1],
                                                 "sha256": want[p][2]} for p in added])
            if added or content:
                self._set_complete(conn, None, False)
        log.info("images: %d added, %d removed, %d with new content, %d relabelled or moved, %d in all",
                 report.added, report.removed, report.content_changed, report.moved, report.total)
        return report

    # -- vectors

    def missing_vectors(self, model_id: int) -> list[ImageRecord]:
        """Images that have no vector of ``model_id`` yet, by id (the extraction's to-do list)."""
        with self.read_tx() as conn:
            return [ImageRecord(*r) for r in raw_connection(conn).execute(self.sql(_SQL_MISSING), (int(model_id),))]

    def write_vectors(self, model_id: int, image_ids: Sequence[int] | np.ndarray, vectors: Any) -> int:
        """Insert one vector per image for ``model_id``, in one transaction; returns the rows written.

        ``vectors``: (N, dim) L2-normalised, stored as the model's dtype (rounded to float16 for a
        float16 model). A dimension other than the model's is a ``UserError`` naming both;
        non-finite or non-normalised rows (checked on the values as stored), or an image that
        already has a vector of this model, are errors. The model becomes incomplete until
        ``mark_complete``.
        """
        X = _as_matrix(vectors)
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        info = self.model_info(model_id)
        if X.ndim != 2 or X.shape[1] != info.dim:
            got = X.shape[1] if X.ndim == 2 else f"shape {X.shape}"
            raise UserError(f"vectors of dim {got} cannot be stored for {info.describe()}: its dim is "
                            f"{info.dim} (in {self.path})")
        if X.shape[0] != ids.size:
            raise ValueError(f"{X.shape[0]} vectors for {ids.size} image ids")
        if ids.size == 0:
            return 0
        if info.dtype != "float32":  # round to the stored dtype first: the checks are on what is stored
            with np.errstate(over="ignore"):  # a value beyond float16's range becomes inf, refused below
                X = np.ascontiguousarray(X, dtype=DTYPES[info.dtype])
        if not np.isfinite(X).all():
            raise ValueError(f"non-finite values in the vectors for {info.describe()}")
        norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
        if np.abs(norms - 1.0).max() > NORM_TOLERANCE:
            raise ValueError(f"vectors must be L2-normalised (norms {norms.min():.4f} to {norms.max():.4f})")
        mid = int(model_id)
        with self.write_tx() as conn:
            n = self._insert_vectors(conn, mid, ids, X)
            if info.complete:
                self._set_complete(conn, mid, False)
        return n

    def _insert_vectors(self, conn: Connection, model_id: int, ids: np.ndarray, X: np.ndarray) -> int:
        # numpy rows are bound as BLOBs through the buffer protocol: no per-row bytes copy
        raw_connection(conn).executemany(_SQL_INSERT_VECTOR, zip(ids.tolist(), [model_id] * ids.size, X))
        return int(ids.size)

    def mark_complete(self, model_id: int) -> ModelInfo:
        """Mark a model complete, in the transaction that checks every image has its vector."""
        with self.write_tx() as conn:
            n = raw_connection(conn).execute(self.sql(f"SELECT count(*) FROM ({_SQL_MISSING}) AS missing"),
                                   (int(model_id),)).fetchone()[0]
            if n:
                raise RuntimeError(f"{n} images of {self.path} have no vector of model {model_id} yet")
            done = conn.execute(select(models_t.c.complete).where(models_t.c.id == int(model_id))).scalar()
            if done is None:
                raise UserError(f"{self.path} holds no model {model_id}: rerun {STAGE}")
            if not done:  # already complete: write nothing (a rerun leaves the file untouched)
                self._set_complete(conn, int(model_id), True)
        return self.model_info(model_id)

    def compact(self) -> tuple[int, int]:
        """Give the pages of deleted rows back to the file system (SQLite ``VACUUM``: the file is
        rewritten, so it needs as much free disk as the store; its content is unchanged). Stage 04
        calls it after a model was replaced (another checkpoint, embedding or ``extract.dtype``),
        whose vectors otherwise leave the file at its old size. Returns (bytes before, after)."""
        before = file_bytes(self.path)
        self.engine.dispose()  # VACUUM runs outside any transaction, on a connection of its own
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        return before, file_bytes(self.path)









