"""Plain helpers of the end-to-end tests: a stage (or ``run_pipeline.py``) called in the pytest process.

A stage script is two lines, ``stages.run(name)`` -> ``sys.exit(runner.execute(SPECS[name], argv))``,
so calling ``execute`` with the same argv runs the same code and gives the same exit code, console
lines, manifests and files as the script, without a fresh interpreter importing torch, timm,
scikit-learn and faiss (about 4 s of CPU each). Tests whose subject is the process itself (locks
held by another process, signals, a killed stage, ``run_pipeline.py``'s own loop, resource limits)
keep ``conftest.run_script``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import signal
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from conftest import THREADS  # run_script's OMP_NUM_THREADS: the same floating-point sums as a stage subprocess

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    """What ``subprocess.run(..., capture_output=True, text=True)`` gives, for an in-process call."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _as_a_script(argv: list[str], env: dict[str, str] | None,
                 cwd: Path | None) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """The process state a script starts with, put back afterwards: ``sys.argv``, the working
    directory, extra environment variables, torch's thread count, the SIGINT/SIGTERM handlers (a
    stage that stopped on a signal leaves ``already_stopping`` installed, as a process that exits
    would), and the root logger (``execute`` sets it to DEBUG and removes only the handlers it added). stdout and stderr are captured: a
    stage's console handler binds ``sys.stderr`` when it is made, inside ``execute``."""
    import torch

    saved_env = {k: os.environ.get(k) for k in (env or {})}
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    threads, here, saved_argv = torch.get_num_threads(), os.getcwd(), sys.argv
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env or {})
        os.chdir(cwd or ROOT)
        sys.argv = list(argv)
        torch.set_num_threads(THREADS)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        sys.argv = saved_argv
        os.chdir(here)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        root.setLevel(level)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        torch.set_num_threads(threads)
        for s, h in saved_signals.items():
            signal.signal(s, h)


def _exit_code(call) -> int:
    """``call()``'s return value, or the exit status of the ``SystemExit`` it raised (argparse
    exits 2 on a command line it cannot parse, as the script's process would)."""
    try:
        return call()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def execute_stage(name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    """``python <name>.py *argv`` in this process: its exit code and console output."""
    from common.pipeline.runner import execute
    from common.stages import SPECS

    with _as_a_script([f"{name}.py", *argv], env, cwd) as (out, err):
        code = _exit_code(lambda: execute(SPECS[name], argv, table=SPECS))
    return Result(code, out.getvalue(), err.getvalue())


def run_stage(name: str, run: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    """``python <name>.py --run RUN *args`` in this process."""
    return execute_stage(name, ["--run", str(run), *args], env=env, cwd=cwd)


def run_command(words: list[str], env: dict[str, str] | None = None) -> Result:
    """A printed command without its ``python``: ``["05_lut_threshold.py", "--run", ...]``, in this process."""
    script, *argv = words
    if Path(script).name == "run_pipeline.py":
        return run_pipeline(argv, env=env)
    return execute_stage(Path(script).stem, argv, env=env)


def run_pipeline(argv: list[str], env: dict[str, str] | None = None) -> Result:
    """``python run_pipeline.py *argv`` in this process: run_pipeline's own ``main`` (its order,
    ``--from``/``--to``, messages and test-metrics summary), each stage through ``execute`` instead
    of a subprocess. The subprocess loop itself is tested by the session ``pipeline`` fixture and
    the Ctrl-C test."""
    import run_pipeline as rp

    def in_process(cmd: list[str]) -> tuple[int, bool]:
        _python, script, *stage_argv = cmd
        from common.pipeline.runner import execute
        from common.stages import SPECS

        # stdout and stderr are those _as_a_script redirected: a stage's lines land between
        # run_pipeline's own, as on a terminal
        return _exit_code(lambda: execute(SPECS[Path(script).stem], stage_argv, table=SPECS)), False

    saved = rp.run_stage
    rp.run_stage = in_process
    try:
        with _as_a_script(["run_pipeline.py", *argv], env, None) as (out, err):
            code = _exit_code(lambda: rp.main(argv))
    finally:
        rp.run_stage = saved
    return Result(code, out.getvalue(), err.getvalue())


def relink(run: Path, up: str, downs: tuple[str, ...]) -> None:
    """Make the manifests of stages ``downs`` record ``up``'s outputs as they are now (as when they
    ran after it): a test that edits a finished stage's files keeps its downstream stages linked."""
    from common.pipeline.manifest import outputs_digest, read_manifest, write_manifest

    d = outputs_digest(read_manifest(run / up))
    for s in downs:
        m = read_manifest(run / s)
        if up in m["inputs"]["upstream"]:
            m["inputs"]["upstream"][up]["digest"] = d
            write_manifest(run / s, m)


def unit_rows(x):
    """The rows of ``x`` scaled to unit length, as float32 (what the feature store holds)."""
    import numpy as np

    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
