"""TODO(doc): common/stages/inference/evaluate.py"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...data.labels import class_index
from ...errors import UserError
from ...evaluate.evaluation import EvalInputs, evaluate
from ...retrieval.ann import AnnIndex
from ...store.containers import Vectors, subset

if TYPE_CHECKING:
    from ...pipeline.context import Context
from .load import _embed, _held_out

if TYPE_CHECKING:
    from .load import StoreData

log = logging.getLogger(__name__)


def _evaluate(ctx: Context, data: StoreData, facts: list, sweep_png: Path | None, suggested: float | None,
              index: AnnIndex | None, search_info: dict) -> dict:
    icfg = ctx.cfg.inference
    test, embed_s = data.test, 0.0
    if len(test) == 0 and data.test_rows:
        log.info("the store holds no test vectors: embedding the test split's %d images now", len(data.test_rows))
        test, embed_s = _embed_split(ctx, data)
        if data.unknown_classes:  # hold_out saw no test vectors: split these
            out = _held_out(data.unknown_classes, data.classes)
            data.unknown_test = subset(test, np.isin(test.labels, out))
            test = subset(test, ~np.isin(test.labels, out))
    inp = EvalInputs(classes=data.classes, test=test, gallery=data.gallery, train=data.train, val=data.val,
                     model_id=data.model_id, facts=facts, sweep_png=sweep_png,
                     suggested_reject_below=suggested, embed_seconds=embed_s, unknown_test=data.unknown_test,
                     unknown_classes=data.unknown_classes, index=index, search_info=search_info)
    m = evaluate(inp, icfg, ctx.output, device=ctx.device(), seed=ctx.cfg.run.seed)
    keys = ("accuracy", f"top{icfg.top_k}_accuracy", "macro_f1", "balanced_accuracy", "map_at_r",
            "rejection_rate", "accepted_accuracy", "gallery_size", "report")
    keys += (*(f"{k}_ci95" for k in keys), "chance_accuracy", "majority_class_accuracy",
             f"top{icfg.top_k}_uninformative")  # each figure's 95 % interval and the levels to beat
    return {k: m[k] for k in keys if k in m}


def _embed_split(ctx: Context, data: StoreData) -> tuple[Vectors, float]:
    """Test vectors embedded now (the store has none): same checkpoint and transform as the store."""
    paths = [r.path for r in data.test_rows]
    X, ok, errors, timing = _embed(ctx, data, paths)
    if errors:
        raise UserError(f"test image {errors[0][0]} cannot be read ({errors[0][1]}): rerun 01_random_split_dataset.py")
    labels = class_index([data.test_rows[i].label for i in ok], data.classes,
                         lambda v: f"test image label {v!r} is not a class of the gallery: rerun 04_extract_features.py")
    return Vectors(X, labels, [paths[i] for i in ok]), timing["decode_embed_s"]
