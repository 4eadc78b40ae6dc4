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

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import ModelConfig
from ..errors import UserError
from .pretrained import load_pretrained

log = logging.getLogger(__name__)


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
