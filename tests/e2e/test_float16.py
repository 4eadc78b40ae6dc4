"""Stages 04-07 of the demo with ``extract.dtype=float16`` (predictions against the float32 run,
a smaller store, a LUT of the same bytes), and a run folder made by the version before
``extract.dtype`` (feature-store schema version 2): every hint the tool prints, followed as
printed, brings it up to date with the same predictions."""
from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import sqlite3
from pathlib import Path

from conftest import snapshot
from helpers import relink, run_command, run_pipeline

from common.pipeline.manifest import read_manifest, record_outputs, write_manifest
from common.store.maintenance import content_digest

S04, S05, S06, S07 = "04_extract_features", "05_lut_threshold", "06_prune_features", "07_inference"


def _rows(p: Path) -> list[dict]:
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def _blobs(db: Path) -> dict[str, tuple[str, bytes]]:
    """path -> (the model's dtype, the vector blob) of a store."""
    con = sqlite3.connect(db)
    try:
        return {p: (d, v) for p, d, v in con.execute(
            "SELECT i.path, m.dtype, v.vector FROM vectors v JOIN images i ON i.id = v.image_id "
            "JOIN models m ON m.id = v.model_id")}
    finally:
        con.close()


def test_float16_store_predicts_as_the_float32_store(pipeline, tmp_path):
    run, _, res = pipeline
    assert res.returncode == 0, res.stderr[-3000:]
    copy = tmp_path / "f16"
    shutil.copytree(run, copy, symlinks=True)
    # (no classical classifiers: the retrieval's predictions are compared, and the test stays short)
    r = run_pipeline(["--run", str(copy), "--from", "4", "extract.dtype=float16", "inference.classifiers=[]"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stored as float16" in r.stderr and "extract.dtype: float32 -> float16" in r.stderr
    assert "to float16 in place: no image embedded again" in r.stderr  # the float32 vectors, rounded
    model = json.loads((copy / S04 / "model.json").read_text())
    m04 = json.loads((copy / S04 / "manifest.json").read_text())
    assert model["dtype"] == "float16" and m04["metrics"]["dtype"] == "float16"
    assert m04["undeclared_keys_read"] == [] and m04["config"]["extract.dtype"] == "float16"
    f32, f16 = run / S04 / "features.sqlite", copy / S04 / "features.sqlite"
    assert m04["metrics"]["vector_bytes"] * 2 == json.loads((run / S04 / "manifest.json").read_text()
                                                            )["metrics"]["vector_bytes"]
    assert f16.stat().st_size < f32.stat().st_size and m04["metrics"]["store_bytes"] == f16.stat().st_size
    # every vector is the float32 one rounded to float16 (converted in place: what embedding again would store)
    import numpy as np

    a, b = _blobs(f32), _blobs(f16)
    assert a.keys() == b.keys() and {d for d, _ in b.values()} == {"float16"}
    assert all(np.frombuffer(a[p][1], "<f4").astype("<f2").tobytes() == b[p][1] for p in a)
    # the LUT keeps the store's dtype and its very bytes
    lut = _blobs(copy / S06 / "lut.sqlite")
    assert lut and all(lut[p] == b[p] for p in lut)
    # predictions: top-1 labels of the test images against the float32 run
    p32, p16 = _rows(run / S07 / "predictions.csv"), _rows(copy / S07 / "predictions.csv")
    assert [x["path"] for x in p32] == [x["path"] for x in p16] and len(p32) > 200
    same = sum(x["predicted_label"] == y["predicted_label"] for x, y in zip(p32, p16)) / len(p32)
    # the similarity to the same nearest gallery image differs by float16's rounding only; a test
    # image whose nearest differs is one whose float32 nearest the float16 LUT pruned (or the other
    # way round): a pair at the threshold within rounding (the digits without 9: one of 670)
    lut32 = _blobs(run / S06 / "lut.sqlite").keys()
    moved = [(x, y) for x, y in zip(p32, p16) if x["nearest_gallery_path"] != y["nearest_gallery_path"]]
    assert len(moved) <= 0.01 * len(p32), moved
    assert all(x["nearest_gallery_path"] not in lut or y["nearest_gallery_path"] not in lut32 for x, y in moved), moved
    sims = max(abs(float(x["similarity"]) - float(y["similarity"])) for x, y in zip(p32, p16)
               if x["nearest_gallery_path"] == y["nearest_gallery_path"])
    m32, m16 = (json.loads((d / S07 / "metrics.json").read_text()) for d in (run, copy))
    print(f"float16 vs float32 on the demo's {len(p32)} test images: same top-1 label {same:.4f}, "
          f"accuracy {m32['accuracy']:.4f} -> {m16['accuracy']:.4f}, macro-F1 {m32['macro_f1']:.4f} -> "
          f"{m16['macro_f1']:.4f}, max |similarity difference| {sims:.2e}, store {f32.stat().st_size:,} -> "
          f"{f16.stat().st_size:,} bytes")
    assert same >= 0.99 and sims < 2e-3


def _rerecord(stage_dir: Path, name: str, kind: str) -> None:
    """Record output ``name`` of a stage's manifest as it is now on disk (the digest of ``kind``)."""
    m = read_manifest(stage_dir)
    m["outputs"].update(record_outputs(stage_dir, {name: kind}))
    write_manifest(stage_dir, m)


def make_version_2_run(run: Path) -> None:
    """Turn a finished run into what the version before ``extract.dtype`` left: both stores of schema
    version 2 (no models.dtype), model.json without ``dtype``, and manifests recording them with
    that version's digests (``content_digest`` of a version-2 store is that code's, pinned in
    tests/store/test_features.py)."""
    for stage, db in ((S04, "features.sqlite"), (S06, "lut.sqlite")):
        con = sqlite3.connect(run / stage / db)
        con.execute("ALTER TABLE models DROP COLUMN dtype")
        con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        con.commit()
        con.close()
        _rerecord(run / stage, db, "feature_store")
    model = json.loads((run / S04 / "model.json").read_text())
    del model["dtype"]
    (run / S04 / "model.json").write_text(json.dumps(model, indent=2))
    _rerecord(run / S04, "model.json", "sha256")
    relink(run, S04, (S05, S06, S07))
    relink(run, S06, (S07,))


def test_a_run_of_feature_store_version_2_follows_its_hints_to_up_to_date(pipeline, tmp_path):
    run, _, res = pipeline
    assert res.returncode == 0, res.stderr[-3000:]
    old = tmp_path / "old"
    shutil.copytree(run, old, symlinks=True)
    make_version_2_run(old)
    r = run_pipeline(["--run", str(old), "--to", "3"])  # run_pipeline's own main, in this process
    assert r.returncode == 0 and r.stderr.count("is up to date") == 3, r.stderr[-2000:]
    before = snapshot(old)
    cmd = ["07_inference.py", "--run", str(old)]
    hinted, upgraded = [], False
    for _ in range(5):
        r = run_command(cmd)  # in this process (tests/helpers.py)
        if r.returncode == 0:
            break
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        if not hinted:  # a refusal leaves the run folder byte for byte as it was
            assert snapshot(old) == before
        hint = re.search(r"run `([^`]+)`", r.stderr.strip().splitlines()[-1]).group(1)
        words = shlex.split(hint)
        assert words[0] == "python"
        hinted.append(words[1])
        h = run_command(words[1:])
        assert h.returncode == 0, h.stderr[-2000:]
        upgraded |= "upgraded feature store" in h.stderr
    assert r.returncode == 0, r.stderr[-2000:]
    assert hinted == [f"{S04}.py", f"{S05}.py", f"{S06}.py"] and upgraded
    assert "older version of this tool" in (old / S04 / "log.txt").read_text()
    assert "nothing to embed" in (old / S04 / "log.txt").read_text()  # no image embedded again
    # the same vectors and predictions as the run they came from; then everything is up to date
    assert content_digest(old / S04 / "features.sqlite") == content_digest(run / S04 / "features.sqlite")
    a, b = _rows(run / S07 / "predictions.csv"), _rows(old / S07 / "predictions.csv")
    assert [(x["path"], x["predicted_label"]) for x in a] == [(x["path"], x["predicted_label"]) for x in b]
    assert all(abs(float(x["similarity"]) - float(y["similarity"])) <= 1e-6 for x, y in zip(a, b))
    r = run_pipeline(["--run", str(old)])
    assert r.returncode == 0 and r.stderr.count("is up to date") == 7, r.stderr[-3000:]
