"""Typed configuration: one YAML file, one section per concern.

``load_config(files, overrides)`` merges the built-in defaults, each ``-c`` file in order and
dotted ``section.key=value`` overrides (values parsed as YAML). Every section is a dataclass:
an unknown section or key, or a value of the wrong type, raises ``ConfigError`` naming the key.

The dataclass defaults below are the single source of defaults; ``configs/default.yaml``
repeats them with a comment each, and a test checks that both agree.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, NamedTuple, Optional, Union

import yaml

from .errors import ConfigError

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
    root: str = "data/DYB-PlanktonNet"  # image folder: one sub-folder per class
    bad_images: Literal["skip", "fail"] = "skip"  # skip: list unreadable images in bad_images.csv and leave them out | fail: stop
    max_pixels: int = 89_478_485  # images with more pixels are rejected (decompression bombs)
    min_side: int = 4  # images with a side shorter than this (px) are rejected
    pad_fill: int = 0  # grey level (0-255) used to pad images to a square (0 = dark field)
    num_workers: int = 4  # DataLoader worker processes for every stage
    follow_symlinks: bool = False  # stage 01: follow directory symlinks inside class folders (each real folder once); false: skip and list them in bad_images.csv
    gallery_extra: list[str] = field(default_factory=list)  # gallery-only images (stage 04 on): folders with one sub-folder per class, or filled corrections.csv files; never train the backbone


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
# exp(sim / T) of the weighted k-NN vote overflows float64 for T < 1/709.8; a round floor above that.
KNN_TEMPERATURE_MIN = 0.002
_INT64 = 2**63  # every int key must fit a signed 64-bit integer (numpy, torch)


class Range(NamedTuple):
    """The allowed values of one numeric key (of each element, for a list key).

    ``lo`` / ``hi``: bounds, None = unbounded; ``lo_open`` / ``hi_open`` exclude the bound itself.
    Floats must also be finite; ints must fit a signed 64-bit integer. ``why`` ends the message.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def contains(self, v: float) -> bool:
        """True when ``v`` lies within the bounds (NaN never does)."""
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below

    def describe(self) -> str:
        """``>= 0 and < 1`` (the bounds as words after "must be")."""
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
        return " and ".join(parts)


def _num(v: float) -> str:
    if v == _INT64:
        return "2**63"
    return str(v) if isinstance(v, int) else f"{v:g}"


def _ge(lo: float, why: str = "") -> Range:
    return Range(lo=lo, why=why)


def _gt(lo: float, why: str = "") -> Range:
    return Range(lo=lo, lo_open=True, why=why)


_PROB = Range(0.0, 1.0, why="a probability")
_FRACTION = Range(0.0, 1.0)
_COSINE = Range(-1.0, 1.0, why="a cosine similarity")
_KNN_T = _ge(KNN_TEMPERATURE_MIN, why="exp(sim / T) overflows below that")

# Every int / float key (lists: each element; Optional keys: when not null) and its allowed
# values, checked by ``check_ranges`` when the configuration is loaded. A test fails when a
# numeric key of any section has no entry here.
RANGES: dict[str, Range] = {
    "run.seed": Range(0, _INT64, hi_open=True),
    "data.max_pixels": _ge(1),
    "data.min_side": _ge(1),
    "data.pad_fill": Range(0, 255, why="a grey level"),
    "data.num_workers": _ge(0, why="0 = load in the main process"),
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

_SECRET_RE = re.compile(r"(password|passwd|secret|token|api_key|apikey)", re.I)
REDACTED = "***redacted***"


def is_secret_key(key: str) -> bool:
    """True for keys that hold a secret (``password``, ``token``...), not where one lives (``*_env``)."""
    return bool(_SECRET_RE.search(key)) and not key.endswith("_env")


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


# ----------------------------------------------------------------------------- type checking

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 8, 8, 8
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60
SHOW_MAX_CHARS = 80  # a value quoted in an error message is cut to this many characters


def _cut(text: str) -> str:
    """``text`` cut to ``SHOW_MAX_CHARS`` characters (with ``...``)."""
    return text if len(text) <= SHOW_MAX_CHARS else text[: SHOW_MAX_CHARS - 3] + "..."


def _show(value: Any) -> str:
    """A bounded ``repr`` of ``value`` for one-line error messages (never renders a huge value)."""
    return _cut(_REPR.repr(value))



def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked (and losslessly widened, int -> float) against ``tp``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)} ({type(value).__name__})")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. trial: 3
        raise bad
    raise bad  # pragma: no cover - every field type is handled above


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _apply(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {NOT_SHOWN if _may_hold_secret(section, name=True) else _show(section)} in {origin}{_suggest(section, list(SECTIONS))}")
    sec_obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(sec_obj))
    if key not in hints:
        raise ConfigError(
            f"unknown config key {_show_arg(f'{section}.{key}', name=True)} in {origin}{_suggest(key, list(hints))}"
        )
    dotted = f"{section}.{key}"
    try:
        setattr(sec_obj, key, _coerce(value, hints[key], dotted))
    except ConfigError:
        if not holds_secret(dotted):
            raise
        raise ConfigError(f"{dotted}: expected {_type_name(hints[key])}, got a {type(value).__name__} "
                          f"(in {origin}; the value is not shown: it may hold a secret)") from None


def _merge_mapping(cfg: Config, data: Any, origin: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    for section, body in data.items():
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{_show_arg(str(section), name=True)}: expected a mapping of keys in {origin}, got a "
                              f"{type(body).__name__}")
        for key, value in body.items():
            _apply(cfg, str(section), str(key), value, origin)


# ----------------------------------------------------------------------------- YAML

MAX_YAML_ALIAS_VALUES = 100_000  # values that aliases add to one YAML document once expanded ("billion laughs")
MAX_YAML_DEPTH = 32  # nesting levels of one YAML document (a configuration needs four)
MAX_CONFIG_BYTES = 16 * 2**20  # a -c file larger than this is refused before it is read (a configuration is a few KiB)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that composes at most ``MAX_YAML_DEPTH`` nesting levels: a deeper
    document is refused at level ``MAX_YAML_DEPTH + 1``, so the work done on it is bounded by that
    depth, never by the file's length or Python's recursion limit."""

    def __init__(self, stream: str, origin: str):
        super().__init__(stream)
        self._depth, self._origin = 0, origin

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self._depth >= MAX_YAML_DEPTH:
            raise ConfigError(f"{self._origin}: YAML nested deeper than {MAX_YAML_DEPTH} levels: refusing to load it")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_yaml_graph(root: yaml.Node, origin: str) -> None:
    """Refuse a composed YAML document whose aliases add more than ``MAX_YAML_ALIAS_VALUES`` values
    once expanded ("billion laughs") or whose alias refers to the value that contains it.

    What counts is what aliases add (expanded size minus the nodes written in the text), never
    the document's own length: a plain list of 200,000 values adds nothing. Aliases share nodes,
    so each node's expanded size is computed once (time linear in the text); an alias always
    follows its anchor, so the walk never goes deeper than the text nests (``_BoundedLoader``).
    """
    sizes: dict[int, int] = {}  # id(node) -> expanded size; -1 while the node is being visited

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            if known < 0:
                raise ConfigError(f"{origin}: a YAML alias refers to the value that contains it: refusing to load it")
            return known
        sizes[id(node)] = -1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        total = 1 + sum(size(child) for child in children)
        sizes[id(node)] = total
        return total

    added = size(root) - len(sizes)
    if added > MAX_YAML_ALIAS_VALUES:
        raise ConfigError(f"{origin}: YAML aliases expand to more than {MAX_YAML_ALIAS_VALUES} values "
                          "(a \"billion laughs\" file?): refusing to load it")


def load_yaml(text: str, origin: str) -> Any:
    """Parse one YAML document with the safe loader, checking its nesting while composing it and
    what its aliases expand to before building it.

    Raises ``ConfigError`` naming ``origin`` for an alias bomb, a self-referring alias or too deep
    nesting; ``yaml.YAMLError`` for a syntax error.
    """
    loader = _BoundedLoader(text, origin)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # not expected (the depth is bounded): kept as a last guard
            raise ConfigError(f"{origin}: YAML nested too deeply: refusing to load it") from None
        if node is None:
            return None
        _check_yaml_graph(node, origin)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _may_hold_secret(text: str, name: bool = False) -> bool:
    """True for command-line text that could carry a secret: a URL (``@``, ``://``) and, unless
    ``name`` (a key's name: ``notify.password`` names no secret), a ``password``/``token`` word.
    Such text is never quoted back in a message."""
    url_like = "@" in text or "://" in text
    return url_like or (not name and bool(_SECRET_RE.search(text) or _URL_SECRET_RE.search(text)))


NOT_SHOWN = "(not shown: it may hold a secret)"


def _show_arg(text: str, name: bool = False) -> str:
    """``_show(text)`` (``_cut`` for a ``name``), or ``NOT_SHOWN`` when the text may hold a secret."""
    if _may_hold_secret(text, name):
        return NOT_SHOWN
    return _cut(text) if name else _show(text)


def holds_secret(dotted: str) -> bool:
    """Keys whose value may be a secret or carry one (``store.url``, ``*password*``...): their
    values are never quoted in a message."""
    return dotted in SECRET_VALUE_KEYS or is_secret_key(dotted.split(".")[-1])


SECRET_VALUE_KEYS = ("store.url",)


def secret_args(argv: Iterable[str]) -> set[str]:
    """The command-line words never quoted back (``NOT_SHOWN`` instead): those that may hold a
    secret (``_may_hold_secret``) and the word after an option named like one (``--password X``)."""
    words = list(argv)
    out = {w for w in words if _may_hold_secret(w)}
    out |= {b for a, b in zip(words, words[1:]) if a.startswith("-") and _may_hold_secret(a)}
    return out


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value`` and parse the value as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {_show_arg(text)} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {_show_arg(dotted, name=True)} must look like section.key")
    try:
        value = load_yaml(raw, f"command-line override {_cut(dotted.strip())}") if raw.strip() != "" else None
    except yaml.YAMLError as e:
        shown = "" if holds_secret(dotted.strip()) else f" {_show(raw)}"
        raise ConfigError(f"{_cut(dotted)}: cannot parse value{shown} as YAML ({e.__class__.__name__})") from None
    return parts[0], parts[1], value


def load_config(files: list[str | Path] | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None, base_origin: str = "run configuration") -> Config:
    """Defaults, then ``base`` (a run's own config.yaml), each YAML file in order, then overrides.

    Path-valued keys are made absolute (``resolve_paths``) before the checks.
    """
    cfg = Config()
    if base is not None:
        _merge_mapping(cfg, base, base_origin)
    for f in files or []:
        p = Path(f)
        if p.is_dir():
            raise ConfigError(f"config file {p} is a folder, not a file")
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        if not p.is_file():
            raise ConfigError(f"config file {p} is not a regular file")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {p} is larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a configuration")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not UTF-8 text") from None
        except OSError as e:
            raise ConfigError(f"config file {p} cannot be read ({e.strerror})") from None
        try:
            data = load_yaml(text, str(p))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({_cut(str(e).splitlines()[0])})") from None
        _merge_mapping(cfg, data, str(p))
    for o in overrides or []:
        section, key, value = parse_override(o)
        _apply(cfg, section, key, value, "command line")
    resolve_paths(cfg)
    if cfg.store.url:
        cfg.store.url = strip_empty_password(cfg.store.url)
    validate(cfg)
    return cfg


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


# ----------------------------------------------------------------------------- output


def redact(obj: Any) -> Any:
    """Copy of a nested dict with every secret-looking value replaced.

    Keys naming where a secret lives (``password_env``) are kept: they hold a variable name.
    """
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and _SECRET_RE.search(k) and not k.endswith("_env") and v not in (None, ""):
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return copy.deepcopy(obj)


def to_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML, secrets redacted."""
    return yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False, default_flow_style=None)


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. the copy stored in a checkpoint)."""
    cfg = Config()
    _merge_mapping(cfg, d, "stored configuration")
    return cfg


# ----------------------------------------------------------------------------- run-level configuration

# Keys that hold a path: made absolute (relative to the working directory) when loaded, so the same
# folder written two ways is the same configuration. ``model.pretrained`` and ``extract.checkpoint``
# hold a path only when they are not one of their keywords.
PATH_KEYS: dict[str, tuple[str, ...]] = {
    "data.root": (),
    "data.gallery_extra": (),
    "inference.input": (),
    "model.pretrained": ("none", "timm"),
    "extract.checkpoint": ("best", "last"),
}
# Keys that describe one invocation, not the run: never saved in RUN/config.yaml (a predict run
# must not turn the next evaluation into a prediction).
INVOCATION_KEYS = ("inference.mode", "inference.input", "inference.name", "run.dir", "train.resume")


def get_key(cfg: Config, dotted: str) -> Any:
    """The value of ``section.key``."""
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def resolve_paths(cfg: Config, cwd: str | Path | None = None) -> None:
    """Make every path-valued key absolute (``PATH_KEYS``), in place."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    def absolute(v: Any) -> str:
        return str((base / Path(str(v)).expanduser()).resolve())

    for dotted, keywords in PATH_KEYS.items():
        v = get_key(cfg, dotted)
        section, key = dotted.split(".")
        if isinstance(v, list):  # a list of paths (data.gallery_extra)
            setattr(getattr(cfg, section), key, [absolute(x) for x in v])
            continue
        if not v or str(v).lower() in keywords:
            continue
        setattr(getattr(cfg, section), key, absolute(v))


def all_keys() -> list[str]:
    """Every ``section.key`` of the configuration, in declaration order."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def is_semantic(dotted: str) -> bool:
    """False for keys that change how fast a stage runs, not what it produces (``NON_SEMANTIC``)."""
    return dotted not in NON_SEMANTIC and dotted.split(".")[0] not in NON_SEMANTIC


def key_values(cfg: Config, keys: Iterable[str]) -> dict[str, Any]:
    """``{section.key: value}`` of the semantic ``keys`` (what a manifest records and hashes)."""
    return {k: copy.deepcopy(get_key(cfg, k)) for k in sorted(set(keys)) if is_semantic(k)}


def hash_values(values: dict[str, Any]) -> str:
    """sha256 of canonical JSON of ``key_values`` output."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def diff_values(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["lut.tolerance: 0.005 -> 0.01", ...]`` for every key whose value differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "(unset)"), new.get(k, "(unset)")
        if a != b:
            out.append(f"{k}: {_short(a)} -> {_short(b)}")
    return out


def _short(v: Any, limit: int = 60) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_config_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """What RUN/config.yaml holds: every key but the invocation ones, secrets redacted."""
    d = redact(cfg.to_dict())
    for dotted in INVOCATION_KEYS:
        section, key = dotted.split(".")
        d[section].pop(key, None)
    return d


def recording(cfg: Config) -> tuple[Config, set[str]]:
    """A copy of ``cfg`` that records every ``section.key`` read from it, and the set it fills.

    The stage wrapper hands this copy to a stage, so a test can check that a stage reads only
    the keys it declares. ``dataclasses.asdict`` of a section counts as reading all its keys.
    """
    reads: set[str] = set()
    rec = copy.deepcopy(cfg)
    for section in SECTIONS:
        obj = getattr(rec, section)
        obj.__class__ = _recording_class(type(obj))
        object.__setattr__(obj, "_reads", reads)
        object.__setattr__(obj, "_section", section)
    return rec, reads


_RECORDING_CLASSES: dict[type, type] = {}


class _Recorder:
    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_") and name in type(self).__dataclass_fields__:
            reads = object.__getattribute__(self, "_reads")
            reads.add(f"{object.__getattribute__(self, '_section')}.{name}")
        return object.__getattribute__(self, name)


def _recording_class(cls: type) -> type:
    if cls not in _RECORDING_CLASSES:
        _RECORDING_CLASSES[cls] = type(f"Recording{cls.__name__}", (_Recorder, cls), {})
    return _RECORDING_CLASSES[cls]
