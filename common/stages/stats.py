"""Stage 02's driver: exact per-channel mean and std of the train split into stats.json."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

from ..data.splits import read_splits, rows_of
from ..data.stats import mean_std
from ..fileio import write_json
from . import SPLIT
from .artefacts import SPLITS_CSV, STATS_JSON

if TYPE_CHECKING:
    from ..pipeline.context import Context

log = logging.getLogger(__name__)


def main(ctx: Context) -> dict:
    cfg = ctx.cfg
    train = rows_of(read_splits(ctx.upstream(SPLIT) / SPLITS_CSV), "train")
    log.info("mean/std over %d train images at %d px (pad fill %s)", len(train), cfg.model.image_size,
             cfg.data.pad_fill)
    result = mean_std([r.path for r in train], cfg.model.image_size, cfg.data.pad_fill, cfg.stats.batch_size,
                            cfg.data.num_workers, ctx.device())
    result["split"] = "train"
    write_json(ctx.output(STATS_JSON), result)
    log.info("mean %s, std %s over %d pixels per channel", _fmt(result["mean"]), _fmt(result["std"]),
             result["pixels"])
    return {"images": result["images"], "pixels": result["pixels"], "mean": result["mean"], "std": result["std"]}


def _fmt(v: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:.4f}" for x in v) + "]"
