"""``data.pad_fill``'s values: a grey level 0-255 or ``auto`` (each image's own border colour), and
the code of ``auto`` in the feature store's INTEGER column. No torch: the store reads it."""
from __future__ import annotations

from typing import Any

AUTO_FILL = "auto"  # data.pad_fill: each image padded with its own border colour
AUTO_FILL_CODE = -1  # "auto" in the feature store's INTEGER pad_fill column (a grey level is 0-255)


def pad_fill_value(v: Any) -> int | str:
    """``data.pad_fill`` as recorded (a checkpoint, ``model.json``, the store's column): ``"auto"``
    (or its store code ``AUTO_FILL_CODE``) or an int grey level (ValueError otherwise)."""
    if v == AUTO_FILL:
        return AUTO_FILL
    return AUTO_FILL if int(v) == AUTO_FILL_CODE else int(v)


def pad_fill_code(v: Any) -> int:
    """``data.pad_fill`` for the store's INTEGER column: the grey level, ``AUTO_FILL_CODE`` for auto."""
    return AUTO_FILL_CODE if pad_fill_value(v) == AUTO_FILL else int(v)
