"""The feature store (common/features.py) on synthetic vectors: schema, round trip, safety, LUT, digest."""
from __future__ import annotations

import sqlite3
from types import SimpleNamespace

import numpy as np
import pytest

from common.errors import UserError
from common.store import maintenance as store_maintenance
from common.store.maintenance import content_digest, schema_version, upgrade_store
from common.store.schema import DTYPE_COLUMN, NORM_TOLERANCE, SCHEMA_SQL, SCHEMA_VERSION, _norm_sql, metadata
from common.store.sqlite import FeatureStore
from common.store.schema import raw_connection

DIM = 16


def rows(n: int = 30, sha: str = "s") -> list[SimpleNamespace]:
    splits = ("train", "val", "test")
    return [SimpleNamespace(path=f"/img/c{i % 4}/{i:03d}.png", label=f"c{i % 4}", split=splits[i % 3], sha256=f"{sha}{i}")
            for i in range(n)]


def unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    X = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def register(store: FeatureStore, sha: str = "a" * 64, dim: int = DIM, embedding: str = "encoder", **kw):
    args = dict(checkpoint_sha256=sha, embedding=embedding, backbone="test_resnet", dim=dim, mean=[0.1, 0.2, 0.3],
                std=[0.4, 0.5, 0.6], image_size=32, pad_fill=0, classes=["c0", "c1", "c2", "c3"],
                checkpoint_path=f"/ck/{sha[:4]}.pt", epoch=3)
    args.update(kw)
    return store.register_model(**args)


def filled(path, n: int = 30, sha: str = "a" * 64, seed: int = 0) -> tuple[FeatureStore, int, np.ndarray]:
    """A store with ``n`` images and one complete model; returns (store, model id, vectors by image id - 1)."""
    store = FeatureStore(path, create=True)
    store.sync_images(rows(n))
    info, _ = register(store, sha)
    todo = store.missing_vectors(info.id)
    X = unit(n, seed=seed)
    store.write_vectors(info.id, [r.id for r in todo], X[[r.id - 1 for r in todo]])
    store.mark_complete(info.id)
    return store, info.id, X


def test_documented_schema_is_the_created_schema(tmp_path):
    with FeatureStore(tmp_path / "f.sqlite", create=True) as store:
        created = [_norm_sql(s) for s in store.schema()]
    assert created == [_norm_sql(s) for s in SCHEMA_SQL]
    # the SQLAlchemy tables the code queries name the same columns, in the same order
    conn = sqlite3.connect(tmp_path / "f.sqlite")
    for t in metadata.sorted_tables:
        cols = [r[1] for r in conn.execute("SELECT * FROM pragma_table_info(?)", (t.name,))]
        assert cols == [c.name for c in t.columns], t.name
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 65536
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_round_trip_and_raw_little_endian_blobs(tmp_path):
    store, mid, X = filled(tmp_path / "f.sqlite")
    for split in ("train", "val", "test", None):
        ids, labels, M = store.load_matrix(split, mid)
        assert ids.dtype == np.int64 and M.dtype == np.float32 and M.flags.c_contiguous and M.flags.writeable
        assert (np.diff(ids) > 0).all()
        want = sorted((r for r in rows() if split is None or r.split == split), key=lambda r: r.path)  # ids follow path order
        assert labels == [r.label for r in want]
        np.testing.assert_array_equal(M, X[ids - 1])
    np.testing.assert_array_equal(store.load_vectors([7, 2, 7, 30], mid), X[[6, 1, 6, 29]])
    assert store.labels_of([5, 1]) == ["c0", "c0"]
    with pytest.raises(UserError, match="no vector"):
        store.load_vectors([1, 999], mid)
    store.close()
    # any SQLite client reads the vectors as little-endian float32
    conn = sqlite3.connect(tmp_path / "f.sqlite")
    blob = conn.execute("SELECT vector FROM vectors WHERE image_id = 3 AND model_id = ?", (mid,)).fetchone()[0]
    conn.close()
    assert len(blob) == 4 * DIM
    np.testing.assert_array_equal(np.frombuffer(blob, "<f4"), X[2])


def test_empty_split_loads_as_empty_matrix(tmp_path):
    store = FeatureStore(tmp_path / "f.sqlite", create=True)
    store.sync_images([r for r in rows(6) if r.split != "test"])
    info, _ = register(store)
    store.write_vectors(info.id, [r.id for r in store.missing_vectors(info.id)], unit(4))
    store.mark_complete(info.id)
    ids, labels, M = store.load_matrix("test", info.id)
    assert ids.shape == (0,) and labels == [] and M.shape == (0, DIM)
    store.close()


def test_dimension_mismatch_names_both(tmp_path):
    store = FeatureStore(tmp_path / "f.sqlite", create=True)
    store.sync_images(rows(4))
    info, _ = register(store)
    with pytest.raises(UserError, match=rf"dim {DIM + 1}.*its dim is {DIM}"):
        store.write_vectors(info.id, [1, 2], unit(2, DIM + 1))
    with pytest.raises(ValueError, match="L2-normalised"):
        store.write_vectors(info.id, [1, 2], 2 * unit(2))
    store.close()


def test_other_checkpoint_or_dimension_refused_naming_both(tmp_path):
    store, mid, _ = filled(tmp_path / "f.sqlite", sha="a" * 64)
    assert store.require_model("a" * 64, "encoder", DIM).id == mid
    with pytest.raises(UserError) as e:
        store.require_model("b" * 64, "encoder", DIM)
    assert "aaaaaaaaaaaa" in str(e.value) and "bbbbbbbbbbbb" in str(e.value)
    with pytest.raises(UserError, match=rf"dim {DIM}.*gives dim 2048"):
        store.require_model("a" * 64, "encoder", 2048)
    other, _ = register(store, "b" * 64, replace_others=False)
    with pytest.raises(UserError) as e:
        store.check_same_model(mid, other.id)
    assert "aaaaaaaaaaaa" in str(e.value) and "bbbbbbbbbbbb" in str(e.value)
    assert store.check_same_model(mid, mid).id == mid
    store.close()


def test_incomplete_model_is_refused(tmp_path):
    store = FeatureStore(tmp_path / "f.sqlite", create=True)
    store.sync_images(rows(6))
    info, _ = register(store)
    store.write_vectors(info.id, [1, 2, 3], unit(3))  # a crashed extraction: half the vectors
    for load in (lambda: store.load_matrix("train", info.id), lambda: store.load_vectors([1], info.id),
                 lambda: store.load_split("train", info.id, ["c0", "c1", "c2", "c3"]), lambda: store.current_model()):
        with pytest.raises(UserError, match="04_extract_features.py"):
            load()
    with pytest.raises(RuntimeError, match="3 images"):
        store.mark_complete(info.id)
    assert not store.model_info(info.id).complete
    store.write_vectors(info.id, [4, 5, 6], unit(3, seed=1))
    assert store.mark_complete(info.id).complete
    assert store.current_model().id == info.id
    # a new image makes every model incomplete again until its vector is written
    store.sync_images(rows(7))
    with pytest.raises(UserError, match="incomplete"):
        store.load_matrix("train", info.id)
    assert [r.id for r in store.missing_vectors(info.id)] == [7]
    store.close()


def test_failed_write_leaves_nothing(tmp_path):
    store = FeatureStore(tmp_path / "f.sqlite", create=True)
    store.sync_images(rows(6))
    info, _ = register(store)
    store.write_vectors(info.id, [1], unit(1))
    with pytest.raises(Exception):  # noqa: B017 - any DB error: image 1 already has a vector: the whole batch is rolled back
        store.write_vectors(info.id, [2, 3, 1], unit(3))
    assert [r.id for r in store.missing_vectors(info.id)] == [2, 3, 4, 5, 6]
    store.close()


def test_open_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="missing"):
        FeatureStore(tmp_path / "none.sqlite")
    assert not (tmp_path / "none.sqlite").exists()
    (tmp_path / "junk.sqlite").write_text("not a database at all" * 100)
    with pytest.raises(UserError, match="junk.sqlite"):
        FeatureStore(tmp_path / "junk.sqlite")
    FeatureStore(tmp_path / "old.sqlite", create=True).close()
    conn = sqlite3.connect(tmp_path / "old.sqlite")
    conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(UserError, match=rf"old.sqlite has feature-store schema version 0.*version {SCHEMA_VERSION}"):
        FeatureStore(tmp_path / "old.sqlite")
    with pytest.raises(UserError, match="schema version"):
        content_digest(tmp_path / "old.sqlite")


def test_sync_keeps_ids_and_drops_what_changed(tmp_path):
    store, mid, X = filled(tmp_path / "f.sqlite", n=12)
    new = rows(12)
    new[0].sha256 = "changed"  # same path, new content: its vector goes
    new[1].split = "train"  # moved: its vector stays
    del new[2]  # removed: row and vector go
    new.append(SimpleNamespace(path="/img/new.png", label="c1", split="val", sha256="n"))
    rep = store.sync_images(new)
    assert (rep.added, rep.removed, rep.content_changed, rep.moved) == (1, 1, 1, 1)
    by_path = {r.path: r.id for r in store.images()}
    assert by_path["/img/c1/001.png"] == 4 and by_path["/img/new.png"] == 13 and "/img/c2/002.png" not in by_path
    assert [r.id for r in store.missing_vectors(mid)] == [1, 13]
    assert not store.sync_images(new).changed
    with pytest.raises(UserError, match="twice"):
        store.sync_images(new + [new[0]])
    store.close()


def test_new_checkpoint_replaces_old_model_and_vectors(tmp_path):
    store, mid, _ = filled(tmp_path / "f.sqlite", n=9)
    same, dropped = register(store, "a" * 64)
    assert same.id == mid and dropped == [] and same.complete
    new, dropped = register(store, "b" * 64)
    assert [m.id for m in dropped] == [mid] and new.id != mid and not new.complete
    c = store.counts()
    assert (c["models"], c["vectors"]) == (1, 0) and set(c) == {"meta", "images", "models", "vectors"}
    # the same checkpoint with other preprocessing is another set of vectors
    store.write_vectors(new.id, list(range(1, 10)), unit(9))
    again, dropped = register(store, "b" * 64, mean=[0.5, 0.5, 0.5])
    assert [m.id for m in dropped] == [new.id] and store.counts()["vectors"] == 0
    store.close()


def test_every_read_checks_every_vector(tmp_path):
    """A vector that is not finite or not unit-norm is refused naming the image, on every read."""
    import sqlite3

    from common.store.maintenance import verify_store

    p = tmp_path / "f.sqlite"
    store, mid, _ = filled(p, n=12)
    store.close()
    assert verify_store(p, mid) == 12
    bad = np.full(DIM, np.sqrt(2 / DIM), "<f4")  # norm sqrt(2), not 1
    con = sqlite3.connect(p)
    con.execute("UPDATE vectors SET vector = ? WHERE image_id = 5", (bad.tobytes(),))
    con.commit()
    con.close()
    with FeatureStore(p) as s2:
        with pytest.raises(UserError, match=r"vector of image 5 is of norm 1\.41421, not 1.*04_extract_features"):
            s2.load_matrix(None, mid)
    with pytest.raises(UserError, match="image 5"):
        verify_store(p, mid)
    con = sqlite3.connect(p)
    con.execute("UPDATE vectors SET vector = ? WHERE image_id = 5", (np.full(DIM, np.nan, "<f4").tobytes(),))
    con.commit()
    con.close()
    with FeatureStore(p) as s2, pytest.raises(UserError, match="image 5 is not finite"):
        s2.load_split(None, mid, ["c0", "c1", "c2", "c3"])


def test_content_digest_follows_vectors(tmp_path):
    p = tmp_path / "f.sqlite"
    store, mid, X = filled(p, n=12)
    d0 = content_digest(p)
    store.close()
    assert content_digest(p) == d0  # closing (WAL checkpoint) changes nothing either
    # the same content written again (new times, same checkpoint) gives the same digest
    q = tmp_path / "g.sqlite"
    filled(q, n=12)[0].close()
    assert content_digest(q) == d0
    # other vectors (another checkpoint) give another digest
    r = tmp_path / "h.sqlite"
    filled(r, n=12, sha="b" * 64, seed=1)[0].close()
    assert content_digest(r) != d0
    # one vector changed
    store = FeatureStore(q)
    store.sync_images([*rows(11), SimpleNamespace(**{**vars(rows(12)[11]), "sha256": "edited"})])
    store.write_vectors(mid, [12], unit(1, seed=5))
    store.mark_complete(mid)
    store.close()
    assert content_digest(q) != d0
    with pytest.raises(UserError, match="missing"):
        content_digest(tmp_path / "none.sqlite")


# ----------------------------------------------------------------------------- float16 vectors (extract.dtype)


def filled16(path, n: int = 30, seed: int = 0) -> tuple[FeatureStore, int, np.ndarray]:
    """As ``filled``, with a float16 model: returns (store, model id, the float32 vectors written)."""
    store = FeatureStore(path, create=True)
    store.sync_images(rows(n))
    info, _ = register(store, dtype="float16")
    X = unit(n, seed=seed)
    store.write_vectors(info.id, [r.id for r in store.missing_vectors(info.id)], X)
    store.mark_complete(info.id)
    return store, info.id, X


def test_float16_round_trip_blob_sizes_and_exact_float32_reads(tmp_path):
    store, mid, X = filled16(tmp_path / "f.sqlite")
    X16 = X.astype("<f2")
    stored = X16.astype(np.float32)  # what every reader gets: the float16 values, exactly, not re-normalised
    assert not np.array_equal(stored, X)  # rounding happened
    info = store.model_info(mid)
    assert info.dtype == "float16" and info.itemsize == 2 and "float16" in info.describe()
    ids, _, M = store.load_matrix(None, mid)
    assert M.dtype == np.float32 and np.array_equal(M, stored[ids - 1])
    np.testing.assert_array_equal(store.load_vectors([7, 2, 7], mid), stored[[6, 1, 6]])
    blocks = list(store.iter_blocks(["train", "val", "test"], mid, 4))
    got_ids = np.concatenate([b[0] for b in blocks])
    assert all(b[1].dtype == np.float32 and len(b[0]) <= 4 for b in blocks)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), stored[got_ids - 1])
    assert store_maintenance.verify_store(tmp_path / "f.sqlite", mid) == 30
    # decode without a dtype (as a caller that knows only the dimension calls it) looks it up
    with store.read_tx() as conn:
        blobs = [r[0] for r in raw_connection(conn).execute("SELECT vector FROM vectors ORDER BY image_id").fetchall()]
    np.testing.assert_array_equal(store.decode(blobs, np.arange(1, 31), DIM), stored)
    store.close()
    conn = sqlite3.connect(tmp_path / "f.sqlite")
    blob, dtype = conn.execute("SELECT v.vector, m.dtype FROM vectors v JOIN models m ON m.id = v.model_id "
                               "WHERE image_id = 3").fetchone()
    sizes = {r[0] for r in conn.execute("SELECT length(vector) FROM vectors")}
    conn.close()
    assert dtype == "float16" and sizes == {2 * DIM} and len(blob) == 2 * DIM
    np.testing.assert_array_equal(np.frombuffer(blob, "<f2"), X16[2])  # any client: numpy.frombuffer(blob, "<f2")
    # a float32 store of the same vectors takes twice the vector bytes
    lite, _, _ = filled(tmp_path / "g.sqlite")
    with lite.read_tx() as conn:
        assert {r[0] for r in raw_connection(conn).execute("SELECT length(vector) FROM vectors")} == {4 * DIM}
    lite.close()


@pytest.mark.parametrize("dim", [1, 2, 3, 7, 16, 128, 2048])
def test_float16_rounding_keeps_unit_norms_within_the_tolerance(tmp_path, dim):
    """Rounding to float16 moves each value by at most 2**-11 of itself (round to nearest; values
    below 2**-14 err by at most 2**-25 absolute), so a unit vector's norm by at most ~2**-11 = 4.9e-4
    < NORM_TOLERANCE: random vectors, equal components and near-one-hot ones are all stored."""
    rng = np.random.default_rng(dim)
    X = rng.standard_normal((2000 if dim < 2048 else 300, dim))
    X = np.concatenate([X, np.ones((1, dim)), np.eye(dim)[:1] + 1e-3, np.abs(X[:5]) ** 3])
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    n16 = np.linalg.norm(X.astype("<f2").astype(np.float64), axis=1)
    worst = float(np.abs(n16 - 1.0).max())
    assert worst <= 2.0 ** -11 + 1e-6 < NORM_TOLERANCE, worst
    store = FeatureStore(tmp_path / "f.sqlite", create=True)
    store.sync_images([SimpleNamespace(path=f"/i/{i}.png", label="c0", split="train", sha256=str(i))
                       for i in range(len(X))])
    info, _ = register(store, dim=dim, dtype="float16")
    assert store.write_vectors(info.id, np.arange(1, len(X) + 1), X) == len(X)
    store.mark_complete(info.id)
    assert store_maintenance.verify_store(tmp_path / "f.sqlite", info.id) == len(X)
    store.close()


def test_float16_write_checks_the_stored_values(tmp_path):
    store = FeatureStore(tmp_path / "f.sqlite", create=True)
    store.sync_images(rows(4))
    info, _ = register(store, dtype="float16")
    big = unit(2) * 1e6  # finite in float32, infinite once rounded to float16 (max 65504)
    with pytest.raises(ValueError, match="non-finite"):
        store.write_vectors(info.id, [1, 2], big)
    with pytest.raises(ValueError, match="L2-normalised"):
        store.write_vectors(info.id, [1, 2], 2 * unit(2))
    with pytest.raises(UserError, match="extract.dtype: expected one of float32/float16, got 'float64'"):
        register(store, dtype="float64")
    store.close()


def test_corrupted_float16_vector_refused_naming_the_image(tmp_path):
    p = tmp_path / "f.sqlite"
    store, mid, _ = filled16(p, n=12)
    store.close()
    con = sqlite3.connect(p)
    con.execute("UPDATE vectors SET vector = ? WHERE image_id = 5", (np.full(DIM, np.sqrt(2 / DIM), "<f2").tobytes(),))
    con.commit()
    con.close()
    with FeatureStore(p) as s2, pytest.raises(UserError, match=r"vector of image 5 is of norm 1\.41.*, not 1.*--force"):
        s2.load_matrix(None, mid)
    with pytest.raises(UserError, match="image 5"):
        store_maintenance.verify_store(p, mid)
    con = sqlite3.connect(p)  # a float32 blob in a float16 model: wrong length
    con.execute("UPDATE vectors SET vector = ? WHERE image_id = 5", (unit(1)[0].astype("<f4").tobytes(),))
    con.commit()
    con.close()
    with FeatureStore(p) as s2, pytest.raises(UserError, match=f"not {DIM} float16 values each"):
        s2.load_matrix(None, mid)


def test_digest_includes_the_dtype_and_another_dtype_is_another_model(tmp_path):
    a, mid, X = filled(tmp_path / "a.sqlite", n=12)
    a.close()
    b, _, _ = filled16(tmp_path / "b.sqlite", n=12)
    b.close()
    assert content_digest(tmp_path / "a.sqlite") != content_digest(tmp_path / "b.sqlite")
    # vectors already exactly float16 (so the same blob values): still another digest, the dtype differs
    s = FeatureStore(tmp_path / "c.sqlite", create=True)
    s.sync_images(rows(12))
    info, _ = register(s)
    s.write_vectors(info.id, np.arange(1, 13), X[:12].astype("<f2").astype(np.float32))
    s.mark_complete(info.id)
    s.close()
    assert content_digest(tmp_path / "c.sqlite") not in (content_digest(tmp_path / "a.sqlite"),
                                                         content_digest(tmp_path / "b.sqlite"))


def test_float32_vectors_are_converted_to_float16_in_place_and_back_is_embedded_again(tmp_path):
    store, mid, X = filled(tmp_path / "f.sqlite", n=12)
    new, dropped = register(store, dtype="float16")  # extract.dtype: float32 -> float16
    assert [m.id for m in dropped] == [mid] and new.id != mid and new.dtype == "float16" and not new.complete
    assert store.counts()["models"] == 1 and store.missing_vectors(new.id) == []  # nothing to embed
    store.mark_complete(new.id)
    ids, _, M = store.load_matrix(None, new.id)
    np.testing.assert_array_equal(M, X[ids - 1].astype("<f2").astype(np.float32))
    store.close()
    # the same blobs as writing the float32 vectors to a float16 model directly (the model id differs)
    filled16(tmp_path / "g.sqlite", n=12)[0].close()
    blobs = []
    for db in ("f.sqlite", "g.sqlite"):
        con = sqlite3.connect(tmp_path / db)
        blobs.append(con.execute("SELECT image_id, vector FROM vectors ORDER BY image_id").fetchall())
        con.close()
    assert blobs[0] == blobs[1] and len(blobs[0]) == 12
    store = FeatureStore(tmp_path / "f.sqlite")
    same, dropped = register(store, dtype="float16")
    assert same.id == new.id and dropped == []
    back, dropped = register(store, dtype="float32")  # float16 -> float32 cannot be converted: embedded again
    assert [m.id for m in dropped] == [new.id] and store.counts()["vectors"] == 0
    store.close()
    # an incomplete float32 model (an interrupted extraction) is not converted either
    part = FeatureStore(tmp_path / "p.sqlite", create=True)
    part.sync_images(rows(6))
    info, _ = register(part)
    part.write_vectors(info.id, [1, 2], unit(2))
    new, dropped = register(part, dtype="float16")
    assert [m.id for m in dropped] == [info.id] and part.counts()["vectors"] == 0
    part.close()


# ----------------------------------------------------------------------------- a store of schema version 2


def downgrade_to_version_2(path) -> None:
    """Make a store what version 2 of this tool wrote (no models.dtype; schema_version 2)."""
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE models DROP COLUMN dtype")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.commit()
    con.close()


def test_version_2_store_is_upgraded_in_place_by_stage_04_only(tmp_path):
    p = tmp_path / "f.sqlite"
    store, mid, X = filled(p, n=12)
    store.close()
    d3 = content_digest(p)
    downgrade_to_version_2(p)
    # the digest version 2 of this tool recorded for this content (computed by that code, commit 1a18a4a)
    assert content_digest(p) == "0911f64476a5b9cc0fad1e5a2e67c9ae1ed46a40f3c24eed5feccb50243a777e"
    assert schema_version(p) == 2
    with pytest.raises(UserError, match=r"schema version 2, written by an older version.*rerun 04_extract_features"
                                        r"\.py, which upgrades it in place"):
        FeatureStore(p)
    con = sqlite3.connect(p)
    blobs = con.execute("SELECT image_id, model_id, vector FROM vectors ORDER BY image_id").fetchall()
    con.close()
    assert upgrade_store(p) == 2 and upgrade_store(p) is None  # once
    assert schema_version(p) == SCHEMA_VERSION
    with FeatureStore(p) as s:
        assert s.model_info(mid).dtype == "float32" and s.model_info(mid).complete
        np.testing.assert_array_equal(s.load_matrix(None, mid)[2], X)
        text = s.schema()
    con = sqlite3.connect(p)
    assert con.execute("SELECT image_id, model_id, vector FROM vectors ORDER BY image_id").fetchall() == blobs
    cols = con.execute("SELECT * FROM pragma_table_info('models')").fetchall()
    with pytest.raises(sqlite3.IntegrityError):  # the CHECK came with the column
        con.execute("UPDATE models SET dtype = 'float64'")
    con.close()
    assert content_digest(p) == d3  # the same content as the store version 3 wrote
    # the upgraded file has a new store's columns (name, type, not null, default, key), in order;
    # only SQLite's CREATE text of models differs (the column spliced in by ALTER TABLE)
    FeatureStore(tmp_path / "new.sqlite", create=True).close()
    con = sqlite3.connect(tmp_path / "new.sqlite")
    assert cols == con.execute("SELECT * FROM pragma_table_info('models')").fetchall()
    con.close()
    norm = [_norm_sql(t) for t in text]
    want = [_norm_sql(t) for t in SCHEMA_SQL]
    assert [a for a, b in zip(norm, want) if a != b] == [n for n in norm if n.startswith("CREATE TABLE models")]
    assert DTYPE_COLUMN in norm[3]

