"""Store maintenance: open, exists, remove, verify, content digest, schema version and upgrade, size."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError

from ..errors import UserError
from .postgres import PgFeatureStore, PgStore, _pg_engine
from .schema import (
    _SQL_DIGEST_VECTORS,
    DTYPE_COLUMN,
    DTYPES,
    FORMAT,
    READ_BLOCK_BYTES,
    SCHEMA_VERSION,
    STAGE,
    UPGRADABLE,
    meta_t,
)
from .sqlite import BUSY_TIMEOUT_S, FeatureStore, file_bytes
from .schema import raw_connection

log = logging.getLogger(__name__)


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


def verify_store(path: str | os.PathLike | PgStore, model_id: int) -> int:
    """Read every vector of ``model_id`` once (streamed) and check it; returns the number checked."""
    with open_store(path) as store:
        info = store.model_info(model_id)
        n = 0
        with store.read_tx() as conn:
            cur = store.stream_cursor(conn)
            cur.execute(store.sql(_SQL_DIGEST_VECTORS), (info.id,))
            block = max(1, READ_BLOCK_BYTES // (info.itemsize * info.dim))
            while rows := cur.fetchmany(block):
                ids, blobs = zip(*rows)
                store.decode(blobs, np.asarray(ids), info.dim, None, info.dtype)
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
        with PgFeatureStore(path, any_version=True) as st, st.read_tx() as conn:
            raw = raw_connection(conn)

            def stream(sql: str, params: Any) -> Any:
                cur = st.stream_cursor(conn)
                cur.execute(st.sql(sql), params)
                return cur

            _digest(h, lambda sql, params: raw.execute(st.sql(sql), params).fetchall(), stream, st.version)
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
        with st.write_tx() as conn:
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
