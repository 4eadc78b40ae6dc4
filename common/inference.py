"""Stage 07: classify queries against the gallery, measure, compare, and write a report.

Two modes (``inference.mode``):

- **evaluate**: the test split's vectors from the feature store (embedded on the fly when the
  store holds none) against the pruned LUT (``inference.gallery=lut``) or the full train
  gallery (``full``; the gallery is train + the gallery-only ``extra`` images). With
  ``inference.unknown_classes`` those classes' test images are scored as unknowns
  (``metrics.json`` ``unknown_classes``: AUROC, FPR95, known accuracy per open-set score).
  Writes ``predictions.csv``, ``metrics.json``, ``classification_report.csv``,
  ``confusion_matrix.png``, ``embedding_map.png``, ``comparison.csv`` (retrieval against the
  classical classifiers of ``common.classifiers`` on the same frozen vectors) and ``report.html``.
- **predict**: the images of ``inference.input`` grouped into samples (``common.samples``),
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
- a gallery whose ``X`` is a ``common.streaming.StoreMatrix`` (``search.max_memory_gib``) is
  searched block by block from the store, with the same answers;
- ``search.index`` other than ``exact``: the neighbours come from a FAISS index over the gallery
  (``common.search``: ``search.candidates`` proposed per query, rescored exactly), so the candidate
  classes are those among them; the retrieval metrics (precision@1, MAP@R) stay exact;
- open-set rejection (``common.openset``): a query whose score (``inference.reject_score``: best
  similarity, or the ``ood_k``-th neighbour's similarity) is below ``inference.reject_below`` (a
  number, or ``auto``: the val cut keeping ``reject_keep`` of the correct val predictions) is
  labelled ``unknown`` (accepted = 0); stage 05's ``suggested_reject_below`` is logged.

A query embedded by one checkpoint is never matched against a gallery embedded by another: the
model ids of the query vectors, the gallery and (in predict mode) the checkpoint file's sha256 must
agree, else ``UserError``.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import metrics as M
from . import plots as P
from . import report as R
from .errors import UserError
from .features import Vectors
from .fileio import write_csv, write_json
from .retrieval import knn_vote, topk
from .streaming import is_streamed as streamed

log = logging.getLogger(__name__)

PREDICT_STRIP_MAX = 48  # predict mode report: queries shown beside their nearest gallery image
REVIEW_NEIGHBOURS = 5  # predict mode: nearest gallery images listed per query (predictions.csv, review.html)
RETRIEVAL_TOP1 = "retrieval_top1"
RETRIEVAL_KNN = "retrieval_knn"

Output = Callable[..., Path]  # ctx.output: relative parts -> registered path under the stage folder


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


@dataclass
class ClassSearch:
    """Per-class nearest gallery items: ``sims`` (Q, C) (-inf: class absent), ``idx`` (Q, C) (-1)."""

    sims: np.ndarray
    idx: np.ndarray
    seconds: float = 0.0


# ----------------------------------------------------------------------------- search and decide


def search_classes(queries: np.ndarray, gallery: Vectors, n_classes: int, block_size: int,
                   device: Any = None, index: Any = None) -> ClassSearch:
    """Exact nearest gallery item of every class for every query, in one pass over the gallery.

    With ``index`` (a ``common.search.AnnIndex`` over the gallery's rows), the classes are those
    of the ``index.candidates`` neighbours it proposes (rescored exactly); a class absent from that
    list is absent for the query (its top-k list may then hold fewer classes).

    The gallery is sorted by class once, so each class is a contiguous block of columns. For each
    block of ``block_size`` queries: one float32 matrix product with the whole gallery (as
    ``common.retrieval.topk`` does; memory ``block_size x G`` float32), then a max over each class's
    columns (``torch.max`` returns the first of equal maxima: ties go to the lower gallery row).
    The per-class maxima cost one pass, where a ``topk`` call per class re-reads the queries
    once per class (about 1.4x slower at DYB scale, 87 classes). A streamed gallery
    (``common.streaming.StoreMatrix``) is searched block by block with the same result.
    """
    import torch

    t0 = time.perf_counter()
    if index is not None:
        from .search import class_best

        s, r = index.search(queries, index.candidates, gallery.X)
        return ClassSearch(*class_best(s, r, gallery.labels, n_classes), time.perf_counter() - t0)
    Q, C = queries.shape[0], n_classes
    if block_size < 1:
        raise UserError(f"inference.block_size: must be >= 1, got {block_size}")
    from .streaming import class_best, is_streamed

    if is_streamed(gallery.X):  # the gallery stays in the store: one pass, block by block
        return ClassSearch(*class_best(queries, gallery.X, gallery.labels, C, block_size, device),
                           time.perf_counter() - t0)
    sims = np.full((Q, C), -np.inf, dtype=np.float32)
    idx = np.full((Q, C), -1, dtype=np.int64)
    if Q and len(gallery):
        from .retrieval import ClassSlices, as_tensor, class_max_block

        dev = torch.device(device) if device is not None else torch.device("cpu")
        sl = ClassSlices.of(gallery.labels)  # the whole gallery is one block
        gt = as_tensor(gallery.X[sl.order], dev).t()  # (D, G)
        q_all = as_tensor(queries, "cpu")
        with torch.inference_mode():
            for a in range(0, Q, block_size):
                qb = q_all[a:a + block_size].to(dev, non_blocking=True)
                v, j = class_max_block(qb @ gt, sl)  # one (B, G) float32 product
                sims[a:a + qb.shape[0], sl.classes] = v.cpu().numpy()
                idx[a:a + qb.shape[0], sl.classes] = j.cpu().numpy()
    return ClassSearch(sims, idx, time.perf_counter() - t0)


def _on_device(a: np.ndarray, device: Any) -> Any:
    """On a GPU, copy once to the device (the per-class searches then reuse it); else leave as numpy
    (and a streamed gallery stays in the store)."""
    if device is not None and str(device).startswith("cuda") and not hasattr(a, "blocks"):
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)
    return a


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
    final = np.where(accepted, raw, M.UNKNOWN)
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
    """Apply an open-set rule (``common.openset.Rejection``) to a decision, in place; returns it."""
    d.accepted = rejection.accept(scores)
    d.final = np.where(d.accepted, d.raw, M.UNKNOWN)
    return d


def classify(queries: np.ndarray, gallery: Vectors, n_classes: int, *, method: str, top_k: int,
             k: int, temperature: float, reject_below: float | None, block_size: int, device: Any = None,
             class_search: ClassSearch | None = None, index: Any = None) -> Decision:
    """Classify ``queries`` (Q, D) against ``gallery`` by ``top1`` or ``knn`` (see the module docstring);
    ``index``: a ``common.search.AnnIndex`` over the gallery's rows (None: exact search)."""
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
            sims, idx = topk(queries, gallery.X, kk, block_size=block_size, device=device)
        pred, scores = knn_vote(sims, idx, gallery.labels, n_classes, temperature)
        d = decide(cs, top_k, reject_below, np.asarray(pred, dtype=np.int64), np.asarray(scores))
    else:
        raise UserError(f"inference.method: expected top1 or knn, got {method!r}")
    d.seconds = time.perf_counter() - t0 + extra
    return d


# ----------------------------------------------------------------------------- outputs


def _label(classes: Sequence[str], i: int) -> str:
    return M.UNKNOWN_NAME if i == M.UNKNOWN else classes[i]


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
    pc = M.per_class(y_true, y_pred, C)
    header = ["class", "precision", "recall", "f1", "support", "predicted", "gallery_items"]
    rows: list[list[Any]] = []
    for c in range(C):
        ratios = ([f"{pc['precision'][c]:.6f}", f"{pc['recall'][c]:.6f}", f"{pc['f1'][c]:.6f}"]
                  if pc["present"][c] else ["", "", ""])
        rows.append([classes[c], *ratios, int(pc["support"][c]), int(pc["predicted"][c]), int(gallery_counts[c])])
    m = M.classification_metrics(y_true, y_pred, C)
    n = int(pc["support"].sum())
    for avg in ("macro", "weighted"):
        if f"{avg}_f1" in m:
            rows.append([f"{avg} avg", f"{m[f'{avg}_precision']:.6f}", f"{m[f'{avg}_recall']:.6f}",
                         f"{m[f'{avg}_f1']:.6f}", n, "", ""])
    n_unknown = int((np.asarray(y_pred) == M.UNKNOWN).sum())
    if n_unknown:
        rows.append([f"{M.UNKNOWN_NAME} (rejected)", "", "", "", "", n_unknown, ""])
    return header, rows


def _round(d: dict[str, Any], nd: int = 6) -> dict[str, Any]:
    return {k: (round(v, nd) if isinstance(v, float) else v) for k, v in d.items()}


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
    index: Any = None  # common.search.AnnIndex over the gallery's rows; None = exact search
    search_info: dict[str, Any] = field(default_factory=dict)  # the index and its agreement with exact search
    pixel_size_um: float | None = None  # the camera's pixel size: the report's image sizes in micrometres too


def open_scores(queries: np.ndarray, d: Decision, gallery: Vectors, icfg: Any, device: Any = None,
                neighbours: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The open-set scores of ``common.openset`` (``similarity``, ``knn``) of every query, and its
    ``max(neighbours, ood_k)`` nearest gallery rows (sims, idx) from the same exact search."""
    from .openset import kth_similarity

    k = max(neighbours, icfg.ood_k)
    _, sims, idx = kth_similarity(queries, gallery.X, k, icfg.block_size, device)
    j = min(icfg.ood_k, sims.shape[1]) - 1
    kth = sims[:, j] if j >= 0 else np.full(len(queries), -np.inf, np.float32)
    return {"similarity": d.best_sim, "knn": kth}, sims, idx


def calibrate(val: Vectors | None, gallery: Vectors, n_classes: int, icfg: Any, device: Any = None
              ) -> dict[str, float | None]:
    """Per open-set score, the cut that keeps ``inference.reject_keep`` of the correct val
    predictions (val images of classes the gallery holds, classified by ``inference.method``)."""
    from .openset import SCORES, val_cuts

    if val is None or len(val) == 0 or len(gallery) == 0:
        return {s: None for s in SCORES}
    known = np.isin(val.labels, np.unique(gallery.labels))
    X, y = val.X[known], val.labels[known]
    if not len(y):
        return {s: None for s in SCORES}
    d = classify(X, gallery, n_classes, method=icfg.method, top_k=icfg.top_k, k=icfg.k, temperature=icfg.temperature,
                 reject_below=None, block_size=icfg.block_size, device=device)
    scores, _, _ = open_scores(X, d, gallery, icfg, device)
    cuts = val_cuts(scores, d.raw == y, icfg.reject_keep)
    log.info("val cuts keeping %.0f%% of the %d correct val predictions (of %d): %s", 100 * icfg.reject_keep,
             int((d.raw == y).sum()), len(y), ", ".join(f"{k} {v:.4f}" for k, v in cuts.items() if v is not None))
    return cuts


def rejection_rule(icfg: Any, val: Vectors | None, gallery: Vectors, n_classes: int, device: Any = None) -> Any:
    """``common.openset.Rejection`` of ``inference.reject_below`` / ``reject_score`` / ``reject_keep``."""
    from .openset import resolve

    rule = resolve(icfg.reject_below, icfg.reject_score, icfg.reject_keep,
                   calibrate(val, gallery, n_classes, icfg, device))
    log.info("open-set rejection: %s", rule.source)
    return rule


def evaluate(inp: EvalInputs, icfg: Any, output: Output, *, device: Any = None, seed: int = 0) -> dict[str, Any]:
    """Evaluate mode on loaded vectors: every artefact of the stage; returns the metrics summary."""
    classes, test, gallery = inp.classes, inp.test, inp.gallery
    C = len(classes)
    if len(test) == 0:
        raise UserError("the test split is empty: nothing to evaluate (check split.test)")
    if len(gallery) == 0:
        raise UserError("the gallery is empty: rerun 06_prune_features.py (or use inference.gallery=full)")
    if (test.labels < 0).any():
        raise UserError("some test vectors have no label in the feature store")
    kw = dict(top_k=icfg.top_k, k=icfg.k, temperature=icfg.temperature, block_size=icfg.block_size, device=device,
              index=inp.index)
    log.info("searching %d test queries against a %s gallery of %d vectors (%d classes)", len(test),
             icfg.gallery, len(gallery), np.unique(gallery.labels).size)
    cs = search_classes(test.X, gallery, C, icfg.block_size, device, inp.index)
    decisions = {
        "top1": classify(test.X, gallery, C, method="top1", reject_below=None, class_search=cs, **kw),
        "knn": classify(test.X, gallery, C, method="knn", reject_below=None, class_search=cs, **kw),
    }
    rule = rejection_rule(icfg, inp.val, gallery, C, device)
    scores, _, _ = open_scores(test.X, decisions[icfg.method], gallery, icfg, device)
    for dd in decisions.values():  # both methods share the per-class search: the same scores
        reject(dd, scores, rule)
    # comparison table: each method's own work (k-NN: its k-neighbour search and vote; its
    # candidate list reuses the per-class search, which the headline timing does include)
    own_seconds = {"top1": decisions["top1"].seconds, "knn": decisions["knn"].seconds - cs.seconds}
    d = decisions[icfg.method]
    y = test.labels
    n = len(test)

    out: dict[str, Any] = {"mode": "evaluate", "gallery": icfg.gallery, "gallery_size": len(gallery),
                           "method": icfg.method}
    if inp.search_info:
        out["search"] = inp.search_info
    out.update(M.classification_metrics(y, d.final, C, d.candidates, icfg.top_k))
    # on a GPU both matrices go to the device once, not once per class searched
    out.update(M.retrieval_metrics(_on_device(test.X, device), y, _on_device(gallery.X, device), gallery.labels,
                                   topk, block_size=icfg.block_size, device=device))
    out["reject_below"] = icfg.reject_below
    out.update(_rejection_facts(rule))
    if rule.cut is not None:
        out.update(M.rejection_metrics(y, d.raw, d.accepted))
        out["accuracy_without_rejection"] = float((d.raw == y).mean())
    out["suggested_reject_below"] = inp.suggested_reject_below
    if inp.unknown_test is not None and len(inp.unknown_test):
        out["unknown_classes"] = _unknown_metrics(inp, icfg, d, scores, rule, device)
    total = d.seconds + inp.embed_seconds
    out["timing_scope"] = "embed+search" if inp.embed_seconds else "search (vectors read from the store)"
    out["images_per_s"] = n / total if total > 0 else float("nan")
    out["mean_latency_ms"] = 1000.0 * total / n

    # ---- classical classifiers on the same frozen vectors
    comp_rows: list[list[Any]] = []
    preds: dict[str, np.ndarray] = {}
    for name in (RETRIEVAL_TOP1, RETRIEVAL_KNN):
        key = "top1" if name == RETRIEVAL_TOP1 else "knn"
        dd = decisions[key]
        preds[name] = dd.raw
        mm = M.classification_metrics(y, dd.raw, C, dd.candidates, icfg.top_k)
        comp_rows.append([name, mm["accuracy"], mm["macro_f1"], mm["balanced_accuracy"], 0.0,
                          1000.0 * own_seconds[key] / n, _sizeof_gallery(gallery)])
    fitted_info: dict[str, Any] = {}
    if icfg.classifiers and inp.train is not None and streamed(inp.train.X):
        out["classifiers_skipped"] = (f"the train vectors ({inp.train.X.nbytes / 2**30:.2f} GiB) exceed "
                                      "search.max_memory_gib: they stay in the store")
        log.warning("inference.classifiers skipped: %s", out["classifiers_skipped"])
        inp.facts.append(("classical classifiers", f"skipped: {out['classifiers_skipped']}"))
    elif icfg.classifiers:
        comp, cpreds, fitted_info = _classical(inp, icfg, output, device, seed)
        comp_rows += comp
        preds.update(cpreds)

    comp_header = ["method", "accuracy", "macro_f1", "balanced_accuracy", "fit_time_s", "predict_ms_per_image",
                   "model_size_bytes"]
    write_csv(output("comparison.csv"), comp_header,
              [[r[0], f"{r[1]:.6f}", f"{r[2]:.6f}", f"{r[3]:.6f}", f"{r[4]:.3f}", f"{r[5]:.6f}", r[6]] for r in comp_rows])
    out["classifiers"] = fitted_info

    # ---- files
    header, rows = prediction_rows(test, d, classes, gallery, preds, with_truth=True,
                                   scores={"margin": d.margin, "knn_similarity": scores["knn"]})
    write_csv(output("predictions.csv"), header, rows)
    g_counts = np.bincount(gallery.labels, minlength=C)
    h2, r2 = class_report_rows(y, d.final, classes, g_counts)
    write_csv(output("classification_report.csv"), h2, r2)
    cm = M.confusion(y, d.final, C)
    rejected = bool((d.final == M.UNKNOWN).any())
    cm_png = P.confusion_matrix_png(cm if rejected else cm[:, :C], classes,
                                    list(classes) + ([M.UNKNOWN_NAME] if rejected else []),
                                    output("confusion_matrix.png"))
    map_png = None
    if icfg.embedding_map != "none":
        map_png = P.embedding_map_png(test.X, y, classes, output("embedding_map.png"), icfg.embedding_map, seed)
    report_path = output("report.html")
    out["report"] = str(report_path)
    write_json(output("metrics.json"), _round(out))
    _evaluate_report(report_path, inp, icfg, out, d, comp_header, comp_rows, cm_png, map_png, h2, r2)
    log.info("test: accuracy %.4f, top-%d %.4f, macro-F1 %.4f, balanced accuracy %.4f, MAP@R %.4f (%s, %s gallery)",
             out["accuracy"], icfg.top_k, out.get(f"top{icfg.top_k}_accuracy", float("nan")), out["macro_f1"],
             out["balanced_accuracy"], out["map_at_r"], icfg.method, icfg.gallery)
    log.info("report: %s", report_path)
    return out


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


def _rejection_facts(rule: Any) -> dict[str, Any]:
    return {"reject_score": rule.score, "reject_cut": rule.cut, "reject_rule": rule.source,
            "reject_keep": rule.keep, "val_cuts": _round({k: v for k, v in rule.auto_cuts.items() if v is not None})}


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


def _classical(inp: EvalInputs, icfg: Any, output: Output, device: Any, seed: int):
    """Fit, save and evaluate the classical classifiers; rows of the comparison table."""
    from . import classifiers as K

    if inp.train is None or len(inp.train) == 0:
        raise UserError("inference.classifiers: the feature store has no train vectors to fit them on")
    val = inp.val if inp.val is not None else Vectors(inp.train.X[:0], inp.train.labels[:0], [])
    C = len(inp.classes)
    fitted = K.fit_classifiers(icfg.classifiers, inp.train.X, inp.train.labels, val.X, val.labels, C,
                               epochs=icfg.linear_epochs, lr=icfg.linear_lr, batch_size=K.LINEAR_BATCH_SIZE,
                               device=device or "cpu", seed=seed)
    folder = output("classifiers", K.CLASSES_FILE).parent
    paths = K.save_classifiers(fitted, folder, inp.classes, inp.model_id, inp.test.X.shape[1])
    for p in [*paths.values(), folder / K.CLASSES_FILE, folder / K.DIGESTS_FILE]:
        output("classifiers", p.name)  # registered in the manifest
    rows, preds, info = [], {}, {}
    y = inp.test.labels
    for name, f in fitted.items():
        t0 = time.perf_counter()
        pred, ranked = f.predict(inp.test.X)
        dt = time.perf_counter() - t0
        preds[name] = pred
        mm = M.classification_metrics(y, pred, C, ranked, icfg.top_k)
        rows.append([name, mm["accuracy"], mm["macro_f1"], mm["balanced_accuracy"], f.fit_time_s,
                     1000.0 * dt / len(y), paths[name].stat().st_size])
        info[name] = _round({k: v for k, v in mm.items() if isinstance(v, float)}) | {
            k: v for k, v in f.info.items() if k != "history"}
        log.info("%s: accuracy %.4f, macro-F1 %.4f (fit %.1f s)", name, mm["accuracy"], mm["macro_f1"], f.fit_time_s)
    return rows, preds, info


def _worst_strips(test: Vectors, d: Decision, classes: Sequence[str], gallery: Vectors,
                  n_worst: int) -> list[tuple[str, str, list[R.StripItem]]]:
    C = len(classes)
    pc = M.per_class(test.labels, d.final, C)
    has = np.flatnonzero(pc["support"] > 0)
    order = has[np.lexsort((-pc["support"][has], pc["f1"][has]))]  # lowest F1, then the larger class
    strips = []
    for c in order[:max(0, n_worst)]:
        wrong = np.flatnonzero((test.labels == c) & (d.final != c))
        if wrong.size == 0:
            continue
        items = []
        for q in wrong[:R.STRIP_MAX]:
            g = int(d.nn_idx[q])
            items.append(R.StripItem(test.paths[q], classes[c], _label(classes, int(d.final[q])),
                                     float(d.best_sim[q]), gallery.paths[g], classes[int(gallery.labels[g])]))
        note = (f"F1 {pc['f1'][c]:.3f}, recall {pc['recall'][c]:.3f}, {int(pc['support'][c])} test images, "
                f"{wrong.size} misclassified (showing {len(items)})")
        strips.append((classes[c], note, items))
    return strips


def _evaluate_report(path: Path, inp: EvalInputs, icfg: Any, m: dict, d: Decision, comp_header, comp_rows,
                     cm_png: Path, map_png: Path | None, class_header, class_rows) -> None:
    headline = {k: m[k] for k in ("n_queries", "accuracy", f"top{icfg.top_k}_accuracy", "macro_precision",
                                   "macro_recall", "macro_f1", "weighted_f1", "balanced_accuracy",
                                   "precision_at_1", "map_at_r", "rejection_rate", "accepted_accuracy",
                                   "gallery_size", "images_per_s", "mean_latency_ms") if k in m}
    rep = R.Report(title="Plankton recognition: test-set evaluation", facts=list(inp.facts) + [
        ("gallery", f"{icfg.gallery} ({len(inp.gallery)} vectors)"), ("method", icfg.method),
        ("reject_below", icfg.reject_below), ("open-set rule", m.get("reject_rule")),
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
    R.write_report(path, rep)


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
    from . import review as RV
    from . import samples as S
    from .plots import plot_sample_counts

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
        out.update(M.rejection_metrics(None, d.raw, d.accepted))
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
    h_counts, r_counts = S.sample_counts(samples, d.final, classes, order, unreadable)
    write_csv(output("sample_counts.csv"), h_counts, r_counts)
    counts_png = output("sample_counts.png")
    plot_sample_counts(order, classes, np.array([r[1:C + 2] for r in r_counts], dtype=np.int64).reshape(len(order), C + 1),
                       counts_png, title=f"Predicted classes per sample ({name})")
    out["samples"] = {r[0]: {"total": r[-2], "unknown": r[-3], "unreadable": r[-1]} for r in r_counts}

    # ---- EcoTaxa
    predicted = [None if d.final[q] == M.UNKNOWN else classes[int(d.final[q])] for q in range(n)]
    base = Path(root) if root is not None else (Path(os.path.commonpath([str(Path(p).parent) for p in queries.paths]))
                                                 if n else Path("."))
    eco, eco_left_out = S.ecotaxa_rows(queries.paths, samples, predicted, base,
                                       {"similarity": d.best_sim, "margin": d.margin, "knn_similarity": scores["knn"]})
    eco_path = output(f"ecotaxa_{name}.tsv")
    S.write_tsv(eco_path, eco)
    out["ecotaxa"] = {"file": eco_path.name, "img_file_name_relative_to": str(base), "rows": len(eco) - 2,
                      "left_out": [{"path": p, "reason": why} for p, why in eco_left_out]}
    for p, why in eco_left_out:  # !r: the name's control characters stay visible on one log line
        log.warning("%s: %r left out: %s", eco_path.name, p, why)

    # ---- review, most doubtful first, and the corrections sheet
    low = rule.auto_cuts.get("similarity")
    order_q, reasons = S.doubt_order(d.final, d.best_sim, d.margin, low, icfg.review_margin)
    out["n_doubtful"] = int(sum(1 for r in reasons if r))
    sheet = [(queries.paths[q], _label(classes, int(d.final[q]))) for q in order_q]
    write_csv(output("corrections.csv"), ["path", "predicted", "validated"], [[p, c, ""] for p, c in sheet])
    shown = order_q[:max(0, icfg.review_max)]
    items = [RV.ReviewItem(queries.paths[q], samples[q], _label(classes, int(d.final[q])), float(d.best_sim[q]),
                           float(d.margin[q]), float(scores["knn"][q]), reasons[q],
                           [(gallery.paths[int(nb_idx[q, j])], classes[int(gallery.labels[int(nb_idx[q, j])])],
                             float(nb_sims[q, j])) for j in range(min(REVIEW_NEIGHBOURS, kn))]) for q in shown]
    note = RV.doubt_note(n, out["n_doubtful"], len(items), icfg.review_max,
                         rule.source if rule.cut is not None else None, low, icfg.review_margin)
    review_path = output("review.html")
    RV.write_review(review_path, RV.Review(
        title=f"Review: {name}", note=note, name=name, items=items, rows=sheet,
        classes=[classes[c] for c in np.unique(gallery.labels)] if len(gallery) else list(classes),
        ecotaxa=(eco_path.name, [eco[0], eco[1], *(eco[2 + q] for q in order_q)]), pixel_size_um=pixel_size_um))
    out["review"] = str(review_path)

    # ---- summary and report
    report_path = output("report.html")
    out["report"] = str(report_path)
    write_json(output("metrics.json"), _round(out))
    rep = R.Report(title="Plankton recognition: predictions", facts=list(facts) + [
        ("input", icfg.input), ("gallery", f"{icfg.gallery} ({len(gallery)} vectors)"), ("method", icfg.method),
        ("open-set rule", rule.source), ("suggested reject_below (stage 05)", suggested_reject_below),
        ("review", review_path.name), ("EcoTaxa table", eco_path.name)],
        metrics={k: v for k, v in out.items() if k in ("n_images", "n_unreadable", "n_doubtful", "rejection_rate",
                                                        "n_rejected", "images_per_s", "mean_latency_ms")},
        pixel_size_um=pixel_size_um)
    rep.images.append(("Predicted classes per sample", counts_png, "Stacked counts; white, hatched: unknown."))
    rep.extra_tables.append(("Counts per sample", h_counts, r_counts))
    strip = [R.StripItem(queries.paths[q], "", _label(classes, int(d.final[q])), float(d.best_sim[q]),
                         gallery.paths[int(d.nn_idx[q])], classes[int(gallery.labels[int(d.nn_idx[q])])])
             for q in order_q[:PREDICT_STRIP_MAX]]
    if strip:
        rep.strips.append(("Most doubtful queries beside their nearest gallery image",
                           f"{len(strip)} of {n}; every image with its five neighbours is in {review_path.name}", strip))
    if errors:
        rep.extra_tables.append(("Unreadable files (not classified)", ["path", "reason"], [list(e) for e in errors]))
    if eco_left_out:
        rep.extra_tables.append((f"Left out of {eco_path.name} (classified: see predictions.csv)", ["path", "reason"],
                                 [[repr(p), why] for p, why in eco_left_out]))
    R.write_report(report_path, rep)
    log.info("predicted %d images in %d samples (%d unreadable, %d rejected, %d doubtful); predictions in %s", n,
             len(order), len(errors), out.get("n_rejected", 0), out["n_doubtful"], output("predictions.csv"))
    log.info("review: %s; EcoTaxa table: %s", review_path, eco_path)
    return out


# ----------------------------------------------------------------------------- embedding new images


