"""key() field helper, KeyMeta, Range + ge/gt/PROB/COSINE/..., Section base (recording reads), one-line value rendering."""
from __future__ import annotations

import reprlib
from typing import Any, NamedTuple

# exp(sim / T) of the weighted k-NN vote overflows float64 for T < 1/709.8; a round floor above that.
KNN_TEMPERATURE_MIN = 0.002
_INT64 = 2**63  # every int key must fit a signed 64-bit integer (numpy, torch)


class Range(NamedTuple):
    """The allowed values of one numeric key (of each element, for a list key).

    ``lo`` / ``hi``: bounds, None = unbounded; ``lo_open`` / ``hi_open`` exclude the bound itself.
    Floats must also be finite; ints must fit a signed 64-bit integer. ``why`` ends the message.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def contains(self, v: float) -> bool:
        """True when ``v`` lies within the bounds (NaN never does)."""
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below

    def describe(self) -> str:
        """``>= 0 and < 1`` (the bounds as words after "must be")."""
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
        return " and ".join(parts)


def _num(v: float) -> str:
    if v == _INT64:
        return "2**63"
    return str(v) if isinstance(v, int) else f"{v:g}"


def _ge(lo: float, why: str = "") -> Range:
    return Range(lo=lo, why=why)


def _gt(lo: float, why: str = "") -> Range:
    return Range(lo=lo, lo_open=True, why=why)


_PROB = Range(0.0, 1.0, why="a probability")
_FRACTION = Range(0.0, 1.0)
_COSINE = Range(-1.0, 1.0, why="a cosine similarity")
_KNN_T = _ge(KNN_TEMPERATURE_MIN, why="exp(sim / T) overflows below that")


# ----------------------------------------------------------------------------- type checking

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 8, 8, 8
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60
SHOW_MAX_CHARS = 80  # a value quoted in an error message is cut to this many characters


def _cut(text: str) -> str:
    """``text`` cut to ``SHOW_MAX_CHARS`` characters (with ``...``)."""
    return text if len(text) <= SHOW_MAX_CHARS else text[: SHOW_MAX_CHARS - 3] + "..."


def _show(value: Any) -> str:
    """A bounded ``repr`` of ``value`` for one-line error messages (never renders a huge value)."""
    return _cut(_REPR.repr(value))


_RECORDING_CLASSES: dict[type, type] = {}


class _Recorder:
    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_") and name in type(self).__dataclass_fields__:
            reads = object.__getattribute__(self, "_reads")
            reads.add(f"{object.__getattribute__(self, '_section')}.{name}")
        return object.__getattribute__(self, name)


def _recording_class(cls: type) -> type:
    if cls not in _RECORDING_CLASSES:
        _RECORDING_CLASSES[cls] = type(f"Recording{cls.__name__}", (_Recorder, cls), {})
    return _RECORDING_CLASSES[cls]
