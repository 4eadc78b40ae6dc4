"""Stage 07's predict mode: embed ``inference.input``, classify it, and write one file per function.

``inference.input`` is a folder, an image, a .csv/.txt list (``common.data.samples``) or an
EcoTaxa export (a .zip, or a folder of ``ecotaxa*.tsv`` files with their images:
``common.ecotaxa.export.export_inputs``; a zip's images are unpacked into ``export_images/`` of
the prediction's folder, once, so that corrections.csv and the review name real files). The
computation is ``common.evaluate.prediction.predict``; the files written into
``07_inference/predict/<name>/``: ``predictions.csv``, ``sample_counts.csv``/``.png``,
``ecotaxa_<name>.zip`` (the bundle EcoTaxa imports as it is: ``common.ecotaxa.bundle``),
``corrections.csv``, ``review.html``, ``metrics.json`` and ``report.html``. Predict mode reads the
gallery and the val vectors (the open-set cut), never the test split.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...data.labels import gallery_classes
from ...data.samples import Inputs, list_inputs
from ...data.splits import class_names, read_splits
from ...ecotaxa.bundle import BundleResult, TaxaMap, read_bundle_table, read_taxa_map, write_bundle
from ...ecotaxa.bundle import Prediction as BundleImage
from ...ecotaxa.export import is_export
from ...ecotaxa.rows import export_inputs
from ...errors import UserError
from ...evaluate.classifiers import (
    CLASSES_FILE,
    DIGESTS_FILE,
    LINEAR_BATCH_SIZE,
    _same_classes,
    check_saved_classifiers,
    fit_classifiers,
    load_classifiers,
    save_classifiers,
)
from ...evaluate.pages import PREDICT_STRIP_MAX
from ...evaluate.prediction import REVIEW_NEIGHBOURS, Prediction, predict
from ...evaluate.tables import _round, prediction_rows, sample_counts
from ...fileio import write_csv, write_json
from ...pipeline.manifest import read_manifest
from ...report.html import Report, StripItem, write_report
from ...retrieval.ann import AnnIndex
from ...retrieval.streamed import is_streamed
from ...store.containers import Vectors
from .. import EXTRACT, INFERENCE, SPLIT
from ..artefacts import CLASSIFIERS_DIR, SPLITS_CSV, read_model_json
from .load import _embed

if TYPE_CHECKING:
    from ...pipeline.context import Context
    from ...report.review import ReviewEcotaxa
    from .load import StoreData

log = logging.getLogger(__name__)

EXPORT_IMAGES = "export_images"  # a zipped EcoTaxa export's images, unpacked for the prediction
LOG_LEFT_OUT = 5  # images left out of the bundle named one per log line; the rest counted


@dataclass
class Queries:
    """What a prediction ran on, beside its vectors: each query's sample and name in the input,
    the files that could not be classified, and the EcoTaxa rows an export's objects came from."""

    samples: dict[str, str]  # path -> sample (queries and errors)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, why) not classified
    root: Path = Path(".")  # names in the bundle are relative to it
    origins: dict[str, Any] = field(default_factory=dict)  # path -> EcoObject (an EcoTaxa export's row)
    source: str = ""

    def name(self, path: str) -> str:
        """The image's name in the input ('/'-separated): the export's own path, else relative to ``root``."""
        origin = self.origins.get(path)
        if origin is not None:
            return origin.image
        return os.path.relpath(path, self.root).replace(os.sep, "/")


def read_inputs(source: str, folder: Path | None) -> Inputs:
    """``inference.input``'s images and samples; an EcoTaxa export's zip is unpacked into
    ``folder/export_images`` (None: read only, nothing unpacked: the check phase)."""
    if is_export(source):
        return export_inputs(source, folder / EXPORT_IMAGES if folder is not None else None)
    return list_inputs(source)


def check(ctx: Context) -> None:
    """Read only, before anything is written. Predict mode: ``inference.input`` lists images (a list
    naming one twice is refused; an EcoTaxa export reads), ``inference.ecotaxa_taxa`` reads as a
    taxa map, and the classifiers an up-to-date evaluation saved, when they will be used, are the
    files it saved, of trusted types only."""
    icfg = ctx.cfg.inference
    if icfg.mode != "predict":
        return
    if not read_inputs(icfg.input, None).images:
        raise UserError(f"inference.input: no image files in {icfg.input}")
    if icfg.ecotaxa_taxa:
        read_taxa_map(icfg.ecotaxa_taxa)
    evaluation = ctx.run_dir / INFERENCE
    saved = evaluation / CLASSIFIERS_DIR
    if not icfg.classifiers or read_manifest(evaluation) is None or not (saved / CLASSES_FILE).is_file():
        return
    meta = read_model_json(ctx.upstream(EXTRACT))
    classes = gallery_classes(class_names(read_splits(ctx.upstream(SPLIT) / SPLITS_CSV)),
                              meta.get("extra_classes", []))
    if "dim" in meta and _same_classes(saved / CLASSES_FILE, classes, quiet=True):  # else main fits them again
        check_saved_classifiers(saved, classes, int(meta["model_id"]), int(meta["dim"]), icfg.classifiers)


def _predict(ctx: Context, data: StoreData, facts: list, suggested: float | None, index: AnnIndex | None) -> dict:
    from .. import predict_name

    icfg = ctx.cfg.inference
    inputs = read_inputs(icfg.input, ctx.dir)
    if inputs.others:
        log.info("%d files of %s are not images (suffix) or missing: listed in predictions.csv", len(inputs.others),
                 icfg.input)
    if not inputs.images:
        raise UserError(f"inference.input: no image files in {icfg.input}")
    n_images, n_samples = len(inputs.images), len(inputs.sample_list())
    log.info("predicting %d image%s of %s (%d sample%s) into %s", n_images, "" if n_images == 1 else "s", icfg.input,
             n_samples, "" if n_samples == 1 else "s", ctx.dir)
    X, ok, errors, timing = _embed(ctx, data, inputs.images)
    queries = Vectors(X, np.full(len(ok), -1), [inputs.images[i] for i in ok])
    pred = predict(queries, data.gallery, data.classes, icfg, val=data.val, classifiers=_classifiers(ctx, data),
                   timing=timing, device=ctx.device(), index=index)
    q = Queries(inputs.samples, [*errors, *inputs.others], inputs.root, inputs.origins, str(icfg.input))
    taxa = read_taxa_map(icfg.ecotaxa_taxa) if icfg.ecotaxa_taxa else None
    m = write_outputs(ctx.output, pred, q, icfg, name=predict_name(ctx.cfg), facts=facts, suggested=suggested,
                      taxa=taxa)
    return {k: m[k] for k in ("n_images", "n_unreadable", "n_doubtful", "rejection_rate", "images_per_s", "report",
                              "review", "ecotaxa") if k in m}


def write_outputs(output: Callable[..., Path], pred: Prediction, q: Queries, icfg: Any, *, name: str,
                  facts: list | tuple = (), suggested: float | None = None, taxa: TaxaMap | None = None,
                  pixel_size_um: float | None = None) -> dict[str, Any]:
    """Every file of a prediction (``output(file)``: its path); returns metrics.json's content."""
    summary: dict[str, Any] = {"mode": "predict", "name": name, **pred.summary, "n_unreadable": len(q.errors),
                               "suggested_reject_below": suggested}
    summary["predictions"] = str(write_predictions(output("predictions.csv"), pred, q))
    summary["samples"] = write_sample_counts(output("sample_counts.csv"), output("sample_counts.png"), pred, q, name)
    summary["ecotaxa"], bundle = write_ecotaxa(output, pred, q, name, taxa)
    write_corrections(output("corrections.csv"), pred)
    summary["review"] = str(write_review_page(output("review.html"), pred, q, icfg, name, pixel_size_um,
                                              bundle=bundle, taxa=taxa))
    summary["report"] = str(output("report.html"))
    write_json(output("metrics.json"), _round(summary))
    write_prediction_report(output("report.html"), pred, q, icfg, summary, facts, pixel_size_um)
    n, n_samples = len(pred), len(summary["samples"])
    log.info("predicted %d image%s in %d sample%s (%d unreadable, %d rejected, %d doubtful); predictions in %s",
             n, "" if n == 1 else "s", n_samples, "" if n_samples == 1 else "s", len(q.errors),
             summary.get("n_rejected", 0), pred.n_doubtful, summary["predictions"])
    log.info("review: %s; EcoTaxa bundle: %s", summary["review"], summary["ecotaxa"]["file"])
    return summary


def _samples(pred: Prediction, q: Queries) -> tuple[list[str], list[str]]:
    """The sample of each query, then of each file not classified."""
    return [q.samples[p] for p in pred.queries.paths], [q.samples.get(p, "") for p, _ in q.errors]


def write_predictions(path: Path, pred: Prediction, q: Queries) -> Path:
    """``predictions.csv``: per image the sample, the call and its scores, the top-k classes, the
    ``REVIEW_NEIGHBOURS`` nearest gallery images and each classifier's call; unreadable files last."""
    n, kn = len(pred), pred.neighbour_idx.shape[1] if len(pred) else 0
    tail: dict[str, list[Any]] = {}
    for j in range(REVIEW_NEIGHBOURS):
        near = [pred.neighbours(i)[j] if j < kn else ("", "", None) for i in range(n)]
        tail[f"neighbour{j + 1}_path"] = [x[0] for x in near]
        tail[f"neighbour{j + 1}_label"] = [x[1] for x in near]
        tail[f"neighbour{j + 1}_similarity"] = [f"{x[2]:.6f}" if x[2] is not None else "" for x in near]
    samples, error_samples = _samples(pred, q)
    header, rows = prediction_rows(pred.queries, pred.decision, pred.classes, pred.gallery, pred.classifier_preds,
                                   with_truth=False, errors=q.errors,
                                   scores={"margin": pred.decision.margin, "knn_similarity": pred.knn},
                                   lead={"sample": [*samples, *error_samples]}, tail=tail)
    write_csv(path, header, rows)
    return path


def write_sample_counts(csv_path: Path, png_path: Path, pred: Prediction, q: Queries, name: str) -> dict[str, Any]:
    """``sample_counts.csv`` and ``.png`` (samples x classes, unknown, total, unreadable); returns
    metrics.json's ``samples``."""
    from ...report.plots import plot_sample_counts

    samples, error_samples = _samples(pred, q)
    order = list(dict.fromkeys([*samples, *error_samples]))
    unreadable: dict[str, int] = {}
    for smp in error_samples:
        unreadable[smp] = unreadable.get(smp, 0) + 1
    header, rows = sample_counts(samples, pred.decision.final, pred.classes, order, unreadable)
    write_csv(csv_path, header, rows)
    C = len(pred.classes)
    plot_sample_counts(order, pred.classes,
                       np.array([r[1:C + 2] for r in rows], dtype=np.int64).reshape(len(order), C + 1), png_path,
                       title=f"Predicted classes per sample ({name})")
    return {r[0]: {"total": r[-2], "unknown": r[-3], "unreadable": r[-1]} for r in rows}


def write_ecotaxa(output: Callable[..., Path], pred: Prediction, q: Queries, name: str,
                  taxa: TaxaMap | None) -> tuple[dict[str, Any], BundleResult]:
    """``ecotaxa_<name>.zip``, the bundle EcoTaxa imports as it is; returns metrics.json's ``ecotaxa``
    and what was written (the review page saves the reviewed rows from it).

    Every query is a row (an export's objects keep their ids; one a person validated in EcoTaxa is
    left out). Without ``taxa`` (``inference.ecotaxa_taxa``) the class names are written as they
    are, and the classes EcoTaxa may not match are logged; with it, one line per class the map
    names but the gallery lacks, and per class the map lacks.
    """
    notes = taxa.check(pred.classes) if taxa is not None else []
    for line in notes:
        log.warning("%s", line)

    def images() -> Iterator[BundleImage]:
        d = pred.decision
        for i, path in enumerate(pred.queries.paths):
            yield BundleImage(path, q.name(path), q.samples[path], pred.predicted(i),
                              {"similarity": float(d.best_sim[i]), "margin": float(d.margin[i]),
                               "knn_similarity": float(pred.knn[i])}, q.origins.get(path))

    res = write_bundle(output("predictions.csv").parent, name, images(), taxa=taxa)
    output(res.path.name)  # recorded in the manifest (the name is write_bundle's)
    if res.unmatched_classes and taxa is None:
        log.warning("%s: %d class names are written as they are; EcoTaxa must match each to exactly one taxon or "
                    "asks a person (inference.ecotaxa_taxa maps them): %s", res.path.name,
                    len(res.unmatched_classes), ", ".join(res.unmatched_classes))
    for src, why in res.skipped[:LOG_LEFT_OUT]:
        log.warning("%s: %r left out: %s", res.path.name, src, why)
    if len(res.skipped) > LOG_LEFT_OUT:
        log.warning("%s: %d more left out (every one in metrics.json, ecotaxa.left_out, and report.html)",
                    res.path.name, len(res.skipped) - LOG_LEFT_OUT)
    return _bundle_summary(res, taxa, notes), res


def _bundle_summary(res: BundleResult, taxa: TaxaMap | None, notes: list[str]) -> dict[str, Any]:
    return {"file": res.path.name, "tsv": res.tsv, "rows": res.rows, "taxa_map": taxa.source if taxa else None,
            "unmatched_classes": res.unmatched_classes, "taxa_map_notes": notes,
            "converted_to_png": [{"path": s, "name": a} for s, a in res.converted],
            "renamed": [{"path": s, "name": a, "why": w} for s, a, w in res.renamed],
            "lossy": [{"path": s, "why": w} for s, w in res.lossy],
            "left_out": [{"path": s, "reason": w} for s, w in res.skipped]}


def write_corrections(path: Path, pred: Prediction) -> Path:
    """``corrections.csv`` (path, predicted, validated empty), most doubtful first: filled in, it is
    a ``data.gallery_extra`` entry."""
    write_csv(path, ["path", "predicted", "validated"],
              [[pred.queries.paths[i], pred.label(i), ""] for i in pred.doubt])
    return path


def review_ecotaxa(bundle: BundleResult, paths: list[str], q: Queries, taxa: TaxaMap | None) -> ReviewEcotaxa:
    """The bundle's TSV rows of ``paths`` (the review page's items), read back from the zip: the page
    saves exactly what EcoTaxa got for each reviewed image. An image the bundle left out gets None
    and the bundle writer's reason (matched by its name in the input, as ``write_bundle`` lists it)."""
    from ...report.review import ReviewEcotaxa

    wanted = {p: i for i, p in enumerate(paths)}
    at = {k: wanted[p] for k, p in enumerate(bundle.sources) if p in wanted}  # TSV row -> item
    rows: list[list[str] | None] = [None] * len(paths)
    table = read_bundle_table(bundle.path, bundle.tsv)
    header, types = next(table), next(table)
    for k, cells in enumerate(table):  # one row at a time: only the items' rows are kept
        if k in at:
            rows[at[k]] = cells
    why = dict(bundle.skipped)
    left_out = {i: why.get(q.name(p), f"not in {bundle.path.name}") for i, p in enumerate(paths) if rows[i] is None}
    return ReviewEcotaxa(bundle.path.name, bundle.tsv, header, types, rows, left_out,
                         dict(taxa.taxa) if taxa is not None else None)


def write_review_page(path: Path, pred: Prediction, q: Queries, icfg: Any, name: str,
                      pixel_size_um: float | None, bundle: BundleResult | None = None,
                      taxa: TaxaMap | None = None) -> Path:
    """``review.html``: the ``inference.review_max`` most doubtful images with their neighbours;
    with ``bundle`` (``write_ecotaxa``'s), their rows of it, for the page's "Save for EcoTaxa"."""
    from ...report.review import Review, ReviewItem, doubt_note, write_review

    d = pred.decision
    shown = pred.doubt[:max(0, icfg.review_max)]
    items = [ReviewItem(pred.queries.paths[i], q.samples[pred.queries.paths[i]], pred.label(i), float(d.best_sim[i]),
                        float(d.margin[i]), float(pred.knn[i]), pred.reasons[i], pred.neighbours(i)) for i in shown]
    rule = pred.rule
    note = doubt_note(len(pred), pred.n_doubtful, len(items), icfg.review_max,
                      rule.source if rule.cut is not None else None, rule.auto_cuts.get("similarity"),
                      icfg.review_margin)
    g = pred.gallery
    write_review(path, Review(
        title=f"Review: {name}", note=note, name=name, items=items,
        rows=[(pred.queries.paths[i], pred.label(i)) for i in pred.doubt],
        classes=[pred.classes[c] for c in np.unique(g.labels)] if len(g) else list(pred.classes),
        ecotaxa=review_ecotaxa(bundle, [it.query_path for it in items], q, taxa) if bundle is not None else None,
        pixel_size_um=pixel_size_um))
    return path


def write_prediction_report(path: Path, pred: Prediction, q: Queries, icfg: Any, summary: dict[str, Any],
                            facts: list | tuple, pixel_size_um: float | None) -> Path:
    """``report.html``: the facts, counts per sample, the most doubtful queries, what was left out."""
    eco = summary["ecotaxa"]
    rep = Report(title="Plankton recognition: predictions", facts=list(facts) + [
        ("input", icfg.input),
        *((("gallery", f"{icfg.gallery} ({len(pred.gallery)} vectors)"),) if "gallery" not in {k for k, _ in facts}
          else ()),
        ("method", icfg.method),
        ("open-set rule", pred.rule.source),
        *((("open-set caution", pred.rule.warning),) if pred.rule.warning else ()),
        ("suggested reject_below (stage 05)", summary["suggested_reject_below"]),
        ("review", Path(summary["review"]).name), ("EcoTaxa bundle", f"{eco['file']} ({eco['rows']} rows)"),
        ("EcoTaxa taxa map", eco["taxa_map"] or "none (class names written as they are)")],
        metrics={k: v for k, v in summary.items() if k in ("n_images", "n_unreadable", "n_doubtful", "rejection_rate",
                                                            "n_rejected", "images_per_s", "mean_latency_ms")},
        pixel_size_um=pixel_size_um)
    png = path.parent / "sample_counts.png"
    rep.images.append(("Predicted classes per sample", png, "Stacked counts; white, hatched: unknown."))
    rep.extra_tables.append(("Counts per sample", ["sample", "total", "unknown", "unreadable"],
                             [[s, v["total"], v["unknown"], v["unreadable"]] for s, v in summary["samples"].items()]))
    d, g = pred.decision, pred.gallery
    strip = [StripItem(pred.queries.paths[i], "", pred.label(i), float(d.best_sim[i]), g.paths[int(d.nn_idx[i])],
                       pred.classes[int(g.labels[int(d.nn_idx[i])])]) for i in pred.doubt[:PREDICT_STRIP_MAX]]
    if strip:
        rep.strips_title = "Most doubtful queries beside their nearest gallery image"
        rep.strips.append(("", f"The {len(strip)} most doubtful of {len(pred)} images; every image with its five "
                               f"neighbours is in {Path(summary['review']).name}", strip))
    if q.errors:
        rep.extra_tables.append(("Unreadable files (not classified)", ["path", "reason"], [list(e) for e in q.errors]))
    _ecotaxa_tables(rep, eco)
    write_report(path, rep)
    return path


def _ecotaxa_tables(rep: Report, eco: dict[str, Any]) -> None:
    if eco["unmatched_classes"] and not eco["taxa_map"]:
        rep.notes.append(f"{eco['file']}: the class names are written as they are; EcoTaxa must match each to exactly "
                         "one taxon, or its import stops and asks a person. Classes it may not match: "
                         f"{', '.join(eco['unmatched_classes'])} (inference.ecotaxa_taxa maps classes to taxa).")
    for line in eco["taxa_map_notes"]:
        rep.notes.append(line)
    if eco["left_out"]:
        rep.extra_tables.append((f"Left out of {eco['file']} (classified: see predictions.csv)", ["path", "reason"],
                                 [[repr(x["path"]), x["reason"]] for x in eco["left_out"]]))
    changed = [[x["path"], x["name"], "converted to PNG"] for x in eco["converted_to_png"]]
    changed += [[x["path"], x["name"], x["why"]] for x in eco["renamed"]]
    if changed:
        rep.extra_tables.append((f"Files renamed or converted inside {eco['file']}", ["path", "name in the bundle",
                                                                                     "why"], changed))


def _classifiers(ctx: Context, data: StoreData) -> dict[str, Any]:
    """The classifiers saved by an up-to-date evaluation (read only), else fitted now."""
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

