"""Stage 07's driver: classify the test split (or new images) against the LUT; metrics and report.

Evaluate mode reads 04's store (train, val and test vectors) and ``model.json``, and the gallery:
06's ``lut.sqlite`` (``inference.gallery=lut``) or every train vector (``full``); it writes
``07_inference/``. Predict mode embeds every image under ``inference.input`` with the checkpoint
04's ``model.json`` names (its sha256 checked) and writes ``07_inference/predict/<name>/`` only:
the evaluation's files are never touched (``predict.py``). The algorithms are in ``common.evaluate``.

With ``search.index`` other than ``exact`` the gallery is searched through a FAISS index: 06's
``lut.faiss`` (checked against ``lut_faiss.json``: same rows in the same order), or for
``inference.gallery=full`` one built now over the train vectors. Its agreement with exact search
on the val queries (at most ``AGREEMENT_QUERIES``; same top-1 image, same top-1 class, and both
speeds) goes to ``metrics.json``
(``search``) and the report.

With exact search, a gallery (and a train split) of more vectors than ``search.max_memory_gib``
stays in the store: ``common.retrieval.gallery`` gives a ``common.retrieval.streamed.StoreMatrix`` in place of the
matrix, searched block by block (the classical classifiers are then skipped).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .. import EXTRACT, PRUNE, SPLIT, STATS, THRESHOLD, TRAIN
from ..artefacts import LUT_FILE, SPLITS_CSV

if TYPE_CHECKING:
    from ...pipeline.context import Context
from .evaluate import _evaluate
from .load import _threshold_info, hold_out, threshold_warnings, index_agreement, load_store_data, open_index
from .predict import _predict
from .predict import check as check  # the stage's read-only check phase: pipeline.spec finds it here

log = logging.getLogger(__name__)


def main(ctx: Context) -> dict[str, Any]:
    """Load the vectors and gallery, then evaluate on the test split or predict new images."""
    icfg = ctx.cfg.inference
    splits_dir = ctx.upstream(SPLIT)
    ctx.upstream(STATS)
    ctx.upstream(TRAIN)
    stage04 = ctx.upstream(EXTRACT)
    lut_path = ctx.upstream(PRUNE) / LUT_FILE if icfg.gallery == "lut" else None
    sweep_dir = ctx.upstream(THRESHOLD, required=False)
    sweep_png, suggested = _threshold_info(sweep_dir)
    if suggested is not None:
        log.info("stage 05 suggests inference.reject_below=%.4f (now %s)", suggested,
                 "null" if icfg.reject_below is None else icfg.reject_below)
    if icfg.reject_below is None:
        log.info("open-set rejection is off (inference.reject_below=null); the val cuts are still measured")
    scfg = ctx.cfg.search
    data = hold_out(load_store_data(stage04, splits_dir / SPLITS_CSV, lut_path, ctx.cfg.store.password_env,
                                    scfg.max_memory_gib if scfg.index == "exact" else None,
                                    test=icfg.mode == "evaluate"),
                    list(icfg.unknown_classes))
    facts = [("run folder", str(ctx.run_dir)), *data.facts,
             *(("caution (stage 05's threshold)", w) for w in threshold_warnings(sweep_dir))]
    index = open_index(ctx, data, lut_path.parent if lut_path is not None else None)
    info = index_agreement(index, data, icfg.block_size, ctx.device()) if index is not None else {}
    if info:
        facts.append(("search", f"{info['factory']}: same top-1 image as exact search on "
                                f"{info['val_queries']} val queries {info['val_same_image']}, same class "
                                f"{info['val_same_class']}"))
    if icfg.mode == "evaluate":
        out = _evaluate(ctx, data, facts, sweep_png, suggested, index, info)
    else:
        out = _predict(ctx, data, facts, suggested, index)
    if info:
        out["search"] = info
    return out
