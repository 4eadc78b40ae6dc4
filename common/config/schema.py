"""The configuration's sections, every key declared once with its default, range, meaning and whether a
change reruns a stage; the cross-key checks.

``load_config(files, overrides)`` merges the built-in defaults, each ``-c`` file in order and
dotted ``section.key=value`` overrides (values parsed as YAML). Every section is a dataclass:
an unknown section or key, or a value of the wrong type, raises ``ConfigError`` naming the key.

Each key is declared once, below, with ``keys.key()``: its default, its meaning, its range, whether
stages hash it for freshness, whether it holds a path, whether it belongs to one command only.
``RANGES``, ``NON_SEMANTIC``, ``PATH_KEYS`` and ``INVOCATION_KEYS`` are derived from these
declarations, and ``configs/default.yaml`` is rendered from them (``config.reference``; a test
fails when the file and the declarations differ).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from ..errors import ConfigError
from .keys import COSINE, FRACTION, INT64, KNN_T, PROB, KeyMeta, Range, Section, _num, _show, ge, gt, key

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sections


@dataclass
class RunConfig(Section):
    dir: str = key("runs/default", "run directory; each stage writes RUN/<stage name>/", hashed=False, invocation=True)
    seed: int = key(42, "one seed for every random choice (split, augmentation, init)",
                        range=Range(0, INT64, hi_open=True))
    device: str = key("auto", "auto | cpu | cuda | cuda:N", hashed=False)
    log_level: str = key("INFO", "console and log.txt level", hashed=False)
    deterministic: bool = key(False, "cuDNN deterministic kernels (slower)")


@dataclass
class DataConfig(Section):
    root: str = key("data/DYB-PlanktonNet", "image folder: one sub-folder per class; or an EcoTaxa export (.zip, or a "
                                            "folder of ecotaxa_*.tsv with their images)", path=())
    bad_images: Literal["skip", "fail"] = key("skip", "skip: list unreadable images in bad_images.csv and leave them "
                                                      "out | fail: stop")
    max_pixels: int = key(89_478_485, "images with more pixels are rejected (decompression bombs)", range=ge(1))
    min_side: int = key(4, "images with a side shorter than this (px) are rejected", range=ge(1))
    pad_fill: Union[int, Literal["auto"]] = key(
        "auto", "padding of images to a square: auto = each image's own border colour (median of its edge pixels; "
                "suits bright and dark field) | a grey level 0-255 (0 = black)",
        range=Range(0, 255, why="a grey level, or auto"))
    num_workers: int = key(4, "DataLoader worker processes for every stage",
                              range=ge(0, why="0 = load in the main process"), hashed=False)
    follow_symlinks: bool = key(False, "stage 01: follow directory symlinks inside class folders (each real folder "
                                       "once); false: skip and list them in bad_images.csv")
    gallery_extra: list[str] = key([], "gallery-only images (stage 04 on): folders with one sub-folder per class, "
                                       "filled corrections.csv files, or EcoTaxa export folders; never train the "
                                       "backbone", path=())
    ecotaxa_status: list[str] = key(["validated"], "EcoTaxa export (data.root, data.gallery_extra): rows with these "
                                                   "object_annotation_status values are used (validated, dubious, "
                                                   "predicted, discarded; '' = unclassified)")
    class_map: Optional[str] = key(None, "EcoTaxa export: CSV category,class (class '-' drops the category; '*' lines "
                                         "for the unlisted ones); null = each category is a class", path=())
    ecotaxa_level: Optional[int] = key(None, "EcoTaxa export: the class is this level (1 = first name) of "
                                             "object_annotation_hierarchy; null = object_annotation_category",
                                       range=ge(1, why="1 = the first name of object_annotation_hierarchy, or null"))


@dataclass
class SplitConfig(Section):
    train: float = key(0.70, "fraction of each class for training (the gallery)", range=FRACTION)
    val: float = key(0.15, "fraction for validation (threshold search, model selection)", range=FRACTION)
    test: float = key(0.15, "fraction for the final test", range=FRACTION)
    min_images: int = key(2, "classes with fewer usable images are dropped", range=ge(1))
    materialize: Literal["none", "symlink", "hardlink", "copy"] = key(
        "none", "none | symlink | hardlink | copy: also write train/val/test class folders")


@dataclass
class StatsConfig(Section):
    batch_size: int = key(64, "images per batch while computing mean and std", range=ge(1), hashed=False)


@dataclass
class ModelConfig(Section):
    backbone: str = key("seresnext50_32x4d", "any timm model name")
    pretrained: str = key("none", "none | timm | path to a .pth/.pt/.safetensors file", path=("none", "timm"))
    image_size: int = key(224, "network input side (px); images are padded to square then resized", range=ge(8))
    head: Literal["mlp", "linear"] = key("mlp", "projection head (mlp = Linear-ReLU-Linear)")
    feat_dim: int = key(128, "projection head output dimension", range=ge(1))
    grad_checkpointing: bool = key(False, "trade compute for memory in the backbone")
    channels_last: bool = key(True, "NHWC memory format on CUDA")


@dataclass
class TrainConfig(Section):
    method: Literal["supcon", "simclr"] = key("supcon", "supcon uses labels; simclr ignores them")
    epochs: int = key(1000, "training epochs", range=ge(1))
    batch_size: int = key(32, "images per step (per GPU with torchrun); each gives two views",
                              range=ge(2, why="SupCon needs two images per step"))
    learning_rate: float = key(0.016, "base learning rate for SGD", range=gt(0.0))
    scale_lr: bool = key(False, "multiply the learning rate by global batch / 256")
    momentum: float = key(0.9, "SGD momentum", range=Range(0.0, 1.0, hi_open=True))
    weight_decay: float = key(1.0e-4, "SGD weight decay", range=ge(0.0))
    cosine: bool = key(True, "cosine learning-rate schedule (else step decay)")
    lr_decay_epochs: list[int] = key([700, 800, 900], "step decay epochs", range=ge(1))
    lr_decay_rate: float = key(0.1, "step decay factor (also the cosine floor: lr * rate**3)",
                                    range=Range(0.0, 1.0, lo_open=True))
    warm: bool = key(True, "linear warm-up per iteration from warmup_from")
    warm_epochs: int = key(10, "warm-up length in epochs", range=ge(0))
    warmup_from: float = key(0.01, "learning rate at the first warm-up step", range=ge(0.0))
    # also the k-NN validation vote's temperature: the same floor as the vote's
    temperature: float = key(0.07, "SupCon temperature (Khosla et al. 2020 use 0.07-0.1)", range=KNN_T)
    base_temperature: float = key(0.07, "SupCon base temperature (loss scale)", range=gt(0.0))
    contrast_mode: Literal["all", "one"] = key("all", "anchors: every view, or the first view only")
    crop_scale: list[float] = key([0.2, 1.0], "random resized crop area range",
                                              range=Range(0.0, 1.0, lo_open=True, why="a fraction of the image area"))
    hflip: float = key(0.5, "probability of a horizontal flip", range=PROB)
    vflip: float = key(0.5, "probability of a vertical flip", range=PROB)
    rot90: bool = key(True, "random 0/90/180/270 degree rotations (plankton has no \"up\")")
    color_jitter: list[float] = key([0.4, 0.4, 0.4, 0.1], "brightness, contrast, saturation, hue", range=ge(0.0))
    color_jitter_p: float = key(0.8, "probability of colour jitter", range=PROB)
    grayscale_p: float = key(0.2, "probability of random greyscale", range=PROB)
    save_freq: int = key(50, "keep checkpoints/epoch_NNNN.pt every this many epochs", range=ge(1))
    eval_every: int = key(10, "k-NN validation every this many epochs (0 = never)", range=ge(0, why="0 = never"))
    eval_knn_k: int = key(20, "neighbours for the weighted k-NN validation accuracy", range=ge(1))
    amp: Literal["bf16", "fp16", "off"] = key("bf16", "mixed precision on CUDA (ignored on CPU)")
    compile: bool = key(False, "torch.compile the model (CUDA)", hashed=False)
    max_steps_per_epoch: Optional[int] = key(None, "cap steps per epoch (quick tests); null = all",
                                                   range=ge(1, why="or null for all"))
    trial: str = key("0", "free-form run label, as in the reference SupCon code", hashed=False)
    resume: bool = key(True, "continue from checkpoints/last.pt when it exists (after a crash or Ctrl-C)",
                             hashed=False, invocation=True)
    sync_bn: bool = key(False, "torchrun on CUDA: batch-norm statistics over the global batch (SyncBatchNorm); false: "
                               "per GPU")


@dataclass
class ExtractConfig(Section):
    checkpoint: str = key("best", "best | last | path to a checkpoint file", path=("best", "last"))
    embedding: Literal["encoder", "head"] = key("encoder", "backbone pooled output or projection head")
    batch_size: int = key(256, "images per forward pass", range=ge(1), hashed=False)
    amp: Literal["bf16", "fp16", "off"] = key("bf16", "mixed precision on CUDA for the forward pass (vectors "
                                                      "L2-normalised in float32, then stored as extract.dtype)")
    dtype: Literal["float32", "float16"] = key("float32", "stored vector values: float32 (4 bytes each) or float16 (2 "
                                                          "bytes: half the store; accuracy effect measured in README)")
    cpu_precision: Literal["auto", "fp32", "bf16"] = key(
        "auto", "forward pass on a CPU (stages 04 and 07): bf16 autocast, or fp32; auto = bf16 where the CPU has "
                "native bfloat16 (AVX512-BF16/AMX)")
    cpu_compile: bool = key(False, "torch.compile the forward pass on a CPU when a process embeds at least 2,000 "
                                   "images (stages 04 and 07; needs a C++ compiler, compiles for about a minute)",
                                   hashed=False)


@dataclass
class LutConfig(Section):
    thresholds: Optional[list[float]] = key(None, "explicit thresholds; null = the grid below", range=COSINE)
    grid_start: float = key(0.80, "first threshold of the grid", range=COSINE)
    grid_stop: float = key(1.00, "last threshold of the grid (inclusive)", range=COSINE)
    grid_step: float = key(0.01, "grid step", range=gt(0.0))
    rule: Literal["tolerance", "max_f1", "max_accuracy", "target_size"] = key("tolerance", "threshold choice")
    tolerance: float = key(0.005, "rule=tolerance: smallest gallery with val macro-F1 within this of the best",
                                  range=ge(0.0))
    target_size: Optional[int] = key(None, "rule=target_size: largest gallery not above this many vectors", range=ge(1))
    knn_k: int = key(10, "neighbours for the weighted k-NN vote", range=ge(1))
    knn_temperature: float = key(0.07, "k-NN vote weight exp(sim / T) (DINO)", range=KNN_T)
    block_size: int = key(4096, "rows per similarity block (bounds memory: block x block float32)",
                                range=ge(1), hashed=False)


@dataclass
class PruneConfig(Section):
    threshold: Optional[float] = key(None, "overrides threshold.json from stage 05; null = use it", range=COSINE)


@dataclass
class SearchConfig(Section):
    index: Literal["exact", "ivf", "ivfpq", "hnsw"] = key(
        "exact", "exact (blocked matrix products) | ivf | ivfpq | hnsw (FAISS, approximate; stage 06 builds it over "
                 "the LUT)")
    nlist: Optional[int] = key(None, "ivf/ivfpq: k-means cells; null = 4 * sqrt(gallery size), at most size / 39",
                                     range=ge(1))
    nprobe: int = key(32, "ivf/ivfpq: cells scanned per query (more: closer to exact, slower; 32: same-class top-1 "
                          "0.994 at 1M, benchmarks/bench_scale.py)", range=ge(1))
    pq_m: int = key(64, "ivfpq: bytes per stored vector (sub-quantizers; must divide the indexed dimension)",
                        range=ge(1))
    pq_bits: int = key(8, "ivfpq: bits per sub-quantizer code (the gallery needs at least 2**pq_bits vectors)",
                          range=Range(1, 16, why="bits per code"))
    hnsw_m: int = key(32, "hnsw: graph degree (neighbours per node)", range=ge(2))
    ef_construction: int = key(80, "hnsw: candidates explored per insertion when building", range=ge(1))
    ef_search: int = key(128, "hnsw: candidates explored per query (more: closer to exact, slower)", range=ge(1))
    train_size: int = key(100000, "vectors sampled (seeded by run.seed) to train the cells, codebooks and PCA",
                                  range=ge(1))
    pca_dim: Optional[int] = key(None, "project on this many principal axes (fitted on the gallery) before indexing; "
                                       "null = no projection", range=ge(1))
    candidates: int = key(64, "neighbours the index proposes per query, rescored exactly (top-k classes and k-NN vote "
                              "come from them)", range=ge(1))
    max_memory_gib: float = key(16.0, "exact search (stages 05-07): a gallery, or train split, of more float32 "
                                      "vectors than this many GiB stays in the store and is streamed in blocks (same "
                                      "results; stage 07 then skips the classical classifiers); 0 = always stream",
                                      range=ge(0, why="GiB of vectors held in memory; 0 = always stream"),
                                      hashed=("07_inference",))
    precision: Literal["auto", "fp32", "bf16", "int8"] = key(
        "auto", "exact search (stages 03, 05-07) on a CPU: products of bf16 / int8 codes or float32, candidates "
                "rescored exactly (same results); auto = the fastest on this CPU, measured once per stage and logged",
        hashed=False)


CLASSIFIER_NAMES = ("linear", "logreg", "svm", "random_forest")  # inference.classifiers: common.evaluate.classifiers fits them


@dataclass
class InferenceConfig(Section):
    mode: Literal["evaluate", "predict"] = key("evaluate", "test split, or a folder of new images", invocation=True)
    input: Optional[str] = key(None, "predict mode: a folder of images (searched recursively; samples = first "
                                     "sub-folders), one image, or a .csv (column path, optional sample) / .txt list "
                                     "of paths", path=(), invocation=True)
    name: Optional[str] = key(None, "predict mode: results go to 07_inference/predict/<name>/; null = the input "
                                    "folder's name", invocation=True)
    gallery: Literal["lut", "full"] = key("lut", "pruned LUT or the full train gallery")
    method: Literal["top1", "knn"] = key("top1", "nearest neighbour, or weighted k-NN vote")
    k: int = key(10, "neighbours for method=knn", range=ge(1))
    temperature: float = key(0.07, "k-NN vote weight exp(sim / T)", range=KNN_T)
    top_k: int = key(5, "candidates listed per query", range=ge(1))
    reject_below: Union[float, Literal["auto"], None] = key(
        None, "open-set: a score (reject_score) below this -> \"unknown\"; auto = the cut keeping reject_keep of "
              "correct val predictions; null = off", range=COSINE)
    reject_keep: float = key(0.95, "reject_below=auto: share of correct val predictions kept above the cut",
                                   range=Range(0.0, 1.0, lo_open=True, why="a share of the correct val predictions"))
    reject_score: Literal["similarity", "knn"] = key(
        "similarity", "score compared with reject_below: best similarity, or similarity of the ood_k-th nearest "
                      "gallery item (Sun et al. 2022)")
    ood_k: int = key(10, "k of the k-th nearest neighbour score (Sun et al. 2022 use 50 on CIFAR-10, 1000 on "
                         "ImageNet; the LUT is small)", range=ge(1))
    unknown_classes: list[str] = key([], "evaluation of unknowns: these classes leave the gallery (and train, val) "
                                         "and their test images count as unknowns")
    review_margin: float = key(0.05, "predict mode: a margin between the two best classes below this is doubtful "
                                     "(review.html)", range=Range(0.0, 2.0, why="a difference of cosine similarities"))
    review_max: int = key(500, "predict mode: images shown in review.html, most doubtful first (every image is in "
                               "predictions.csv)", range=ge(0))
    batch_size: int = key(256, "images per forward pass when embedding", range=ge(1), hashed=False)
    block_size: int = key(4096, "query rows per similarity block", range=ge(1), hashed=False)
    classifiers: list[str] = key(list(CLASSIFIER_NAMES), "also fit: linear, logreg, svm, random_forest")
    linear_epochs: int = key(100, "linear head on frozen features: epochs", range=ge(1))
    linear_lr: float = key(0.1, "linear head learning rate", range=gt(0.0))
    worst_classes: int = key(5, "report: misclassified strips for this many worst classes", range=ge(0))
    embedding_map: Literal["pca", "tsne", "none"] = key("tsne", "2-D map of test embeddings in the report")
    ecotaxa_taxa: Optional[str] = key(None, "predict mode: CSV class,taxon mapping each class to an EcoTaxa taxon (unique "
                                            "display name, or numeric id); null = class names written as they are",
                                      path=())


@dataclass
class NotifyConfig(Section):
    enabled: bool = key(False, "send e-mail from stages at all", hashed=False)
    on_failure: bool = key(True, "e-mail when a stage fails", hashed=False)
    on_success: bool = key(False, "e-mail when a stage finishes", hashed=False)
    on_interrupt: bool = key(True, "e-mail when a stage is interrupted (Ctrl-C, SIGTERM)", hashed=False)
    smtp_host: str = key("localhost", "SMTP server", hashed=False)
    smtp_port: int = key(587, "SMTP port (587 STARTTLS, 465 SSL, 25 plain)", range=Range(1, 65535), hashed=False)
    security: Literal["starttls", "ssl", "plain"] = key("starttls", "connection security", hashed=False)
    user: Optional[str] = key(None, "SMTP login; null = no login", hashed=False)
    password_env: str = key("PLANKTON_SMTP_PASSWORD", "environment variable holding the password", hashed=False)
    sender: str = key("plankton@localhost", "From address", hashed=False)
    recipients: list[str] = key([], "To addresses", hashed=False)
    timeout: float = key(30.0, "seconds before giving up on the server",
                               range=Range(0.0, 3600.0, lo_open=True, why="seconds"), hashed=False)
    log_lines: int = key(40, "last lines of the traceback / log in the e-mail", range=ge(0), hashed=False)
    allow_insecure_login: bool = key(False, "allow a login with security: plain (the password would cross the network "
                                            "in clear)", hashed=False)


@dataclass
class StoreConfig(Section):
    url: Optional[str] = key(None, "null = stage 04's features.sqlite; else postgresql+psycopg://user@host:port/db "
                                   "(no password in it)")
    password_env: str = key("PLANKTON_STORE_PASSWORD", "environment variable holding the PostgreSQL password",
                                                       hashed=False)
    schema: Optional[str] = key(None, "PostgreSQL schema holding this run's tables; null = run_<run folder name>")


SECTIONS: dict[str, type[Section]] = {
    "run": RunConfig,
    "data": DataConfig,
    "split": SplitConfig,
    "stats": StatsConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "extract": ExtractConfig,
    "lut": LutConfig,
    "prune": PruneConfig,
    "search": SearchConfig,
    "inference": InferenceConfig,
    "notify": NotifyConfig,
    "store": StoreConfig,
}
# Every key's declaration, in declaration order (a field declared without key() fails here).
KEYS: dict[str, KeyMeta] = {f"{s}.{f.name}": f.metadata["key"] for s, cls in SECTIONS.items()
                            for f in dataclasses.fields(cls)}

# ----------------------------------------------------------------------------- numeric ranges

MAX_GRID_THRESHOLDS = 10_001  # lut.grid_*: at most this many thresholds (a step of 2e-4 over [-1, 1])

# Every int / float key (lists: each element; Optional keys: when not null) has a range in its
# declaration, checked by ``check_ranges`` when the configuration is loaded. A test fails when a
# numeric key of any section has none.
RANGES: dict[str, Range] = {k: m.range for k, m in KEYS.items() if m.range is not None}


def _check_number(key: str, v: Any, rng: Range) -> None:
    why = f" ({rng.why})" if rng.why else ""
    if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"{key}: must be a finite number {rng.describe()}{why}, got {_show(v)}")
    if not rng.contains(v):
        raise ConfigError(f"{key}: must be {rng.describe()}{why}, got {_show(v)}")
    if isinstance(v, int) and not -INT64 <= v < INT64:
        raise ConfigError(f"{key}: must be {rng.describe()} and fit a 64-bit integer (< 2**63), got {_show(v)}")


def check_ranges(cfg: Config) -> None:
    """Check every key of ``RANGES`` (each element of a list, nothing for null): ``ConfigError``
    naming the first key out of its range, with the range."""
    for dotted, rng in RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is None or isinstance(value, str):  # null, or a keyword the type allows (reject_below: auto)
            continue
        if isinstance(value, list):
            for i, v in enumerate(value):
                _check_number(f"{dotted}[{i}]", v, rng)
        else:
            _check_number(dotted, value, rng)


# Keys that change how fast a stage runs (or how it logs, or whom it tells), not what it produces:
# left out of the config hash that decides whether a stage is up to date.
NON_SEMANTIC = frozenset(k for k, m in KEYS.items() if m.hashed is False)

INSECURE_LOGIN_MESSAGE = ("notify.security: plain with notify.user set would send the SMTP password across the "
                          "network in clear: use starttls or ssl, or set notify.allow_insecure_login: true")


@dataclass
class Config:
    """The whole resolved configuration: one attribute per section."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    lut: LutConfig = field(default_factory=LutConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def get_key(cfg: Config, dotted: str) -> Any:
    """The value of ``section.key``."""
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def validate(cfg: Config) -> None:
    """Every numeric key within its range (``RANGES``), then cross-key checks that ranges cannot express."""
    check_ranges(cfg)
    s = cfg.split
    if abs(s.train + s.val + s.test - 1.0) > 1e-6:
        raise ConfigError(f"split.train + split.val + split.test must be 1, got {s.train + s.val + s.test:.4f}")
    if s.train <= 0:
        raise ConfigError("split.train: must be > 0 (the gallery comes from train)")
    t = cfg.train
    if len(t.crop_scale) != 2 or not t.crop_scale[0] <= t.crop_scale[1]:
        raise ConfigError(f"train.crop_scale: must be [min, max] with 0 < min <= max <= 1, got {_show(t.crop_scale)}")
    if len(t.color_jitter) != 4:
        raise ConfigError(f"train.color_jitter: must be [brightness, contrast, saturation, hue], got {_show(t.color_jitter)}")
    if t.color_jitter[3] > 0.5:
        raise ConfigError(f"train.color_jitter[3]: the hue jitter must be <= 0.5, got {_show(t.color_jitter[3])}")
    lut = cfg.lut
    if lut.thresholds is not None and not 1 <= len(lut.thresholds) <= MAX_GRID_THRESHOLDS:
        raise ConfigError(f"lut.thresholds: give 1 to {MAX_GRID_THRESHOLDS} thresholds (or null for the grid), "
                          f"got {len(lut.thresholds)}")
    if lut.grid_start > lut.grid_stop:
        raise ConfigError(f"lut.grid_start: must be <= lut.grid_stop ({_num(lut.grid_stop)}), got {_num(lut.grid_start)}")
    n_grid = math.floor((lut.grid_stop - lut.grid_start) / lut.grid_step + 1e-9) + 1
    if lut.thresholds is None and n_grid > MAX_GRID_THRESHOLDS:
        raise ConfigError(f"lut.grid_step: {_num(lut.grid_step)} gives {n_grid} thresholds from {_num(lut.grid_start)} "
                          f"to {_num(lut.grid_stop)}, more than {MAX_GRID_THRESHOLDS}: use a larger step")
    if lut.rule == "target_size" and lut.target_size is None:
        raise ConfigError("lut.target_size: must be set when lut.rule is target_size")
    for c in cfg.inference.classifiers:
        if c not in CLASSIFIER_NAMES:
            raise ConfigError(f"inference.classifiers: unknown classifier {_show(c)} (choose from "
                              f"{sorted(CLASSIFIER_NAMES)})")
    if cfg.inference.mode == "predict" and not cfg.inference.input:
        raise ConfigError("inference.input: must name a folder, an image or a list of images when inference.mode is "
                          "predict")
    if len(set(cfg.inference.unknown_classes)) != len(cfg.inference.unknown_classes):
        raise ConfigError(f"inference.unknown_classes: a class is listed twice in {_show(cfg.inference.unknown_classes)}")
    n = cfg.notify
    if n.enabled and n.user and n.security == "plain" and not n.allow_insecure_login:
        raise ConfigError(INSECURE_LOGIN_MESSAGE)
    if not str(cfg.run.dir).strip():
        raise ConfigError("run.dir: must name a folder (empty: the current folder would become the run folder)")
    if str(cfg.run.log_level).upper() not in LOG_LEVELS:
        raise ConfigError(f"run.log_level: must be one of {', '.join(LOG_LEVELS)} (any case), got {_show(cfg.run.log_level)}")
    check_names(cfg)
    check_store(cfg.store)


STORE_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # a PostgreSQL identifier that needs no quoting
STORE_URL_FORM = "postgresql+psycopg://user@host:port/database"
SHARED_SCHEMAS = ("public", "information_schema")  # and pg_*: never a run's own (stage 04 drops its schema on --force)
# Query parameters (and key=value text inside a part of the URL, which libpq would read as a
# connection string) that hold a secret or name a file of secrets: password, passfile,
# sslpassword, sslkey, any *token*, *secret*, *cred*... Refused whatever their value.
_URL_SECRET_RE = re.compile(r"pass|secret|token|key|cred", re.I)
_URL_SECRET_ASSIGN_RE = re.compile(r"(pass|secret|token|key|cred)\w*\s*=", re.I)
_URL_KNOWN_SECRET_PARAMS = ("password", "passfile", "sslpassword", "sslkey")  # named in the message; others are not echoed
_EMPTY_PASSWORD_RE = re.compile(r"^([A-Za-z0-9+._-]+://[^:/@?#]*):@")  # scheme://user:@ (pgserver prints its URI so)


def strip_empty_password(url: str) -> str:
    """``postgresql://postgres:@/db`` -> ``postgresql://postgres@/db``: an empty password is no
    secret (``pgserver`` prints its URI so); the rest of the URL is kept as written."""
    return _EMPTY_PASSWORD_RE.sub(r"\1@", url, count=1)


def store_url_problem(url: str, password_env: str) -> str | None:
    """Why ``url`` is not an acceptable feature-store URL, or None. The reason never quotes the URL
    (it may hold a secret): a password in the user part, a secret query parameter (``password``,
    ``passfile``, ``sslpassword``, ``sslkey``, anything named like a token or secret), ``key=value``
    text with such a key inside a part (libpq reads a database name holding ``=`` as a connection
    string), a second ``@``; then the scheme and the database. An empty password is accepted
    (``strip_empty_password`` drops it)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    where = f"put it in the environment variable {password_env} (store.password_env)"
    try:
        u = make_url(url)
    except (ArgumentError, ValueError):
        return f"store.url: not a URL: expected {STORE_URL_FORM}"
    if u.password:  # None: no password; "": "user:@", no secret
        return f"store.url: must not contain a password: {where} and remove it from the URL"
    for k in u.query:
        if _URL_SECRET_RE.search(str(k)):
            name = f"parameter {str(k)!r}" if str(k).lower() in _URL_KNOWN_SECRET_PARAMS else "parameter named like a secret"
            return (f"store.url: a query {name} holds or names a secret: remove it; a password: {password_env} "
                    "(store.password_env); a password or key file: PGPASSFILE, PGSSLKEY")
    values = [v for vs in u.query.values() for v in ((vs,) if isinstance(vs, str) else vs)]
    for part in (u.username, u.host, u.database, *values):
        if part and _URL_SECRET_ASSIGN_RE.search(str(part)):
            return f"store.url: a part of the URL holds a secret-looking key=value setting: {where}"
    if "@" in f"{u.username or ''}{u.host or ''}":
        return f"store.url: holds more than one '@' (a password containing '@'?): {where}"
    if u.drivername not in ("postgresql", "postgresql+psycopg"):
        return f"store.url: not a PostgreSQL URL: expected {STORE_URL_FORM}"
    if not u.database:
        return f"store.url: names no database: expected {STORE_URL_FORM}"
    return None


def check_store(st: StoreConfig) -> None:
    """``store.url``: a PostgreSQL URL without a secret (``store_url_problem``; never echoed: it
    could hold one); ``store.schema``: a plain lower-case identifier; ``store.password_env``: a
    variable name."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", st.password_env or ""):
        raise ConfigError(f"store.password_env: must name an environment variable, got {_show(st.password_env)}")
    if st.schema is not None and not STORE_SCHEMA_RE.fullmatch(st.schema):
        raise ConfigError(f"store.schema: must be a lower-case identifier (a-z, 0-9, _; at most 63), got {_show(st.schema)}")
    if st.schema is not None and (st.schema in SHARED_SCHEMAS or st.schema.startswith("pg_")):
        raise ConfigError(f"store.schema: {st.schema} is a schema PostgreSQL or other users share, and stage 04 drops "
                          "its schema to embed again: name one of this run's own")
    if st.url is None:
        return
    why = store_url_problem(st.url, st.password_env)
    if why is not None:
        raise ConfigError(why)


# ----------------------------------------------------------------------------- names that become paths

NAME_MAX_CHARS = 64
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
# Keys whose value becomes one component of a path in the run folder (07_inference/predict/<name>/,
# ecotaxa_<name>.tsv). store.schema is a PostgreSQL identifier, checked by check_store.
NAME_KEYS = ("inference.name",)


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain name (letters, digits, ``-``, ``_``, ``.``; not starting with
    ``.``; 1 to ``NAME_MAX_CHARS`` characters), or None. ``..``, ``/``, an absolute path, a
    hidden name, an empty or a too long one are all refused here."""
    if not name:
        return "it is empty"
    if len(name) > NAME_MAX_CHARS:
        return f"{len(name)} characters"
    if not _NAME_RE.fullmatch(name):
        return "a character other than A-Z a-z 0-9 - _ ."
    if name.startswith("."):
        return "it starts with '.'"
    return None


def plain_name(text: str, default: str = "input") -> str:
    """``text`` made a plain name (``name_problem`` is None): other characters become ``_``,
    leading dots are dropped, cut to ``NAME_MAX_CHARS``; ``default`` when nothing is left. For
    names derived from an input (a folder's name), never for names the user typed."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).lstrip(".")[:NAME_MAX_CHARS]
    return out if out.strip("_") else default


def check_names(cfg: Config) -> None:
    """Every key of ``NAME_KEYS`` that is set is a plain name (``ConfigError`` naming the key)."""
    for dotted in NAME_KEYS:
        v = get_key(cfg, dotted)
        if v is None:
            continue
        why = name_problem(str(v))
        if why is not None:
            raise ConfigError(f"{dotted}: {_show(v)} is not a plain name ({why}): it names a folder; at most "
                              f"{NAME_MAX_CHARS} characters, not starting with '.'")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


# ----------------------------------------------------------------------------- run-level configuration

# Keys that hold a path (``path=`` in the declaration): made absolute (relative to the working
# directory) when loaded, so the same folder written two ways is the same configuration.
# ``model.pretrained`` and ``extract.checkpoint`` hold a path only when they are not one of their keywords.
PATH_KEYS: dict[str, tuple[str, ...]] = {k: m.path for k, m in KEYS.items() if m.path is not None}
# Keys that describe one invocation, not the run: never saved in RUN/config.yaml (a predict run
# must not turn the next evaluation into a prediction).
INVOCATION_KEYS = tuple(k for k, m in KEYS.items() if m.invocation)


def all_keys() -> list[str]:
    """Every ``section.key`` of the configuration, in declaration order."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
