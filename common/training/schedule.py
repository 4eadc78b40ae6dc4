"""The learning-rate schedule: linear scaling with the batch, warm-up, cosine decay."""
from __future__ import annotations

import math

from ..config.schema import TrainConfig

# ----------------------------------------------------------------------------- learning rate


def base_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """``train.learning_rate``, times global batch / 256 when ``train.scale_lr`` (Goyal et al. 2017)."""
    lr = float(cfg.learning_rate)
    if cfg.scale_lr:
        lr *= cfg.batch_size * world_size / 256.0
    return lr


def _decayed_lr(epoch: int, cfg: TrainConfig, lr: float) -> float:
    """SupContrast ``util.adjust_learning_rate`` for 1-based ``epoch`` (set at the epoch's start)."""
    if cfg.cosine:
        eta_min = lr * cfg.lr_decay_rate ** 3
        return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2
    steps = sum(1 for d in cfg.lr_decay_epochs if epoch > d)
    return lr * cfg.lr_decay_rate ** steps if steps > 0 else lr


def lr_at(epoch: int, step_in_epoch: int, steps_per_epoch: int, cfg: TrainConfig, world_size: int = 1) -> float:
    """Learning rate of step ``step_in_epoch`` (0-based) of ``epoch`` (1-based), as SupContrast.

    Cosine: ``eta_min + (lr - eta_min) * (1 + cos(pi * epoch / epochs)) / 2`` with
    ``eta_min = lr * lr_decay_rate**3``; step: ``lr * rate**(number of lr_decay_epochs < epoch)``.
    Warm-up (``util.warmup_learning_rate``) for ``epoch <= warm_epochs``: linear per iteration from
    ``warmup_from`` to ``warmup_to``, the decayed value at ``warm_epochs`` (cosine) or ``lr`` (step),
    ``p = (step + (epoch - 1) * steps_per_epoch) / (warm_epochs * steps_per_epoch)``.
    A pure function of the position, so a resumed run continues on the same curve.
    """
    lr = base_lr(cfg, world_size)
    if cfg.warm and cfg.warm_epochs > 0 and epoch <= cfg.warm_epochs:
        warmup_to = _decayed_lr(cfg.warm_epochs, cfg, lr) if cfg.cosine else lr
        p = (step_in_epoch + (epoch - 1) * steps_per_epoch) / (cfg.warm_epochs * steps_per_epoch)
        return cfg.warmup_from + p * (warmup_to - cfg.warmup_from)
    return _decayed_lr(epoch, cfg, lr)
