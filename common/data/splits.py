"""splits.csv: its rows, reader and writer, and the names of the splits."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..fileio import spreadsheet_text, write_csv

SPLITS = ("train", "val", "test")
SPLITS_COLUMNS = ("path", "label", "split", "sha256", "width", "height", "mode")


# ----------------------------------------------------------------------------- splits.csv


@dataclass
class SplitRow:
    """One row of ``splits.csv``."""

    path: str
    label: str
    split: str
    sha256: str
    width: int
    height: int
    mode: str
    extras: dict[str, str] = field(default_factory=dict)  # any further columns (dup_group, ...)


def read_splits(path: str | Path) -> list[SplitRow]:
    """Read ``splits.csv`` (stage 01). Raises ``UserError`` naming the file on any problem."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p} is missing: run 01_random_split_dataset.py")
    rows: list[SplitRow] = []
    with open(p, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in SPLITS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{p}: missing column(s) {', '.join(missing)}: rerun 01_random_split_dataset.py --force")
        for i, r in enumerate(reader, start=2):
            if r["split"] not in SPLITS:
                raise UserError(f"{p}, line {i}: split must be one of {'/'.join(SPLITS)}, got {r['split']!r}")
            try:
                w, h = int(r["width"]), int(r["height"])
            except (TypeError, ValueError):
                raise UserError(f"{p}, line {i}: width and height must be integers") from None
            extras = {k: v for k, v in r.items() if k not in SPLITS_COLUMNS and k is not None}
            rows.append(SplitRow(spreadsheet_text(r["path"]), spreadsheet_text(r["label"]), r["split"], r["sha256"],
                                 w, h, r["mode"], extras))
    return rows


def class_names(rows: Sequence[SplitRow]) -> list[str]:
    """The class list: sorted unique labels; a label's index is its position here."""
    return sorted({r.label for r in rows})


def rows_of(rows: Sequence[SplitRow], split: str) -> list[SplitRow]:
    """The rows of one split (train, val or test), in file order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [r for r in rows if r.split == split]

EXTRA_SPLIT = "extra"  # the feature store's split of gallery-only images

SPLIT_COLUMNS_OUT = (*SPLITS_COLUMNS, "dup_group")


def write_splits_csv(path: Path, rows: Sequence[SplitRow]) -> int:
    """``splits.csv``: path,label,split,sha256,width,height,mode,dup_group."""
    return write_csv(path, SPLIT_COLUMNS_OUT, ([r.path, r.label, r.split, r.sha256, r.width, r.height, r.mode,
                                                r.extras.get("dup_group", "")] for r in rows))
