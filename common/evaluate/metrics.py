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

Uncertainty (``uncertainty``, ``wilson``, ``bootstrap_*``): every headline figure gets a 95 %
interval. Proportions (accuracy, top-k, precision@1, rejection rate, accepted accuracy) take the
Wilson score interval (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it for small n, where the
normal interval overshoots [0, 1]); macro / weighted averages, balanced accuracy and MAP@R take a
percentile bootstrap over the queries with a fixed seed. Resampling N queries with replacement
draws the cells of the confusion matrix (or the distinct AP values) from a multinomial, so the
bootstrap draws cell counts, not queries: its work is ``BOOT_SAMPLES`` x non-empty cells, bounded
whatever N is. Beside them, the levels a classifier must beat: chance (a uniform guess among the
C classes: 1/C, top-k k/C) and majority-class accuracy (always the most frequent test class).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


UNKNOWN = -1  # label index of a rejected ("unknown") query
UNKNOWN_NAME = "unknown"  # how a rejected query is written in predictions.csv
MAP_AT_R_CELLS = 1 << 24  # neighbour-list cells (queries x R) per MAP@R search block (~200 MB)
CI_LEVEL = 0.95  # the confidence level of every interval
Z_95 = 1.959963984540054  # standard normal quantile at 1 - (1 - CI_LEVEL) / 2
BOOT_SAMPLES = 1000  # bootstrap resamples of the macro averages and MAP@R
BOOT_MIN_SAMPLES = 200  # fewest resamples when the work bound below lowers their number
BOOT_WORK = 50_000_000  # most multinomial cells drawn per bootstrap (resamples x non-empty cells)
BOOT_CHUNK_CELLS = 4_000_000  # cells per drawn block (memory: ~32 MB of int64)
BOOT_SEED = 0  # the bootstrap's fixed seed: the same predictions give the same interval


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
    out["rejection_rate_ci95"] = list(wilson(int(n - accepted.sum()), n))
    if y_true is not None and n:
        y_true = _as_int(y_true, "y_true")
        raw_pred = _as_int(raw_pred, "raw_pred")
        correct = y_true == raw_pred
        out["accepted_accuracy"] = float(correct[accepted].mean()) if accepted.any() else float("nan")
        out["accepted_accuracy_ci95"] = list(wilson(int(correct[accepted].sum()), int(accepted.sum())))
        # how many of the rejected queries the classifier would have got wrong: the rejection's precision
        out["rejected_error_rate"] = float((~correct[~accepted]).mean()) if (~accepted).any() else float("nan")
    return out


# ----------------------------------------------------------------------------- uncertainty


def wilson(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (nan, nan for n = 0)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..{n}, got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at p = 0 or 1 the bound is exactly 0 or 1 (rounding would put it a hair inside)
    return (0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == n else min(1.0, centre + half))


def _boot_count(cells: int, n_boot: int) -> int:
    """Resamples under the work bound: ``n_boot``, fewer (not below ``BOOT_MIN_SAMPLES``) for many cells."""
    return int(max(min(n_boot, BOOT_MIN_SAMPLES), min(n_boot, BOOT_WORK // max(cells, 1))))


def _multinomial_blocks(counts: np.ndarray, n_boot: int, rng: np.random.Generator):
    """Blocks of bootstrap draws ``(b, K)`` of the ``K`` cell counts (each block sums to N per row)."""
    n = int(counts.sum())
    p = counts / n
    step = max(1, BOOT_CHUNK_CELLS // max(counts.size, 1))
    for s in range(0, n_boot, step):
        yield rng.multinomial(n, p, size=min(step, n_boot - s))


def _percentile_ci(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [50 * (1 - CI_LEVEL), 100 - 50 * (1 - CI_LEVEL)])
    return (float(lo), float(hi))


def _group_sum(draw: np.ndarray, keys: np.ndarray, width: int) -> np.ndarray:
    """``(b, width)``: the columns of ``draw`` (b, K) summed by their key (0..width-1)."""
    out = np.zeros((draw.shape[0], width))
    if keys.size == 0:
        return out
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    out[:, ks[starts]] = np.add.reduceat(draw[:, order], starts, axis=1)
    return out


def bootstrap_class_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, n_boot: int = BOOT_SAMPLES,
                            seed: int = BOOT_SEED) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap 95 % intervals of the macro / weighted averages and balanced accuracy.

    Each resample draws N queries with replacement; done as a multinomial draw of the non-empty
    (true, predicted) cells, and each resample's figures follow ``classification_metrics``
    (present classes, zero_division=0, rejected = a false negative of its true class).
    """
    cm = confusion(y_true, y_pred, n_classes)
    n = int(cm.sum())
    names = ("macro_precision", "macro_recall", "macro_f1", "weighted_precision", "weighted_recall",
             "weighted_f1", "balanced_accuracy")
    if n == 0:
        return {k: (float("nan"), float("nan")) for k in names}
    t, p = np.nonzero(cm)  # the non-empty cells; p == n_classes is "unknown"
    counts = cm[t, p].astype(np.float64)
    diag = t == p
    rng = np.random.default_rng(seed)
    n_boot = _boot_count(counts.size, n_boot)
    vals: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for draw in _multinomial_blocks(counts, n_boot, rng):
        draw = draw.astype(np.float64)
        sup = _group_sum(draw, t, n_classes)
        pred = _group_sum(draw, p, n_classes + 1)[:, :n_classes]
        tp = _group_sum(draw[:, diag], t[diag], n_classes)
        with np.errstate(divide="ignore", invalid="ignore"):
            prec = np.where(pred > 0, tp / pred, 0.0)
            rec = np.where(sup > 0, tp / sup, 0.0)
            f1 = np.where(sup + pred > 0, 2 * tp / (sup + pred), 0.0)
            present = (sup > 0) | (pred > 0)
            n_present = present.sum(1)
            has = sup > 0
            for name, v in (("precision", prec), ("recall", rec), ("f1", f1)):
                vals[f"macro_{name}"].append((v * present).sum(1) / n_present)
                vals[f"weighted_{name}"].append((v * sup).sum(1) / sup.sum(1))
            vals["balanced_accuracy"].append((rec * has).sum(1) / has.sum(1))
    return {k: _percentile_ci(np.concatenate(v)) for k, v in vals.items()}


def bootstrap_mean(values: np.ndarray, n_boot: int = BOOT_SAMPLES, seed: int = BOOT_SEED) -> tuple[float, float]:
    """Percentile-bootstrap 95 % interval of the mean of ``values`` (NaNs left out), e.g. AP@R per query.

    Resampling the values with replacement is a multinomial draw over the distinct values.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    uniq, counts = np.unique(v, return_counts=True)
    rng = np.random.default_rng(seed)
    means = [draw @ uniq / v.size for draw in _multinomial_blocks(counts.astype(np.float64),
                                                                   _boot_count(uniq.size, n_boot), rng)]
    return _percentile_ci(np.concatenate(means))


def baselines(y_true: np.ndarray, n_classes: int, top_k: int | None = None) -> dict[str, Any]:
    """The levels a classifier must beat: chance (uniform guess among ``n_classes``: 1/C, top-k
    min(k, C)/C), majority-class accuracy (always the most frequent class of ``y_true``), and
    ``top{k}_uninformative`` when k is at least half the classes (top-k then says little)."""
    y_true = _as_int(y_true, "y_true")
    out: dict[str, Any] = {"chance_accuracy": 1.0 / n_classes if n_classes else float("nan")}
    if y_true.size:
        out["majority_class_accuracy"] = float(np.bincount(y_true, minlength=n_classes).max() / y_true.size)
    if top_k is not None and n_classes:
        out[f"chance_top{top_k}_accuracy"] = min(top_k, n_classes) / n_classes
        out[f"top{top_k}_uninformative"] = bool(2 * top_k >= n_classes)
    return out


def uncertainty(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, candidates: np.ndarray | None = None,
                top_k: int = 5, n_boot: int = BOOT_SAMPLES, seed: int = BOOT_SEED) -> dict[str, Any]:
    """95 % intervals (``<metric>_ci95`` = [low, high]) of ``classification_metrics``'s headline
    figures, and the chance / majority-class levels of ``baselines``."""
    y_true = _as_int(y_true, "y_true")
    y_pred = _as_int(y_pred, "y_pred")
    n = int(y_true.size)
    out: dict[str, Any] = baselines(y_true, n_classes, top_k if candidates is not None else None)
    if n == 0:
        return out
    out["accuracy_ci95"] = list(wilson(int((y_true == y_pred).sum()), n))
    if candidates is not None:
        hits = (np.asarray(candidates)[:, :top_k] == y_true[:, None]).any(axis=1)
        out[f"top{top_k}_accuracy_ci95"] = list(wilson(int(hits.sum()), n))
    for k, ci in bootstrap_class_metrics(y_true, y_pred, n_classes, n_boot, seed).items():
        out[f"{k}_ci95"] = list(ci)
    out["ci95_method"] = (f"Wilson score for proportions; percentile bootstrap (up to {n_boot} resamples of the queries, "
                          f"seed {seed}) for macro/weighted averages, balanced accuracy and MAP@R")
    return out


def with_ci(value: Any, ci: Sequence[float] | None, digits: int = 4) -> str:
    """``0.9333 [0.702, 0.988]``: a figure and its 95 % interval, for the console and the report."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}f}"
    if ci is None or any(c is None or (isinstance(c, float) and math.isnan(c)) for c in ci):
        return text
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]"


def headline_line(m: dict[str, Any], top_k: int) -> str:
    """The console's one-line summary of ``metrics.json``: each figure with its 95 % interval,
    chance and majority-class levels, top-k marked when k is at least half the classes."""
    tk = f"top{top_k}_accuracy"
    parts = [f"accuracy {with_ci(m.get('accuracy'), m.get('accuracy_ci95'))}"]
    if tk in m:
        mark = " (k >= half the classes: uninformative)" if m.get(f"top{top_k}_uninformative") else ""
        parts.append(f"top-{top_k} {with_ci(m[tk], m.get(tk + '_ci95'))}{mark}")
    for key, name in (("macro_f1", "macro-F1"), ("balanced_accuracy", "balanced accuracy"), ("map_at_r", "MAP@R")):
        if key in m:
            parts.append(f"{name} {with_ci(m[key], m.get(key + '_ci95'))}")
    levels = [f"chance {m['chance_accuracy']:.4f}"] if "chance_accuracy" in m else []
    if "majority_class_accuracy" in m:
        levels.append(f"majority class {m['majority_class_accuracy']:.4f}")
    return ", ".join(parts) + (f" (95% intervals; {', '.join(levels)})" if levels else " (95% intervals)")


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

    ``topk_fn`` is ``common.retrieval.search.topk``. The queries of one class are searched together for
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
    if hasattr(gallery, "blocks"):  # a common.retrieval.streamed.StoreMatrix: few passes over the store
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
    scored = np.isfinite(p1)
    return {"precision_at_1": float(np.nanmean(p1)) if not_lone.any() else float("nan"),
            "precision_at_1_ci95": list(wilson(int(p1[scored].sum()), int(scored.sum()))),
            "map_at_r": float(np.nanmean(ap)) if not_lone.any() else float("nan"),
            "map_at_r_ci95": list(bootstrap_mean(ap)),
            "n_lone_queries": n_lone}
