"""Exact cosine search on L2-normalised float32 vectors, and DINO's weighted k-NN vote.

- ``topk(queries, gallery, k)``: the ``k`` most similar gallery rows of every query, by one float32
  matrix product per block of ``block_size`` queries (torch: every CPU core, or the GPU). Memory is
  bounded by ``block_size x G`` float32 similarities at a time, whatever the number of queries.
- ``knn_vote(sims, idx, gallery_labels, n_classes, temperature)``: the weighted vote of
  Wu et al. (2018) as used by DINO's ``eval_knn.py`` (Caron et al. 2021): each neighbour votes for
  its class with weight ``exp(sim / T)``; the class with the largest summed weight wins.

Determinism. ``torch.topk`` does not say which of several equal values it returns, so ``topk``
defines the order itself: by similarity descending, and among equal similarities by gallery index
ascending (the lower index first). Concretely it asks ``torch.topk`` for ``k + 1`` values; when a
row's k-th and (k+1)-th values are equal (a tie that straddles the cut, e.g. duplicated gallery
vectors), that row is re-ranked with a stable sort so the lower indices win; finally the k are
ordered by ``(-sim, index)``. The vote breaks equal class scores towards the lower class index (``argmax``).

Inputs may be numpy arrays or torch tensors (on any device); outputs are numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def as_tensor(x: Any, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x`` (numpy or torch) as a contiguous torch tensor of ``dtype`` on ``device`` (None: keep/CPU)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if device is not None:
        dev = torch.device(device)
        t = t.to(dev, non_blocking=dev.type == "cuda" and t.device.type == "cpu" and t.is_pinned())
    return t.to(dtype).contiguous()


def sort_desc_stable(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row of ``(vals, idx)`` by value descending, then index ascending."""
    idx_sorted, p = torch.sort(idx, dim=1, stable=True)
    vals = torch.gather(vals, 1, p)
    vals, p = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, torch.gather(idx_sorted, 1, p)


def block_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic top-k of a similarity block ``s`` (B, G): ties to the lower column.

    ``torch.topk`` of ``k + 1``: when a row's k-th value is above its (k+1)-th, its k largest
    entries are one well-defined set (only their order is left to fix); when they are equal, a tie
    straddles the cut and that row alone is re-ranked by a stable sort (rare: duplicated vectors).
    """
    G = s.shape[1]
    kk = min(k + 1, G)
    vals, idx = torch.topk(s, kk, dim=1)  # (B, kk), order and tie choice unspecified
    if kk > k:
        bad = torch.nonzero(vals[:, k - 1] == vals[:, k]).flatten()
        vals, idx = vals[:, :k], idx[:, :k]
        if bad.numel():
            sv, si = torch.sort(s[bad], dim=1, descending=True, stable=True)
            vals[bad], idx[bad] = sv[:, :k], si[:, :k]
    return sort_desc_stable(vals, idx)


@dataclass(frozen=True)
class ClassSlices:
    """Gallery rows sorted by class (stable: rows of a class keep their order), so that each class
    present is one contiguous slice ``starts[c]:ends[c]`` of ``order``."""

    order: np.ndarray  # (m,) row of each sorted column
    starts: np.ndarray  # (n,) first column of each class present
    ends: np.ndarray  # (n,) one past its last column
    classes: np.ndarray  # (n,) the class of each slice

    @classmethod
    def of(cls, labels: np.ndarray) -> ClassSlices:
        order = np.argsort(labels, kind="stable")
        lab = np.asarray(labels)[order]
        starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
        return cls(order, starts, np.r_[starts[1:], lab.size], lab[starts])


def class_max_block(s: torch.Tensor, slices: ClassSlices, row_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The best row of every class present in one block of gallery rows: ``s`` (B, m) holds the
    similarities to the rows in ``slices.order``; returns ``(sims (B, n), rows (B, n) int64)`` for
    the n classes of ``slices.classes``, rows numbered from ``row_offset``. ``torch.max`` returns
    the first of equal maxima: ties go to the lower row. The one reduction of the exact per-class
    search, in memory (one block) and streamed (block by block)."""
    dev = s.device
    n = slices.classes.size
    v = torch.empty((s.shape[0], n), dtype=torch.float32, device=dev)
    j = torch.empty((s.shape[0], n), dtype=torch.int64, device=dev)
    for c, (lo, hi) in enumerate(zip(slices.starts, slices.ends)):
        v[:, c], j[:, c] = s[:, lo:hi].max(dim=1)
    rows = torch.from_numpy(slices.order + row_offset).to(dev)
    return v, rows[j + torch.from_numpy(slices.starts).to(dev)[None, :]]
