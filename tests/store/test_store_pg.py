"""The feature store on a real PostgreSQL server (pgserver, started once per session): same API,
same checks, same digest as SQLite; COPY writes that never duplicate a row; one schema per store."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import sqlalchemy as sa
from test_features import DIM, register, rows, unit

from common.config.schema import Config, validate
from common.errors import ConfigError, UserError
from common.store.maintenance import (
    content_digest,
    open_store,
    remove_store,
    schema_version,
    store_bytes,
    store_exists,
    upgrade_store,
    verify_store,
)
from common.store.postgres import PgStore, _copy_block, _pg_engine
from common.store.schema import metadata


def fill(target, n: int = 30, seed: int = 0):
    store = open_store(target, create=True)
    store.sync_images(rows(n))
    info, _ = register(store)
    todo = store.missing_vectors(info.id)
    X = unit(n, seed=seed)
    store.write_vectors(info.id, [r.id for r in todo], X[[r.id - 1 for r in todo]])
    store.mark_complete(info.id)
    return store, info.id, X


def test_round_trip_and_digest_equal_sqlite(pg_store, tmp_path):
    pg, mid, X = fill(pg_store)
    lite, mid2, _ = fill(tmp_path / "f.sqlite")
    with pg, lite:
        assert mid == mid2 and pg.counts() == lite.counts()
        assert pg.images() == lite.images()
        for split in ("train", "val", "test", None):
            a, b = pg.load_matrix(split, mid), lite.load_matrix(split, mid)
            assert np.array_equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])
            assert np.array_equal(a[2], X[a[0] - 1])
        assert np.array_equal(pg.load_vectors([7, 3, 3, 30], mid), X[[6, 2, 2, 29]])
        assert pg.labels_of([4, 1]) == lite.labels_of([4, 1])
        a, b = pg.model_info(mid), lite.model_info(mid)
        assert a.same_transform(b) and (a.classes, a.epoch, a.complete) == (b.classes, b.epoch, b.complete)
    assert content_digest(pg_store) == content_digest(tmp_path / "f.sqlite")
    assert verify_store(pg_store, mid) == 30


def test_tables_are_the_documented_ones(pg_store):
    with open_store(pg_store, create=True) as store:
        lines = store.schema()
        eng = store.engine
        with eng.connect() as conn:
            for t in metadata.sorted_tables:
                cols = conn.exec_driver_sql(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = %(s)s AND "
                    "table_name = %(t)s ORDER BY ordinal_position", {"s": pg_store.schema, "t": t.name}).scalars().all()
                assert cols == [c.name for c in t.columns], t.name
            kind = conn.exec_driver_sql(
                "SELECT data_type FROM information_schema.columns WHERE table_schema = %(s)s AND "
                "table_name = 'vectors' AND column_name = 'vector'", {"s": pg_store.schema}).scalar()
    assert kind == "bytea"
    assert any(line.startswith("vectors (image_id bigint, model_id integer, vector bytea") for line in lines)


def test_rewriting_a_chunk_adds_no_row_and_sync_updates(pg_store):
    store, mid, X = fill(pg_store)
    with store:
        assert store.write_vectors(mid, [1, 2, 3], X[:3]) == 0  # a resumed rank writes its chunk again
        assert store.counts()["vectors"] == 30
        # sync: one image removed, one with new content (loses its vector), one added
        id_of = {r.path: r.id for r in store.images()}
        new = rows(30)
        new[5] = SimpleNamespace(**{**new[5].__dict__, "sha256": "changed"})
        new = new[1:] + [SimpleNamespace(path="/img/c0/new.png", label="c0", split="train", sha256="n")]
        rep = store.sync_images(new)
        assert (rep.added, rep.removed, rep.content_changed) == (1, 1, 1)
        assert [r.id for r in store.missing_vectors(mid)] == [id_of[new[4].path], 31]
        with pytest.raises(UserError, match="incomplete"):
            store.load_matrix("train", mid)


def test_a_corrupted_vector_is_refused_on_read(pg_store):
    store, mid, X = fill(pg_store)
    with store, store.engine.begin() as conn:
        bad = (X[3] * 2).astype("<f4").tobytes()
        conn.execute(sa.text("UPDATE vectors SET vector = :v WHERE image_id = 4"), {"v": bad})
    with open_store(pg_store) as store, pytest.raises(UserError, match="vector of image 4 is of norm 2"):
        store.load_matrix(None, mid)


def test_stores_in_two_schemas_do_not_mix(pg_server, pg_store):
    other = PgStore(pg_server, pg_store.schema + "_b")
    remove_store(other)
    try:
        a, mid, _ = fill(pg_store, n=30, seed=0)
        b, _, _ = fill(other, n=12, seed=1)
        with a, b:
            assert a.counts()["images"] == 30 and b.counts()["images"] == 12
        assert content_digest(pg_store) != content_digest(other)
    finally:
        remove_store(other)
    assert not store_exists(other)
    with pytest.raises(UserError, match="missing"):
        open_store(other)


def test_password_only_from_the_variable_never_in_the_url(pg_server, monkeypatch):
    secret = "s3cr3t-pw-Zq"
    url = pg_server.replace("postgres@", f"postgres:{secret}@")
    with pytest.raises(UserError) as e:
        PgStore(url, "x")
    assert secret not in str(e.value) and "PLANKTON_STORE_PASSWORD" in str(e.value)
    cfg = Config()
    cfg.store.url = url
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert secret not in str(e.value) and "store.url" in str(e.value) and "store.password_env" in str(e.value)
    cfg.store.url = "sqlite:///x.db"
    with pytest.raises(ConfigError, match="store.url"):
        validate(cfg)
    cfg.store.url, cfg.store.schema = pg_server, "Bad-Name"
    with pytest.raises(ConfigError, match="store.schema"):
        validate(cfg)
    # the password is handed to the driver as a connect argument, not through the URL
    monkeypatch.setenv("PLANKTON_STORE_PASSWORD", secret)
    eng = _pg_engine(PgStore(pg_server, "x"))
    try:
        assert secret not in repr(eng.url) and secret not in str(eng.url)
    finally:
        eng.dispose()


def test_unreachable_server_is_one_line(tmp_path):
    target = PgStore(f"postgresql+psycopg://nobody@/db?host={tmp_path}", "x")
    with pytest.raises(UserError) as e:
        open_store(target)
    assert "\n" not in str(e.value) and "PLANKTON_STORE_PASSWORD" in str(e.value)


def test_copy_block_layout():
    ids = np.array([1, 2], np.int64)
    X = unit(2, DIM)
    b = _copy_block(ids, 7, X)
    assert len(b) == 2 * (2 + 4 + 8 + 4 + 4 + 4 + 4 * DIM)
    assert b[:2] == b"\x00\x03" and b[6:14] == (1).to_bytes(8, "big") and b[26:26 + 4 * DIM] == X[0].tobytes()


def test_float16_round_trip_and_digest_equal_sqlite(pg_store, tmp_path):
    from test_features import filled16

    pg = open_store(pg_store, create=True)
    pg.sync_images(rows(30))
    info, _ = register(pg, dtype="float16")
    X = unit(30)
    # two chunks, the second written again (the COPY conflict path) with float16 rows
    assert pg.write_vectors(info.id, np.arange(1, 21), X[:20]) == 20
    assert pg.write_vectors(info.id, np.arange(11, 31), X[10:]) == 10
    pg.mark_complete(info.id)
    lite, mid, _ = filled16(tmp_path / "f.sqlite")
    with pg, lite:
        assert pg.model_info(info.id).dtype == "float16" and mid == info.id
        for split in ("train", None):
            a, b = pg.load_matrix(split, mid), lite.load_matrix(split, mid)
            assert a[2].dtype == np.float32 and np.array_equal(a[2], b[2])
            assert np.array_equal(a[2], X[a[0] - 1].astype("<f2").astype(np.float32))
        with pg.engine.connect() as conn:
            sizes = set(conn.exec_driver_sql("SELECT octet_length(vector) FROM vectors").scalars())
            dtype = conn.exec_driver_sql("SELECT dtype FROM models").scalar()
    assert sizes == {2 * DIM} and dtype == "float16"
    assert content_digest(pg_store) == content_digest(tmp_path / "f.sqlite")
    assert verify_store(pg_store, mid) == 30
    assert store_bytes(pg_store) > 30 * 2 * DIM


def test_version_2_store_on_postgres_is_upgraded_in_place(pg_store):
    store, mid, X = fill(pg_store, n=12)
    store.close()
    d3 = content_digest(pg_store)
    eng = _pg_engine(pg_store)
    with eng.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE models DROP COLUMN dtype")
        conn.exec_driver_sql("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    eng.dispose()
    # the digest the code of version 2 recorded for this content (tests/store/test_features.py pins it)
    assert content_digest(pg_store) == "0911f64476a5b9cc0fad1e5a2e67c9ae1ed46a40f3c24eed5feccb50243a777e"
    assert schema_version(pg_store) == 2
    with pytest.raises(UserError, match="schema version 2.*rerun 04_extract_features.py, which upgrades"):
        open_store(pg_store)
    assert upgrade_store(pg_store) == 2
    with open_store(pg_store) as s:
        assert s.model_info(mid).dtype == "float32"
        assert np.array_equal(s.load_matrix(None, mid)[2], X)
    assert content_digest(pg_store) == d3


def test_copy_block_layout_float16():
    ids = np.array([5], np.int64)
    X = unit(1, DIM).astype("<f2")
    b = _copy_block(ids, 7, X)
    assert len(b) == 2 + 4 + 8 + 4 + 4 + 4 + 2 * DIM
    assert b[22:26] == (2 * DIM).to_bytes(4, "big") and b[26:] == X[0].tobytes()


def test_float32_vectors_are_converted_to_float16_on_postgres(pg_store, tmp_path):
    store, mid, X = fill(pg_store, n=30)
    with store:
        new, dropped = register(store, dtype="float16")
        assert [m.id for m in dropped] == [mid] and store.missing_vectors(new.id) == []
        store.mark_complete(new.id)
        ids, _, M = store.load_matrix(None, new.id)
    assert np.array_equal(M, X[ids - 1].astype("<f2").astype(np.float32))
    # the same content as the SQLite store converted alike (model ids included)
    from test_features import filled

    lite, _, _ = filled(tmp_path / "f.sqlite")
    with lite:
        lite.mark_complete(register(lite, dtype="float16")[0].id)
    assert content_digest(pg_store) == content_digest(tmp_path / "f.sqlite")
