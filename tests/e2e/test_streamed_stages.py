"""Stages 05-07 on the demo run with ``search.max_memory_gib=0`` (the gallery streamed from the
store): the same results as the in-memory run. Moved from tests/retrieval/test_streaming.py (the library's
tests stay there)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from helpers import run_stage


def _rows(p: Path) -> list[dict]:
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def test_stages_05_to_07_streamed_give_the_in_memory_results(pipeline, tmp_path):
    """``search.max_memory_gib=0`` from stage 05 on (the demo run's gallery and train split stay in
    the store): the same sweep, the same LUT, the same predictions and metrics; stage 07 skips the
    classical classifiers and says so; predict mode gives the same calls."""
    run, _, res = pipeline
    assert res.returncode == 0, res.stderr[-3000:]
    copy = tmp_path / "stream_run"
    shutil.copytree(run, copy, symlinks=True)
    out = {}
    # the key is saved in the run's configuration; it changes how 05-06 run, not what they write,
    # so they run again only when forced
    for s, extra in (("05_lut_threshold", ["--force", "search.max_memory_gib=0"]), ("06_prune_features", ["--force"]),
                     ("07_inference", [])):
        r = run_stage(s, copy, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "streamed from the store in blocks of" in r.stderr
        assert json.loads((copy / s / "manifest.json").read_text())["undeclared_keys_read"] == []
        out[s] = r.stderr
    assert "inference.classifiers skipped" in out["07_inference"]
    a = _rows(run / "05_lut_threshold" / "threshold_sweep.csv")
    b = _rows(copy / "05_lut_threshold" / "threshold_sweep.csv")
    for ra, rb in zip(a, b):
        for k in ra:
            if k != "latency_ms":
                assert float(ra[k]) == pytest.approx(float(rb[k]), abs=1e-9), k
    la = json.loads((run / "06_prune_features" / "lut.json").read_text())
    lb = json.loads((copy / "06_prune_features" / "lut.json").read_text())
    assert la["kept_ids_sha256"] == lb["kept_ids_sha256"] and la["n_after"] == lb["n_after"]
    from common.store.maintenance import content_digest

    assert content_digest(run / "06_prune_features" / "lut.sqlite") == \
        content_digest(copy / "06_prune_features" / "lut.sqlite")
    a, b = _rows(run / "07_inference" / "predictions.csv"), _rows(copy / "07_inference" / "predictions.csv")
    assert len(a) == len(b) > 0
    shared = [k for k in a[0] if k in b[0]]
    assert {"path", "predicted_label", "similarity", "nearest_gallery_path", "pred_retrieval_knn"} <= set(shared)
    for ra, rb in zip(a, b):
        for k in shared:
            try:
                assert abs(float(ra[k]) - float(rb[k])) <= 1e-6, (k, ra[k], rb[k])
            except ValueError:
                assert ra[k] == rb[k], (k, ra, rb)
    ma = json.loads((run / "07_inference" / "metrics.json").read_text())
    mb = json.loads((copy / "07_inference" / "metrics.json").read_text())
    for k in ("accuracy", "macro_f1", "map_at_r", "precision_at_1", "top5_accuracy", "gallery_size"):
        assert mb[k] == pytest.approx(ma[k], abs=1e-6), k
    assert "classifiers_skipped" in mb and mb["classifiers"] == {}
    # the budget changes how stages 05-06 run, not what they write: a new budget reruns stage 07 only
    r = run_stage("06_prune_features", copy, "search.max_memory_gib=8")
    assert r.returncode == 0 and "up to date" in r.stderr and "out of date now: 07_inference" in r.stderr, r.stderr
    # predict mode on a few images, streamed and in memory: the same calls
    digits = [x for x in json.loads((run / "01_random_split_dataset" / "manifest.json").read_text())["argv"]
              if x.startswith("data.root=")][0].split("=", 1)[1]
    folder = Path(digits) / sorted(p.name for p in Path(digits).iterdir() if p.is_dir())[0]
    calls = {}
    for name, budget in (("mem", "16"), ("stream", "0")):
        r = run_stage("07_inference", copy, "inference.mode=predict", f"inference.input={folder}",
                      f"inference.name={name}", "inference.classifiers=[]", f"search.max_memory_gib={budget}")
        assert r.returncode == 0, r.stderr[-3000:]
        calls[name] = _rows(copy / "07_inference" / "predict" / name / "predictions.csv")
    assert len(calls["mem"]) > 10
    assert [(x["path"], x["predicted_label"], x["neighbour1_path"]) for x in calls["mem"]] == \
        [(x["path"], x["predicted_label"], x["neighbour1_path"]) for x in calls["stream"]]
