"""What training leaves besides checkpoints: metrics.csv rows, the augmentation preview, durations."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..config.schema import Config
from ..data.augment import denormalize
from ..data.images import load_rgb
from ..data.transforms import eval_transform
from ..fileio import write_csv

if TYPE_CHECKING:
    from .sampler import TwoViewDataset


METRIC_COLUMNS = ("epoch", "step", "loss", "lr", "images_per_s", "epoch_time_s", "eta_s",
                  "val_top1", "val_knn", "val_macro_f1")
AUG_PREVIEW_IMAGES = 6  # training images shown (each with its two views) in augmentations.png


# ----------------------------------------------------------------------------- files


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def write_metrics_csv(path: Path, rows: Sequence[dict]) -> None:
    """``metrics.csv`` rewritten atomically from all rows (append-safe across resume)."""
    write_csv(path, METRIC_COLUMNS, ([_fmt(r.get(c)) for c in METRIC_COLUMNS] for r in rows))


def augmentation_preview(ds: TwoViewDataset, indices: Sequence[int], cfg: Config, stats: dict,
                         classes: Sequence[str], epoch: int = 1) -> list[tuple[str, list[np.ndarray]]]:
    """For ``augmentations.png``: each image (padded, resized) and the two views the network gets at ``epoch``."""
    tf = eval_transform(cfg.model.image_size, stats["mean"], stats["std"], cfg.data.pad_fill)
    rows = []
    for i in indices:
        img = load_rgb(ds.paths[i])
        pics = [tf(img), *ds.views_of(epoch, i, img)]
        rows.append((classes[ds.labels[i]],
                     [denormalize(p, stats["mean"], stats["std"]).permute(1, 2, 0).numpy() for p in pics]))
    return rows


def preview_indices(labels: Sequence[int], n: int) -> list[int]:
    """Up to ``n`` image indices, one per class in turn (the first image of each class first)."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    out: list[int] = []
    depth = 0
    while len(out) < min(n, len(labels)):
        for idx in by_class.values():
            if depth < len(idx) and len(out) < n:
                out.append(idx[depth])
        depth += 1
    return out


def duration(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"
