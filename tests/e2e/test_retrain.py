"""Issue 17 #1: a preprocessing change retrains, and the run says "up to date" only after that.

On a finished run, ``07_inference.py --run R data.pad_fill=255`` names stage 02; following each
printed hint used to end with stage 03 "continuing" a finished training (nothing trained, the new
pad fill recorded in its manifest), stage 04 normalising with a stats.json the checkpoint never
saw, and every stage "up to date". Now stage 03 starts a new training, keeps the old one in
``previous-<UTC time>/``, and records the preprocessing it trained with in its checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

import torch
from helpers import run_command

from common.config.load import load_config
from common.pipeline.freshness import Freshness
from common.pipeline.runconfig import read_run_config
from common.pipeline.spec import rerun_hint
from common.stages import SPECS

S03 = "03_main_supcon"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _fresh(run: Path, stage: str) -> str | None:
    cfg = load_config(base=read_run_config(run))
    return Freshness(run, cfg, SPECS, lambda s: rerun_hint(s, run)).problem(stage)


def test_pad_fill_changed_from_stage_07_follows_its_hints_to_a_retrained_checkpoint(run):
    """Each command in this process (the script's own ``execute``, same argv: tests/helpers.py);
    the last is run_pipeline.py's own loop (tests/e2e/test_run_folder.py runs it as a process)."""
    ck = run / S03 / "checkpoints"
    old = {n: _sha(ck / n) for n in ("best.pt", "last.pt")}
    cmd = ["07_inference.py", "--run", str(run), "data.pad_fill=255"]
    hinted, out03 = [], ""
    for _ in range(8):
        r = run_command(cmd)
        if r.returncode == 0:
            break
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        hint = re.search(r"run `([^`]+)`", r.stderr.strip().splitlines()[-1]).group(1)
        words = shlex.split(hint)
        assert words[0] == "python"
        hinted.append(words[1])
        assert ("data.pad_fill=255" in words) == (len(hinted) == 1)  # the change travels with the first hint
        h = run_command(words[1:])
        assert h.returncode == 0, h.stderr[-3000:]
        assert _fresh(run, "07_inference") is not None  # never "up to date" before 07 itself ran after 03
        if words[1] == f"{S03}.py":
            out03 = h.stderr
        cmd = ["07_inference.py", "--run", str(run)]
    assert r.returncode == 0, r.stderr[-2000:]
    assert hinted == ["02_mean_std_variables.py", f"{S03}.py", "04_extract_features.py", "05_lut_threshold.py",
                      "06_prune_features.py"]
    # stage 03 said, in one line, that it starts a new training because of the pad fill
    lines = [x for x in out03.splitlines() if "starts a new training" in x]
    assert len(lines) == 1 and "data.pad_fill: 0 -> 255" in lines[0] and "previous-" in lines[0], out03[-3000:]
    assert "nothing to train" not in out03
    # a retrained checkpoint; the old one kept, byte for byte
    prev = list((run / S03).glob("previous-*"))
    assert len(prev) == 1
    for name, sha in old.items():
        assert _sha(prev[0] / "checkpoints" / name) == sha
        assert _sha(ck / name) != sha
    best = torch.load(ck / "best.pt", map_location="cpu", weights_only=True)
    stats = json.loads((run / "02_mean_std_variables" / "stats.json").read_text())
    assert best["preprocessing"] == {"mean": stats["mean"], "std": stats["std"], "image_size": 24, "pad_fill": 255,
                                     "channels": "RGB"}
    assert best["config"]["data"]["pad_fill"] == 255
    m03 = json.loads((run / S03 / "manifest.json").read_text())
    assert m03["config"]["data.pad_fill"] == 255 and m03["metrics"]["preprocessing"] == best["preprocessing"]
    assert not m03["metrics"]["resumed"]
    # stages 04 and 07 embed with the checkpoint's preprocessing
    model = json.loads((run / "04_extract_features" / "model.json").read_text())
    assert model["pad_fill"] == 255 and model["mean"] == stats["mean"]
    # and only now is everything up to date
    r = run_command(["run_pipeline.py", "--run", str(run)])  # run_pipeline's own main, in this process
    assert r.returncode == 0 and r.stderr.count("is up to date") == 7, r.stderr[-3000:]
