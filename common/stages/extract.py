"""Stage 04's driver: embed every image of every split with one checkpoint into the feature store.

Reads 01's splits.csv, 03's checkpoint (``extract.checkpoint``; the images are embedded with the
preprocessing it records, never with 02's stats.json, which is only checked up to date) and the
gallery-only images of ``data.gallery_extra`` (split ``extra``, ``common.data.extras``); writes
``features.sqlite`` (resumable: an interrupted run continues where it stopped) and ``model.json``,
the small description of the model and embedding that stages 05-07 read (checkpoint path and
sha256, backbone, embedding kind, dimension, normalisation, the store's model id, and the gallery's
classes: the checkpoint's ``train_classes`` then the gallery-only ``extra_classes``).

A finished store is embedded again in full on ``--force`` or when the store no longer matches
what this stage recorded (a corrupted or hand-edited file): it is never re-recorded as good.
A store of an older schema version that still has the content recorded (a run folder made by an
earlier version of this tool) is upgraded in place instead (``common.store.maintenance.upgrade_store``, logged:
no vector touched, nothing embedded again). Every vector is checked finite and unit-norm before
the stage finishes. ``extract.dtype`` (float32 | float16) is how the vectors are stored;
``model.json``, the manifest's metrics and the log record it with the store's size.

With ``store.url`` set the store lives on a PostgreSQL server, in the schema ``store.schema``
(default ``run_<run folder name>``): no ``features.sqlite`` then; ``model.json`` records the URL
(it never holds a password), the schema and the store's ``content_digest``, and is recorded with
the digest kind ``store_ref``: its sha256, which changes when the server's content no longer
has the recorded digest. Downstream freshness follows ``model.json``; this stage then embeds
again in full, as for a changed file. Under torchrun every rank writes its own share to the server.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.extras import check_decodable, check_no_overlap, list_extras
from ..ecotaxa.rows import export_extras_of
from ..data.labels import gallery_classes
from ..data.splits import read_splits
from ..errors import UserError
from ..fileio import write_json
from ..model.extract import extract_features
from ..runtime.device import resolve_cpu_precision
from ..runtime.distributed import barrier, go_no_go
from ..store.maintenance import (
    content_digest,
    open_store,
    remove_store,
    store_bytes,
    store_exists,
    upgrade_store,
    verify_store,
)
from ..store.postgres import PgStore
from . import SPLIT, STATS, TRAIN
from .artefacts import MODEL_JSON, SPLITS_CSV, STORE_FILE, resolve_checkpoint

if TYPE_CHECKING:
    from ..pipeline.context import Context

log = logging.getLogger(__name__)


OWNER_KEY = "run_folder"  # meta key of a PostgreSQL store: the run folder whose stage 04 writes it
PRECISION_KEY = "cpu_precision"  # meta key: extract.cpu_precision (resolved) of the store's vectors


def _pg_store(ctx: Context) -> PgStore | None:
    """The PostgreSQL store of ``store.url`` (None: the run's own ``features.sqlite``)."""
    scfg = ctx.cfg.store
    return PgStore(scfg.url, scfg.schema or default_schema(ctx.run_dir), scfg.password_env) if scfg.url else None


def check(ctx: Context) -> None:
    """Read only, before anything is written: the checkpoint exists, the gallery-only images of
    ``data.gallery_extra`` are new to the splits and decode (kept in ``ctx.checked`` for ``main``),
    and a PostgreSQL schema is not another run folder's."""
    splits = ctx.upstream(SPLIT) / SPLITS_CSV
    resolve_checkpoint(ctx.upstream(TRAIN), ctx.cfg.extract.checkpoint, ctx.run_dir)
    extras = list_extras(ctx.cfg.data.gallery_extra, ctx.cfg.data.min_side, ctx.cfg.data.max_pixels,
                         export=lambda p: export_extras_of(p, ctx.cfg.data))
    if extras:
        check_no_overlap(extras, {r.path for r in read_splits(splits)}, splits)
        check_decodable(extras)  # else a bad image would stop the stage after the store is changed
    ctx.checked["extras"] = extras
    pg = _pg_store(ctx)
    if pg is not None:
        _check_owner(pg, ctx.run_dir, explicit=ctx.cfg.store.schema is not None)


def main(ctx: Context) -> dict[str, Any]:
    """Prepare the store (rank 0), embed every image into it, check it, and write ``model.json``."""
    splits = ctx.upstream(SPLIT) / SPLITS_CSV
    ctx.upstream(STATS)  # recorded for freshness only: the preprocessing is the checkpoint's own, never stats.json
    ckpt = resolve_checkpoint(ctx.upstream(TRAIN), ctx.cfg.extract.checkpoint, ctx.run_dir)
    pg = _pg_store(ctx)
    if pg is not None:
        store: Path | PgStore = pg
        model_json = ctx.output(MODEL_JSON, digest="store_ref")
    else:
        store = ctx.output(STORE_FILE, digest="feature_store")
        model_json = ctx.output(MODEL_JSON)
    precision = resolve_cpu_precision(ctx.cfg.extract.cpu_precision)
    with go_no_go():  # an error of rank 0 here stops every rank at once (none waits in a collective)
        if ctx.rank == 0:
            _prepare_store(ctx, store, precision)
    extras = ctx.checked["extras"]
    barrier()
    metrics = extract_features(ckpt, splits, store, ctx.cfg, device=ctx.device(), rank=ctx.rank,
                               world_size=ctx.world_size, extras=extras)
    if ctx.rank != 0:
        return metrics
    n = verify_store(store, metrics["model_id"])
    log.info("checked %d vectors: finite and unit-norm", n)
    info = _record_size(store, metrics, n)
    _write_model_json(model_json, info, ckpt, ctx.run_dir, extras, store, metrics["vectors"], precision)
    return metrics


def _record_size(store: Path | PgStore, metrics: dict[str, Any], n: int) -> Any:
    """The model row of the vectors just written; their bytes and the store's go to ``metrics`` and the log."""
    with open_store(store) as st:
        info = st.model_info(metrics["model_id"])
    vector_bytes = n * info.dim * info.itemsize
    size = store_bytes(store)
    log.info("store %s: %d vectors of %d %s values, %.1f MiB of vectors; %.1f MiB in all", store, n, info.dim,
             info.dtype, vector_bytes / 2**20, size / 2**20)
    metrics.update(vector_bytes=vector_bytes, store_bytes=size)
    return info


def _write_model_json(path: Path, info: Any, ckpt: Path, run_dir: Path, extras: list, store: Path | PgStore,
                      vectors: int, precision: str) -> None:
    """``model.json``: the model and embedding the store holds, the gallery's classes (the
    checkpoint's, then the gallery-only ones) and, for a PostgreSQL store, where it is and its digest."""
    ck = Path(ckpt).resolve()
    run = Path(run_dir).resolve()
    classes = gallery_classes(info.classes, [e.label for e in extras])
    extra_classes = classes[len(info.classes):]
    if extras:
        log.info("gallery-only images (data.gallery_extra): %d, in %d classes%s", len(extras),
                 len({e.label for e in extras}),
                 f"; classes the backbone never saw: {', '.join(extra_classes)}" if extra_classes else "")
    record = {}
    if isinstance(store, PgStore):  # where the vectors are, and what they were when recorded
        record = {"store": {"url": store.url, "schema": store.schema, "password_env": store.password_env,
                            "digest": content_digest(store)}}
    write_json(path, {
        # inside the run folder the checkpoint is named relative to it, so a moved run still finds it
        "model_id": info.id, "checkpoint": str(ck.relative_to(run)) if ck.is_relative_to(run) else str(ck),
        "checkpoint_sha256": info.checkpoint_sha256, "backbone": info.backbone, "embedding": info.embedding,
        "dim": info.dim, "dtype": info.dtype, "mean": info.mean, "std": info.std,
        "image_size": info.image_size, "pad_fill": info.pad_fill, "epoch": info.epoch, "vectors": vectors,
        # classes = the gallery's: the checkpoint's (train_classes), then the gallery-only ones
        "classes": classes, "train_classes": list(info.classes), "extra_classes": extra_classes,
        "extra_images": len(extras), "cpu_precision": precision, **record,
    })


def _prepare_store(ctx: Context, store: Path | PgStore, precision: str) -> None:
    """Rank 0, before anything is embedded (its owner was checked by ``check``): a store to embed
    again removed (``--force``, a changed output, another precision), an older one upgraded."""
    scfg = ctx.cfg.store
    if ctx.previous is not None and (ctx.force or ctx.changed_output):
        why = "--force" if ctx.force else f"{ctx.changed_output} changed since this stage recorded it"
        if ctx.changed_output == MODEL_JSON and scfg.url:
            why = f"the feature store {store} no longer has the content digest {MODEL_JSON} recorded"
        remove_store(store)
        log.info("%s: embedding every image again into a new store %s", why, store)
    elif store_exists(store):
        upgrade_store(store)  # a store written by an older version of this tool (logged when it was)
    _check_precision(store, precision)
    if isinstance(store, PgStore):
        with open_store(store, create=True) as st:
            st.set_meta(OWNER_KEY, str(Path(ctx.run_dir).resolve()))


def _check_precision(store: Path | PgStore, precision: str) -> None:
    """A store whose vectors were embedded with another ``extract.cpu_precision`` (resolved; a store
    that records none: fp32, the only one before) is removed, so that every image is embedded
    again: queries (stage 07) and gallery then share one precision. Records ``precision`` in the
    store's ``meta`` (not part of its content digest)."""
    if store_exists(store):
        with open_store(store) as st:
            recorded = st.meta(PRECISION_KEY) or "fp32"
        if recorded == precision:
            return
        remove_store(store)
        log.info("extract.cpu_precision: the vectors of %s were embedded in %s, this run embeds in %s: embedding "
                 "every image again into a new store", store, recorded, precision)
    with open_store(store, create=True) as st:
        st.set_meta(PRECISION_KEY, precision)


def _check_owner(store: PgStore, run_dir: Path, explicit: bool) -> None:
    """A schema another run folder wrote is never mixed with this run's: ``UserError`` when the
    default schema (``run_<folder name>``) holds the store of another folder of the same name.
    A schema named in ``store.schema`` is taken over (the user chose it)."""
    if explicit or not store_exists(store):
        return
    with open_store(store, any_version=True) as st:  # a store of an older version too: upgraded only if ours
        owner = st.meta(OWNER_KEY)
    here = str(Path(run_dir).resolve())
    if owner is not None and owner != here:
        raise UserError(f"store.schema: the schema {store.schema} on {store.url} holds the store of another run "
                        f"folder ({owner}): set store.schema to a name of this run's own, or to {store.schema} to "
                        "take that store over")


def default_schema(run_dir: Path) -> str:
    """``run_<run folder name>`` as a PostgreSQL identifier (lower case, other characters ``_``)."""
    return ("run_" + re.sub(r"[^a-z0-9_]", "_", Path(run_dir).resolve().name.lower()))[:63]
