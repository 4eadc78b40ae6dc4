"""Stage 06's driver: prune the train gallery into the look-up table (LUT) at the chosen threshold.

The gallery is the train split and the gallery-only images of ``data.gallery_extra`` (split
``extra``, kept under that split in the LUT). The threshold is ``prune.threshold`` when set (then
stage 05 is not needed), else the one in 05's ``threshold.json``. Writes its own artefact,
``lut.sqlite``: a self-contained gallery with the feature store's schema (the kept gallery images
with their labels, paths and sha256, the model, the kept vectors) that a user can copy to another
machine; ``lut.json`` (threshold, counts, the model's checkpoint sha256), ``prune_summary.csv``
and ``prune_summary.png``. With ``search.index`` other than ``exact`` it also builds the FAISS
index over the LUT's rows (``common.search``): ``lut.faiss`` and ``lut_faiss.json`` (what it
indexes: the factory string, the number of rows and the sha256 of their image ids in the LUT's row
order, which stage 07 checks). A gallery of more vectors than ``search.max_memory_gib`` stays in
the store: pruned one class at a time and its kept vectors copied to the LUT block by block.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..fileio import atomic_path, write_csv, write_json
from ..report.plots import plot_prune_summary
from ..retrieval.ann import build_index, ids_sha256
from ..retrieval.prune import prune
from ..retrieval.streamed import is_streamed
from ..retrieval.sweep import gini, kept_ids_sha256
from ..store.containers import ModelInfo, Vectors, subset
from ..store.maintenance import open_store
from ..store.postgres import PgStore
from ..store.schema import GALLERY_SPLITS
from ..store.sqlite import FeatureStore
from . import EXTRACT, THRESHOLD
from .artefacts import (
    INDEX_FILE,
    INDEX_JSON,
    LUT_FILE,
    LUT_JSON,
    THRESHOLD_JSON,
    open_lut,
    open_model_store,
    read_threshold_json,
)

if TYPE_CHECKING:
    from ..pipeline.context import Context

log = logging.getLogger(__name__)


def _threshold(ctx: Context) -> tuple[float, str, int | None]:
    """(threshold, where it comes from, the model id stage 05 chose it for)."""
    if ctx.cfg.prune.threshold is not None:
        return float(ctx.cfg.prune.threshold), "prune.threshold", None
    stage05 = ctx.upstream(THRESHOLD)
    meta = read_threshold_json(stage05)
    return float(meta["threshold"]), str(stage05 / THRESHOLD_JSON), meta.get("model_id")


def write_lut_store(path: Path, source: Path | PgStore, model_id: int, gallery: Vectors) -> None:
    """Write the kept ``gallery`` rows of ``source`` (images, model, vectors) as a new store at ``path``.

    The LUT keeps the source model's dtype: ``gallery.X`` is what the source's blobs decode to
    (float16 values converted to float32 exactly), so a float16 LUT holds the source's very bytes."""
    keep = {int(i) for i in gallery.ids}
    with open_store(source) as src:
        info = src.model_info(model_id)
        images = [r for r in src.images() if r.id in keep]  # train and extra (gallery-only) rows
    with atomic_path(path) as tmp:
        os.unlink(tmp)  # SQLite creates the file itself
        with FeatureStore(tmp, create=True) as dst:
            dst.sync_images(images)
            new, _ = dst.register_model(checkpoint_sha256=info.checkpoint_sha256, embedding=info.embedding,
                                        backbone=info.backbone, dim=info.dim, mean=info.mean, std=info.std,
                                        image_size=info.image_size, pad_fill=info.pad_fill, classes=info.classes,
                                        checkpoint_path=info.checkpoint_path, epoch=info.epoch,
                                        dtype=info.dtype)  # the source's dtype: float16 values are copied as they are
            id_of = {r.path: r.id for r in dst.images()}
            ids = np.array([id_of[p] for p in gallery.paths], dtype=np.int64)
            if is_streamed(gallery.X):  # kept rows of a gallery that stays in the store: block by block
                for start, X in gallery.X.blocks():
                    dst.write_vectors(new.id, ids[start:start + X.shape[0]], X)
            else:
                order = np.argsort(ids, kind="stable")
                dst.write_vectors(new.id, ids[order], gallery.X[order])
            dst.mark_complete(new.id)


def build_lut_index(ctx: Context, lut_path: Path, model: ModelInfo, classes: list[str]) -> dict[str, Any]:
    """Index the LUT's rows, read as stage 07 reads them (``open_lut``: train and extra, by image
    id); write ``lut.faiss`` and its json."""
    scfg = ctx.cfg.search
    gallery, _ = open_lut(lut_path, model, classes)
    ann = build_index(gallery.X, scfg, seed=ctx.cfg.run.seed, device=ctx.device())
    with atomic_path(ctx.output(INDEX_FILE)) as tmp:
        ann.save(tmp)
    meta = {**ann.meta(), "ids_sha256": ids_sha256(gallery.ids), "train_size": scfg.train_size,
            "seed": ctx.cfg.run.seed}
    write_json(ctx.output(INDEX_JSON), meta)
    return meta


def main(ctx: Context) -> dict[str, Any]:
    stage04 = ctx.upstream(EXTRACT)
    t, source, tj_model = _threshold(ctx)
    t = round(t, 6)
    scfg = ctx.cfg.search
    with open_model_store(stage04, ctx.cfg.store.password_env) as ms:
        model, store, info, classes = ms.meta, ms.target, ms.info, list(ms.meta["classes"])
        gal = ms.load(GALLERY_SPLITS, classes, scfg.max_memory_gib if scfg.index == "exact" else None)
    if tj_model is not None and int(tj_model) != int(model["model_id"]):
        raise UserError(f"{source} was chosen for model {tj_model}, but stage 04's vectors are of model "
                        f"{model['model_id']}: rerun 05_lut_threshold.py")
    if len(gal) == 0:
        raise UserError(f"{store} holds no train vectors to prune: rerun 04_extract_features.py")
    t0 = time.perf_counter()
    keep = prune(gal.X, gal.labels, gal.ids, t, ctx.cfg.lut.block_size, ctx.device())
    secs = time.perf_counter() - t0
    kept = subset(gal, keep)
    lut_path = ctx.output(LUT_FILE, digest="feature_store")
    write_lut_store(lut_path, store, int(model["model_id"]), kept)
    index = build_lut_index(ctx, lut_path, info, classes) if ctx.cfg.search.index != "exact" else None

    n_classes = len(classes)
    before = np.bincount(gal.labels, minlength=n_classes)
    after = np.bincount(kept.labels, minlength=n_classes)
    present = before > 0
    summary = [{"class": classes[c], "before": int(before[c]), "after": int(after[c]),
                "fraction_kept": after[c] / before[c]} for c in np.flatnonzero(present)]
    write_csv(ctx.output("prune_summary.csv"), ["class", "before", "after", "fraction_kept"],
              ([r["class"], r["before"], r["after"], f"{r['fraction_kept']:.6f}"] for r in summary))
    plot_prune_summary(summary, ctx.output("prune_summary.png"), t)
    b, a = before[present], after[present]
    imbalance = {"ratio_before": float(b.max() / b.min()), "ratio_after": float(a.max() / a.min()),
                 "gini_before": gini(b), "gini_after": gini(a)}
    n_before, n_after = len(gal), len(kept)
    itemsize = 2 if model.get("dtype") == "float16" else 4  # model.json of a run before extract.dtype: float32
    log.info("threshold %g (%s): kept %s of %s train vectors (%.1f%%, %.1f MB -> %.1f MB %s) in %.2f s",
             t, source, f"{n_after:,}", f"{n_before:,}", 100 * n_after / n_before,
             n_before * gal.X.shape[1] * itemsize / 2**20, n_after * gal.X.shape[1] * itemsize / 2**20,
             model.get("dtype", "float32"), secs)
    log.info("class imbalance: largest/smallest class %.1f -> %.1f, Gini %.3f -> %.3f",
             imbalance["ratio_before"], imbalance["ratio_after"], imbalance["gini_before"], imbalance["gini_after"])
    write_json(ctx.output(LUT_JSON), {
        "checkpoint_sha256": model["checkpoint_sha256"], "embedding": model["embedding"], "dim": model["dim"],
        "threshold": t, "threshold_source": source, "n_before": n_before, "n_after": n_after,
        "kept_ids_sha256": kept_ids_sha256(kept.ids), "imbalance": imbalance,
    })
    out = {"threshold": t, "n_before": n_before, "n_after": n_after, "seconds": round(secs, 3), **imbalance}
    if index is not None:
        out["search_index"] = {k: index[k] for k in ("index", "factory", "build_seconds")}
    return out
