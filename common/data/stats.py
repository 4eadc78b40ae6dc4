"""Stage 02's computation: exact per-channel mean and standard deviation of the train split.

The statistics describe the images *as the network sees them*: converted to RGB, padded to a
square with ``data.pad_fill``, resized to ``model.image_size`` (``data.square_uint8_transform``,
the same code as ``data.eval_transform`` before its float conversion), values scaled to [0, 1].

Exactness: after resizing, every value is an 8-bit level ``v`` (the network gets ``v / 255``).
So instead of summing floats, each batch adds to a per-channel histogram of the 256 levels
(integer counts, exact, independent of the batch order). At the end
``mean = S1 / (255 N)`` and ``var = (N S2 - S1^2) / (255 N)^2`` with ``S1 = sum v``,
``S2 = sum v^2`` computed in Python integers: one correctly rounded division each, no
cancellation (the textbook ``E[x^2] - E[x]^2`` in floating point loses digits when the
std is small against the mean; Chan et al.'s pairwise merge avoids that with more work).
``std`` is the population standard deviation (ddof = 0), as torchvision's ``Normalize`` expects.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError
from ..fileio import read_json
from .datasets import ImageListDataset, worker_errors
from .transforms import square_uint8_transform

LEVELS = 256


def histogram_moments(hist: np.ndarray) -> tuple[list[float], list[float], int]:
    """Mean and population std in [0, 1] units per channel from a (C, 256) histogram of 8-bit levels.

    Returns ``(mean, std, pixels per channel)``; integer arithmetic until one final division.
    """
    hist = np.asarray(hist, dtype=np.int64)
    levels = np.arange(LEVELS, dtype=np.int64)
    means, stds = [], []
    n = int(hist[0].sum())
    if n == 0:
        raise ValueError("empty histogram")
    for h in hist:
        s1 = int((h * levels).sum())
        s2 = int((h * levels * levels).sum())
        means.append(s1 / (255 * n))
        var_num = n * s2 - s1 * s1  # exact (Python ints), >= 0
        stds.append(math.sqrt(var_num / (255 * n) ** 2))
    return means, stds, n


def channel_histogram(paths: Sequence[str], image_size: int, fill: int, batch_size: int, num_workers: int,
                      device: torch.device | None = None) -> np.ndarray:
    """(3, 256) int64 counts of the 8-bit levels of every image after pad-to-square and resize.

    Streams the images through a DataLoader (``num_workers`` processes, progress bar); the
    histogram is accumulated on ``device`` (the GPU when given one: bincount is cheap there).
    """
    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    ds = ImageListDataset(paths, transform=square_uint8_transform(image_size, fill))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=cuda, drop_last=False)
    hist = torch.zeros(3, LEVELS, dtype=torch.int64, device=device)
    with worker_errors(" (rerun 01_random_split_dataset.py if the data changed)"):  # the line naming the file
        for x, _, _ in tqdm(loader, desc="mean/std", unit="batch", disable=None):
            x = x.to(device, non_blocking=cuda)  # (B, 3, S, S) uint8
            for c in range(3):
                hist[c] += torch.bincount(x[:, c].reshape(-1), minlength=LEVELS)
    return hist.cpu().numpy()


def mean_std(paths: Sequence[str], image_size: int, fill: int, batch_size: int = 64, num_workers: int = 0,
             device: torch.device | None = None) -> dict:
    """The ``stats.json`` content for a list of images (see the module docstring)."""
    if not paths:
        raise UserError("no images to compute mean and std on (the train split is empty)")
    hist = channel_histogram(paths, image_size, fill, batch_size, num_workers, device)
    mean, std, n = histogram_moments(hist)
    return {"mean": mean, "std": std, "pixels": n, "images": len(paths), "image_size": image_size,
            "pad_fill": fill, "ddof": 0}


# ----------------------------------------------------------------------------- stats.json


def read_stats(path: str | Path) -> dict[str, Any]:
    """Read ``stats.json`` (stage 02): at least ``mean`` and ``std``, three floats each."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p} is missing: run 02_mean_std_variables.py")
    try:
        d = read_json(p)
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: not readable JSON ({e.__class__.__name__}): rerun 02_mean_std_variables.py --force") from None
    for key in ("mean", "std"):
        v = d.get(key) if isinstance(d, dict) else None
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)):
            raise UserError(f"{p}: {key!r} must be a list of three numbers: rerun 02_mean_std_variables.py --force")
    if any(s <= 0 for s in d["std"]):
        raise UserError(f"{p}: std must be > 0 in every channel, got {d['std']} (are all images blank?)")
    return d
