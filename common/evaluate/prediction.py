"""Predict mode's decisions for new images: classes, doubts, neighbours and counts; writes nothing.

``predict`` returns a ``Prediction``: stage 07's driver (``common.stages.inference.predict``) writes one
file from it per function (predictions.csv, sample_counts.csv/.png, the EcoTaxa bundle,
corrections.csv, review.html, metrics.json, report.html).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..retrieval.search import ClassSearch, prepare_vectors
from ..store.containers import Vectors
from .decide import Decision, classify, decide, reject
from .metrics import UNKNOWN, rejection_metrics
from .openset import Rejection, _rejection_facts, open_scores, rejection_rule
from .tables import _label, _round, doubt_order

log = logging.getLogger(__name__)

REVIEW_NEIGHBOURS = 5  # predict mode: nearest gallery images listed per query (predictions.csv, review.html)


@dataclass
class Prediction:
    """Predict mode's result for ``queries`` against ``gallery`` (``classes``: the gallery's class names).

    ``decision``: classes, similarities, margins (``final`` ``UNKNOWN`` = rejected);
    ``knn``: the k-th neighbour similarity of each query (``inference.ood_k``);
    ``neighbour_sims``/``neighbour_idx``: the ``REVIEW_NEIGHBOURS`` nearest gallery rows;
    ``classifier_preds``: each classical classifier's class indices; ``doubt``: query indices, most
    doubtful first, and ``reasons`` (per query); ``summary``: the facts metrics.json starts from.
    """

    queries: Vectors
    gallery: Vectors
    classes: list[str]
    decision: Decision
    knn: np.ndarray
    neighbour_sims: np.ndarray
    neighbour_idx: np.ndarray
    rule: Rejection
    classifier_preds: dict[str, np.ndarray] = field(default_factory=dict)
    doubt: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    reasons: list[list[str]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.queries)

    def label(self, q: int) -> str:
        """Query ``q``'s class name, ``unknown`` when rejected."""
        return _label(self.classes, int(self.decision.final[q]))

    def predicted(self, q: int) -> str | None:
        """Query ``q``'s class name, None when rejected."""
        c = int(self.decision.final[q])
        return None if c == UNKNOWN else self.classes[c]

    def neighbours(self, q: int) -> list[tuple[str, str, float]]:
        """(gallery path, class, similarity) of query ``q``'s nearest gallery images."""
        g = self.gallery
        return [(g.paths[int(i)], self.classes[int(g.labels[int(i)])], float(s))
                for i, s in zip(self.neighbour_idx[q], self.neighbour_sims[q])]

    @property
    def n_doubtful(self) -> int:
        return int(sum(1 for r in self.reasons if r))


def predict(queries: Vectors, gallery: Vectors, classes: list[str], icfg: Any, *, val: Vectors | None = None,
            classifiers: dict[str, Any] | None = None, timing: dict[str, float] | None = None,
            device: Any = None, index: Any = None) -> Prediction:
    """Classify ``queries`` (labels unused) against ``gallery`` with ``icfg`` (``inference.*``).

    The open-set rule (``inference.reject_below``; ``auto`` chooses the cut on ``val``) rejects
    queries as unknown; ``index``: a FAISS index over the gallery's rows (None: exact search), the
    open-set scores and the neighbours always come from exact search. ``classifiers``: fitted
    classical classifiers, each predicting every query. ``timing`` (``decode_embed_s``...) is
    completed with the search and classifier times.
    """
    C, n = len(classes), len(queries)
    timing = dict(timing or {})
    gallery = prepare_vectors(gallery, device)  # searched by the val and the new queries: codes made once
    rule = rejection_rule(icfg, val, gallery, C, device)
    if n:
        d = classify(queries.X, gallery, C, method=icfg.method, top_k=icfg.top_k, k=icfg.k,
                     temperature=icfg.temperature, reject_below=None, block_size=icfg.block_size, device=device,
                     index=index)
        t0 = time.perf_counter()
        scores, nb_sims, nb_idx = open_scores(queries.X, d, gallery, icfg, device, neighbours=REVIEW_NEIGHBOURS)
        reject(d, scores, rule)
        d.seconds += time.perf_counter() - t0
        knn = scores["knn"]
    else:
        d = decide(ClassSearch(np.zeros((0, C), np.float32), np.zeros((0, C), np.int64)), icfg.top_k, None)
        knn = np.zeros(0, np.float32)
        nb_sims, nb_idx = np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
    timing["search_s"] = d.seconds
    preds: dict[str, np.ndarray] = {}
    for cname, f in (classifiers or {}).items():
        t0 = time.perf_counter()
        preds[cname] = f.predict(queries.X)[0] if n else np.zeros(0, np.int64)
        timing[f"{cname}_s"] = time.perf_counter() - t0
    doubt, reasons = doubt_order(d.final, d.best_sim, d.margin, rule.auto_cuts.get("similarity"), icfg.review_margin)
    summary: dict[str, Any] = {"gallery": icfg.gallery, "gallery_size": len(gallery),
                               "gallery_classes": int(np.unique(gallery.labels).size), "method": icfg.method,
                               "n_images": n, "reject_below": icfg.reject_below, **_rejection_facts(rule)}
    if n:
        summary.update(rejection_metrics(None, d.raw, d.accepted))
    counts = np.bincount(d.final[d.final >= 0], minlength=C)
    summary["predicted_counts"] = {classes[c]: int(counts[c]) for c in np.flatnonzero(counts)}
    total = sum(v for k, v in timing.items() if k in ("decode_embed_s", "search_s"))
    summary["timing_scope"] = "decode+embed+search"
    summary["images_per_s"] = n / total if total > 0 and n else float("nan")
    summary["mean_latency_ms"] = 1000.0 * total / n if n else float("nan")
    summary["timing_s"] = _round(timing, 4)
    summary["n_doubtful"] = int(sum(1 for r in reasons if r))
    return Prediction(queries, gallery, list(classes), d, knn, nb_sims, nb_idx, rule, preds, doubt, reasons, timing,
                      summary)
