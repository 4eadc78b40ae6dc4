"""Every figure the pipeline draws (matplotlib, Agg backend, written atomically as PNG).

Text is always shown literally: ``text.parse_math`` is off, so a class name holding ``$`` or
``_`` is drawn as it is (matplotlib would otherwise parse ``$...$`` as maths and fail).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np

from ..data.listing import sort_key  # noqa: E402
from ..data.splits import SPLITS  # noqa: E402
from ..fileio import atomic_path  # noqa: E402

matplotlib.use("Agg")
matplotlib.rcParams["text.parse_math"] = False

# Figure constants (the look, not results).
CM_CELL_IN = 0.14  # confusion matrix: inches per class
CM_MIN_IN = 6.0  # confusion matrix: smallest side in inches
CM_NUMBERS_MAX = 25  # print per-cell values only up to this many classes
MAP_MAX_POINTS = 3000  # t-SNE subsample (t-SNE is O(n log n) but slow beyond a few thousand points)
TSNE_PCA_DIMS = 50  # t-SNE runs on the first 50 principal components (van der Maaten's advice)
MAP_LEGEND_MAX = 20  # legend only up to this many classes; class names at centroids beyond
DPI = 120  # figures


def plain_log_ticks(axis: Any) -> None:
    """Log-axis tick labels as plain numbers (1, 10, 100, 1,000): with ``text.parse_math`` off the
    default ``LogFormatterSciNotation`` would print its maths source, ``$\\mathdefault{10^{1}}$``."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_sweep(rows: Sequence[dict[str, Any]], chosen: int, path: Path, title: str = "") -> None:
    """``threshold_sweep.png``: top-1 / k-NN accuracy and macro-F1 against the threshold, the
    gallery size on a second axis, the chosen threshold marked."""


    t = [r["threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.plot(t, [r["top1_accuracy"] for r in rows], "o-", ms=3, label="top-1 accuracy")
    ax.plot(t, [r["knn_accuracy"] for r in rows], "s-", ms=3, label="k-NN accuracy")
    ax.plot(t, [r["macro_f1"] for r in rows], "^-", ms=3, label="macro-F1 (top-1)")
    ax.set_xlabel("pruning threshold (cosine similarity)")
    ax.set_ylabel("val metric")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(t, [r["n_kept"] for r in rows], "k--", lw=1, label="gallery size")
    ax2.set_ylabel("gallery size (vectors)")
    ax2.set_ylim(bottom=0)
    c = rows[chosen]
    ax.axvline(c["threshold"], color="tab:red", lw=1.2)
    right = c["threshold"] > (t[0] + t[-1]) / 2  # write the label on the side with more room
    ax2.text(c["threshold"], 0.5, f" chosen {c['threshold']:g} \n {c['n_kept']:,} vectors \n F1 {c['macro_f1']:.3f} ",
            transform=ax2.get_xaxis_transform(), zorder=5, ha="right" if right else "left", va="center", fontsize=8,
            color="tab:red", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8, framealpha=0.9)
    ax.set_title(title or "LUT threshold sweep (val queries against the pruned train gallery)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_prune_summary(summary: Sequence[dict[str, Any]], path: Path, threshold: float) -> None:
    """``prune_summary.png``: images per class before and after pruning (log scale), largest first."""


    rows = sorted(summary, key=lambda r: (-r["before"], str(r["class"])))
    n = max(len(rows), 1)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.16 * n + 2), 5))
    ax.bar(x, [r["before"] for r in rows], color="0.75", label="train gallery")
    ax.bar(x, [r["after"] for r in rows], color="tab:blue", label=f"LUT (threshold {threshold:g})")
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.set_ylim(bottom=0.8)  # bars start below one vector (every class keeps at least one)
    ax.set_xticks(x)
    ax.set_xticklabels([str(r["class"]) for r in rows], rotation=90, fontsize=max(4, min(8, 600 // n)))
    ax.set_ylabel("vectors per class")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.legend(fontsize=8)
    b, a = sum(r["before"] for r in rows), sum(r["after"] for r in rows)
    ax.set_title(f"LUT pruning: {a:,} of {b:,} train vectors kept ({100 * a / max(b, 1):.1f}%)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
def plot_curves(path: Path, rows: Sequence[dict]) -> None:
    """``loss_curve.png``: loss and learning rate per epoch; validation k-NN metrics below."""

    tr = [r for r in rows if r.get("loss") is not None and r["epoch"] > 0]
    ev = [r for r in rows if r.get("val_top1") is not None]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    if tr:
        h1 = a1.plot([r["epoch"] for r in tr], [r["loss"] for r in tr], "o-", color="tab:blue", ms=3, label="SupCon loss")
        a1b = a1.twinx()
        h2 = a1b.plot([r["epoch"] for r in tr], [r["lr"] for r in tr], "--", color="tab:orange",
                      label="learning rate (last step of the epoch)")
        a1b.set_ylabel("learning rate", color="tab:orange")
        a1.legend(handles=h1 + h2, loc="upper right")
    a1.set_ylabel("training loss", color="tab:blue")
    a1.set_title("Supervised contrastive training")
    a1.grid(alpha=0.3)
    for key, lab in (("val_top1", "top-1 accuracy"), ("val_knn", "weighted k-NN accuracy"), ("val_macro_f1", "macro-F1 (top-1)")):
        if ev:
            a2.plot([r["epoch"] for r in ev], [r[key] for r in ev], "o-", ms=3, label=lab)
    a2.set_xlabel("epoch (0 = untrained network)")
    a2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    a2.set_ylabel("validation (k-NN retrieval)")
    a2.set_ylim(0, 1)
    a2.grid(alpha=0.3)
    if ev:
        a2.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_image_grid(path: Path, rows: Sequence[tuple[str, Sequence[Any]]], titles: Sequence[str],
                    suptitle: str) -> None:
    """A grid of images: one row per (label, [H x W x 3 arrays in 0-1]), one column per title."""
    fig, axes = plt.subplots(len(rows), len(titles), figsize=(2 * len(titles), 2 * len(rows)), squeeze=False)
    for r, (label, pics) in enumerate(rows):
        for c, (pic, title) in enumerate(zip(pics, titles)):
            ax = axes[r][c]
            ax.imshow(pic)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title)
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.suptitle(suptitle)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_class_distribution(counts: Sequence[Any], path: Path) -> None:
    """Horizontal grouped bars per class and split on a log scale; the figure grows with the classes."""

    order = sorted(counts, key=lambda c: (-c.total, sort_key(c.name)))  # largest at the top
    n = max(len(order), 1)
    fig_h = 1.6 + 0.3 * n  # about 0.3 inch per class: 92 names stay legible
    fig, ax = plt.subplots(figsize=(10, fig_h))
    y = np.arange(len(order))[::-1].astype(float)
    colours = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}
    h = 0.27
    for k, split in enumerate(SPLITS):
        vals = np.array([getattr(c, split) for c in order], dtype=float)
        ax.barh(y + (1 - k) * h, np.where(vals > 0, vals, np.nan), height=h, color=colours[split], label=split)
    dropped = [i for i, c in enumerate(order) if c.status != "kept"]
    if dropped:
        tot = np.array([order[i].total for i in dropped], dtype=float)
        ax.barh(y[dropped], np.where(tot > 0, tot, np.nan), height=3 * h, color="#bbbbbb", hatch="//",
                label="dropped (usable images)")
    for yi, c in zip(y, order):
        ax.text(max(c.total, 1) * 1.08, yi, str(c.total), va="center", fontsize=7)
    ax.set_yticks(y)
    def tick(c: Any) -> str:
        if c.status == "kept":
            return c.name
        return c.name + (" (unreadable)" if "folder unreadable" in c.reason else " (dropped)")

    ax.set_yticklabels([tick(c) for c in order], fontsize=8)
    ax.set_ylim(-0.7, len(order) - 0.3)
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    top = max([c.total for c in order] + [1])
    ax.set_xlim(0.7, top * 2.0)
    ax.set_xlabel("images (log scale)")
    kept = [c for c in order if c.status == "kept"]
    ax.set_title(f"Images per class and split: {sum(c.total for c in kept)} images, {len(kept)} classes"
                 + (f", {len(dropped)} dropped" if dropped else ""))
    ax.grid(axis="x", which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- evaluation figures


def _tick_fontsize(n: int) -> float:
    """Tick label size (pt) that fits one class per row: 60 % of a cell's height, 4.5 to 8 pt."""
    return float(np.clip(0.6 * CM_CELL_IN * 72.0, 4.5, 8.0)) if n > 20 else 8.0


def confusion_matrix_png(cm: np.ndarray, row_names: Sequence[str], col_names: Sequence[str], path: Path,
                         title: str = "Confusion matrix (rows: true class, normalised)") -> Path:
    """Draw a row-normalised confusion matrix ``cm`` (rows true, columns predicted) to ``path``."""
    cm = np.asarray(cm, dtype=np.float64)
    sums = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, sums, out=np.zeros_like(cm), where=sums > 0)
    n_r, n_c = cm.shape
    side = max(CM_MIN_IN, CM_CELL_IN * max(n_r, n_c) + 2.5)
    fig, ax = plt.subplots(figsize=(side * n_c / max(n_r, n_c) + 1.2, side), dpi=DPI)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # empty cells white: confusions stand out
    im = ax.imshow(np.ma.masked_equal(norm, 0.0), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest",
                   aspect="equal")
    fs = _tick_fontsize(max(n_r, n_c))
    ax.set_xticks(range(n_c))
    ax.set_xticklabels(col_names, rotation=90, fontsize=fs)
    ax.set_yticks(range(n_r))
    ax.set_yticklabels(row_names, fontsize=fs)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    if max(n_r, n_c) <= CM_NUMBERS_MAX:
        for i in range(n_r):
            for j in range(n_c):
                if cm[i, j] > 0:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=fs - 1,
                            color="black" if norm[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    _save_fig(fig, path)
    return path


def _save_fig(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def class_colours(n: int) -> np.ndarray:
    """``n`` distinguishable RGBA colours (tab10 up to 10, tab20 up to 20, then evenly spaced hues)."""
    if n <= 10:
        return plt.get_cmap("tab10")(np.arange(n))
    if n <= 20:
        return plt.get_cmap("tab20")(np.arange(n) % 20)
    return plt.get_cmap("hsv")(np.linspace(0.0, 1.0, n, endpoint=False))


def embed_2d(X: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D coordinates of ``X`` by ``pca`` or ``tsne`` (scikit-learn, PCA initialisation)."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float32)
    if X.shape[0] < 3:
        return np.zeros((X.shape[0], 2), dtype=np.float32)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(X)
    if method == "tsne":
        from sklearn.manifold import TSNE

        if X.shape[1] > TSNE_PCA_DIMS and X.shape[0] > TSNE_PCA_DIMS:  # the usual PCA-first speed-up
            X = PCA(n_components=TSNE_PCA_DIMS, random_state=seed).fit_transform(X)
        perplexity = float(min(30.0, (X.shape[0] - 1) / 3.0))  # sklearn needs perplexity < n
        return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(X)
    raise ValueError(f"unknown embedding map method {method!r}")


def embedding_map_png(X: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: Path,
                      method: str = "tsne", seed: int = 0) -> Path:
    """2-D map of the embeddings ``X`` coloured by class (subsampled to ``MAP_MAX_POINTS`` for t-SNE)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = X.shape[0]
    idx = np.arange(n)
    if method == "tsne" and n > MAP_MAX_POINTS:
        idx = np.sort(np.random.default_rng(seed).choice(n, MAP_MAX_POINTS, replace=False))
    xy = embed_2d(X[idx], method, seed)
    lab = labels[idx]
    C = len(class_names)
    colours = class_colours(C)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=DPI)
    ax.scatter(xy[:, 0], xy[:, 1], c=colours[lab], s=6 if len(idx) > 1000 else 14, linewidths=0, alpha=0.8)
    present = np.unique(lab)
    if C <= MAP_LEGEND_MAX:
        for c in present:
            ax.scatter([], [], color=colours[c], label=class_names[c], s=20)
        ax.legend(fontsize=7, loc="best", markerscale=1.0, frameon=False)
    else:  # too many for a legend: name each class at its centroid
        for c in present:
            cx, cy = np.median(xy[lab == c], axis=0)
            ax.text(cx, cy, class_names[c], fontsize=4.5, ha="center", va="center", alpha=0.8)
    sub = f", {len(idx)} of {n} points" if len(idx) < n else f", {n} points"
    ax.set_title(f"Test embeddings ({method.upper() if method == 'pca' else 't-SNE'}{sub})", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    _save_fig(fig, path)
    return path
def plot_sample_counts(samples: Sequence[str], classes: Sequence[str], counts: np.ndarray, path: Path,
                       title: str = "") -> None:
    """``sample_counts.png``: one stacked bar per sample, one segment per class (counts (S, C + 1),
    the last column ``unknown``, white, hatched); the figure widens with the number of samples."""
    counts = np.asarray(counts, dtype=np.int64).reshape(len(samples), len(classes) + 1)
    C = len(classes)
    if C <= 10:
        colours = plt.get_cmap("tab10")(np.arange(C))
    elif C <= 20:
        colours = plt.get_cmap("tab20")(np.arange(C))
    else:
        colours = plt.get_cmap("hsv")(np.linspace(0.0, 1.0, C, endpoint=False))
    x = np.arange(len(samples))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(samples) + 3.5), 5))
    bottom = np.zeros(len(samples))
    present = [c for c in range(C) if counts[:, c].any()]
    for c in present:
        ax.bar(x, counts[:, c], bottom=bottom, color=colours[c], label=str(classes[c]), width=0.8)
        bottom += counts[:, c]
    if counts[:, C].any():
        # unknown: white with black hatching, apart from every class colour (tab10 has a grey)
        ax.bar(x, counts[:, C], bottom=bottom, color="white", edgecolor="black", label="unknown", width=0.8, hatch="//")
    ax.set_xticks(x)
    ax.set_xticklabels([str(s) for s in samples], rotation=90 if len(samples) > 8 else 0, fontsize=8)
    ax.set_xlim(-0.6, max(len(samples), 1) - 0.4)
    ax.set_ylabel("images")
    ax.set_xlabel("sample")
    if len(present) <= 30:
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
    ax.set_title(title or "Predicted classes per sample", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
