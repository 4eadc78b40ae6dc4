"""What stage 07's report pages say, from the results (rendered by common.report.html)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..report.html import STRIP_MAX, Report, StripItem, write_report
from ..store.containers import Vectors
from .metrics import per_class, with_ci
from .tables import _label, unknown_table

if TYPE_CHECKING:
    from .decide import Decision
    from .evaluation import EvalInputs


PREDICT_STRIP_MAX = 48  # predict mode report: queries shown beside their nearest gallery image


def _worst_strips(test: Vectors, d: Decision, classes: Sequence[str], gallery: Vectors,
                  n_worst: int) -> list[tuple[str, str, list[StripItem]]]:
    C = len(classes)
    pc = per_class(test.labels, d.final, C)
    has = np.flatnonzero(pc["support"] > 0)
    order = has[np.lexsort((-pc["support"][has], pc["f1"][has]))]  # lowest F1, then the larger class
    strips = []
    for c in order[:max(0, n_worst)]:
        wrong = np.flatnonzero((test.labels == c) & (d.final != c))
        if wrong.size == 0:
            continue
        items = []
        for q in wrong[:STRIP_MAX]:
            g = int(d.nn_idx[q])
            items.append(StripItem(test.paths[q], classes[c], _label(classes, int(d.final[q])),
                                     float(d.best_sim[q]), gallery.paths[g], classes[int(gallery.labels[g])]))
        note = (f"F1 {pc['f1'][c]:.3f}, recall {pc['recall'][c]:.3f}, {int(pc['support'][c])} test images, "
                f"{wrong.size} misclassified (showing {len(items)})")
        strips.append((classes[c], note, items))
    return strips


def _headline(m: dict[str, Any], top_k: int) -> dict[str, Any]:
    """The report's metrics table: each figure with its 95 % interval, the chance and
    majority-class levels beside accuracy and top-k, top-k marked when k >= half the classes."""
    tk = f"top{top_k}_accuracy"
    out: dict[str, Any] = {}
    for k in ("n_queries", "accuracy", "chance_accuracy", "majority_class_accuracy", tk, f"chance_{tk}",
              "macro_precision", "macro_recall", "macro_f1", "weighted_f1", "balanced_accuracy", "precision_at_1",
              "map_at_r", "rejection_rate", "accepted_accuracy", "gallery_size", "images_per_s", "mean_latency_ms"):
        if k not in m:
            continue
        name = {"chance_accuracy": "chance level (uniform guess)",
                "majority_class_accuracy": "majority-class accuracy (always the largest test class)",
                f"chance_{tk}": f"chance level of top-{top_k}"}.get(k, k)
        v = with_ci(m[k], m[f"{k}_ci95"]) if f"{k}_ci95" in m else m[k]
        if k == tk and m.get(f"top{top_k}_uninformative"):
            v = f"{v} (k = {top_k} is at least half the classes: says little)"
        out[name] = v
    if any(k.endswith("_ci95") for k in m):
        out["95% intervals"] = "[low, high]: Wilson for proportions, bootstrap (fixed seed) for averages and MAP@R"
    return out


def _evaluate_report(path: Path, inp: EvalInputs, icfg: Any, m: dict, d: Decision, comp_header, comp_rows,
                     cm_png: Path, map_png: Path | None, class_header, class_rows) -> None:
    headline = _headline(m, icfg.top_k)
    said = {k for k, _ in inp.facts}  # stage 07's loader already describes the gallery
    rep = Report(title="Plankton recognition: test-set evaluation", facts=list(inp.facts) + [
        *((("gallery", f"{icfg.gallery} ({len(inp.gallery)} vectors)"),) if "gallery" not in said else ()),
        ("method", icfg.method),
        ("reject_below", icfg.reject_below), ("open-set rule", m.get("reject_rule")),
        *((("open-set caution", m["reject_warning"]),) if m.get("reject_warning") else ()),
        ("suggested reject_below (stage 05)", inp.suggested_reject_below)],
        metrics=headline, pixel_size_um=inp.pixel_size_um)
    if m.get("unknown_classes"):
        rep.extra_tables.append(unknown_table(m["unknown_classes"]))
    rep.notes.append("Accuracy counts rejected (unknown) queries as errors. Macro averages run over the classes "
                     "present in the test labels or the predictions. Precision@1 and MAP@R follow "
                     "pytorch-metric-learning (R = gallery items of the query's class).")
    if comp_rows:
        rep.comparison = (comp_header, [[r[0], r[1], r[2], r[3], r[4], r[5], int(r[6])] for r in comp_rows])
        rep.comparison_note = ("Every method on the test split, without open-set rejection. The classifiers are fitted "
                               "on the train vectors (the linear head's epoch chosen on validation); retrieval's "
                               "model size is the gallery's vectors and labels, a classifier's its saved file.")
    rep.images.append(("Confusion matrix", cm_png, "Rows: true class, normalised to 1; columns: predicted class."))
    if inp.sweep_png is not None:
        rep.images.append(("LUT threshold sweep (stage 05)", inp.sweep_png, ""))
    if map_png is not None:
        rep.images.append(("Map of the test embeddings", map_png, "Colour: true class."))
    worst_first = sorted(class_rows[:len(inp.classes)], key=lambda r: (r[3] == "", float(r[3] or 0)))
    rep.per_class = (class_header, [[r[0], *(float(x) if x != "" else float("nan") for x in r[1:4]), *r[4:]]
                                    for r in worst_first])
    rep.strips = _worst_strips(inp.test, d, inp.classes, inp.gallery, icfg.worst_classes)
    write_report(path, rep)
