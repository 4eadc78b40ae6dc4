"""A gallery of one or more splits: loaded into memory, or left in the store and streamed."""
from __future__ import annotations

import logging
from typing import Any

from .streamed import GIB, StoreMatrix, block_rows, fits

log = logging.getLogger(__name__)


def vectors_of(store: Any, target: Any, splits: tuple[str, ...], info: Any, classes: list[str],
               max_memory_gib: float | None = None) -> Any:
    """The ``Vectors`` of ``splits`` of model ``info`` in ``store`` (opened at ``target``), merged by
    image id: loaded, or, when they exceed ``max_memory_gib`` (None: always loaded), with a
    ``StoreMatrix`` as ``X``, read from ``target`` at each search."""
    from ..data.labels import class_index
    from ..store.containers import Vectors, merge
    from ..store.schema import STAGE

    if max_memory_gib is not None and not fits(store.count_vectors(splits, info.id), info.dim, max_memory_gib):
        ids, labels, paths = store.split_rows(splits, info.id)
        y = class_index(labels, classes, lambda v: f"{target}: label {v!r} is not a class of the model: rerun {STAGE}")
        X = StoreMatrix(target, info.id, splits, ids, info.dim, block_rows(info.dim, max_memory_gib * GIB))
        log.info("%s of %s: %d vectors (%.2f GiB) above search.max_memory_gib=%g: streamed from the store in "
                 "blocks of %d rows at each search", "+".join(splits), target, ids.size, X.nbytes / GIB,
                 max_memory_gib, X.rows_per_block)
        return Vectors(X, y, paths, ids)
    return merge(*(store.load_split(s, info.id, classes) for s in splits))
