"""External weights: timm's pretrained weights, a local file, SupContrast's or this pipeline's
checkpoints."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from ..errors import UserError

if TYPE_CHECKING:
    from .network import SupConModel

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")
# Prefixes that wrap a backbone's own keys in training code: SupContrast ("encoder."), this
# pipeline and many others ("backbone."), DataParallel / DDP ("module.", stripped everywhere).
_BACKBONE_PREFIXES = ("encoder.", "backbone.")
# Classifier layers of ImageNet timm models (the name in pretrained_cfg["classifier"] wins).
_CLASSIFIER_NAMES = ("fc", "head.fc", "classifier", "last_linear", "head")
_SHOW_KEYS = 5  # keys listed per kind in a mismatch message


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
