"""How a configuration key is declared once: key(default, doc, range=, hashed=, path=, invocation=),
its ranges, and the sections that record which keys a stage reads.

A configuration key is declared once, as a field of a section dataclass (``config.schema``):
``seed: int = key(42, "one seed for every random choice", range=Range(0, 2**63, hi_open=True))``.
Its default, meaning, range, whether it is hashed for freshness, whether it holds a path and
whether it belongs to one command only are all in that declaration; ``RANGES``, ``NON_SEMANTIC``,
``PATH_KEYS``, ``INVOCATION_KEYS`` and ``configs/default.yaml`` are derived from it.
"""
from __future__ import annotations

import copy
import functools
import reprlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# exp(sim / T) of the weighted k-NN vote overflows float64 for T < 1/709.8; a round floor above that.
KNN_TEMPERATURE_MIN = 0.002
INT64 = 2**63  # every int key must fit a signed 64-bit integer (numpy, torch)


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
    if v == INT64:
        return "2**63"
    return str(v) if isinstance(v, int) else f"{v:g}"


def ge(lo: float, why: str = "") -> Range:
    """``>= lo``."""
    return Range(lo=lo, why=why)


def gt(lo: float, why: str = "") -> Range:
    """``> lo``."""
    return Range(lo=lo, lo_open=True, why=why)


PROB = Range(0.0, 1.0, why="a probability")
FRACTION = Range(0.0, 1.0)
COSINE = Range(-1.0, 1.0, why="a cosine similarity")
KNN_T = ge(KNN_TEMPERATURE_MIN, why="exp(sim / T) overflows below that")


# ----------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class KeyMeta:
    """Everything about one key but its name, type and default (the field has those)."""

    doc: str  # meaning and unit: configs/default.yaml's comment
    range: Range | None = None  # numeric keys (each element of a list key): checked on load
    # True: the key changes what a stage writes (every stage that reads it hashes it for freshness);
    # False: speed, logging or delivery only (never hashed); a tuple of stage names: hashed by those
    # stages only, a speed knob for the others that read it
    hashed: bool | tuple[str, ...] = True
    path: tuple[str, ...] | None = None  # a path: made absolute on load, unless one of these keywords
    invocation: bool = False  # one command's key: never saved in RUN/config.yaml

    def hashed_by(self, stage: str) -> bool:
        """Whether ``stage``'s freshness hash includes this key (when the stage reads it)."""
        return self.hashed is True or (isinstance(self.hashed, tuple) and stage in self.hashed)


def key(default: Any, doc: str, *, range: Range | None = None, hashed: bool | tuple[str, ...] = True,
        path: tuple[str, ...] | None = None, invocation: bool = False) -> Any:
    """A section field with its declaration: ``dataclasses.field`` whose metadata ``"key"`` is a
    ``KeyMeta``. A list default is copied for every instance."""
    meta = {"key": KeyMeta(doc, range, hashed, path, invocation)}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return field(default=default, metadata=meta)


_get = object.__getattribute__


class Section:
    """Base of the section dataclasses.

    While ``_reads`` is set on an instance (``values.recording``) every read of one of its fields
    adds ``section.key`` to that set (``dataclasses.asdict`` and ``==`` read every field): the stage
    wrapper hands a stage such a copy, and a test fails if a stage reads a key it did not declare.
    Only field names are recorded. A plain section pays one dictionary look-up per read (about a
    microsecond: reads happen per stage or per step, never per image).
    """

    def __getattribute__(self, name: str) -> Any:
        d = _get(self, "__dict__")
        if "_reads" in d and name in type(self).__dataclass_fields__:
            d["_reads"].add(f"{d['_section']}.{name}")
        return _get(self, name)


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
