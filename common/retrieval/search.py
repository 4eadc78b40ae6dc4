"""The search entry points: top-k neighbours, the best entry of each class, and the k-NN vote.

``topk`` runs on the reduced-precision exact kernel (``retrieval.kernel``) where it pays
(``use_kernel``), else on one float32 product per block of queries; ``search_classes`` stays on the
float32 product (the kernel's ``class_best`` measured 0.75-1.03x of it). ``set_precision`` is
``search.precision`` (``retrieval.codes``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..store.containers import Vectors
from .codes import set_precision as set_precision  # search.precision, set by the stage runner
from .codes import use_kernel
from .exact import as_tensor, block_topk



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

    With ``index`` (a ``retrieval.ann.AnnIndex`` over the gallery's rows), the classes are those
    of the ``index.candidates`` neighbours it proposes (rescored exactly); a class absent from that
    list is absent for the query (its top-k list may then hold fewer classes).

    The gallery is sorted by class once, so each class is a contiguous block of columns. For each
    block of ``block_size`` queries: one float32 matrix product with the whole gallery (as
    ``topk``'s float32 path does; memory ``block_size x G`` float32), then a max over each class's
    columns (``torch.max`` returns the first of equal maxima: ties go to the lower gallery row).
    The per-class maxima cost one pass, where a ``topk`` call per class re-reads the queries
    once per class (about 1.4x slower at DYB scale, 87 classes). A streamed gallery
    (``retrieval.streamed.StoreMatrix``) is searched block by block with the same result.
    """
    import torch

    t0 = time.perf_counter()
    if index is not None:
        from .ann import class_best

        s, r = index.search(queries, index.candidates, gallery.X)
        return ClassSearch(*class_best(s, r, gallery.labels, n_classes), time.perf_counter() - t0)
    Q, C = queries.shape[0], n_classes
    if block_size < 1:
        raise UserError(f"inference.block_size: must be >= 1, got {block_size}")
    from .streamed import class_best, is_streamed

    if is_streamed(gallery.X):  # the gallery stays in the store: one pass, block by block
        return ClassSearch(*class_best(queries, gallery.X, gallery.labels, C, block_size, device),
                           time.perf_counter() - t0)
    # The float32 product, not kernel.class_best: with a bound per class the kernel's candidate window
    # stays wide and it measured 0.75-1.03x this path (notes/reports/i21_kernel.md); same answer.
    sims = np.full((Q, C), -np.inf, dtype=np.float32)
    idx = np.full((Q, C), -1, dtype=np.int64)
    if Q and len(gallery):
        from .exact import ClassSlices, as_tensor, class_max_block

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




def topk(queries: Any, gallery: Any, k: int, block_size: int = 4096,
         device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` of every query among the gallery rows.

    Args:
        queries: (Q, D) L2-normalised vectors (numpy or torch).
        gallery: (G, D) L2-normalised vectors (numpy or torch), or a ``retrieval.streamed.StoreMatrix``
            (streamed from the store: one pass, memory bounded by a block).
        k: neighbours per query; clamped to ``G`` (so the answer has ``min(k, G)`` columns).
        block_size: queries per matrix product (memory: ``block_size x G`` float32 at once).
        device: where to compute (None: the device of ``queries`` when it is a tensor, else CPU).

    Returns:
        ``(sims (Q, k) float32, idx (Q, k) int64)``, each row sorted by similarity descending,
        ties to the lower gallery index (see the module docstring).

    On a CPU with many queries and a small ``k`` (``use_kernel``) the search runs on
    ``kernel.topk``: candidates from bf16 / int8 products (``search.precision``), rescored to the
    exact similarity ``s`` (``retrieval.similarity``). Elsewhere one float32 product per block of
    queries ranks them. Both give the same neighbours in the same order, except where two
    similarities lie within the float32 product's own rounding of each other (a few ulp: 3 queries of
    600 differed at top-100 on random data of D = 2,048): there the float32 product's order depends
    on its shapes, and the kernel's is that of ``s`` (equal ``s``: the lower row).
    """
    from .streamed import is_streamed

    if is_streamed(gallery):  # a gallery read from the store block by block: the same answer
        from .streamed import topk as stream_topk

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
    if Q and kk and use_kernel(Q, kk, q.device):
        from .codes import search_precision
        from .kernel import topk as kernel_topk

        return kernel_topk(q, g, kk, precision=search_precision(q.shape[1], q.device), query_block=block_size)
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
