"""Renders configs/default.yaml (and docs/reference.md's key table) from the key declarations.

``python -m common.config.reference configs/default.yaml`` rewrites the file from
``config.schema``; a test fails when the file in the repository and the rendering differ, so a
key added, removed or changed in one place and not the other never goes unnoticed.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

import yaml

from ..fileio import atomic_open
from .schema import SECTIONS

log = logging.getLogger(__name__)

DEFAULT_YAML_HEADER = (
    "# Reference setting: DYB-PlanktonNet, SE-ResNeXt-50 32x4d at 224 px (Yang et al. 2022).",
    "# Every key, its default, and what it means. Override with -c more.yaml or section.key=value.",
    "# Generated from common/config/schema.py: python -m common.config.reference configs/default.yaml",
)


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML flow text (``[700, 800, 900]``, ``null``, ``'0'``)."""
    text = yaml.safe_dump([value], default_flow_style=True, width=2**31, allow_unicode=True)
    return text.strip()[1:-1]  # the one-element list's brackets: a scalar is never written as a document


def render_default_yaml() -> str:
    """configs/default.yaml: the header, then one block per section, one ``key: default  # doc``
    line per key, in declaration order."""
    lines = list(DEFAULT_YAML_HEADER)
    for section, cls in SECTIONS.items():
        lines += ["", f"{section}:"]
        defaults = cls()
        for f in dataclasses.fields(cls):
            lines.append(f"  {f.name}: {yaml_value(getattr(defaults, f.name))}  # {f.metadata['key'].doc}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``python -m common.config.reference PATH``: write the rendered default.yaml to ``PATH``."""
    if len(argv) != 1:
        print("usage: python -m common.config.reference configs/default.yaml", file=sys.stderr)
        return 2
    with atomic_open(argv[0]) as f:
        f.write(render_default_yaml())
    print(f"wrote {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
