"""From an EcoTaxa export to an EcoTaxa bundle, on the digits: the three commands of docs/ecotaxa.md,
each stage run in this process as its script runs it (stages 01-04, then 07 on the full gallery).

1. train on a zipped export (validated rows only, a class map dropping one category), every stage;
2. predict on a second export (a backup-layout folder: one TSV per sample beside its images) with a
   taxa map;
3. the bundle: the TSV at its root (BOM, type row), every image at its ``img_file_name``, each
   object's own ids and ``sample_*``/``acq_*`` columns, validated objects left out, the taxa map applied.
"""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import E2E_CONFIG
from ecotaxa_exports import WORDS, category, make_export

from common.pipeline.runner import execute
from common.stages import SPECS

# stages 01-04 then predict on the full gallery (stages 05-06 are not what this tests): about a minute
FAST = ["inference.classifiers=[]", "inference.gallery=full", "train.epochs=2", "train.batch_size=16"]


def _stage(name: str, run: Path, *args: str, configs: list[str] = E2E_CONFIG) -> int:
    """One stage in this process (what its script runs), with the tiny e2e settings (a later
    stage of a run: ``configs=[]``, the run's own config.yaml)."""
    return execute(name, [*configs, "--run", str(run), *args], table=SPECS, doc="")


def _log(folder: Path) -> str:
    return (folder / "log.txt").read_text(encoding="utf-8")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _later_digits(digits: Path, dest: Path, start: int, n: int) -> Path:
    """A digits folder holding images ``start..start+n`` of each class (others than the training ones)."""
    for d in sorted(digits.glob("digit_*")):
        (dest / d.name).mkdir(parents=True)
        for p in sorted(d.glob("*.png"))[start:start + n]:
            shutil.copy(p, dest / d.name / p.name)
    return dest


@pytest.fixture(scope="module")
def eco_run(digits, tmp_path_factory):
    base = tmp_path_factory.mktemp("eco")
    export, truth = make_export(base / "train_export.zip", digits, per_class=7, as_zip=True)
    cmap = base / "class_map.csv"
    cmap.write_text("category,class\nnine<odd,-\n*,*\n", encoding="utf-8")
    run = base / "run"
    for stage in list(SPECS)[:4]:
        assert _stage(stage, run, f"data.root={export}", f"data.class_map={cmap}", *FAST) == 0, stage
    return {"base": base, "run": run, "export": export, "truth": truth}


def test_stage_01_trains_on_the_validated_rows_of_a_zipped_export(eco_run):
    s1 = eco_run["run"] / "01_random_split_dataset"
    splits = _rows(s1 / "splits.csv")
    truth = eco_run["truth"].objects
    validated = [o for o in truth.values() if o[1] == "validated" and o[0] != category(9)]
    assert len(splits) == len(validated) == 9 * 5
    assert {r["label"] for r in splits} == {category(d) for d in range(9)}  # nine<odd dropped by the map
    assert all(Path(r["path"]).is_file() and (s1 / "ecotaxa_images") in Path(r["path"]).parents for r in splits)
    bad = _rows(s1 / "bad_images.csv")
    reasons = [r["reason"] for r in bad]
    assert len(bad) == len(truth) - len(validated)
    assert sum("dropped by the class map" in r for r in reasons) == 5  # the validated nines
    assert sum("status 'predicted' not selected" in r for r in reasons) == 10
    assert sum("status 'unclassified' not selected" in r for r in reasons) == 10
    counts = {r["class"]: r for r in _rows(s1 / "class_counts.csv")}
    assert counts["nine<odd"]["status"] == "not used" and "5 dropped" in counts["nine<odd"]["reason"]
    assert "EcoTaxa rows not used: 1 status" in counts["zero<even"]["reason"]
    m = json.loads((s1 / "manifest.json").read_text())["metrics"]["ecotaxa"]
    assert m["used"] == 45 and m["not_used"] == {"dropped": 5, "status": 20}


def test_predict_on_an_export_gives_a_bundle_that_updates_its_objects(eco_run, digits):
    base, run = eco_run["base"], eco_run["run"]
    new, truth = make_export(base / "new_export", _later_digits(digits, base / "later", 10, 3), per_class=3,
                             layout="backup")
    taxa = base / "taxa.csv"
    taxa.write_text("class,taxon\n" + "".join(f"{category(d)},{WORDS[d].capitalize()}\n" for d in range(8))
                    + "ghost,Ghost\n", encoding="utf-8")
    assert _stage("07_inference", run, "inference.mode=predict", f"inference.input={new}", "inference.name=cruise",
                  f"inference.ecotaxa_taxa={taxa}", configs=[]) == 0
    out = run / "07_inference" / "predict" / "cruise"
    log = _log(out)
    assert "maps 'ghost', which is not a trained class" in log
    assert "has no line for the trained class 'eight<even'" in log
    preds = _rows(out / "predictions.csv")
    assert len(preds) == len(truth.objects) == 30  # every object classified, validated ones too
    metrics = json.loads((out / "metrics.json").read_text())
    eco = metrics["ecotaxa"]
    assert eco["file"] == "ecotaxa_cruise.zip" and eco["rows"] == 20  # the 10 validated objects left out
    assert len(eco["left_out"]) == 10 and all("validated in EcoTaxa" in x["reason"] for x in eco["left_out"])
    with zipfile.ZipFile(out / "ecotaxa_cruise.zip") as zf:
        raw = zf.read("ecotaxa_cruise.tsv")
        names = set(zf.namelist())
    assert raw.startswith(b"\xef\xbb\xbf")
    table = list(csv.reader(io.StringIO(raw.decode("utf-8-sig")), delimiter="\t"))
    head, types, rows = table[0], table[1], [dict(zip(table[0], r)) for r in table[2:]]
    assert set(types) <= {"[t]", "[f]"} and len(types) == len(head) and len(rows) == 20
    assert {"sample_station", "acq_id", "acq_instrument", "object_similarity"} <= set(head)
    for r in rows:
        cat, status, sample, image = truth.objects[r["object_id"]]  # the export's own object id
        assert status in ("predicted", "") and r["sample_id"] == sample and r["img_file_name"] in names
        assert r["img_file_name"] == image and r["sample_station"] == f"station «{sample}»"
        assert r["object_annotation_status"] in ("predicted", "")
        assert r["object_annotation_category"] in {*(WORDS[d].capitalize() for d in range(8)), "eight<even", ""}
    # review.html carries, for its "Save for EcoTaxa (zip)", each shown image's row of this bundle (the
    # export's own ids), or why the bundle left it out (validated in EcoTaxa), and the taxa map
    html = (out / "review.html").read_text(encoding="utf-8")
    blob = json.loads(re.search(r'<script type="application/json" id="review-data">(.*?)</script>', html, re.S)[1])
    e = blob["ecotaxa"]
    assert e["header"] == head and e["zip"] == "ecotaxa_cruise_reviewed.zip" and e["taxa"]["zero<even"] == "Zero"
    assert len(e["row"]) == len(blob["items"]) == 30 and sum(k < 0 for k in e["row"]) == 10
    assert all("validated in EcoTaxa" in w for w in e["why"])
    ids = e["columns"][head.index("object_id")]
    assert sorted(ids if isinstance(ids, list) else [ids["d"][i] for i in ids["i"]]) == sorted(
        r["object_id"] for r in rows)


def test_stage_01_on_an_export_folder_by_hierarchy_level(digits, tmp_path, capfd):
    export, truth = make_export(tmp_path / "export", digits, per_class=4, layout="backup")
    run = tmp_path / "run"
    assert _stage("01_random_split_dataset", run, f"data.root={export}", "data.ecotaxa_level=3",
                  "data.ecotaxa_status=[validated, predicted]") == 0
    s1 = run / "01_random_split_dataset"
    splits = _rows(s1 / "splits.csv")
    assert {r["label"] for r in splits} == {"even", "odd"}  # living>digits>even>zero: level 3
    assert len(splits) == 10 * 3 and not (s1 / "ecotaxa_images").exists()  # a folder's own files
    assert all(export.resolve() in Path(r["path"]).parents for r in splits)
    counts = {r["class"]: r for r in _rows(s1 / "class_counts.csv")}
    assert counts["even"]["reason"].startswith("EcoTaxa categories: eight<even, four<even")  # the ones merged
    cmap = tmp_path / "map.csv"
    cmap.write_text("category,class\n*,*\n", encoding="utf-8")
    assert _stage("01_random_split_dataset", tmp_path / "r2", f"data.root={digits}", f"data.class_map={cmap}") == 2
    assert "data.class_map: applies to an EcoTaxa export" in capfd.readouterr().err
