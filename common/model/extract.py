"""Stage 04: embed every image of every split with one checkpoint into the feature store.

What it does, in order (``extract_features``):

1. loads the checkpoint (``extract.checkpoint``: ``best`` | ``last`` | a path) with
   ``common.model.load_checkpoint_model``; its class list must equal the splits' (``UserError``
   naming both otherwise); the preprocessing (mean/std, image size, pad fill) is the one the
   checkpoint records (``common.model.checkpoint_preprocessing``), never ``stats.json`` or the
   configuration: the network sees its images as it saw them in training, and the store records it;
2. rank 0 syncs the store's ``images`` table with ``splits.csv`` (new images added, removed ones
   deleted with their vectors, changed files lose their vectors) and registers the model
   (checkpoint sha256 + embedding kind + preprocessing). **The store holds one model at a time**:
   a new checkpoint or embedding kind deletes the old model's rows, vectors and LUT in the same
   transaction that registers the new one;
3. embeds the images that have no vector of this model yet (the to-do list, sorted by image id),
   in chunks of ``WRITE_CHUNK_ROWS`` images; each chunk is one write transaction, so
   an interrupted run loses at most one chunk and a rerun continues where it stopped;
4. sets ``models.complete = 1`` in the transaction that checks every image has its vector.

Rerunning with the same checkpoint and images embeds nothing and writes nothing.

Embedding (``embed_batch``): evaluation transform (pad to square, resize, normalise), no
augmentation, ``model.eval()``, ``torch.inference_mode``, channels_last; on CUDA, AMP
(``extract.amp``) and pinned, non-blocking copies; on a CPU, bfloat16 autocast when
``extract.cpu_precision`` resolves to bf16 (``device.resolve_cpu_precision``), and
``torch.compile`` for a long job (``extract.cpu_compile``, ``embed.CompiledCpuModel``). ``extract.embedding=encoder`` stores the
backbone's pooled output (``SupConModel.encoder``), ``head`` the projection head's; either way
L2-normalised in float32 (Khosla et al. 2020 evaluate on the encoder output, the head is thrown
away after training; Yang et al. 2022's LUT retrieval works on the same embedding), then stored as
``extract.dtype`` (float32, or float16 at half the bytes: the model row records it, and another
dtype is another model; float32 vectors already stored are converted to float16 by
``FeatureStore.register_model`` without embedding again, float16 ones are embedded again for float32).

Several GPUs (torchrun): every rank embeds a strided share of each chunk. With a SQLite store
the shares are gathered to rank 0 (``torch.distributed.gather_object``), the only writer, which
sorts them by image id: the store ends up identical to a one-process run. With a PostgreSQL
store (``features.PgStore``, shared by every node) each rank writes its own share of each chunk
to the server itself (``COPY``; nothing goes through rank 0), and only the ranks' errors are
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
from ..runtime.distributed import _all_gather, _broadcast_error, _broadcast_plan, _gather
from ..store.containers import ImageRecord
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


# ----------------------------------------------------------------------------- distributed helpers


@dataclass
class _Plan:
    """What rank 0 decides and every rank needs: the model and the to-do list."""

    model_id: int
    dim: int
    todo_ids: list[int]
    todo_paths: list[str]
    error: str | None = None


# ----------------------------------------------------------------------------- the stage


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


def extract_features(checkpoint: Path, splits_csv: Path, store_path: Path | PgStore, cfg: Any, *,
                     device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                     chunk_rows: int | None = None, extras: Sequence[Any] = ()) -> dict[str, Any]:
    """Embed every image of ``splits_csv`` with ``checkpoint`` into the store; returns metrics (rank 0).

    With ``world_size > 1`` the default process group must be initialised; every rank calls this.
    ``chunk_rows`` overrides the vectors per write transaction (default: ``WRITE_CHUNK_ROWS``).
    ``extras``: gallery-only images (``common.gallery.list_extras``), stored under the split
    ``extra``; the checkpoint's class list is checked against the splits' classes only.
    ``store_path``: a SQLite file, or a ``PgStore`` (every rank then writes its own share).
    """
    from ..runtime.progress import progress

    from ..data.datasets import ImageListDataset
    from ..data.splits import class_names, read_splits
    from .checkpoint import checkpoint_preprocessing, load_checkpoint_model

    device = torch.device(device)
    checkpoint, splits_csv = Path(checkpoint), Path(splits_csv)
    if not isinstance(store_path, PgStore):
        store_path = Path(store_path)
    direct = world_size > 1 and isinstance(store_path, PgStore)  # every rank writes its own share
    ecfg = cfg.extract
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
    cpu_precision = resolve_cpu_precision(ecfg.cpu_precision)  # what a CPU forward uses (model.json records it)
    model = prepare_model(model, device, channels_last)
    # the vector length, from the network itself (one blank image): what the store records is what it gets
    dim = int(embed_batch(model, torch.zeros(1, 3, image_size, image_size), ecfg.embedding, "off", device,
                          channels_last).shape[1])

    # --- rank 0: sync the store and decide the to-do list
    store: FeatureStore | None = None
    sync = None
    dropped: list = []
    plan: _Plan | None = None
    if rank == 0:
        try:
            store = open_store(store_path, create=True)
            sync = store.sync_images([*rows, *extras])
            info, dropped = store.register_model(
                checkpoint_sha256=sha, embedding=ecfg.embedding, backbone=backbone, dim=dim, mean=pre.mean,
                std=pre.std, image_size=pre.image_size, pad_fill=pre.pad_fill, classes=classes,
                checkpoint_path=str(checkpoint.resolve()), epoch=ckpt.get("epoch"), dtype=ecfg.dtype)
            todo: list[ImageRecord] = store.missing_vectors(info.id)
            plan = _Plan(info.id, info.dim, [r.id for r in todo], [r.path for r in todo])
        except Exception as e:
            if world_size > 1:
                _broadcast_plan(_Plan(-1, 0, [], [], error=str(e).splitlines()[0] if str(e) else type(e).__name__),
                                rank, world_size)
            if store is not None:
                store.close()
            raise
    plan = _broadcast_plan(plan, rank, world_size)
    if direct and rank != 0:
        store = open_store(store_path)  # rank 0 created it before the plan was sent
    n_todo = len(plan.todo_ids)
    n_images = len(rows) + len(extras)
    if rank == 0:
        log.info("%s: %d images, %d to embed with %s (%s embedding, %d-d, stored as %s, model id %d)%s", store_path,
                 n_images, n_todo, checkpoint, ecfg.embedding, dim, ecfg.dtype, plan.model_id,
                 f"; {n_images - n_todo} already embedded" if n_todo < n_images else "")

    # --- every rank: a strided share of each chunk
    chunk = chunk_rows or WRITE_CHUNK_ROWS
    chunks = [range(s, min(s + chunk, n_todo)) for s in range(0, n_todo, chunk)]
    share = [i for c in chunks for i in c[rank::world_size]]
    written = 0
    t0 = time.perf_counter()
    batches = None
    if n_todo:
        transform = pre.transform()
        ds = ImageListDataset([plan.todo_paths[i] for i in share], transform=transform)
        loader = torch.utils.data.DataLoader(ds, batch_size=ecfg.batch_size, shuffle=False,
                                             num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                                             persistent_workers=False)
        bar = progress(len(share), "embedding" if world_size == 1 else f"embedding (rank 0 of {world_size})",
                       unit="img", enabled=rank == 0)  # no terminal: a log line every ~30 s
        net = model
        if use_cpu_compile(ecfg.cpu_compile, device, len(share)):
            net = CompiledCpuModel(model, ecfg.batch_size)
        batches = _Batches(loader, net, ecfg.embedding, ecfg.amp, device, channels_last, bar, dim, cpu_precision)
        failed: str | None = None
        failed_exc: BaseException | None = None
        try:
            for c in chunks:
                mine = c[rank::world_size]
                ids = np.array([plan.todo_ids[i] for i in mine], dtype=np.int64)
                vecs, err = np.zeros((0, dim), np.float32), None
                if failed is None:
                    try:
                        vecs = batches.take(len(mine))
                        if direct:  # this rank's share goes to the shared server itself
                            written += store.write_vectors(plan.model_id, ids, vecs)
                    except Exception as e:  # sent to the other ranks, which stop with it
                        if world_size == 1:
                            raise
                        failed = err = f"rank {rank}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        failed_exc = e
                if direct:
                    errs = [e for e in _all_gather(err, world_size) if e]
                    if errs:
                        if failed_exc is not None:
                            raise failed_exc
                        raise UserError(f"extraction stopped: {errs[0]}")
                    continue
                parts = _gather((ids, vecs, err), rank, world_size)
                stop, write_exc = None, None
                if rank == 0:
                    errs = [p[2] for p in parts if p[2]]
                    stop = errs[0] if errs else None
                    if stop is None:
                        all_ids = np.concatenate([p[0] for p in parts])
                        all_vecs = np.concatenate([p[1] for p in parts])
                        order = np.argsort(all_ids, kind="stable")  # rows in image id order, as one process writes them
                        try:
                            written += store.write_vectors(plan.model_id, all_ids[order], all_vecs[order])
                        except Exception as e:  # every rank must hear of it, or they wait forever
                            if world_size == 1:
                                raise
                            write_exc, stop = e, f"rank 0: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                stop = _broadcast_error(stop, rank, world_size)
                if write_exc is not None:
                    raise write_exc
                if stop is not None:
                    if failed_exc is not None:
                        raise failed_exc
                    raise UserError(f"extraction stopped: {stop}")
        except BaseException:
            if store is not None:
                store.close()  # what was committed stays: a rerun continues from there
            raise
        finally:
            bar.close()
    elapsed = time.perf_counter() - t0
    if direct:
        written = sum(_all_gather(written, world_size))  # after every rank's last commit
        if rank != 0:
            store.close()

    if rank != 0:
        return {}
    assert store is not None
    try:
        info = store.mark_complete(plan.model_id)
        total = store.counts()["vectors"]
        if dropped:  # the replaced model's pages back to the file system (SQLite)
            before, after = store.compact()
            if after != before:
                log.info("compacted %s after replacing %s: %.1f MiB -> %.1f MiB", store_path,
                         "; ".join(m.describe() for m in dropped), before / 2**20, after / 2**20)
    finally:
        store.close()
    rate = n_todo / elapsed if n_todo and elapsed > 0 else 0.0
    if n_todo:
        fwd = batches.forward_s if batches is not None else 0.0
        how = (f"AMP {ecfg.amp}" if device.type == "cuda" else
               f"{cpu_precision}{', compiled' if isinstance(batches.model, CompiledCpuModel) and not batches.model.failed else ''}")
        log.info("embedded %d images in %.1f s: %.1f images/s (%d process%s, %s; forward passes on rank 0: %.1f "
                 "images/s)", n_todo, elapsed, rate, world_size, "es" if world_size > 1 else "", how,
                 len(share) / fwd if fwd > 0 else 0.0)
    else:
        log.info("nothing to embed: the %d vectors of model %d are up to date", total, info.id)
    return {
        "model_id": info.id,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha,
        "embedding": info.embedding,
        "dim": info.dim,
        "dtype": info.dtype,
        "images": n_images,
        "extra_images": len(extras),
        "vectors": total,
        "vectors_written": written,
        "images_added": sync.added if sync else 0,
        "images_removed": sync.removed if sync else 0,
        "models_replaced": len(dropped),
        "images_per_s": round(rate, 2),
        "world_size": world_size,
        "cpu_precision": cpu_precision,
    }
