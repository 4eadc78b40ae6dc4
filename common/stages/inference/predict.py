"""Stage 07's predict mode: embed new images, predict, and write each output file."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ...data.samples import list_inputs
from ...errors import UserError
from ...evaluate.classifiers import (
    CLASSES_FILE,
    DIGESTS_FILE,
    LINEAR_BATCH_SIZE,
    fit_classifiers,
    load_classifiers,
    save_classifiers,
)
from ...evaluate.prediction import predict
from ...pipeline.manifest import read_manifest
from ...retrieval.ann import AnnIndex
from ...retrieval.streamed import is_streamed
from ...store.containers import Vectors
from .. import INFERENCE
from ..artefacts import CLASSIFIERS_DIR

if TYPE_CHECKING:
    from ...pipeline.context import Context
from ...evaluate.classifiers import _same_classes
from .load import _embed

if TYPE_CHECKING:
    from .load import StoreData

log = logging.getLogger(__name__)


def _predict(ctx: Context, data: StoreData, facts: list, suggested: float | None,
             index: AnnIndex | None) -> dict:
    from .. import predict_name

    icfg = ctx.cfg.inference
    inputs = list_inputs(icfg.input)
    images, not_images = inputs.images, inputs.others
    if not_images:
        log.info("%d files of %s are not images (suffix) or missing: listed in predictions.csv", len(not_images),
                 icfg.input)
    if not images:
        raise UserError(f"inference.input: no image files in {icfg.input}")
    n_samples = len(inputs.sample_list())
    log.info("predicting %d image%s of %s (%d sample%s) into %s", len(images), "s" if len(images) != 1 else "",
             icfg.input, n_samples, "s" if n_samples != 1 else "", ctx.dir)
    X, ok, errors, timing = _embed(ctx, data, images)
    queries = Vectors(X, np.full(len(ok), -1), [images[i] for i in ok])
    clfs = _classifiers_for_predict(ctx, data)
    errors = [*errors, *not_images]
    m = predict(queries, data.gallery, data.classes, icfg, ctx.output, samples=[inputs.samples[p] for p in queries.paths],
                name=predict_name(ctx.cfg), root=inputs.root, val=data.val, classifiers=clfs, errors=errors,
                error_samples=[inputs.samples.get(p, "") for p, _ in errors], timing=timing, facts=facts,
                suggested_reject_below=suggested, device=ctx.device(), index=index)
    return {k: m[k] for k in ("n_images", "n_unreadable", "n_doubtful", "rejection_rate", "images_per_s", "report",
                              "review") if k in m}


def _classifiers_for_predict(ctx: Context, data: StoreData) -> dict[str, Any]:
    """Predict mode: the classifiers saved by an up-to-date evaluation (read only), else fitted now."""
    icfg = ctx.cfg.inference
    if not icfg.classifiers:
        return {}
    dim = data.gallery.X.shape[1]
    evaluation = ctx.run_dir / INFERENCE
    saved = evaluation / CLASSIFIERS_DIR
    if read_manifest(evaluation) is not None and (saved / CLASSES_FILE).is_file() and \
            _same_classes(saved / CLASSES_FILE, data.classes):
        loaded = load_classifiers(saved, data.classes, data.model_id, dim, icfg.classifiers)
        if all(n in loaded for n in icfg.classifiers):
            log.info("using the classifiers the evaluation saved in %s: %s", saved, ", ".join(loaded))
            return {n: loaded[n] for n in icfg.classifiers}
    if len(data.train) == 0:
        raise UserError("inference.classifiers: the feature store has no train vectors to fit them on")
    if is_streamed(data.train.X):
        log.warning("inference.classifiers skipped: the train vectors (%.2f GiB) exceed search.max_memory_gib and "
                    "no up-to-date evaluation saved them", data.train.X.nbytes / 2**30)
        return {}
    fitted = fit_classifiers(icfg.classifiers, data.train.X, data.train.labels, data.val.X, data.val.labels,
                               len(data.classes), epochs=icfg.linear_epochs, lr=icfg.linear_lr,
                               batch_size=LINEAR_BATCH_SIZE, device=ctx.device(), seed=ctx.cfg.run.seed)
    folder = ctx.dir / CLASSIFIERS_DIR
    paths = save_classifiers(fitted, folder, data.classes, data.model_id, dim)
    for p in [*paths.values(), folder / CLASSES_FILE, folder / DIGESTS_FILE]:
        ctx.output(CLASSIFIERS_DIR, p.name)
    return fitted
