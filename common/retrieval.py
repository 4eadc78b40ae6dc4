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

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

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


def topk(queries: Any, gallery: Any, k: int, block_size: int = 4096,
         device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` of every query among the gallery rows.

    Args:
        queries: (Q, D) L2-normalised vectors (numpy or torch).
        gallery: (G, D) L2-normalised vectors (numpy or torch), or a ``common.streaming.StoreMatrix``
            (streamed from the store: one pass, memory bounded by a block).
        k: neighbours per query; clamped to ``G`` (so the answer has ``min(k, G)`` columns).
        block_size: queries per matrix product (memory: ``block_size x G`` float32 at once).
        device: where to compute (None: the device of ``queries`` when it is a tensor, else CPU).

    Returns:
        ``(sims (Q, k) float32, idx (Q, k) int64)``, each row sorted by similarity descending,
        ties to the lower gallery index (see the module docstring).
    """
    from .streaming import is_streamed

    if is_streamed(gallery):  # a gallery read from the store block by block: the same answer
        from .streaming import topk as stream_topk

        return stream_topk(queries, gallery, k, block_size, device)
    if k < 1:
        raise ValueError(f"topk: k must be >= 1, got {k}")
    if block_size < 1:
        raise ValueError(f"topk: block_size must be >= 1, got {block_size}")
    if device is None:
        device = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
    q = as_tensor(queries, device)
    g = as_tensor(gallery, device)
    if q.ndim != 2 or g.ndim != 2 or (q.shape[0] and g.shape[0] and q.shape[1] != g.shape[1]):
        raise ValueError(f"topk: expected (Q, D) and (G, D) matrices, got {tuple(q.shape)} and {tuple(g.shape)}")
    Q, G = q.shape[0], g.shape[0]
    kk = min(k, G)
    sims = np.empty((Q, kk), dtype=np.float32)
    idx = np.empty((Q, kk), dtype=np.int64)
    if Q == 0 or kk == 0:
        return sims, idx
    gt = g.t()  # (D, G) view; one product per query block
    with torch.inference_mode():
        for a in range(0, Q, block_size):
            s = q[a:a + block_size] @ gt  # (B, G) float32
            v, i = block_topk(s, kk)
            sims[a:a + v.shape[0]] = v.cpu().numpy()
            idx[a:a + v.shape[0]] = i.cpu().numpy()
    return sims, idx


def knn_vote(sims: Any, idx: Any, gallery_labels: Any, n_classes: int,
             temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """DINO's weighted k-NN vote (Caron et al. 2021, ``eval_knn.py``; Wu et al. 2018).

    Each of the k neighbours of a query adds ``exp(sim / temperature)`` to the score of its class
    (scatter-add, computed in float64 so that small temperatures do not overflow float32); the
    prediction is the class of largest score, equal scores going to the lower class index.

    Args:
        sims: (Q, k) similarities of the neighbours (from ``topk``).
        idx: (Q, k) gallery indices of the neighbours.
        gallery_labels: (G,) integer class index of every gallery row (numpy or torch).
        n_classes: number of classes C (scores has C columns).
        temperature: T > 0.

    Returns:
        ``(pred (Q,) int64, scores (Q, C) float64)``.
    """
    if temperature <= 0:
        raise ValueError(f"knn_vote: temperature must be > 0, got {temperature}")
    s = as_tensor(sims, "cpu", torch.float64)
    i = as_tensor(idx, "cpu", torch.int64)
    lab = as_tensor(gallery_labels, "cpu", torch.int64)
    Q = s.shape[0]
    scores = torch.zeros((Q, n_classes), dtype=torch.float64)
    if Q and s.shape[1]:
        votes = lab[i]  # (Q, k) class of each neighbour
        if int(votes.min()) < 0 or int(votes.max()) >= n_classes:
            raise ValueError(f"knn_vote: gallery labels must lie in [0, {n_classes}), got "
                             f"{int(votes.min())}..{int(votes.max())}")
        scores.scatter_add_(1, votes, torch.exp(s / temperature))
    sc = scores.numpy()
    # numpy's argmax returns the first of equal maxima: ties go to the lower class index.
    pred = sc.argmax(1).astype(np.int64) if n_classes else np.zeros(Q, dtype=np.int64)
    return pred, sc
