"""The seven stages, declared once: upstream stages, configuration keys read, folder, driver.

Each stage's driver is a module of this package with a ``main(ctx)`` that reads its inputs
through ``ctx``, calls library code and writes its outputs through ``ctx.output``, and may have a
``check(ctx)``: read-only checks (inputs, files it will read, ownership) that the wrapper runs
before the stage's first write, so that such a refusal leaves the run folder as it was. What a stage
reads is declared here and nowhere else: its upstream stages (a function of the configuration
where it depends on it) and the configuration keys its driver reads. Freshness is the sha256 of
the declared upstream outputs plus the hash of the declared (semantic) keys; a test runs every
stage with a recording configuration and fails if a driver reads a key it did not declare.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

from ..config.schema import Config, plain_name
from ..pipeline.runner import execute
from ..pipeline.spec import StageSpec

SPLIT = "01_random_split_dataset"
STATS = "02_mean_std_variables"
TRAIN = "03_main_supcon"
EXTRACT = "04_extract_features"
THRESHOLD = "05_lut_threshold"
PRUNE = "06_prune_features"
INFERENCE = "07_inference"
STAGES = [SPLIT, STATS, TRAIN, EXTRACT, THRESHOLD, PRUNE, INFERENCE]
PREDICT_DIR = "predict"  # 07_inference/predict/<name>/: predict runs, apart from the evaluation

# Flags of the reference SupCon code (HobbitLong/SupContrast main_supcon.py) accepted by stage 03.
SUPCON_ALIASES: dict[str, str] = {
    "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate",
    "temp": "train.temperature",
    "epochs": "train.epochs",
    "cosine": "train.cosine",
    "size": "model.image_size",
    "model": "model.backbone",
    "method": "train.method",
    "save_freq": "train.save_freq",
    "num_workers": "data.num_workers",
    "lr_decay_epochs": "train.lr_decay_epochs",
    "lr_decay_rate": "train.lr_decay_rate",
    "weight_decay": "train.weight_decay",
    "momentum": "train.momentum",
    "warm": "train.warm",
    "trial": "train.trial",
}
# Of those, the ones that are on/off switches in the reference (store_true).
SUPCON_FLAGS = frozenset({"cosine", "warm"})


def _section(cls_name: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{cls_name}.{n}" for n in names)


def _prune_upstream(cfg: Config) -> tuple[str, ...]:
    # stage 06 reads stage 05's threshold.json unless prune.threshold is set
    return (EXTRACT,) + (() if cfg.prune.threshold is not None else (THRESHOLD,))


def _inference_upstream(cfg: Config) -> tuple[str, ...]:
    # the pruned LUT is stage 06's artefact; the full gallery needs only stage 04
    return (SPLIT, STATS, TRAIN, EXTRACT) + ((PRUNE,) if cfg.inference.gallery == "lut" else ())


def predict_name(cfg: Config) -> str:
    """``inference.name`` (a plain name: ``config.check_names`` refused any other when it was
    loaded), default the input folder's name (a file's name without its suffix) made a plain
    name: ``cruise 42 (día 1)`` gives ``cruise_42_d_a_1_``; a name of dots only gives ``input``."""
    if cfg.inference.name:
        return cfg.inference.name
    p = Path(str(cfg.inference.input or "input"))
    return plain_name((p.stem if p.is_file() else p.name) or "input")


def _inference_folder(run_dir: Path, cfg: Config) -> Path:
    base = Path(run_dir) / INFERENCE
    return base / PREDICT_DIR / predict_name(cfg) if cfg.inference.mode == "predict" else base


def _inference_external(cfg: Config) -> list[str]:
    icfg = cfg.inference
    if icfg.mode != "predict" or not icfg.input:
        return []
    return [icfg.input, *([icfg.ecotaxa_taxa] if icfg.ecotaxa_taxa else [])]


# which rows of an EcoTaxa export are images of which class (data.root: stage 01; data.gallery_extra: stage 04)
ECOTAXA_DATA = _section("data", "ecotaxa_status", "class_map", "ecotaxa_level")
IMAGE_CHECKS = _section("data", "max_pixels", "min_side")  # every stage that decodes images applies them
# stage 06 builds the FAISS index (search.index != exact); stage 07 also sets its query-time knobs
SEARCH_BUILD = ("run.seed", *_section("search", "index", "nlist", "pq_m", "pq_bits", "hnsw_m", "ef_construction",
                                      "train_size", "pca_dim"))
SEARCH_QUERY = _section("search", "nprobe", "ef_search", "candidates")

# Stage 03's hashed keys that may change while a training continues from its last.pt: raising
# train.epochs extends the training (lowering it below the epochs done starts a new one); the others
# change how often it saves or evaluates, or how its kernels run, not what the network sees or
# learns. Every other key stage 03 hashes (data.*, model.* and train.* keys, run.seed), and a
# changed stats.json or splits.csv, starts a new training (common/stages/train.py).
TRAIN_CONTINUE_KEYS = ("train.epochs", "train.save_freq", "train.eval_every", "model.grad_checkpointing",
                       "model.channels_last", "run.deterministic")

SPECS: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec(SPLIT, "common.stages.split",
              keys=("run.seed", *_section("data", "root", "bad_images", "num_workers", "follow_symlinks"),
                    *ECOTAXA_DATA, *IMAGE_CHECKS,
                    *_section("split", "train", "val", "test", "min_images", "materialize")),
              external_fn=lambda cfg: [cfg.data.root, *([cfg.data.class_map] if cfg.data.class_map else [])]),
    StageSpec(STATS, "common.stages.stats",
              keys=("data.pad_fill", "data.num_workers", "model.image_size", "stats.batch_size", *IMAGE_CHECKS),
              upstream_fn=lambda cfg: (SPLIT,)),
    StageSpec(TRAIN, "common.stages.train",
              keys=("run.seed", "run.deterministic", "data.pad_fill", "data.num_workers", *IMAGE_CHECKS,
                    *_section("model", "backbone", "pretrained", "image_size", "head", "feat_dim",
                              "grad_checkpointing", "channels_last"),
                    *_section("train", "method", "epochs", "batch_size", "learning_rate", "scale_lr", "momentum",
                              "weight_decay", "cosine", "lr_decay_epochs", "lr_decay_rate", "warm", "warm_epochs",
                              "warmup_from", "temperature", "base_temperature", "contrast_mode", "crop_scale",
                              "hflip", "vflip", "rot90", "color_jitter", "color_jitter_p", "grayscale_p", "save_freq",
                              "eval_every", "eval_knn_k", "amp", "compile", "max_steps_per_epoch", "resume",
                              "sync_bn"), "search.precision"),
              upstream_fn=lambda cfg: (SPLIT, STATS), aliases=SUPCON_ALIASES,
              switches=SUPCON_FLAGS),
    StageSpec(EXTRACT, "common.stages.extract",
              keys=(*_section("extract", "checkpoint", "embedding", "batch_size", "amp", "dtype", "cpu_precision",
                             "cpu_compile"),
                    "model.channels_last",
                    *_section("store", "url", "schema", "password_env"),
                    "data.num_workers", "data.gallery_extra", *ECOTAXA_DATA, *IMAGE_CHECKS),
              upstream_fn=lambda cfg: (SPLIT, STATS, TRAIN),
              external_fn=lambda cfg: [*cfg.data.gallery_extra, *([cfg.data.class_map] if cfg.data.class_map else [])]),
    StageSpec(THRESHOLD, "common.stages.threshold",
              keys=_section("lut", "thresholds", "grid_start", "grid_stop", "grid_step", "rule", "tolerance",
                            "target_size", "knn_k", "knn_temperature", "block_size") + SEARCH_BUILD + SEARCH_QUERY
              + ("search.max_memory_gib", "search.precision", "store.password_env"),
              upstream_fn=lambda cfg: (EXTRACT,)),
    StageSpec(PRUNE, "common.stages.prune", keys=("prune.threshold", "lut.block_size", *SEARCH_BUILD, "search.max_memory_gib",
                                    "search.precision", "store.password_env"),
              upstream_fn=_prune_upstream),
    StageSpec(INFERENCE, "common.stages.inference",
              keys=("run.seed", *_section("inference", "mode", "input", "name", "gallery", "method", "k",
                                          "temperature", "top_k", "reject_below", "reject_keep", "reject_score",
                                          "ood_k", "unknown_classes", "review_margin", "review_max", "batch_size",
                                          "block_size", "classifiers", "linear_epochs", "linear_lr", "worst_classes",
                                          "embedding_map", "ecotaxa_taxa"),
                    "extract.amp", "extract.cpu_compile", "model.channels_last", "data.num_workers", *IMAGE_CHECKS,
                    *SEARCH_BUILD,
                    *SEARCH_QUERY, "search.max_memory_gib", "search.precision", "store.password_env"),
              upstream_fn=_inference_upstream, optional_upstream=(THRESHOLD,), external_fn=_inference_external,
              folder_fn=_inference_folder),
)}


def run(name: str) -> NoReturn:
    """Entry point of every stage script: ``stages.run("04_extract_features")``."""
    sys.exit(execute(SPECS[name], table=SPECS, doc=sys.modules["__main__"].__doc__))
