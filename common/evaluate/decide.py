"""Decisions: the class of each query from its nearest gallery entries (nearest neighbour or k-NN
vote), and open-set rejection.

Two modes (``inference.mode``):

- **evaluate**: the test split's vectors from the feature store (embedded on the fly when the
  store holds none) against the pruned LUT (``inference.gallery=lut``) or the full train
  gallery (``full``; the gallery is train + the gallery-only ``extra`` images). With
  ``inference.unknown_classes`` those classes' test images are scored as unknowns
  (``metrics.json`` ``unknown_classes``: AUROC, FPR95, known accuracy per open-set score).
  Writes ``predictions.csv``, ``metrics.json``, ``classification_report.csv``,
  ``confusion_matrix.png``, ``embedding_map.png``, ``comparison.csv`` (retrieval against the
  classical classifiers of ``common.evaluate.classifiers`` on the same frozen vectors) and ``report.html``.
- **predict**: the images of ``inference.input`` grouped into samples (``common.data.samples``),
  embedded with the store's checkpoint and evaluation transform; unreadable images are listed in
  ``predictions.csv`` with the reason, never fatal. Writes ``predictions.csv`` (per image: sample,
  call, scores, the five nearest gallery images), ``sample_counts.csv`` / ``.png``,
  ``ecotaxa_<name>.tsv``, ``review.html`` (most doubtful first), ``corrections.csv``,
  ``metrics.json`` (counts and speed) and ``report.html``.

Classification (exact cosine search on L2-normalised float32 vectors, blocked matrix products):

- the **candidates** of a query are classes ranked by the similarity of their nearest gallery
  item (``search_classes``: one blocked pass over the class-sorted gallery, a max per class's
  columns), so the top-5 list holds five different classes;
- ``inference.method=top1``: the class of the nearest gallery item (= candidate 1);
  ``knn``: DINO's weighted vote of the ``k`` nearest items (``common.retrieval.topk`` and
  ``knn_vote``, weight ``exp(sim / T)``); the candidates are then ordered by vote score first;
- a gallery whose ``X`` is a ``common.retrieval.streamed.StoreMatrix`` (``search.max_memory_gib``) is
  searched block by block from the store, with the same answers;
- ``search.index`` other than ``exact``: the neighbours come from a FAISS index over the gallery
  (``common.retrieval.ann``: ``search.candidates`` proposed per query, rescored exactly), so the candidate
  classes are those among them; the retrieval metrics (precision@1, MAP@R) stay exact;
- open-set rejection (``common.evaluate.openset``): a query whose score (``inference.reject_score``: best
  similarity, or the ``ood_k``-th neighbour's similarity) is below ``inference.reject_below`` (a
  number, or ``auto``: the val cut keeping ``reject_keep`` of the correct val predictions) is
  labelled ``unknown`` (accepted = 0); stage 05's ``suggested_reject_below`` is logged.

A query embedded by one checkpoint is never matched against a gallery embedded by another: the
model ids of the query vectors, the gallery and (in predict mode) the checkpoint file's sha256 must
agree, else ``UserError``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..retrieval.search import knn_vote, search_classes, search_rows, topk
from ..store.containers import Vectors
from . import metrics as evaluate_metrics

if TYPE_CHECKING:
    from ..retrieval.search import ClassSearch


# ----------------------------------------------------------------------------- data holders


@dataclass
class Decision:
    """Predictions of one retrieval method for Q queries."""

    raw: np.ndarray  # (Q,) class before rejection
    final: np.ndarray  # (Q,) class after rejection (-1 = unknown)
    accepted: np.ndarray  # (Q,) bool
    candidates: np.ndarray  # (Q, top_k) class indices, -1 = padding
    cand_sims: np.ndarray  # (Q, top_k) best similarity of each candidate class
    best_sim: np.ndarray  # (Q,) similarity of the nearest gallery item
    nn_idx: np.ndarray  # (Q,) gallery row of the nearest item
    seconds: float = 0.0  # search + decision time
    margin: np.ndarray | None = None  # (Q,) similarity of the predicted class minus the best other class's (nan: one class)


def _rank(keys: list[np.ndarray]) -> np.ndarray:
    """Row-wise lexicographic order, most significant key first, ascending."""
    return np.lexsort(tuple(reversed(keys)), axis=-1)


def decide(cs: ClassSearch, top_k: int, reject_below: float | None,
           vote_pred: np.ndarray | None = None, vote_scores: np.ndarray | None = None) -> Decision:
    """Turn per-class nearest items (and, for k-NN, vote results) into predictions and candidates.

    Candidates: classes by best similarity (ties to the lower gallery row), or for k-NN by vote
    score first with the vote's winner always first. Rejection compares the overall best
    similarity with ``reject_below``.
    """
    Q, C = cs.sims.shape
    k = min(top_k, C)
    absent = cs.idx < 0
    idx_key = np.where(absent, np.iinfo(np.int64).max, cs.idx)
    keys: list[np.ndarray] = []
    if vote_pred is not None:
        winner = np.zeros((Q, C), dtype=bool)
        winner[np.arange(Q), vote_pred] = True
        keys += [~winner, -np.asarray(vote_scores, dtype=np.float64)]
    keys += [absent, -cs.sims.astype(np.float64), idx_key]
    order = _rank(keys)[:, :k] if Q else np.zeros((0, k), dtype=np.int64)
    cand = order.astype(np.int64)
    cand_sims = np.take_along_axis(cs.sims, order, axis=1) if Q else np.zeros((0, k), np.float32)
    cand_absent = np.take_along_axis(absent, order, axis=1) if Q else np.zeros((0, k), bool)
    cand[cand_absent] = -1  # fewer gallery classes than top_k
    # the nearest item overall: the best class by similarity, ties to the lower gallery row
    near = _rank([absent, -cs.sims.astype(np.float64), idx_key])[:, 0] if Q else np.zeros(0, np.int64)
    best_sim = cs.sims[np.arange(Q), near] if Q else np.zeros(0, np.float32)
    nn_idx = cs.idx[np.arange(Q), near] if Q else np.zeros(0, np.int64)
    raw = np.asarray(vote_pred, dtype=np.int64) if vote_pred is not None else near.astype(np.int64)
    accepted = np.ones(Q, dtype=bool) if reject_below is None else best_sim >= reject_below
    final = np.where(accepted, raw, evaluate_metrics.UNKNOWN)
    # margin: the predicted class's nearest item against the nearest item of any other class
    own = cs.sims[np.arange(Q), raw].astype(np.float64) if Q else np.zeros(0)
    others = cs.sims.astype(np.float64).copy()
    if Q:
        others[np.arange(Q), raw] = -np.inf
    best_other = others.max(axis=1) if C > 1 else np.full(Q, -np.inf)
    with np.errstate(invalid="ignore"):
        margin = np.where(np.isfinite(best_other), own - best_other, np.nan)
    return Decision(raw, final, accepted, cand, cand_sims, best_sim, nn_idx, margin=margin)


def reject(d: Decision, scores: dict[str, np.ndarray], rejection: Any) -> Decision:
    """Apply an open-set rule (``common.evaluate.openset.Rejection``) to a decision, in place; returns it."""
    d.accepted = rejection.accept(scores)
    d.final = np.where(d.accepted, d.raw, evaluate_metrics.UNKNOWN)
    return d


def classify(queries: np.ndarray, gallery: Vectors, n_classes: int, *, method: str, top_k: int,
             k: int, temperature: float, reject_below: float | None, block_size: int, device: Any = None,
             class_search: ClassSearch | None = None, index: Any = None) -> Decision:
    """Classify ``queries`` (Q, D) against ``gallery`` by ``top1`` or ``knn`` (see the module docstring);
    ``index``: a ``common.retrieval.ann.AnnIndex`` over the gallery's rows (None: exact search)."""
    if len(gallery) == 0:
        raise UserError("the gallery is empty: rerun 06_prune_features.py (or use inference.gallery=full)")
    t0 = time.perf_counter()
    cs = class_search if class_search is not None else search_classes(queries, gallery, n_classes, block_size, device,
                                                                      index)
    extra = 0.0 if class_search is None else cs.seconds  # reused search: count its time too
    if method == "top1":
        d = decide(cs, top_k, reject_below)
    elif method == "knn":
        kk = max(1, min(k, len(gallery)))
        if index is not None:
            sims, idx = index.search(queries, kk, gallery.X)
        else:
            sims, idx = topk(queries, search_rows(gallery), kk, block_size=block_size, device=device)
        pred, scores = knn_vote(sims, idx, gallery.labels, n_classes, temperature)
        d = decide(cs, top_k, reject_below, np.asarray(pred, dtype=np.int64), np.asarray(scores))
    else:
        raise UserError(f"inference.method: expected top1 or knn, got {method!r}")
    d.seconds = time.perf_counter() - t0 + extra
    return d
