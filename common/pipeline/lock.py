"""One process per stage: the stage lock, who holds it, and stale locks of dead processes."""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

LOCK = ".lock"


# ----------------------------------------------------------------------------- locks


@dataclass
class LockInfo:
    pid: int
    host: str
    started: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.started}"

    def alive(self) -> bool | None:
        """True/False for a process on this host; None when it runs on another host (unknown)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def read_lock(stage_dir: Path) -> LockInfo | None:
    """The holder recorded in ``stage_dir/.lock``, None when there is no lock."""
    p = stage_dir / LOCK
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        return LockInfo(int(d["pid"]), str(d["host"]), str(d["started"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return LockInfo(-1, "?", "?")  # a torn lock: treated as left by a dead process


def holder(stage_dir: Path) -> LockInfo | None:
    """The live (or possibly live, on another host) holder of a stage's lock, else None."""
    info = read_lock(stage_dir)
    if info is None or info.pid == os.getpid():
        return None
    return None if info.alive() is False or info.pid < 0 else info


class StageLock:
    """``stage_dir/.lock``: held through ``fcntl.flock`` on the lock file, kept open while the stage runs.

    Why flock (issue 17): the kernel drops the lock when its holder dies, however it dies, so a
    lock left by a dead process is taken over by the very same atomic call that takes a free one
    (``flock(LOCK_EX | LOCK_NB)``): of any number of processes started together, exactly one gets
    it and the others are refused naming it. Deleting a stale file and creating a new one (the
    former way) let two processes both delete and both create. The only race left, a holder
    unlinking the file on release between another's ``open`` and ``flock``, is closed by checking,
    once locked, that the path still names the file that was locked (else retry).

    The file still records the holder (pid, host, start time) for messages and for ``holder``;
    a lock file naming a live process on this host (written without flock) or any process on
    another host (flock on a network file system may not reach it) is still respected, as before.
    """

    def __init__(self, stage_dir: Path, stage_name: str, run_dir: Path):
        self.path = stage_dir / LOCK
        self.stage_name, self.run_dir = stage_name, run_dir
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):  # a retry only when a releasing holder unlinked the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UserError(running_message(self.stage_name, self.run_dir, self._live_holder())) from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # released (unlinked) between our open and our flock: try the new file
                    os.close(fd)
                    continue
                info = _parse_lock(os.pread(fd, 4096, 0))
                if info is not None and info.pid < 0:
                    log.warning("%s: taking over a damaged lock file %s (no process holds it)", self.stage_name,
                                self.path)
                elif info is not None:
                    if info.alive() is not False and info.pid != os.getpid():  # respected as before (docstring)
                        raise UserError(running_message(self.stage_name, self.run_dir, info))
                    log.warning("%s: taking over the lock left by %s (that process is gone)", self.stage_name,
                                info.describe())
                text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})
                os.ftruncate(fd, 0)
                os.pwrite(fd, text.encode(), 0)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._fd, self.held = fd, True
            os.register_at_fork(after_in_child=self._not_in_child)
            return
        raise UserError(f"cannot take the lock {self.path}: it keeps changing; is another process starting "
                        f"{self.stage_name}?")

    def _not_in_child(self) -> None:
        """A forked child (a DataLoader or scan worker) closes its copy of the lock's descriptor and
        never releases it: the lock goes with the stage's own process, even if a worker outlives it."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self.held = None, False

    def _live_holder(self) -> LockInfo:
        """The holder of the flock, named in the lock file. A holder that has just taken the lock
        may not have written its record yet (the file is empty, torn, or still names the dead
        process it took over from): waited for, briefly."""
        for _ in range(200):
            info = read_lock(self.path.parent)
            if info is not None and info.pid >= 0 and info.alive() is not False:
                return info
            time.sleep(0.01)
        return LockInfo(-1, "another process", "just now")

    def release(self) -> None:
        if not self.held:
            return
        fd, self._fd, self.held = self._fd, None, False
        try:  # unlink only our own file (someone may have deleted it by hand and another taken a new one)
            if fd is not None and os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass  # already removed (by hand): nothing of ours to unlink
        finally:
            if fd is not None:
                os.close(fd)  # drops the flock


def _parse_lock(data: bytes) -> LockInfo | None:
    """The holder recorded in a lock file's bytes; None when empty; pid -1 when torn."""
    if not data.strip():
        return None
    try:
        d = json.loads(data.decode("utf-8"))
        return LockInfo(int(d["pid"]), str(d["host"]), str(d["started"]))
    except (ValueError, KeyError, TypeError):
        return LockInfo(-1, "?", "?")


def running_message(stage_name: str, run_dir: Path, info: LockInfo) -> str:
    where = "" if info.alive() is not None else f" (if that process is gone, delete {run_dir / stage_name / LOCK})"
    return f"{stage_name} is running in {run_dir}: {info.describe()}{where}"
