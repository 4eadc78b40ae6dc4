"""Embedding every image of every split with one checkpoint into a feature store (plan, embed, write,
finish).

What it does, in order (``extract_features``):

1. ``read_checkpoint``: loads the checkpoint (``extract.checkpoint``: ``best`` | ``last`` | a path) with
   ``common.model.checkpoint.load_checkpoint_model``; its class list must equal the splits' (``UserError``
   naming both otherwise); the preprocessing (mean/std, image size, pad fill) is the one the
   checkpoint records (``common.model.checkpoint.checkpoint_preprocessing``), never ``stats.json`` or the
   configuration: the network sees its images as it saw them in training, and the store records it;
2. ``plan``: rank 0 syncs the store's ``images`` table with ``splits.csv`` (new images added, removed ones
   deleted with their vectors, changed files lose their vectors) and registers the model
   (checkpoint sha256 + embedding kind + preprocessing). **The store holds one model at a time**:
   a new checkpoint or embedding kind deletes the old model's rows, vectors and LUT in the same
   transaction that registers the new one;
3. ``embed``: embeds the images that have no vector of this model yet (the to-do list, sorted by image id),
   in chunks of ``WRITE_CHUNK_ROWS`` images; each chunk is one write transaction, so
   an interrupted run loses at most one chunk and a rerun continues where it stopped;
4. ``finish``: sets ``models.complete = 1`` in the transaction that checks every image has its vector.

Rerunning with the same checkpoint and images embeds nothing and writes nothing.

Embedding (``embed_batch``): evaluation transform (pad to square, resize, normalise), no
augmentation, ``model.eval()``, ``torch.inference_mode``, channels_last; on CUDA, AMP
(``extract.amp``) and pinned, non-blocking copies; on a CPU, bfloat16 autocast when
``extract.cpu_precision`` resolves to bf16 (``common.runtime.device.resolve_cpu_precision``), and
``torch.compile`` for a long job (``extract.cpu_compile``, ``common.model.embed.CompiledCpuModel``).
``extract.embedding=encoder`` stores the backbone's pooled output (``SupConModel.encoder``),
``head`` the projection head's; either way L2-normalised in float32 (Khosla et al. 2020 evaluate on the encoder output, the head is thrown
away after training; Yang et al. 2022's LUT retrieval works on the same embedding), then stored as
``extract.dtype`` (float32, or float16 at half the bytes: the model row records it, and another
dtype is another model; float32 vectors already stored are converted to float16 by
``common.store.sqlite.FeatureStore.register_model`` without embedding again, float16 ones are
embedded again for float32).

Several GPUs (torchrun): every rank embeds a strided share of each chunk. With a SQLite store
the shares are gathered to rank 0 (``torch.distributed.gather_object``, ``write_gathered``), the only writer, which
sorts them by image id: the store ends up identical to a one-process run. With a PostgreSQL
store (``common.store.postgres.PgStore``, shared by every node) each rank writes its own share of each chunk
to the server itself (``COPY``, ``write_direct``; nothing goes through rank 0), and only the ranks' errors are
exchanged after each chunk; rows are keyed by image and model and a rewritten row is skipped,
so a resumed run never duplicates one. A rank that fails (an unreadable image) sends its error,
and every rank stops with it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..runtime.device import resolve_cpu_precision
from ..runtime.distributed import all_gather_objects, broadcast_object, gather_objects
from ..data.transforms import Preprocessing
from ..store.containers import ImageRecord, ModelInfo, SyncReport
from ..store.maintenance import open_store
from ..store.postgres import PgStore
from ..store.sqlite import FeatureStore
from .checkpoint import STAGE03, check_classes
from .embed import CompiledCpuModel, embed_batch, prepare_model, use_cpu_compile

log = logging.getLogger(__name__)

# Vectors per write transaction (16 MiB at 2,048-d). Bounds the work an interruption loses (a few
# seconds on a GPU, minutes for SE-ResNeXt-50 on a CPU) and rank 0's buffer, while keeping
# transactions large (one commit per chunk; benchmarks/bench_store.py writes this way).
WRITE_CHUNK_ROWS = 2048


# ----------------------------------------------------------------------------- what rank 0 decides


@dataclass
class _Plan:
    """What rank 0 decides and every rank needs: the model and the to-do list."""

    model_id: int
    dim: int
    todo_ids: list[int]
    todo_paths: list[str]
    error: str | None = None


# ----------------------------------------------------------------------------- the steps


class _Batches:
    """Embedded vectors of a rank's share, in order, handed out by count (chunks straddle batches)."""

    def __init__(self, loader: Any, model: Any, embedding: str, amp: str, device: torch.device,
                 channels_last: bool, bar: Any, dim: int, cpu_precision: str = "fp32"):
        self.it = iter(loader)
        self.dim = dim
        self.model, self.embedding, self.amp, self.device, self.cl = model, embedding, amp, device, channels_last
        self.cpu_precision = cpu_precision
        self.buf: list[np.ndarray] = []
        self.have = 0
        self.bar = bar
        self.forward_s = 0.0

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` vectors (n, dim) of this rank's share."""
        from ..data.datasets import worker_errors

        if n == 0:  # a short last chunk can leave a rank nothing to embed
            return np.zeros((0, self.dim), np.float32)
        while self.have < n:
            with worker_errors():  # from a worker: the message is the last line of the wrapped text
                x, _, _ = next(self.it)
            t0 = time.perf_counter()
            v = embed_batch(self.model, x, self.embedding, self.amp, self.device, self.cl,
                            self.cpu_precision).cpu().numpy()
            self.forward_s += time.perf_counter() - t0
            self.buf.append(v)
            self.have += v.shape[0]
            if self.bar is not None:
                self.bar.update(v.shape[0])
        allv = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
        out, rest = allv[:n], allv[n:]
        self.buf = [rest] if rest.shape[0] else []
        self.have = rest.shape[0]
        return out


@dataclass
class Prep:
    """What the checkpoint decides, checked against the splits: the prepared network, its
    preprocessing, and what the store records of it."""

    model: Any
    ckpt: dict
    rows: list
    classes: list[str]
    pre: Preprocessing
    backbone: str
    sha: str
    channels_last: bool
    cpu_precision: str
    dim: int


def _first_line(e: BaseException) -> str:
    """The line another rank hears of an error."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def read_checkpoint(checkpoint: Path, splits_csv: Path, extras: Sequence[Any], cfg: Any,
                    device: torch.device) -> Prep:
    """Load ``checkpoint`` and ``splits_csv``, check the one against the other (``UserError``
    naming both), and prepare the network on ``device``; the vector length is probed with one
    blank image."""
    from ..data.splits import class_names, read_splits
    from .checkpoint import checkpoint_preprocessing, load_checkpoint_model

    model, ckpt = load_checkpoint_model(checkpoint, map_location="cpu")
    rows = read_splits(splits_csv)
    classes = class_names(rows)
    if extras:
        from ..data.extras import check_no_overlap

        check_no_overlap(extras, {r.path for r in rows}, splits_csv)
    if not isinstance(ckpt.get("classes"), list):
        raise UserError(f"checkpoint {checkpoint} records no class list: is it a checkpoint of {STAGE03}.py?")
    check_classes(ckpt["classes"], classes, checkpoint, splits_csv)
    # the preprocessing is the checkpoint's own (what the network was trained on), never stats.json or the config's
    pre = checkpoint_preprocessing(ckpt, checkpoint)
    try:
        backbone = str(ckpt["config"]["model"]["backbone"])
    except (KeyError, TypeError):
        raise UserError(f"checkpoint {checkpoint} does not record model.backbone: is it a checkpoint of "
                        f"{STAGE03}.py?") from None
    image_size = pre.image_size
    sha = str(ckpt["sha256"])
    channels_last = bool(cfg.model.channels_last)
    cpu_precision = resolve_cpu_precision(cfg.extract.cpu_precision)  # what a CPU forward uses (model.json records it)
    model = prepare_model(model, device, channels_last)
    # the vector length, from the network itself (one blank image): what the store records is what it gets
    dim = int(embed_batch(model, torch.zeros(1, 3, image_size, image_size), cfg.extract.embedding, "off", device,
                          channels_last).shape[1])
    return Prep(model, ckpt, rows, classes, pre, backbone, sha, channels_last, cpu_precision, dim)


def plan(store_path: Path | PgStore, prep: Prep, extras: Sequence[Any], checkpoint: Path, ecfg: Any, rank: int,
         world_size: int, direct: bool) -> tuple[FeatureStore | None, _Plan, SyncReport | None, list[ModelInfo]]:
    """Rank 0 syncs the store's images with the splits (and ``extras``), registers the model and
    lists the images without a vector; every rank gets that to-do list. Returns the store this rank
    writes to (rank 0's; every rank's when ``direct``), the plan, rank 0's sync report and the
    models the registration replaced. An error on rank 0 reaches every rank (each raises)."""
    store: FeatureStore | None = None
    sync = None
    dropped: list = []
    work: _Plan | None = None
    if rank == 0:
        try:
            store = open_store(store_path, create=True)
            sync = store.sync_images([*prep.rows, *extras])
            pre = prep.pre
            info, dropped = store.register_model(
                checkpoint_sha256=prep.sha, embedding=ecfg.embedding, backbone=prep.backbone, dim=prep.dim,
                mean=pre.mean, std=pre.std, image_size=pre.image_size, pad_fill=pre.pad_fill, classes=prep.classes,
                checkpoint_path=str(checkpoint.resolve()), epoch=prep.ckpt.get("epoch"), dtype=ecfg.dtype)
            todo: list[ImageRecord] = store.missing_vectors(info.id)
            work = _Plan(info.id, info.dim, [r.id for r in todo], [r.path for r in todo])
        except Exception as e:
            if world_size > 1:
                broadcast_object(_Plan(-1, 0, [], [], error=_first_line(e)), rank, world_size)
            if store is not None:
                store.close()
            raise
    work = broadcast_object(work, rank, world_size)
    if work.error is not None and rank != 0:
        raise UserError(f"rank 0 stopped: {work.error}")
    if direct and rank != 0:
        store = open_store(store_path)  # rank 0 created it before the plan was sent
    return store, work, sync, dropped


def _batches(paths: list[str], prep: Prep, cfg: Any, device: torch.device, rank: int, world_size: int) -> _Batches:
    """The loader of this rank's share (``paths``), its progress bar (rank 0) and its network
    (compiled for a long CPU job)."""
    from ..data.datasets import ImageListDataset
    from ..runtime.progress import progress

    ecfg = cfg.extract
    ds = ImageListDataset(paths, transform=prep.pre.transform())
    loader = torch.utils.data.DataLoader(ds, batch_size=ecfg.batch_size, shuffle=False,
                                         num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    bar = progress(len(paths), "embedding" if world_size == 1 else f"embedding (rank 0 of {world_size})",
                   unit="img", enabled=rank == 0)  # no terminal: a log line every ~30 s
    net = prep.model
    if use_cpu_compile(ecfg.cpu_compile, device, len(paths)):
        net = CompiledCpuModel(prep.model, ecfg.batch_size)
    return _Batches(loader, net, ecfg.embedding, ecfg.amp, device, prep.channels_last, bar, prep.dim,
                    prep.cpu_precision)


def embed(store: FeatureStore | None, work: _Plan, chunks: list[range], share: list[int], prep: Prep, cfg: Any,
          device: torch.device, rank: int, world_size: int, direct: bool) -> tuple[int, _Batches | None]:
    """Embed this rank's share of every chunk and write each chunk (``write_direct`` when every
    rank writes, ``write_gathered`` otherwise); returns the vectors this rank wrote and its
    ``_Batches`` (None when nothing is to do). On an error the store is closed: what was committed
    stays, and a rerun continues from there."""
    if not work.todo_ids:
        return 0, None
    batches = _batches([work.todo_paths[i] for i in share], prep, cfg, device, rank, world_size)
    try:
        write = write_direct if direct else write_gathered
        return write(store, work, chunks, batches, rank, world_size), batches
    except BaseException:
        if store is not None:
            store.close()
        raise
    finally:
        batches.bar.close()


def write_direct(store: FeatureStore, work: _Plan, chunks: list[range], batches: _Batches, rank: int,
                 world_size: int) -> int:
    """PostgreSQL, several ranks: each rank writes its own share of each chunk to the shared server
    (nothing goes through rank 0); only errors are exchanged after each chunk, and every rank stops
    with the first. Returns the vectors this rank wrote."""
    written = 0
    for c in chunks:
        mine = c[rank::world_size]
        ids = np.array([work.todo_ids[i] for i in mine], dtype=np.int64)
        err, failed = None, None
        try:
            vecs = batches.take(len(mine))
            written += store.write_vectors(work.model_id, ids, vecs)
        except Exception as e:  # sent to the other ranks, which stop with it
            err, failed = f"rank {rank}: {_first_line(e)}", e
        errs = [e for e in all_gather_objects(err, world_size) if e]
        if errs:
            if failed is not None:
                raise failed
            raise UserError(f"extraction stopped: {errs[0]}")
    return written


def write_gathered(store: FeatureStore | None, work: _Plan, chunks: list[range], batches: _Batches, rank: int,
                   world_size: int) -> int:
    """SQLite (or one process): every rank's share of each chunk is gathered to rank 0, the only
    writer, which writes it sorted by image id (the store a one-process run writes). An error on any
    rank is broadcast, and every rank stops with it. Returns the vectors written (rank 0)."""
    written = 0
    for c in chunks:
        mine = c[rank::world_size]
        ids = np.array([work.todo_ids[i] for i in mine], dtype=np.int64)
        vecs, err, failed = np.zeros((0, batches.dim), np.float32), None, None
        try:
            vecs = batches.take(len(mine))
        except Exception as e:  # sent to rank 0, which tells every rank to stop
            if world_size == 1:
                raise
            err, failed = f"rank {rank}: {_first_line(e)}", e
        parts = gather_objects((ids, vecs, err), rank, world_size)
        stop, write_exc = None, None
        if rank == 0:
            errs = [p[2] for p in parts if p[2]]
            stop = errs[0] if errs else None
            if stop is None:
                try:
                    written += _write_sorted(store, work.model_id, parts)
                except Exception as e:  # every rank must hear of it, or they wait forever
                    if world_size == 1:
                        raise
                    write_exc, stop = e, f"rank 0: {_first_line(e)}"
        stop = broadcast_object(stop, rank, world_size)
        if write_exc is not None:
            raise write_exc
        if stop is not None:
            if failed is not None:
                raise failed
            raise UserError(f"extraction stopped: {stop}")
    return written


def _write_sorted(store: FeatureStore, model_id: int, parts: list) -> int:
    """Rank 0 writes the ranks' ``(ids, vectors, error)`` parts of one chunk as one transaction."""
    all_ids = np.concatenate([p[0] for p in parts])
    all_vecs = np.concatenate([p[1] for p in parts])
    order = np.argsort(all_ids, kind="stable")  # rows in image id order, as one process writes them
    return store.write_vectors(model_id, all_ids[order], all_vecs[order])


def finish(store: FeatureStore, model_id: int, dropped: list[ModelInfo], where: Any) -> tuple[ModelInfo, int]:
    """Rank 0, after the last chunk: mark the model complete (every image has its vector), count
    the vectors, and give a replaced model's pages back to the file system; closes the store."""
    try:
        info = store.mark_complete(model_id)
        total = store.counts()["vectors"]
        if dropped:  # the replaced model's pages back to the file system (SQLite)
            before, after = store.compact()
            if after != before:
                log.info("compacted %s after replacing %s: %.1f MiB -> %.1f MiB", where,
                         "; ".join(m.describe() for m in dropped), before / 2**20, after / 2**20)
    finally:
        store.close()
    return info, total


def _log_speed(n_todo: int, elapsed: float, n_share: int, batches: _Batches | None, amp: str,
               cpu_precision: str, device: torch.device, world_size: int) -> float:
    """Log the images per second (all ranks, and rank 0's forward passes alone); returns the first."""
    rate = n_todo / elapsed if n_todo and elapsed > 0 else 0.0
    if n_todo:
        fwd = batches.forward_s if batches is not None else 0.0
        how = (f"AMP {amp}" if device.type == "cuda" else
               f"{cpu_precision}{', compiled' if isinstance(batches.model, CompiledCpuModel) and not batches.model.failed else ''}")
        log.info("embedded %d images in %.1f s: %.1f images/s (%d process%s, %s; forward passes on rank 0: %.1f "
                 "images/s)", n_todo, elapsed, rate, world_size, "es" if world_size > 1 else "", how,
                 n_share / fwd if fwd > 0 else 0.0)
    return rate


def extract_features(checkpoint: Path, splits_csv: Path, store_path: Path | PgStore, cfg: Any, *,
                     device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                     chunk_rows: int | None = None, extras: Sequence[Any] = ()) -> dict[str, Any]:
    """Embed every image of ``splits_csv`` with ``checkpoint`` into the store; returns metrics (rank 0).

    With ``world_size > 1`` the default process group must be initialised; every rank calls this.
    ``chunk_rows`` overrides the vectors per write transaction (default: ``WRITE_CHUNK_ROWS``).
    ``extras``: gallery-only images (``common.data.extras.list_extras``), stored under the split
    ``extra``; the checkpoint's class list is checked against the splits' classes only.
    ``store_path``: a SQLite file, or a ``PgStore`` (every rank then writes its own share).
    """
    device = torch.device(device)
    checkpoint, splits_csv = Path(checkpoint), Path(splits_csv)
    if not isinstance(store_path, PgStore):
        store_path = Path(store_path)
    direct = world_size > 1 and isinstance(store_path, PgStore)  # every rank writes its own share
    ecfg = cfg.extract
    prep = read_checkpoint(checkpoint, splits_csv, extras, cfg, device)
    store, work, sync, dropped = plan(store_path, prep, extras, checkpoint, ecfg, rank, world_size, direct)
    n_todo, n_images = len(work.todo_ids), len(prep.rows) + len(extras)
    if rank == 0:
        log.info("%s: %d images, %d to embed with %s (%s embedding, %d-d, stored as %s, model id %d)%s", store_path,
                 n_images, n_todo, checkpoint, ecfg.embedding, prep.dim, ecfg.dtype, work.model_id,
                 f"; {n_images - n_todo} already embedded" if n_todo < n_images else "")

    # every rank: a strided share of each chunk
    chunk = chunk_rows or WRITE_CHUNK_ROWS
    chunks = [range(s, min(s + chunk, n_todo)) for s in range(0, n_todo, chunk)]
    share = [i for c in chunks for i in c[rank::world_size]]
    t0 = time.perf_counter()
    written, batches = embed(store, work, chunks, share, prep, cfg, device, rank, world_size, direct)
    elapsed = time.perf_counter() - t0
    if direct:
        written = sum(all_gather_objects(written, world_size))  # after every rank's last commit
        if rank != 0:
            store.close()
    if rank != 0:
        return {}

    assert store is not None
    info, total = finish(store, work.model_id, dropped, store_path)
    rate = _log_speed(n_todo, elapsed, len(share), batches, ecfg.amp, prep.cpu_precision, device, world_size)
    if not n_todo:
        log.info("nothing to embed: the %d vectors of model %d are up to date", total, info.id)
    return {
        "model_id": info.id, "checkpoint": str(checkpoint), "checkpoint_sha256": prep.sha,
        "embedding": info.embedding, "dim": info.dim, "dtype": info.dtype,
        "images": n_images, "extra_images": len(extras), "vectors": total, "vectors_written": written,
        "images_added": sync.added if sync else 0, "images_removed": sync.removed if sync else 0,
        "models_replaced": len(dropped), "images_per_s": round(rate, 2), "world_size": world_size,
        "cpu_precision": prep.cpu_precision,
    }
