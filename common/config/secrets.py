"""Keeping secrets out of files: which keys and values hold one, and their redaction in YAML, logs and
argv."""
from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Any, Iterable

import yaml

from .keys import _cut, _show
from .schema import _URL_SECRET_RE

if TYPE_CHECKING:
    from .schema import Config


_SECRET_RE = re.compile(r"(password|passwd|secret|token|api_key|apikey)", re.I)
REDACTED = "***redacted***"


def is_secret_key(key: str) -> bool:
    """True for keys that hold a secret (``password``, ``token``...), not where one lives (``*_env``)."""
    return bool(_SECRET_RE.search(key)) and not key.endswith("_env")


def _may_hold_secret(text: str, name: bool = False) -> bool:
    """True for command-line text that could carry a secret: a URL (``@``, ``://``) and, unless
    ``name`` (a key's name: ``notify.password`` names no secret), a ``password``/``token`` word.
    Such text is never quoted back in a message."""
    url_like = "@" in text or "://" in text
    return url_like or (not name and bool(_SECRET_RE.search(text) or _URL_SECRET_RE.search(text)))


NOT_SHOWN = "(not shown: it may hold a secret)"


def _show_arg(text: str, name: bool = False) -> str:
    """``_show(text)`` (``_cut`` for a ``name``), or ``NOT_SHOWN`` when the text may hold a secret."""
    if _may_hold_secret(text, name):
        return NOT_SHOWN
    return _cut(text) if name else _show(text)


def holds_secret(dotted: str) -> bool:
    """Keys whose value may be a secret or carry one (``store.url``, ``*password*``...): their
    values are never quoted in a message."""
    return dotted in SECRET_VALUE_KEYS or is_secret_key(dotted.split(".")[-1])


SECRET_VALUE_KEYS = ("store.url",)


def secret_args(argv: Iterable[str]) -> set[str]:
    """The command-line words never quoted back (``NOT_SHOWN`` instead): those that may hold a
    secret (``_may_hold_secret``) and the word after an option named like one (``--password X``)."""
    words = list(argv)
    out = {w for w in words if _may_hold_secret(w)}
    out |= {b for a, b in zip(words, words[1:]) if a.startswith("-") and _may_hold_secret(a)}
    return out


# ----------------------------------------------------------------------------- output


def redact(obj: Any) -> Any:
    """Copy of a nested dict with every secret-looking value replaced.

    Keys naming where a secret lives (``password_env``) are kept: they hold a variable name.
    """
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and _SECRET_RE.search(k) and not k.endswith("_env") and v not in (None, ""):
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return copy.deepcopy(obj)


def to_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML, secrets redacted."""
    return yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False, default_flow_style=None)
