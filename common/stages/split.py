"""Stage 01's driver: check every image under ``data.root`` and split each class into train / val / test.

Reads ``data.root``; writes splits.csv, class_counts.csv, bad_images.csv, duplicates.csv,
class_distribution.png (and the split folders with ``split.materialize``). The splitting rule is
in the docstring of ``common.split``.
"""
from __future__ import annotations

from typing import Any

from .. import split


def main(ctx: Any) -> dict:
    return split.run_split(ctx.cfg, ctx.output, ctx.dir)
