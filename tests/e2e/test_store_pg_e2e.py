"""Stages 04-07 of the demo with ``store.url`` at a real PostgreSQL server (pgserver): the same
predictions as the SQLite run, the password nowhere in the run folder or the output, and stage
04's rerun check against the server's content digest. Stages are called in this process (the
script's own ``execute``, same argv: tests/helpers.py)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import sqlalchemy as sa
from helpers import run_stage

from common.store.maintenance import content_digest
from common.store.postgres import PgStore

SECRET = "pw-7Hq2-never-logged"
STAGES = ("04_extract_features", "05_lut_threshold", "06_prune_features", "07_inference")


def _rows(p: Path) -> list[dict]:
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def _same_predictions(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0 and list(a[0]) == list(b[0])
    for ra, rb in zip(a, b):
        for k, va in ra.items():
            vb = rb[k]
            try:
                fa, fb = float(va), float(vb)
            except ValueError:
                assert va == vb, (k, ra, rb)
            else:
                assert abs(fa - fb) <= 1e-6, (k, ra, rb)


def test_stages_04_to_07_on_postgres_give_the_sqlite_predictions(pipeline, pg_server, tmp_path):
    run, _, res = pipeline
    assert res.returncode == 0, res.stderr[-3000:]
    copy = tmp_path / "pg_run"
    shutil.copytree(run, copy, symlinks=True)
    digits = [a for a in json.loads((run / "01_random_split_dataset" / "manifest.json").read_text())["argv"]
              if a.startswith("data.root=")]
    env = {"PLANKTON_STORE_PASSWORD": SECRET}
    out = []
    r = run_stage("04_extract_features", copy, *digits, f"store.url={pg_server}", env=env)
    out.append(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((copy / STAGES[0] / "manifest.json").read_text())["undeclared_keys_read"] == []
    for s in STAGES[1:]:
        r = run_stage(s, copy, env=env)
        out.append(r.stdout + r.stderr)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads((copy / s / "manifest.json").read_text())["undeclared_keys_read"] == []
    model = json.loads((copy / "04_extract_features" / "model.json").read_text())
    target = PgStore(model["store"]["url"], model["store"]["schema"])
    assert model["store"]["schema"] == "run_pg_run" and model["store"]["url"] == pg_server
    assert model["store"]["digest"] == content_digest(target)
    # the same vectors as the SQLite store, and the same predictions
    assert content_digest(target) == content_digest(run / "04_extract_features" / "features.sqlite")
    _same_predictions(_rows(copy / "07_inference" / "predictions.csv"), _rows(run / "07_inference" / "predictions.csv"))
    m06 = json.loads((copy / "06_prune_features" / "manifest.json").read_text())
    assert "lut.sqlite" in m06["outputs"]  # stage 06's LUT stays a local, self-contained file
    # the password reaches no file of the run folder and no output
    for p in copy.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p
    assert all(SECRET not in o for o in out)

    # up to date while the server's store is unchanged
    r = run_stage("04_extract_features", copy, env=env)
    assert r.returncode == 0 and "up to date" in r.stderr, r.stderr[-2000:]
    # the store changed on the server (one vector replaced by another unit vector): stage 04 sees it
    # through model.json's recorded digest and embeds every image again into a new schema
    good = content_digest(target)
    eng = sa.create_engine(model["store"]["url"].replace("postgresql+psycopg", "postgresql+psycopg", 1))
    with eng.begin() as conn:
        v = conn.execute(sa.text(f"SELECT vector FROM {target.schema}.vectors ORDER BY image_id LIMIT 1")).scalar()
        conn.execute(sa.text(f"UPDATE {target.schema}.vectors SET vector = :v WHERE image_id = "
                             f"(SELECT max(image_id) FROM {target.schema}.vectors)"), {"v": v})
    eng.dispose()
    assert content_digest(target) != good
    r = run_stage("05_lut_threshold", copy, env=env)
    assert r.returncode != 0 and "04_extract_features" in r.stderr  # downstream refuses the changed store
    r = run_stage("04_extract_features", copy, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no longer has the content digest" in r.stderr
    assert content_digest(target) == good
    # another run folder of the same name (so the same default schema) never takes this store over
    other = tmp_path / "elsewhere" / "pg_run"
    shutil.copytree(copy, other, symlinks=True)
    r = run_stage("04_extract_features", other, "--force", env=env)
    assert r.returncode == 2 and "store.schema: the schema run_pg_run" in r.stderr, r.stderr[-2000:]
    assert str(copy) in r.stderr and SECRET not in r.stdout + r.stderr
    assert content_digest(target) == good  # untouched
