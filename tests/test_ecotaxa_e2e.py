"""From an EcoTaxa export to an EcoTaxa bundle, on the digits: the three commands of docs/ecotaxa.md.

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
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import E2E_CONFIG, run_script
from ecotaxa_exports import WORDS, category, make_export

# stages 01-04 then predict on the full gallery (stages 05-06 are not what this tests): about a minute
FAST = ["inference.classifiers=[]", "inference.gallery=full", "train.epochs=2", "train.batch_size=32"]


def _ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


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
    export, truth = make_export(base / "train_export.zip", digits, per_class=10, as_zip=True)
    cmap = base / "class_map.csv"
    cmap.write_text("category,class\nnine<odd,-\n*,*\n", encoding="utf-8")
    run = base / "run"
    res = _ok(run_script(["run_pipeline.py", *E2E_CONFIG, "--run", str(run), "--to", "4", f"data.root={export}",
                          f"data.class_map={cmap}", *FAST]))
    return {"base": base, "run": run, "export": export, "truth": truth, "res": res}


def test_stage_01_trains_on_the_validated_rows_of_a_zipped_export(eco_run):
    s1 = eco_run["run"] / "01_random_split_dataset"
    splits = _rows(s1 / "splits.csv")
    truth = eco_run["truth"].objects
    validated = [o for o in truth.values() if o[1] == "validated" and o[0] != category(9)]
    assert len(splits) == len(validated) == 9 * 8
    assert {r["label"] for r in splits} == {category(d) for d in range(9)}  # nine<odd dropped by the map
    assert all(Path(r["path"]).is_file() and (s1 / "ecotaxa_images") in Path(r["path"]).parents for r in splits)
    bad = _rows(s1 / "bad_images.csv")
    reasons = [r["reason"] for r in bad]
    assert len(bad) == len(truth) - len(validated)
    assert sum("dropped by the class map" in r for r in reasons) == 8  # the validated nines
    assert sum("status 'predicted' not selected" in r for r in reasons) == 10
    assert sum("status 'unclassified' not selected" in r for r in reasons) == 10
    counts = {r["class"]: r for r in _rows(s1 / "class_counts.csv")}
    assert counts["nine<odd"]["status"] == "not used" and "8 dropped" in counts["nine<odd"]["reason"]
    assert "EcoTaxa rows not used: 1 status" in counts["zero<even"]["reason"]
    m = json.loads((s1 / "manifest.json").read_text())["metrics"]["ecotaxa"]
    assert m["used"] == 72 and m["not_used"] == {"dropped": 8, "status": 20}


def test_predict_on_an_export_gives_a_bundle_that_updates_its_objects(eco_run, digits):
    base, run = eco_run["base"], eco_run["run"]
    new, truth = make_export(base / "new_export", _later_digits(digits, base / "later", 10, 3), per_class=3,
                             layout="backup")
    taxa = base / "taxa.csv"
    taxa.write_text("class,taxon\n" + "".join(f"{category(d)},{WORDS[d].capitalize()}\n" for d in range(8))
                    + "ghost,Ghost\n", encoding="utf-8")
    res = _ok(run_script(["07_inference.py", "--run", str(run), "inference.mode=predict", f"inference.input={new}",
                          "inference.name=cruise", f"inference.ecotaxa_taxa={taxa}"]))
    assert "maps 'ghost', which is not a trained class" in res.stderr
    assert "has no line for the trained class 'eight<even'" in res.stderr
    out = run / "07_inference" / "predict" / "cruise"
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
