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
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

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


@dataclass
class ExtractConfig:
    checkpoint: str = "best"  # best | last | path to a checkpoint file
    embedding: Literal["encoder", "head"] = "encoder"  # backbone pooled output or projection head
    batch_size: int = 256  # images per forward pass
    amp: Literal["bf16", "fp16", "off"] = "bf16"  # mixed precision on CUDA (vectors stored as float32)


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
class InferenceConfig:
    mode: Literal["evaluate", "predict"] = "evaluate"  # test split, or a folder of new images
    input: Optional[str] = None  # predict mode: folder of images (searched recursively)
    gallery: Literal["lut", "full"] = "lut"  # pruned LUT or the full train gallery
    method: Literal["top1", "knn"] = "top1"  # nearest neighbour, or weighted k-NN vote
    k: int = 10  # neighbours for method=knn
    temperature: float = 0.07  # k-NN vote weight exp(sim / T)
    top_k: int = 5  # candidates listed per query
    reject_below: Optional[float] = None  # open-set: best similarity below this -> "unknown"; null = off
    batch_size: int = 256  # images per forward pass when embedding
    block_size: int = 4096  # query rows per similarity block
    classifiers: list[str] = field(default_factory=lambda: ["linear", "logreg", "svm", "random_forest"])  # also fit: linear, logreg, svm, random_forest
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
    "inference": InferenceConfig,
    "notify": NotifyConfig,
}

# Keys that change how fast a stage runs, not what it produces: left out of the config hash
# that decides whether a stage is up to date.
NON_SEMANTIC = {
    "run.dir", "run.log_level", "run.device", "data.num_workers", "stats.batch_size",
    "extract.batch_size", "inference.batch_size", "inference.block_size", "lut.block_size",
    "train.compile", "notify",
}

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
SUPCON_FLAGS = {"cosine", "warm"}

_SECRET_RE = re.compile(r"(password|passwd|secret|token|api_key|apikey)", re.I)
REDACTED = "***redacted***"


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
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def hash(self, sections: list[str] | None = None) -> str:
        """sha256 of the semantic part of ``sections`` (all when None), canonical JSON."""
        d = self.to_dict()
        keep = {}
        for sec in sections or list(SECTIONS):
            if sec in NON_SEMANTIC:
                continue
            keep[sec] = {k: v for k, v in d[sec].items() if f"{sec}.{k}" not in NON_SEMANTIC}
        blob = json.dumps(keep, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


# ----------------------------------------------------------------------------- type checking


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
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
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
        raise ConfigError(f"unknown config section {section!r} in {origin}{_suggest(section, list(SECTIONS))}")
    sec_obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(sec_obj))
    if key not in hints:
        raise ConfigError(
            f"unknown config key {section}.{key} in {origin}{_suggest(key, list(hints))}"
        )
    setattr(sec_obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def _merge_mapping(cfg: Config, data: Any, origin: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    for section, body in data.items():
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a mapping of keys in {origin}, got {body!r}")
        for key, value in body.items():
            _apply(cfg, str(section), str(key), value, origin)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value`` and parse the value as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {dotted!r} must look like section.key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{dotted}: cannot parse value {raw!r} as YAML ({e.__class__.__name__})") from None
    return parts[0], parts[1], value


def load_config(files: list[str | Path] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then each YAML file in order, then ``section.key=value`` overrides."""
    cfg = Config()
    for f in files or []:
        p = Path(f)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        _merge_mapping(cfg, data, str(p))
    for o in overrides or []:
        section, key, value = parse_override(o)
        _apply(cfg, section, key, value, "command line")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-key checks that types alone cannot express."""
    s = cfg.split
    for name in ("train", "val", "test"):
        v = getattr(s, name)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"split.{name}: must be between 0 and 1, got {v}")
    if abs(s.train + s.val + s.test - 1.0) > 1e-6:
        raise ConfigError(f"split.train + split.val + split.test must be 1, got {s.train + s.val + s.test:.4f}")
    if s.train <= 0:
        raise ConfigError("split.train: must be > 0 (the gallery comes from train)")
    if s.min_images < 1:
        raise ConfigError(f"split.min_images: must be >= 1, got {s.min_images}")
    if not 0 <= cfg.data.pad_fill <= 255:
        raise ConfigError(f"data.pad_fill: must be 0-255, got {cfg.data.pad_fill}")
    if cfg.model.image_size < 8:
        raise ConfigError(f"model.image_size: must be >= 8, got {cfg.model.image_size}")
    if cfg.train.batch_size < 2:
        raise ConfigError(f"train.batch_size: must be >= 2, got {cfg.train.batch_size}")
    if len(cfg.train.crop_scale) != 2 or not 0 < cfg.train.crop_scale[0] <= cfg.train.crop_scale[1] <= 1:
        raise ConfigError(f"train.crop_scale: must be [min, max] with 0 < min <= max <= 1, got {cfg.train.crop_scale}")
    if len(cfg.train.color_jitter) != 4:
        raise ConfigError(f"train.color_jitter: must be [brightness, contrast, saturation, hue], got {cfg.train.color_jitter}")
    if cfg.lut.grid_step <= 0:
        raise ConfigError(f"lut.grid_step: must be > 0, got {cfg.lut.grid_step}")
    if cfg.lut.rule == "target_size" and cfg.lut.target_size is None:
        raise ConfigError("lut.target_size: must be set when lut.rule is target_size")
    allowed = {"linear", "logreg", "svm", "random_forest"}
    for c in cfg.inference.classifiers:
        if c not in allowed:
            raise ConfigError(f"inference.classifiers: unknown classifier {c!r} (choose from {sorted(allowed)})")
    if cfg.inference.mode == "predict" and not cfg.inference.input:
        raise ConfigError("inference.input: must name a folder of images when inference.mode is predict")


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
