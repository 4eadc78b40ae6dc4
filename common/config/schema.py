"""Typed configuration: one YAML file, one section per concern.

``load_config(files, overrides)`` merges the built-in defaults, each ``-c`` file in order and
dotted ``section.key=value`` overrides (values parsed as YAML). Every section is a dataclass:
an unknown section or key, or a value of the wrong type, raises ``ConfigError`` naming the key.

The dataclass defaults below are the single source of defaults; ``configs/default.yaml``
repeats them with a comment each, and a test checks that both agree.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from ..errors import ConfigError
from .keys import _COSINE, _FRACTION, _INT64, _KNN_T, _PROB, Range, _ge, _gt, _num, _show

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory; each stage writes RUN/<stage name>/
    seed: int = 42  # one seed for every random choice (split, augmentation, init)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_level: str = "INFO"  # console and log.txt level
    deterministic: bool = False  # cuDNN deterministic kernels (slower)


@dataclass
class DataConfig:
    root: str = "data/DYB-PlanktonNet"  # image folder: one sub-folder per class; or an EcoTaxa export (.zip, or a folder of ecotaxa_*.tsv with their images)
    bad_images: Literal["skip", "fail"] = "skip"  # skip: list unreadable images in bad_images.csv and leave them out | fail: stop
    max_pixels: int = 89_478_485  # images with more pixels are rejected (decompression bombs)
    min_side: int = 4  # images with a side shorter than this (px) are rejected
    pad_fill: int = 0  # grey level (0-255) used to pad images to a square (0 = dark field)
    num_workers: int = 4  # DataLoader worker processes for every stage
    follow_symlinks: bool = False  # stage 01: follow directory symlinks inside class folders (each real folder once); false: skip and list them in bad_images.csv
    gallery_extra: list[str] = field(default_factory=list)  # gallery-only images (stage 04 on): folders with one sub-folder per class, filled corrections.csv files, or EcoTaxa export folders; never train the backbone
    ecotaxa_status: list[str] = field(default_factory=lambda: ["validated"])  # EcoTaxa export (data.root, data.gallery_extra): rows with these object_annotation_status values are used (validated, dubious, predicted, discarded; '' = unclassified)
    class_map: Optional[str] = None  # EcoTaxa export: CSV category,class (class '-' drops the category; '*' lines for the unlisted ones); null = each category is a class
    ecotaxa_level: Optional[int] = None  # EcoTaxa export: the class is this level (1 = first name) of object_annotation_hierarchy; null = object_annotation_category


@dataclass
class SplitConfig:
    train: float = 0.70  # fraction of each class for training (the gallery)
    val: float = 0.15  # fraction for validation (threshold search, model selection)
    test: float = 0.15  # fraction for the final test
    min_images: int = 2  # classes with fewer usable images are dropped
    materialize: Literal["none", "symlink", "hardlink", "copy"] = "none"  # none | symlink | hardlink | copy: also write train/val/test class folders


@dataclass
class StatsConfig:
    batch_size: int = 64  # images per batch while computing mean and std


@dataclass
class ModelConfig:
    backbone: str = "seresnext50_32x4d"  # any timm model name
    pretrained: str = "none"  # none | timm | path to a .pth/.pt/.safetensors file
    image_size: int = 224  # network input side (px); images are padded to square then resized
    head: Literal["mlp", "linear"] = "mlp"  # projection head (mlp = Linear-ReLU-Linear)
    feat_dim: int = 128  # projection head output dimension
    grad_checkpointing: bool = False  # trade compute for memory in the backbone
    channels_last: bool = True  # NHWC memory format on CUDA


@dataclass
class TrainConfig:
    method: Literal["supcon", "simclr"] = "supcon"  # supcon uses labels; simclr ignores them
    epochs: int = 1000  # training epochs
    batch_size: int = 32  # images per step (per GPU with torchrun); each gives two views
    learning_rate: float = 0.016  # base learning rate for SGD
    scale_lr: bool = False  # multiply the learning rate by global batch / 256
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1.0e-4  # SGD weight decay
    cosine: bool = True  # cosine learning-rate schedule (else step decay)
    lr_decay_epochs: list[int] = field(default_factory=lambda: [700, 800, 900])  # step decay epochs
    lr_decay_rate: float = 0.1  # step decay factor (also the cosine floor: lr * rate**3)
    warm: bool = True  # linear warm-up per iteration from warmup_from
    warm_epochs: int = 10  # warm-up length in epochs
    warmup_from: float = 0.01  # learning rate at the first warm-up step
    temperature: float = 0.07  # SupCon temperature (Khosla et al. 2020 use 0.07-0.1)
    base_temperature: float = 0.07  # SupCon base temperature (loss scale)
    contrast_mode: Literal["all", "one"] = "all"  # anchors: every view, or the first view only
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # random resized crop area range
    hflip: float = 0.5  # probability of a horizontal flip
    vflip: float = 0.5  # probability of a vertical flip
    rot90: bool = True  # random 0/90/180/270 degree rotations (plankton has no "up")
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # brightness, contrast, saturation, hue
    color_jitter_p: float = 0.8  # probability of colour jitter
    grayscale_p: float = 0.2  # probability of random greyscale
    save_freq: int = 50  # keep checkpoints/epoch_NNNN.pt every this many epochs
    eval_every: int = 10  # k-NN validation every this many epochs (0 = never)
    eval_knn_k: int = 20  # neighbours for the weighted k-NN validation accuracy
    amp: Literal["bf16", "fp16", "off"] = "bf16"  # mixed precision on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the model (CUDA)
    max_steps_per_epoch: Optional[int] = None  # cap steps per epoch (quick tests); null = all
    trial: str = "0"  # free-form run label, as in the reference SupCon code
    resume: bool = True  # continue from checkpoints/last.pt when it exists (after a crash or Ctrl-C)
    sync_bn: bool = False  # torchrun on CUDA: batch-norm statistics over the global batch (SyncBatchNorm); false: per GPU


@dataclass
class ExtractConfig:
    checkpoint: str = "best"  # best | last | path to a checkpoint file
    embedding: Literal["encoder", "head"] = "encoder"  # backbone pooled output or projection head
    batch_size: int = 256  # images per forward pass
    amp: Literal["bf16", "fp16", "off"] = "bf16"  # mixed precision on CUDA for the forward pass (vectors L2-normalised in float32, then stored as extract.dtype)
    dtype: Literal["float32", "float16"] = "float32"  # stored vector values: float32 (4 bytes each) or float16 (2 bytes: half the store; accuracy effect measured in README)
    cpu_precision: Literal["auto", "fp32", "bf16"] = "auto"  # forward pass on a CPU (stages 04 and 07): bf16 autocast, or fp32; auto = bf16 where the CPU has native bfloat16 (AVX512-BF16/AMX)
    cpu_compile: bool = False  # torch.compile the forward pass on a CPU when a process embeds at least 2,000 images (stages 04 and 07; needs a C++ compiler, compiles for about a minute)


@dataclass
class LutConfig:
    thresholds: Optional[list[float]] = None  # explicit thresholds; null = the grid below
    grid_start: float = 0.80  # first threshold of the grid
    grid_stop: float = 1.00  # last threshold of the grid (inclusive)
    grid_step: float = 0.01  # grid step
    rule: Literal["tolerance", "max_f1", "max_accuracy", "target_size"] = "tolerance"  # threshold choice
    tolerance: float = 0.005  # rule=tolerance: smallest gallery with val macro-F1 within this of the best
    target_size: Optional[int] = None  # rule=target_size: largest gallery not above this many vectors
    knn_k: int = 10  # neighbours for the weighted k-NN vote
    knn_temperature: float = 0.07  # k-NN vote weight exp(sim / T) (DINO)
    block_size: int = 4096  # rows per similarity block (bounds memory: block x block float32)


@dataclass
class PruneConfig:
    threshold: Optional[float] = None  # overrides threshold.json from stage 05; null = use it


@dataclass
class SearchConfig:
    index: Literal["exact", "ivf", "ivfpq", "hnsw"] = "exact"  # exact (blocked matrix products) | ivf | ivfpq | hnsw (FAISS, approximate; stage 06 builds it over the LUT)
    nlist: Optional[int] = None  # ivf/ivfpq: k-means cells; null = 4 * sqrt(gallery size), at most size / 39
    nprobe: int = 32  # ivf/ivfpq: cells scanned per query (more: closer to exact, slower; 32: same-class top-1 0.994 at 1M, benchmarks/bench_scale.py)
    pq_m: int = 64  # ivfpq: bytes per stored vector (sub-quantizers; must divide the indexed dimension)
    pq_bits: int = 8  # ivfpq: bits per sub-quantizer code (the gallery needs at least 2**pq_bits vectors)
    hnsw_m: int = 32  # hnsw: graph degree (neighbours per node)
    ef_construction: int = 80  # hnsw: candidates explored per insertion when building
    ef_search: int = 128  # hnsw: candidates explored per query (more: closer to exact, slower)
    train_size: int = 100000  # vectors sampled (seeded by run.seed) to train the cells, codebooks and PCA
    pca_dim: Optional[int] = None  # project on this many principal axes (fitted on the gallery) before indexing; null = no projection
    candidates: int = 64  # neighbours the index proposes per query, rescored exactly (top-k classes and k-NN vote come from them)
    max_memory_gib: float = 16.0  # exact search (stages 05-07): a gallery, or train split, of more float32 vectors than this many GiB stays in the store and is streamed in blocks (same results; stage 07 then skips the classical classifiers); 0 = always stream


CLASSIFIER_NAMES = ("linear", "logreg", "svm", "random_forest")  # inference.classifiers: common.classifiers fits them


@dataclass
class InferenceConfig:
    mode: Literal["evaluate", "predict"] = "evaluate"  # test split, or a folder of new images
    input: Optional[str] = None  # predict mode: a folder of images (searched recursively; samples = first sub-folders), one image, or a .csv (column path, optional sample) / .txt list of paths
    name: Optional[str] = None  # predict mode: results go to 07_inference/predict/<name>/; null = the input folder's name
    gallery: Literal["lut", "full"] = "lut"  # pruned LUT or the full train gallery
    method: Literal["top1", "knn"] = "top1"  # nearest neighbour, or weighted k-NN vote
    k: int = 10  # neighbours for method=knn
    temperature: float = 0.07  # k-NN vote weight exp(sim / T)
    top_k: int = 5  # candidates listed per query
    reject_below: Union[float, Literal["auto"], None] = None  # open-set: a score (reject_score) below this -> "unknown"; auto = the cut keeping reject_keep of correct val predictions; null = off
    reject_keep: float = 0.95  # reject_below=auto: share of correct val predictions kept above the cut
    reject_score: Literal["similarity", "knn"] = "similarity"  # score compared with reject_below: best similarity, or similarity of the ood_k-th nearest gallery item (Sun et al. 2022)
    ood_k: int = 10  # k of the k-th nearest neighbour score (Sun et al. 2022 use 50 on CIFAR-10, 1000 on ImageNet; the LUT is small)
    unknown_classes: list[str] = field(default_factory=list)  # evaluation of unknowns: these classes leave the gallery (and train, val) and their test images count as unknowns
    review_margin: float = 0.05  # predict mode: a margin between the two best classes below this is doubtful (review.html)
    review_max: int = 500  # predict mode: images shown in review.html, most doubtful first (every image is in predictions.csv)
    batch_size: int = 256  # images per forward pass when embedding
    block_size: int = 4096  # query rows per similarity block
    classifiers: list[str] = field(default_factory=lambda: list(CLASSIFIER_NAMES))  # also fit: linear, logreg, svm, random_forest
    linear_epochs: int = 100  # linear head on frozen features: epochs
    linear_lr: float = 0.1  # linear head learning rate
    worst_classes: int = 5  # report: misclassified strips for this many worst classes
    embedding_map: Literal["pca", "tsne", "none"] = "tsne"  # 2-D map of test embeddings in the report
    ecotaxa_taxa: Optional[str] = None  # predict mode: CSV class,taxon mapping each class to an EcoTaxa taxon (unique display name, or numeric id); null = class names written as they are


@dataclass
class NotifyConfig:
    enabled: bool = False  # send e-mail from stages at all
    on_failure: bool = True  # e-mail when a stage fails
    on_success: bool = False  # e-mail when a stage finishes
    on_interrupt: bool = True  # e-mail when a stage is interrupted (Ctrl-C, SIGTERM)
    smtp_host: str = "localhost"  # SMTP server
    smtp_port: int = 587  # SMTP port (587 STARTTLS, 465 SSL, 25 plain)
    security: Literal["starttls", "ssl", "plain"] = "starttls"  # connection security
    user: Optional[str] = None  # SMTP login; null = no login
    password_env: str = "PLANKTON_SMTP_PASSWORD"  # environment variable holding the password
    sender: str = "plankton@localhost"  # From address
    recipients: list[str] = field(default_factory=list)  # To addresses
    timeout: float = 30.0  # seconds before giving up on the server
    log_lines: int = 40  # last lines of the traceback / log in the e-mail
    allow_insecure_login: bool = False  # allow a login with security: plain (the password would cross the network in clear)


@dataclass
class StoreConfig:
    url: Optional[str] = None  # null = stage 04's features.sqlite; else postgresql+psycopg://user@host:port/db (no password in it)
    password_env: str = "PLANKTON_STORE_PASSWORD"  # environment variable holding the PostgreSQL password
    schema: Optional[str] = None  # PostgreSQL schema holding this run's tables; null = run_<run folder name>


SECTIONS: dict[str, type] = {
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

# ----------------------------------------------------------------------------- numeric ranges

MAX_GRID_THRESHOLDS = 10_001  # lut.grid_*: at most this many thresholds (a step of 2e-4 over [-1, 1])

# Every int / float key (lists: each element; Optional keys: when not null) and its allowed
# values, checked by ``check_ranges`` when the configuration is loaded. A test fails when a
# numeric key of any section has no entry here.
RANGES: dict[str, Range] = {
    "run.seed": Range(0, _INT64, hi_open=True),
    "data.max_pixels": _ge(1),
    "data.min_side": _ge(1),
    "data.pad_fill": Range(0, 255, why="a grey level"),
    "data.num_workers": _ge(0, why="0 = load in the main process"),
    "data.ecotaxa_level": _ge(1, why="1 = the first name of object_annotation_hierarchy, or null"),
    "split.train": _FRACTION,
    "split.val": _FRACTION,
    "split.test": _FRACTION,
    "split.min_images": _ge(1),
    "stats.batch_size": _ge(1),
    "model.image_size": _ge(8),
    "model.feat_dim": _ge(1),
    "train.epochs": _ge(1),
    "train.batch_size": _ge(2, why="SupCon needs two images per step"),
    "train.learning_rate": _gt(0.0),
    "train.momentum": Range(0.0, 1.0, hi_open=True),
    "train.weight_decay": _ge(0.0),
    "train.lr_decay_epochs": _ge(1),
    "train.lr_decay_rate": Range(0.0, 1.0, lo_open=True),
    "train.warm_epochs": _ge(0),
    "train.warmup_from": _ge(0.0),
    "train.temperature": _KNN_T,  # also the k-NN validation vote's temperature
    "train.base_temperature": _gt(0.0),
    "train.crop_scale": Range(0.0, 1.0, lo_open=True, why="a fraction of the image area"),
    "train.hflip": _PROB,
    "train.vflip": _PROB,
    "train.color_jitter": _ge(0.0),
    "train.color_jitter_p": _PROB,
    "train.grayscale_p": _PROB,
    "train.save_freq": _ge(1),
    "train.eval_every": _ge(0, why="0 = never"),
    "train.eval_knn_k": _ge(1),
    "train.max_steps_per_epoch": _ge(1, why="or null for all"),
    "extract.batch_size": _ge(1),
    "lut.thresholds": _COSINE,
    "lut.grid_start": _COSINE,
    "lut.grid_stop": _COSINE,
    "lut.grid_step": _gt(0.0),
    "lut.tolerance": _ge(0.0),
    "lut.target_size": _ge(1),
    "lut.knn_k": _ge(1),
    "lut.knn_temperature": _KNN_T,
    "lut.block_size": _ge(1),
    "prune.threshold": _COSINE,
    "search.nlist": _ge(1),
    "search.nprobe": _ge(1),
    "search.pq_m": _ge(1),
    "search.pq_bits": Range(1, 16, why="bits per code"),
    "search.hnsw_m": _ge(2),
    "search.ef_construction": _ge(1),
    "search.ef_search": _ge(1),
    "search.train_size": _ge(1),
    "search.pca_dim": _ge(1),
    "search.candidates": _ge(1),
    "search.max_memory_gib": _ge(0, why="GiB of vectors held in memory; 0 = always stream"),
    "inference.k": _ge(1),
    "inference.temperature": _KNN_T,
    "inference.top_k": _ge(1),
    "inference.reject_below": _COSINE,
    "inference.reject_keep": Range(0.0, 1.0, lo_open=True, why="a share of the correct val predictions"),
    "inference.ood_k": _ge(1),
    "inference.review_margin": Range(0.0, 2.0, why="a difference of cosine similarities"),
    "inference.review_max": _ge(0),
    "inference.batch_size": _ge(1),
    "inference.block_size": _ge(1),
    "inference.linear_epochs": _ge(1),
    "inference.linear_lr": _gt(0.0),
    "inference.worst_classes": _ge(0),
    "notify.smtp_port": Range(1, 65535),
    "notify.timeout": Range(0.0, 3600.0, lo_open=True, why="seconds"),
    "notify.log_lines": _ge(0),
}


def _check_number(key: str, v: Any, rng: Range) -> None:
    why = f" ({rng.why})" if rng.why else ""
    if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"{key}: must be a finite number {rng.describe()}{why}, got {_show(v)}")
    if not rng.contains(v):
        raise ConfigError(f"{key}: must be {rng.describe()}{why}, got {_show(v)}")
    if isinstance(v, int) and not -_INT64 <= v < _INT64:
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


# Keys that change how fast a stage runs, not what it produces: left out of the config hash
# that decides whether a stage is up to date.
NON_SEMANTIC = {
    "run.dir", "run.log_level", "run.device", "data.num_workers", "stats.batch_size",
    "extract.batch_size", "inference.batch_size", "inference.block_size", "lut.block_size",
    "train.compile", "train.trial", "train.resume", "notify", "store.password_env",
    "extract.cpu_compile",
}

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

# Keys that hold a path: made absolute (relative to the working directory) when loaded, so the same
# folder written two ways is the same configuration. ``model.pretrained`` and ``extract.checkpoint``
# hold a path only when they are not one of their keywords.
PATH_KEYS: dict[str, tuple[str, ...]] = {
    "data.root": (),
    "data.gallery_extra": (),
    "data.class_map": (),
    "inference.ecotaxa_taxa": (),
    "inference.input": (),
    "model.pretrained": ("none", "timm"),
    "extract.checkpoint": ("best", "last"),
}
# Keys that describe one invocation, not the run: never saved in RUN/config.yaml (a predict run
# must not turn the next evaluation into a prediction).
INVOCATION_KEYS = ("inference.mode", "inference.input", "inference.name", "run.dir", "train.resume")


def all_keys() -> list[str]:
    """Every ``section.key`` of the configuration, in declaration order."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
