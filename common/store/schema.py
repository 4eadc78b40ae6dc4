"""The store's tables, SQL and versions, and which splits it holds."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from sqlalchemy import (
    CheckConstraint,
    Column,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

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
STAGE = "04_extract_features.py"

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


def _norm_sql(sql: str) -> str:
    """Whitespace-normalised SQL text (to compare the documented and the created schema)."""
    return " ".join(sql.split())


def _split_list(splits: Sequence[str]) -> str:
    """``'train', 'extra'``: an SQL list of split names, each checked to be one of ``SPLITS`` (so quoting is safe)."""
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not splits:
        raise ValueError("no split given")
    return ", ".join(f"'{x}'" for x in splits)


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


def raw_connection(conn: Connection) -> Any:
    """The DBAPI connection (sqlite3 or psycopg) under a SQLAlchemy connection (same transaction):
    the hot paths bind numpy rows and stream cursors through it."""
    return conn.connection.driver_connection
