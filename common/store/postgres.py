"""The feature store on PostgreSQL: the connection record (no password in it) and the store over it."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from sqlalchemy import create_engine, insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from ..errors import UserError
from .containers import _now
from .schema import FORMAT, SCHEMA_PG_SQL, SCHEMA_VERSION, STAGE, meta_t
from .sqlite import FeatureStore
from .schema import raw_connection

if TYPE_CHECKING:
    from .containers import ModelInfo

log = logging.getLogger(__name__)

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
        from ..config.schema import STORE_SCHEMA_RE, store_url_problem, strip_empty_password

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
    from ..config.schema import StoreConfig

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
            with self.read_tx() as conn:
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
    def read_tx(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def write_tx(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def sql(self, sql: str) -> str:
        return sql.replace("?", "%s").replace("SELECT value FROM json_each(%s)", "SELECT unnest(%s::bigint[])")

    def id_param(self, ids: np.ndarray) -> Any:
        return [int(i) for i in ids]

    def stream_cursor(self, conn: Connection) -> Any:
        cur = raw_connection(conn).cursor(name=f"stream_{next(_CURSOR_NUMBERS)}", binary=True)
        cur.itersize = 256
        return cur

    def _create_schema(self) -> None:
        with self.write_tx() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {self.target.schema}")
            for stmt in SCHEMA_PG_SQL:
                conn.exec_driver_sql(stmt)
            conn.execute(insert(meta_t), [{"key": "schema_version", "value": str(SCHEMA_VERSION)},
                                          {"key": "format", "value": FORMAT},
                                          {"key": "created", "value": _now()}])
        log.info("created feature store %s (schema version %d)", self.target, SCHEMA_VERSION)

    def schema(self) -> list[str]:
        """One line per table of the schema: ``table (column type, ...)`` from the catalog."""
        with self.read_tx() as conn:
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

        raw = raw_connection(conn)
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
        with self.read_tx() as conn:
            return int(conn.exec_driver_sql(
                "SELECT coalesce(sum(pg_total_relation_size(format('%%I.%%I', table_schema, table_name))), 0) "
                "FROM information_schema.tables WHERE table_schema = %(s)s", {"s": self.target.schema}).scalar())

    def mark_complete(self, model_id: int) -> ModelInfo:
        """As for SQLite, then ``ANALYZE``: the planner's statistics after a bulk load (without
        them it sorts the whole join of a split's rows instead of walking the keys in order)."""
        info = super().mark_complete(model_id)
        with self.write_tx() as conn:
            conn.exec_driver_sql("ANALYZE images")
            conn.exec_driver_sql("ANALYZE vectors")
        return info
