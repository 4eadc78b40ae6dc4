"""Calibrated unknowns: two open-set scores, the cut chosen on val, and unknown-class metrics.

Real samples hold taxa and debris that no gallery class covers. Each query gets two scores
(higher = more like the gallery):

- ``similarity``: the cosine similarity of its nearest gallery item (the reference rejection);
- ``knn``: the similarity of its ``inference.ood_k``-th nearest gallery item. Sun et al. (2022),
  "Out-of-distribution detection with deep nearest neighbors" (ICML), score a query by minus
  the distance to its k-th nearest training feature on L2-normalised features; on unit vectors
  ``||a - b||^2 = 2 - 2 cos(a, b)``, so the k-th largest cosine similarity ranks queries the same.

``inference.reject_below`` (a number, or ``auto``) labels a query ``unknown`` when its
``inference.reject_score`` is below the cut. ``auto`` takes the cut from the val split: the
largest value that keeps at least ``inference.reject_keep`` of the *correct* val predictions
(``keep_cut``). ``ood_metrics`` measures a score's separation of known from unknown queries:
AUROC (known = positive) and the false-positive rate at 95 % true-positive rate (the share of
unknowns still accepted at the cut that keeps 95 % of the knowns), as Sun et al. report them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..store.containers import Vectors
from .decide import classify
from .tables import _round

if TYPE_CHECKING:
    from .decide import Decision

log = logging.getLogger(__name__)


SCORES = ("similarity", "knn")  # open-set scores, as inference.reject_score names them
TPR_FOR_FPR = 0.95  # FPR at this true-positive rate (Sun et al. 2022 report FPR95)
MIN_CUT_PREDICTIONS = 30  # an automatic cut resting on fewer correct val predictions gets a caution


def kth_similarity(queries: np.ndarray, gallery: np.ndarray, k: int, block_size: int,
                   device: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k-th nearest similarity (Q,), sims (Q, k'), idx (Q, k')) with k' = min(k, G): the k nearest
    gallery items of every query, exact (``common.retrieval.search.topk``), and the last one's similarity."""
    from ..retrieval.search import topk

    sims, idx = topk(queries, gallery, max(1, k), block_size=block_size, device=device)
    kth = sims[:, -1] if sims.shape[1] else np.full(len(queries), -np.inf, np.float32)
    return kth.astype(np.float32), sims, idx


def keep_cut(correct_scores: np.ndarray, keep: float) -> float | None:
    """The largest cut ``t`` with ``mean(correct_scores >= t) >= keep`` (None without scores).

    The cut is one of the scores: with n scores sorted ascending, the one at index
    ``n - ceil(keep * n)`` keeps at least ``ceil(keep * n)`` of them (ties keep more).
    """
    s = np.sort(np.asarray(correct_scores, dtype=np.float64))
    n = s.size
    if n == 0:
        return None
    need = min(n, max(1, math.ceil(keep * n - 1e-9)))
    return float(s[n - need])


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = TPR_FOR_FPR) -> float:
    """Share of ``unknown`` scores at or above the largest cut that keeps ``tpr`` of the ``known``."""
    known, unknown = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    if known.size == 0 or unknown.size == 0:
        return float("nan")
    t = keep_cut(known, tpr)
    return float((unknown >= t).mean())


def ood_metrics(known: np.ndarray, unknown: np.ndarray) -> dict[str, float]:
    """AUROC (scikit-learn, known = positive, higher score = known) and FPR at 95 % TPR."""
    from sklearn.metrics import roc_auc_score

    known, unknown = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    if known.size == 0 or unknown.size == 0:
        return {"auroc": float("nan"), "fpr_at_95_tpr": float("nan")}
    y = np.r_[np.ones(known.size), np.zeros(unknown.size)]
    return {"auroc": float(roc_auc_score(y, np.r_[known, unknown])), "fpr_at_95_tpr": fpr_at_tpr(known, unknown)}


@dataclass
class Rejection:
    """The open-set decision rule: which score, its cut (None = off), and where the cut comes from."""

    score: str = "similarity"
    cut: float | None = None
    source: str = "off (inference.reject_below=null)"
    auto_cuts: dict[str, float | None] = field(default_factory=dict)  # the val cut of every score
    keep: float = 0.95
    warning: str | None = None  # a caution about the cut (an automatic cut from few val predictions)

    def accept(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """Accepted queries (score at or above the cut; all when off)."""
        s = np.asarray(scores[self.score])
        return np.ones(s.shape[0], dtype=bool) if self.cut is None else s >= self.cut


def resolve(reject_below: float | str | None, score: str, keep: float,
            auto_cuts: dict[str, float | None]) -> Rejection:
    """The rule from ``inference.reject_below`` / ``reject_score`` / ``reject_keep`` and the val cuts."""
    if reject_below is None:
        return Rejection(score, None, "off (inference.reject_below=null)", auto_cuts, keep)
    if reject_below == "auto":
        cut = auto_cuts.get(score)
        if cut is None:
            from ..errors import UserError

            raise UserError("inference.reject_below: auto needs correct val predictions to choose the cut, and there "
                            "are none (check split.val and inference.unknown_classes)")
        return Rejection(score, cut, f"auto: keeps {keep:.0%} of the correct val predictions "
                         f"({score} >= {cut:.4f})", auto_cuts, keep)
    return Rejection(score, float(reject_below), f"inference.reject_below={float(reject_below):g} on {score}",
                     auto_cuts, keep)


def val_cuts(scores: dict[str, np.ndarray], correct: np.ndarray, keep: float) -> dict[str, float | None]:
    """The cut of every score that keeps ``keep`` of the correct val predictions."""
    correct = np.asarray(correct, dtype=bool)
    return {name: keep_cut(np.asarray(s)[correct], keep) for name, s in scores.items()}


def unknown_report(known_scores: dict[str, np.ndarray], unknown_scores: dict[str, np.ndarray],
                   known_correct: np.ndarray, cuts: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """Per score: AUROC, FPR at 95 % TPR, and at the score's val cut the accuracy on the known
    queries (a rejected known query counts as an error), the accuracy of the accepted known
    queries and the share of unknown queries rejected."""
    known_correct = np.asarray(known_correct, dtype=bool)
    out: dict[str, dict[str, Any]] = {}
    for name in known_scores:
        k, u = np.asarray(known_scores[name]), np.asarray(unknown_scores[name])
        m: dict[str, Any] = ood_metrics(k, u)
        cut = cuts.get(name)
        m["cut"] = cut
        acc_k = k >= cut if cut is not None else np.ones(k.size, bool)
        m["known_accuracy"] = float((known_correct & acc_k).mean()) if k.size else float("nan")
        m["known_accepted_accuracy"] = float(known_correct[acc_k].mean()) if acc_k.any() else float("nan")
        m["unknown_rejected"] = float((u < cut).mean()) if cut is not None and u.size else float("nan")
        out[name] = m
    return out


def open_scores(queries: np.ndarray, d: Decision, gallery: Vectors, icfg: Any, device: Any = None,
                neighbours: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The open-set scores of this module (``similarity``, ``knn``) of every query, and its
    ``max(neighbours, ood_k)`` nearest gallery rows (sims, idx) from the same exact search."""


    from ..retrieval.search import search_rows

    k = max(neighbours, icfg.ood_k)
    _, sims, idx = kth_similarity(queries, search_rows(gallery), k, icfg.block_size, device)
    j = min(icfg.ood_k, sims.shape[1]) - 1
    kth = sims[:, j] if j >= 0 else np.full(len(queries), -np.inf, np.float32)
    return {"similarity": d.best_sim, "knn": kth}, sims, idx


def calibrate(val: Vectors | None, gallery: Vectors, n_classes: int, icfg: Any, device: Any = None
              ) -> dict[str, float | None]:
    """Per open-set score, the cut that keeps ``inference.reject_keep`` of the correct val
    predictions (val images of classes the gallery holds, classified by ``inference.method``)."""
    return calibrate_counted(val, gallery, n_classes, icfg, device)[0]


def calibrate_counted(val: Vectors | None, gallery: Vectors, n_classes: int, icfg: Any, device: Any = None
                      ) -> tuple[dict[str, float | None], int]:
    """``calibrate``'s cuts and the number of correct val predictions they rest on."""
    if val is None or len(val) == 0 or len(gallery) == 0:
        return {s: None for s in SCORES}, 0
    known = np.isin(val.labels, np.unique(gallery.labels))
    X, y = val.X[known], val.labels[known]
    if not len(y):
        return {s: None for s in SCORES}, 0
    d = classify(X, gallery, n_classes, method=icfg.method, top_k=icfg.top_k, k=icfg.k, temperature=icfg.temperature,
                 reject_below=None, block_size=icfg.block_size, device=device)
    scores, _, _ = open_scores(X, d, gallery, icfg, device)
    cuts = val_cuts(scores, d.raw == y, icfg.reject_keep)
    log.info("val cuts keeping %.0f%% of the %d correct val predictions (of %d): %s", 100 * icfg.reject_keep,
             int((d.raw == y).sum()), len(y), ", ".join(f"{k} {v:.4f}" for k, v in cuts.items() if v is not None))
    return cuts, int((d.raw == y).sum())


def few_predictions_warning(n_correct: int, keep: float) -> str | None:
    """A caution when an automatic cut rests on fewer than ``MIN_CUT_PREDICTIONS`` correct val predictions."""
    if n_correct >= MIN_CUT_PREDICTIONS:
        return None
    return (f"the automatic cut rests on only {n_correct} correct val prediction{'s' if n_correct != 1 else ''} "
            f"(fewer than {MIN_CUT_PREDICTIONS}): keeping {keep:.0%} of so few is a rough estimate; "
            "more val images (split.val) make it firmer")


def rejection_rule(icfg: Any, val: Vectors | None, gallery: Vectors, n_classes: int, device: Any = None) -> Any:
    """``Rejection`` of ``inference.reject_below`` / ``reject_score`` / ``reject_keep``; with ``auto``,
    a caution (logged, and in ``rule.warning``) when the cut rests on few correct val predictions."""
    cuts, n_correct = calibrate_counted(val, gallery, n_classes, icfg, device)
    rule = resolve(icfg.reject_below, icfg.reject_score, icfg.reject_keep, cuts)
    log.info("open-set rejection: %s", rule.source)
    if icfg.reject_below == "auto":
        rule.warning = few_predictions_warning(n_correct, icfg.reject_keep)
        if rule.warning:
            log.warning("caution: %s", rule.warning)
    return rule


def _rejection_facts(rule: Any) -> dict[str, Any]:
    return {"reject_score": rule.score, "reject_cut": rule.cut, "reject_rule": rule.source,
            **({"reject_warning": rule.warning} if rule.warning else {}), "reject_keep": rule.keep,
            "val_cuts": _round({k: v for k, v in rule.auto_cuts.items() if v is not None})}
