"""The run folder as a scientist uses it: hints followed as printed, reruns, refusals, locks.

Each test reproduces a trap found by using the tool as a newcomer would; the finished digits run
(``pipeline`` in conftest) is copied before a test changes it. ``stage`` calls a stage in this
process (the script's own ``execute``, same argv: tests/helpers.py); ``script`` starts the script
as its own process where the process is the subject: another process holding the lock, signals,
run_pipeline.py's own loop, another user, and the hints followed exactly as printed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, run_script, snapshot
from helpers import run_command, run_pipeline, run_stage

from common.stages import SPECS, STAGES


N_IMAGES = 1797 - 180  # the session run's digits: all but the 9s

stage = run_stage  # in this process (the run fixture: conftest)


def script(name: str, run: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``python <name>.py --run RUN *args`` as its own process."""
    return run_script([f"{name}.py", "--run", str(run), *args], **env)


def test_every_stage_with_only_run_is_up_to_date(run):
    """Trap: the printed hints left out -c, fell back to default.yaml and broke the run. Stages
    01-06 through the script's own ``execute`` in this process (same argv), 07 as its own process."""
    saved = (run / "config.yaml").read_text()
    for name in STAGES:
        res = script(name, run) if name == STAGES[-1] else run_command([f"{name}.py", "--run", str(run)])
        assert res.returncode == 0 and "up to date" in res.stderr, (name, res.stderr[-2000:])
    assert (run / "config.yaml").read_text() == saved


def test_the_run_remembers_its_configuration(run):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["backbone"] == "test_resnet" and cfg["model"]["image_size"] == 24  # e2e.yaml on demo.yaml
    assert Path(cfg["data"]["root"]).is_absolute()
    assert "mode" not in cfg["inference"] and "input" not in cfg["inference"]  # per-command keys are not saved


def test_recording_config_every_stage_reads_only_declared_keys(run, tmp_path):
    """Each stage declares its keys once; the wrapper records what the driver read."""
    folder = tmp_path / "new"
    shutil.copytree(Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]) / "digit_3", folder)
    res = stage("07_inference", run, "inference.mode=predict", f"inference.input={folder}")
    assert res.returncode == 0, res.stderr[-2000:]
    manifests = [run / s / "manifest.json" for s in STAGES] + [run / "07_inference" / "predict" / "new" / "manifest.json"]
    for m_path in manifests:
        m = json.loads(m_path.read_text())
        spec = SPECS[m["stage"]]
        assert m["undeclared_keys_read"] == [], (m["stage"], m["undeclared_keys_read"])
        assert set(m["keys_read"]) <= set(spec.keys), m["stage"]
        assert m["keys_read"], m["stage"]  # the recorder saw the reads


def test_config_change_says_what_changed_and_what_is_out_of_date(run):
    res = stage("05_lut_threshold", run, "lut.tolerance=0.01")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "lut.tolerance: 0.005 -> 0.01" in res.stderr
    assert "out of date now: 05_lut_threshold, 06_prune_features, 07_inference" in res.stderr
    assert "runs because 05_lut_threshold is out of date: lut.tolerance: 0.005 -> 0.01" in res.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["lut"]["tolerance"] == 0.01
    # downstream now refuses with the reason, and the hint works as printed
    res = stage("07_inference", run)
    assert res.returncode == 2 and "06_prune_features is out of date: 05_lut_threshold was rerun after it" in res.stderr
    hint = res.stderr.split("run `")[1].split("`")[0].split()
    assert hint[:2] == ["python", "06_prune_features.py"]
    assert run_command(hint[1:]).returncode == 0
    assert stage("07_inference", run).returncode == 0


def test_refused_stage_leaves_the_run_folder_byte_for_byte(run):
    """Configuration errors and stale upstreams are found before any file is touched."""
    before = snapshot(run)
    for name in STAGES:
        res = stage(name, run, "lut.knn_k=0")
        assert res.returncode == 2 and "lut.knn_k" in res.stderr and "Traceback" not in res.stderr, name
        assert snapshot(run) == before, name
    # a change that makes an upstream out of date: the stage refuses, names it, and prints a working hint
    res = stage("05_lut_threshold", run, "model.image_size=28")
    assert res.returncode == 2
    assert "02_mean_std_variables is out of date: model.image_size: 24 -> 28" in res.stderr
    assert "model.image_size=28" in res.stderr.split("run `")[1]
    assert snapshot(run) == before


def test_same_folder_written_two_ways_is_the_same_configuration(run):
    """Trap: data.root relative in one place and absolute in another reran 01-04 back and forth."""
    root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    res = run_script([str(ROOT / "01_random_split_dataset.py"), "--run", str(run), f"data.root={root.name}"],
                     cwd=root.parent)
    assert res.returncode == 0 and "up to date" in res.stderr, res.stderr[-2000:]
    res = run_script([str(ROOT / "01_random_split_dataset.py"), "--run", str(run), f"data.root=./{root.name}/"],
                     cwd=root.parent)
    assert res.returncode == 0 and "up to date" in res.stderr


def test_rebuilt_store_makes_stage_06_out_of_date_and_06_owns_its_lut(run):
    """Trap: stage 06 wrote into 04's store; after a rebuild 06 said "up to date" and 07 had no LUT."""
    s04 = run / "04_extract_features"
    assert sorted(p.name for p in s04.iterdir() if not p.name.startswith(".")) == \
        ["config.yaml", "features.sqlite", "log.txt", "manifest.json", "model.json"]
    res = stage("04_extract_features", run, "--force")
    assert res.returncode == 0 and "embedding every image again" in res.stderr
    assert f"{N_IMAGES} to embed" in res.stderr  # --force on 04 reruns in full (was test_force_on_04_reruns_in_full)
    # the same vectors again (same checkpoint, same images): 05-07 stay fresh, and 07 still has its LUT
    for name in ("05_lut_threshold", "06_prune_features", "07_inference"):
        res = stage(name, run)
        assert res.returncode == 0 and "up to date" in res.stderr, (name, res.stderr[-1500:])
    # other vectors (the projection head's): every downstream stage is out of date and says why
    res = stage("04_extract_features", run, "extract.embedding=head")
    assert res.returncode == 0, res.stderr[-2000:]
    res = stage("06_prune_features", run)
    assert res.returncode == 2 and "05_lut_threshold is out of date: 04_extract_features was rerun" in res.stderr
    # (no classical classifiers: freshness and the LUT are the subject; test_classifiers covers them)
    res = run_pipeline(["--run", str(run), "--from", "5", "inference.classifiers=[]"])
    assert res.returncode == 0 and "Test metrics" in res.stdout, res.stderr[-2000:]
    assert (run / "06_prune_features" / "lut.sqlite").is_file()
    assert sorted(p.name for p in s04.iterdir() if not p.name.startswith(".")) == \
        ["config.yaml", "features.sqlite", "log.txt", "manifest.json", "model.json"]


def test_corrupted_vector_is_never_accepted_again(run):
    """Issue 11 #1: 32 bytes overwritten inside features.sqlite (integrity_check still ok)."""
    store = run / "04_extract_features" / "features.sqlite"
    acc = json.loads((run / "07_inference" / "metrics.json").read_text())["accuracy"]
    con = sqlite3.connect(store)
    blob = con.execute("SELECT vector FROM vectors ORDER BY image_id LIMIT 1 OFFSET 7").fetchone()[0]
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    data = bytearray(store.read_bytes())
    at = data.find(blob)
    assert at > 0
    data[at + 64:at + 96] = np.full(8, 7.0, "<f4").tobytes()
    mtime = store.stat().st_mtime_ns
    store.write_bytes(bytes(data))
    os.utime(store, ns=(mtime, mtime))  # even with the same size and time, readers check every vector
    res = stage("05_lut_threshold", run, "--force")
    assert res.returncode == 2 and "not 1 (the store is corrupted): rerun 04_extract_features.py" in res.stderr
    # the store changed since 04 recorded it: stage 04 embeds everything again, never re-records it as good
    os.utime(store, None)
    res = stage("04_extract_features", run)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "changed since this stage recorded it" in res.stderr and f"checked {N_IMAGES} vectors" in res.stderr
    res = run_pipeline(["--run", str(run), "--from", "5", "inference.classifiers=[]"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((run / "07_inference" / "metrics.json").read_text())["accuracy"] == pytest.approx(acc)


def test_predict_mode_has_its_own_folder_and_never_touches_the_evaluation(run, tmp_path):
    """Trap: predict mode deleted the evaluation's confusion matrix, comparison, report and predictions."""
    root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    folder = tmp_path / "cruise_42"
    shutil.copytree(root / "digit_7", folder)
    evaluation = run / "07_inference"
    before = {k: v for k, v in snapshot(evaluation).items() if not k.startswith("predict/")}
    saved = (run / "config.yaml").read_text()
    res = stage("07_inference", run, "inference.mode=predict", f"inference.input={folder}")
    assert res.returncode == 0, res.stderr[-2000:]
    out = evaluation / "predict" / "cruise_42"
    for f in ("predictions.csv", "metrics.json", "report.html", "manifest.json", "config.yaml", "log.txt"):
        assert (out / f).is_file(), f
    assert {k: v for k, v in snapshot(evaluation).items() if not k.startswith("predict/")} == before
    assert (run / "config.yaml").read_text() == saved  # the mode is not a setting of the run
    assert "up to date" in stage("07_inference", run).stderr  # the evaluation is still fresh
    again = stage("07_inference", run, "inference.mode=predict", f"inference.input={folder}",
                  "inference.name=second_look")
    assert again.returncode == 0 and (evaluation / "predict" / "second_look" / "predictions.csv").is_file()


def test_run_pipeline_prints_metrics_only_from_a_fresh_stage_07(run):
    res = run_pipeline(["--run", str(run), "--from", "5", "--to", "6", "lut.tolerance=0.02"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Test metrics" not in res.stdout and "No test metrics: 07_inference is out of date" in res.stdout


def test_run_pipeline_fails_on_a_missing_stage_script(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "runs", ".cache", "__pycache__", "tests"))
    (repo / "05_lut_threshold.py").unlink()
    res = run_script([str(repo / "run_pipeline.py"), "--run", str(tmp_path / "r"), "--from", "5", "--to", "5"],
                     cwd=repo)
    assert res.returncode == 2 and "05_lut_threshold.py is missing" in res.stderr


def _lock(folder: Path, pid: int, host: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                              "started": "2026-11-29 10:02 UTC"}))


def test_a_running_stage_is_refused_naming_the_holder(run):
    """Issue 11 #13: two processes on one stage; a stage whose upstream runs."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(run / "05_lut_threshold", holder.pid)
        before = snapshot(run)
        res = stage("05_lut_threshold", run, "--force")
        assert res.returncode == 2
        assert f"05_lut_threshold is running in {run}: pid {holder.pid} on {socket.gethostname()} since " \
               "2026-11-29 10:02 UTC" in res.stderr
        res = stage("06_prune_features", run, "--force")
        assert res.returncode == 2 and "06_prune_features needs 05_lut_threshold, which is running" in res.stderr
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is taken over with a warning
    res = stage("05_lut_threshold", run, "--force")
    assert res.returncode == 0 and "taking over the lock left by pid" in res.stderr
    assert not (run / "05_lut_threshold" / ".lock").exists()


def test_two_processes_on_the_same_stage_one_refused(run):
    """The first process is stopped (SIGSTOP) once it holds the lock, so the second surely finds it
    running however fast the machine is; continued, the first finishes as if alone."""
    first = subprocess.Popen([sys.executable, "04_extract_features.py", "--run", str(run), "--force"], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    stopped = False
    try:
        deadline = time.time() + 120
        while not (run / "04_extract_features" / ".lock").exists() and time.time() < deadline:
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        stopped = True
        assert first.poll() is None and (run / "04_extract_features" / ".lock").exists()
        res = script("04_extract_features", run, "--force")
        assert res.returncode == 2 and f"pid {first.pid}" in res.stderr and "is running" in res.stderr
    finally:
        if stopped:
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]


def test_log_txt_symlink_is_never_written_through(run, tmp_path):
    """Issue 11 #16."""
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me\n")
    log = run / "05_lut_threshold" / "log.txt"
    log.unlink()
    log.symlink_to(target)
    res = stage("05_lut_threshold", run, "--force")
    assert res.returncode == 2 and "log.txt is a symbolic link" in res.stderr
    assert target.read_text() == "keep me\n"


def test_options_and_overrides_in_any_order(run):
    """Issue 11 #15: overrides after --force were "unrecognized arguments"."""
    res = run_command(["05_lut_threshold.py", "--force", "lut.tolerance=0.01", "--run", str(run)])
    assert res.returncode == 0, res.stderr[-2000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["lut"]["tolerance"] == 0.01


def test_temporaries_of_a_killed_run_are_removed_by_the_next(run):
    tmp = run / "05_lut_threshold" / ".threshold.json.abc123.tmp"
    tmp.write_text("half")
    res = stage("05_lut_threshold", run, "--force")
    assert res.returncode == 0 and "a temporary file left by a killed run" in res.stderr
    assert not tmp.exists()


SLOW_STAGE = """
import sys, time
from common.pipeline.runner import execute
from common.pipeline.spec import StageSpec

def main(ctx):
    try:
        print("READY", flush=True)
        time.sleep(30)
    finally:
        print("CLEANING", flush=True)
        time.sleep(1.5)   # a second signal arrives here
        ctx.output("saved.txt").write_text("saved")
    return {}

from types import SimpleNamespace
from common.stages import SPECS
sys.exit(execute(StageSpec("05_lut_threshold", SimpleNamespace(main=main), keys=()), table=SPECS))
"""


def test_second_sigterm_during_cleanup_still_ends_130(tmp_path):
    """Issue 11 #14: a second SIGTERM during clean-up gave 143 or a traceback."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW_STAGE)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(script), "--run", str(tmp_path / "r")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "CLEANING"
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=30)
    err = proc.stderr.read()
    assert rc == 130, err
    assert "Traceback" not in err and "already stopping" in err
    sdir = tmp_path / "r" / "05_lut_threshold"
    assert (sdir / "saved.txt").read_text() == "saved" and not (sdir / "manifest.json").exists()
    assert not (sdir / ".lock").exists()


def test_every_bad_numeric_value_is_refused_by_every_stage_before_anything_is_written(run, capsys):
    """Issue 11 #6: a bad value for every numeric key, through the real wrapper, on a finished run."""
    import importlib.util  # tests/config/test_config.py's table (another folder: load it by path)

    spec = importlib.util.spec_from_file_location("config_out_of_range", ROOT / "tests" / "config" / "test_config.py")
    values = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(values)
    OUT_OF_RANGE = values.OUT_OF_RANGE

    from common.pipeline.runner import execute

    src = run  # a private copy: under pytest-xdist the session run is shared (tests/conftest.py)
    before = snapshot(src)
    for i, (key, (value, named)) in enumerate(sorted(OUT_OF_RANGE.items())):
        name = STAGES[i % len(STAGES)]  # every stage sees some of the keys
        capsys.readouterr()
        assert execute(name, ["--run", str(src), f"{key}={value}"], table=SPECS) == 2, key
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {named}: must be "), (key, err)
    assert snapshot(src) == before


def test_missing_input_folder_is_refused_before_the_run_folder_exists(tmp_path):
    """Following "run 01 --run RUN" on a new run with a wrong data.root creates nothing."""
    res = run_stage("01_random_split_dataset", tmp_path / "new", f"data.root={tmp_path}/nope")
    assert res.returncode == 2 and f"data.root: {tmp_path}/nope does not exist" in res.stderr
    assert not (tmp_path / "new").exists()
    res = run_stage("07_inference", tmp_path / "new", "inference.mode=predict", f"inference.input={tmp_path}/cruise")
    assert res.returncode == 2 and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- issue 17: names, secrets, locks, links


def _tiny_images(root: Path, classes=("a", "b"), n: int = 3) -> Path:
    from PIL import Image

    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("L", (12, 12), 40 * k + 10 * i + 5).save(root / c / f"{i}.png")
    return root


def _racer(stage_dir, run_dir, barrier, results, release):
    from common.errors import UserError
    from common.pipeline.lock import StageLock

    lock = StageLock(Path(stage_dir), "05_lut_threshold", Path(run_dir))
    barrier.wait()
    try:
        lock.acquire()
    except UserError as e:
        results.put(("refused", os.getpid(), str(e)))
        return
    results.put(("ran", os.getpid(), ""))
    release.wait(120)
    lock.release()


def test_twenty_processes_on_a_stale_lock_exactly_one_runs(tmp_path):
    """Issue 17 #5: two processes started together both took over a stale lock and both ran."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sdir = tmp_path / "05_lut_threshold"
    n = 20
    for _ in range(5):  # the former take-over let two of them run about one time in two
        _lock(sdir, dead.pid)  # left by a process that is gone
        barrier, results, release = ctx.Barrier(n), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_racer, args=(str(sdir), str(tmp_path), barrier, results, release))
                 for _ in range(n)]
        for p in procs:
            p.start()
        try:
            got = [results.get(timeout=120) for _ in range(n)]
        finally:
            release.set()
            for p in procs:
                p.join(timeout=60)
        ran = [pid for kind, pid, _ in got if kind == "ran"]
        assert len(ran) == 1, got
        refused = [msg for kind, _, msg in got if kind == "refused"]
        assert len(refused) == n - 1
        assert all(f"05_lut_threshold is running in {tmp_path}: pid {ran[0]} on " in m for m in refused), refused
        assert not (sdir / ".lock").exists()  # released by the one that ran


def _cycler(stage_dir, run_dir, barrier, inside, violations, cycles):
    from common.errors import UserError
    from common.pipeline.lock import StageLock

    lock = StageLock(Path(stage_dir), "05_lut_threshold", Path(run_dir))
    barrier.wait()
    done = 0
    while done < cycles:
        try:
            lock.acquire()
        except UserError:
            continue
        with inside.get_lock():
            inside.value += 1
            if inside.value != 1:
                violations.value += 1
        time.sleep(0.001)
        with inside.get_lock():
            inside.value -= 1
        lock.release()
        done += 1


def test_lock_taken_and_released_in_a_loop_by_many_processes_is_never_held_twice(tmp_path):
    """The release race: a holder unlinks the file between another's open and its lock."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    n, cycles = 8, 25
    barrier, inside, violations = ctx.Barrier(n), ctx.Value("i", 0), ctx.Value("i", 0)
    sdir = tmp_path / "05_lut_threshold"
    procs = [ctx.Process(target=_cycler, args=(str(sdir), str(tmp_path), barrier, inside, violations, cycles))
             for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * n
    assert violations.value == 0 and not (sdir / ".lock").exists()


@pytest.mark.parametrize("name", ["..", "../../01_random_split_dataset", "/tmp/i17-elsewhere", "''", "x" * 300,
                                  "a/b", ".hidden"])
def test_a_predict_name_never_leaves_its_folder(run, tmp_path, capsys, name):
    """Issue 17 #3: inference.name=.. overwrote the evaluation's files; ../../01... deleted stage 01's
    manifest; an absolute name wrote anywhere; 300 characters gave an OSError traceback."""
    from common.pipeline.runner import execute

    src = run  # a private copy: under pytest-xdist the session run is shared (tests/conftest.py)
    folder = tmp_path / "cruise"
    folder.mkdir()
    before = snapshot(src)
    capsys.readouterr()
    assert execute("07_inference", ["--run", str(src), "inference.mode=predict", f"inference.input={folder}",
                                            f"inference.name={name}"], table=SPECS) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: inference.name: ") and "is not a plain name" in err[0], err
    assert snapshot(src) == before and not Path("/tmp/i17-elsewhere").exists()


def test_a_predict_folder_that_links_out_of_the_run_is_refused(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "07_inference" / "predict").mkdir(exist_ok=True)
    (run / "07_inference" / "predict" / "cruise").symlink_to(elsewhere)
    folder = tmp_path / "cruise"
    shutil.copytree(Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]) / "digit_3", folder)
    before = snapshot(run)
    res = stage("07_inference", run, "inference.mode=predict", f"inference.input={folder}")
    assert res.returncode == 2 and "is not inside" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert list(elsewhere.iterdir()) == [] and snapshot(run) == before


MARK = "S3cretMark-17x"


def test_no_secret_placed_anywhere_reaches_a_file_or_the_console(tmp_path):
    """Issue 17 #4: a marker secret in every place a user could put one; stages 01-02 run for real
    (RUN/config.yaml, the stages' config.yaml, manifest.json with its argv, log.txt are written)
    and refused commands print their line; the marker is in no file and no output."""
    data = _tiny_images(tmp_path / "data")
    run = tmp_path / "run"
    env = {"PLANKTON_STORE_PASSWORD": MARK, "PLANKTON_SMTP_PASSWORD": MARK, "PGPASSWORD": MARK, "MY_PW": MARK}
    good = tmp_path / "good.yaml"  # accepted: an empty password (no secret), secrets named by variables
    good.write_text(yaml.safe_dump({
        "data": {"root": str(data), "num_workers": 0}, "model": {"image_size": 16},
        "store": {"url": "postgresql+psycopg://postgres:@/postgres?host=/tmp/pg", "password_env": "MY_PW"},
        "notify": {"user": "lab-robot", "password_env": "PLANKTON_SMTP_PASSWORD"}}))
    outputs = []
    for name in ("01_random_split_dataset", "02_mean_std_variables"):
        res = run_command([f"{name}.py", "-c", str(good), "--run", str(run), "notify.sender=me@lab.org",
                           "store.url=postgresql+psycopg://postgres:@/postgres?host=/tmp/pg"], env=env)
        outputs.append(res.stdout + res.stderr)
        assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((run / "01_random_split_dataset" / "manifest.json").read_text())
    assert any(a.startswith("store.url=") for a in m["argv"]) and (run / "02_mean_std_variables" / "log.txt").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["store"]["url"] == "postgresql+psycopg://postgres@/postgres?host=/tmp/pg"  # empty password dropped
    before = snapshot(run)
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(f"store:\n  url: postgresql+psycopg://postgres@/postgres?host=/tmp/pg&password={MARK}\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(f"notify:\n  password: {MARK}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"store: [url: {MARK}\n")
    refused = [["-c", str(bad_file)], ["-c", str(unknown)], ["-c", str(broken)],
               [f"store.url=postgresql+psycopg://postgres:{MARK}@/postgres?host=/tmp/pg"],
               [f"store.url=postgresql+psycopg://postgres@/postgres?host=/tmp/pg&password={MARK}"],
               [f"store.url=postgresql+psycopg://postgres@/postgres?host=/tmp/pg&sslpassword={MARK}"],
               [f"store.url=postgresql+psycopg://postgres@/postgres?passfile=/x/{MARK}"],
               [f"store.url=postgresql+psycopg://postgres:@{MARK}@/postgres"],
               [f"store.url=[{MARK}]"], [f"notify.password={MARK}"], [f"notify.smtp_password={MARK}"],
               [f"postgresql://postgres:{MARK}@host/db"], ["--password", MARK], [f"--password={MARK}"]]
    for args in refused:
        res = run_stage("02_mean_std_variables", run, *args, env=env)
        outputs.append(res.stdout + res.stderr)
        assert res.returncode == 2, (args, res.stderr[-2000:])
    assert snapshot(run) == before
    leaks = [p for p in run.rglob("*") if p.is_file() and MARK.encode() in p.read_bytes()]
    assert not leaks and all(MARK not in o for o in outputs), (leaks, [o for o in outputs if MARK in o][:1])


def _world_readable_tmp() -> Path:
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="i17ro", dir="/tmp"))
    os.chmod(d, 0o755)
    return d


def test_a_read_only_run_folder_is_one_line_exit_2(tmp_path):
    """Issue 17 #6: exit 1 and "traceback in log.txt", a file that cannot exist. Root writes
    anywhere, so as root the stage runs as nobody (uid 65534) on folders root owns."""
    base = _world_readable_tmp()
    try:
        data = _tiny_images(base / "data")
        run = base / "run"
        run.mkdir()
        parent = base / "locked"
        parent.mkdir()
        for p in [base, *base.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        as_root = os.geteuid() == 0
        if not as_root:
            os.chmod(run, 0o555)
            os.chmod(parent, 0o555)
        extra = {"user": 65534, "group": 65534} if as_root else {}
        env = dict(os.environ, PYTHONUNBUFFERED="1", HOME=str(base), MPLCONFIGDIR=str(base / "mpl"))
        for target in (run, parent / "new_run"):
            res = subprocess.run([sys.executable, "01_random_split_dataset.py", "--run", str(target),
                                  f"data.root={data}", "data.num_workers=0"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=300, env=env, **extra)
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 2, res.stderr[-2000:]
            assert "Traceback" not in res.stderr and "log.txt" not in res.stderr, res.stderr[-2000:]
            assert lines[-1].endswith("give a --run folder you can write, or fix its permissions") and \
                f"run folder {target} is not writable" in lines[-1], lines
        assert list(run.iterdir()) == [] and list(parent.iterdir()) == []
    finally:
        os.chmod(base / "run", 0o755)
        os.chmod(base / "locked", 0o755)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("to_group", [True, False], ids=["ctrl_c_to_the_group", "kill_int_to_run_pipeline"])
def test_ctrl_c_on_run_pipeline_is_130_in_one_line_and_the_stage_saves_its_state(tmp_path, to_group):
    """Issue 17 #6: Ctrl-C on run_pipeline.py printed a KeyboardInterrupt traceback (and
    subprocess.call killed the stage). A FIFO among the images holds stage 01 until the signal.
    ``kill -INT`` of run_pipeline alone used to leave the stage running to its end (then "interrupted")."""
    data = _tiny_images(tmp_path / "data")
    os.mkfifo(data / "a" / "waiting.png")  # reading it blocks: the stage is busy when Ctrl-C comes
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "run_pipeline.py", "-c", "configs/demo.yaml", "--run", str(run),
                             f"data.root={data}", "data.num_workers=0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log = run / "01_random_split_dataset" / "log.txt"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and "runs because" in log.read_text()):
        time.sleep(0.1)
    time.sleep(0.5)  # into the scan, blocked on the FIFO
    if to_group:
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground process group
    else:
        os.kill(proc.pid, signal.SIGINT)  # run_pipeline alone: it passes the signal on
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "01_random_split_dataset interrupted (exit code 130): rerun the same " \
                                           "command to continue"
    text = log.read_text()
    assert "interrupted" in text and "rerun the same command to continue" in text  # the stage's own state line
    # a Ctrl-C that arrived twice (to the group, and passed on) is one stop: no warning about a second
    assert "signal 2: already stopping" not in text and "already stopping" not in err
    assert not (run / "01_random_split_dataset" / "manifest.json").exists()
    assert not (run / "01_random_split_dataset" / ".lock").exists()


def test_a_forked_worker_never_holds_or_releases_the_stage_lock(tmp_path):
    """DataLoader and scan workers are forked while the lock is held: the lock goes with the stage
    process. Here the stage is killed (no release) while its worker lives on: the lock is free."""
    from common.errors import UserError
    from common.pipeline.lock import StageLock

    sdir = tmp_path / "05_lut_threshold"
    r, w = os.pipe()
    stage_pid = os.fork()
    if stage_pid == 0:  # the stage: takes the lock, forks a worker, dies without releasing
        lock = StageLock(sdir, "05_lut_threshold", tmp_path)
        lock.acquire()
        if os.fork() == 0:  # the worker: its release must not touch the stage's lock
            lock.release()
            os.write(w, b"1" if (sdir / ".lock").exists() else b"0")
            time.sleep(5)
            os._exit(0)
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"  # the worker is alive (sleeping) and the lock file is still there
    os.close(r)
    os.waitpid(stage_pid, 0)
    again = StageLock(sdir, "05_lut_threshold", tmp_path)
    try:
        again.acquire()  # the stage is gone: taken over at once, though its worker still runs
    except UserError as e:
        pytest.fail(f"a worker kept the lock: {e}")
    finally:
        again.release()
