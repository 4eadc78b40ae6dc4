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
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import bindparam, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError

from ..data.transforms import pad_fill_code
from ..errors import UserError
from .containers import ImageRecord, ModelInfo, SyncReport, Vectors, _model_from_row, _now, check_unit_vectors
from .schema import (
    _SQL_ALL_COUNT,
    _SQL_ALL_ROWS,
    _SQL_IDS_ROWS,
    _SQL_INSERT_VECTOR,
    _SQL_MISSING,
    _SQL_SPLIT_COUNT,
    _SQL_SPLIT_ROWS,
    DTYPES,
    EMBEDDINGS,
    FORMAT,
    NORM_TOLERANCE,
    READ_BLOCK_BYTES,
    SCHEMA_SQL,
    SCHEMA_VERSION,
    SPLITS,
    STAGE,
    UPGRADABLE,
    _split_list,
    images_t,
    meta_t,
    models_t,
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
        # a temporary file written then renamed (fileio.atomic_path: stage 06's lut.sqlite): its name means
        # nothing to the reader of the log, the stage names the final file
        log.log(logging.DEBUG if self.path.name.endswith(".tmp") else logging.INFO,
                "created feature store %s (schema version %d)", self.path, SCHEMA_VERSION)

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
                  "pad_fill": pad_fill_code(pad_fill), "classes": json.dumps(list(classes)),
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
