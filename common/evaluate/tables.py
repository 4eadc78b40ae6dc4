"""The rows of stage 07's tables: predictions, the classification report, sample counts, unknowns,
doubt order."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..store.containers import Vectors
from . import metrics as evaluate_metrics
from .metrics import classification_metrics, per_class

if TYPE_CHECKING:
    from .decide import Decision


# ----------------------------------------------------------------------------- outputs


def _label(classes: Sequence[str], i: int) -> str:
    return evaluate_metrics.UNKNOWN_NAME if i == evaluate_metrics.UNKNOWN else classes[i]


def prediction_rows(queries: Vectors, d: Decision, classes: Sequence[str], gallery: Vectors,
                    extra_preds: dict[str, np.ndarray], with_truth: bool,
                    errors: Sequence[tuple[str, str]] = (), scores: dict[str, np.ndarray] | None = None,
                    lead: dict[str, Sequence[Any]] | None = None, tail: dict[str, Sequence[Any]] | None = None
                    ) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of ``predictions.csv`` (unreadable images last, with their reason).

    ``scores``: float columns after ``similarity`` (``margin``, ``knn_similarity``); ``lead``:
    columns before ``path`` (``sample``), one value per query then one per error; ``tail``:
    columns after ``accepted`` (the nearest gallery images), one value per query.
    """
    k = d.candidates.shape[1]
    scores, lead, tail = scores or {}, lead or {}, tail or {}
    header = [*lead, "path"] + (["true_label"] if with_truth else []) + ["predicted_label", "similarity", *scores]
    for j in range(1, k + 1):
        header += [f"top{j}_label", f"top{j}_similarity"]
    header += ["nearest_gallery_path", "accepted", *tail] + [f"pred_{n}" for n in extra_preds] + ["error"]
    rows: list[list[Any]] = []
    for q in range(len(queries)):
        row: list[Any] = [v[q] for v in lead.values()] + [queries.paths[q]]
        if with_truth:
            row.append(_label(classes, int(queries.labels[q])))
        row += [_label(classes, int(d.final[q])), f"{d.best_sim[q]:.6f}"]
        row += [f"{v[q]:.6f}" if np.isfinite(v[q]) else "" for v in scores.values()]
        for j in range(k):
            c = int(d.candidates[q, j])
            row += ["", ""] if c < 0 else [classes[c], f"{d.cand_sims[q, j]:.6f}"]
        row += [gallery.paths[int(d.nn_idx[q])], int(d.accepted[q])] + [v[q] for v in tail.values()]
        row += [_label(classes, int(p[q])) for p in extra_preds.values()]
        row.append("")
        rows.append(row)
    n = len(queries)
    for e, (path, reason) in enumerate(errors):
        rows.append([v[n + e] for v in lead.values()] + [path] + ([""] if with_truth else []) + ["", ""]
                    + [""] * len(scores) + ["", ""] * k + ["", 0] + [""] * len(tail) + [""] * len(extra_preds)
                    + [reason])
    return header, rows


def class_report_rows(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str],
                      gallery_counts: np.ndarray) -> tuple[list[str], list[list[Any]]]:
    """``classification_report.csv``: every class (blank ratios where a class is neither true nor
    predicted), then the macro and weighted averages as scikit-learn's report gives them."""
    C = len(classes)
    pc = per_class(y_true, y_pred, C)
    header = ["class", "precision", "recall", "f1", "support", "predicted", "gallery_items"]
    rows: list[list[Any]] = []
    for c in range(C):
        ratios = ([f"{pc['precision'][c]:.6f}", f"{pc['recall'][c]:.6f}", f"{pc['f1'][c]:.6f}"]
                  if pc["present"][c] else ["", "", ""])
        rows.append([classes[c], *ratios, int(pc["support"][c]), int(pc["predicted"][c]), int(gallery_counts[c])])
    m = classification_metrics(y_true, y_pred, C)
    n = int(pc["support"].sum())
    for avg in ("macro", "weighted"):
        if f"{avg}_f1" in m:
            rows.append([f"{avg} avg", f"{m[f'{avg}_precision']:.6f}", f"{m[f'{avg}_recall']:.6f}",
                         f"{m[f'{avg}_f1']:.6f}", n, "", ""])
    n_unknown = int((np.asarray(y_pred) == evaluate_metrics.UNKNOWN).sum())
    if n_unknown:
        rows.append([f"{evaluate_metrics.UNKNOWN_NAME} (rejected)", "", "", "", "", n_unknown, ""])
    return header, rows


def _round(d: dict[str, Any], nd: int = 6) -> dict[str, Any]:
    def r(v: Any) -> Any:  # floats, and the floats of a list (the [low, high] of an interval)
        if isinstance(v, float):
            return round(v, nd)
        return [r(x) for x in v] if isinstance(v, list) else v
    return {k: r(v) for k, v in d.items()}


def unknown_table(u: dict[str, Any]) -> tuple[str, list[str], list[list[Any]]]:
    """The report's table of ``metrics.json``'s ``unknown_classes``: one row per open-set score."""
    title = (f"Unknown classes: {', '.join(u['classes'])} left out of the gallery ({u['n_unknown']} test images "
             f"as unknowns, {u['n_known']} known; closed-set accuracy on the known {u['closed_set_known_accuracy']:.4f})")
    header = ["score", "AUROC", "FPR at 95% TPR", "val cut", "known accuracy at the cut",
              "accepted known accuracy", "unknowns rejected"]
    names = {"similarity": "best similarity", "knn": f"{u['ood_k']}-th neighbour similarity (Sun et al. 2022)"}
    rows = [[names.get(k, k), v["auroc"], v["fpr_at_95_tpr"], v["cut"], v["known_accuracy"],
             v["known_accepted_accuracy"], v["unknown_rejected"]] for k, v in u["scores"].items()]
    return title, header, rows


def sample_counts(samples: Sequence[str], final: np.ndarray, classes: Sequence[str],
                  order: Sequence[str] | None = None, unreadable: dict[str, int] | None = None
                  ) -> tuple[list[str], list[list[Any]]]:
    """``sample_counts.csv``: one row per sample, one column per class, then ``unknown``,
    ``total`` (classified images) and ``unreadable`` (files not classified)."""
    from .metrics import UNKNOWN, UNKNOWN_NAME

    C = len(classes)
    order = list(order) if order is not None else list(dict.fromkeys(samples))
    index = {s: i for i, s in enumerate(order)}
    counts = np.zeros((len(order), C + 1), dtype=np.int64)
    for s, f in zip(samples, np.asarray(final, dtype=np.int64)):
        counts[index[s], C if f == UNKNOWN else f] += 1
    unreadable = unreadable or {}
    header = ["sample", *classes, UNKNOWN_NAME, "total", "unreadable"]
    rows = [[s, *counts[i].tolist(), int(counts[i].sum()), int(unreadable.get(s, 0))] for i, s in enumerate(order)]
    return header, rows


def doubt_order(final: np.ndarray, best_sim: np.ndarray, margin: np.ndarray, low_similarity: float | None,
                small_margin: float) -> tuple[np.ndarray, list[list[str]]]:
    """Queries ordered most doubtful first, and each query's reasons for doubt.

    Reasons: ``unknown`` (rejected), ``low similarity`` (best similarity below ``low_similarity``,
    the val cut), ``small margin`` (the two best classes closer than ``small_margin``). Order:
    unknown first, then more reasons first, then lower similarity.
    """
    from .metrics import UNKNOWN

    n = len(final)
    reasons: list[list[str]] = []
    for q in range(n):
        r = []
        if final[q] == UNKNOWN:
            r.append("unknown")
        if low_similarity is not None and best_sim[q] < low_similarity:
            r.append("low similarity")
        if np.isfinite(margin[q]) and margin[q] < small_margin:
            r.append("small margin")
        reasons.append(r)
    key_unknown = np.array([0 if "unknown" in r else 1 for r in reasons])
    key_n = np.array([-len(r) for r in reasons])
    order = np.lexsort((np.arange(n), np.asarray(best_sim, np.float64), key_n, key_unknown)) if n else np.zeros(0, int)
    return order.astype(np.int64), reasons
