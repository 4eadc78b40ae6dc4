"""End to end: every stage script as a subprocess on scikit-learn's digits, rendered as images."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import run_script

ROOT = Path(__file__).resolve().parent.parent
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
    assert len(rows) == 1797 and {r["split"] for r in rows} == {"train", "val", "test"}
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
    assert metrics["accuracy"] > 0.3  # 10 classes: chance is 0.1, even after 3 tiny epochs


def test_rerun_is_up_to_date(pipeline):
    run, cfg, res = pipeline
    assert res.returncode == 0
    digits = [a for a in json.loads((run / "01_random_split_dataset" / "manifest.json").read_text())["argv"]
              if a.startswith("data.root=")]
    again = _run(["04_extract_features.py", *cfg, "--run", str(run), *digits])
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stderr
