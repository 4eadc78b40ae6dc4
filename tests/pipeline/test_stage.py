"""The stage wrapper: manifests, freshness, up-to-date, exit codes, aliases, atomicity."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.errors import UserError
from common.pipeline.cli import parse_args
from common.pipeline.context import Context
from common.pipeline.runner import execute
from common.pipeline.spec import StageSpec
from common.stages import SPECS

SPEC_A = StageSpec("01_random_split_dataset", None, keys=("model.backbone",))
SPEC_B = StageSpec("02_mean_std_variables", None, keys=("stats.batch_size",),
                   upstream_fn=lambda cfg: ("01_random_split_dataset",))
SPEC_C = StageSpec("03_main_supcon", None, keys=(), upstream_fn=lambda cfg: ("02_mean_std_variables",))
TEST_SPECS = {s.name: s for s in (SPEC_A, SPEC_B, SPEC_C)}


def ex(spec, main, argv, check=None):
    """The real wrapper over a small stage table, ``spec`` run with the driver ``main`` (and ``check``)."""
    spec = replace(spec, driver=SimpleNamespace(main=main, check=check))
    return execute(spec, argv, table={**TEST_SPECS, spec.name: spec})

ROOT = Path(__file__).resolve().parents[2]


def _producer(text: str):
    def main(ctx: Context) -> dict:
        p = ctx.output("data.txt")
        p.write_text(text + ctx.cfg.model.backbone)
        return {"n": 1}
    return main


def _consumer(ctx: Context) -> dict:
    up = ctx.upstream("01_random_split_dataset")
    ctx.output("copy.txt").write_text((up / "data.txt").read_text().upper())
    return {"copied": True}


def run_a(tmp_path, *extra, text="x"):
    return ex(SPEC_A, _producer(text), ["--run", str(tmp_path), *extra])


def run_b(tmp_path, *extra):
    return ex(SPEC_B, _consumer, ["--run", str(tmp_path), *extra])


def test_manifest_config_and_log_written(tmp_path):
    assert run_a(tmp_path, "model.backbone=resnet18") == 0
    sdir = tmp_path / "01_random_split_dataset"
    m = json.loads((sdir / "manifest.json").read_text())
    assert m["status"] == "ok" and m["stage"] == "01_random_split_dataset"
    assert m["outputs"]["data.txt"]["size"] == len("xresnet18")
    assert len(m["outputs"]["data.txt"]["digest"]) == 64
    assert m["metrics"] == {"n": 1} and m["seed"] == 42
    for key in ("started", "finished", "argv", "git_commit", "config_hash", "versions", "device", "inputs"):
        assert key in m
    assert "torch" in m["versions"] or "numpy" in m["versions"]
    assert (sdir / "config.yaml").read_text().count("backbone: resnet18") == 1
    assert (sdir / "log.txt").read_text().strip()


def test_up_to_date_then_force_then_config_change(tmp_path, caplog):
    assert run_a(tmp_path) == 0
    m1 = json.loads((tmp_path / "01_random_split_dataset" / "manifest.json").read_text())
    caplog.set_level("INFO")
    assert run_a(tmp_path) == 0
    assert "up to date" in caplog.text
    m2 = json.loads((tmp_path / "01_random_split_dataset" / "manifest.json").read_text())
    assert m1 == m2
    caplog.clear()
    assert run_a(tmp_path, "--force") == 0
    assert "up to date" not in caplog.text
    # a change in a section the stage does not depend on keeps it up to date
    caplog.clear()
    assert run_a(tmp_path, "train.epochs=3") == 0
    assert "up to date" in caplog.text
    caplog.clear()
    assert run_a(tmp_path, "model.backbone=other") == 0
    assert "up to date" not in caplog.text


def test_missing_upstream_names_the_stage(tmp_path, capsys, caplog):
    assert run_b(tmp_path) == 2
    assert "01_random_split_dataset has not been run" in caplog.text
    assert "python 01_random_split_dataset.py" in caplog.text


def test_changed_upstream_output_and_rerun_upstream(tmp_path, caplog):
    assert run_a(tmp_path) == 0
    assert run_b(tmp_path) == 0
    assert (tmp_path / "02_mean_std_variables" / "copy.txt").read_text() == "XSERESNEXT50_32X4D"
    # someone edits an upstream artefact by hand: downstream refuses and names the stage
    out = tmp_path / "01_random_split_dataset" / "data.txt"
    out.write_text("tampered")
    caplog.clear()
    assert run_b(tmp_path) == 2
    assert "data.txt changed" in caplog.text and "01_random_split_dataset.py" in caplog.text
    # rerunning the upstream (with another content) makes the downstream out of date: it reruns
    assert run_a(tmp_path, "--force", text="y") == 0
    caplog.clear()
    assert run_b(tmp_path) == 0
    assert "up to date" not in caplog.text
    assert (tmp_path / "02_mean_std_variables" / "copy.txt").read_text().startswith("Y")


def test_touched_but_identical_output_is_still_fresh(tmp_path, caplog):
    assert run_a(tmp_path) == 0
    out = tmp_path / "01_random_split_dataset" / "data.txt"
    os.utime(out, ns=(1, 1))
    caplog.set_level("INFO")
    assert run_a(tmp_path) == 0
    assert "up to date" in caplog.text


def test_stale_transitive_upstream(tmp_path, caplog):
    assert run_a(tmp_path) == 0
    assert run_b(tmp_path) == 0
    assert run_a(tmp_path, "--force", text="z") == 0
    # a third stage that reads stage 02 must refuse: 02 is older than 01
    def third(ctx):
        ctx.upstream("02_mean_std_variables")
        return {}
    caplog.clear()
    code = ex(SPEC_C, third, ["--run", str(tmp_path)])
    assert code == 2
    assert "02_mean_std_variables is out of date" in caplog.text


@pytest.mark.parametrize("exc, code", [(UserError("bad file x.png"), 2), (ValueError("boom"), 1),
                                       (KeyboardInterrupt(), 130)])
def test_exit_codes_and_no_manifest_on_failure(tmp_path, exc, code):
    assert run_a(tmp_path) == 0

    def main(ctx):
        ctx.output("partial.txt").write_text("half")
        raise exc
    rc = ex(SPEC_A, main, ["--run", str(tmp_path), "--force"])
    assert rc == code
    sdir = tmp_path / "01_random_split_dataset"
    assert not (sdir / "manifest.json").exists()
    log_text = (sdir / "log.txt").read_text()
    if code == 1:
        assert "Traceback" in log_text and "ValueError: boom" in log_text
    if code == 2:
        assert "bad file x.png" in log_text and "Traceback" not in log_text


def test_permission_denied_in_the_run_folder_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """Issue 17 #6: a run folder that turns out not writable mid-run (a file another user owns, a
    read-only mount) was exit 1 "traceback in log.txt"; a denial outside the run folder stays exit 1."""
    assert run_a(tmp_path) == 0

    def main(ctx):
        raise PermissionError(13, "Permission denied", str(ctx.dir / "threshold.json"))
    capsys.readouterr()
    assert ex(SPEC_A, main, ["--run", str(tmp_path), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"run folder {tmp_path} is not writable (Permission denied: {tmp_path / '01_random_split_dataset'}" in err
    assert "Traceback" not in (tmp_path / "01_random_split_dataset" / "log.txt").read_text()

    def elsewhere(ctx):
        raise PermissionError(13, "Permission denied", "/etc/shadow")
    assert ex(SPEC_A, elsewhere, ["--run", str(tmp_path), "--force"]) == 1
    # checked before the first write: nothing of the stage is touched
    import os

    monkeypatch.setattr(os, "access", lambda p, mode: False)  # what a non-owner sees (tests run as root)
    before = sorted(p.name for p in (tmp_path / "01_random_split_dataset").iterdir())
    capsys.readouterr()
    assert ex(SPEC_A, _producer("y"), ["--run", str(tmp_path), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"ERROR   run folder {tmp_path} is not writable" in err and "error:" not in err  # the word once
    assert sorted(p.name for p in (tmp_path / "01_random_split_dataset").iterdir()) == before


def test_a_run_folder_that_is_a_file_is_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    assert ex(SPEC_A, _producer("x"), ["--run", str(f)]) == 2
    assert f"run folder {f}: {f} is a file where a folder must be" in capsys.readouterr().err
    assert f.read_text() == "keep"


def test_bad_config_is_exit_2(tmp_path, capsys):
    rc = ex(SPEC_A, _producer("x"), ["--run", str(tmp_path), "train.epochz=1"])
    assert rc == 2
    assert "train.epochz" in capsys.readouterr().err


def test_supcon_aliases(tmp_path):
    inv = parse_args(
        SPECS["03_main_supcon"],
        ["--batch_size", "8", "--learning_rate", "0.5", "--cosine", "--lr_decay_epochs", "700,800,900",
         "--temp", "0.1", "--model", "resnet18", "--trial", "3", "--run", str(tmp_path), "train.epochs=2"])
    cfg, run_dir, force = inv.cfg, inv.run_dir, inv.force
    assert cfg.train.batch_size == 8 and cfg.train.learning_rate == 0.5 and cfg.train.cosine
    assert cfg.train.lr_decay_epochs == [700, 800, 900] and cfg.train.temperature == 0.1
    assert cfg.model.backbone == "resnet18" and cfg.train.trial == "3" and cfg.train.epochs == 2
    assert run_dir == tmp_path and not force


def test_external_input_change_reruns(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"1")
    spec = StageSpec("01_random_split_dataset", None, keys=("data.root", "model.backbone"), external_fn=lambda cfg: [cfg.data.root])
    run = ["--run", str(tmp_path / "run"), f"data.root={data}"]
    assert ex(spec, _producer("x"), run) == 0
    caplog.set_level("INFO")
    assert ex(spec, _producer("x"), run) == 0
    assert "up to date" in caplog.text
    (data / "b.png").write_bytes(b"2")
    (data / ".hidden").write_bytes(b"ignored")
    caplog.clear()
    assert ex(spec, _producer("x"), run) == 0
    assert "up to date" not in caplog.text


SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from common.pipeline.runner import execute

def main(ctx):
    p = ctx.output("big.txt")
    from common.fileio import atomic_open
    with atomic_open(p) as fh:
        fh.write("start\\n")
        fh.flush()
        print("READY", flush=True)
        time.sleep(30)
        fh.write("end\\n")
    return {{}}

from dataclasses import replace
from types import SimpleNamespace
from common.stages import SPECS
spec = replace(SPECS["01_random_split_dataset"], driver=SimpleNamespace(main=main))
sys.exit(execute(spec, table=SPECS))
"""


@pytest.mark.parametrize("sig, expect", [(signal.SIGKILL, None), (signal.SIGTERM, 130), (signal.SIGINT, 130)])
def test_killed_stage_leaves_no_manifest_and_no_half_file(tmp_path, sig, expect):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    run = tmp_path / "run"
    # a finished earlier run: the kill must remove its claim to be finished
    assert run_a(run) == 0
    proc = subprocess.Popen([sys.executable, str(script), "--run", str(run), "--force", f"data.root={tmp_path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "READY" in line
    proc.send_signal(sig)
    rc = proc.wait(timeout=30)
    sdir = run / "01_random_split_dataset"
    assert not (sdir / "manifest.json").exists()
    assert not (sdir / "big.txt").exists()
    assert not [p for p in sdir.iterdir() if p.name.endswith(".tmp")] or sig == signal.SIGKILL
    if expect is not None:
        assert rc == expect


def test_dataloader_worker_error_keeps_the_file_name(tmp_path, caplog):
    """A UserError re-raised by a DataLoader worker still ends as one line naming the file."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from common.errors import ImageReadError

    class Bad(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ImageReadError("cannot read /data/x/broken.png: truncated")

    def main(ctx):
        for _ in DataLoader(Bad(), num_workers=1):
            pass
        return {}
    torch.set_num_threads(1)
    assert ex(SPEC_A, main, ["--run", str(tmp_path)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["cannot read /data/x/broken.png: truncated"]


class _Inbox:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope.content.decode("utf-8", "replace"))
        return "250 OK"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failing_stage_emails_through_loopback_smtp(tmp_path, monkeypatch):
    controller_mod = pytest.importorskip("aiosmtpd.controller")
    inbox, port = _Inbox(), _free_port()
    server = controller_mod.Controller(inbox, hostname="127.0.0.1", port=port, ready_timeout=5)
    server.start()
    monkeypatch.setenv("PLANKTON_SMTP_PASSWORD", "s3cret-pw")
    try:
        def main(ctx):
            raise RuntimeError("GPU fell off the bus")
        rc = ex(SPEC_A, main, [
            "--run", str(tmp_path), "notify.enabled=true", "notify.security=plain", "notify.smtp_host=127.0.0.1",
            f"notify.smtp_port={port}", "notify.recipients=[me@lab.example]"])
    finally:
        server.stop()
    assert rc == 1
    assert len(inbox.messages) == 1
    msg = inbox.messages[0]
    assert "01_random_split_dataset" in msg and "GPU fell off the bus" in msg and "log.txt" in msg
    assert "s3cret-pw" not in msg
    for f in (tmp_path / "01_random_split_dataset").iterdir():
        assert "s3cret-pw" not in f.read_text(errors="replace")


@pytest.mark.parametrize("exc, code", [(UserError("bad key"), 2), (RuntimeError("boom"), 1), (None, 0)])
def test_unreachable_mail_server_never_changes_the_exit_code(tmp_path, exc, code, caplog):
    def main(ctx):
        if exc is not None:
            raise exc
        return {}
    rc = ex(SPEC_A, main, [
        "--run", str(tmp_path), "notify.enabled=true", "notify.on_success=true", "notify.security=plain",
        "notify.smtp_host=127.0.0.1", f"notify.smtp_port={_free_port()}", "notify.timeout=2",
        "notify.recipients=[me@lab.example]"])
    assert rc == code
    assert "could not send" in caplog.text


def test_a_key_added_or_dropped_since_a_run_is_no_reason_to_rerun(tmp_path, caplog):
    """A run recorded before a key existed counts it at its default; a key no longer hashed is ignored."""
    assert run_a(tmp_path) == 0
    m_path = tmp_path / "01_random_split_dataset" / "manifest.json"
    m = json.loads(m_path.read_text())
    del m["config"]["model.backbone"]  # recorded before the key was declared (default then and now)
    m["config"]["train.resume"] = True  # a key that is no longer semantic
    m_path.write_text(json.dumps(m))
    caplog.set_level("INFO")
    assert run_a(tmp_path) == 0 and "up to date" in caplog.text
    caplog.clear()
    assert run_a(tmp_path, "model.backbone=resnet18") == 0 and "up to date" not in caplog.text


# ----------------------------------------------------------------------------- check phase and roll-back


def _files(folder: Path, log_too: bool = False) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (log_too or p.name != "log.txt")}


def _refuse(ctx):
    raise UserError("input.csv is unusable")


def test_a_check_refusal_writes_nothing(tmp_path, caplog):
    """Issue 17 #2: a driver's check runs before the lock, RUN/config.yaml, the manifest and log.txt."""
    assert run_a(tmp_path) == 0
    before = _files(tmp_path, log_too=True)
    calls = []
    rc = ex(SPEC_A, lambda ctx: calls.append(1), ["--run", str(tmp_path), "model.backbone=other"], check=_refuse)
    assert rc == 2 and not calls and "input.csv is unusable" in caplog.text
    assert _files(tmp_path, log_too=True) == before
    # the check sees what main will see, and main gets what it found
    seen = {}

    def check(ctx):
        ctx.checked["n"] = 7
        seen["up"] = ctx.upstream("01_random_split_dataset")

    def main(ctx):
        seen["n"] = ctx.checked["n"]
        return {}
    assert ex(SPEC_B, main, ["--run", str(tmp_path)], check=check) == 0
    assert seen == {"up": tmp_path / "01_random_split_dataset", "n": 7}


def test_a_refusal_mid_run_that_wrote_nothing_puts_everything_back(tmp_path, caplog):
    """A file found bad while being read (exit 2 in main): the finished stage is as it was, manifest,
    config.yaml and RUN/config.yaml included, and the line says nothing more."""
    assert run_a(tmp_path) == 0
    before = _files(tmp_path)
    rc = ex(SPEC_A, _refuse, ["--run", str(tmp_path), "model.backbone=other"])
    assert rc == 2
    assert _files(tmp_path) == before
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["input.csv is unusable"]
    caplog.clear()
    caplog.set_level("INFO")
    assert run_a(tmp_path) == 0 and "up to date" in caplog.text  # the backbone change was not kept


def test_a_refusal_after_writing_leaves_the_stage_unfinished_and_says_so(tmp_path, caplog):
    assert run_a(tmp_path) == 0

    def main(ctx):
        ctx.output("data.txt").write_text("half")
        raise UserError("input.csv is unusable")
    assert ex(SPEC_A, main, ["--run", str(tmp_path), "--force"]) == 2
    sdir = tmp_path / "01_random_split_dataset"
    assert not (sdir / "manifest.json").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["input.csv is unusable (01_random_split_dataset had started writing: it is unfinished "
                      "now; rerun it once this is fixed)"]
    caplog.clear()
    caplog.set_level("INFO")
    assert run_a(tmp_path) == 0 and "the last run did not finish" in caplog.text


def test_a_refused_first_run_leaves_no_folder(tmp_path):
    """A stage folder, even a run folder, that the refused command created is removed again."""
    run = tmp_path / "new"
    assert ex(SPEC_A, _refuse, ["--run", str(run)]) == 2
    assert not run.exists()
    assert run_a(run) == 0
    assert ex(SPEC_B, _refuse, ["--run", str(run)]) == 2
    assert sorted(p.name for p in run.iterdir()) == ["01_random_split_dataset", "config.yaml"]


def test_log_txt_link_is_refused_in_the_check_phase(tmp_path, caplog):
    assert run_a(tmp_path) == 0
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    log_txt = tmp_path / "01_random_split_dataset" / "log.txt"
    log_txt.unlink()
    log_txt.symlink_to(target)
    before = _files(tmp_path, log_too=True)
    assert run_a(tmp_path, "--force") == 2
    assert "log.txt is a symbolic link" in caplog.text
    assert _files(tmp_path, log_too=True) == before and target.read_text() == "keep"


@pytest.mark.parametrize("name", ["", "missing/map.csv", "x" * 300])
def test_an_external_input_that_cannot_be_read_is_one_line(tmp_path, name):
    """An input path too long for the file system (OSError from stat) is refused in one line
    naming the key, like a missing one, not a traceback (exit 1)."""
    from common.config.load import load_config
    from common.pipeline.checks import _check_external

    cfg = load_config([], [f"data.root={tmp_path}",
                           f"data.class_map={tmp_path / name}" if name else "data.class_map=null"])
    if not name:
        _check_external(SPECS["01_random_split_dataset"], cfg)  # no map: nothing to check
        return
    with pytest.raises(UserError, match=r"^data.class_map: .*(does not exist|cannot be read)"):
        _check_external(SPECS["01_random_split_dataset"], cfg)
