"""benchmarks/gpu_check.py's command lines: a new run is the demo, an existing run keeps its own."""
from __future__ import annotations

import importlib.util
import sys

from conftest import ROOT
from helpers import run_pipeline


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_new_run_is_the_demo_and_stage_01_runs_on_it(digits, tmp_path, monkeypatch):
    """Trap: with --run alone run_pipeline starts a new run from default.yaml (the DYB data root), so
    the check's demo stages stopped with 'data.root ... DYB-PlanktonNet does not exist'."""
    monkeypatch.setattr("common.data.demo.render_digits", lambda dest: digits)  # not into the clone's .cache
    gc = _gpu_check()
    run = tmp_path / "cpu"
    args = gc.pipeline_args(run, "--to", "1", "run.device=cpu")
    assert args[:2] == [sys.executable, "run_pipeline.py"]
    assert args[2:] == ["-c", "configs/demo.yaml", "--run", str(run), "--to", "1", "run.device=cpu", f"data.root={digits}"]
    res = run_pipeline(args[2:])  # run_pipeline's own main, in this process
    assert res.returncode == 0, res.stderr[-2000:]
    assert (run / "01_random_split_dataset" / "splits.csv").is_file()
    again = gc.pipeline_args(run, "--from", "2")  # an existing run: its own config.yaml, no -c
    assert again[2:] == ["--run", str(run), "--from", "2"]
