"""The search entry points: top-k neighbours, the best entry of each class, and the k-NN vote.

``topk`` runs on the reduced-precision exact kernel (``retrieval.kernel``) where it pays
(``use_kernel``), else on one float32 product per block of queries. A gallery searched several times
is prepared once (``prepare`` / ``prepare_vectors``): its codes are then made once, not per search.
``search_classes`` stays on the float32 product (the kernel's ``class_best`` measured 0.75-1.03x of
it). ``set_precision`` is ``search.precision`` (``retrieval.codes``).
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




# ----------------------------------------------------------------------------- a gallery searched repeatedly


class PreparedGallery:
    """A gallery made ready for repeated exact searches (``prepare``): its float32 rows on the search
    device and, made at the first search that runs the kernel and reused by every later one, their
    reduced-precision codes (``codes.Codes``: like FAISS's ``add``, once per gallery rather than once
    per search: bf16 codes of 33,000 x 2,048 cost about 0.6x the kernel's top-1 search of 3,000 queries).

    Why the codes cannot answer for other rows. They are made from ``X`` and used only with ``X``; the
    object is made explicitly where one gallery is searched several times (stage 07's evaluate and
    predict modes: ``prepare_vectors``) and passed to those searches, never looked up by an array's
    identity. It is a snapshot of the rows: a torch tensor changed in place is detected at the next
    search by its version counter (every in-place torch operation on it or on a view of it bumps the
    counter) and coded again; a numpy array has no such counter, so rows changed in place through
    numpy need a new ``prepare`` (the stages never write a gallery's rows after loading them). The
    float32 rows are shared with a CPU float32 input, not copied (a gallery may take gigabytes).
    """

    def __init__(self, X: Any, device: torch.device | str | None = None):
        self.X = as_tensor(X, device)  # (G, D) float32; shares a contiguous CPU float32 input's memory
        self._source = X
        if self.X.ndim != 2:
            raise ValueError(f"prepare: expected a (G, D) matrix, got shape {tuple(self.X.shape)}")
        self.device = self.X.device
        self._codes: dict[str, Any] = {}
        self._version = self.X._version
        self.coded = 0  # how many times codes were made (a test counts them)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.X.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The rows as numpy (a function given the gallery as an array, e.g. a test's reference search)."""
        a = self.X.detach().cpu().numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def source_is(self, X: Any) -> bool:
        """Whether these rows were prepared from the object ``X``."""
        return X is self._source

    def codes(self, precision: str) -> Any:
        """The rows' ``Codes`` at ``precision`` (fp32 / bf16 / int8): made once, made again only if the
        rows changed in place since (the tensor's version counter)."""
        from .codes import quantize

        if self.X._version != self._version:  # changed in place: every code made so far is stale
            self._codes.clear()
            self._version = self.X._version
        c = self._codes.get(precision)
        if c is None:
            c = self._codes[precision] = quantize(self.X, precision)
            self.coded += 1
        return c


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one (an index left out: the current device of that type)."""
    return a.type == b.type and (a.index == b.index or a.index is None or b.index is None)


def prepare(gallery: Any, device: torch.device | str | None = None) -> Any:
    """``gallery`` (G, D) made ready for repeated ``topk`` searches (``PreparedGallery``); a gallery
    streamed from the store (``retrieval.streamed.StoreMatrix``) or an already prepared one is returned
    as it is."""
    from .streamed import is_streamed

    if isinstance(gallery, PreparedGallery) or is_streamed(gallery):
        return gallery
    return PreparedGallery(gallery, device)


@dataclass
class PreparedVectors(Vectors):
    """``Vectors`` whose rows are also held ready for repeated searches (``prepared``, made from ``X``
    by ``prepare_vectors``); ``search_rows`` hands the searches the prepared rows."""

    prepared: Any = None


def prepare_vectors(v: Vectors, device: Any = None) -> Vectors:
    """``v`` with its rows prepared for repeated searches (``PreparedVectors``); a streamed or already
    prepared gallery is returned as it is."""
    from .streamed import is_streamed

    if isinstance(v, PreparedVectors) or is_streamed(v.X):
        return v
    return PreparedVectors(v.X, v.labels, v.paths, v.ids, prepared=PreparedGallery(v.X, device))


def search_rows(v: Vectors) -> Any:
    """What the searches of ``v`` take as the gallery: its ``PreparedGallery`` when it has one made from
    its current ``X``, else ``X`` itself (a rebound ``X`` is never searched with another array's codes)."""
    p = getattr(v, "prepared", None)
    if p is not None and p.source_is(v.X):
        return p
    return v.X


def topk(queries: Any, gallery: Any, k: int, block_size: int = 4096,
         device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` of every query among the gallery rows.

    Args:
        queries: (Q, D) L2-normalised vectors (numpy or torch).
        gallery: (G, D) L2-normalised vectors (numpy or torch), a ``PreparedGallery`` (``prepare``:
            searched repeatedly, its codes made once), or a ``retrieval.streamed.StoreMatrix``
            (streamed from the store: one pass, memory bounded by a block).
        k: neighbours per query; clamped to ``G`` (so the answer has ``min(k, G)`` columns).
        block_size: queries per matrix product (memory: ``block_size x G`` float32 at once).
        device: where to compute (None: the device of ``queries`` when it is a tensor, else the
            prepared gallery's, else CPU).

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
    prepared = gallery if isinstance(gallery, PreparedGallery) else None
    if device is None:
        device = (queries.device if isinstance(queries, torch.Tensor)
                  else prepared.device if prepared is not None else torch.device("cpu"))
    if prepared is not None and not _same_device(prepared.device, torch.device(device)):
        prepared, gallery = None, prepared.X  # prepared for another device: its rows, copied there
    q = as_tensor(queries, device)
    g = prepared.X if prepared is not None else as_tensor(gallery, device)
    if q.ndim != 2 or g.ndim != 2 or (q.shape[0] and g.shape[0] and q.shape[1] != g.shape[1]):
        raise ValueError(f"topk: expected (Q, D) and (G, D) matrices, got {tuple(q.shape)} and {tuple(g.shape)}")
    Q, G = q.shape[0], g.shape[0]
    kk = min(k, G)
    if Q and kk and use_kernel(Q, kk, q.device):
        from .codes import search_precision
        from .kernel import topk as kernel_topk

        precision = search_precision(q.shape[1], q.device)
        gc = prepared.codes(precision) if prepared is not None else g  # a prepared gallery's codes: made once
        return kernel_topk(q, gc, kk, precision=precision, query_block=block_size)
    return _float32_topk(q, g, kk, block_size)


def _float32_topk(q: torch.Tensor, g: torch.Tensor, k: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``topk`` by one float32 product per block of ``block_size`` queries (``k <= len(g)``)."""
    Q = q.shape[0]
    sims = np.empty((Q, k), dtype=np.float32)
    idx = np.empty((Q, k), dtype=np.int64)
    if Q == 0 or k == 0:
        return sims, idx
    gt = g.t()  # (D, G) view; one product per query block
    with torch.inference_mode():
        for a in range(0, Q, block_size):
            s = q[a:a + block_size] @ gt  # (B, G) float32
            v, i = block_topk(s, k)
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
