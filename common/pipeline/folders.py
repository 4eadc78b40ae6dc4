"""Paths inside the run folder: names that stay inside it, writable folders, stale temporaries,
previous-<UTC time>/ names."""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"  # fileio.atomic_path's temporary files: ".<name>.<random>.tmp"


def remove_stale_temporaries(stage_dir: Path) -> list[Path]:
    """Delete the temporary files an earlier, killed run left (``.<name>.<random>.tmp``)."""
    removed = []
    for root, _dirs, files in os.walk(stage_dir):
        for f in files:
            if f.startswith(".") and f.endswith(TMP_SUFFIX):
                p = Path(root, f)
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


def utc_stamp() -> str:
    """``20261129T103200Z``: a sortable UTC time for folder names."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def unique_previous(stage_dir: Path) -> Path:
    """A new ``previous-<UTC time>`` folder name under ``stage_dir`` that does not exist yet."""
    base = stage_dir / f"previous-{utc_stamp()}"
    p, i = base, 1
    while p.exists():
        p, i = Path(f"{base}-{i}"), i + 1
    return p


# ----------------------------------------------------------------------------- where a stage may write


def _inside_real(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it once every existing symbolic link is followed."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def check_stage_folder(stage_dir: Path, run_dir: Path, stage_name: str) -> None:
    """``UserError`` unless ``stage_dir`` lies inside ``RUN/<stage_name>/``, written plainly (no
    ``..``) and once links are followed (``07_inference/predict/<name>`` must not lead elsewhere).
    Configured names are plain names already (``config.check_names``); this checks the result."""
    own = Path(run_dir) / stage_name
    rel = os.path.relpath(os.path.abspath(stage_dir), os.path.abspath(own))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or not _inside_real(stage_dir, own):
        raise UserError(f"{stage_name}: its output folder {stage_dir} is not inside {own} (a link or a name leads "
                        "out of it): refusing to write there")


def _nearest_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def not_writable_message(run_dir: Path, where: Path | str, why: str = "permission denied") -> str:
    """The one line of a run folder this user cannot write."""
    return (f"run folder {run_dir} is not writable ({why}: {where}): give a --run folder you can write, or fix "
            "its permissions")


def check_writable(run_dir: Path, stage_dir: Path) -> None:
    """``UserError`` (one line) when the run folder or the stage folder, or the nearest folder that
    exists above one not created yet, cannot be written by this user, before anything is written."""
    for p in (run_dir, stage_dir):
        q = _nearest_existing(p)
        if not q.is_dir():
            raise UserError(f"run folder {run_dir}: {q} is a file where a folder must be: move it away or give "
                            "another --run folder")
        if not os.access(q, os.W_OK | os.X_OK):
            raise UserError(not_writable_message(run_dir, q))


_NOT_PERMITTED = (errno.EACCES, errno.EPERM, errno.EROFS)


def as_user_error(e: BaseException, run_dir: Path) -> BaseException:
    """A permission error on a file of the run folder, as the one-line ``UserError`` of
    ``not_writable_message`` (exit 2, nothing to look up in a log.txt that may not exist); any
    other exception unchanged."""
    if not isinstance(e, OSError) or e.errno not in _NOT_PERMITTED or not e.filename:
        return e
    name = os.path.abspath(os.fsdecode(e.filename))
    if not _inside_real(Path(name), Path(run_dir)) and not name.startswith(os.path.abspath(run_dir) + os.sep):
        return e
    return UserError(not_writable_message(run_dir, name, e.strerror or "permission denied"))
