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
  the values as stored; reads convert them to float32 exactly (``_decode``, never re-normalised),
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

API (``FeatureStore(path)`` opens an existing store, ``create=True`` makes one; a context manager):

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
import dataclasses
import datetime as _dt
import hashlib
import itertools
import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import (CheckConstraint, bindparam, Column, ForeignKey, Integer, LargeBinary,
                        MetaData, Table, Text, UniqueConstraint, create_engine, delete, event, func, insert,
                        select, update)
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError

from .errors import UserError

log = logging.getLogger(__name__)

# bump when SCHEMA_SQL changes; older stores are refused, never migrated silently (stage 04
# upgrades the versions in UPGRADABLE, logging it; every other stage refuses them).
# 2: split 'extra' (gallery-only images); the LUT tables left the store (stage 06 writes lut.sqlite)
# 3: models.dtype (float32 | float16 vectors)
SCHEMA_VERSION = 3
UPGRADABLE = (2,)  # older versions stage 04 upgrades in place (upgrade_store)
FORMAT = "plankton-feature-store"
EMBEDDINGS = ("encoder", "head")
SPLITS = ("train", "val", "test", "extra")  # extra: gallery-only images (data.gallery_extra), never trained on
GALLERY_SPLITS = ("train", "extra")  # the gallery stages 05-07 search
NORM_TOLERANCE = 1e-3  # |‖v‖ - 1| allowed for stored vectors (float32 and AMP round-off; float16 rounding moves a norm by <= 2**-11)
DTYPES = {"float32": "<f4", "float16": "<f2"}  # models.dtype -> the numpy dtype of its blobs (little-endian)
# models.dtype as ALTER TABLE adds it to a version-2 store (SCHEMA_SQL declares the same column)
DTYPE_COLUMN = "dtype TEXT NOT NULL DEFAULT 'float32' CHECK (dtype IN ('float32', 'float16'))"
READ_BLOCK_BYTES = 2 * 2**20  # vector bytes fetched per block when streaming blobs into a matrix (bounds the extra memory)
BUSY_TIMEOUT_S = 60.0  # wait this long for another process's write lock before failing
STAGE = "04_extract_features.py"

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

# The schema, created verbatim (one statement per item; sqlite_master keeps this text and a test
# checks that the file's schema equals it).
SCHEMA_SQL: tuple[str, ...] = (
    """CREATE TABLE meta (
    key   TEXT PRIMARY KEY,  -- 'schema_version', 'format', 'model.<id>.status'
    value TEXT NOT NULL
)""",
    """CREATE TABLE images (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,  -- stable id, never reused: vectors refer to it
    path   TEXT NOT NULL UNIQUE,  -- absolute image path, as in splits.csv
    label  TEXT NOT NULL,  -- class name (the class folder)
    split  TEXT NOT NULL CHECK (split IN ('train', 'val', 'test', 'extra')),  -- gallery = train + extra (gallery-only images, never trained on)
    sha256 TEXT NOT NULL  -- sha256 of the image file (splits.csv)
)""",
    """CREATE INDEX images_split ON images (split, id)""",
    """CREATE TABLE models (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: stages 05-07 record it
    checkpoint_sha256 TEXT NOT NULL,  -- sha256 of the checkpoint file
    embedding         TEXT NOT NULL CHECK (embedding IN ('encoder', 'head')),  -- backbone pooled output or projection head
    backbone          TEXT NOT NULL,  -- timm model name
    dim               INTEGER NOT NULL CHECK (dim > 0),  -- vector length
    mean              TEXT NOT NULL,  -- JSON [r, g, b]: normalisation mean
    std               TEXT NOT NULL,  -- JSON [r, g, b]: normalisation std
    image_size        INTEGER NOT NULL,  -- network input side (px), after padding to a square
    pad_fill          INTEGER NOT NULL,  -- grey level (0-255) used to pad to a square
    classes           TEXT NOT NULL,  -- JSON list of the checkpoint's class names
    checkpoint_path   TEXT NOT NULL,  -- where the checkpoint was read from (for information)
    epoch             INTEGER,  -- training epochs the checkpoint had completed
    created           TEXT NOT NULL,  -- ISO 8601 time this row was written
    complete          INTEGER NOT NULL DEFAULT 0 CHECK (complete IN (0, 1)),  -- 1 once every image has its vector
    dtype             TEXT NOT NULL DEFAULT 'float32' CHECK (dtype IN ('float32', 'float16')),  -- vector values: float32 (4 bytes) or float16 (2 bytes)
    UNIQUE (checkpoint_sha256, embedding)
)""",
    """CREATE TABLE vectors (
    image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    model_id INTEGER NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    vector   BLOB NOT NULL,  -- dim values of the model's dtype, little-endian, L2-normalised (4 * dim bytes float32, 2 * dim float16)
    PRIMARY KEY (image_id, model_id)
)""",
)

# The same tables for SQLAlchemy Core statements (a test checks they match the created schema).
metadata = MetaData()
meta_t = Table("meta", metadata, Column("key", Text, primary_key=True), Column("value", Text, nullable=False))
images_t = Table(
    "images", metadata,
    Column("id", Integer, primary_key=True),
    Column("path", Text, nullable=False, unique=True),
    Column("label", Text, nullable=False),
    Column("split", Text, nullable=False),
    Column("sha256", Text, nullable=False),
)
models_t = Table(
    "models", metadata,
    Column("id", Integer, primary_key=True),
    Column("checkpoint_sha256", Text, nullable=False),
    Column("embedding", Text, nullable=False),
    Column("backbone", Text, nullable=False),
    Column("dim", Integer, nullable=False),
    Column("mean", Text, nullable=False),
    Column("std", Text, nullable=False),
    Column("image_size", Integer, nullable=False),
    Column("pad_fill", Integer, nullable=False),
    Column("classes", Text, nullable=False),
    Column("checkpoint_path", Text, nullable=False),
    Column("epoch", Integer),
    Column("created", Text, nullable=False),
    Column("complete", Integer, nullable=False, default=0),
    Column("dtype", Text, nullable=False, default="float32"),
    UniqueConstraint("checkpoint_sha256", "embedding"),
    CheckConstraint("complete IN (0, 1)"),
    CheckConstraint("dtype IN ('float32', 'float16')"),
)
vectors_t = Table(
    "vectors", metadata,
    Column("image_id", Integer, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("vector", LargeBinary, nullable=False),
)

# Hot paths run on the DBAPI cursor of the SQLAlchemy connection (same transaction), with bound
# parameters only. Rows of a split, in image id order: images_split gives the order, the vectors
# primary key the lookup (no sort, no temporary b-tree of blobs).
_SQL_SPLIT_COUNT = ("SELECT count(*) FROM images i JOIN vectors v ON v.image_id = i.id AND v.model_id = ? "
                    "WHERE i.split = ?")
_SQL_SPLIT_ROWS = ("SELECT i.id, i.label, v.vector FROM images i JOIN vectors v ON v.image_id = i.id "
                   "AND v.model_id = ? WHERE i.split = ? ORDER BY i.id")
_SQL_ALL_COUNT = "SELECT count(*) FROM vectors WHERE model_id = ?"
_SQL_ALL_ROWS = ("SELECT i.id, i.label, v.vector FROM images i JOIN vectors v ON v.image_id = i.id "
                 "AND v.model_id = ? ORDER BY i.id")
_SQL_IDS_ROWS = ("SELECT v.image_id, v.vector FROM vectors v WHERE v.model_id = ? "
                 "AND v.image_id IN (SELECT value FROM json_each(?)) ORDER BY v.image_id")
_SQL_INSERT_VECTOR = "INSERT INTO vectors (image_id, model_id, vector) VALUES (?, ?, ?)"
_SQL_MISSING = ("SELECT i.id, i.path, i.label, i.split, i.sha256 FROM images i WHERE NOT EXISTS "
                "(SELECT 1 FROM vectors v WHERE v.image_id = i.id AND v.model_id = ?) ORDER BY i.id")
_SQL_DIGEST_VECTORS = "SELECT image_id, vector FROM vectors WHERE model_id = ? ORDER BY image_id"


# ----------------------------------------------------------------------------- records


@dataclass
class Vectors:
    """The one container of a set of vectors: ``X`` (N, D) float32 L2-normalised, class indices
    ``labels`` (N,) (-1 = none), image ``paths``, and the store's image ``ids`` when they come from one.
    ``X`` may be a ``common.streaming.StoreMatrix`` (a gallery read from the store block by block)."""

    X: np.ndarray
    labels: np.ndarray
    paths: list[str]
    ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not hasattr(self.X, "blocks"):  # a common.streaming.StoreMatrix stays in the store
            self.X = np.ascontiguousarray(self.X, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not (self.X.shape[0] == self.labels.shape[0] == len(self.paths)):
            raise ValueError(f"vectors, labels and paths differ in length: {self.X.shape[0]}, "
                             f"{self.labels.shape[0]}, {len(self.paths)}")
        if self.ids is not None:
            self.ids = np.asarray(self.ids, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.X.shape[0])


@dataclass(frozen=True)
class ImageRecord:
    """One row of ``images``."""

    id: int
    path: str
    label: str
    split: str
    sha256: str


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``models``: the checkpoint and the transform that produced a set of vectors."""

    id: int
    checkpoint_sha256: str
    embedding: str
    backbone: str
    dim: int
    mean: list[float]
    std: list[float]
    image_size: int
    pad_fill: int
    classes: list[str]
    checkpoint_path: str
    epoch: int | None
    created: str
    complete: bool
    dtype: str = "float32"  # the stored values: float32 or float16 (DTYPES)

    @property
    def itemsize(self) -> int:
        """Bytes per stored value (4 for float32, 2 for float16)."""
        return np.dtype(DTYPES[self.dtype]).itemsize

    def describe(self) -> str:
        """One line naming the checkpoint, embedding and dimension (for error messages)."""
        return (f"model {self.id} (checkpoint {self.checkpoint_path} sha256 {self.checkpoint_sha256[:12]}, "
                f"{self.embedding} embedding, dim {self.dim}{'' if self.dtype == 'float32' else ', ' + self.dtype})")

    def same_transform(self, other: "ModelInfo") -> bool:
        """True when both give the same stored vectors (same checkpoint, embedding, preprocessing and
        dtype: float16 vectors of a checkpoint are another model than its float32 ones)."""
        keys = ("checkpoint_sha256", "embedding", "backbone", "dim", "image_size", "pad_fill", "dtype")
        return (all(getattr(self, k) == getattr(other, k) for k in keys)
                and np.allclose(self.mean, other.mean, rtol=0, atol=1e-7)
                and np.allclose(self.std, other.std, rtol=0, atol=1e-7))


@dataclass(frozen=True)
class SyncReport:
    """What ``sync_images`` changed."""

    added: int
    removed: int
    content_changed: int  # same path, new file content: its vectors were deleted
    moved: int  # same file, new label or split (vectors kept)
    total: int

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.content_changed or self.moved)


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="microseconds")


def _norm_sql(sql: str) -> str:
    """Whitespace-normalised SQL text (to compare the documented and the created schema)."""
    return " ".join(sql.split())


def _model_from_row(r: Any) -> ModelInfo:
    m = r._mapping
    return ModelInfo(
        id=int(m["id"]), checkpoint_sha256=m["checkpoint_sha256"], embedding=m["embedding"],
        backbone=m["backbone"], dim=int(m["dim"]), mean=json.loads(m["mean"]), std=json.loads(m["std"]),
        image_size=int(m["image_size"]), pad_fill=int(m["pad_fill"]), classes=json.loads(m["classes"]),
        checkpoint_path=m["checkpoint_path"], epoch=m["epoch"], created=m["created"], complete=bool(m["complete"]),
        dtype=m["dtype"],
    )


def _split_list(splits: Sequence[str]) -> str:
    """``'train', 'extra'``: an SQL list of split names, each checked to be one of ``SPLITS`` (so quoting is safe)."""
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not splits:
        raise ValueError("no split given")
    return ", ".join(f"'{x}'" for x in splits)


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


def _raw(conn: Connection) -> sqlite3.Connection:
    """The sqlite3 connection under a SQLAlchemy connection (same transaction)."""
    return conn.connection.driver_connection  # type: ignore[return-value]


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes an SQLite store takes on disk: the file and its WAL, if any."""
    return sum(Path(f"{path}{suffix}").stat().st_size for suffix in ("", "-wal") if Path(f"{path}{suffix}").is_file())


class FeatureStore:
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
            with self._read() as conn:
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
    def _read(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot (WAL) for every statement inside."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE): committed as a whole, or rolled back."""
        with self.engine.connect().execution_options(write=True) as conn, conn.begin():
            yield conn

    # dialect hooks (PgFeatureStore overrides them): SQL text, id lists, streaming cursor
    dialect = "sqlite"
    shared = False  # True when several processes (ranks, nodes) may write vectors at once

    def _q(self, sql: str) -> str:
        """Hot-path SQL (written with ``?`` and ``json_each``) in this store's dialect."""
        return sql

    def _ids(self, ids: np.ndarray) -> Any:
        """An id list as the one parameter of ``json_each(?)``."""
        return _json_ids(ids)

    def _stream(self, conn: Connection) -> Any:
        """A DBAPI cursor that fetches rows block by block (``fetchmany``)."""
        return _raw(conn).cursor()

    def _create_schema(self) -> None:
        with self._write() as conn:
            for stmt in SCHEMA_SQL:
                conn.exec_driver_sql(stmt)
            conn.execute(insert(meta_t), [{"key": "schema_version", "value": str(SCHEMA_VERSION)},
                                          {"key": "format", "value": FORMAT},
                                          {"key": "created", "value": _now()}])
        log.info("created feature store %s (schema version %d)", self.path, SCHEMA_VERSION)

    def _check_version(self, any_version: bool = False) -> None:
        """Refuse a store of another schema version. ``any_version`` lets a version of
        ``UPGRADABLE`` open (``self.version`` says which), for ``upgrade_store`` and
        ``content_digest`` only: the other methods assume the current schema."""
        with self._read() as conn:
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
        with self._read() as conn:
            return [r[0] for r in conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]

    def meta(self, key: str) -> str | None:
        """The ``meta`` value of ``key`` (None when absent)."""
        with self._read() as conn:
            return conn.execute(select(meta_t.c.value).where(meta_t.c.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        """Set a ``meta`` value (not part of ``content_digest``)."""
        with self._write() as conn:
            _raw(conn).execute(self._q("INSERT INTO meta (key, value) VALUES (?, ?) "
                                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value"), (key, value))

    def counts(self) -> dict[str, int]:
        """Row counts of every table."""
        out = {}
        with self._read() as conn:
            for t in (meta_t, images_t, models_t, vectors_t):
                out[t.name] = int(conn.execute(select(func.count()).select_from(t)).scalar_one())
        return out

    # -- images

    def images(self, split: str | None = None) -> list[ImageRecord]:
        """Image rows (of one split, or all when None), ordered by id."""
        q = select(images_t).order_by(images_t.c.id)
        if split is not None:
            q = q.where(images_t.c.split == split)
        with self._read() as conn:
            return [ImageRecord(*r) for r in conn.execute(q)]

    def sync_images(self, rows: Iterable[Any]) -> SyncReport:
        """Make the images table equal ``rows`` (objects with ``path, label, split, sha256``, e.g.
        ``common.data.SplitRow``), in one transaction.

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
        with self._write() as conn:
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
                _raw(conn).execute(self._q("DELETE FROM images WHERE id IN (SELECT value FROM json_each(?))"),
                                   (self._ids(removed),))  # cascades to vectors
            if content:
                ids = np.array([c["i"] for c in content], dtype=np.int64)
                _raw(conn).execute(self._q("DELETE FROM vectors WHERE image_id IN (SELECT value FROM json_each(?))"),
                                   (self._ids(ids),))
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

    # -- models

    def models(self) -> list[ModelInfo]:
        """Every model row, by id."""
        with self._read() as conn:
            return [_model_from_row(r) for r in conn.execute(select(models_t).order_by(models_t.c.id))]

    def model_info(self, model_id: int) -> ModelInfo:
        """The model row ``model_id`` (``UserError`` when there is none)."""
        with self._read() as conn:
            r = conn.execute(select(models_t).where(models_t.c.id == int(model_id))).first()
        if r is None:
            raise UserError(f"{self.path} holds no model {model_id}: rerun {STAGE}")
        return _model_from_row(r)

    def find_model(self, checkpoint_sha256: str, embedding: str) -> ModelInfo | None:
        """The model row of a checkpoint and embedding kind, complete or not; None when absent."""
        with self._read() as conn:
            r = conn.execute(select(models_t).where(models_t.c.checkpoint_sha256 == checkpoint_sha256,
                                                    models_t.c.embedding == embedding)).first()
        return None if r is None else _model_from_row(r)

    def register_model(self, *, checkpoint_sha256: str, embedding: str, backbone: str, dim: int,
                       mean: Sequence[float], std: Sequence[float], image_size: int, pad_fill: int,
                       classes: Sequence[str], checkpoint_path: str, epoch: int | None = None,
                       dtype: str = "float32", replace_others: bool = True) -> tuple[ModelInfo, list[ModelInfo]]:
        """The model row for these settings, created (incomplete) when absent; one transaction.

        ``dtype``: how its vectors are stored, ``float32`` or ``float16`` (``extract.dtype``).
        An existing row of the same checkpoint and embedding whose preprocessing or dtype differs
        (other stats, image size, pad fill, float16 instead of float32) is dropped with its
        vectors and recreated; when only the dtype differs, the old model is complete and float32
        and the new one float16, its vectors are converted into the new model in the same
        transaction instead (``_convert_vectors``: what embedding again would store, without
        embedding: float16 is float32 rounded). With
        ``replace_others`` every other model (another checkpoint or embedding) is deleted with its
        vectors in the same transaction: the store then holds one model's vectors.
        Returns (the model, the models dropped).
        """
        if embedding not in EMBEDDINGS:
            raise UserError(f"extract.embedding: expected one of {'/'.join(EMBEDDINGS)}, got {embedding!r}")
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if dtype not in DTYPES:
            raise UserError(f"extract.dtype: expected one of {'/'.join(DTYPES)}, got {dtype!r}")
        values = {"checkpoint_sha256": checkpoint_sha256, "embedding": embedding, "backbone": backbone,
                  "dim": int(dim), "mean": json.dumps([float(x) for x in mean]),
                  "std": json.dumps([float(x) for x in std]), "image_size": int(image_size),
                  "pad_fill": int(pad_fill), "classes": json.dumps(list(classes)),
                  "checkpoint_path": str(checkpoint_path), "epoch": epoch, "created": _now(), "complete": 0,
                  "dtype": dtype}
        dropped: list[ModelInfo] = []
        with self._write() as conn:
            rows = [_model_from_row(r) for r in conn.execute(select(models_t).order_by(models_t.c.id))]
            wanted = ModelInfo(id=-1, **{**values, "mean": json.loads(values["mean"]),
                                         "std": json.loads(values["std"]), "classes": list(classes),
                                         "complete": False})
            keep: ModelInfo | None = None
            for m in rows:
                same_key = m.checkpoint_sha256 == checkpoint_sha256 and m.embedding == embedding
                if same_key and m.same_transform(wanted):
                    keep = m
                elif same_key or replace_others:
                    dropped.append(m)
            # float32 -> float16 of the same vectors: converted, not embedded again
            source = next((m for m in dropped if m.complete and (m.dtype, dtype) == ("float32", "float16")
                           and m.same_transform(dataclasses.replace(wanted, dtype=m.dtype))), None)
            if source is not None:  # its key is free for the new row while its vectors are converted
                conn.execute(update(models_t).where(models_t.c.id == source.id)
                             .values(checkpoint_sha256=f"{source.checkpoint_sha256}:converting"))
            else:
                self._drop_models(conn, dropped)
            if keep is None:
                new_id = conn.execute(insert(models_t).values(**values)).inserted_primary_key[0]
                self._set_status(conn, int(new_id), "extracting")
                if source is not None:
                    n = self._convert_vectors(conn, source, int(new_id), dtype)
                    self._drop_models(conn, dropped)
                    log.info("converted the %d float32 vectors of %s to %s in place: no image embedded again", n,
                             source.describe(), dtype)
            else:
                new_id = keep.id
                if keep.checkpoint_path != str(checkpoint_path) or keep.epoch != epoch:
                    conn.execute(update(models_t).where(models_t.c.id == keep.id)
                                 .values(checkpoint_path=str(checkpoint_path), epoch=epoch))
            info = _model_from_row(conn.execute(select(models_t).where(models_t.c.id == new_id)).one())
        for m in dropped:
            log.info("dropped %s with its vectors (replaced by %s)", m.describe(), info.describe())
        return info, dropped

    def _drop_models(self, conn: Connection, models: Sequence[ModelInfo]) -> None:
        for m in models:
            conn.execute(delete(models_t).where(models_t.c.id == m.id))  # cascades to vectors
            conn.execute(delete(meta_t).where(meta_t.c.key == f"model.{m.id}.status"))

    def _convert_vectors(self, conn: Connection, source: ModelInfo, model_id: int, dtype: str) -> int:
        """Copy every vector of ``source`` into ``model_id`` as ``dtype``, in ``conn``'s
        transaction, a block of rows at a time (keyset: each block is read whole before it is
        written). Every vector is checked on read and again, rounded, on write. Returns the count."""
        block = max(1, READ_BLOCK_BYTES // (source.itemsize * source.dim))
        sql = self._q("SELECT image_id, vector FROM vectors WHERE model_id = ? AND image_id > ? "
                      "ORDER BY image_id LIMIT ?")
        last, n = -1, 0
        while rows := _raw(conn).execute(sql, (source.id, last, block)).fetchall():
            ids = np.asarray([r[0] for r in rows], dtype=np.int64)
            X = self._decode([r[1] for r in rows], ids, source.dim, None, source.dtype)
            S = np.ascontiguousarray(X, dtype=DTYPES[dtype])
            norms = np.sqrt(np.einsum("ij,ij->i", S, S, dtype=np.float64))
            if not np.isfinite(norms).all() or np.abs(norms - 1.0).max() > NORM_TOLERANCE:
                raise ValueError(f"vectors of {source.describe()} are not unit-norm once stored as {dtype}")
            n += self._insert_vectors(conn, model_id, ids, S)
            last = int(ids[-1])
        return n

    def _set_status(self, conn: Connection, model_id: int, status: str) -> None:
        _raw(conn).execute(self._q("INSERT INTO meta (key, value) VALUES (?, ?) "
                                   "ON CONFLICT (key) DO UPDATE SET value = excluded.value"),
                           (f"model.{model_id}.status", status))

    def _set_complete(self, conn: Connection, model_id: int | None, complete: bool) -> None:
        """Set ``complete`` of one model (or of every model when None) and its meta status."""
        q = update(models_t).values(complete=int(complete))
        if model_id is not None:
            q = q.where(models_t.c.id == model_id)
        conn.execute(q)
        ids = [model_id] if model_id is not None else [r[0] for r in conn.execute(select(models_t.c.id))]
        for i in ids:
            self._set_status(conn, int(i), "complete" if complete else "extracting")

    def require_complete(self, model_id: int) -> ModelInfo:
        """The model row, checked complete: else ``UserError`` saying to rerun stage 04."""
        info = self.model_info(model_id)
        if not info.complete:
            raise UserError(f"{self.path}: the vectors of {info.describe()} are incomplete (an interrupted or "
                            f"unfinished extraction): rerun {STAGE}")
        return info

    def current_model(self, embedding: str | None = None) -> ModelInfo:
        """The most recent complete model (of one embedding kind, when given)."""
        cands = [m for m in self.models() if embedding is None or m.embedding == embedding]
        done = [m for m in cands if m.complete]
        if not done:
            why = "only incomplete vectors (an interrupted extraction)" if cands else "no vectors"
            raise UserError(f"{self.path} holds {why}{'' if embedding is None else f' of the {embedding} embedding'}: "
                            f"rerun {STAGE}")
        return done[-1]

    def require_model(self, checkpoint_sha256: str, embedding: str, dim: int | None = None) -> ModelInfo:
        """The complete model of a checkpoint and embedding, with dimension ``dim`` when given.

        ``UserError`` naming the checkpoint and dimension asked for and those the store holds
        when they differ (queries must be embedded by the gallery's own checkpoint).
        """
        m = self.find_model(checkpoint_sha256, embedding)
        asked = f"checkpoint sha256 {checkpoint_sha256[:12]} ({embedding} embedding{'' if dim is None else f', dim {dim}'})"
        if m is None:
            held = "; ".join(x.describe() for x in self.models()) or "no vectors"
            raise UserError(f"{self.path} holds {held}, not vectors of {asked}: vectors of different checkpoints "
                            f"cannot be compared: rerun {STAGE} with that checkpoint")
        if dim is not None and int(dim) != m.dim:
            raise UserError(f"{self.path}: {m.describe()} has dim {m.dim}, but {asked} gives dim {dim}: "
                            f"rerun {STAGE}")
        return self.require_complete(m.id)

    def check_same_model(self, model_id_a: int, model_id_b: int) -> ModelInfo:
        """``UserError`` naming both models when two sets of vectors come from different models."""
        a = self.model_info(model_id_a)
        if int(model_id_a) == int(model_id_b):
            return a
        b = self.model_info(model_id_b)
        raise UserError(f"vectors of {a.describe()} cannot be compared with vectors of {b.describe()} "
                        f"in {self.path}: embed both with one checkpoint ({STAGE})")

    # -- vectors

    def missing_vectors(self, model_id: int) -> list[ImageRecord]:
        """Images that have no vector of ``model_id`` yet, by id (the extraction's to-do list)."""
        with self._read() as conn:
            return [ImageRecord(*r) for r in _raw(conn).execute(self._q(_SQL_MISSING), (int(model_id),))]

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
        with self._write() as conn:
            n = self._insert_vectors(conn, mid, ids, X)
            if info.complete:
                self._set_complete(conn, mid, False)
        return n

    def _insert_vectors(self, conn: Connection, model_id: int, ids: np.ndarray, X: np.ndarray) -> int:
        # numpy rows are bound as BLOBs through the buffer protocol: no per-row bytes copy
        _raw(conn).executemany(_SQL_INSERT_VECTOR, zip(ids.tolist(), [model_id] * ids.size, X))
        return int(ids.size)

    def mark_complete(self, model_id: int) -> ModelInfo:
        """Mark a model complete, in the transaction that checks every image has its vector."""
        with self._write() as conn:
            n = _raw(conn).execute(self._q(f"SELECT count(*) FROM ({_SQL_MISSING}) AS missing"),
                                   (int(model_id),)).fetchone()[0]
            if n:
                raise RuntimeError(f"{n} images of {self.path} have no vector of model {model_id} yet")
            done = conn.execute(select(models_t.c.complete).where(models_t.c.id == int(model_id))).scalar()
            if done is None:
                raise UserError(f"{self.path} holds no model {model_id}: rerun {STAGE}")
            if not done:  # already complete: write nothing (a rerun leaves the file untouched)
                self._set_complete(conn, int(model_id), True)
        return self.model_info(model_id)

    def _dtype_of(self, dim: int) -> str:
        """The dtype of the vectors of ``dim`` values in this store (from ``models``; one per
        dimension, else ``UserError``): what ``_decode`` reads when its caller does not say."""
        got = {m.dtype for m in self.models() if m.dim == int(dim)}
        if len(got) != 1:
            held = "; ".join(m.describe() for m in self.models()) or "no model"
            raise UserError(f"{self.path} holds {held}: which vectors of dim {dim} to read is ambiguous: rerun {STAGE}")
        return got.pop()

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

    def _decode(self, blobs: Sequence[bytes], ids: np.ndarray, dim: int, out: np.ndarray | None = None,
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
            self._decode(cols[-1], ids[k:k + m], dim, out[k:k + m], dtype)
            if labels is not None:
                labels.extend(cols[1])
            k += m
        return k

    def count_vectors(self, splits: Sequence[str], model_id: int) -> int:
        """How many images of ``splits`` have a vector of ``model_id`` (no row is read)."""
        with self._read() as conn:
            return int(_raw(conn).execute(self._q(
                "SELECT count(*) FROM images i JOIN vectors v ON v.image_id = i.id AND v.model_id = ? "
                f"WHERE i.split IN ({_split_list(splits)})"), (int(model_id),)).fetchone()[0])

    def split_rows(self, splits: Sequence[str], model_id: int) -> tuple[np.ndarray, list[str], list[str]]:
        """(image ids, labels, paths) of the images of ``splits`` that have a vector of ``model_id``,
        by image id: the rows ``iter_blocks`` yields, in its order (no vector is read)."""
        info = self.require_complete(model_id)
        with self._read() as conn:
            rows = _raw(conn).execute(self._q(
                "SELECT i.id, i.label, i.path FROM images i JOIN vectors v ON v.image_id = i.id AND v.model_id = ? "
                f"WHERE i.split IN ({_split_list(splits)}) ORDER BY i.id"), (info.id,)).fetchall()
        return (np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)), [r[1] for r in rows],
                [r[2] for r in rows])

    def iter_blocks(self, splits: Sequence[str], model_id: int, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every vector of ``splits`` by image id (the order of ``split_rows``, and of ``load_split``
        merged by ``common.gallery.merge``), as blocks ``(ids (m,), X float32 (m, D))`` of at most
        ``block_rows`` rows, checked, in one read snapshot: memory holds about one block whatever the
        store's size (``common.streaming``'s exact search).

        Each split is read by its own cursor in id order (the ``images_split`` index: no sort of
        vector blobs), and the splits are interleaved by id block by block.
        """
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        info = self.require_complete(model_id)
        dim = info.dim
        with self._read() as conn:
            # which split each row of the id order comes from: two small arrays, read in chunks
            # (the split as its index in ``splits``: no Python object per row is kept)
            cases = " ".join(f"WHEN '{s}' THEN {k}" for k, s in enumerate(splits))
            cur = self._stream(conn)
            cur.execute(self._q(
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
                    cur = self._stream(conn)
                    cur.execute(self._q(_SQL_SPLIT_ROWS), (info.id, split))
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
                        X[sel] = self._decode([g[-1] for g in got], ids[sel], dim, None, info.dtype)
                    yield ids, X
            finally:
                for cur in curs:
                    cur.close()

    def load_split(self, split: str | None, model_id: int, classes: Sequence[str]) -> Vectors:
        """One split's ``Vectors`` (class indices in ``classes``, paths and ids), ordered by image id."""
        ids, labels, X = self.load_matrix(split, model_id)
        from .data import class_index  # here: the store module imports no torch (data does)

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
        with self._read() as conn:
            if split is None:
                n = _raw(conn).execute(self._q(_SQL_ALL_COUNT), (info.id,)).fetchone()[0]
                cur = self._stream(conn)
                cur.execute(self._q(_SQL_ALL_ROWS), (info.id,))
            else:
                n = _raw(conn).execute(self._q(_SQL_SPLIT_COUNT), (info.id, split)).fetchone()[0]
                cur = self._stream(conn)
                cur.execute(self._q(_SQL_SPLIT_ROWS), (info.id, split))
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
        with self._read() as conn:
            cur = self._stream(conn)
            cur.execute(self._q(_SQL_IDS_ROWS), (info.id, self._ids(uniq)))
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
        with self._read() as conn:
            lab = dict(_raw(conn).execute(self._q("SELECT id, label FROM images WHERE id IN "
                                                  "(SELECT value FROM json_each(?))"),
                                          (self._ids(np.unique(ids)),)).fetchall())
        try:
            return [lab[int(i)] for i in ids]
        except KeyError as e:
            raise UserError(f"{self.path} has no image {e.args[0]}: rerun {STAGE}") from None


# ----------------------------------------------------------------------------- PostgreSQL

# The same tables on PostgreSQL (the columns are documented once, in SCHEMA_SQL above). Created
# in one schema per store (``PgStore.schema``), so several runs share a database without mixing.
# Identity keys are never reused, like AUTOINCREMENT. Vectors are the same little-endian bytes
# (float32 or float16, models.dtype), as bytea; STORAGE EXTERNAL keeps them out of line uncompressed (float bits do not
# compress: trying costs CPU on every write).
SCHEMA_PG_SQL: tuple[str, ...] = (
    """CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
)""",
    """CREATE TABLE images (
    id     BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    path   TEXT NOT NULL UNIQUE,
    label  TEXT NOT NULL,
    split  TEXT NOT NULL CHECK (split IN ('train', 'val', 'test', 'extra')),
    sha256 TEXT NOT NULL
)""",
    """CREATE INDEX images_split ON images (split, id)""",
    """CREATE TABLE models (
    id                INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    checkpoint_sha256 TEXT NOT NULL,
    embedding         TEXT NOT NULL CHECK (embedding IN ('encoder', 'head')),
    backbone          TEXT NOT NULL,
    dim               INTEGER NOT NULL CHECK (dim > 0),
    mean              TEXT NOT NULL,
    std               TEXT NOT NULL,
    image_size        INTEGER NOT NULL,
    pad_fill          INTEGER NOT NULL,
    classes           TEXT NOT NULL,
    checkpoint_path   TEXT NOT NULL,
    epoch             INTEGER,
    created           TEXT NOT NULL,
    complete          INTEGER NOT NULL DEFAULT 0 CHECK (complete IN (0, 1)),
    dtype             TEXT NOT NULL DEFAULT 'float32' CHECK (dtype IN ('float32', 'float16')),
    UNIQUE (checkpoint_sha256, embedding)
)""",
    """CREATE TABLE vectors (
    image_id BIGINT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    model_id INTEGER NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    vector   BYTEA NOT NULL,
    PRIMARY KEY (image_id, model_id)
)""",
    """ALTER TABLE vectors ALTER COLUMN vector SET STORAGE EXTERNAL""",
)
COPY_BLOCK_BYTES = 16 * 2**20  # bytes of COPY data built and sent at a time (bounds the extra memory)
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8  # binary COPY signature, flags, no extension
_COPY_TRAILER = b"\xff\xff"
_CURSOR_NUMBERS = itertools.count(1)  # server-side cursor names, unique within a process


@dataclass(frozen=True)
class PgStore:
    """Where a feature store lives on a PostgreSQL server: an SQLAlchemy ``url`` without a
    password (``postgresql+psycopg://user@host:port/db``), the ``schema`` holding its tables, and
    the environment variable holding the password (read when connecting, never stored)."""

    url: str
    schema: str
    password_env: str = dataclasses.field(default_factory=lambda: _default_password_env())

    def __post_init__(self) -> None:
        from .config import STORE_SCHEMA_RE, store_url_problem, strip_empty_password

        object.__setattr__(self, "url", strip_empty_password(self.url))  # "user:@": no secret, dropped
        why = store_url_problem(self.url, self.password_env)
        if why is not None:  # the configuration refused it already; a model.json edited by hand too
            raise UserError(f"feature store URL: {why.removeprefix('store.url: ')}")
        if not STORE_SCHEMA_RE.fullmatch(self.schema):
            raise UserError(f"feature store schema {self.schema!r}: must be a lower-case identifier (a-z, 0-9, _)")

    def __str__(self) -> str:
        return f"{self.url} (schema {self.schema})"

    @classmethod
    def from_record(cls, rec: dict | None, password_env: str | None = None) -> PgStore | None:
        """The store a ``{"url", "schema", "password_env", ...}`` record names (stage 04's
        ``model.json`` ``store`` entry), None when it names none (no ``url``: the run's SQLite
        file). ``password_env`` overrides the recorded variable (the configuration's
        ``store.password_env``). ``UserError`` for a record that is incomplete or unacceptable."""
        rec = rec or {}
        if not rec.get("url"):
            return None
        if not rec.get("schema"):
            raise UserError("feature store record: it names no schema")
        env = password_env or rec.get("password_env")
        return cls(str(rec["url"]), str(rec["schema"]), *([str(env)] if env else []))


def _default_password_env() -> str:
    """``store.password_env``'s default, written once in the configuration's declaration."""
    from .config import StoreConfig

    return StoreConfig().password_env


def _pg_engine(t: PgStore) -> Engine:
    from sqlalchemy.engine import make_url

    url = make_url(t.url).set(drivername="postgresql+psycopg")
    args: dict[str, Any] = {"options": f"-c search_path={t.schema}"}
    password = os.environ.get(t.password_env)
    if password:
        args["password"] = password  # a connect argument: never part of the URL, its repr or a message
    return create_engine(url, connect_args=args, hide_parameters=True)


def _copy_block(ids: np.ndarray, model_id: int, X: np.ndarray) -> bytes:
    """Rows (image_id int8, model_id int4, vector bytea) in PostgreSQL's binary COPY layout, built
    by numpy in one pass (no per-row Python object). ``X`` holds the values as stored: little-endian
    float32 (``<f4``) or float16 (``<f2``) rows."""
    n, d = X.shape
    vt = X.dtype.newbyteorder("<")
    dt = np.dtype([("nf", ">i2"), ("l1", ">i4"), ("id", ">i8"), ("l2", ">i4"), ("mid", ">i4"), ("l3", ">i4"),
                   ("v", vt, (d,))])
    a = np.empty(n, dt)
    a["nf"], a["l1"], a["id"], a["l2"], a["mid"], a["l3"], a["v"] = 3, 8, ids, 4, model_id, vt.itemsize * d, X
    return a.tobytes()


class PgFeatureStore(FeatureStore):
    """The feature store in one schema of a PostgreSQL database: the same tables, API and checks.

    Vectors are written with binary ``COPY`` (built by numpy); the primary key (image, model)
    refuses a duplicate, and a chunk written again after an interruption is copied into a
    temporary table and inserted ``ON CONFLICT DO NOTHING``: several processes (the ranks of a
    multi-node extraction) write their own shares at once, and no row is ever duplicated. Reads stream through a
    server-side cursor a block at a time into the preallocated matrix, in one REPEATABLE READ
    snapshot, every block checked by ``check_unit_vectors``.
    """

    dialect = "postgresql"
    shared = True

    def __init__(self, target: PgStore, *, create: bool = False, any_version: bool = False):
        self.path = target  # str(): the URL without password and the schema, for messages
        self.target = target
        self.version = SCHEMA_VERSION
        self.engine = _pg_engine(target)
        try:
            with self._read() as conn:
                has = conn.exec_driver_sql(
                    "SELECT 1 FROM information_schema.tables WHERE table_schema = %(s)s AND table_name = 'meta'",
                    {"s": target.schema}).first()
            if has is None and create:
                self._create_schema()
            elif has is None:
                raise UserError(f"feature store {target} is missing (no meta table in the schema): run {STAGE}")
            else:
                self._check_version(any_version)
        except DBAPIError as e:
            self.engine.dispose()
            why = str(e.orig).strip().splitlines()[0] if str(e.orig).strip() else type(e.orig).__name__
            raise UserError(f"feature store {target}: the PostgreSQL server refused ({why}): check the server, "
                            f"the URL and the password variable {target.password_env}") from None
        except BaseException:
            self.engine.dispose()
            raise

    def __repr__(self) -> str:
        return f"PgFeatureStore({str(self.target)!r})"

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s").replace("SELECT value FROM json_each(%s)", "SELECT unnest(%s::bigint[])")

    def _ids(self, ids: np.ndarray) -> Any:
        return [int(i) for i in ids]

    def _stream(self, conn: Connection) -> Any:
        cur = _raw(conn).cursor(name=f"stream_{next(_CURSOR_NUMBERS)}", binary=True)
        cur.itersize = 256
        return cur

    def _create_schema(self) -> None:
        with self._write() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {self.target.schema}")
            for stmt in SCHEMA_PG_SQL:
                conn.exec_driver_sql(stmt)
            conn.execute(insert(meta_t), [{"key": "schema_version", "value": str(SCHEMA_VERSION)},
                                          {"key": "format", "value": FORMAT},
                                          {"key": "created", "value": _now()}])
        log.info("created feature store %s (schema version %d)", self.target, SCHEMA_VERSION)

    def schema(self) -> list[str]:
        """One line per table of the schema: ``table (column type, ...)`` from the catalog."""
        with self._read() as conn:
            rows = conn.exec_driver_sql(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = %(s)s ORDER BY table_name, ordinal_position", {"s": self.target.schema}).all()
        tables: dict[str, list[str]] = {}
        for t, c, ty in rows:
            tables.setdefault(t, []).append(f"{c} {ty}")
        return [f"{t} ({', '.join(cols)})" for t, cols in tables.items()]

    def _insert_vectors(self, conn: Connection, model_id: int, ids: np.ndarray, X: np.ndarray) -> int:
        """COPY straight into ``vectors`` (in a savepoint); when a row is already there (a chunk
        written again after an interruption), COPY into a temporary table and insert the rows
        that are not, ``ON CONFLICT DO NOTHING``. Returns the rows added."""
        import psycopg

        raw = _raw(conn)
        with contextlib.suppress(psycopg.errors.UniqueViolation):  # a row already there: the slower path below
            with raw.transaction():  # a savepoint inside the store's transaction
                self._copy(raw, "vectors", model_id, ids, X)
            return int(ids.size)
        raw.execute("CREATE TEMP TABLE vectors_in (LIKE vectors INCLUDING STORAGE) ON COMMIT DROP")
        self._copy(raw, "vectors_in", model_id, ids, X)
        n = raw.execute("INSERT INTO vectors (image_id, model_id, vector) SELECT image_id, model_id, vector "
                        "FROM vectors_in ON CONFLICT (image_id, model_id) DO NOTHING").rowcount
        raw.execute("DROP TABLE vectors_in")
        return int(n)

    @staticmethod
    def _copy(raw: Any, table: str, model_id: int, ids: np.ndarray, X: np.ndarray) -> None:
        step = max(1, COPY_BLOCK_BYTES // (X.itemsize * X.shape[1] + 26))
        with raw.cursor() as cur, cur.copy(f"COPY {table} (image_id, model_id, vector) FROM STDIN (FORMAT BINARY)") as cp:
            cp.write(_COPY_HEADER)
            for s in range(0, ids.size, step):
                cp.write(_copy_block(ids[s:s + step], model_id, X[s:s + step]))
            cp.write(_COPY_TRAILER)

    def compact(self) -> tuple[int, int]:
        """Nothing on PostgreSQL: its (auto)vacuum reuses the space of deleted rows for the next
        ones; ``VACUUM FULL`` would lock the tables of every rank. Returns (bytes, the same)."""
        n = self.size_bytes()
        return n, n

    def size_bytes(self) -> int:
        """Bytes the schema's tables take with their indexes and out-of-line (TOAST) data."""
        with self._read() as conn:
            return int(conn.exec_driver_sql(
                "SELECT coalesce(sum(pg_total_relation_size(format('%%I.%%I', table_schema, table_name))), 0) "
                "FROM information_schema.tables WHERE table_schema = %(s)s", {"s": self.target.schema}).scalar())

    def mark_complete(self, model_id: int) -> ModelInfo:
        """As for SQLite, then ``ANALYZE``: the planner's statistics after a bulk load (without
        them it sorts the whole join of a split's rows instead of walking the keys in order)."""
        info = super().mark_complete(model_id)
        with self._write() as conn:
            conn.exec_driver_sql("ANALYZE images")
            conn.exec_driver_sql("ANALYZE vectors")
        return info


def open_store(target: str | os.PathLike | PgStore, *, create: bool = False, any_version: bool = False
               ) -> FeatureStore:
    """The feature store at ``target``: a SQLite file (a path) or a PostgreSQL schema (``PgStore``).
    ``any_version``: see ``FeatureStore._check_version`` (``upgrade_store``, ``content_digest``)."""
    if isinstance(target, PgStore):
        return PgFeatureStore(target, create=create, any_version=any_version)
    return FeatureStore(target, create=create, any_version=any_version)


def store_exists(target: str | os.PathLike | PgStore) -> bool:
    """True when ``target`` holds a store (a non-empty file; a schema with a meta table)."""
    if not isinstance(target, PgStore):
        p = Path(target)
        return p.is_file() and p.stat().st_size > 0
    engine = _pg_engine(target)
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql(
                "SELECT 1 FROM information_schema.tables WHERE table_schema = %(s)s AND table_name = 'meta'",
                {"s": target.schema}).first() is not None
    finally:
        engine.dispose()


def remove_store(target: str | os.PathLike | PgStore) -> None:
    """Delete a store: the SQLite file with its journal files, or the PostgreSQL schema with its tables."""
    if not isinstance(target, PgStore):
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{target}{suffix}").unlink()
        return
    engine = _pg_engine(target)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {target.schema} CASCADE")
    except DBAPIError as e:
        raise UserError(f"feature store {target}: cannot drop the schema ({str(e.orig).splitlines()[0]})") from None
    finally:
        engine.dispose()
    log.info("dropped feature store %s", target)


# ----------------------------------------------------------------------------- checks and digest


def check_unit_vectors(X: np.ndarray, ids: np.ndarray, path: Any) -> None:
    """``UserError`` naming the first image whose vector is not finite or not unit-norm.

    Every read of the store calls this (one vectorised pass per block): a corrupted vector is
    never used, whatever SQLite's own integrity check says.
    """
    if X.size == 0:
        return
    norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
    bad = ~np.isfinite(norms) | (np.abs(norms - 1.0) > NORM_TOLERANCE)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = "not finite" if not np.isfinite(norms[i]) else f"of norm {norms[i]:.6g}, not 1"
        raise UserError(f"{path}: the vector of image {int(ids[i])} is {what} (the store is corrupted): rerun "
                        f"{STAGE} with --force")


def verify_store(path: str | os.PathLike | PgStore, model_id: int) -> int:
    """Read every vector of ``model_id`` once (streamed) and check it; returns the number checked."""
    with open_store(path) as store:
        info = store.model_info(model_id)
        n = 0
        with store._read() as conn:
            cur = store._stream(conn)
            cur.execute(store._q(_SQL_DIGEST_VECTORS), (info.id,))
            block = max(1, READ_BLOCK_BYTES // (info.itemsize * info.dim))
            while rows := cur.fetchmany(block):
                ids, blobs = zip(*rows)
                store._decode(blobs, np.asarray(ids), info.dim, None, info.dtype)
                n += len(rows)
            cur.close()
    return n


def _digest(h: Any, rows: Any, stream: Any, version: int = SCHEMA_VERSION) -> None:
    """Hash images, complete models and their vectors; ``rows(sql, params)`` -> every row,
    ``stream(sql, params)`` -> a cursor read with ``fetchmany`` (SQL in the store's dialect).
    ``version``: the store's schema version; a version-2 store (no ``models.dtype``, float32
    vectors) hashes as the code of version 2 did, so a run recorded then is recognised unchanged."""
    h.update(f"{FORMAT}/{version}\n".encode())
    for row in rows("SELECT id, path, label, split, sha256 FROM images ORDER BY id", ()):
        h.update(json.dumps(tuple(row), ensure_ascii=False).encode())
        h.update(b"\n")
    models = rows("SELECT id, checkpoint_sha256, embedding, backbone, dim, mean, std, image_size, "
                  f"pad_fill, classes{', dtype' if version >= 3 else ''} FROM models WHERE complete = 1 ORDER BY id", ())
    for m in models:
        h.update(json.dumps(tuple(m), ensure_ascii=False).encode())
        h.update(b"\n")
    for m in models:
        itemsize = np.dtype(DTYPES[m[10] if version >= 3 else "float32"]).itemsize
        cur = stream(_SQL_DIGEST_VECTORS, (m[0],))
        while rows_ := cur.fetchmany(max(1, READ_BLOCK_BYTES // (itemsize * int(m[4])))):
            ids, blobs = zip(*rows_)
            h.update(np.asarray(ids, dtype="<i8").tobytes())
            h.update(b"".join(blobs))
        cur.close()


def _connect_read_only(p: Path, **kw: Any) -> sqlite3.Connection:
    """A read-only sqlite3 connection that leaves no file behind. With no ``-wal`` file the
    database is whole and is opened ``immutable`` (SQLite then creates no ``-wal``/``-shm``, which
    a read-only connection could not remove: a freshness check must leave the run folder as it
    was); with one (a writer is active, or was killed) it is opened ``mode=ro`` to read it too."""
    mode = "mode=ro" if Path(f"{p}-wal").exists() else "immutable=1"
    return sqlite3.connect(p.resolve().as_uri() + "?" + mode, uri=True, timeout=BUSY_TIMEOUT_S, **kw)


def content_digest(path: str | os.PathLike | PgStore) -> str:
    """sha256 of the images, complete models (dtype included) and their vectors (not ``meta``).

    What stage 04's (and 06's) manifest records for the store. Times and checkpoint paths are left
    out (rerunning stage 04 on the same inputs gives the same digest). Streams the blobs in image
    id order through one hash; the file is opened read-only. The same content gives the same
    digest in SQLite and in PostgreSQL (``PgStore``: read in one REPEATABLE READ snapshot). A
    store of an ``UPGRADABLE`` version gives the digest that version's code recorded.
    """
    h = hashlib.sha256()
    if isinstance(path, PgStore):
        with PgFeatureStore(path, any_version=True) as st, st._read() as conn:
            raw = _raw(conn)

            def stream(sql: str, params: Any) -> Any:
                cur = st._stream(conn)
                cur.execute(st._q(sql), params)
                return cur

            _digest(h, lambda sql, params: raw.execute(st._q(sql), params).fetchall(), stream, st.version)
        return h.hexdigest()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"feature store {p} is missing: run {STAGE}")
    conn = _connect_read_only(p, isolation_level=None)
    try:
        conn.execute("BEGIN")  # one snapshot for every table
        v = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        versions = {str(u): u for u in (SCHEMA_VERSION, *UPGRADABLE)}
        if v is None or v[0] not in versions:
            raise UserError(f"{p} is not a feature store of schema version {SCHEMA_VERSION}: rerun {STAGE}")
        _digest(h, lambda sql, params: conn.execute(sql, params).fetchall(), conn.execute, versions[v[0]])
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as e:
        raise UserError(f"{p} is not a readable feature store ({e}): rerun {STAGE}") from None
    finally:
        conn.close()
    return h.hexdigest()


# ----------------------------------------------------------------------------- versions and size


def schema_version(path: str | os.PathLike | PgStore) -> int | None:
    """The store's ``meta`` schema version (None when it has none or it is not a number); raises
    ``UserError`` when the store is missing or unreadable. Reads one row: cheap enough for every
    freshness check."""
    if isinstance(path, PgStore):
        with open_store(path, any_version=True) as st:
            v = st.meta("schema_version")
    else:  # read-only, as content_digest reads it: a freshness check never writes to the run folder
        p = Path(path)
        if not p.is_file():
            raise UserError(f"feature store {p} is missing: run {STAGE}")
        try:
            conn = _connect_read_only(p)
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            finally:
                conn.close()
        except sqlite3.DatabaseError as e:
            raise UserError(f"{p} is not a readable feature store ({e}): rerun {STAGE}") from None
        v = None if row is None else row[0]
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def upgrade_store(path: str | os.PathLike | PgStore) -> int | None:
    """Bring a store of an ``UPGRADABLE`` schema version to ``SCHEMA_VERSION`` in place, in one
    transaction; returns the version it had (None when it was current). Version 2 -> 3 adds
    ``models.dtype`` with ``DEFAULT 'float32'`` (what every vector of version 2 is): no vector is
    read or written, nothing is embedded again. SQLite keeps the ALTER TABLE's text in
    ``sqlite_master``: ``models``' CREATE text differs from ``SCHEMA_SQL``'s (the column spliced
    in after ``complete``, on its line, without its comment), while its columns, their order,
    types, defaults and checks are a new store's (tested)."""
    with open_store(path, any_version=True) as st:
        old = st.version
        if old == SCHEMA_VERSION:
            return None
        with st._write() as conn:
            conn.exec_driver_sql(f"ALTER TABLE models ADD COLUMN {DTYPE_COLUMN}")
            conn.execute(update(meta_t).where(meta_t.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))
    log.info("upgraded feature store %s in place from schema version %d to %d: models.dtype added ('float32', "
             "what its vectors are); no vector was touched or embedded again", path, old, SCHEMA_VERSION)
    return old


def store_bytes(path: str | os.PathLike | PgStore) -> int:
    """Bytes the store takes: the SQLite file (with its WAL, if any), or the PostgreSQL schema's
    tables with their indexes and out-of-line (TOAST) data."""
    if not isinstance(path, PgStore):
        return file_bytes(path)
    with PgFeatureStore(path) as st:
        return st.size_bytes()
