"""Stage 07's driver: classify the test split (or new images) against the LUT; metrics and report.

Evaluate mode reads 04's store (train, val and test vectors) and ``model.json``, and the gallery:
06's ``lut.sqlite`` (``inference.gallery=lut``) or every train vector (``full``); it writes
``07_inference/``. Predict mode embeds every image under ``inference.input`` with the checkpoint
04's ``model.json`` names (its sha256 checked) and writes ``07_inference/predict/<name>/`` only:
the evaluation's files are never touched. The algorithms are in ``common.inference``.

With ``search.index`` other than ``exact`` the gallery is searched through a FAISS index: 06's
``lut.faiss`` (checked against ``lut_faiss.json``: same rows in the same order), or for
``inference.gallery=full`` one built now over the train vectors. Its agreement with exact search
on the val queries (at most ``AGREEMENT_QUERIES``; same top-1 image, same top-1 class, and both
speeds) goes to ``metrics.json``
(``search``) and the report.

With exact search, a gallery (and a train split) of more vectors than ``search.max_memory_gib``
stays in the store: ``common.streaming.vectors_of`` gives a ``common.streaming.StoreMatrix`` in place of the
matrix, searched block by block (the classical classifiers are then skipped).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .. import classifiers as K
from .. import retrieval, search
from ..data import Preprocessing, class_index, class_names, read_splits
from ..errors import UserError
from ..features import GALLERY_SPLITS, ModelInfo, Vectors
from ..fileio import read_json
from ..gallery import EXTRA_SPLIT, gallery_classes, merge, subset
from ..inference import EvalInputs, evaluate, predict
from ..samples import list_inputs
from ..streaming import describe, is_streamed
from ..runfolder import read_manifest
from . import EXTRACT, INFERENCE, PRUNE, SPLIT, STATS, THRESHOLD, TRAIN
from .artefacts import (CLASSIFIERS_DIR, INDEX_FILE, INDEX_JSON, LUT_FILE, MODEL_JSON, SPLITS_CSV, SWEEP_PNG, open_lut,
                        open_model_store, read_model_json, read_threshold_json, require_same_checkpoint)

if TYPE_CHECKING:
    from ..stage import Context

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
                    max_memory_gib: float | None = None) -> StoreData:
    """Load one model's train/val/test vectors and the gallery (the LUT, or every train and extra
    vector when None). The classes are the checkpoint's (equal to the splits'), then the
    gallery-only classes stage 04 recorded in ``model.json``. ``password_env``: the PostgreSQL
    password's variable of a store on a server (``store.password_env``; None: the recorded one).
    ``max_memory_gib``: the gallery, and the train split, above this many GiB of vectors stay in the
    store (``common.streaming``); the val and test queries are always loaded."""
    rows = read_splits(splits_csv)
    train_classes = list(class_names(rows))
    with open_model_store(stage04, password_env) as ms:
        meta, info, store_path = ms.meta, ms.info, ms.target
        classes = gallery_classes(train_classes, meta.get("extra_classes", []))
        if list(info.classes) != train_classes:
            raise UserError(f"{store_path}: the vectors' checkpoint has {len(info.classes)} classes but {splits_csv} "
                            f"has {len(train_classes)}: rerun 04_extract_features.py")
        val, test = (ms.load((s,), classes) for s in ("val", "test"))
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
    return StoreData(classes=classes, model=info, checkpoint=checkpoint, train=train, val=val, test=test,
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


def open_index(ctx: Context, data: StoreData, stage06: Path | None) -> search.AnnIndex | None:
    """The FAISS index over the gallery's rows (None for ``search.index=exact``): 06's ``lut.faiss``
    checked against ``lut_faiss.json``, or built now over the full train gallery."""
    scfg = ctx.cfg.search
    if scfg.index == "exact":
        return None
    if stage06 is None:
        log.info("search.index=%s over the full train gallery: building the index now (not saved)", scfg.index)
        ann = search.build_index(data.gallery.X, scfg, seed=ctx.cfg.run.seed, device=ctx.device())
    else:
        path, meta_path = stage06 / INDEX_FILE, stage06 / INDEX_JSON
        if not path.is_file() or not meta_path.is_file():
            raise UserError(f"{path} is missing (stage 06 ran with search.index=exact): rerun 06_prune_features.py "
                            f"with search.index={scfg.index}")
        meta = read_json(meta_path)
        if (meta.get("index") != scfg.index or meta.get("ntotal") != len(data.gallery)
                or meta.get("ids_sha256") != search.ids_sha256(data.gallery.ids)):
            raise UserError(f"{path} does not index this LUT with search.index={scfg.index} (it holds "
                            f"{meta.get('index')} over {meta.get('ntotal')} rows): rerun 06_prune_features.py")
        ann = search.load_index(path, scfg.index, scfg, device=ctx.device())
        ann.description = str(meta.get("factory", scfg.index))
        if ann.ntotal != len(data.gallery) or ann.dim != data.gallery.X.shape[1]:
            raise UserError(f"{path} holds {ann.ntotal} x {ann.dim} vectors but the LUT {len(data.gallery)} x "
                            f"{data.gallery.X.shape[1]}: rerun 06_prune_features.py")
    ann.set_query_params(scfg)
    return ann


def index_agreement(ann: search.AnnIndex, data: StoreData, block_size: int, device: Any) -> dict[str, Any]:
    """The index against exact search on the val queries (at most ``AGREEMENT_QUERIES``, evenly spaced:
    exact search over a gallery of millions is the slow part): same top-1 image / class, queries per second."""
    gallery = data.gallery
    pick = np.unique(np.linspace(0, len(data.val) - 1, min(len(data.val), AGREEMENT_QUERIES)).round().astype(np.int64))
    val = Vectors(data.val.X[pick], data.val.labels[pick], [data.val.paths[i] for i in pick])
    t0 = time.perf_counter()
    _, exact_rows = retrieval.topk(val.X, gallery.X, 1, block_size, device)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, ann_rows = ann.search(val.X, 1, gallery.X)
    t_ann = time.perf_counter() - t0
    agr = search.agreement(exact_rows, ann_rows, gallery.labels) if len(val) else {
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


def check(ctx: Context) -> None:
    """Read only, before anything is written. Predict mode: ``inference.input`` lists images (a list
    naming one twice is refused), and the classifiers an up-to-date evaluation saved, when they
    will be used, are the files it saved, of trusted types only."""
    icfg = ctx.cfg.inference
    if icfg.mode != "predict":
        return
    if not list_inputs(icfg.input).images:
        raise UserError(f"inference.input: no image files in {icfg.input}")
    evaluation = ctx.run_dir / INFERENCE
    saved = evaluation / CLASSIFIERS_DIR
    if not icfg.classifiers or read_manifest(evaluation) is None or not (saved / K.CLASSES_FILE).is_file():
        return
    meta = read_model_json(ctx.upstream(EXTRACT))
    classes = gallery_classes(class_names(read_splits(ctx.upstream(SPLIT) / SPLITS_CSV)),
                              meta.get("extra_classes", []))
    if "dim" in meta and _same_classes(saved / K.CLASSES_FILE, classes, quiet=True):  # else main fits them again
        K.check_saved_classifiers(saved, classes, int(meta["model_id"]), int(meta["dim"]), icfg.classifiers)


def main(ctx: Context) -> dict[str, Any]:
    """Load the vectors and gallery, then evaluate on the test split or predict new images."""
    icfg = ctx.cfg.inference
    splits_dir = ctx.upstream(SPLIT)
    ctx.upstream(STATS)
    ctx.upstream(TRAIN)
    stage04 = ctx.upstream(EXTRACT)
    lut_path = ctx.upstream(PRUNE) / LUT_FILE if icfg.gallery == "lut" else None
    sweep_png, suggested = _threshold_info(ctx.upstream(THRESHOLD, required=False))
    if suggested is not None:
        log.info("stage 05 suggests inference.reject_below=%.4f (now %s)", suggested, icfg.reject_below)
    if icfg.reject_below is None:
        log.info("open-set rejection is off (inference.reject_below=null); the val cuts are still measured")
    scfg = ctx.cfg.search
    data = hold_out(load_store_data(stage04, splits_dir / SPLITS_CSV, lut_path, ctx.cfg.store.password_env,
                                    scfg.max_memory_gib if scfg.index == "exact" else None),
                    list(icfg.unknown_classes))
    facts = [("run folder", str(ctx.run_dir)), *data.facts]
    index = open_index(ctx, data, lut_path.parent if lut_path is not None else None)
    info = index_agreement(index, data, icfg.block_size, ctx.device()) if index is not None else {}
    if info:
        facts.append(("search", f"{info['factory']}: same top-1 image as exact search on "
                                f"{info['val_queries']} val queries {info['val_same_image']}, same class "
                                f"{info['val_same_class']}"))
    if icfg.mode == "evaluate":
        out = _evaluate(ctx, data, facts, sweep_png, suggested, index, info)
    else:
        out = _predict(ctx, data, facts, suggested, index)
    if info:
        out["search"] = info
    return out


def _evaluate(ctx: Context, data: StoreData, facts: list, sweep_png: Path | None, suggested: float | None,
              index: search.AnnIndex | None, search_info: dict) -> dict:
    icfg = ctx.cfg.inference
    test, embed_s = data.test, 0.0
    if len(test) == 0 and data.test_rows:
        log.info("the store holds no test vectors: embedding the test split's %d images now", len(data.test_rows))
        test, embed_s = _embed_split(ctx, data)
        if data.unknown_classes:  # hold_out saw no test vectors: split these
            out = _held_out(data.unknown_classes, data.classes)
            data.unknown_test = subset(test, np.isin(test.labels, out))
            test = subset(test, ~np.isin(test.labels, out))
    inp = EvalInputs(classes=data.classes, test=test, gallery=data.gallery, train=data.train, val=data.val,
                     model_id=data.model_id, facts=facts, sweep_png=sweep_png,
                     suggested_reject_below=suggested, embed_seconds=embed_s, unknown_test=data.unknown_test,
                     unknown_classes=data.unknown_classes, index=index, search_info=search_info)
    m = evaluate(inp, icfg, ctx.output, device=ctx.device(), seed=ctx.cfg.run.seed)
    keys = ("accuracy", f"top{icfg.top_k}_accuracy", "macro_f1", "balanced_accuracy", "map_at_r",
            "rejection_rate", "accepted_accuracy", "gallery_size", "report")
    return {k: m[k] for k in keys if k in m}


def _predict(ctx: Context, data: StoreData, facts: list, suggested: float | None,
             index: search.AnnIndex | None) -> dict:
    from . import predict_name

    icfg = ctx.cfg.inference
    inputs = list_inputs(icfg.input)
    images, not_images = inputs.images, inputs.others
    if not_images:
        log.info("%d files of %s are not images (suffix) or missing: listed in predictions.csv", len(not_images),
                 icfg.input)
    if not images:
        raise UserError(f"inference.input: no image files in {icfg.input}")
    log.info("predicting %d images of %s (%d samples) into %s", len(images), icfg.input, len(inputs.sample_list()),
             ctx.dir)
    X, ok, errors, timing = _embed(ctx, data, images)
    queries = Vectors(X, np.full(len(ok), -1), [images[i] for i in ok])
    clfs = _classifiers_for_predict(ctx, data)
    errors = [*errors, *not_images]
    m = predict(queries, data.gallery, data.classes, icfg, ctx.output, samples=[inputs.samples[p] for p in queries.paths],
                name=predict_name(ctx.cfg), root=inputs.root, val=data.val, classifiers=clfs, errors=errors,
                error_samples=[inputs.samples.get(p, "") for p, _ in errors], timing=timing, facts=facts,
                suggested_reject_below=suggested, device=ctx.device(), index=index)
    return {k: m[k] for k in ("n_images", "n_unreadable", "n_doubtful", "rejection_rate", "images_per_s", "report",
                              "review") if k in m}


def load_query_model(ctx: Context, data: StoreData) -> tuple[Any, Callable]:
    """The store's own checkpoint (the one 04's model.json names, sha256 checked) and the transform
    of the preprocessing it records (what it was trained with), checked equal to the store's."""
    from ..embed import prepare_model
    from ..model import checkpoint_preprocessing, load_checkpoint_model

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
    from ..embed import embed_paths

    cfg = ctx.cfg
    model, transform = load_query_model(ctx, data)
    return embed_paths(paths, model, transform, data.model.image_size, embedding=data.model.embedding,
                       batch_size=cfg.inference.batch_size, num_workers=cfg.data.num_workers, device=ctx.device(),
                       amp=cfg.extract.amp, channels_last=cfg.model.channels_last, min_side=cfg.data.min_side,
                       max_pixels=cfg.data.max_pixels, cpu_precision=data.cpu_precision,
                       cpu_compile=cfg.extract.cpu_compile)


def _embed_split(ctx: Context, data: StoreData) -> tuple[Vectors, float]:
    """Test vectors embedded now (the store has none): same checkpoint and transform as the store."""
    paths = [r.path for r in data.test_rows]
    X, ok, errors, timing = _embed(ctx, data, paths)
    if errors:
        raise UserError(f"test image {errors[0][0]} cannot be read ({errors[0][1]}): rerun 01_random_split_dataset.py")
    labels = class_index([data.test_rows[i].label for i in ok], data.classes,
                         lambda v: f"test image label {v!r} is not a class of the gallery: rerun 04_extract_features.py")
    return Vectors(X, labels, [paths[i] for i in ok]), timing["decode_embed_s"]


def _same_classes(classes_json: Path, classes: list[str], quiet: bool = False) -> bool:
    """Whether the evaluation's classifiers know the gallery's classes (gallery-only classes added
    since, or classes held out, mean fitting them again here rather than refusing)."""
    try:
        same = list(read_json(classes_json).get("classes", [])) == list(classes)
    except (OSError, ValueError, AttributeError):
        return True  # let load_classifiers say what is wrong with the file
    if not same and not quiet:
        log.info("the evaluation's classifiers (%s) were fitted for other classes: fitting them again", classes_json)
    return same


def _classifiers_for_predict(ctx: Context, data: StoreData) -> dict[str, Any]:
    """Predict mode: the classifiers saved by an up-to-date evaluation (read only), else fitted now."""
    icfg = ctx.cfg.inference
    if not icfg.classifiers:
        return {}
    dim = data.gallery.X.shape[1]
    evaluation = ctx.run_dir / INFERENCE
    saved = evaluation / CLASSIFIERS_DIR
    if read_manifest(evaluation) is not None and (saved / K.CLASSES_FILE).is_file() and \
            _same_classes(saved / K.CLASSES_FILE, data.classes):
        loaded = K.load_classifiers(saved, data.classes, data.model_id, dim, icfg.classifiers)
        if all(n in loaded for n in icfg.classifiers):
            log.info("using the classifiers the evaluation saved in %s: %s", saved, ", ".join(loaded))
            return {n: loaded[n] for n in icfg.classifiers}
    if len(data.train) == 0:
        raise UserError("inference.classifiers: the feature store has no train vectors to fit them on")
    if is_streamed(data.train.X):
        log.warning("inference.classifiers skipped: the train vectors (%.2f GiB) exceed search.max_memory_gib and "
                    "no up-to-date evaluation saved them", data.train.X.nbytes / 2**30)
        return {}
    fitted = K.fit_classifiers(icfg.classifiers, data.train.X, data.train.labels, data.val.X, data.val.labels,
                               len(data.classes), epochs=icfg.linear_epochs, lr=icfg.linear_lr,
                               batch_size=K.LINEAR_BATCH_SIZE, device=ctx.device(), seed=ctx.cfg.run.seed)
    folder = ctx.dir / CLASSIFIERS_DIR
    paths = K.save_classifiers(fitted, folder, data.classes, data.model_id, dim)
    for p in [*paths.values(), folder / K.CLASSES_FILE, folder / K.DIGESTS_FILE]:
        ctx.output(CLASSIFIERS_DIR, p.name)
    return fitted
