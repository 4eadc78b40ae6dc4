"""Stage 07's inputs: the stored vectors, the LUT, the threshold, the FAISS index and the query model."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ...data.labels import class_index, gallery_classes
from ...data.splits import EXTRA_SPLIT, class_names, read_splits
from ...data.transforms import Preprocessing
from ...errors import UserError
from ...fileio import read_json
from ...retrieval import search as retrieval_search
from ...retrieval.ann import AnnIndex, agreement, build_index, ids_sha256, load_index
from ...retrieval.streamed import describe, is_streamed
from ...store.containers import ModelInfo, Vectors, merge, subset
from ...store.schema import GALLERY_SPLITS
from ..artefacts import (
    INDEX_FILE,
    INDEX_JSON,
    MODEL_JSON,
    SWEEP_PNG,
    open_lut,
    open_model_store,
    read_threshold_json,
    require_same_checkpoint,
)

if TYPE_CHECKING:
    from ...pipeline.context import Context

log = logging.getLogger(__name__)


AGREEMENT_QUERIES = 1000  # val queries searched both ways to measure an index's agreement with exact search


@dataclass
class StoreData:
    """What stage 07 reads: one model's train/val/test vectors and the gallery."""

    classes: list[str]
    model: ModelInfo
    checkpoint: Path
    train: Vectors
    val: Vectors
    test: Vectors
    gallery: Vectors
    test_rows: list = field(default_factory=list)  # splits.csv rows of the test split
    facts: list[tuple[str, Any]] = field(default_factory=list)
    unknown_test: Vectors | None = None  # test images of inference.unknown_classes
    unknown_classes: list[str] = field(default_factory=list)
    cpu_precision: str = "fp32"  # model.json's: queries embedded on a CPU in the gallery's precision

    @property
    def model_id(self) -> int:
        return int(self.model.id)


def load_store_data(stage04: Path, splits_csv: Path, lut_path: Path | None, password_env: str | None = None,
                    max_memory_gib: float | None = None, test: bool = True) -> StoreData:
    """Load one model's train/val/test vectors and the gallery (the LUT, or every train and extra
    vector when None). The classes are the checkpoint's (equal to the splits'), then the
    gallery-only classes stage 04 recorded in ``model.json``. ``password_env``: the PostgreSQL
    password's variable of a store on a server (``store.password_env``; None: the recorded one).
    ``max_memory_gib``: the gallery, and the train split, above this many GiB of vectors stay in the
    store (``common.retrieval.streamed``); the val queries are always loaded, the test ones unless
    ``test`` is False (predict mode: an empty test split)."""
    rows = read_splits(splits_csv)
    train_classes = list(class_names(rows))
    with open_model_store(stage04, password_env) as ms:
        meta, info, store_path = ms.meta, ms.info, ms.target
        classes = gallery_classes(train_classes, meta.get("extra_classes", []))
        if list(info.classes) != train_classes:
            raise UserError(f"{store_path}: the vectors' checkpoint has {len(info.classes)} classes but {splits_csv} "
                            f"has {len(train_classes)}: rerun 04_extract_features.py")
        val = ms.load(("val",), classes)
        test_v = ms.load(("test",), classes) if test else Vectors(np.zeros((0, val.X.shape[1]), np.float32),
                                                                  np.zeros(0, np.int64), [])
        train = ms.load(("train",), classes, max_memory_gib)
        n_extra = ms.store.count_vectors((EXTRA_SPLIT,), info.id)
        if lut_path is None and not is_streamed(train.X):
            gallery = merge(train, ms.load((EXTRA_SPLIT,), classes))
        elif lut_path is None:  # the full gallery, streamed like the train split
            gallery = ms.load(GALLERY_SPLITS, classes, 0.0)
        if lut_path is None:
            how = f"; {describe(gallery.X)}" if is_streamed(gallery.X) else ""
            desc = f"full gallery ({len(train)} train + {n_extra} gallery-only vectors{how})"
    if lut_path is not None:
        gallery, desc = open_lut(lut_path, info, classes, max_memory_gib)
    facts = [("model", info.describe()), ("backbone", info.backbone), ("image size", info.image_size),
             ("gallery", desc), ("classes", len(classes))]
    if n_extra:
        only = classes[len(train_classes):]
        facts.append(("gallery-only images (data.gallery_extra)",
                      f"{n_extra}" + (f"; classes the backbone never saw: {', '.join(only)}" if only else "")))
    checkpoint = Path(meta["checkpoint"])
    if not checkpoint.is_absolute():  # relative to the run folder (stage 04's parent)
        checkpoint = Path(stage04).parent / checkpoint
    precision = meta.get("cpu_precision", "fp32")  # absent: a store of a version that embedded in fp32 only
    if precision not in ("fp32", "bf16"):
        raise UserError(f"{Path(stage04) / MODEL_JSON}: cpu_precision {precision!r} is not fp32 or bf16: rerun "
                        "04_extract_features.py --force")
    return StoreData(classes=classes, model=info, checkpoint=checkpoint, train=train, val=val, test=test_v,
                     gallery=gallery, test_rows=[r for r in rows if r.split == "test"], facts=facts,
                     cpu_precision=precision)


def _held_out(names: list[str], classes: list[str]) -> np.ndarray:
    """The indices of ``inference.unknown_classes`` (``UserError`` for a name not a gallery class)."""
    shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
    return class_index(names, classes, lambda v: f"inference.unknown_classes: {v!r} is not a class of the gallery "
                       f"({shown})")


def hold_out(data: StoreData, names: list[str]) -> StoreData:
    """``inference.unknown_classes``: those classes leave the gallery, train and val; their test
    images become ``unknown_test`` (queries that should be rejected)."""
    if not names:
        return data
    out = _held_out(names, data.classes)
    keep = ~np.isin(data.gallery.labels, out)
    if not keep.any():
        raise UserError("inference.unknown_classes: every gallery class is held out; keep at least one")
    test_known = ~np.isin(data.test.labels, out)
    data.gallery = subset(data.gallery, keep)
    data.train = subset(data.train, ~np.isin(data.train.labels, out))
    data.val = subset(data.val, ~np.isin(data.val.labels, out))
    data.unknown_test = subset(data.test, ~test_known)
    data.test = subset(data.test, test_known)
    data.unknown_classes = list(names)
    data.facts.append(("unknown classes (inference.unknown_classes)",
                       f"{', '.join(names)}: out of the gallery; {len(data.unknown_test)} test images as unknowns"))
    log.info("inference.unknown_classes: %s left out of the gallery (%d vectors left); %d test images are unknowns",
             ", ".join(names), len(data.gallery), len(data.unknown_test))
    return data


def threshold_warnings(sweep_dir: Path | None) -> list[str]:
    """Stage 05's cautions about its threshold (``threshold.json``'s ``warnings``), for the report."""
    meta = read_threshold_json(sweep_dir, required=False) if sweep_dir is not None else None
    w = (meta or {}).get("warnings") or []
    return [str(x) for x in w] if isinstance(w, list) else []


def _threshold_info(sweep_dir: Path | None) -> tuple[Path | None, float | None]:
    if sweep_dir is None:
        return None, None
    png = sweep_dir / SWEEP_PNG
    suggested = None
    meta = read_threshold_json(sweep_dir, required=False)
    if meta is not None:
        try:
            v = meta.get("suggested_reject_below")
            suggested = float(v) if v is not None else None
        except (ValueError, TypeError) as e:
            log.warning("cannot read suggested_reject_below from %s: %s", sweep_dir, e)
    return (png if png.is_file() else None), suggested


def open_index(ctx: Context, data: StoreData, stage06: Path | None) -> AnnIndex | None:
    """The FAISS index over the gallery's rows (None for ``search.index=exact``): 06's ``lut.faiss``
    checked against ``lut_faiss.json``, or built now over the full train gallery."""
    scfg = ctx.cfg.search
    if scfg.index == "exact":
        return None
    if stage06 is None:
        log.info("search.index=%s over the full train gallery: building the index now (not saved)", scfg.index)
        ann = build_index(data.gallery.X, scfg, seed=ctx.cfg.run.seed, device=ctx.device())
    else:
        path, meta_path = stage06 / INDEX_FILE, stage06 / INDEX_JSON
        if not path.is_file() or not meta_path.is_file():
            raise UserError(f"{path} is missing (stage 06 ran with search.index=exact): rerun 06_prune_features.py "
                            f"with search.index={scfg.index}")
        meta = read_json(meta_path)
        if (meta.get("index") != scfg.index or meta.get("ntotal") != len(data.gallery)
                or meta.get("ids_sha256") != ids_sha256(data.gallery.ids)):
            raise UserError(f"{path} does not index this LUT with search.index={scfg.index} (it holds "
                            f"{meta.get('index')} over {meta.get('ntotal')} rows): rerun 06_prune_features.py")
        ann = load_index(path, scfg.index, scfg, device=ctx.device())
        ann.description = str(meta.get("factory", scfg.index))
        if ann.ntotal != len(data.gallery) or ann.dim != data.gallery.X.shape[1]:
            raise UserError(f"{path} holds {ann.ntotal} x {ann.dim} vectors but the LUT {len(data.gallery)} x "
                            f"{data.gallery.X.shape[1]}: rerun 06_prune_features.py")
    ann.set_query_params(scfg)
    return ann


def index_agreement(ann: AnnIndex, data: StoreData, block_size: int, device: Any) -> dict[str, Any]:
    """The index against exact search on the val queries (at most ``AGREEMENT_QUERIES``, evenly spaced:
    exact search over a gallery of millions is the slow part): same top-1 image / class, queries per second."""
    gallery = data.gallery
    pick = np.unique(np.linspace(0, len(data.val) - 1, min(len(data.val), AGREEMENT_QUERIES)).round().astype(np.int64))
    val = Vectors(data.val.X[pick], data.val.labels[pick], [data.val.paths[i] for i in pick])
    t0 = time.perf_counter()
    _, exact_rows = retrieval_search.topk(val.X, gallery.X, 1, block_size, device)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, ann_rows = ann.search(val.X, 1, gallery.X)
    t_ann = time.perf_counter() - t0
    agr = agreement(exact_rows, ann_rows, gallery.labels) if len(val) else {
        "same_image": None, "same_class": None, "n_queries": 0}
    info = {"index": ann.kind, "factory": ann.description, "candidates": ann.candidates,
            "val_same_image": agr["same_image"], "val_same_class": agr["same_class"], "val_queries": agr["n_queries"],
            "exact_queries_per_s": round(len(val) / t_exact, 1) if len(val) and t_exact > 0 else None,
            "index_queries_per_s": round(len(val) / t_ann, 1) if len(val) and t_ann > 0 else None}
    if len(val):
        log.info("search %s (%s): on %d val queries, same top-1 image as exact search %.4f, same top-1 class %.4f; "
                 "%.0f queries/s against exact %.0f", ann.kind, ann.description, len(val), agr["same_image"],
                 agr["same_class"], info["index_queries_per_s"], info["exact_queries_per_s"])
    return info


def load_query_model(ctx: Context, data: StoreData) -> tuple[Any, Callable]:
    """The store's own checkpoint (the one 04's model.json names, sha256 checked) and the transform
    of the preprocessing it records (what it was trained with), checked equal to the store's."""
    from ...model.checkpoint import checkpoint_preprocessing, load_checkpoint_model
    from ...model.embed import prepare_model

    if not data.checkpoint.is_file():
        raise UserError(f"checkpoint {data.checkpoint} (named by 04_extract_features/model.json) is missing: "
                        "rerun 04_extract_features.py")
    model, ckpt = load_checkpoint_model(data.checkpoint, map_location="cpu")
    require_same_checkpoint(ckpt.get("sha256"), data.model.checkpoint_sha256, f"queries embedded with {data.checkpoint}")
    pre, m = checkpoint_preprocessing(ckpt, data.checkpoint), data.model
    stored = Preprocessing(tuple(m.mean), tuple(m.std), m.image_size, m.pad_fill)
    if not pre.same_as(stored):  # a store an earlier version normalised with a stats.json that had changed
        raise UserError(f"the gallery vectors were embedded with another preprocessing ({stored.describe()}) than "
                        f"{data.checkpoint} was trained with ({pre.describe()}): rerun 04_extract_features.py --force")
    return prepare_model(model, ctx.device(), ctx.cfg.model.channels_last), pre.transform()


def _embed(ctx: Context, data: StoreData, paths: list[str]) -> tuple[np.ndarray, list[int], list, dict]:
    from ...model.embed import embed_paths

    cfg = ctx.cfg
    model, transform = load_query_model(ctx, data)
    return embed_paths(paths, model, transform, data.model.image_size, embedding=data.model.embedding,
                       batch_size=cfg.inference.batch_size, num_workers=cfg.data.num_workers, device=ctx.device(),
                       amp=cfg.extract.amp, channels_last=cfg.model.channels_last, min_side=cfg.data.min_side,
                       max_pixels=cfg.data.max_pixels, cpu_precision=data.cpu_precision,
                       cpu_compile=cfg.extract.cpu_compile)
