"""Issue 17 #2: every refusal leaves a finished run folder as it was, and the next hint works.

Each case was reproduced on a copy of a finished run: a refusal (exit 2) deleted the stage's
manifest, rewrote ``RUN/config.yaml`` or left a half-made folder. Now a stage checks before it
writes (the wrapper's check phase and the driver's ``check``), and a refusal found mid-run puts
back what the stage's start changed. Each test compares the sha256 of every file of the run
folder before and after (``log.txt`` aside: a refusal may append to it), then follows the hint. The
``run`` fixture (conftest) is a private copy of the session's finished run.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import yaml
from helpers import relink, run_stage

from common.pipeline.manifest import read_manifest, record_outputs, write_manifest

S04, S05, S07 = "04_extract_features", "05_lut_threshold", "07_inference"


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones too), ``log.txt`` files aside; folders as ``/``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir():
            out[rel + "/"] = ""
        elif p.name != "log.txt":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


stage = run_stage  # in this process: the script's own execute, same argv (tests/helpers.py)


def refused(res) -> str:
    """The one error line of a refusal (exit 2, no traceback)."""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if " ERROR " in line or line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_a_corrupted_vector_under_a_forged_digest(run):
    """(a) 05 --force finds the vector while reading the store: exit 2, nothing changed."""
    s04 = run / S04
    store = s04 / "features.sqlite"
    con = sqlite3.connect(store)
    blob = con.execute("SELECT vector FROM vectors ORDER BY image_id LIMIT 1 OFFSET 7").fetchone()[0]
    con.close()
    data = bytearray(store.read_bytes())
    at = data.find(blob)
    data[at + 64:at + 96] = np.full(8, 7.0, "<f4").tobytes()
    store.write_bytes(bytes(data))
    m = read_manifest(s04)  # the forged digest: freshness does not notice the change
    m["outputs"].update(record_outputs(s04, {"features.sqlite": "feature_store"}))
    write_manifest(s04, m)
    relink(run, S04, (S05, "06_prune_features", S07))
    before = digests(run)
    line = refused(stage(S05, run, "--force", "lut.tolerance=0.01"))
    assert "(the store is corrupted): rerun 04_extract_features.py with --force" in line
    assert digests(run) == before
    assert yaml.safe_load((run / "config.yaml").read_text())["lut"]["tolerance"] == 0.005
    # the hint, as printed
    assert stage(S04, run, "--force").returncode == 0
    res = stage(S05, run)
    assert res.returncode == 0 and "04_extract_features was rerun" in res.stderr, res.stderr[-2000:]


def test_a_predict_list_naming_one_image_10000_times(run, tmp_path):
    """(b) refused before anything is written: no predict folder made, an existing one intact."""
    root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    images = sorted((root / "digit_3").glob("*.png"))[:3]
    lst = tmp_path / "cruise.txt"
    lst.write_text("".join(f"{images[0]}\n" for _ in range(10_000)))
    before = digests(run)
    line = refused(stage(S07, run, "inference.mode=predict", f"inference.input={lst}"))
    assert f"{lst} line 2: {images[0]} is listed twice" in line
    assert digests(run) == before and not (run / S07 / "predict").exists()
    # a finished prediction of the same name keeps its manifest
    lst.write_text("".join(f"{p}\n" for p in images))
    assert stage(S07, run, "inference.mode=predict", f"inference.input={lst}").returncode == 0
    lst.write_text("".join(f"{images[0]}\n" for _ in range(10_000)))
    before = digests(run)
    refused(stage(S07, run, "inference.mode=predict", f"inference.input={lst}"))
    assert digests(run) == before and read_manifest(run / S07 / "predict" / "cruise") is not None
    # the list fixed: it runs
    lst.write_text("".join(f"{p}\n" for p in reversed(images)))
    assert stage(S07, run, "inference.mode=predict", f"inference.input={lst}").returncode == 0


def test_a_gallery_extra_folder_with_a_zero_byte_image(run, tmp_path):
    """(c) the bad folder is not kept in RUN/config.yaml; 04's manifest and store unchanged."""
    extra = tmp_path / "extra"
    (extra / "digit_3").mkdir(parents=True)
    (extra / "digit_3" / "empty.jpg").write_bytes(b"")
    before = digests(run)
    line = refused(stage(S04, run, f"data.gallery_extra=[{extra}]"))
    assert f"data.gallery_extra: {extra / 'digit_3' / 'empty.jpg'} ({extra}): cannot decode image" in line
    assert digests(run) == before
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["gallery_extra"] == []
    res = stage(S04, run)  # the run's own configuration: still up to date
    assert res.returncode == 0 and "up to date" in res.stderr, res.stderr[-2000:]
    # the image replaced by a real one: stage 04 embeds it, and only it
    root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    (extra / "digit_3" / "empty.jpg").unlink()
    from PIL import Image

    Image.open(sorted((root / "digit_3").glob("*.png"))[0]).convert("RGB").save(extra / "digit_3" / "new.jpg")
    res = stage(S04, run, f"data.gallery_extra=[{extra}]")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((run / S04 / "manifest.json").read_text())["metrics"]["vectors_written"] == 1


def test_a_log_txt_link(run, tmp_path):
    """(d) refused before anything is written; the link's target is never written."""
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me\n")
    log = run / S05 / "log.txt"
    log.unlink()
    log.symlink_to(target)
    before = digests(run)
    line = refused(stage(S05, run, "--force", "lut.tolerance=0.01"))
    assert "log.txt is a symbolic link" in line and "remove it" in line
    assert digests(run) == before and target.read_text() == "keep me\n"
    assert read_manifest(run / S05) is not None
    log.unlink()
    assert stage(S05, run, "--force").returncode == 0


def test_a_postgres_schema_of_another_run_folder(run, pg_server, tmp_path):
    """(e) store ownership is checked before RUN/config.yaml is saved or 04's manifest retired."""
    from common.stages.extract import OWNER_KEY, default_schema
    from common.store.maintenance import open_store, remove_store
    from common.store.postgres import PgStore

    target = PgStore(pg_server, default_schema(run))
    remove_store(target)
    try:
        with open_store(target, create=True) as st:
            st.set_meta(OWNER_KEY, str(tmp_path / "elsewhere" / run.name))
        before = digests(run)
        line = refused(stage(S04, run, f"store.url={pg_server}"))
        assert f"the schema {target.schema} on {pg_server} holds the store of another run folder" in line
        assert digests(run) == before
        assert yaml.safe_load((run / "config.yaml").read_text())["store"]["url"] is None
        # the hint: a schema of this run's own
        own = PgStore(pg_server, "own_" + target.schema)
        remove_store(own)
        try:
            res = stage(S04, run, f"store.url={pg_server}", f"store.schema={own.schema}")
            assert res.returncode == 0, res.stderr[-2000:]
        finally:
            remove_store(own)
    finally:
        remove_store(target)


def test_a_planted_classifier_file(run, tmp_path):
    """(f) predict mode checks the evaluation's saved classifiers before it writes anything."""
    saved = run / S07 / "classifiers"
    bad = pickle.dumps({"not": "a model"})
    (saved / "logreg.skops").write_bytes(bad)
    digests_json = json.loads((saved / "sha256.json").read_text())
    digests_json["logreg.skops"] = hashlib.sha256(bad).hexdigest()  # planted with a matching digest
    (saved / "sha256.json").write_text(json.dumps(digests_json))
    root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    folder = tmp_path / "cruise"
    folder.mkdir()
    for p in sorted((root / "digit_5").glob("*.png"))[:4]:
        shutil.copy(p, folder / p.name)
    before = digests(run)
    line = refused(stage(S07, run, "inference.mode=predict", f"inference.input={folder}", "inference.top_k=3"))
    assert "logreg.skops: not a skops file" in line and "rerun 07_inference.py in evaluate mode" in line
    assert digests(run) == before and not (run / S07 / "predict").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["inference"]["top_k"] == 5
    # the hint: delete the folder, evaluate again; then predict mode works
    shutil.rmtree(saved)
    assert stage(S07, run).returncode == 0
    res = stage(S07, run, "inference.mode=predict", f"inference.input={folder}")
    assert res.returncode == 0 and "using the classifiers the evaluation saved" in res.stderr, res.stderr[-2000:]



def test_a_class_folder_linked_to_another_class(run, tmp_path):
    """Stage 01 lists ``data.root`` in its check: a class folder linked to another class is refused
    (exit 2, naming the link) before ``RUN/config.yaml`` takes the new root or 01's manifest goes."""
    old_root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    root = tmp_path / "digits"
    shutil.copytree(old_root, root)
    (root / "digit_x").symlink_to(root / "digit_3", target_is_directory=True)
    before = digests(run)
    line = refused(stage("01_random_split_dataset", run, f"data.root={root}"))
    assert "digit_x" in line and "symbolic link" in line
    assert digests(run) == before
