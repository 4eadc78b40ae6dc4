"""Signals: a training step is atomic, and the first Ctrl-C or SIGTERM stops a stage once.

``DeferSignals`` holds SIGINT/SIGTERM for the length of a block (one training step, an epoch's
end) and acts on them after it. ``interrupt`` is the stage wrapper's handler: the first signal
raises ``KeyboardInterrupt`` (exit 130, last.pt saved by stage 03), later ones are logged and
ignored while the stage cleans up, so a second SIGTERM never turns a clean stop into a traceback.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


SAME_STOP_S = 2.0  # the same signal again within this many seconds: one stop delivered twice
_first_stop: list[tuple[int, float]] = []  # (signal, monotonic time) of the signal that stopped the stage


def already_stopping(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    """Later signals while a stage cleans up: logged, otherwise ignored. The first signal again at
    once is one Ctrl-C that came twice (from the terminal to the whole process group, and passed on
    by run_pipeline.py): not worth a warning."""
    if _first_stop and _first_stop[0][0] == signum and time.monotonic() - _first_stop[0][1] < SAME_STOP_S:
        log.debug("signal %d again: already stopping", signum)
        return
    log.warning("signal %d: already stopping (saving what is needed first)", signum)


def interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    """First SIGINT/SIGTERM: stop the stage (``KeyboardInterrupt``); later ones are ignored."""
    _first_stop[:] = [(signum, time.monotonic())]
    for s in STOP_SIGNALS:
        signal.signal(s, already_stopping)
    raise KeyboardInterrupt(f"signal {signum}")


class DeferSignals:
    """Hold SIGINT/SIGTERM until the block ends, then act on them (one training step is atomic).

    A signal that arrived inside the block is re-delivered at its end to the handler that was
    installed before (the stage wrapper turns SIGTERM into ``KeyboardInterrupt``); with the
    default SIGTERM action it becomes ``KeyboardInterrupt`` too, so last.pt is saved. Outside the
    main thread (signals cannot be handled there) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: int | None = None
        self._old: dict[int, Any] = {}

    def _hold(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        self.pending = signum

    def __enter__(self) -> "DeferSignals":
        self.pending = None
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.getsignal(s) for s in self.SIGNALS}
            for s in self.SIGNALS:
                signal.signal(s, self._hold)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        signum, self.pending = self.pending, None
        if signum is None:
            return
        if exc_type is not None:
            log.warning("signal %d arrived while the step failed; the failure is reported", signum)
            return
        handler = signal.getsignal(signum)
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            raise KeyboardInterrupt(f"signal {signum}")


def _install_signals() -> dict:
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in old:
            signal.signal(s, interrupt)
    except ValueError:  # not in the main thread (tests)
        return {}
    return old


def _restore_signals(old: dict) -> None:
    for s, h in old.items():
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(s, h)
