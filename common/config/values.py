"""What a stage records of the configuration: the values of its keys, their hash, their differences,
and RUN/config.yaml's content."""
from __future__ import annotations

import copy
import hashlib
import json
from typing import TYPE_CHECKING, Any, Iterable

from .schema import INVOCATION_KEYS, KEYS, SECTIONS, get_key
from .secrets import redact

if TYPE_CHECKING:
    from .schema import Config


def is_semantic(dotted: str) -> bool:
    """False for keys that change how fast a stage runs, not what it produces (declared
    ``hashed=False``: ``NON_SEMANTIC``); True for a key hashed by some stage, and for a name that is
    no key (nothing decides it is a speed knob)."""
    meta = KEYS.get(dotted)
    return meta is None or meta.hashed is not False


def hashed_for(dotted: str, stage: str) -> bool:
    """Whether ``stage``'s freshness hash includes ``dotted`` when the stage reads it: its
    declaration's ``hashed`` is True or names the stage. ``KeyError`` for a name that is no key."""
    return KEYS[dotted].hashed_by(stage)


def key_values(cfg: Config, keys: Iterable[str]) -> dict[str, Any]:
    """``{section.key: value}`` of the semantic ``keys`` (what a manifest records and hashes)."""
    return {k: copy.deepcopy(get_key(cfg, k)) for k in sorted(set(keys)) if is_semantic(k)}


def hash_values(values: dict[str, Any]) -> str:
    """sha256 of canonical JSON of ``key_values`` output."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def diff_values(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["lut.tolerance: 0.005 -> 0.01", ...]`` for every key whose value differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "(unset)"), new.get(k, "(unset)")
        if a != b:
            out.append(f"{k}: {_short(a)} -> {_short(b)}")
    return out


def _short(v: Any, limit: int = 60) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_config_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """What RUN/config.yaml holds: every key but the invocation ones, secrets redacted."""
    d = redact(cfg.to_dict())
    for dotted in INVOCATION_KEYS:
        section, key = dotted.split(".")
        d[section].pop(key, None)
    return d


def recording(cfg: Config) -> tuple[Config, set[str]]:
    """A copy of ``cfg`` that records every ``section.key`` read from it, and the set it fills.

    The stage wrapper hands this copy to a stage, so a test can check that a stage reads only
    the keys it declares. ``dataclasses.asdict`` of a section counts as reading all its keys.
    The sections keep their own classes: ``keys.Section`` records a read while ``_reads`` is set.
    """
    reads: set[str] = set()
    rec = copy.deepcopy(cfg)
    for section in SECTIONS:
        obj = getattr(rec, section)
        object.__setattr__(obj, "_section", section)
        object.__setattr__(obj, "_reads", reads)
    return rec, reads
