"""Evaluate mode's measurement: ``evaluate(EvalInputs) -> Evaluation``; writes nothing.

The test queries are searched against the gallery once, classified by both retrieval methods
(top-1 and k-NN), rejected by one open-set rule, and measured (classification, retrieval,
rejection, unknown classes, timing); the classical classifiers (``inference.classifiers``) are
fitted on the same frozen train vectors and compared. Stage 07's driver
(``common.stages.inference.evaluate``) writes the files: the classifiers, ``comparison.csv``,
``predictions.csv``, ``classification_report.csv``, the plots, ``metrics.json`` and ``report.html``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import UserError
from ..retrieval.search import _on_device, prepare_vectors, search_classes, search_rows, topk
from ..retrieval.streamed import is_streamed as streamed
from ..store.containers import Vectors
from .decide import classify, reject
from .metrics import classification_metrics, rejection_metrics, retrieval_metrics, uncertainty
from .openset import _rejection_facts, open_scores, rejection_rule
from .tables import _round

if TYPE_CHECKING:
    from .decide import Decision

log = logging.getLogger(__name__)

RETRIEVAL_TOP1 = "retrieval_top1"
RETRIEVAL_KNN = "retrieval_knn"

Output = Callable[..., Path]  # ctx.output: relative parts -> registered path (the drivers, and predict, take one)
# the comparison table's columns (comparison.csv, report.html)
COMPARISON_HEADER = ["method", "accuracy", "macro_f1", "balanced_accuracy", "fit_time_s", "predict_ms_per_image",
                     "model_size_bytes"]


def _sizeof_gallery(g: Vectors) -> int:
    return int(g.X.nbytes + g.labels.nbytes)  # a streamed gallery: the bytes of its vectors all the same


# ----------------------------------------------------------------------------- evaluate


@dataclass
class EvalInputs:
    """Everything evaluate mode needs, already loaded (tests build it from synthetic vectors)."""

    classes: list[str]
    test: Vectors
    gallery: Vectors
    train: Vectors | None = None  # for the classical classifiers (the store's train vectors)
    val: Vectors | None = None  # their model selection
    model_id: Any = None  # the store's model id / checkpoint sha256 (saved with the classifiers)
    facts: list[tuple[str, Any]] = field(default_factory=list)  # shown at the top of the report
    sweep_png: Path | None = None  # stage 05's threshold_sweep.png
    suggested_reject_below: float | None = None
    embed_seconds: float = 0.0  # test vectors embedded on the fly (0 when read from the store)
    unknown_test: Vectors | None = None  # test images of inference.unknown_classes (not in the gallery)
    unknown_classes: list[str] = field(default_factory=list)
    index: Any = None  # common.retrieval.ann.AnnIndex over the gallery's rows; None = exact search
    search_info: dict[str, Any] = field(default_factory=dict)  # the index and its agreement with exact search
    pixel_size_um: float | None = None  # the camera's pixel size: the report's image sizes in micrometres too


@dataclass
class Evaluation:
    """What evaluate mode found, for the driver to write."""

    summary: dict[str, Any]  # metrics.json's content (the driver adds "report")
    decision: Decision  # the headline method's (inference.method), after rejection
    scores: dict[str, np.ndarray]  # the open-set scores of every test query
    preds: dict[str, np.ndarray]  # each compared method's prediction of every test query
    # rows of the comparison table (COMPARISON_HEADER); a fitted classifier's size (the last
    # column) is its saved file's, None until the driver saves it
    comparison: list[list[Any]]
    fitted: dict[str, Any] = field(default_factory=dict)  # the classical classifiers, to be saved


def evaluate(inp: EvalInputs, icfg: Any, *, device: Any = None, seed: int = 0) -> Evaluation:
    """Evaluate mode on loaded vectors: search once, decide with both methods, reject by one rule,
    measure, and fit the classical classifiers (``inference.classifiers``); writes nothing."""
    _check_inputs(inp)
    # the gallery is searched by the val, test and unknown queries: its codes are made once
    inp = replace(inp, gallery=prepare_vectors(inp.gallery, device))
    C = len(inp.classes)
    decisions, class_search_s = _decide(inp, icfg, device)
    rule = rejection_rule(icfg, inp.val, inp.gallery, C, device)
    scores, _, _ = open_scores(inp.test.X, decisions[icfg.method], inp.gallery, icfg, device)
    for dd in decisions.values():  # both methods share the per-class search: the same scores
        reject(dd, scores, rule)
    # comparison table: each method's own work (k-NN: its k-neighbour search and vote; its
    # candidate list reuses the per-class search, which the headline timing does include)
    own_seconds = {"top1": decisions["top1"].seconds, "knn": decisions["knn"].seconds - class_search_s}
    d = decisions[icfg.method]
    summary = _summary(inp, icfg, d, rule, scores, device)
    rows, preds = comparison(inp, decisions, own_seconds, icfg)
    fitted: dict[str, Any] = {}
    fitted_info: dict[str, Any] = {}
    if icfg.classifiers and inp.train is not None and streamed(inp.train.X):
        summary["classifiers_skipped"] = (f"the train vectors ({inp.train.X.nbytes / 2**30:.2f} GiB) exceed "
                                          "search.max_memory_gib: they stay in the store")
        log.warning("inference.classifiers skipped: %s", summary["classifiers_skipped"])
        inp.facts.append(("classical classifiers", f"skipped: {summary['classifiers_skipped']}"))
    elif icfg.classifiers:
        fitted, cpreds, crows, fitted_info = fit_classical(inp, icfg, device, seed)
        rows += crows
        preds.update(cpreds)
    summary["classifiers"] = fitted_info
    return Evaluation(summary, d, scores, preds, rows, fitted)


def _check_inputs(inp: EvalInputs) -> None:
    """Refuse what cannot be evaluated (one line each)."""
    if len(inp.test) == 0:
        raise UserError("the test split is empty: nothing to evaluate (check split.test)")
    if len(inp.gallery) == 0:
        raise UserError("the gallery is empty: rerun 06_prune_features.py (or use inference.gallery=full)")
    if (inp.test.labels < 0).any():
        raise UserError("some test vectors have no label in the feature store")


def _decide(inp: EvalInputs, icfg: Any, device: Any) -> tuple[dict[str, Decision], float]:
    """Both retrieval methods' decisions (no rejection yet) from one per-class search, and that
    search's seconds."""
    test, gallery = inp.test, inp.gallery
    C = len(inp.classes)
    kw = dict(top_k=icfg.top_k, k=icfg.k, temperature=icfg.temperature, block_size=icfg.block_size, device=device,
              index=inp.index)
    log.info("searching %d test queries against a %s gallery of %d vectors (%d classes)", len(test),
             icfg.gallery, len(gallery), np.unique(gallery.labels).size)
    cs = search_classes(test.X, gallery, C, icfg.block_size, device, inp.index)
    decisions = {
        "top1": classify(test.X, gallery, C, method="top1", reject_below=None, class_search=cs, **kw),
        "knn": classify(test.X, gallery, C, method="knn", reject_below=None, class_search=cs, **kw),
    }
    return decisions, cs.seconds


def _summary(inp: EvalInputs, icfg: Any, d: Decision, rule: Any, scores: dict[str, np.ndarray],
             device: Any) -> dict[str, Any]:
    """metrics.json's measurements of the headline decision ``d`` (its keys in their file order)."""
    test, gallery = inp.test, inp.gallery
    C, y, n = len(inp.classes), test.labels, len(test)
    out: dict[str, Any] = {"mode": "evaluate", "gallery": icfg.gallery, "gallery_size": len(gallery),
                           "method": icfg.method}
    if inp.search_info:
        out["search"] = inp.search_info
    out.update(classification_metrics(y, d.final, C, d.candidates, icfg.top_k))
    out.update(uncertainty(y, d.final, C, d.candidates, icfg.top_k))
    # on a GPU both matrices go to the device once, not once per class searched (a prepared gallery is there)
    rows = search_rows(gallery)
    rows = rows if rows is not gallery.X else _on_device(rows, device)
    out.update(retrieval_metrics(_on_device(test.X, device), y, rows, gallery.labels, topk, block_size=icfg.block_size,
                                 device=device))
    out["reject_below"] = icfg.reject_below
    out.update(_rejection_facts(rule))
    if rule.cut is not None:
        out.update(rejection_metrics(y, d.raw, d.accepted))
        out["accuracy_without_rejection"] = float((d.raw == y).mean())
    out["suggested_reject_below"] = inp.suggested_reject_below
    if inp.unknown_test is not None and len(inp.unknown_test):
        out["unknown_classes"] = _unknown_metrics(inp, icfg, d, scores, rule, device)
    total = d.seconds + inp.embed_seconds
    out["timing_scope"] = "embed+search" if inp.embed_seconds else "search (vectors read from the store)"
    out["images_per_s"] = n / total if total > 0 else float("nan")
    out["mean_latency_ms"] = 1000.0 * total / n
    return out


def comparison(inp: EvalInputs, decisions: dict[str, Decision], own_seconds: dict[str, float],
               icfg: Any) -> tuple[list[list[Any]], dict[str, np.ndarray]]:
    """The retrieval methods' rows of the comparison table (without rejection), and their predictions."""
    y, n, C = inp.test.labels, len(inp.test), len(inp.classes)
    rows: list[list[Any]] = []
    preds: dict[str, np.ndarray] = {}
    for name in (RETRIEVAL_TOP1, RETRIEVAL_KNN):
        key = "top1" if name == RETRIEVAL_TOP1 else "knn"
        dd = decisions[key]
        preds[name] = dd.raw
        mm = classification_metrics(y, dd.raw, C, dd.candidates, icfg.top_k)
        rows.append([name, mm["accuracy"], mm["macro_f1"], mm["balanced_accuracy"], None,  # nothing fitted
                     1000.0 * own_seconds[key] / n, _sizeof_gallery(inp.gallery)])
    return rows, preds


def _unknown_metrics(inp: EvalInputs, icfg: Any, d: Decision, scores: dict[str, np.ndarray], rule: Any,
                     device: Any) -> dict[str, Any]:
    """Known test queries (the gallery's classes) against the test images of ``unknown_classes``."""
    from .openset import unknown_report

    u = inp.unknown_test
    C = len(inp.classes)
    du = classify(u.X, inp.gallery, C, method=icfg.method, top_k=icfg.top_k, k=icfg.k, temperature=icfg.temperature,
                  reject_below=None, block_size=icfg.block_size, device=device)
    u_scores, _, _ = open_scores(u.X, du, inp.gallery, icfg, device)
    correct = d.raw == inp.test.labels
    per_score = unknown_report(scores, u_scores, correct, rule.auto_cuts)
    for name, m in per_score.items():
        log.info("unknown classes %s, %s score: AUROC %.4f, FPR at 95%% TPR %.4f; at the val cut %s: known accuracy "
                 "%.4f, unknowns rejected %.4f", ", ".join(inp.unknown_classes), name, m["auroc"], m["fpr_at_95_tpr"],
                 "none" if m["cut"] is None else f"{m['cut']:.4f}", m["known_accuracy"], m["unknown_rejected"])
    return {"classes": list(inp.unknown_classes), "n_known": len(inp.test), "n_unknown": len(u),
            "closed_set_known_accuracy": float(correct.mean()), "ood_k": icfg.ood_k,
            "scores": {k: _round(v) for k, v in per_score.items()}}


def fit_classical(inp: EvalInputs, icfg: Any, device: Any, seed: int
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray], list[list[Any]], dict[str, Any]]:
    """Fit and evaluate the classical classifiers: (fitted, their predictions, their rows of the
    comparison table with the size still None, their metrics.json entries). Saves nothing."""
    from .classifiers import LINEAR_BATCH_SIZE, fit_classifiers

    if inp.train is None or len(inp.train) == 0:
        raise UserError("inference.classifiers: the feature store has no train vectors to fit them on")
    val = inp.val if inp.val is not None else Vectors(inp.train.X[:0], inp.train.labels[:0], [])
    C = len(inp.classes)
    fitted = fit_classifiers(icfg.classifiers, inp.train.X, inp.train.labels, val.X, val.labels, C,
                             epochs=icfg.linear_epochs, lr=icfg.linear_lr, batch_size=LINEAR_BATCH_SIZE,
                             device=device or "cpu", seed=seed)
    rows, preds, info = [], {}, {}
    y = inp.test.labels
    for name, f in fitted.items():
        t0 = time.perf_counter()
        pred, ranked = f.predict(inp.test.X)
        dt = time.perf_counter() - t0
        preds[name] = pred
        mm = classification_metrics(y, pred, C, ranked, icfg.top_k)
        rows.append([name, mm["accuracy"], mm["macro_f1"], mm["balanced_accuracy"], f.fit_time_s,
                     1000.0 * dt / len(y), None])
        info[name] = _round({k: v for k, v in mm.items() if isinstance(v, float)}) | {
            k: v for k, v in f.info.items() if k != "history"}
        log.info("%s: accuracy %.4f, macro-F1 %.4f (fit %.1f s)", name, mm["accuracy"], mm["macro_f1"], f.fit_time_s)
    return fitted, preds, rows, info
