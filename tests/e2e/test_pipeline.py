"""End to end on scikit-learn's digits, rendered as images: every stage script as a subprocess (the
session ``pipeline``), then search indexes on copies of that run (stages called in process)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import HELD_BACK, run_script
from helpers import run_stage

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["01_random_split_dataset", "02_mean_std_variables", "03_main_supcon", "04_extract_features",
          "05_lut_threshold", "06_prune_features", "07_inference"]


def _run(args, cwd=ROOT, timeout=900):
    return run_script(args, cwd=cwd, timeout=timeout)


def test_missing_upstream_is_exit_2_naming_the_stage(tmp_path):
    res = _run(["04_extract_features.py", "--run", str(tmp_path / "empty")])
    assert res.returncode == 2, res.stderr
    assert "01_random_split_dataset" in res.stderr and "Traceback" not in res.stderr


def test_all_stages_finish(pipeline):
    run, _, res = pipeline
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for s in STAGES:
        m = json.loads((run / s / "manifest.json").read_text())
        assert m["status"] == "ok", s
        assert (run / s / "config.yaml").is_file() and (run / s / "log.txt").is_file()
    assert "Report:" in res.stdout


def test_stage_artefacts(pipeline):
    run, _, res = pipeline
    assert res.returncode == 0
    rows = list(csv.DictReader(open(run / "01_random_split_dataset" / "splits.csv")))
    # the digits without 9 (1,797 images, 180 of them 9s): nine classes
    assert len(rows) == 1797 - 180 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert len({r["label"] for r in rows}) == 9 and HELD_BACK not in {r["label"] for r in rows}
    stats = json.loads((run / "02_mean_std_variables" / "stats.json").read_text())
    assert len(stats["mean"]) == 3 and all(0 < s < 1 for s in stats["std"])
    ck = run / "03_main_supcon" / "checkpoints"
    assert (ck / "last.pt").is_file() and (ck / "best.pt").is_file() and (ck / "epoch_0002.pt").is_file()
    assert (run / "04_extract_features" / "features.sqlite").is_file()
    th = json.loads((run / "05_lut_threshold" / "threshold.json").read_text())
    assert 0.0 < th["threshold"] <= 1.0
    for f in ("predictions.csv", "metrics.json", "classification_report.csv", "confusion_matrix.png",
              "report.html", "comparison.csv"):
        assert (run / "07_inference" / f).is_file(), f
    metrics = json.loads((run / "07_inference" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.3  # 9 classes: chance is 0.11, even after 3 tiny epochs


def test_rerun_is_up_to_date(pipeline, run):
    _, cfg, _ = pipeline  # the stage runs on `run`, a private copy (it appends to the stage's log)
    digits = [a for a in json.loads((run / "01_random_split_dataset" / "manifest.json").read_text())["argv"]
              if a.startswith("data.root=")]
    again = _run(["04_extract_features.py", *cfg, "--run", str(run), *digits])
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stderr


def _copy_run(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest, symlinks=True)
    return dest


def test_faiss_index_runs_stages_06_and_07(pipeline, tmp_path):
    """search.index=ivf: stage 05 also sweeps through the index, stage 06 writes lut.faiss, stage 07
    searches it and reports its agreement with exact search; gallery=full with hnsw builds the index
    in stage 07."""
    run, cfg, res = pipeline
    assert res.returncode == 0
    exact = list(csv.DictReader(open(run / "07_inference" / "predictions.csv")))
    copy = _copy_run(run, tmp_path / "ivf")
    digits = [a for a in json.loads((run / "01_random_split_dataset" / "manifest.json").read_text())["argv"]
              if a.startswith("data.root=")]
    for stage in ("05_lut_threshold", "06_prune_features", "07_inference"):
        r = run_stage(stage, copy, *digits, "search.index=ivf", "search.nprobe=16")
        assert r.returncode == 0, r.stderr[-3000:]
    sweep = list(csv.DictReader(open(copy / "05_lut_threshold" / "threshold_sweep.csv")))
    assert all(float(r["index_same_class"]) >= 0.9 for r in sweep), sweep
    th = json.loads((copy / "05_lut_threshold" / "threshold.json").read_text())
    assert th["search"]["index"] == "ivf" and 0.9 <= th["search"]["index_same_class"] <= 1.0
    s06 = copy / "06_prune_features"
    meta = json.loads((s06 / "lut_faiss.json").read_text())
    assert meta["index"] == "ivf" and meta["factory"].startswith("IVF") and (s06 / "lut.faiss").is_file()
    for stage in ("05_lut_threshold", "06_prune_features"):
        assert json.loads((copy / stage / "manifest.json").read_text())["undeclared_keys_read"] == []
    m07 = json.loads((copy / "07_inference" / "manifest.json").read_text())
    assert m07["undeclared_keys_read"] == []
    search = json.loads((copy / "07_inference" / "metrics.json").read_text())["search"]
    assert search["index"] == "ivf" and search["val_queries"] > 100
    assert search["val_same_class"] >= 0.95 and search["val_same_image"] >= 0.9, search
    ivf = list(csv.DictReader(open(copy / "07_inference" / "predictions.csv")))
    assert [r["path"] for r in ivf] == [r["path"] for r in exact]
    same = sum(a["predicted_label"] == b["predicted_label"] for a, b in zip(ivf, exact)) / len(exact)
    assert same >= 0.95
    assert "same top-1 image as exact search" in (copy / "07_inference" / "report.html").read_text()
    digit_folder = Path(digits[0].split("=", 1)[1]) / "digit_3"
    r = run_stage("07_inference", copy, *digits, "inference.mode=predict", f"inference.input={digit_folder}",
                  "inference.name=threes")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((copy / "07_inference" / "predict" / "threes" / "manifest.json").read_text())
    assert m["metrics"]["search"]["index"] == "ivf" and m["undeclared_keys_read"] == []
    preds = list(csv.DictReader(open(copy / "07_inference" / "predict" / "threes" / "predictions.csv")))
    assert sum(p["predicted_label"] == "digit_3" for p in preds) / len(preds) > 0.5

    full = _copy_run(run, tmp_path / "hnsw")
    r = run_stage("07_inference", full, *digits, "search.index=hnsw", "inference.gallery=full")
    assert r.returncode == 0, r.stderr[-3000:]
    search = json.loads((full / "07_inference" / "metrics.json").read_text())["search"]
    assert search["index"] == "hnsw" and search["val_same_class"] >= 0.95, search
