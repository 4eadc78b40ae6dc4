"""Predict mode's decisions for new images: classes, doubts, neighbours and counts; writes nothing."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..fileio import write_csv, write_json
from ..report.html import Report, StripItem, write_report
from ..retrieval.search import ClassSearch
from ..store.containers import Vectors
from . import metrics as evaluate_metrics
from .decide import classify, decide, reject
from .metrics import rejection_metrics
from .openset import _rejection_facts, open_scores, rejection_rule
from .pages import PREDICT_STRIP_MAX
from .tables import _label, _round, prediction_rows

if TYPE_CHECKING:
    from .evaluation import Output

log = logging.getLogger(__name__)

REVIEW_NEIGHBOURS = 5  # predict mode: nearest gallery images listed per query (predictions.csv, review.html)


# ----------------------------------------------------------------------------- predict


def predict(queries: Vectors, gallery: Vectors, classes: list[str], icfg: Any, output: Output, *,
            samples: Sequence[str] | None = None, name: str = "input", root: Path | None = None,
            val: Vectors | None = None, classifiers: dict[str, Any] | None = None,
            errors: Sequence[tuple[str, str]] = (), error_samples: Sequence[str] | None = None,
            timing: dict[str, float] | None = None, facts: Sequence[tuple[str, Any]] = (),
            suggested_reject_below: float | None = None, device: Any = None, index: Any = None,
            pixel_size_um: float | None = None) -> dict[str, Any]:
    """Predict mode on embedded query vectors (labels unused), grouped into ``samples``.

    Writes ``predictions.csv`` (per image: sample, prediction or unknown, best similarity, margin,
    k-th neighbour similarity, top-k classes, the ``REVIEW_NEIGHBOURS`` nearest gallery images),
    ``sample_counts.csv`` and ``sample_counts.png``, ``ecotaxa_<name>.tsv``, ``review.html``,
    ``corrections.csv``, ``metrics.json`` and ``report.html``. ``val``: the val vectors the
    open-set cuts are chosen on (``inference.reject_below=auto``; the "low similarity" of review).
    ``index``: a ``common.search.AnnIndex`` over the gallery's rows (None: exact search); the
    open-set scores and the review's neighbours come from exact search. ``pixel_size_um``: the
    camera's pixel size (review.html and the report give image sizes in micrometres too).
    """
    from ..ecotaxa.bundle import ecotaxa_rows, ecotaxa_stem, write_tsv
    from ..report.plots import plot_sample_counts
    from ..report.review import Review, ReviewItem, doubt_note, write_review
    from .tables import doubt_order, sample_counts

    C = len(classes)
    n = len(queries)
    samples = list(samples) if samples is not None else [name] * n
    error_samples = list(error_samples) if error_samples is not None else [name] * len(errors)
    timing = dict(timing or {})
    rule = rejection_rule(icfg, val, gallery, C, device)
    if n:
        d = classify(queries.X, gallery, C, method=icfg.method, top_k=icfg.top_k, k=icfg.k,
                     temperature=icfg.temperature, reject_below=None, block_size=icfg.block_size, device=device,
                     index=index)
        t0 = time.perf_counter()
        scores, nb_sims, nb_idx = open_scores(queries.X, d, gallery, icfg, device, neighbours=REVIEW_NEIGHBOURS)
        reject(d, scores, rule)
        d.seconds += time.perf_counter() - t0
    else:
        d = decide(ClassSearch(np.zeros((0, C), np.float32), np.zeros((0, C), np.int64)), icfg.top_k, None)
        scores = {"similarity": d.best_sim, "knn": np.zeros(0, np.float32)}
        nb_sims, nb_idx = np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
    timing["search_s"] = d.seconds
    extra: dict[str, np.ndarray] = {}
    for cname, f in (classifiers or {}).items():
        t0 = time.perf_counter()
        extra[cname] = f.predict(queries.X)[0] if n else np.zeros(0, np.int64)
        timing[f"{cname}_s"] = time.perf_counter() - t0
    out: dict[str, Any] = {"mode": "predict", "name": name, "gallery": icfg.gallery, "gallery_size": len(gallery),
                           "gallery_classes": int(np.unique(gallery.labels).size), "method": icfg.method,
                           "n_images": n, "n_unreadable": len(errors), "reject_below": icfg.reject_below,
                           "suggested_reject_below": suggested_reject_below, **_rejection_facts(rule)}
    if n:
        out.update(rejection_metrics(None, d.raw, d.accepted))
    counts = np.bincount(d.final[d.final >= 0], minlength=C)
    out["predicted_counts"] = {classes[c]: int(counts[c]) for c in np.flatnonzero(counts)}
    total = sum(v for k, v in timing.items() if k in ("decode_embed_s", "search_s"))
    out["timing_scope"] = "decode+embed+search"
    out["images_per_s"] = n / total if total > 0 and n else float("nan")
    out["mean_latency_ms"] = 1000.0 * total / n if n else float("nan")
    out["timing_s"] = _round(timing, 4)

    # ---- per image
    kn = nb_idx.shape[1] if n else 0
    tail: dict[str, list[Any]] = {}
    for j in range(REVIEW_NEIGHBOURS):
        tail[f"neighbour{j + 1}_path"] = [gallery.paths[int(nb_idx[q, j])] if j < kn else "" for q in range(n)]
        tail[f"neighbour{j + 1}_label"] = [classes[int(gallery.labels[int(nb_idx[q, j])])] if j < kn else ""
                                           for q in range(n)]
        tail[f"neighbour{j + 1}_similarity"] = [f"{nb_sims[q, j]:.6f}" if j < kn else "" for q in range(n)]
    header, rows = prediction_rows(queries, d, classes, gallery, extra, with_truth=False, errors=errors,
                                   scores={"margin": d.margin, "knn_similarity": scores["knn"]},
                                   lead={"sample": [*samples, *error_samples]}, tail=tail)
    write_csv(output("predictions.csv"), header, rows)

    # ---- per sample
    order = list(dict.fromkeys([*samples, *error_samples]))
    unreadable: dict[str, int] = {}
    for smp in error_samples:
        unreadable[smp] = unreadable.get(smp, 0) + 1
    h_counts, r_counts = sample_counts(samples, d.final, classes, order, unreadable)
    write_csv(output("sample_counts.csv"), h_counts, r_counts)
    counts_png = output("sample_counts.png")
    plot_sample_counts(order, classes, np.array([r[1:C + 2] for r in r_counts], dtype=np.int64).reshape(len(order), C + 1),
                       counts_png, title=f"Predicted classes per sample ({name})")
    out["samples"] = {r[0]: {"total": r[-2], "unknown": r[-3], "unreadable": r[-1]} for r in r_counts}

    # ---- EcoTaxa
    predicted = [None if d.final[q] == evaluate_metrics.UNKNOWN else classes[int(d.final[q])] for q in range(n)]
    base = Path(root) if root is not None else (Path(os.path.commonpath([str(Path(p).parent) for p in queries.paths]))
                                                 if n else Path("."))
    eco, eco_left_out = ecotaxa_rows(queries.paths, samples, predicted, base,
                                       {"similarity": d.best_sim, "margin": d.margin, "knn_similarity": scores["knn"]})
    eco_path = output(f"{ecotaxa_stem(name)}.tsv")
    write_tsv(eco_path, eco)
    out["ecotaxa"] = {"file": eco_path.name, "img_file_name_relative_to": str(base), "rows": len(eco) - 2,
                      "left_out": [{"path": p, "reason": why} for p, why in eco_left_out]}
    for p, why in eco_left_out:  # !r: the name's control characters stay visible on one log line
        log.warning("%s: %r left out: %s", eco_path.name, p, why)

    # ---- review, most doubtful first, and the corrections sheet
    low = rule.auto_cuts.get("similarity")
    order_q, reasons = doubt_order(d.final, d.best_sim, d.margin, low, icfg.review_margin)
    out["n_doubtful"] = int(sum(1 for r in reasons if r))
    sheet = [(queries.paths[q], _label(classes, int(d.final[q]))) for q in order_q]
    write_csv(output("corrections.csv"), ["path", "predicted", "validated"], [[p, c, ""] for p, c in sheet])
    shown = order_q[:max(0, icfg.review_max)]
    items = [ReviewItem(queries.paths[q], samples[q], _label(classes, int(d.final[q])), float(d.best_sim[q]),
                           float(d.margin[q]), float(scores["knn"][q]), reasons[q],
                           [(gallery.paths[int(nb_idx[q, j])], classes[int(gallery.labels[int(nb_idx[q, j])])],
                             float(nb_sims[q, j])) for j in range(min(REVIEW_NEIGHBOURS, kn))]) for q in shown]
    note = doubt_note(n, out["n_doubtful"], len(items), icfg.review_max,
                         rule.source if rule.cut is not None else None, low, icfg.review_margin)
    review_path = output("review.html")
    write_review(review_path, Review(
        title=f"Review: {name}", note=note, name=name, items=items, rows=sheet,
        classes=[classes[c] for c in np.unique(gallery.labels)] if len(gallery) else list(classes),
        ecotaxa=(eco_path.name, [eco[0], eco[1], *(eco[2 + q] for q in order_q)]), pixel_size_um=pixel_size_um))
    out["review"] = str(review_path)

    # ---- summary and report
    report_path = output("report.html")
    out["report"] = str(report_path)
    write_json(output("metrics.json"), _round(out))
    rep = Report(title="Plankton recognition: predictions", facts=list(facts) + [
        ("input", icfg.input),
        *((("gallery", f"{icfg.gallery} ({len(gallery)} vectors)"),) if "gallery" not in {k for k, _ in facts} else ()),
        ("method", icfg.method),
        ("open-set rule", rule.source), *((("open-set caution", rule.warning),) if rule.warning else ()),
        ("suggested reject_below (stage 05)", suggested_reject_below),
        ("review", review_path.name), ("EcoTaxa table", eco_path.name)],
        metrics={k: v for k, v in out.items() if k in ("n_images", "n_unreadable", "n_doubtful", "rejection_rate",
                                                        "n_rejected", "images_per_s", "mean_latency_ms")},
        pixel_size_um=pixel_size_um)
    rep.images.append(("Predicted classes per sample", counts_png, "Stacked counts; white, hatched: unknown."))
    rep.extra_tables.append(("Counts per sample", h_counts, r_counts))
    strip = [StripItem(queries.paths[q], "", _label(classes, int(d.final[q])), float(d.best_sim[q]),
                         gallery.paths[int(d.nn_idx[q])], classes[int(gallery.labels[int(d.nn_idx[q])])])
             for q in order_q[:PREDICT_STRIP_MAX]]
    if strip:
        rep.strips_title = "Most doubtful queries beside their nearest gallery image"
        rep.strips.append(("", f"The {len(strip)} most doubtful of {n} images; every image with its five neighbours "
                               f"is in {review_path.name}", strip))
    if errors:
        rep.extra_tables.append(("Unreadable files (not classified)", ["path", "reason"], [list(e) for e in errors]))
    if eco_left_out:
        rep.extra_tables.append((f"Left out of {eco_path.name} (classified: see predictions.csv)", ["path", "reason"],
                                 [[repr(p), why] for p, why in eco_left_out]))
    write_report(report_path, rep)
    log.info("predicted %d image%s in %d sample%s (%d unreadable, %d rejected, %d doubtful); predictions in %s", n,
             "" if n == 1 else "s", len(order), "" if len(order) == 1 else "s", len(errors), out.get("n_rejected", 0),
             out["n_doubtful"], output("predictions.csv"))
    log.info("review: %s; EcoTaxa table: %s", review_path, eco_path)
    return out
