"""Logging of a stage: the console, log.txt (never through a symbolic link) and the buffer before it
exists."""
from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)


def open_log_nofollow(path: Path) -> int:
    """Open ``path`` for appending without following a symbolic link (``UserError`` if it is one)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link: logs are never written through links; remove it") from None
        raise


# ----------------------------------------------------------------------------- logging


class _OneLineConsole(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.exc_text = None
        saved = record.exc_info
        record.exc_info = None  # tracebacks go to log.txt only
        try:
            return super().format(record)
        finally:
            record.exc_info = saved


class _Buffer(logging.Handler):
    """Keeps records until the stage may write its ``log.txt`` (a refused stage writes nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str, is_main: bool) -> tuple[list[logging.Handler], _Buffer]:
    """Console handler (one line per record) and a buffer that ``start_log_file`` flushes to ``log.txt``."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(getattr(logging, level.upper(), logging.INFO) if is_main else logging.WARNING)
    console.setFormatter(_OneLineConsole("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    buffer = _Buffer()
    for h in (console, buffer):
        root.addHandler(h)
    for noisy in ("PIL", "matplotlib", "urllib3", "h5py", "fsspec", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return [console, buffer], buffer


def start_log_file(stage_dir: Path, buffer: _Buffer, handlers: list[logging.Handler]) -> None:
    """Open ``log.txt`` (appended, never through a symbolic link) and write the buffered records."""
    fd = open_log_nofollow(stage_dir / "log.txt")
    fh = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter(FILE_FORMAT))
    for r in buffer.records:
        fh.handle(r)
    root = logging.getLogger()
    root.removeHandler(buffer)
    buffer.records.clear()
    root.addHandler(fh)
    handlers.append(fh)
