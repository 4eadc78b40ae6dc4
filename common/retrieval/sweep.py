"""Stage 05's sweep: the threshold grid, each val image's nearest kept entries, the rows and the
choice."""
from __future__ import annotations

import hashlib
import math
import time
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, UserError
from ..runtime.device import _device, full_fp32
from . import search as retrieval_search
from .exact import as_tensor, block_topk
from .search import knn_vote
from .similarity import _threads

LATENCY_QUERIES = 32  # stage 05: val queries timed against a gallery of each pruned size (latency column, ms per query)
REJECT_PERCENTILE = 5.0  # stage 05: suggested_reject_below = this percentile of the best similarity of correct val predictions
TOP_M_FACTOR = 8  # stage 05: neighbour lists hold this many times k / (smallest kept fraction) items (pruning thins near neighbours most)
MIN_TOP_M = 64  # stage 05: fewest neighbours kept per query for the sweep (more when pruning removes much)
FLAT_SWEEP_F1 = 1e-3  # stage 05: a sweep whose val macro-F1 varies less than this over the grid is "flat"
TIE_EPS = 1e-12  # stage 05 rules: metric differences below this count as equal (float noise)


# ----------------------------------------------------------------------------- thresholds


def threshold_grid(lcfg: Any) -> list[float]:
    """The thresholds of stage 05: ``lut.thresholds`` when given, else ``grid_start..grid_stop``
    inclusive by ``grid_step``, each ``round(start + i * step, 6)`` (no float accumulation)."""
    if lcfg.thresholds is not None:
        ts = sorted({round(float(t), 6) for t in lcfg.thresholds})
        if not ts:
            raise ConfigError("lut.thresholds is an empty list: give thresholds or null for the grid")
    else:
        start, stop, step = float(lcfg.grid_start), float(lcfg.grid_stop), float(lcfg.grid_step)
        if step <= 0:
            raise ConfigError(f"lut.grid_step must be > 0, got {step}")
        if stop < start:
            raise ConfigError(f"lut.grid_stop ({stop}) is below lut.grid_start ({start})")
        n = int(math.floor((stop - start) / step + 1e-9)) + 1
        ts = [round(start + i * step, 6) for i in range(n)]
    bad = [t for t in ts if not -1.0 <= t <= 1.0]
    if bad:
        raise ConfigError(f"lut thresholds must be cosine similarities in [-1, 1], got {bad}")
    return ts


# ----------------------------------------------------------------------------- queries


def choose_top_m(n_gallery: int, n_kept_min: int, k: int) -> int:
    """Neighbours kept per query for the sweep: enough that the sparsest threshold's kept set
    holds ``k`` of them for most queries (``TOP_M_FACTOR`` x what a uniform thinning would need), at least
    ``MIN_TOP_M``, at most the gallery. Queries short of ``k`` take the exact fallback."""
    frac = max(n_kept_min, 1) / max(n_gallery, 1)
    return int(min(n_gallery, max(MIN_TOP_M, math.ceil(TOP_M_FACTOR * k / frac))))


def nearest_kept(queries: Any, gallery: Any, keeps: np.ndarray, k: int, block_size: int = 4096,
                 device: Any = None, top_m: int | None = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """For every keep mask (T, G), the ``min(k, kept)`` nearest kept gallery items of every query.

    Equal to ``retrieval.search.topk(queries, gallery[keep], k)`` mapped back to gallery rows (ties to
    the lower row), but the query x gallery product is computed once for all thresholds. That product
    stays float32, not the exact kernel's: each query keeps its top ``M`` (>= ``MIN_TOP_M`` = 64), and
    the kernel rescores every one of the k best in float64 (top-100 measured 0.58x the float32
    product, top-40 0.81x: ``codes.KERNEL_MAX_K``).
    Returns ``([(sims (Q, k_t) float32, idx (Q, k_t) int64) per threshold], stats)``.
    """
    keeps = np.asarray(keeps, dtype=bool)
    T, N = keeps.shape
    n_kept = keeps.sum(1)
    if N == 0 or (n_kept == 0).any():
        raise ValueError("every keep mask must keep at least one gallery row")
    kts = [int(min(k, n)) for n in n_kept]
    M = top_m if top_m is not None else choose_top_m(N, int(n_kept.min()), max(kts))
    M = int(min(max(M, max(kts)), N))
    stats = {"top_m": M, "fallback_queries": 0}
    from .streamed import is_streamed

    if is_streamed(gallery):
        return _nearest_kept_streamed(queries, gallery, keeps, kts, M, block_size, device, stats), stats
    with full_fp32():
        q = as_tensor(queries, device)
        g = as_tensor(gallery, q.device)
        dev = q.device
        Q = q.shape[0]
        out = [(np.empty((Q, kt), np.float32), np.empty((Q, kt), np.int64)) for kt in kts]
        keep_t = torch.from_numpy(keeps).to(dev)
        rank_key = torch.arange(M, 0, -1, device=dev)  # earlier list position -> larger key
        fb_rows = max(1, (block_size * block_size) // max(N, 1))  # fallback rows per masked copy of S
        gt = g.t()
        for a in range(0, Q, block_size):
            S = q[a:a + block_size] @ gt  # (B, N) float32
            B = S.shape[0]
            tv, ti = block_topk(S, M)  # (B, M) by (-sim, row)
            with _threads(dev):  # the per-threshold steps are small: one thread (similarity._threads)
                for t in range(T):
                    kt = kts[t]
                    sv, si, bad = _first_kept(tv, ti, keep_t[t], kt, rank_key)
                    stats["fallback_queries"] += int(bad.numel())
                    for c0 in range(0, bad.numel(), fb_rows):  # exact masked search, S still in memory
                        rows = bad[c0:c0 + fb_rows]
                        Sm = S.index_select(0, rows).masked_fill_(~keep_t[t], float("-inf"))
                        v, i = block_topk(Sm, kt)
                        sv[rows], si[rows] = v, i
                    out[t][0][a:a + B] = sv.cpu().numpy()
                    out[t][1][a:a + B] = si.cpu().numpy()
            del S, tv, ti
    return out, stats


def _first_kept(tv: torch.Tensor, ti: torch.Tensor, keep: torch.Tensor, kt: int,
                rank_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From top-M lists ``(tv, ti)`` (Q, M), the first ``kt`` items kept at one threshold (``keep``
    (N,) bool), in list order: ``(sims, rows, queries whose list holds fewer than kt kept items)``."""
    kin = keep[ti]  # (Q, M) is the listed item kept at this threshold?
    pos = torch.topk(kin * rank_key, kt, dim=1).indices.sort(1).values
    return tv.gather(1, pos), ti.gather(1, pos), torch.nonzero(kin.sum(1) < kt).flatten()


def _nearest_kept_streamed(queries: Any, gallery: Any, keeps: np.ndarray, kts: list[int], M: int, block_size: int,
                           device: Any, stats: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """``nearest_kept`` over a gallery streamed from the store (``retrieval.streamed.StoreMatrix``):
    one pass for every query's top-``M`` list, the same per-threshold choice from it, and for the
    queries whose list holds fewer than ``k`` kept items one more pass over that threshold's kept
    rows (a masked ``StoreMatrix``: row order kept, so ties still go to the lower row)."""
    from .streamed import topk as stream_topk

    with full_fp32():
        tv_np, ti_np = stream_topk(queries, gallery, M, block_size, device)
        dev = _device(None, device)
        tv, ti = torch.from_numpy(tv_np).to(dev), torch.from_numpy(ti_np).to(dev)
        keep_t = torch.from_numpy(keeps).to(dev)
        rank_key = torch.arange(M, 0, -1, device=dev)
        q_np = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else np.asarray(queries)
        out = []
        for t, kt in enumerate(kts):
            sv, si, bad = (x.cpu().numpy() for x in _first_kept(tv, ti, keep_t[t], kt, rank_key))
            stats["fallback_queries"] += int(bad.size)
            if bad.size:
                kept_rows = np.flatnonzero(keeps[t])
                v, i = stream_topk(q_np[bad], gallery[keeps[t]], kt, block_size, device)
                sv[bad], si[bad] = v, kept_rows[i]
            out.append((sv.astype(np.float32), si.astype(np.int64)))
    return out


def measure_latency(queries: Any, gallery: Any, sizes: Sequence[int], k: int, block_size: int,
                    device: Any = None) -> list[float]:
    """Milliseconds per query of ``retrieval.search.topk(queries, gallery[:n], k)`` for each ``n`` of
    ``sizes`` (one warm-up first; with ``LATENCY_QUERIES`` queries that is the float32 product,
    ``search.use_kernel``). The search cost depends on the gallery's size only, so the first
    ``n`` rows (a view, no copy) stand for a pruned gallery of ``n`` vectors."""
    q = as_tensor(queries, device)
    g = as_tensor(gallery, q.device)
    if q.shape[0] == 0:
        return [float("nan")] * len(sizes)
    retrieval_search.topk(q, g[:max(sizes)], k, block_size, q.device)  # warm-up (allocations, kernels)
    out = []
    for n in sizes:
        t0 = time.perf_counter()
        retrieval_search.topk(q, g[:n], k, block_size, q.device)
        out.append(1000.0 * (time.perf_counter() - t0) / q.shape[0])
    return out


# ----------------------------------------------------------------------------- metrics and rules


SWEEP_COLUMNS = ["threshold", "n_kept", "fraction_kept", "size_mb", "min_kept_per_class", "top1_accuracy",
                 "knn_accuracy", "macro_precision", "macro_recall", "macro_f1", "latency_ms"]


def class_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 (sklearn, ``zero_division=0``) over the classes
    present in the truth or the predictions (sklearn's default label set)."""
    from sklearn.metrics import precision_recall_fscore_support

    if y_true.size == 0:
        return {"accuracy": float("nan"), "macro_precision": float("nan"), "macro_recall": float("nan"),
                "macro_f1": float("nan")}
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    return {"accuracy": float(np.mean(y_true == y_pred)), "macro_precision": float(p), "macro_recall": float(r),
            "macro_f1": float(f)}


def sweep_rows(thresholds: Sequence[float], keeps: np.ndarray, g_labels: np.ndarray, v_labels: np.ndarray,
               neighbours: Sequence[tuple[np.ndarray, np.ndarray]], n_classes: int, temperature: float,
               dim: int, latencies_ms: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """One row of ``threshold_sweep.csv`` per threshold (columns ``SWEEP_COLUMNS``)."""
    g_labels = np.asarray(g_labels)
    present = np.unique(g_labels)
    rows = []
    for ti, t in enumerate(thresholds):
        keep = keeps[ti]
        sims, idx = neighbours[ti]
        top1 = g_labels[idx[:, 0]] if idx.size else np.zeros(0, np.int64)
        m = class_metrics(np.asarray(v_labels), top1)
        knn_pred, _ = knn_vote(sims, idx, g_labels, n_classes, temperature)
        per_class = np.bincount(g_labels[keep], minlength=n_classes)[present]
        n = int(keep.sum())
        rows.append({
            "threshold": float(t), "n_kept": n, "fraction_kept": n / max(keep.size, 1),
            "size_mb": n * dim * 4 / 2**20, "min_kept_per_class": int(per_class.min()) if per_class.size else 0,
            "top1_accuracy": m["accuracy"],
            "knn_accuracy": float(np.mean(knn_pred == np.asarray(v_labels))) if idx.size else float("nan"),
            "macro_precision": m["macro_precision"], "macro_recall": m["macro_recall"], "macro_f1": m["macro_f1"],
            "latency_ms": float(latencies_ms[ti]) if latencies_ms is not None else float("nan"),
        })
    return rows


def choose_threshold(rows: Sequence[dict[str, Any]], lcfg: Any) -> tuple[int, str]:
    """Index of the chosen row of a sweep table, and one sentence saying why (``lut.rule``).

    - ``tolerance``: the smallest gallery whose macro-F1 is within ``lut.tolerance`` of the best
      (equal sizes: the higher F1, then the lower threshold);
    - ``max_f1`` / ``max_accuracy``: the best macro-F1 / top-1 accuracy (ties: the smaller gallery,
      then the lower threshold);
    - ``target_size``: among galleries of at most ``lut.target_size`` vectors, the best macro-F1
      (ties: the larger gallery, then the lower threshold).
    """
    if not rows:
        raise UserError("the threshold sweep is empty: check lut.thresholds / lut.grid_*")
    rule = lcfg.rule
    f1 = np.array([r["macro_f1"] for r in rows], dtype=np.float64)
    acc = np.array([r["top1_accuracy"] for r in rows], dtype=np.float64)
    size = np.array([r["n_kept"] for r in rows], dtype=np.int64)
    thr = np.array([r["threshold"] for r in rows], dtype=np.float64)
    total = max(int(round(rows[0]["n_kept"] / rows[0]["fraction_kept"])) if rows[0]["fraction_kept"] else 0, 0)

    def pick(cands: np.ndarray, keys: list[np.ndarray]) -> int:
        # lexicographic minimum over keys (np.lexsort: last key is the primary one)
        c = np.asarray(cands)
        return int(c[np.lexsort([k[c] for k in reversed(keys)])[0]])

    def desc(i: int) -> str:
        share = f", {100 * size[i] / total:.1f}% of {total:,}" if total else ""
        return f"threshold {thr[i]:g} ({size[i]:,} vectors{share}, macro-F1 {f1[i]:.4f}, top-1 accuracy {acc[i]:.4f})"

    if np.isnan(f1).all():
        raise UserError("no val vectors to choose the threshold with: stage 05 needs a val split (split.val > 0)")
    allr = np.arange(len(rows))
    f1z, accz = np.nan_to_num(f1, nan=-1.0), np.nan_to_num(acc, nan=-1.0)
    # F1 values equal up to float noise are one value (so ties fall to the documented keys)
    f1r, accr = np.round(f1z / TIE_EPS) * TIE_EPS, np.round(accz / TIE_EPS) * TIE_EPS
    if rule == "tolerance":
        best = f1z.max()
        cands = allr[f1z >= best - float(lcfg.tolerance) - TIE_EPS]
        i = pick(cands, [size, -f1r, thr])
        return i, (f"rule tolerance: the smallest gallery whose val macro-F1 is within {lcfg.tolerance:g} of the "
                   f"best ({best:.4f}): {desc(i)}")
    if rule == "max_f1":
        i = pick(allr, [-f1r, size, thr])
        return i, f"rule max_f1: the best val macro-F1 (ties: the smaller gallery): {desc(i)}"
    if rule == "max_accuracy":
        i = pick(allr, [-accr, size, thr])
        return i, f"rule max_accuracy: the best val top-1 accuracy (ties: the smaller gallery): {desc(i)}"
    if rule == "target_size":
        if lcfg.target_size is None:
            raise ConfigError("lut.rule is target_size but lut.target_size is null: give a number of vectors")
        cands = allr[size <= int(lcfg.target_size)]
        if cands.size == 0:
            raise UserError(f"lut.target_size={lcfg.target_size}: no threshold of the sweep gives a gallery that "
                            f"small (the smallest has {int(size.min()):,} vectors at threshold "
                            f"{thr[int(size.argmin())]:g}): raise lut.target_size or lower lut.grid_start")
        i = pick(cands, [-f1r, -size, thr])
        return i, (f"rule target_size: the best val macro-F1 among galleries of at most {int(lcfg.target_size):,} "
                   f"vectors: {desc(i)}")
    raise ConfigError(f"lut.rule: expected tolerance, max_f1, max_accuracy or target_size, got {rule!r}")


def sweep_warnings(rows: Sequence[dict[str, Any]], chosen: int, lcfg: Any) -> list[str]:
    """Cautions about a threshold choice, one sentence each: the chosen threshold sits at either
    end of the grid (the best may lie outside it), or the sweep is flat (val macro-F1 varies by
    less than ``FLAT_SWEEP_F1``: the threshold hardly matters on val, the choice rests on size)."""
    out: list[str] = []
    if len(rows) < 2:
        return out
    f1 = np.array([r["macro_f1"] for r in rows], dtype=np.float64)
    t = rows[chosen]["threshold"]
    grid = "lut.thresholds" if lcfg.thresholds is not None else None
    if chosen == 0:
        key = grid or f"lut.grid_start={lcfg.grid_start:g}"
        out.append(f"the chosen threshold {t:g} is the lowest of the grid ({key}): a lower one may be as good with "
                   "a smaller gallery; extend the grid downwards and rerun 05_lut_threshold.py")
    elif chosen == len(rows) - 1:
        key = grid or f"lut.grid_stop={lcfg.grid_stop:g}"
        out.append(f"the chosen threshold {t:g} is the highest of the grid ({key}): a higher one may be better; "
                   "extend the grid upwards and rerun 05_lut_threshold.py")
    finite = f1[np.isfinite(f1)]
    if finite.size and finite.max() - finite.min() < FLAT_SWEEP_F1:
        out.append(f"the sweep is flat: val macro-F1 is {finite.max():.4f} at every threshold (within "
                   f"{FLAT_SWEEP_F1:g}), so the val split does not tell the thresholds apart and the choice rests on "
                   f"gallery size alone ({rows[0]['n_kept']:,} to {rows[-1]['n_kept']:,} vectors)")
    return out


def suggested_reject_below(best_sims: np.ndarray, correct: np.ndarray,
                           percentile: float = REJECT_PERCENTILE) -> float | None:
    """The best-match similarity below which ``percentile`` % of the correct predictions fall
    (an open-set rejection level for stage 07); None without a correct prediction."""
    s = np.asarray(best_sims, dtype=np.float64)[np.asarray(correct, dtype=bool)]
    return float(np.percentile(s, percentile)) if s.size else None


def gini(sizes: Sequence[int]) -> float:
    """Gini coefficient of class sizes (0: all equal; towards 1: one class holds everything)."""
    x = np.sort(np.asarray(sizes, dtype=np.float64))
    n = x.size
    if n == 0 or x.sum() == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def kept_ids_sha256(ids: Any) -> str:
    """sha256 of the sorted kept image ids as little-endian int64 bytes (``lut.json``'s check)."""
    return hashlib.sha256(np.sort(np.asarray(ids, dtype=np.int64)).astype("<i8").tobytes()).hexdigest()
