"""Stage 07's evaluate mode: the test vectors (from the store, or embedded now), the library's
``common.evaluate.evaluation.evaluate``, then one small writer per output file, in this order:
``classifiers/``, ``comparison.csv``, ``predictions.csv``, ``classification_report.csv``,
``confusion_matrix.png`` and ``embedding_map.png``, ``metrics.json``, ``report.html``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...data.labels import class_index
from ...errors import UserError
from ...evaluate import metrics as evaluate_metrics
from ...evaluate.evaluation import COMPARISON_HEADER, EvalInputs, Evaluation, Output, evaluate
from ...evaluate.metrics import UNKNOWN_NAME, confusion
from ...evaluate.pages import _evaluate_report
from ...evaluate.tables import _round, class_report_rows, prediction_rows
from ...fileio import write_csv, write_json
from ...report.plots import confusion_matrix_png, embedding_map_png
from ...retrieval.ann import AnnIndex
from ...store.containers import Vectors, subset
from ..artefacts import CLASSIFIERS_DIR
from .load import _embed, _held_out

if TYPE_CHECKING:
    from ...pipeline.context import Context
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
    ev = evaluate(inp, icfg, device=ctx.device(), seed=ctx.cfg.run.seed)
    m = write_evaluation(ev, inp, icfg, ctx.output, ctx.cfg.run.seed)
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


def write_evaluation(ev: Evaluation, inp: EvalInputs, icfg: Any, output: Output, seed: int) -> dict[str, Any]:
    """Every file of evaluate mode, each registered through ``output``; returns the summary (with
    ``report``: the page's path)."""
    write_classifiers(output, ev, inp)
    write_comparison(output("comparison.csv"), ev.comparison)
    write_predictions(output("predictions.csv"), ev, inp)
    class_report = write_class_report(output("classification_report.csv"), ev, inp)
    cm_png, map_png = write_plots(output, ev, inp, icfg, seed)
    report_path = output("report.html")
    ev.summary["report"] = str(report_path)
    write_json(output("metrics.json"), _round(ev.summary))
    _evaluate_report(report_path, inp, icfg, ev.summary, ev.decision, COMPARISON_HEADER, ev.comparison, cm_png,
                     map_png, *class_report)
    m = ev.summary
    log.info("test (%d queries, %s, %s gallery): %s", len(inp.test), icfg.method, icfg.gallery,
             evaluate_metrics.headline_line(m, icfg.top_k))
    log.info("report: %s", report_path)
    return m


def write_classifiers(output: Output, ev: Evaluation, inp: EvalInputs) -> None:
    """``classifiers/``: the fitted classical classifiers (when any), each file registered; their
    file sizes complete their rows of the comparison table."""
    if not ev.fitted:
        return
    from ...evaluate.classifiers import CLASSES_FILE, DIGESTS_FILE, save_classifiers

    folder = output(CLASSIFIERS_DIR, CLASSES_FILE).parent
    paths = save_classifiers(ev.fitted, folder, inp.classes, inp.model_id, inp.test.X.shape[1])
    for p in [*paths.values(), folder / CLASSES_FILE, folder / DIGESTS_FILE]:
        output(CLASSIFIERS_DIR, p.name)  # registered in the manifest
    for row in ev.comparison:
        if row[0] in paths:
            row[6] = paths[row[0]].stat().st_size


def write_comparison(path: Path, rows: list[list[Any]]) -> None:
    """``comparison.csv``: every method's accuracy, speed and size on the test split."""
    write_csv(path, COMPARISON_HEADER,
              [[r[0], f"{r[1]:.6f}", f"{r[2]:.6f}", f"{r[3]:.6f}", "" if r[4] is None else f"{r[4]:.3f}", f"{r[5]:.6f}", r[6]] for r in rows])


def write_predictions(path: Path, ev: Evaluation, inp: EvalInputs) -> None:
    """``predictions.csv``: one row per test image (truth, decision, candidates, every method's)."""
    d = ev.decision
    header, rows = prediction_rows(inp.test, d, inp.classes, inp.gallery, ev.preds, with_truth=True,
                                   scores={"margin": d.margin, "knn_similarity": ev.scores["knn"]})
    write_csv(path, header, rows)


def write_class_report(path: Path, ev: Evaluation, inp: EvalInputs) -> tuple[list[str], list[list[Any]]]:
    """``classification_report.csv``: per class precision, recall, F1, support and gallery size;
    returns its header and rows (the report shows them)."""
    g_counts = np.bincount(inp.gallery.labels, minlength=len(inp.classes))
    header, rows = class_report_rows(inp.test.labels, ev.decision.final, inp.classes, g_counts)
    write_csv(path, header, rows)
    return header, rows


def write_plots(output: Output, ev: Evaluation, inp: EvalInputs, icfg: Any, seed: int) -> tuple[Path, Path | None]:
    """``confusion_matrix.png`` (with an "unknown" column when anything was rejected) and, unless
    ``inference.embedding_map=none``, ``embedding_map.png``."""
    classes, C, y, final = inp.classes, len(inp.classes), inp.test.labels, ev.decision.final
    cm = confusion(y, final, C)
    rejected = bool((final == evaluate_metrics.UNKNOWN).any())
    cm_png = confusion_matrix_png(cm if rejected else cm[:, :C], classes,
                                  list(classes) + ([UNKNOWN_NAME] if rejected else []),
                                  output("confusion_matrix.png"))
    map_png = None
    if icfg.embedding_map != "none":
        map_png = embedding_map_png(inp.test.X, y, classes, output("embedding_map.png"), icfg.embedding_map, seed)
    return cm_png, map_png
