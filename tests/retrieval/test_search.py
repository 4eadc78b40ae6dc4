"""common.search: FAISS indexes over unit vectors, exact rescoring, agreement with exact search."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from common.config.schema import SearchConfig
from common.errors import ConfigError, UserError
from common.retrieval import ann as retrieval_ann
from common.retrieval import search as retrieval_search
from common.retrieval.ann import _faiss, agreement, auto_nlist, build_index, factory_string, gpu_number, load_index


def clustered(n: int, dim: int, n_classes: int, seed: int = 0, noise: float = 0.35):
    """Unit vectors around ``n_classes`` random centres (labels = centre)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, n_classes, n)
    X = centres[labels] + noise * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), labels


def cfg(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{**SearchConfig().__dict__, **kw})


@pytest.fixture(scope="module")
def data():
    X, y = clustered(6300, 64, 20, seed=1)  # queries: the last 300, from the same classes
    return X[:6000], y[:6000], X[6000:], y[6000:]


@pytest.mark.parametrize("kind,kw", [("ivf", {}), ("ivfpq", {"pq_m": 16}), ("hnsw", {}),
                                     ("ivf", {"pca_dim": 32})])
def test_index_agrees_with_exact_search(data, kind, kw):
    X, y, Q, _ = data
    sc = cfg(index=kind, **kw)
    ann = build_index(X, sc, seed=0, progress=False)
    ann.set_query_params(sc)
    assert ann.ntotal == len(X) and ann.dim == 64
    sims, rows = ann.search(Q, 5, X)
    es, er = retrieval_search.topk(Q, X, 5)
    agr = agreement(er, rows, y)
    assert agr["n_queries"] == len(Q)
    assert agr["same_class"] >= 0.99 and agr["same_image"] >= 0.9, agr
    # the similarities are exact dot products of the proposed rows, sorted descending
    np.testing.assert_allclose(sims, np.einsum("qkd,qd->qk", X[rows], Q), rtol=0, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 0).all()
    same = rows[:, 0] == er[:, 0]
    np.testing.assert_allclose(sims[same, 0], es[same, 0], atol=1e-5)


def test_save_and_load_give_the_same_answers(tmp_path, data):
    X, _, Q, _ = data
    sc = cfg(index="ivf", nprobe=4)
    ann = build_index(X, sc, seed=3, progress=False)
    ann.set_query_params(sc)
    ann.save(tmp_path / "g.faiss")
    back = load_index(tmp_path / "g.faiss", "ivf", sc)
    a = ann.search(Q, 10, X)
    b = back.search(Q, 10, X)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    # query-time knobs come from the configuration given at load time
    wide = load_index(tmp_path / "g.faiss", "ivf", cfg(index="ivf", nprobe=10_000))
    assert _faiss().extract_index_ivf(wide.index).nprobe == auto_nlist(len(X))


def test_a_file_that_is_not_an_index_is_a_one_line_error(tmp_path):
    p = tmp_path / "lut.faiss"
    p.write_bytes(b"not an index at all")
    with pytest.raises(UserError) as e:
        load_index(p, "ivf", cfg(index="ivf"))
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_short_neighbour_lists_are_padded():
    X, y = clustered(50, 16, 2, seed=4)
    ann = build_index(X, cfg(index="hnsw"), progress=False)
    ann.set_query_params(cfg(index="hnsw", candidates=10))
    sims, rows = ann.search(X[:3], 80, X)  # more than the gallery holds
    assert rows.shape == (3, 50) and (rows >= 0).all()
    assert rows[0, 0] == 0 and sims[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_class_best_takes_the_first_item_of_each_class():
    sims = np.array([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, -np.inf, -np.inf]], np.float32)
    rows = np.array([[3, 0, 1, 2], [2, 1, -1, -1]])
    labels = np.array([0, 1, 1, 0])
    s, r = retrieval_ann.class_best(sims, rows, labels, 3)
    np.testing.assert_array_equal(r, [[3, 1, -1], [-1, 2, -1]])
    np.testing.assert_array_equal(s, np.array([[0.9, 0.7, -np.inf], [-np.inf, 0.5, -np.inf]], np.float32))


def test_agreement_counts_image_and_class():
    labels = np.array([0, 0, 1])
    agr = agreement(np.array([[0], [2], [1]]), np.array([[0], [1], [1]]), labels)
    assert agr == {"same_image": pytest.approx(2 / 3), "same_class": pytest.approx(2 / 3), "n_queries": 3}


def test_parameters_are_checked_against_the_data():
    with pytest.raises(ConfigError, match="search.pq_m"):
        factory_string("ivfpq", 100, 5000, cfg(pq_m=64))
    with pytest.raises(UserError, match="search.pq_bits"):
        factory_string("ivfpq", 128, 100, cfg(pq_m=16))
    with pytest.raises(ConfigError, match="search.pca_dim"):
        factory_string("ivf", 64, 5000, cfg(pca_dim=64))
    with pytest.raises(UserError, match="search.nlist"):
        factory_string("ivf", 64, 50, cfg(nlist=100))
    assert factory_string("ivfpq", 2048, 10**6, cfg(pca_dim=256, pq_m=32)) == ("PCA256,L2norm,IVF4000,PQ32x8np", 4000)
    assert factory_string("hnsw", 64, 10, cfg(hnsw_m=16)) == ("HNSW16", 0)
    assert auto_nlist(1000) == 25 and auto_nlist(10) == 1


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_search_restricted_to_kept_rows_finds_the_pruned_gallerys_neighbours(data, kind):
    X, y, Q, _ = data
    sc = cfg(index=kind, pca_dim=32)
    ann = build_index(X, sc, progress=False)
    ann.set_query_params(sc)
    keep = np.zeros(len(X), bool)
    keep[::4] = True
    sims, rows = ann.search(Q, 3, X, keep=keep)
    assert keep[rows].all()
    _, er = retrieval_search.topk(Q, X[keep], 3)
    exact_rows = np.flatnonzero(keep)[er]
    assert agreement(exact_rows, rows, y)["same_class"] >= 0.99


# ----------------------------------------------------------------------------- FAISS GPU (a stand-in)


class _FakeGpuFaiss:
    """faiss-cpu plus a stand-in for the GPU build's API: ``index_cpu_to_gpu`` records its
    arguments and, like FAISS on a GPU with 48 KiB of shared memory per block, refuses an IVF-PQ
    index with float32 look-up tables of more than 48 KiB (``pq_m * 2**bits * 4`` bytes). The
    "GPU index" is a CPU clone: results must equal the CPU path's."""

    SMEM = 48 * 1024

    def __init__(self, n_gpus: int = 2, fail: str | None = None):
        import faiss

        self._faiss, self.n_gpus, self.fail = faiss, n_gpus, fail
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._faiss, name)

    class StandardGpuResources:
        pass

    class GpuClonerOptions:
        def __init__(self):
            self.useFloat16 = False  # FAISS's name; the cloner hands it to useFloat16LookupTables (IVF-PQ)

    def get_num_gpus(self) -> int:
        return self.n_gpus

    def index_cpu_to_gpu(self, res, device, index, options=None):
        self.calls.append({"device": device, "float16": getattr(options, "useFloat16", False)})
        if self.fail:
            raise RuntimeError(f"Error in virtual void faiss::gpu::...: {self.fail}\nstack trace")
        ivf = self._faiss.extract_index_ivf(index)
        pq = getattr(self._faiss.downcast_index(ivf), "pq", None)
        if pq is not None and not (options and options.useFloat16) and pq.M * (1 << pq.nbits) * 4 > self.SMEM:
            raise RuntimeError(f"Device {device} has {self.SMEM} bytes of shared memory, while 8 bits per code and "
                               f"{pq.M} sub-quantizers requires {pq.M * (1 << pq.nbits) * 4} bytes")
        return self._faiss.clone_index(index)

    def index_gpu_to_cpu(self, index):
        return self._faiss.clone_index(index)


def _gpu_faiss(monkeypatch, **kw) -> _FakeGpuFaiss:
    fake = _FakeGpuFaiss(**kw)
    monkeypatch.setattr(retrieval_ann, "_faiss", lambda: fake)
    return fake


def test_gpu_number_follows_run_device(monkeypatch):
    import torch

    assert gpu_number(torch.device("cuda", 1)) is None  # faiss-cpu: no GPU build
    _gpu_faiss(monkeypatch, n_gpus=2)
    assert gpu_number(torch.device("cuda", 1)) == 1
    assert gpu_number(torch.device("cpu")) is None  # run.device=cpu on a GPU machine
    assert gpu_number(None) == 0
    assert gpu_number(torch.device("cuda", 3)) is None  # FAISS does not see that one


def test_ivfpq_goes_to_the_gpu_of_run_device_with_float16_tables(monkeypatch, data, tmp_path):
    import faiss
    import torch

    X, _, Q, _ = data
    sc = cfg(index="ivfpq", pq_m=64, nlist=8)  # the default pq_m: 64 KiB of float32 tables, refused
    fake = _gpu_faiss(monkeypatch, n_gpus=2)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # 64 codebooks to train: one thread is faster on a busy machine
    try:
        ann = build_index(X[:2000], sc, seed=0, progress=False, device=torch.device("cuda", 1))
    finally:
        faiss.omp_set_num_threads(threads)
    ann.set_query_params(sc)
    got = ann.search(Q, 5, X[:2000])
    assert fake.calls == [{"device": 1, "float16": True}] * 2  # built there, then searched there
    ann.save(tmp_path / "pq.faiss")
    cpu = load_index(tmp_path / "pq.faiss", "ivfpq", sc, device=torch.device("cpu"))
    want = cpu.search(Q, 5, X[:2000])
    assert cpu.gpu is None and len(fake.calls) == 2
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    again = load_index(tmp_path / "pq.faiss", "ivfpq", sc, device=torch.device("cuda", 0))
    again.search(Q[:2], 1, X[:2000])
    assert fake.calls[-1] == {"device": 0, "float16": True}


def test_ivf_keeps_float32_on_the_gpu(monkeypatch, data):
    import torch

    X, _, Q, _ = data
    fake = _gpu_faiss(monkeypatch, n_gpus=1)
    ann = build_index(X, cfg(index="ivf", nlist=32), seed=0, progress=False, device=torch.device("cuda", 0))
    ann.set_query_params(cfg(index="ivf"))
    ann.search(Q[:3], 2, X)
    assert fake.calls == [{"device": 0, "float16": False}] * 2


def test_a_gpu_refusal_falls_back_to_the_cpu_in_one_line(monkeypatch, data, caplog, tmp_path):
    import logging

    import torch

    X, _, Q, _ = data
    sc = cfg(index="ivf", nlist=32)
    cpu = build_index(X, sc, seed=0, progress=False)
    cpu.set_query_params(sc)
    want = cpu.search(Q, 5, X)
    fake = _gpu_faiss(monkeypatch, n_gpus=1, fail="out of memory")
    with caplog.at_level(logging.WARNING, logger="common.retrieval"):
        ann = build_index(X, sc, seed=0, progress=False, device=torch.device("cuda", 0))
        ann.set_query_params(sc)
        got = ann.search(Q, 5, X)
        ann.search(Q, 5, X)  # the failed copy is not attempted again at every search
    np.testing.assert_array_equal(got[1], want[1])
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2 and all("out of memory" in m and "stays on the CPU" in m and "\n" not in m for m in lines)
    assert len(fake.calls) == 2
    ann.save(tmp_path / "g.faiss")  # the CPU form, loadable for a CPU run
    back = load_index(tmp_path / "g.faiss", "ivf", sc, device=torch.device("cpu"))
    assert back.gpu is None and back.search(Q, 5, X)[1].tolist() == want[1].tolist()
