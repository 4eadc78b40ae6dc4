"""Atomic file writes and hashing.

Every artefact is written to a temporary name in the same folder and renamed with
``os.replace`` (atomic on POSIX), so a half-written file never carries the final name
(timm's CheckpointSaver does the same for checkpoints).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

_CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file is removed if the block raises, so nothing half-written remains.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give artefacts the usual permissions so colleagues can read a run.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """Open a temporary file for writing; it replaces ``path`` only when the block succeeds."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
        if "newline" not in kwargs and "csv" in str(path):
            kwargs["newline"] = ""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# A spreadsheet reads a cell that starts with one of these as a formula (CSV injection, OWASP):
# "=HYPERLINK(...)" in a class or file name would run when a colleague opens predictions.csv.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.I)
_QUOTED_RE = re.compile(r"'+[=+\-@\t\r]")


def spreadsheet_safe(cell: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, prefixed with ``'`` (shown as text).

    Only text is touched, and never a number written as text (``-0.5``, ``+3``, ``1e-4``, ``nan``
    stay as they are), so numeric columns never change; nor a cell of any other type. Text made
    of quotes then a formula character gets one more quote, so ``spreadsheet_text`` gives back
    exactly the original text. Every CSV and TSV the tool writes goes through this (``write_csv``,
    ``samples.write_tsv``)."""
    if not isinstance(cell, str) or not cell or _NUMBER_RE.fullmatch(cell):
        return cell
    if cell.startswith(FORMULA_START) or _QUOTED_RE.match(cell):
        return "'" + cell
    return cell


def spreadsheet_text(cell: str) -> str:
    """The inverse of ``spreadsheet_safe``: what the tool reads back from its own CSV files."""
    return cell[1:] if _QUOTED_RE.match(cell) else cell


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    """Write a CSV with a header, atomically; every text cell through ``spreadsheet_safe``.
    Returns the number of data rows."""
    n = 0
    with atomic_open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([spreadsheet_safe(c) for c in header])
        for row in rows:
            w.writerow([spreadsheet_safe(c) for c in row])
            n += 1
    return n


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
