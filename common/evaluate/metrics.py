"""Classification, open-set and retrieval metrics for stage 07 (and the classical classifiers).

Labels are integer class indices ``0..C-1``; ``-1`` (``UNKNOWN``) marks a query rejected as
"unknown" by the open-set threshold. Everything is computed from one confusion matrix with numpy
(fast on 7,000 x 87) and is tested equal to scikit-learn on the same predictions:

- ``accuracy``: rejected queries count as errors (sklearn ``accuracy_score`` with -1 as a label).
- macro / weighted precision, recall, F1: sklearn's ``precision_recall_fscore_support`` with
  ``labels`` = the classes that occur in ``y_true`` or ``y_pred`` (sklearn's default label set),
  ``-1`` left out of that set (a rejected query is a false negative of its true class, never a
  column of its own), ``zero_division=0``. Macro F1 is the mean of the per-class F1 values.
- ``balanced_accuracy``: sklearn's ``balanced_accuracy_score``: mean recall over the classes with
  at least one true query.
- ``top5_accuracy``: true label among the first ``k`` candidates of each query.
- retrieval ``precision_at_1`` and ``map_at_r`` follow pytorch-metric-learning's
  ``AccuracyCalculator`` (Musgrave et al. 2020, "A Metric Learning Reality Check"):
  R = number of gallery items of the query's class, MAP@R = mean over queries of
  (1/R) * sum_{i<=R} P(i) * rel(i); queries whose class has no gallery item ("lone" queries)
  are left out of both, as in PML.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


UNKNOWN = -1  # label index of a rejected ("unknown") query
UNKNOWN_NAME = "unknown"  # how a rejected query is written in predictions.csv
MAP_AT_R_CELLS = 1 << 24  # neighbour-list cells (queries x R) per MAP@R search block (~200 MB)


def _as_int(a: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion counts ``(C, C + 1)``: rows true class, columns predicted class, last column unknown."""
    y_true = _as_int(y_true, "y_true")
    y_pred = _as_int(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.shape[0]} vs {y_pred.shape[0]}")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= n_classes):
        raise ValueError(f"y_true holds labels outside 0..{n_classes - 1}")
    if y_pred.size and (y_pred.min() < UNKNOWN or y_pred.max() >= n_classes):
        raise ValueError(f"y_pred holds labels outside -1..{n_classes - 1}")
    col = np.where(y_pred == UNKNOWN, n_classes, y_pred)
    cm = np.bincount(y_true * (n_classes + 1) + col, minlength=n_classes * (n_classes + 1))
    return cm.reshape(n_classes, n_classes + 1)


def per_class(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Per-class arrays (length C): precision, recall, f1, support, predicted, present.

    ``present`` marks the classes in sklearn's default label set (in y_true or y_pred).
    Undefined ratios (0/0) are 0, as sklearn's ``zero_division=0``.
    """
    cm = confusion(y_true, y_pred, n_classes)
    tp = np.diag(cm[:, :n_classes]).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)  # true queries per class (rejected ones included)
    predicted = cm[:, :n_classes].sum(axis=0).astype(np.float64)  # queries predicted as the class
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        # sklearn >= 1.3 computes F1 as 2tp / (2tp + fp + fn), 0 when that denominator is 0
        denom = support + predicted  # = 2tp + fp + fn
        f1 = np.where(denom > 0, 2.0 * tp / denom, 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64),
            "predicted": predicted.astype(np.int64), "present": (support > 0) | (predicted > 0)}


def topk_accuracy(y_true: np.ndarray, candidates: np.ndarray) -> float:
    """Share of queries whose true label is among their candidate labels ``(N, k)`` (-1 = padding)."""
    y_true = _as_int(y_true, "y_true")
    cand = np.asarray(candidates)
    if cand.ndim != 2 or cand.shape[0] != y_true.shape[0]:
        raise ValueError(f"candidates must be (N, k) with N = {y_true.shape[0]}, got {cand.shape}")
    if y_true.size == 0:
        return float("nan")
    return float((cand == y_true[:, None]).any(axis=1).mean())


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int,
                           candidates: np.ndarray | None = None, top_k: int = 5) -> dict[str, Any]:
    """Headline metrics of one set of predictions (see the module docstring for definitions).

    ``candidates`` ``(N, >= top_k)``: ranked candidate labels per query, for ``top{k}_accuracy``.
    """
    y_true = _as_int(y_true, "y_true")
    y_pred = _as_int(y_pred, "y_pred")
    n = int(y_true.shape[0])
    out: dict[str, Any] = {"n_queries": n}
    if n == 0:
        return out
    pc = per_class(y_true, y_pred, n_classes)
    present = pc["present"]
    sup = pc["support"].astype(np.float64)
    out["accuracy"] = float((y_true == y_pred).mean())
    if candidates is not None:
        out[f"top{top_k}_accuracy"] = topk_accuracy(y_true, np.asarray(candidates)[:, :top_k])
    for name in ("precision", "recall", "f1"):
        v = pc[name]
        out[f"macro_{name}"] = float(v[present].mean()) if present.any() else 0.0
        out[f"weighted_{name}"] = float((v * sup).sum() / sup.sum()) if sup.sum() > 0 else 0.0
    has_true = pc["support"] > 0
    out["balanced_accuracy"] = float(pc["recall"][has_true].mean())
    out["n_classes_in_test"] = int(has_true.sum())
    return out


def rejection_metrics(y_true: np.ndarray | None, raw_pred: np.ndarray, accepted: np.ndarray) -> dict[str, Any]:
    """Open-set figures: rejection rate, and (with labels) accuracy on the accepted queries.

    ``raw_pred`` are the predictions before rejection; ``accepted`` is a boolean mask.
    """
    accepted = np.asarray(accepted, dtype=bool)
    n = accepted.size
    out: dict[str, Any] = {"rejection_rate": float(1.0 - accepted.mean()) if n else float("nan"),
                           "n_rejected": int(n - accepted.sum())}
    if y_true is not None and n:
        y_true = _as_int(y_true, "y_true")
        raw_pred = _as_int(raw_pred, "raw_pred")
        correct = y_true == raw_pred
        out["accepted_accuracy"] = float(correct[accepted].mean()) if accepted.any() else float("nan")
        # how many of the rejected queries the classifier would have got wrong: the rejection's precision
        out["rejected_error_rate"] = float((~correct[~accepted]).mean()) if (~accepted).any() else float("nan")
    return out


# ----------------------------------------------------------------------------- retrieval metrics


def map_at_r_from_neighbours(neighbour_labels: np.ndarray, query_labels: np.ndarray,
                             r: np.ndarray) -> np.ndarray:
    """AP@R per query from its ranked neighbour labels ``(Q, >= max R)`` (PML's definition).

    AP@R = (1/R) * sum_{i<=R} P(i) * rel(i), P(i) = precision among the first i neighbours,
    rel(i) = 1 when neighbour i has the query's label. Queries with R = 0 give NaN.
    """
    nl = np.asarray(neighbour_labels)
    q = _as_int(query_labels, "query_labels")
    r = _as_int(r, "r")
    if nl.ndim != 2 or nl.shape[0] != q.shape[0]:
        raise ValueError(f"neighbour_labels must be (Q, k) with Q = {q.shape[0]}, got {nl.shape}")
    width = nl.shape[1]
    if r.size and r.max() > width:
        raise ValueError(f"neighbour lists hold {width} items but R reaches {int(r.max())}")
    ranks = np.arange(1, width + 1)
    mask = ranks[None, :] <= r[:, None]  # only the first R positions count
    rel = (nl == q[:, None]) & mask
    prec = np.cumsum(rel, axis=1) / ranks[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r > 0, (prec * rel).sum(axis=1) / r, np.nan)


TopkFn = Callable[..., tuple[Any, Any]]


def _map_at_r_streamed(queries: Any, q_lab: np.ndarray, g_lab: np.ndarray, r: np.ndarray, not_lone: np.ndarray,
                       gallery: Any, topk_fn: TopkFn, block_size: int, device: Any, ap: np.ndarray,
                       p1: np.ndarray) -> None:
    """MAP@R and precision@1 against a gallery streamed from the store, into ``ap`` and ``p1``.

    One class at a time would read the store once per class; instead every query is searched for
    the largest R (``R_max``) at once, in as few passes as ``MAP_AT_R_CELLS`` allows, and scored on
    the first R of its list: the top-R of a (similarity, row)-ordered top-R_max list are the top R.
    """
    rows = np.flatnonzero(not_lone)
    if not rows.size:
        return
    r_max = int(r[rows].max())
    step = max(1, MAP_AT_R_CELLS // r_max)
    for s in range(0, rows.size, step):
        sel = rows[s:s + step]
        _, idx = topk_fn(queries[sel], gallery, r_max, block_size=block_size, device=device)
        nl = g_lab[np.asarray(idx)]
        ap[sel] = map_at_r_from_neighbours(nl, q_lab[sel], r[sel])
        p1[sel] = (nl[:, 0] == q_lab[sel]).astype(np.float64)


def retrieval_metrics(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                      gallery_labels: np.ndarray, topk_fn: TopkFn, block_size: int = 4096,
                      device: Any = None) -> dict[str, Any]:
    """Precision@1 and MAP@R of ``queries`` against ``gallery`` (exact search via ``topk_fn``).

    ``topk_fn`` is ``common.retrieval.topk``. The queries of one class are searched together for
    their class's R neighbours (in blocks of at most ``MAP_AT_R_CELLS`` cells), so memory stays
    bounded even for R in the thousands.
    """
    q_lab = _as_int(query_labels, "query_labels")
    g_lab = _as_int(gallery_labels, "gallery_labels")
    n_classes = int(max(q_lab.max(initial=-1), g_lab.max(initial=-1)) + 1)
    r_per_class = np.bincount(g_lab, minlength=n_classes)
    r = r_per_class[q_lab] if q_lab.size else np.zeros(0, dtype=np.int64)
    not_lone = r > 0
    ap = np.full(q_lab.shape[0], np.nan)
    p1 = np.full(q_lab.shape[0], np.nan)
    if hasattr(gallery, "blocks"):  # a common.streaming.StoreMatrix: few passes over the store
        _map_at_r_streamed(queries, q_lab, g_lab, r, not_lone, gallery, topk_fn, block_size, device, ap, p1)
    else:
        for c in np.unique(q_lab[not_lone]):
            rows = np.flatnonzero(q_lab == c)
            rc = int(r_per_class[c])
            step = max(1, MAP_AT_R_CELLS // max(rc, 1))
            for s in range(0, rows.size, step):
                sel = rows[s:s + step]
                _, idx = topk_fn(queries[sel], gallery, rc, block_size=block_size, device=device)
                nl = g_lab[np.asarray(idx)]
                ap[sel] = map_at_r_from_neighbours(nl, q_lab[sel], np.full(sel.size, rc))
                p1[sel] = (nl[:, 0] == c).astype(np.float64)
    n_lone = int((~not_lone).sum())
    if n_lone:
        log.info("%d test queries belong to classes with no gallery item: left out of precision@1 and MAP@R "
                 "(as pytorch-metric-learning does)", n_lone)
    return {"precision_at_1": float(np.nanmean(p1)) if not_lone.any() else float("nan"),
            "map_at_r": float(np.nanmean(ap)) if not_lone.any() else float("nan"),
            "n_lone_queries": n_lone}
