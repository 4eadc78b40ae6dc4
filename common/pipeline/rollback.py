"""What a refused stage puts back: the run folder as it was before the stage began."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..fileio import atomic_open
from .folders import TMP_SUFFIX
from .lock import LOCK
from .manifest import MANIFEST, changed_outputs
from .runconfig import RUN_CONFIG

if TYPE_CHECKING:
    from .cli import Invocation

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- running a stage


@dataclass
class _Before:
    """What a stage's start changes, as it was before (rank 0): put back when the stage is refused
    mid-run (exit 2) without having changed its folder."""

    run_config: bytes | None  # RUN/config.yaml (None: the run had none)
    stage_config: bytes | None  # the stage's config.yaml
    manifest: bytes | None  # the stage's manifest.json (a finished stage)
    listing: dict[str, tuple[int, int]]  # the stage folder's own files and folders (``_listing``)
    created: Path | None  # the outermost folder of the stage folder's path that this command creates

    @classmethod
    def take(cls, inv: Invocation, stage_dir: Path) -> _Before:
        def read(p: Path) -> bytes | None:
            return p.read_bytes() if p.is_file() else None

        created, p = None, stage_dir
        while not p.exists() and p != p.parent:
            created, p = p, p.parent
        return cls(read(inv.run_dir / RUN_CONFIG), read(stage_dir / "config.yaml"), read(stage_dir / MANIFEST),
                   _listing(stage_dir), created)


WRAPPER_FILES = (MANIFEST, "config.yaml", "log.txt", LOCK)  # what the wrapper itself writes in a stage folder


def _listing(stage_dir: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of what the driver may have written in its folder: every
    file and folder but the wrapper's own files, temporaries, and sub-folders that hold their own
    ``log.txt`` (another stage's folder, as 07's ``predict/<name>/``, or 03's ``previous-*``)."""
    out: dict[str, tuple[int, int]] = {}
    for root, dirs, files in os.walk(stage_dir):
        here = Path(root)
        dirs[:] = [d for d in dirs if not (here / d / "log.txt").exists()]
        for name in [*dirs, *files]:
            p = here / name
            if (here == stage_dir and name in WRAPPER_FILES) or (name.startswith(".") and name.endswith(TMP_SUFFIX)):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = p.lstat()
                out[p.relative_to(stage_dir).as_posix()] = (st.st_size, st.st_mtime_ns) if p.is_file() else (-1, 0)
    return out


def _put_back(p: Path, data: bytes | None) -> None:
    """Write ``data`` to ``p`` atomically, or remove ``p`` when ``data`` is None."""
    if data is None:
        p.unlink(missing_ok=True)
        return
    with atomic_open(p, "wb") as fh:
        fh.write(data)


def _roll_back(before: _Before, inv: Invocation, stage_dir: Path, old: dict | None) -> bool:
    """After a refusal (exit 2) in ``main``: when the driver changed nothing in its folder (and the
    outputs of the last finished run, a store on a server included, are unchanged), put back the
    manifest, the stage's ``config.yaml`` and ``RUN/config.yaml`` as they were, and say True:
    the stage is exactly as before the command. False: it had started writing, and is unfinished."""
    if _listing(stage_dir) != before.listing:
        return False
    if old is not None and changed_outputs(stage_dir, old) is not None:
        return False
    try:
        _put_back(stage_dir / MANIFEST, before.manifest)
        _put_back(stage_dir / "config.yaml", before.stage_config)
        if inv.changes or inv.new_run:
            _put_back(inv.run_dir / RUN_CONFIG, before.run_config)
    except OSError as e:  # the refusal is still the outcome; the stage is then unfinished
        log.warning("could not put %s back as it was: %s", stage_dir, e)
        (stage_dir / MANIFEST).unlink(missing_ok=True)
        return False
    return True


def _remove_created(before: _Before, stage_dir: Path) -> None:
    """A rolled-back stage whose folder this command created: remove what the wrapper wrote there,
    then the folders, innermost first, as long as they are empty (nothing else is ever removed)."""
    if before.created is None:
        return
    (stage_dir / "log.txt").unlink(missing_ok=True)
    p = stage_dir
    while True:
        try:
            p.rmdir()
        except OSError:
            return
        if p == before.created:
            return
        p = p.parent
