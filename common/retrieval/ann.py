"""Approximate nearest-neighbour search with FAISS (Johnson, Douze and Jegou 2019) over L2-normalised vectors.

``search.index`` chooses the engine; ``exact`` (the default) is ``common.retrieval``'s blocked
matrix products and needs nothing here. The others are FAISS indexes on inner product, which on
unit vectors is the cosine similarity:

- ``ivf``: an inverted file (``IVF<nlist>,Flat``): k-means cells over the gallery, a query scans
  the ``nprobe`` cells nearest to it; vectors stored whole (float32).
- ``ivfpq``: the same cells, vectors stored as product-quantised codes of ``pq_m`` bytes
  (``IVF<nlist>,PQ<m>x<bits>``, Jegou et al. 2011): ``D * 4 / pq_m`` times less memory.
- ``hnsw``: a hierarchical navigable small-world graph (``HNSW<M>``, Malkov and Yashunin 2018)
  of degree ``hnsw_m``; ``ef_search`` candidates are explored per query. No training.

With ``search.pca_dim`` the vectors are first projected on the gallery's ``pca_dim`` principal
axes and re-normalised (``PCA<d>,L2norm``), the PCA fitted on the training sample.

Training (IVF cells, PQ codebooks, PCA) uses a random sample of at most ``train_size`` gallery
vectors (seeded); the gallery is then added in chunks with a progress bar. When ``run.device``
is a GPU that the FAISS GPU build sees, IVF indexes are trained, filled and searched on that GPU
(``to_gpu``; HNSW has no GPU version and stays on the CPU; a search restricted to kept rows,
stage 05's, runs on the CPU form); the saved file is always the CPU form. ``ivfpq`` goes to the
GPU with float16 look-up tables (``GpuClonerOptions.useFloat16``): at the default ``pq_m`` 64
with 8 bits, float32 tables need 64 KiB of shared memory per block, above the 48 KiB FAISS
allows. When FAISS cannot put an index on the GPU (another code size, too little memory) the CPU
index is used, said in one line. (The GPU path has not been run here: no GPU build of FAISS on
this project's machines; ``tests/retrieval/test_search.py`` checks the calls against a stand-in.)

Search. ``AnnIndex.search`` asks the index for ``candidates`` neighbours of each query, then,
given the gallery's vectors, rescores them by exact float32 dot products and orders them by
similarity descending, ties to the lower gallery row (as ``retrieval.topk``): the similarities
reported are then true cosines (so ``inference.reject_below`` keeps its meaning) and only the
candidate list is approximate. ``agreement`` measures what the speed costs: the share of queries
whose top-1 gallery image (and class) is the same as exact search's.

Index files are written with ``faiss.write_index`` and read with ``faiss.read_index`` (FAISS's own
binary format, not a pickle); ``lut_faiss.json`` beside it records what it indexes.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, UserError

log = logging.getLogger(__name__)


INDEXES = ("exact", "ivf", "ivfpq", "hnsw")
MIN_POINTS_PER_LIST = 39  # FAISS k-means wants this many training points per cell (it warns below)
LISTS_PER_SQRT_N = 4  # nlist: null -> 4 * sqrt(N) cells (FAISS guidelines: 4..16 sqrt(N))
ADD_CHUNK = 65_536  # vectors added to an index at a time (progress bar, bounded temporaries)


def _faiss() -> Any:
    import faiss  # imported when first needed: exact search never needs it

    return faiss


def gpu_available() -> bool:
    """True when the FAISS GPU build is installed and sees a GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def gpu_number(device: Any = None) -> int | None:
    """The GPU FAISS works on: ``device``'s (``run.device`` resolved, e.g. ``cuda:1``) when the
    FAISS GPU build sees it; None (the CPU) for a CPU device or without the GPU build. ``device``
    None: GPU 0 when the GPU build sees one."""
    if device is not None and getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    if not gpu_available():
        return None
    n = 0 if device is None or getattr(device, "index", None) is None else int(device.index)
    if n >= _faiss().get_num_gpus():
        log.warning("FAISS sees %d GPU(s), not %s: its index stays on the CPU", _faiss().get_num_gpus(), device)
        return None
    return n


def to_gpu(index: Any, kind: str, gpu: int) -> tuple[Any, Any] | None:
    """``(resources, copy of index on GPU gpu)``, or None (said in one line) when FAISS cannot.

    ``ivfpq`` with float16 look-up tables: float32 ones need ``pq_m * 2**bits * 4`` bytes of
    shared memory per block (64 KiB at the defaults), above FAISS's 48 KiB. The resources object
    must live as long as the copy."""
    faiss = _faiss()
    try:
        res = faiss.StandardGpuResources()
        opts = faiss.GpuClonerOptions()
        if kind == "ivfpq":
            opts.useFloat16 = True  # GpuIndexIVFPQConfig.useFloat16LookupTables, set by the cloner
        return res, faiss.index_cpu_to_gpu(res, gpu, index, opts)
    except (RuntimeError, MemoryError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("FAISS could not put the %s index on GPU %d (%s): it stays on the CPU", kind, gpu, first)
        return None


def auto_nlist(n: int) -> int:
    """IVF cells for ``n`` gallery vectors: ``4 sqrt(n)``, at most ``n / 39`` (k-means needs points), at least 1."""
    return max(1, min(int(round(LISTS_PER_SQRT_N * math.sqrt(n))), n // MIN_POINTS_PER_LIST))


def factory_string(kind: str, dim: int, n: int, scfg: Any) -> tuple[str, int]:
    """``(faiss.index_factory description, nlist)`` for ``kind`` over ``n`` vectors of ``dim``; checks
    the parameters against the data (``ConfigError`` naming the key)."""
    if kind not in INDEXES or kind == "exact":
        raise ConfigError(f"search.index: expected one of ivf, ivfpq, hnsw for a FAISS index, got {kind!r}")
    d = dim
    prefix = ""
    if scfg.pca_dim is not None:
        if scfg.pca_dim >= dim:
            raise ConfigError(f"search.pca_dim: must be below the vector dimension {dim}, got {scfg.pca_dim}")
        d = int(scfg.pca_dim)
        prefix = f"PCA{d},L2norm,"
    nlist = 0
    if kind in ("ivf", "ivfpq"):
        nlist = int(scfg.nlist) if scfg.nlist is not None else auto_nlist(n)
        if nlist > n:
            raise UserError(f"search.nlist={nlist} is more than the {n:,} gallery vectors: lower it (or null)")
    if kind == "ivf":
        return f"{prefix}IVF{nlist},Flat", nlist
    if kind == "ivfpq":
        if d % scfg.pq_m:
            raise ConfigError(f"search.pq_m: must divide the indexed dimension {d}, got {scfg.pq_m}")
        if n < 2 ** scfg.pq_bits:
            raise UserError(f"search.pq_bits={scfg.pq_bits} needs at least {2 ** scfg.pq_bits} gallery vectors to "
                            f"train its codebooks, the gallery has {n:,}: lower search.pq_bits or use search.index=ivf")
        return f"{prefix}IVF{nlist},PQ{scfg.pq_m}x{scfg.pq_bits}np", nlist  # np: no polysemous training (slow, unused)
    return f"{prefix}HNSW{scfg.hnsw_m}", 0


def _inner(index: Any) -> Any:
    """The index under a PCA pre-transform (or the index itself)."""
    faiss = _faiss()
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        return faiss.downcast_index(idx.index)
    return idx


def ids_sha256(ids: Any) -> str:
    """sha256 of the gallery's image ids in row order (int64 little-endian): ties an index file to its rows."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(ids, dtype="<i8")).tobytes()).hexdigest()


@dataclass
class AnnIndex:
    """A FAISS index over a gallery's rows (row ``i`` of the index is gallery row ``i``)."""

    index: Any
    kind: str
    description: str
    dim: int
    build_seconds: float = 0.0
    candidates: int = 64  # neighbours proposed per query before exact rescoring (search.candidates)
    nprobe: int = 32  # search.nprobe (IVF)
    ef_search: int = 128  # search.ef_search (HNSW)
    gpu_copy: Any = field(default=None, repr=False)  # (resources, index) on the GPU, made by the first search there
    gpu: int | None = None  # the GPU searches run on (``gpu_number``); None: the CPU

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def set_query_params(self, scfg: Any) -> None:
        """Apply the query-time knobs: ``search.nprobe`` (IVF), ``search.ef_search`` (HNSW), ``search.candidates``."""
        inner = _inner(self.index)
        faiss = _faiss()
        self.candidates = int(scfg.candidates)
        self.nprobe, self.ef_search = int(scfg.nprobe), int(scfg.ef_search)
        self.gpu_copy = None  # copied again, with these knobs, by the next search
        if self.kind in ("ivf", "ivfpq"):
            faiss.extract_index_ivf(self.index).nprobe = int(min(scfg.nprobe, faiss.extract_index_ivf(self.index).nlist))
        elif self.kind == "hnsw":
            inner.hnsw.efSearch = int(scfg.ef_search)

    def _params(self, keep: np.ndarray | None) -> Any:
        """FAISS search parameters restricting the search to the rows where ``keep`` is True (None: all)."""
        if keep is None:
            return None
        faiss = _faiss()
        bitmap = np.packbits(np.asarray(keep, dtype=bool), bitorder="little")
        sel = faiss.IDSelectorBitmap(int(keep.size), faiss.swig_ptr(bitmap))
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=self.ef_search)
        else:
            params = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
        params.bitmap_ref = bitmap  # the selector points into it: keep it alive as long as the parameters
        return params

    def raw_search(self, queries: np.ndarray, k: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The index's own answer: ``(scores (Q, k) float32, rows (Q, k) int64)``, row -1 where it found fewer;
        ``keep`` (ntotal,) bool restricts the search to those rows (FAISS ``IDSelectorBitmap``)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(int(k), self.ntotal))
        if q.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        if q.shape[1] != self.dim:
            raise UserError(f"queries have dimension {q.shape[1]} but the index was built on {self.dim}")
        params = self._params(keep)
        if params is not None:
            return self.index.search(q, k, params=params)
        return self._gpu_index().search(q, k)

    def _gpu_index(self) -> Any:
        """The index to search without a row restriction: a GPU copy of an IVF index when the FAISS
        GPU build sees a GPU (HNSW has no GPU version), else the index itself."""
        if self.kind == "hnsw" or self.gpu is None:
            return self.index
        if self.gpu_copy is None:
            self.gpu_copy = to_gpu(self.index, self.kind, self.gpu) or False  # keeps the knobs set on the CPU form
        return self.gpu_copy[1] if self.gpu_copy else self.index

    def search(self, queries: np.ndarray, k: int, gallery: np.ndarray,
               keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest gallery rows of every query among ``max(k, self.candidates)`` the index proposes,
        rescored exactly against ``gallery`` (G, D) float32: ``(sims (Q, k) float32, rows (Q, k) int64)``,
        by similarity descending, ties to the lower row; rows -1 (similarity -inf) pad short lists.
        ``keep``: search only those rows (stage 05: a pruned gallery without rebuilding the index)."""
        m = max(int(k), self.candidates)
        _, rows = self.raw_search(queries, m, keep)
        sims = rescore(queries, gallery, rows)
        order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -sims.astype(np.float64)), axis=1)
        sims = np.take_along_axis(sims, order, 1)[:, :k]
        rows = np.take_along_axis(rows, order, 1)[:, :k]
        return sims, rows

    def save(self, path: Path) -> None:
        """Write the index (CPU form) with ``faiss.write_index``."""
        _faiss().write_index(self.index, str(path))

    def meta(self) -> dict[str, Any]:
        return {"index": self.kind, "factory": self.description, "dim": self.dim, "ntotal": self.ntotal,
                "build_seconds": round(self.build_seconds, 3)}


def rescore(queries: np.ndarray, gallery: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact float32 dot products ``queries[q] . gallery[rows[q, j]]`` (-inf where ``rows`` is -1)."""
    import torch

    Q, M = rows.shape
    out = np.full((Q, M), -np.inf, dtype=np.float32)
    ok = rows >= 0
    if not ok.any():
        return out
    g = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    r = torch.from_numpy(np.where(ok, rows, 0))
    step = max(1, (1 << 24) // max(1, M * g.shape[1]))  # queries at a time: bounds the gathered block
    with torch.inference_mode():
        for a in range(0, Q, step):
            gb = g.index_select(0, r[a:a + step].reshape(-1)).view(-1, M, g.shape[1])  # (B, M, D)
            s = torch.bmm(gb, q[a:a + step, :, None])[:, :, 0].numpy()  # (B, M)
            out[a:a + step] = np.where(ok[a:a + step], s, -np.inf)
    return out


def build_index(vectors: np.ndarray, scfg: Any, seed: int = 0, progress: bool = True, device: Any = None) -> AnnIndex:
    """Train ``search.index`` on a seeded sample of at most ``search.train_size`` rows of ``vectors``
    (N, D) float32 L2-normalised, then add every row in order (row i of the index = row i here).
    Reads only the build keys; call ``set_query_params`` before searching. ``device``: the
    ``run.device`` (``gpu_number``): an IVF index is built and searched on its GPU."""
    from tqdm import tqdm

    faiss = _faiss()
    X = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = X.shape
    if n == 0:
        raise UserError("the gallery is empty: nothing to index")
    desc, nlist = factory_string(scfg.index, dim, n, scfg)
    t0 = time.perf_counter()
    index = faiss.index_factory(dim, desc, faiss.METRIC_INNER_PRODUCT)
    inner = _inner(index)
    if scfg.index == "hnsw":
        inner.hnsw.efConstruction = int(scfg.ef_construction)
    gpu = gpu_number(device) if scfg.index != "hnsw" else None
    on_gpu = to_gpu(index, scfg.index, gpu) if gpu is not None else None
    if on_gpu is not None:
        index = on_gpu[1]
    if not index.is_trained:
        m = min(n, int(scfg.train_size))
        sample = X if m == n else X[np.sort(np.random.default_rng(seed).choice(n, m, replace=False))]
        log.info("training %s on %s of %s vectors", desc, f"{m:,}", f"{n:,}")
        t1 = time.perf_counter()
        index.train(sample)
        log.info("trained in %.1f s", time.perf_counter() - t1)
        del sample
    with tqdm(total=n, desc=f"indexing ({desc})", unit="vec", disable=not progress, leave=False) as bar:
        for a in range(0, n, ADD_CHUNK):
            index.add(X[a:a + ADD_CHUNK])
            bar.update(min(ADD_CHUNK, n - a))
    if on_gpu is not None:
        index = faiss.index_gpu_to_cpu(index)  # the CPU form is kept and saved; searches copy it back (_gpu_index)
    ann = AnnIndex(index, scfg.index, desc, dim, time.perf_counter() - t0, gpu=gpu)
    log.info("built %s over %s x %d in %.1f s", desc, f"{n:,}", dim, ann.build_seconds)
    return ann


def load_index(path: Path, kind: str, scfg: Any, device: Any = None) -> AnnIndex:
    """Read an index written by ``AnnIndex.save`` and apply the query-time knobs of ``scfg``
    (``device``: searched on its GPU, see ``build_index``)."""
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable FAISS index ({first}): rerun 06_prune_features.py") from None
    ann = AnnIndex(index, kind, kind, int(index.d), gpu=gpu_number(device) if kind != "hnsw" else None)
    ann.set_query_params(scfg)
    return ann


def class_best(sims: np.ndarray, rows: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class nearest item among each query's sorted neighbour list: ``(sims (Q, C), rows (Q, C))``,
    -inf / -1 for a class absent from the list (the list is ordered, so the first item of a class is its best)."""
    Q, M = rows.shape
    out_s = np.full((Q, n_classes), -np.inf, dtype=np.float32)
    out_r = np.full((Q, n_classes), -1, dtype=np.int64)
    q = np.arange(Q)
    labels = np.asarray(labels)
    for j in range(M - 1, -1, -1):  # earlier (better) items overwrite later ones
        ok = rows[:, j] >= 0
        c = labels[rows[ok, j]]
        out_s[q[ok], c] = sims[ok, j]
        out_r[q[ok], c] = rows[ok, j]
    return out_s, out_r


def agreement(exact_rows: np.ndarray, ann_rows: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Share of queries whose top-1 gallery row (``same_image``) and top-1 class (``same_class``)
    are the same for the index as for exact search."""
    e, a = np.asarray(exact_rows)[:, 0], np.asarray(ann_rows)[:, 0]
    if e.size == 0:
        return {"same_image": float("nan"), "same_class": float("nan"), "n_queries": 0}
    labels = np.asarray(labels)
    same_class = (a >= 0) & (labels[np.where(a >= 0, a, 0)] == labels[e])
    return {"same_image": float(np.mean(e == a)), "same_class": float(np.mean(same_class)), "n_queries": int(e.size)}
