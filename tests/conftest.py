"""Shared test set-up: small, CPU-only, quiet."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent



def _cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a container
    limited to 2 CPUs of a 64-core host sees 64 in its affinity)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            words = Path(quota_file).read_text().split()
            quota, period = (words[0], words[1]) if period_file is None else (words[0], Path(period_file).read_text())
            if quota not in ("max", "-1") and int(period) > 0:
                n = min(n, max(1, int(quota) // int(period)))
            break
        except (OSError, ValueError, IndexError):
            continue
    return n


# torch threads of every stage a test runs, in this process (tests/helpers.py) or as a subprocess
# (run_script), so both sum floating point alike: 2, or 1 when pytest-xdist workers already fill
# the cores (two workers of two threads on two cores spin-wait for each other)
THREADS = max(1, min(2, _cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
os.environ.setdefault("TQDM_DISABLE", "1")


MAX_WORKERS = 4  # each test may use 2 threads (OMP_NUM_THREADS); more workers only contend


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject.toml): one worker per usable core, at most ``MAX_WORKERS``."""
    return max(1, min(MAX_WORKERS, _cores()))


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny matrices gain nothing from threads, and on a shared,
    loaded machine every parallel region of a small op can wait milliseconds for a descheduled one."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def exif_rotated_jpeg():
    """Factory: ``make(path, orientation=6)`` writes a 40 x 24 JPEG (dark left half, bright right
    half) whose EXIF orientation is ``orientation``. 6 means "rotate 90 degrees clockwise to
    display": upright it is 24 x 40 with the dark half on top."""
    import numpy as np
    from PIL import Image

    def make(path: Path, orientation: int = 6) -> Path:
        a = np.zeros((24, 40), np.uint8)
        a[:, 20:] = 255
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(a, "L").save(path, format="JPEG", exif=exif, quality=95)
        return path

    return make


def run_script(args: list[str], cwd: Path = ROOT, timeout: int = 900, **env: str):
    """A repository script as a subprocess (what a user types), with captured output."""
    import subprocess
    import sys

    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(THREADS), **env)
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def shared(tmp_path_factory, name: str, build):
    """``build(folder)`` once per test session, and once for all workers under pytest-xdist.

    Without xdist: a fresh ``mktemp(name)`` folder. Under xdist every worker asks for the same
    folder in the session's common temporary root; the first builds it under a file lock while the
    others wait, and the rest reuse it (a ``<name>.done`` file marks it complete: a worker killed
    mid-build leaves no half folder that looks finished). Returns the folder.
    """
    import shutil

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # every worker's basetemp lies in it
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's digits rendered as an image folder (once per test session)."""
    from common.data.demo import render_digits

    return shared(tmp_path_factory, "cache", lambda f: render_digits(f / "digits")) / "digits"


E2E_CONFIG = ["-c", "configs/demo.yaml", "-c", "tests/e2e/e2e.yaml"]
HELD_BACK = "digit_9"  # the session run never sees it: the scientist's loop adds it to the gallery


@pytest.fixture(scope="session")
def digits_without_9(digits, tmp_path_factory) -> Path:
    """The digits folder without ``digit_9``: the session run's ``data.root``, so that one finished
    run serves every end-to-end test, the scientist's loop (a backbone that never saw a 9) included.
    The images are hard links (copies across file systems), not symbolic links: the stages resolve
    links, and the tests compare the paths they print with the folder's own."""
    import shutil

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    def build(folder: Path) -> None:
        (folder / "digits").mkdir()
        for d in sorted(digits.iterdir()):
            if d.is_dir() and d.name.startswith("digit_") and d.name != HELD_BACK:
                shutil.copytree(d, folder / "digits" / d.name, copy_function=link)

    return shared(tmp_path_factory, "no9", build) / "digits"


@pytest.fixture(scope="session")
def pipeline(digits_without_9, tmp_path_factory):
    """Every stage run once, each as its own process (``run_pipeline.py``, what a user types), on
    the digits without 9 with the tiny e2e settings: (run folder, -c args, result).

    Tests that change the run work on a copy (``shutil.copytree(run, dest, symlinks=True)``: far
    cheaper than training again): under pytest-xdist every worker shares this folder, and a test
    that writes into it (even a log line) would race another worker's copy or snapshot.
    """
    import json
    import subprocess

    def build(folder: Path) -> None:
        # (seven stages: 15 min passed on the shared machine at load 12, the whole suite's only training)
        res = run_script(["run_pipeline.py", *E2E_CONFIG, "--run", str(folder / "e2e"),
                          f"data.root={digits_without_9}"], timeout=3600)
        (folder / "result.json").write_text(json.dumps([res.args, res.returncode, res.stdout, res.stderr]))

    folder = shared(tmp_path_factory, "run", build)
    res = subprocess.CompletedProcess(*json.loads((folder / "result.json").read_text()))
    return folder / "e2e", E2E_CONFIG, res


@pytest.fixture
def run(pipeline, tmp_path) -> Path:
    """A private copy of the finished session run."""
    import shutil

    src, _, res = pipeline
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    dst = tmp_path / "run"
    shutil.copytree(src, dst, symlinks=True)
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) by relative path -> content."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """A real PostgreSQL server (``pgserver`` ships the binaries) in a temporary folder, started
    once per session and stopped at the end: yields its SQLAlchemy URL (no password: trust auth
    on a Unix socket). Tests that need it are skipped, saying why, only when it cannot start."""
    try:
        import pgserver
    except ImportError as e:
        pytest.skip(f"pgserver is not installed ({e}): pip install pgserver")
    # a short folder: the Unix socket path must stay under 107 bytes
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    try:
        srv = pgserver.get_server(folder, cleanup_mode="stop")
    except Exception as e:  # noqa: BLE001 - any failure to start means: skip, with the reason
        pytest.skip(f"pgserver could not start a PostgreSQL server in {folder}: {e}")
    yield f"postgresql+psycopg://postgres@/postgres?host={folder}"
    srv.cleanup()


@pytest.fixture
def pg_store(pg_server, request):
    """A fresh ``PgStore`` (its own schema) on the session's server, dropped after the test."""
    import re

    from common.store.maintenance import remove_store
    from common.store.postgres import PgStore

    schema = "t_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:50]
    target = PgStore(pg_server, schema)
    remove_store(target)
    yield target
    remove_store(target)
