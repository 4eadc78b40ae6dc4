"""The feature store: one SQLite file, SQLAlchemy 2 over it.

Stage 04's ``features.sqlite`` holds every image of every split (train, val, test) and the
gallery-only images of ``data.gallery_extra`` (split ``extra``; gallery = train + extra), the
model that embedded them (checkpoint sha256, backbone, embedding kind, dimension, normalisation)
and one float32 vector per image and model. Stage 06's pruned look-up table (LUT, Yang et al.
2022), ``lut.sqlite``, is a store of the same schema holding only the kept gallery images: a
self-contained gallery. Any SQLite client can read it: the schema is ``SCHEMA_SQL`` below,
created verbatim (its comments are kept in ``sqlite_master``, so ``sqlite3 features.sqlite .schema`` shows them).

Rules the code keeps (and a reader of the file can rely on):

- **Vectors** are ``dim`` float32 values, little-endian, L2-normalised, ``4 * dim`` bytes
  (``np.frombuffer(blob, "<f4")``); never pickled tensors.
- **One checkpoint's vectors are never compared with another's**: every load takes a model id;
  ``require_model`` / ``check_same_model`` raise ``UserError`` naming both checkpoints and
  dimensions when they differ, and writing vectors of another dimension is refused.
- **A model is complete only when every image has its vector**: ``models.complete`` is set to 1
  by ``mark_complete`` in one transaction that first checks that no image lacks a vector. Adding
  images or vectors resets it to 0. Loaders refuse an incomplete model (an interrupted
  extraction) with a message to rerun ``04_extract_features.py``.
- **Every read checks every vector**: finite and unit-norm (``check_unit_vectors``), so a
  corrupted file is refused naming the image and the stage to rerun, whatever SQLite says.
- ``meta`` holds ``schema_version`` (a store of another version is refused), ``format``, and
  ``model.<id>.status`` (``extracting`` or ``complete``, kept in step with ``models.complete``).

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
import datetime as _dt
import hashlib
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

# bump when SCHEMA_SQL changes; older stores are refused, never migrated silently.
# 2: split 'extra' (gallery-only images); the LUT tables left the store (stage 06 writes lut.sqlite)
SCHEMA_VERSION = 2
FORMAT = "plankton-feature-store"
EMBEDDINGS = ("encoder", "head")
SPLITS = ("train", "val", "test", "extra")  # extra: gallery-only images (data.gallery_extra), never trained on
GALLERY_SPLITS = ("train", "extra")  # the gallery stages 05-07 search
NORM_TOLERANCE = 1e-3  # |‖v‖ - 1| allowed when writing vectors (float32 and AMP round-off)
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
    UNIQUE (checkpoint_sha256, embedding)
)""",
    """CREATE TABLE vectors (
    image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    model_id INTEGER NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    vector   BLOB NOT NULL,  -- dim float32 values, little-endian, L2-normalised (4 * dim bytes)
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
    UniqueConstraint("checkpoint_sha256", "embedding"),
    CheckConstraint("complete IN (0, 1)"),
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
    ``labels`` (N,) (-1 = none), image ``paths``, and the store's image ``ids`` when they come from one."""

    X: np.ndarray
    labels: np.ndarray
    paths: list[str]
    ids: np.ndarray | None = None

    def __post_init__(self) -> None:
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

    def describe(self) -> str:
        """One line naming the checkpoint, embedding and dimension (for error messages)."""
        return (f"model {self.id} (checkpoint {self.checkpoint_path} sha256 {self.checkpoint_sha256[:12]}, "
                f"{self.embedding} embedding, dim {self.dim})")

    def same_transform(self, other: "ModelInfo") -> bool:
        """True when both embed images identically (same checkpoint, embedding and preprocessing)."""
        keys = ("checkpoint_sha256", "embedding", "backbone", "dim", "image_size", "pad_fill")
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


def _raw(conn: Connection) -> sqlite3.Connection:
    """The sqlite3 connection under a SQLAlchemy connection (same transaction)."""
    return conn.connection.driver_connection  # type: ignore[return-value]


class FeatureStore:
    """The feature store in one SQLite file. ``FeatureStore(path)`` opens an existing store;
    ``create=True`` creates it when the file is missing or empty (stage 04).

    Raises ``UserError`` naming the file when it is missing, not a feature store, or of another
    schema version. Use as a context manager or call ``close()``.
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = False):
        self.path = Path(path)
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
                self._check_version()
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

    def _create_schema(self) -> None:
        with self._write() as conn:
            for stmt in SCHEMA_SQL:
                conn.exec_driver_sql(stmt)
            conn.execute(insert(meta_t), [{"key": "schema_version", "value": str(SCHEMA_VERSION)},
                                          {"key": "format", "value": FORMAT},
                                          {"key": "created", "value": _now()}])
        log.info("created feature store %s (schema version %d)", self.path, SCHEMA_VERSION)

    def _check_version(self) -> None:
        with self._read() as conn:
            v = conn.execute(select(meta_t.c.value).where(meta_t.c.key == "schema_version")).scalar()
        if v != str(SCHEMA_VERSION):
            raise UserError(f"{self.path} has feature-store schema version {v}, this code reads version "
                            f"{SCHEMA_VERSION}: delete it and rerun {STAGE}")

    def schema(self) -> list[str]:
        """The CREATE statements of the file, as stored in ``sqlite_master`` (tables and indexes;
        not SQLite's own ``sqlite_sequence``, which AUTOINCREMENT keys create)."""
        with self._read() as conn:
            return [r[0] for r in conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]

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
                conn.exec_driver_sql("DELETE FROM images WHERE id IN (SELECT value FROM json_each(?))",
                                     (_json_ids(removed),))  # cascades to vectors
            if content:
                ids = np.array([c["i"] for c in content], dtype=np.int64)
                conn.exec_driver_sql("DELETE FROM vectors WHERE image_id IN (SELECT value FROM json_each(?))",
                                     (_json_ids(ids),))
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
                       replace_others: bool = True) -> tuple[ModelInfo, list[ModelInfo]]:
        """The model row for these settings, created (incomplete) when absent; one transaction.

        An existing row of the same checkpoint and embedding whose preprocessing differs (other
        stats, image size or pad fill) is dropped with its vectors and recreated. With
        ``replace_others`` every other model (another checkpoint or embedding) is deleted with its
        vectors in the same transaction: the store then holds one model's vectors.
        Returns (the model, the models dropped).
        """
        if embedding not in EMBEDDINGS:
            raise UserError(f"extract.embedding: expected one of {'/'.join(EMBEDDINGS)}, got {embedding!r}")
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        values = {"checkpoint_sha256": checkpoint_sha256, "embedding": embedding, "backbone": backbone,
                  "dim": int(dim), "mean": json.dumps([float(x) for x in mean]),
                  "std": json.dumps([float(x) for x in std]), "image_size": int(image_size),
                  "pad_fill": int(pad_fill), "classes": json.dumps(list(classes)),
                  "checkpoint_path": str(checkpoint_path), "epoch": epoch, "created": _now(), "complete": 0}
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
            for m in dropped:
                conn.execute(delete(models_t).where(models_t.c.id == m.id))  # cascades to vectors
                conn.execute(delete(meta_t).where(meta_t.c.key == f"model.{m.id}.status"))
            if keep is None:
                new_id = conn.execute(insert(models_t).values(**values)).inserted_primary_key[0]
                self._set_status(conn, int(new_id), "extracting")
            else:
                new_id = keep.id
                if keep.checkpoint_path != str(checkpoint_path) or keep.epoch != epoch:
                    conn.execute(update(models_t).where(models_t.c.id == keep.id)
                                 .values(checkpoint_path=str(checkpoint_path), epoch=epoch))
            info = _model_from_row(conn.execute(select(models_t).where(models_t.c.id == new_id)).one())
        for m in dropped:
            log.info("dropped %s with its vectors (replaced by %s)", m.describe(), info.describe())
        return info, dropped

    def _set_status(self, conn: Connection, model_id: int, status: str) -> None:
        conn.exec_driver_sql("INSERT INTO meta (key, value) VALUES (?, ?) "
                             "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
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
            return [ImageRecord(*r) for r in _raw(conn).execute(_SQL_MISSING, (int(model_id),))]

    def write_vectors(self, model_id: int, image_ids: Sequence[int] | np.ndarray, vectors: Any) -> int:
        """Insert one vector per image for ``model_id``, in one transaction; returns the rows written.

        ``vectors``: (N, dim) L2-normalised (float32 after conversion). A dimension other than the
        model's is a ``UserError`` naming both; non-finite or non-normalised rows, or an image
        that already has a vector of this model, are errors. The model becomes incomplete
        until ``mark_complete``.
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
        if not np.isfinite(X).all():
            raise ValueError(f"non-finite values in the vectors for {info.describe()}")
        norms = np.linalg.norm(X, axis=1)
        if np.abs(norms - 1.0).max() > NORM_TOLERANCE:
            raise ValueError(f"vectors must be L2-normalised (norms {norms.min():.4f} to {norms.max():.4f})")
        mid = int(model_id)
        with self._write() as conn:
            # numpy rows are bound as BLOBs through the buffer protocol: no per-row bytes copy
            _raw(conn).executemany(_SQL_INSERT_VECTOR, zip(ids.tolist(), [mid] * ids.size, X))
            if info.complete:
                self._set_complete(conn, mid, False)
        return int(ids.size)

    def mark_complete(self, model_id: int) -> ModelInfo:
        """Mark a model complete, in the transaction that checks every image has its vector."""
        with self._write() as conn:
            n = _raw(conn).execute(f"SELECT count(*) FROM ({_SQL_MISSING})", (int(model_id),)).fetchone()[0]
            if n:
                raise RuntimeError(f"{n} images of {self.path} have no vector of model {model_id} yet")
            done = conn.execute(select(models_t.c.complete).where(models_t.c.id == int(model_id))).scalar()
            if done is None:
                raise UserError(f"{self.path} holds no model {model_id}: rerun {STAGE}")
            if not done:  # already complete: write nothing (a rerun leaves the file untouched)
                self._set_complete(conn, int(model_id), True)
        return self.model_info(model_id)

    def _fill(self, cur: sqlite3.Cursor, out: np.ndarray, ids: np.ndarray, labels: list[str] | None) -> int:
        """Stream (id[, label], blob) rows into preallocated arrays, a block of rows at a time."""
        n, dim = out.shape
        block = max(1, READ_BLOCK_BYTES // (4 * dim))
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
            blob = b"".join(cols[-1])
            if len(blob) != m * dim * 4:
                raise UserError(f"{self.path}: stored vectors are not {dim} float32 values each: rerun {STAGE}")
            out[k:k + m] = np.frombuffer(blob, dtype="<f4").reshape(m, dim)
            check_unit_vectors(out[k:k + m], ids[k:k + m], self.path)
            if labels is not None:
                labels.extend(cols[1])
            k += m
        return k

    def load_split(self, split: str | None, model_id: int, classes: Sequence[str]) -> Vectors:
        """One split's ``Vectors`` (class indices in ``classes``, paths and ids), ordered by image id."""
        ids, labels, X = self.load_matrix(split, model_id)
        index = {c: i for i, c in enumerate(classes)}
        try:
            y = np.fromiter((index[v] for v in labels), dtype=np.int64, count=len(labels))
        except KeyError as e:
            raise UserError(f"{self.path}: label {e.args[0]!r} of the {split or 'whole'} store is not a class of the "
                            f"model: rerun {STAGE}") from None
        path_of = {r.id: r.path for r in self.images(split)}
        return Vectors(X, y, [path_of[int(i)] for i in ids], ids)

    def load_matrix(self, split: str | None, model_id: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(image ids int64 (N,), labels (N,), vectors float32 (N, D)) of one split (all when
        None) for a complete model, ordered by image id."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        info = self.require_complete(model_id)
        with self._read() as conn:
            cur = _raw(conn).cursor()
            if split is None:
                n = cur.execute(_SQL_ALL_COUNT, (info.id,)).fetchone()[0]
                cur.execute(_SQL_ALL_ROWS, (info.id,))
            else:
                n = cur.execute(_SQL_SPLIT_COUNT, (info.id, split)).fetchone()[0]
                cur.execute(_SQL_SPLIT_ROWS, (info.id, split))
            X = np.empty((n, info.dim), dtype=np.float32)
            ids = np.empty(n, dtype=np.int64)
            labels: list[str] = []
            k = self._fill(cur, X, ids, labels)
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
            cur = _raw(conn).cursor()
            cur.execute(_SQL_IDS_ROWS, (info.id, _json_ids(uniq)))
            k = self._fill(cur, X, got, None)
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
            lab = dict(_raw(conn).execute("SELECT id, label FROM images WHERE id IN (SELECT value FROM json_each(?))",
                                          (_json_ids(np.unique(ids)),)).fetchall())
        try:
            return [lab[int(i)] for i in ids]
        except KeyError as e:
            raise UserError(f"{self.path} has no image {e.args[0]}: rerun {STAGE}") from None


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


def verify_store(path: str | os.PathLike, model_id: int) -> int:
    """Read every vector of ``model_id`` once (streamed) and check it; returns the number checked."""
    with FeatureStore(path) as store:
        info = store.model_info(model_id)
        n = 0
        with store._read() as conn:
            cur = _raw(conn).cursor()
            cur.execute(_SQL_DIGEST_VECTORS, (info.id,))
            block = max(1, READ_BLOCK_BYTES // (4 * info.dim))
            while rows := cur.fetchmany(block):
                ids, blobs = zip(*rows)
                blob = b"".join(blobs)
                if len(blob) != len(rows) * info.dim * 4:
                    raise UserError(f"{path}: stored vectors are not {info.dim} float32 values each: rerun "
                                    f"{STAGE} with --force")
                check_unit_vectors(np.frombuffer(blob, dtype="<f4").reshape(len(rows), info.dim),
                                   np.asarray(ids), path)
                n += len(rows)
            cur.close()
    return n


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of the images, complete models and their vectors (not ``meta``).

    What stage 04's (and 06's) manifest records for the store. Times and checkpoint paths are left
    out (rerunning stage 04 on the same inputs gives the same digest). Streams the blobs in image
    id order through one hash; the file is opened read-only.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"feature store {p} is missing: run {STAGE}")
    h = hashlib.sha256()
    h.update(f"{FORMAT}/{SCHEMA_VERSION}\n".encode())
    conn = sqlite3.connect(p.resolve().as_uri() + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S,
                           isolation_level=None)
    try:
        conn.execute("BEGIN")  # one snapshot for every table
        v = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if v is None or v[0] != str(SCHEMA_VERSION):
            raise UserError(f"{p} is not a feature store of schema version {SCHEMA_VERSION}: rerun {STAGE}")
        for row in conn.execute("SELECT id, path, label, split, sha256 FROM images ORDER BY id"):
            h.update(json.dumps(row, ensure_ascii=False).encode())
            h.update(b"\n")
        models = conn.execute("SELECT id, checkpoint_sha256, embedding, backbone, dim, mean, std, image_size, "
                              "pad_fill, classes FROM models WHERE complete = 1 ORDER BY id").fetchall()
        for m in models:
            h.update(json.dumps(m, ensure_ascii=False).encode())
            h.update(b"\n")
        for m in models:
            cur = conn.execute(_SQL_DIGEST_VECTORS, (m[0],))
            while rows := cur.fetchmany(max(1, READ_BLOCK_BYTES // (4 * int(m[4])))):
                ids, blobs = zip(*rows)
                h.update(np.asarray(ids, dtype="<i8").tobytes())
                h.update(b"".join(blobs))
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as e:
        raise UserError(f"{p} is not a readable feature store ({e}): rerun {STAGE}") from None
    finally:
        conn.close()
    return h.hexdigest()
