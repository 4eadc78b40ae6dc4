"""Class names to indices: the one label map, and the gallery's classes."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import UserError


def class_index(labels: Sequence[str], classes: Sequence[str], unknown: Callable[[str], str]) -> np.ndarray:
    """The index in ``classes`` of every label (int64): the one label -> class-index map of the
    pipeline. ``UserError(unknown(label))`` for the first label that is not a class (each caller
    words its refusal: which file, which key, which stage to rerun)."""
    index = {c: i for i, c in enumerate(classes)}
    try:
        return np.fromiter((index[v] for v in labels), dtype=np.int64, count=len(labels))
    except KeyError as e:
        raise UserError(unknown(e.args[0])) from None


def gallery_classes(train_classes: Sequence[str], extra_labels: Sequence[str]) -> list[str]:
    """The checkpoint's classes, then the gallery-only classes (sorted): training indices unchanged."""
    known = set(train_classes)
    return list(train_classes) + sorted({c for c in extra_labels if c not in known})
