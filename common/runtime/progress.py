"""Progress bars that also reach a log: a tqdm bar on a terminal, a log line every ~30 s without one.

Under ``nohup``, a scheduler or ``> out.txt`` tqdm draws nothing (its ``disable=None``), and a
long epoch or embedding showed no sign of life until it ended. ``progress`` gives the same
object either way (``update``, ``set_postfix``, ``close``, a context manager); without a terminal
it logs ``desc: done/total unit (share), rate unit/s, ETA`` every ``PROGRESS_EVERY_S`` seconds to
the stage's log (``log.txt`` and the console's stderr).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0  # seconds between progress lines in the log when no terminal is attached


def _eta(seconds: float) -> str:
    """``2m50s``, ``1h05m``: the epoch lines' format (``training.records.duration``)."""
    s = int(max(round(seconds), 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


class LogProgress:
    """tqdm's interface, writing a log line at most every ``every`` seconds.

    ``scale``: items per ``update(1)`` (a training step of 64 images: 64), so the rate and the
    count are in ``unit`` (images) whatever the caller counts. ``clock`` is for tests.
    """

    def __init__(self, total: int, desc: str, unit: str = "img", initial: int = 0, scale: int = 1,
                 every: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None):
        self.total, self.desc, self.unit, self.scale, self.every = total, desc, unit, scale, every
        self.n = initial
        self._start_n = initial
        self._clock = clock
        self._t0 = self._last = clock()
        self._postfix = ""
        self._log = logger or log

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self.every:
            self._last = now
            self._log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``epoch 3/20: 640/6,400 img (10%), 35.2 img/s, ETA 2m43s, loss=4.1``."""
        now = self._clock() if now is None else now
        done = (self.n - self._start_n) * self.scale
        rate = done / max(now - self._t0, 1e-9)
        total = self.total * self.scale
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {_eta((self.total - self.n) * self.scale / rate)}" if rate > 0 and self.total else ""
        extra = f", {self._postfix}" if self._postfix else ""
        return (f"{self.desc}: {self.n * self.scale:,}/{total:,} {self.unit}{share}, {rate:.1f} {self.unit}/s"
                f"{eta}{extra}")

    def set_postfix(self, refresh: bool = False, **kw: Any) -> None:  # noqa: ARG002 - tqdm's signature
        self._postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        """Nothing to close: the log lines are already written (tqdm's interface)."""

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "img", initial: int = 0, enabled: bool = True, scale: int = 1,
             log_unit: str | None = None, **tqdm_kw: Any) -> Any:
    """A tqdm bar on a terminal (stderr), a ``LogProgress`` without one, a silent bar when not ``enabled``
    (another rank of a distributed run). The log counts ``scale`` ``log_unit`` per ``unit`` (a step: 64 images)."""
    from tqdm import tqdm

    if not enabled:
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, **tqdm_kw)
    return LogProgress(total, desc, log_unit or unit, initial, scale)
