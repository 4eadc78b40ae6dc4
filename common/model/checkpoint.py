"""The checkpoint file: its format, atomic save, load, and the checks of its classes and preprocessing."""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..config.schema import ModelConfig
from ..data.transforms import Preprocessing
from ..errors import UserError
from ..fileio import atomic_path, sha256_file
from .network import SupConModel, build_model
from .pretrained import _mismatch_error

STAGE03 = "03_main_supcon"


# ----------------------------------------------------------------------------- embedding


def check_classes(ckpt_classes: Sequence[str], split_classes: Sequence[str], checkpoint: Path, splits_csv: Path) -> None:
    """The checkpoint's class list must equal the splits' (same names, same order)."""
    a, b = list(ckpt_classes), list(split_classes)
    if a == b:
        return
    only_ck = sorted(set(a) - set(b))
    only_sp = sorted(set(b) - set(a))
    detail = (f"only in the checkpoint: {only_ck[:5]}{'...' if len(only_ck) > 5 else ''}; "
              f"only in the splits: {only_sp[:5]}{'...' if len(only_sp) > 5 else ''}") if (only_ck or only_sp) \
        else "same names in another order"
    raise UserError(f"checkpoint {checkpoint} has {len(a)} classes but {splits_csv} has {len(b)} ({detail}): "
                    f"rerun {STAGE03}.py on these splits or choose another extract.checkpoint")

CHECKPOINT_FORMAT = "plankton-supcon/1"


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


def save_checkpoint(path: Path, obj: dict) -> None:
    """``torch.save`` to a temporary file renamed onto ``path``: a crash never leaves a torn file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def copy_checkpoint(src: Path, dst: Path) -> None:
    """``dst`` = ``src``: a hard link when possible (no copy; last.pt is replaced, not rewritten)."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
