"""Stage 05's driver: sweep the LUT pruning threshold on the val split, choose one, write the artefacts.

Reads 04's ``features.sqlite`` (train + extra = gallery, val = queries) and ``model.json``; writes
``threshold_sweep.csv``, ``threshold.json`` and ``threshold_sweep.png``. A gallery of more vectors
than ``search.max_memory_gib`` stays in the store: pruned one class at a time, the val queries
searched block by block (``common.retrieval.streamed``), with the same results.

With ``search.index`` other than ``exact`` the sweep also runs through that FAISS index
(``common.retrieval.ann``), built once over the whole train gallery and searched at each threshold
restricted to the kept rows: the table gains ``index_top1_accuracy`` and the index's agreement
with exact search at that threshold (``index_same_image``, ``index_same_class``). The threshold is
still chosen on the exact columns; ``threshold.json`` records the index's figures at it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..fileio import write_csv, write_json
from ..report.plots import plot_sweep
from ..retrieval.ann import agreement, build_index
from ..retrieval.prune import prune_sweep
from ..retrieval.streamed import fits, is_streamed
from ..retrieval.sweep import (
    LATENCY_QUERIES,
    REJECT_PERCENTILE,
    SWEEP_COLUMNS,
    choose_threshold,
    measure_latency,
    nearest_kept,
    suggested_reject_below,
    sweep_rows,
    sweep_warnings,
    threshold_grid,
)
from ..store.containers import Vectors
from ..store.schema import GALLERY_SPLITS
from . import EXTRACT
from .artefacts import SWEEP_PNG, THRESHOLD_JSON, open_model_store

if TYPE_CHECKING:
    from ..pipeline.context import Context

log = logging.getLogger(__name__)


INDEX_COLUMNS = ["index_top1_accuracy", "index_same_image", "index_same_class"]


def latency(val: Vectors, gal: Vectors, sizes: list[int], lcfg: Any, max_memory_gib: float, device: Any) -> list[float]:
    """ms per query of exact search in a gallery of each pruned size. A streamed gallery is timed
    on random unit vectors in memory (exact search costs the same whatever the vectors), for the
    sizes that fit ``search.max_memory_gib`` (nan for the others: stage 07 would stream them)."""
    q = val.X[:LATENCY_QUERIES]
    if not is_streamed(gal.X):
        return measure_latency(q, gal.X, sizes, lcfg.knn_k, lcfg.block_size, device)
    dim = gal.X.shape[1]
    fit = [n for n in sizes if fits(n, dim, max_memory_gib)]
    if not fit:
        return [float("nan")] * len(sizes)
    G = np.random.default_rng(0).standard_normal((max(fit), dim), dtype=np.float32)
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    ms = dict(zip(fit, measure_latency(q, G, fit, lcfg.knn_k, lcfg.block_size, device)))
    return [ms.get(n, float("nan")) for n in sizes]


def index_sweep(ctx: Context, gal: Vectors, val: Vectors, keeps: Any, neighbours: list, rows: list[dict]) -> dict:
    """Search the val queries through ``search.index`` at every threshold (kept rows only); adds
    ``INDEX_COLUMNS`` to ``rows``. Returns what the index is, for threshold.json."""
    scfg = ctx.cfg.search
    ann = build_index(gal.X, scfg, seed=ctx.cfg.run.seed, device=ctx.device())
    ann.set_query_params(scfg)
    t0 = time.perf_counter()
    for r, keep, (_, exact_idx) in zip(rows, keeps, neighbours):
        _, idx = ann.search(val.X, 1, gal.X, keep=keep)
        agr = agreement(exact_idx, idx, gal.labels)
        found = idx[:, 0] >= 0  # an IVF search restricted to few kept rows can find none in its cells
        r["index_top1_accuracy"] = float((found & (gal.labels[np.where(found, idx[:, 0], 0)] == val.labels)).mean())
        r["index_same_image"], r["index_same_class"] = agr["same_image"], agr["same_class"]
    log.info("swept %d thresholds through %s in %.1f s", len(rows), ann.description, time.perf_counter() - t0)
    return {"index": scfg.index, "factory": ann.description, "build_seconds": round(ann.build_seconds, 3)}


@dataclass
class Sweep:
    """Stage 05's sweep: one row per threshold (``columns``), with what the choice and the files need."""

    rows: list[dict]
    columns: list[str]
    keeps: Any  # per threshold, the gallery rows kept
    neighbours: list  # per threshold, the val queries' (similarities, indices) among the kept rows
    index_info: dict | None  # search.index's description (None: exact search only)
    seconds: dict[str, float]  # prune, queries, latency


def _load(ctx: Context) -> tuple[dict, Any, list[str], Vectors, Vectors]:
    """The store's model record, where the store is, its classes, the gallery (train + extra) and
    the val queries; ``UserError`` when either is empty."""
    scfg = ctx.cfg.search
    with open_model_store(ctx.upstream(EXTRACT), ctx.cfg.store.password_env) as ms:
        model, store, classes = ms.meta, ms.target, list(ms.meta["classes"])
        gal = ms.load(GALLERY_SPLITS, classes, scfg.max_memory_gib if scfg.index == "exact" else None)
        val = ms.load(("val",), classes)
    if len(gal) == 0:
        raise UserError(f"{store} holds no train vectors (the gallery): check split.train and rerun "
                        "01_random_split_dataset.py and 04_extract_features.py")
    if len(val) == 0:
        raise UserError(f"{store} holds no val vectors: stage 05 chooses the threshold on the val split; give "
                        "split.val > 0 and rerun 01_random_split_dataset.py and 04_extract_features.py")
    return model, store, classes, gal, val


def _sweep(ctx: Context, gal: Vectors, val: Vectors, thresholds: list[float], n_classes: int, device: Any) -> Sweep:
    """Prune at every threshold, find the val queries' nearest kept rows, time the search, and
    measure each threshold (through ``search.index`` too when it is not ``exact``)."""
    lcfg, scfg = ctx.cfg.lut, ctx.cfg.search
    dim = gal.X.shape[1]
    log.info("sweeping %d thresholds (%g..%g) over a gallery of %s x %d and %s val queries on %s",
             len(thresholds), thresholds[0], thresholds[-1], f"{len(gal):,}", dim, f"{len(val):,}", device)
    t0 = time.perf_counter()
    keeps = prune_sweep(gal.X, gal.labels, gal.ids, thresholds, lcfg.block_size, device)
    t_prune = time.perf_counter() - t0
    t0 = time.perf_counter()
    neighbours, qstats = nearest_kept(val.X, gal.X, keeps, lcfg.knn_k, lcfg.block_size, device)
    t_query = time.perf_counter() - t0
    t0 = time.perf_counter()
    lat = latency(val, gal, [int(k.sum()) for k in keeps], lcfg, scfg.max_memory_gib, device)
    t_lat = time.perf_counter() - t0
    log.info("pruned at %d thresholds in %.1f s; val neighbours in %.1f s (top-%d lists, %d exact fallbacks); "
             "latency timing %.1f s", len(thresholds), t_prune, t_query, qstats["top_m"], qstats["fallback_queries"],
             t_lat)
    rows = sweep_rows(thresholds, keeps, gal.labels, val.labels, neighbours, n_classes, lcfg.knn_temperature,
                      dim, lat)
    columns = list(SWEEP_COLUMNS)
    index_info = None
    if ctx.cfg.search.index != "exact":
        index_info = index_sweep(ctx, gal, val, keeps, neighbours, rows)
        columns += INDEX_COLUMNS
    for r in rows:
        log.info("t=%-8g kept %7s (%5.1f%%)  top-1 %.4f  k-NN %.4f  macro-F1 %.4f  %.3f ms/query", r["threshold"],
                 f"{r['n_kept']:,}", 100 * r["fraction_kept"], r["top1_accuracy"], r["knn_accuracy"], r["macro_f1"],
                 r["latency_ms"])
    return Sweep(rows, columns, keeps, neighbours, index_info,
                 {"prune": t_prune, "queries": t_query, "latency": t_lat})


def _choose(sw: Sweep, lcfg: Any, gal: Vectors, val: Vectors) -> tuple[int, str, float | None]:
    """The chosen row (``lut.rule``), why, and the suggested ``inference.reject_below`` at it (from
    the val queries' best similarities there); the index's figures at it join ``sw.index_info``."""
    i, reason = choose_threshold(sw.rows, lcfg)
    chosen = sw.rows[i]
    sims, idx = sw.neighbours[i]
    correct = gal.labels[idx[:, 0]] == val.labels
    reject = suggested_reject_below(sims[:, 0], correct)
    log.info("chosen: %s", reason)
    if sw.index_info is not None:
        sw.index_info.update({c: chosen[c] for c in INDEX_COLUMNS})
        log.info("through %s at that threshold: val top-1 accuracy %.4f, same top-1 image as exact search %.4f, "
                 "same class %.4f", sw.index_info["factory"], *(chosen[c] for c in INDEX_COLUMNS))
    if reject is not None:
        log.info("suggested inference.reject_below: %.4f (%g%% of the correct val predictions at threshold %g have "
                 "a lower best similarity)", reject, REJECT_PERCENTILE, chosen["threshold"])
    return i, reason, reject


def _write(ctx: Context, sw: Sweep, i: int, reason: str, reject: float | None, model: dict, gal: Vectors,
           val: Vectors, thresholds: list[float], warnings: list[str]) -> None:
    """threshold_sweep.csv, threshold.json and threshold_sweep.png."""
    lcfg, chosen = ctx.cfg.lut, sw.rows[i]
    write_csv(ctx.output("threshold_sweep.csv"), sw.columns, ([r[c] for c in sw.columns] for r in sw.rows))
    write_json(ctx.output(THRESHOLD_JSON), {
        "threshold": chosen["threshold"], "rule": lcfg.rule, "reason": reason, "metrics": chosen,
        "model_id": model["model_id"], "checkpoint_sha256": model["checkpoint_sha256"],
        "suggested_reject_below": reject, "reject_percentile": REJECT_PERCENTILE,
        "n_gallery": len(gal), "n_val": len(val), "knn_k": lcfg.knn_k,
        "knn_temperature": lcfg.knn_temperature, "thresholds": thresholds, "warnings": warnings,
        **({"search": sw.index_info} if sw.index_info is not None else {}),
    })
    plot_sweep(sw.rows, i, ctx.output(SWEEP_PNG))


def main(ctx: Context) -> dict[str, Any]:
    """Sweep the pruning threshold on the val split, choose one, write the sweep and the choice."""
    lcfg = ctx.cfg.lut
    device = ctx.device()
    thresholds = threshold_grid(lcfg)
    model, _, classes, gal, val = _load(ctx)
    sw = _sweep(ctx, gal, val, thresholds, len(classes), device)
    i, reason, reject = _choose(sw, lcfg, gal, val)
    warnings = sweep_warnings(sw.rows, i, lcfg)
    for w in warnings:
        log.warning("caution: %s", w)
    _write(ctx, sw, i, reason, reject, model, gal, val, thresholds, warnings)
    chosen = sw.rows[i]
    return {"threshold": chosen["threshold"], "rule": lcfg.rule, "n_kept": chosen["n_kept"],
            "n_gallery": len(gal), "macro_f1": chosen["macro_f1"],
            "top1_accuracy": chosen["top1_accuracy"], "suggested_reject_below": reject, "warnings": warnings,
            "model_id": model["model_id"], "seconds": {k: round(v, 3) for k, v in sw.seconds.items()}}
