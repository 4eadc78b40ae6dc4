"""The backbone and projection head of Supervised Contrastive Learning.

``SupConModel`` follows the reference code (HobbitLong/SupContrast ``networks/resnet_big.py``,
``SupConResNet``): a backbone that returns pooled features (``dim_in``, 2048 for SE-ResNeXt-50)
and a projection head (``mlp``: Linear(dim_in, dim_in)-ReLU-Linear(dim_in, feat_dim), or
``linear``) whose output is L2-normalised. The contrastive loss is computed on the head output;
retrieval (stages 04-07) uses the backbone output, as Khosla et al. (2020, section 3) discard the
head after training.

Weights come from ``model.pretrained``: ``none`` (random init), ``timm`` (timm's own pretrained
weights, which needs internet) or a local ``.pth`` / ``.pt`` / ``.safetensors`` file: a plain timm
backbone, a reference SupContrast checkpoint (``encoder.module.*``, ``head.*``) or one of this
pipeline's checkpoints (``backbone.*``, ``head.*``), see ``load_pretrained``.
"""
from __future__ import annotations

import logging
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .data import Preprocessing
from .errors import UserError
from .fileio import sha256_file

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "plankton-supcon/1"
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")
# Prefixes that wrap a backbone's own keys in training code: SupContrast ("encoder."), this
# pipeline and many others ("backbone."), DataParallel / DDP ("module.", stripped everywhere).
_BACKBONE_PREFIXES = ("encoder.", "backbone.")
# Classifier layers of ImageNet timm models (the name in pretrained_cfg["classifier"] wins).
_CLASSIFIER_NAMES = ("fc", "head.fc", "classifier", "last_linear", "head")
_SHOW_KEYS = 5  # keys listed per kind in a mismatch message


class SupConModel(nn.Module):
    """Backbone (pooled features) + projection head with L2-normalised output."""

    def __init__(self, backbone: nn.Module, head: str = "mlp", feat_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.dim_in = int(backbone.num_features)
        self.feat_dim = int(feat_dim)
        if head == "mlp":  # SupConResNet's 'mlp' head
            self.head: nn.Module = nn.Sequential(
                nn.Linear(self.dim_in, self.dim_in), nn.ReLU(inplace=True), nn.Linear(self.dim_in, self.feat_dim))
        elif head == "linear":
            self.head = nn.Linear(self.dim_in, self.feat_dim)
        else:
            raise UserError(f"model.head: expected mlp or linear, got {head!r}")

    def encoder(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, dim_in)``, not normalised (what retrieval embeds)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised projection ``(B, feat_dim)``, float32 (or float64) even under autocast."""
        z = self.head(self.backbone(x))
        return F.normalize(z if z.dtype in (torch.float32, torch.float64) else z.float(), dim=1)


# ----------------------------------------------------------------------------- building


def _create_backbone(name: str, pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(str(name), timm.list_models(), n=3, cutoff=0.6)
        raise UserError(f"model.backbone: {name!r} is not a timm model name"
                        + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001 - hub, network and file errors all mean "no weights"
        raise UserError(
            f"could not fetch timm pretrained weights for {name} (no internet?): download them elsewhere and "
            f"set model.pretrained to the file ({e.__class__.__name__})") from None


def build_model(model_cfg: ModelConfig) -> SupConModel:
    """The model described by the ``model`` config section, with its pretrained weights loaded."""
    spec = (model_cfg.pretrained or "none").strip()
    backbone = _create_backbone(model_cfg.backbone, pretrained=spec.lower() == "timm")
    if model_cfg.grad_checkpointing:
        if not hasattr(backbone, "set_grad_checkpointing"):
            raise UserError(f"model.grad_checkpointing: timm model {model_cfg.backbone} does not support it")
        backbone.set_grad_checkpointing(True)
    model = SupConModel(backbone, head=model_cfg.head, feat_dim=model_cfg.feat_dim)
    if spec.lower() not in ("none", "timm", ""):
        load_pretrained(model, spec)
    log.debug("model %s: %d-d backbone features, %s head to %d-d, %.1fM parameters", model_cfg.backbone,
              model.dim_in, model_cfg.head, model.feat_dim, sum(p.numel() for p in model.parameters()) / 1e6)
    return model


# ----------------------------------------------------------------------------- weight files


def read_weights_file(path: str | Path) -> Mapping[str, Any]:
    """The raw content of a ``.safetensors`` or ``torch.save`` file (``weights_only=True``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"model.pretrained: {p} does not exist (expected none, timm or a "
                        f"{'/'.join(WEIGHT_SUFFIXES[:3])} file)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p), device="cpu")
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        raise UserError(f"model.pretrained: cannot read {p} as a weights file ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(obj, Mapping):
        raise UserError(f"model.pretrained: {p} holds a {type(obj).__name__}, not a state_dict")
    return obj


def extract_state_dict(obj: Mapping[str, Any], path: str | Path = "file") -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a raw state_dict or ``{"state_dict"|"model": ...}``.

    ``module.`` components (DataParallel / DDP) are removed wherever they appear
    (SupContrast saves ``encoder.module.conv1.weight``).
    """
    sd: Any = obj
    for _ in range(3):  # {"model": {"state_dict": ...}} nests at most a couple of times
        inner = next((sd[k] for k in ("state_dict", "model", "model_state_dict")
                      if isinstance(sd, Mapping) and isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"model.pretrained: {path} holds no tensors (not a state_dict)")
    return {re.sub(r"(^|\.)module\.", r"\1", k): v for k, v in tensors.items()}


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW_KEYS])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > _SHOW_KEYS else ''})" if keys else "0"


def _mismatch_error(path: Any, what: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> UserError:
    parts = [f"missing keys {_key_list(sorted(missing))}", f"unexpected keys {_key_list(sorted(unexpected))}"]
    if shapes:
        parts.append(f"shape mismatches {_key_list(shapes)}")
    return UserError(f"{path} does not fit {what}: " + "; ".join(parts))


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier")
    names = ([name] if isinstance(name, str) else list(name or [])) + list(_CLASSIFIER_NAMES)
    return tuple(f"{n}." for n in names)


def load_pretrained(model: SupConModel, path: str | Path) -> dict[str, int]:
    """Load a local weights file into ``model``; returns counts of what was loaded and ignored.

    The backbone must match exactly (after removing ``module.`` and an ``encoder.`` /
    ``backbone.`` prefix); an ImageNet classifier (``fc.``, ``head.fc.``) of a plain timm file
    is ignored. A projection head in the file is loaded when its keys and shapes match the
    model's head; a file with no head (a plain backbone) leaves the head at its random init.
    Anything else is a ``UserError`` listing the missing and unexpected keys.
    """
    sd = extract_state_dict(read_weights_file(path), path)
    wrapped = any(k.startswith(_BACKBONE_PREFIXES) for k in sd)
    back_sd: dict[str, torch.Tensor] = {}
    head_sd: dict[str, torch.Tensor] = {}
    other: list[str] = []
    for k, v in sd.items():
        pre = next((p for p in _BACKBONE_PREFIXES if k.startswith(p)), None)
        if pre is not None:
            back_sd[k[len(pre):]] = v
        elif wrapped and k.startswith("head."):
            head_sd[k[len("head."):]] = v
        elif wrapped:
            other.append(k)  # neither backbone nor head in a wrapped file: reported below
        else:
            back_sd[k] = v
    own = model.backbone.state_dict()
    ignored = []
    if not wrapped:  # plain timm file: drop its ImageNet classifier (num_classes=0 has none)
        cls = _classifier_prefixes(model.backbone)
        ignored = [k for k in back_sd if k not in own and k.startswith(cls)]
        for k in ignored:
            del back_sd[k]
    missing = [k for k in own if k not in back_sd]
    unexpected = [k for k in back_sd if k not in own] + other
    shapes = [f"{k} {tuple(back_sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in back_sd and back_sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise _mismatch_error(path, f"backbone {type(model.backbone).__name__}", missing, unexpected, shapes)
    model.backbone.load_state_dict(back_sd, strict=True)
    if ignored:
        log.info("%s: ignored the classifier of a plain timm file (%s)", path, ", ".join(sorted(ignored)[:_SHOW_KEYS]))
    head_own = model.head.state_dict()
    if head_sd:
        h_missing = [f"head.{k}" for k in head_own if k not in head_sd]
        h_unexpected = [f"head.{k}" for k in head_sd if k not in head_own]
        h_shapes = [f"head.{k} {tuple(head_sd[k].shape)} vs {tuple(head_own[k].shape)}" for k in head_own
                    if k in head_sd and head_sd[k].shape != head_own[k].shape]
        if h_missing or h_unexpected or h_shapes:
            raise _mismatch_error(path, "the projection head (model.head, model.feat_dim)", h_missing,
                                  h_unexpected, h_shapes)
        model.head.load_state_dict(head_sd, strict=True)
        log.info("loaded backbone (%d tensors) and projection head (%d tensors) from %s", len(back_sd), len(head_sd), path)
    else:
        log.info("loaded backbone (%d tensors) from %s; the file has no projection head, so the head starts "
                 "from random init", len(back_sd), path)
    return {"backbone": len(back_sd), "head": len(head_sd), "ignored": len(ignored)}


# ----------------------------------------------------------------------------- checkpoints


def model_config_from(stored: Mapping[str, Any] | None) -> ModelConfig:
    """A ``ModelConfig`` from a checkpoint's stored ``config["model"]`` (unknown keys dropped)."""
    known = {f.name for f in fields(ModelConfig)}
    mc = ModelConfig(**{k: v for k, v in dict(stored or {}).items() if k in known})
    mc.pretrained = "none"  # the checkpoint's weights replace any pretrained ones: never download
    return mc


def checkpoint_preprocessing(ckpt: Mapping[str, Any], path: str | Path) -> Preprocessing:
    """The preprocessing a stage-03 checkpoint was trained with (``ckpt["preprocessing"]``).

    A checkpoint written before that record existed (a run folder of an earlier version of this
    tool) still loads: its preprocessing is derived from what that version trained with, the
    stored ``stats`` (mean/std of stats.json at the time) and the stored ``config``
    (``model.image_size``, ``data.pad_fill``); images were RGB then too.
    """
    where = f"checkpoint {path}"
    if "preprocessing" in ckpt:
        return Preprocessing.from_dict(ckpt["preprocessing"], where)
    stats, cfg = ckpt.get("stats") or {}, ckpt.get("config") or {}
    try:
        derived = {"mean": stats["mean"], "std": stats["std"], "image_size": cfg["model"]["image_size"],
                   "pad_fill": cfg["data"]["pad_fill"]}
    except (KeyError, TypeError):
        raise UserError(f"{where} records neither its preprocessing nor the stats and model.image_size / "
                        "data.pad_fill it was trained with: is it a checkpoint of 03_main_supcon.py?") from None
    return Preprocessing.from_dict(derived, where)


def load_checkpoint_model(path: str | Path, map_location: Any = "cpu") -> tuple[SupConModel, dict]:
    """Rebuild the model a stage-03 checkpoint was trained with and load its weights.

    Returns ``(model.eval(), ckpt)``; ``ckpt`` is the checkpoint dict (``classes``, ``stats``,
    ``config``, ``epoch``, ``preprocessing``...) plus ``sha256``, the file's hash. What the network
    saw is ``checkpoint_preprocessing(ckpt, path)``.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {p} is missing: run 03_main_supcon.py (it writes checkpoints/last.pt and best.pt)")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything unreadable is "not a checkpoint"
        raise UserError(f"{p} is not a readable checkpoint ({e.__class__.__name__}): rerun 03_main_supcon.py") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), Mapping) or not isinstance(ckpt.get("config"), Mapping):
        raise UserError(f"{p} is not a 03_main_supcon.py checkpoint (no model weights and config in it)")
    if ckpt.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise UserError(f"{p} has checkpoint format {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    mc = model_config_from(ckpt["config"].get("model"))
    mc.grad_checkpointing = False  # inference never needs it
    model = build_model(mc)
    sd = {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in ckpt["model"].items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise _mismatch_error(p, f"model {mc.backbone}", missing, unexpected, shapes)
    model.load_state_dict(sd, strict=True)
    ckpt["sha256"] = sha256_file(p)
    return model.eval(), ckpt
