"""Stage 07: classify queries against the gallery, measure, compare, and write a report.

Two modes (``inference.mode``):

- **evaluate**: the test split's vectors from the feature store (embedded on the fly when the
  store holds none) against the pruned LUT (``inference.gallery=lut``) or the full train
  gallery (``full``). Writes ``predictions.csv``, ``metrics.json``, ``classification_report.csv``,
  ``confusion_matrix.png``, ``embedding_map.png``, ``comparison.csv`` (retrieval against the
  classical classifiers of ``common.classifiers`` on the same frozen vectors) and ``report.html``.
- **predict**: every image under ``inference.input`` (recursively, hidden files skipped),
  embedded with the store's checkpoint and evaluation transform; unreadable images are listed in
  ``predictions.csv`` with the reason, never fatal. Writes ``predictions.csv``, ``metrics.json``
  (counts and speed) and ``report.html``.

Classification (exact cosine search on L2-normalised float32 vectors, blocked matrix products):

- the **candidates** of a query are classes ranked by the similarity of their nearest gallery
  item (``search_classes``: one blocked pass over the class-sorted gallery, a max per class's
  columns), so the top-5 list holds five different classes;
- ``inference.method=top1``: the class of the nearest gallery item (= candidate 1);
  ``knn``: DINO's weighted vote of the ``k`` nearest items (``common.retrieval.topk`` and
  ``knn_vote``, weight ``exp(sim / T)``); the candidates are then ordered by vote score first;
- open-set rejection: a query whose best similarity is below ``inference.reject_below`` is
  labelled ``unknown`` (accepted = 0); stage 05's ``suggested_reject_below`` is logged.

A query embedded by one checkpoint is never matched against a gallery embedded by another: the
model ids of the query vectors, the gallery and (in predict mode) the checkpoint file's sha256 must
agree, else ``UserError``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import metrics as M
from . import report as R
from .errors import UserError
from .fileio import read_json, write_csv, write_json

log = logging.getLogger(__name__)

PREDICT_STRIP_MAX = 48  # predict mode report: queries shown beside their nearest gallery image
RETRIEVAL_TOP1 = "retrieval_top1"
RETRIEVAL_KNN = "retrieval_knn"

Output = Callable[..., Path]  # ctx.output: relative parts -> registered path under the stage folder


# ----------------------------------------------------------------------------- data holders


@dataclass
class Vectors:
    """Vectors of one set of images: ``X`` (N, D) float32 L2-normalised, labels (-1 = none), paths."""

    X: np.ndarray
    labels: np.ndarray
    paths: list[str]

    def __post_init__(self) -> None:
        self.X = np.ascontiguousarray(self.X, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not (self.X.shape[0] == self.labels.shape[0] == len(self.paths)):
            raise ValueError(f"vectors, labels and paths differ in length: {self.X.shape[0]}, "
                             f"{self.labels.shape[0]}, {len(self.paths)}")

    def __len__(self) -> int:
        return int(self.X.shape[0])


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


@dataclass
class ClassSearch:
    """Per-class nearest gallery items: ``sims`` (Q, C) (-inf: class absent), ``idx`` (Q, C) (-1)."""

    sims: np.ndarray
    idx: np.ndarray
    seconds: float = 0.0


# ----------------------------------------------------------------------------- search and decide


def _np(a: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like as a numpy array."""
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _retrieval():
    from . import retrieval  # written by another module owner; imported when first needed

    return retrieval


def search_classes(queries: np.ndarray, gallery: Vectors, n_classes: int, block_size: int,
                   device: Any = None) -> ClassSearch:
    """Exact nearest gallery item of every class for every query, in one pass over the gallery.

    The gallery is sorted by class once, so each class is a contiguous block of columns. For each
    block of ``block_size`` queries: one float32 matrix product with the whole gallery (as
    ``common.retrieval.topk`` does; memory ``block_size x G`` float32), then a max over each class's
    columns (``torch.max`` returns the first of equal maxima: ties go to the lower gallery row).
    The per-class maxima cost one pass, where a ``topk`` call per class re-reads the queries
    once per class (about 1.4x slower at DYB scale, 87 classes).
    """
    import torch

    t0 = time.perf_counter()
    Q, C = queries.shape[0], n_classes
    sims = np.full((Q, C), -np.inf, dtype=np.float32)
    idx = np.full((Q, C), -1, dtype=np.int64)
    if Q and len(gallery):
        if block_size < 1:
            raise UserError(f"inference.block_size: must be >= 1, got {block_size}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        order = np.argsort(gallery.labels, kind="stable")  # each class one contiguous slice, rows kept in order
        lab = gallery.labels[order]
        starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
        ends = np.r_[starts[1:], lab.size]
        cls = lab[starts]  # the classes present, in column order
        gt = torch.from_numpy(np.ascontiguousarray(gallery.X[order])).to(dev).t()  # (D, G)
        q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        with torch.inference_mode():
            for a in range(0, Q, block_size):
                qb = q_all[a:a + block_size].to(dev, non_blocking=True)
                s = qb @ gt  # (B, G) float32
                v = torch.empty((qb.shape[0], cls.size), dtype=torch.float32, device=dev)
                j = torch.empty((qb.shape[0], cls.size), dtype=torch.int64, device=dev)
                for c, (lo, hi) in enumerate(zip(starts, ends)):
                    v[:, c], j[:, c] = s[:, lo:hi].max(dim=1)
                sims[a:a + qb.shape[0], cls] = v.cpu().numpy()
                idx[a:a + qb.shape[0], cls] = order[j.cpu().numpy() + starts[None, :]]
    return ClassSearch(sims, idx, time.perf_counter() - t0)


def _on_device(a: np.ndarray, device: Any) -> Any:
    """On a GPU, copy once to the device (the per-class searches then reuse it); else leave as numpy."""
    if device is not None and str(device).startswith("cuda"):
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
    return Decision(raw, final, accepted, cand, cand_sims, best_sim, nn_idx)


def classify(queries: np.ndarray, gallery: Vectors, n_classes: int, *, method: str, top_k: int,
             k: int, temperature: float, reject_below: float | None, block_size: int, device: Any = None,
             class_search: ClassSearch | None = None) -> Decision:
    """Classify ``queries`` (Q, D) against ``gallery`` by ``top1`` or ``knn`` (see the module docstring)."""
    if len(gallery) == 0:
        raise UserError("the gallery is empty: rerun 06_prune_features.py (or use inference.gallery=full)")
    t0 = time.perf_counter()
    cs = class_search if class_search is not None else search_classes(queries, gallery, n_classes, block_size, device)
    extra = 0.0 if class_search is None else cs.seconds  # reused search: count its time too
    if method == "top1":
        d = decide(cs, top_k, reject_below)
    elif method == "knn":
        r = _retrieval()
        kk = max(1, min(k, len(gallery)))
        sims, idx = r.topk(queries, gallery.X, kk, block_size=block_size, device=device)
        pred, scores = r.knn_vote(sims, idx, gallery.labels, n_classes, temperature)
        d = decide(cs, top_k, reject_below, _np(pred).astype(np.int64), _np(scores))
    else:
        raise UserError(f"inference.method: expected top1 or knn, got {method!r}")
    d.seconds = time.perf_counter() - t0 + extra
    return d


# ----------------------------------------------------------------------------- outputs


def _label(classes: Sequence[str], i: int) -> str:
    return M.UNKNOWN_NAME if i == M.UNKNOWN else classes[i]


def prediction_rows(queries: Vectors, d: Decision, classes: Sequence[str], gallery: Vectors,
                    extra_preds: dict[str, np.ndarray], with_truth: bool,
                    errors: Sequence[tuple[str, str]] = ()) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of ``predictions.csv`` (unreadable images last, with their reason)."""
    k = d.candidates.shape[1]
    header = ["path"] + (["true_label"] if with_truth else []) + ["predicted_label", "similarity"]
    for j in range(1, k + 1):
        header += [f"top{j}_label", f"top{j}_similarity"]
    header += ["nearest_gallery_path", "accepted"] + [f"pred_{n}" for n in extra_preds] + ["error"]
    rows: list[list[Any]] = []
    for q in range(len(queries)):
        row: list[Any] = [queries.paths[q]]
        if with_truth:
            row.append(_label(classes, int(queries.labels[q])))
        row += [_label(classes, int(d.final[q])), f"{d.best_sim[q]:.6f}"]
        for j in range(k):
            c = int(d.candidates[q, j])
            row += ["", ""] if c < 0 else [classes[c], f"{d.cand_sims[q, j]:.6f}"]
        row += [gallery.paths[int(d.nn_idx[q])], int(d.accepted[q])]
        row += [_label(classes, int(p[q])) for p in extra_preds.values()]
        row.append("")
        rows.append(row)
    for path, reason in errors:
        rows.append([path] + ([""] if with_truth else []) + ["", ""] + ["", ""] * k + ["", 0]
                    + [""] * len(extra_preds) + [reason])
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
    return int(g.X.nbytes + g.labels.nbytes)


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
    kw = dict(top_k=icfg.top_k, k=icfg.k, temperature=icfg.temperature, block_size=icfg.block_size, device=device)
    log.info("searching %d test queries against a %s gallery of %d vectors (%d classes)", len(test),
             icfg.gallery, len(gallery), np.unique(gallery.labels).size)
    cs = search_classes(test.X, gallery, C, icfg.block_size, device)
    decisions = {
        "top1": classify(test.X, gallery, C, method="top1", reject_below=icfg.reject_below, class_search=cs, **kw),
        "knn": classify(test.X, gallery, C, method="knn", reject_below=icfg.reject_below, class_search=cs, **kw),
    }
    # comparison table: each method's own work (k-NN: its k-neighbour search and vote; its
    # candidate list reuses the per-class search, which the headline timing does include)
    own_seconds = {"top1": decisions["top1"].seconds, "knn": decisions["knn"].seconds - cs.seconds}
    d = decisions[icfg.method]
    y = test.labels
    n = len(test)

    out: dict[str, Any] = {"mode": "evaluate", "gallery": icfg.gallery, "gallery_size": len(gallery),
                           "method": icfg.method}
    out.update(M.classification_metrics(y, d.final, C, d.candidates, icfg.top_k))
    topk = _retrieval().topk

    def topk_np(q, g, k, **kw):
        s, i = topk(q, g, k, **kw)
        return _np(s), _np(i)

    # on a GPU both matrices go to the device once, not once per class searched
    out.update(M.retrieval_metrics(_on_device(test.X, device), y, _on_device(gallery.X, device), gallery.labels,
                                   topk_np, block_size=icfg.block_size, device=device))
    out["reject_below"] = icfg.reject_below
    if icfg.reject_below is not None:
        out.update(M.rejection_metrics(y, d.raw, d.accepted))
        out["accuracy_without_rejection"] = float((d.raw == y).mean())
    out["suggested_reject_below"] = inp.suggested_reject_below
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
    if icfg.classifiers:
        comp, cpreds, fitted_info = _classical(inp, icfg, output, device, seed)
        comp_rows += comp
        preds.update(cpreds)

    comp_header = ["method", "accuracy", "macro_f1", "balanced_accuracy", "fit_time_s", "predict_ms_per_image",
                   "model_size_bytes"]
    write_csv(output("comparison.csv"), comp_header,
              [[r[0], f"{r[1]:.6f}", f"{r[2]:.6f}", f"{r[3]:.6f}", f"{r[4]:.3f}", f"{r[5]:.6f}", r[6]] for r in comp_rows])
    out["classifiers"] = fitted_info

    # ---- files
    header, rows = prediction_rows(test, d, classes, gallery, preds, with_truth=True)
    write_csv(output("predictions.csv"), header, rows)
    g_counts = np.bincount(gallery.labels, minlength=C)
    h2, r2 = class_report_rows(y, d.final, classes, g_counts)
    write_csv(output("classification_report.csv"), h2, r2)
    cm = M.confusion(y, d.final, C)
    rejected = bool((d.final == M.UNKNOWN).any())
    cm_png = R.confusion_matrix_png(cm if rejected else cm[:, :C], classes,
                                    list(classes) + ([M.UNKNOWN_NAME] if rejected else []),
                                    output("confusion_matrix.png"))
    map_png = None
    if icfg.embedding_map != "none":
        map_png = R.embedding_map_png(test.X, y, classes, output("embedding_map.png"), icfg.embedding_map, seed)
    report_path = output("report.html")
    out["report"] = str(report_path)
    write_json(output("metrics.json"), _round(out))
    _evaluate_report(report_path, inp, icfg, out, d, comp_header, comp_rows, cm_png, map_png, h2, r2)
    log.info("test: accuracy %.4f, top-%d %.4f, macro-F1 %.4f, balanced accuracy %.4f, MAP@R %.4f (%s, %s gallery)",
             out["accuracy"], icfg.top_k, out.get(f"top{icfg.top_k}_accuracy", float("nan")), out["macro_f1"],
             out["balanced_accuracy"], out["map_at_r"], icfg.method, icfg.gallery)
    log.info("report: %s", report_path)
    return out


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
        ("reject_below", icfg.reject_below), ("suggested reject_below (stage 05)", inp.suggested_reject_below)],
        metrics=headline)
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


def list_images(folder: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under ``folder`` (recursively, sorted, hidden files and folders skipped).

    Uses ``common.data``'s listing and image suffixes (as stage 01 does). Returns (image paths,
    [(path, reason)] for the other files, reported in predictions.csv rather than dropped silently).
    """
    from .data import IMAGE_SUFFIXES, walk_files

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"inference.input: {root} is not a folder")
    images, others = [], []
    for p in walk_files(root.resolve()):
        (images if p.suffix.lower() in IMAGE_SUFFIXES else others).append(str(p))
    return images, [(p, "not an image file (suffix)") for p in others]


def predict(queries: Vectors, gallery: Vectors, classes: list[str], icfg: Any, output: Output, *,
            classifiers: dict[str, Any] | None = None, errors: Sequence[tuple[str, str]] = (),
            timing: dict[str, float] | None = None, facts: Sequence[tuple[str, Any]] = (),
            suggested_reject_below: float | None = None, device: Any = None) -> dict[str, Any]:
    """Predict mode on embedded query vectors (labels unused); writes predictions, metrics, report."""
    C = len(classes)
    timing = dict(timing or {})
    d = classify(queries.X, gallery, C, method=icfg.method, top_k=icfg.top_k, k=icfg.k,
                 temperature=icfg.temperature, reject_below=icfg.reject_below, block_size=icfg.block_size,
                 device=device) if len(queries) else None
    timing["search_s"] = d.seconds if d is not None else 0.0
    extra: dict[str, np.ndarray] = {}
    for name, f in (classifiers or {}).items():
        t0 = time.perf_counter()
        extra[name] = f.predict(queries.X)[0] if len(queries) else np.zeros(0, np.int64)
        timing[f"{name}_s"] = time.perf_counter() - t0
    n = len(queries)
    out: dict[str, Any] = {"mode": "predict", "gallery": icfg.gallery, "gallery_size": len(gallery),
                           "method": icfg.method, "n_images": n, "n_unreadable": len(errors),
                           "reject_below": icfg.reject_below, "suggested_reject_below": suggested_reject_below}
    if d is not None:
        out.update(M.rejection_metrics(None, d.raw, d.accepted))
        counts = np.bincount(d.final[d.final >= 0], minlength=C)
        out["predicted_counts"] = {classes[c]: int(counts[c]) for c in np.flatnonzero(counts)}
    else:
        d = decide(ClassSearch(np.zeros((0, C), np.float32), np.zeros((0, C), np.int64)), icfg.top_k, None)
    total = sum(v for k, v in timing.items() if k in ("decode_embed_s", "search_s"))
    out["timing_scope"] = "decode+embed+search"
    out["images_per_s"] = n / total if total > 0 and n else float("nan")
    out["mean_latency_ms"] = 1000.0 * total / n if n else float("nan")
    out["timing_s"] = _round(timing, 4)
    header, rows = prediction_rows(queries, d, classes, gallery, extra, with_truth=False, errors=errors)
    write_csv(output("predictions.csv"), header, rows)
    report_path = output("report.html")
    out["report"] = str(report_path)
    write_json(output("metrics.json"), _round(out))
    rep = R.Report(title="Plankton recognition: predictions", facts=list(facts) + [
        ("input", icfg.input), ("gallery", f"{icfg.gallery} ({len(gallery)} vectors)"), ("method", icfg.method),
        ("reject_below", icfg.reject_below), ("suggested reject_below (stage 05)", suggested_reject_below)],
        metrics={k: v for k, v in out.items() if k in ("n_images", "n_unreadable", "rejection_rate", "n_rejected",
                                                        "images_per_s", "mean_latency_ms")})
    if out.get("predicted_counts"):
        rep.extra_tables.append(("Predicted classes", ["class", "images"],
                                 sorted(out["predicted_counts"].items(), key=lambda kv: -kv[1])))
    items = [R.StripItem(queries.paths[q], "", _label(classes, int(d.final[q])), float(d.best_sim[q]),
                         gallery.paths[int(d.nn_idx[q])], classes[int(gallery.labels[int(d.nn_idx[q])])])
             for q in range(min(n, PREDICT_STRIP_MAX))]
    if items:
        rep.strips.append(("Queries beside their nearest gallery image", f"first {len(items)} of {n}", items))
    if errors:
        rep.extra_tables.append(("Unreadable files (not classified)", ["path", "reason"], [list(e) for e in errors]))
    R.write_report(report_path, rep)
    log.info("predicted %d images (%d unreadable, %d rejected); predictions in %s", n, len(errors),
             out.get("n_rejected", 0), output("predictions.csv"))
    log.info("report: %s", report_path)
    return out


# ----------------------------------------------------------------------------- embedding new images


class _SafeImages:
    """Map-style dataset over image paths that never raises on a bad image.

    ``__getitem__`` returns ``(tensor, index, "")`` or, for an unreadable image, ``(zeros, index,
    reason)``: one corrupt file in a folder of new images is reported, not fatal.
    """

    def __init__(self, paths: Sequence[str], transform: Callable, image_size: int):
        self.paths = list(paths)
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        from .data import load_rgb
        from .errors import ImageReadError

        try:
            return self.transform(load_rgb(self.paths[i])), i, ""
        except ImageReadError as e:
            reason = str(e).splitlines()[0] if str(e) else "unreadable image"
            reason = reason.removeprefix(f"{self.paths[i]}: ")  # the path has its own column
        except (OSError, ValueError) as e:  # a decoder error that load_rgb let through
            reason = f"{e.__class__.__name__}: {e}".splitlines()[0]
        return torch.zeros(3, self.image_size, self.image_size), i, reason


def _collate(batch):
    import torch

    xs, idx, reasons = zip(*batch)
    return torch.stack(xs), list(idx), list(reasons)


def embed_paths(paths: Sequence[str], model: Any, transform: Callable, image_size: int, *,
                embedding: str, batch_size: int, num_workers: int, device: Any, amp: str = "off",
                embed_batch: Callable | None = None) -> tuple[np.ndarray, list[int], list[tuple[str, str]], dict]:
    """Embed images in batches with a progress bar; unreadable ones are skipped and reported.

    Returns (vectors (N_ok, D) float32 L2-normalised, indices of the embedded paths, [(path, reason)]
    for the unreadable ones, timing: ``loader_wait_s`` (decoding and transforms, or waiting for the
    workers doing them), ``embed_s`` (forward passes), ``decode_embed_s`` (both)).
    ``embed_batch(model, x, embedding, amp, device) -> (B, D)`` is ``common.extract``'s batch
    embedding (the same code that filled the store).
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    if embed_batch is None:
        from .extract import embed_batch  # the store's own embedding code: same vectors, same numbers
    device = torch.device(device) if device is not None else torch.device("cpu")
    ds = _SafeImages(paths, transform, image_size)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    vecs: list[np.ndarray] = []
    ok: list[int] = []
    errors: list[tuple[str, str]] = []
    t_wait = t_embed = 0.0
    t0 = time.perf_counter()
    it = iter(loader)
    with tqdm(total=len(ds), desc="embedding", unit="img", disable=None) as bar:
        while True:
            ta = time.perf_counter()
            try:
                x, idx, reasons = next(it)
            except StopIteration:
                break
            tb = time.perf_counter()
            t_wait += tb - ta
            good = [j for j, r in enumerate(reasons) if not r]
            for j, r in enumerate(reasons):
                if r:
                    errors.append((ds.paths[idx[j]], r))
                    log.warning("unreadable image %s: %s", ds.paths[idx[j]], r)
            if good:
                xb = x if len(good) == len(reasons) else x[good]
                v = embed_batch(model, xb, embedding, amp, device)  # (B, D)
                vecs.append(_np(v).astype(np.float32, copy=False))
                ok += [idx[j] for j in good]
            t_embed += time.perf_counter() - tb
            bar.update(len(reasons))
    total = time.perf_counter() - t0
    dim = vecs[0].shape[1] if vecs else 0
    X = np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)
    return X, ok, errors, {"loader_wait_s": t_wait, "embed_s": t_embed, "decode_embed_s": total}


# ----------------------------------------------------------------------------- the feature store


STORE_FILE = "features.sqlite"
LUT_JSON = "lut.json"
EVALUATE_ONLY = ("classification_report.csv", "confusion_matrix.png", "embedding_map.png", "comparison.csv")


def check_same_model(query_model: Any, gallery_model: Any, what: str) -> None:
    """Refuse to match vectors of one checkpoint against a gallery of another (``UserError``)."""
    if query_model != gallery_model:
        raise UserError(f"{what} were embedded by another checkpoint ({query_model!r}) than the gallery "
                        f"({gallery_model!r}): rerun 04_extract_features.py and 06_prune_features.py")


@dataclass
class StoreData:
    """What stage 07 reads from the feature store and splits.csv: one model's vectors only."""

    classes: list[str]
    model: Any  # common.features.ModelInfo: checkpoint sha256, embedding, preprocessing
    train: Vectors
    val: Vectors
    test: Vectors
    gallery: Vectors
    test_rows: list = field(default_factory=list)  # splits.csv rows of the test split
    facts: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def model_id(self) -> int:
        return int(self.model.id)


def _split_vectors(store: Any, split: str, model_id: int, classes: list[str]) -> tuple[Vectors, np.ndarray]:
    """(vectors with class indices and image paths, store image ids) of one split."""
    ids, labels, X = store.load_matrix(split, model_id)
    idx = {c: i for i, c in enumerate(classes)}
    try:
        lab = np.fromiter((idx[x] for x in labels), dtype=np.int64, count=len(labels))
    except KeyError as e:
        raise UserError(f"{store.path} holds label {e.args[0]!r} that splits.csv does not: "
                        "rerun 04_extract_features.py") from None
    path_of = {r.id: r.path for r in store.images(split)}
    return Vectors(X, lab, [path_of[int(i)] for i in ids]), np.asarray(ids, dtype=np.int64)


def load_store_data(store_path: Path, splits_csv: Path, gallery_kind: str, model_id: int | None = None,
                    lut_json: Path | None = None) -> StoreData:
    """Load one model's train/val/test vectors and the gallery (the LUT or all train vectors).

    ``model_id``: the model stage 04 wrote (its manifest's metrics; the store's most recent
    complete model when None). ``lut_json``: stage 06's record of the LUT it wrote; it must name
    the same model as the test vectors (else ``UserError``: a gallery of another checkpoint), and
    its kept count must match the LUT read back from the store.
    """
    from .data import class_names, read_splits
    from .features import FeatureStore
    from .lut import kept_ids_sha256

    rows = read_splits(splits_csv)
    classes = list(class_names(rows))
    with FeatureStore(store_path) as store:
        info = store.require_complete(model_id) if model_id is not None else store.current_model()
        if list(info.classes) != classes:
            raise UserError(f"{store_path}: the vectors' checkpoint has {len(info.classes)} classes but {splits_csv} has "
                            f"{len(classes)}: rerun 04_extract_features.py")
        train, train_ids = _split_vectors(store, "train", info.id, classes)
        val, _ = _split_vectors(store, "val", info.id, classes)
        test, _ = _split_vectors(store, "test", info.id, classes)
        if gallery_kind == "full":
            gallery, desc = train, f"full train gallery ({len(train)} vectors)"
        else:
            if lut_json is None or not lut_json.is_file():
                raise UserError(f"{lut_json} is missing: run 06_prune_features.py (or use inference.gallery=full)")
            meta = read_json(lut_json)
            lut_model, lut_ckpt = meta.get("model_id"), meta.get("checkpoint_sha256")
            if (lut_model is not None and int(lut_model) != info.id) or (lut_ckpt and lut_ckpt != info.checkpoint_sha256):
                raise UserError(f"{lut_json} is the LUT of model {lut_model} (checkpoint {str(lut_ckpt)[:12]}), but the "
                                f"store's vectors are of {info.describe()}: a gallery of another checkpoint is never "
                                "used: rerun 06_prune_features.py")
            kept = store.load_lut(info.id, meta.get("threshold"))
            if meta.get("n_after") is not None and int(meta["n_after"]) != kept.size:
                raise UserError(f"the LUT in {store_path} has {kept.size} rows but {lut_json} records "
                                f"{meta['n_after']}: rerun 06_prune_features.py")
            if meta.get("kept_ids_sha256") and meta["kept_ids_sha256"] != kept_ids_sha256(kept):
                raise UserError(f"the LUT in {store_path} is not the one {lut_json} records (kept ids differ): "
                                "rerun 06_prune_features.py")
            pos = np.searchsorted(train_ids, kept)
            if kept.size and (pos.max() >= train_ids.size or not np.array_equal(train_ids[pos], kept)):
                raise UserError(f"{store_path}: the LUT names images that are not train vectors of "
                                f"{info.describe()}: rerun 06_prune_features.py")
            gallery = Vectors(train.X[pos], train.labels[pos], [train.paths[i] for i in pos])
            desc = f"LUT at threshold {meta.get('threshold')}: {len(gallery)} of {len(train)} train vectors"
    facts = [("model", info.describe()), ("backbone", info.backbone), ("image size", info.image_size),
             ("gallery", desc), ("classes", len(classes))]
    return StoreData(classes=classes, model=info, train=train, val=val, test=test, gallery=gallery,
                     test_rows=[r for r in rows if r.split == "test"], facts=facts)


# ----------------------------------------------------------------------------- the stage


def _threshold_info(sweep_dir: Path | None) -> tuple[Path | None, float | None]:
    if sweep_dir is None:
        return None, None
    png = sweep_dir / "threshold_sweep.png"
    tj = sweep_dir / "threshold.json"
    suggested = None
    if tj.is_file():
        try:
            v = read_json(tj).get("suggested_reject_below")
            suggested = float(v) if v is not None else None
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.warning("cannot read suggested_reject_below from %s: %s", tj, e)
    return (png if png.is_file() else None), suggested


def run_stage(ctx: Any) -> dict[str, Any]:
    """Stage 07's ``main``: load the store, classify, measure, compare, report (see the module docstring)."""
    from .stage import read_manifest

    cfg, icfg = ctx.cfg, ctx.cfg.inference
    splits_dir = ctx.upstream("01_random_split_dataset")
    ctx.upstream("02_mean_std_variables")
    ctx.upstream("03_main_supcon")
    store_dir = ctx.upstream("04_extract_features")
    model_id = ((read_manifest(store_dir) or {}).get("metrics") or {}).get("model_id")
    lut_json = ctx.upstream("06_prune_features") / LUT_JSON if icfg.gallery == "lut" else None
    sweep_png, suggested = _threshold_info(ctx.upstream("05_lut_threshold", required=False))
    if suggested is not None:
        log.info("stage 05 suggests inference.reject_below=%.4f (now %s)", suggested, icfg.reject_below)
    if icfg.reject_below is None:
        log.info("open-set rejection is off (inference.reject_below=null)")
    device = ctx.device()
    data = load_store_data(store_dir / STORE_FILE, splits_dir / "splits.csv", icfg.gallery, model_id, lut_json)
    facts = [("run folder", str(ctx.run_dir)), *data.facts]
    for f in EVALUATE_ONLY if icfg.mode == "predict" else ():
        stale = ctx.dir / f
        if stale.is_file():
            stale.unlink()  # an evaluate run's artefact would be mistaken for this run's
            log.info("removed %s (written by an earlier evaluate run)", stale)

    if icfg.mode == "evaluate":
        test, embed_s = data.test, 0.0
        if len(test) == 0 and data.test_rows:
            log.info("the store holds no test vectors: embedding the test split's %d images now", len(data.test_rows))
            test, embed_s = _embed_split(ctx, data, device)
        inp = EvalInputs(classes=data.classes, test=test, gallery=data.gallery, train=data.train, val=data.val,
                         model_id=data.model_id, facts=facts, sweep_png=sweep_png,
                         suggested_reject_below=suggested, embed_seconds=embed_s)
        m = evaluate(inp, icfg, ctx.output, device=device, seed=cfg.run.seed)
        keys = ("accuracy", f"top{icfg.top_k}_accuracy", "macro_f1", "balanced_accuracy", "map_at_r",
                "rejection_rate", "accepted_accuracy", "gallery_size", "report")
        return {k: m[k] for k in keys if k in m}

    # ---- predict mode
    images, not_images = list_images(icfg.input)
    if not_images:
        log.info("%d files under %s are not images by their suffix: listed in predictions.csv", len(not_images),
                 icfg.input)
    if not images:
        raise UserError(f"inference.input: no image files under {icfg.input}")
    model, transform = load_query_model(ctx, data, device)
    X, ok, errors, timing = embed_paths(images, model, transform, data.model.image_size,
                                        embedding=data.model.embedding, batch_size=icfg.batch_size,
                                        num_workers=cfg.data.num_workers, device=device, amp=cfg.extract.amp)
    queries = Vectors(X, np.full(len(ok), -1), [images[i] for i in ok])
    clfs = _classifiers_for_predict(ctx, data, device)
    m = predict(queries, data.gallery, data.classes, icfg, ctx.output, classifiers=clfs,
                errors=[*errors, *not_images], timing=timing, facts=facts, suggested_reject_below=suggested,
                device=device)
    return {k: m[k] for k in ("n_images", "n_unreadable", "rejection_rate", "images_per_s", "report") if k in m}


def load_query_model(ctx: Any, data: StoreData, device: Any) -> tuple[Any, Callable]:
    """The store's own checkpoint and evaluation transform, for embedding queries.

    The checkpoint is ``extract.checkpoint`` (as stage 04 resolves it); its sha256 must be the
    store model's, else ``UserError`` (a query of one checkpoint is never matched against a gallery
    of another). The transform uses the preprocessing the store records (image size, mean, std, fill).
    """
    from .data import eval_transform
    from .extract import prepare_model, resolve_checkpoint
    from .model import load_checkpoint_model

    path = resolve_checkpoint(ctx.upstream("03_main_supcon"), ctx.cfg.extract.checkpoint, ctx.run_dir)
    model, ckpt = load_checkpoint_model(path, map_location="cpu")
    check_same_model(ckpt.get("sha256"), data.model.checkpoint_sha256, f"queries embedded with {path}")
    m = data.model
    transform = eval_transform(m.image_size, m.mean, m.std, m.pad_fill)
    return prepare_model(model, device, ctx.cfg.model.channels_last), transform


def _embed_split(ctx: Any, data: StoreData, device: Any) -> tuple[Vectors, float]:
    """Test vectors embedded now (the store has none): same checkpoint and transform as the store."""
    model, transform = load_query_model(ctx, data, device)
    paths = [r.path for r in data.test_rows]
    X, ok, errors, timing = embed_paths(paths, model, transform, data.model.image_size,
                                        embedding=data.model.embedding, batch_size=ctx.cfg.inference.batch_size,
                                        num_workers=ctx.cfg.data.num_workers, device=device,
                                        amp=ctx.cfg.extract.amp)
    if errors:
        raise UserError(f"test image {errors[0][0]} cannot be read ({errors[0][1]}): rerun 01_random_split_dataset.py")
    idx = {c: i for i, c in enumerate(data.classes)}
    labels = np.array([idx[data.test_rows[i].label] for i in ok], dtype=np.int64)
    return Vectors(X, labels, [paths[i] for i in ok]), timing["decode_embed_s"]


def _classifiers_for_predict(ctx: Any, data: StoreData, device: Any) -> dict[str, Any]:
    """Predict mode: the classifiers saved by an evaluate run (sha256-checked), else fitted now."""
    from . import classifiers as K

    icfg = ctx.cfg.inference
    if not icfg.classifiers:
        return {}
    folder = ctx.dir / "classifiers"
    dim = data.gallery.X.shape[1]
    if (folder / K.CLASSES_FILE).is_file():
        loaded = K.load_classifiers(folder, data.classes, data.model_id, dim, icfg.classifiers)
        missing = [n for n in icfg.classifiers if n not in loaded]
        if not missing:
            log.info("using the classifiers saved in %s: %s", folder, ", ".join(loaded))
            for p in sorted(folder.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    ctx.output("classifiers", p.name)
            return {n: loaded[n] for n in icfg.classifiers}
        log.info("classifiers %s are not saved in %s: fitting them all now", missing, folder)
    if len(data.train) == 0:
        raise UserError("inference.classifiers: the feature store has no train vectors to fit them on")
    fitted = K.fit_classifiers(icfg.classifiers, data.train.X, data.train.labels, data.val.X, data.val.labels,
                               len(data.classes), epochs=icfg.linear_epochs, lr=icfg.linear_lr,
                               batch_size=K.LINEAR_BATCH_SIZE, device=device, seed=ctx.cfg.run.seed)
    paths = K.save_classifiers(fitted, folder, data.classes, data.model_id, dim)
    for p in [*paths.values(), folder / K.CLASSES_FILE, folder / K.DIGESTS_FILE]:
        ctx.output("classifiers", p.name)
    return fitted
