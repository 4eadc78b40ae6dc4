"""The SupCon training loop: one atomic step, the epoch, AMP and channels_last on CUDA, non-finite loss
stops.

The recipe is the reference SupContrast ``main_supcon.py`` (Khosla et al. 2020): two augmented
views per image, SGD with momentum, cosine (or step) learning-rate decay with a linear warm-up
per iteration, SupCon loss on the L2-normalised projection head. Around it:

- **Exact resume.** ``checkpoints/last.pt`` is written atomically every epoch and on Ctrl-C /
  SIGTERM (mid-epoch position included). The data a step sees is a pure function of
  (run.seed, epoch, step): the per-epoch shuffle is seeded by (seed, epoch), and each image's two
  views by (seed, epoch, image index), whatever the number of DataLoader workers. A rerun therefore
  skips the batches already done and continues with the same learning rate, data and views:
  the same weights bit for bit on a CPU; on CUDA up to kernels that are not deterministic
  (``run.deterministic`` asks PyTorch for deterministic ones and names the others in a warning).
  A whole training step (forward, backward, update) is a critical section: SIGINT/SIGTERM are
  delivered after it, so a saved position never sits half-way through a step.
- **Model selection** every ``train.eval_every`` epochs: k-NN retrieval of the validation split
  against the training split on the backbone features (what stages 04-07 use); ``best.pt`` keeps
  the best val macro-F1 (tie: top-1 accuracy). The untrained network is evaluated too (epoch 0).
- **Non-finite loss** stops the run (DINO's habit), saving the model and the offending batch.
- **Multi-GPU** with torchrun: DDP, per-rank slices of every global batch, SupCon on the
  gathered global batch (``common.distributed``), rank 0 writes everything. Batch norm uses each
  GPU's share unless ``train.sync_bn`` (``SyncBatchNorm``, CUDA); an unreadable image on one rank
  stops every rank at that step (``distributed.agreed``).
- **TF32** (CUDA) only inside the training step (``device.tf32``): model selection ranks in float32.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..config.schema import Config, TrainConfig
from ..errors import NonFiniteLossError
from ..fileio import atomic_path
from ..model.checkpoint import CHECKPOINT_FORMAT
from ..model.embed import AMP_DTYPES
from ..model.network import SupConModel
from ..runtime.device import tf32
from ..runtime.distributed import agreed, gather_nograd, global_batch, is_distributed
from ..runtime.signals import DeferSignals
from .schedule import lr_at

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- signals


# ----------------------------------------------------------------------------- RNG states


# ----------------------------------------------------------------------------- the training step


def make_criterion(cfg: TrainConfig) -> torch.nn.Module:
    """The SupCon loss of ``common.losses`` with the configured temperatures and anchor mode."""
    from ..model.loss import SupConLoss

    return SupConLoss(temperature=cfg.temperature, base_temperature=cfg.base_temperature,
                      contrast_mode=cfg.contrast_mode)


@dataclass
class Position:
    """Where training stands: ``epoch`` (1-based) in progress, steps done in it, and its running sums.

    ``step_in_epoch == steps_per_epoch`` means the epoch's steps are done but not its end
    (evaluation, checkpoints); a finished epoch moves the position to ``(epoch + 1, 0)``.
    """

    epoch: int = 1
    step_in_epoch: int = 0
    steps_per_epoch: int = 0
    loss_sum: float = 0.0
    train_time_s: float = 0.0
    lr: float = 0.0


@dataclass
class EpochResult:
    loss: float
    lr: float
    images_per_s: float
    train_time_s: float
    steps: int


class Trainer:
    """Model, optimizer, loss and AMP handling for SupCon training; one step at a time.

    ``model`` is the plain ``SupConModel`` (moved to ``device`` here). Under torchrun (a process
    group initialised, ``world_size > 1``) it is wrapped in DDP and the loss sees the global batch.
    """

    def __init__(self, model: SupConModel, cfg: Config, device: torch.device, *, rank: int = 0,
                 world_size: int = 1, train_paths: Sequence[str] | None = None,
                 checkpoint_dir: Path | None = None):
        self.cfg, self.tcfg = cfg, cfg.train
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.rank, self.world_size = rank, world_size
        self.train_paths = list(train_paths or [])
        self.checkpoint_dir = checkpoint_dir
        self.channels_last = self.cuda and cfg.model.channels_last
        self.raw = model.to(self.device)
        if self.channels_last:
            self.raw = self.raw.to(memory_format=torch.channels_last)
        if self.tcfg.sync_bn and is_distributed():
            if self.cuda:  # batch-norm statistics over the global batch, not each GPU's share
                self.raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.raw)
            elif rank == 0:
                log.warning("train.sync_bn applies to CUDA only (PyTorch's SyncBatchNorm): batch-norm statistics "
                            "stay per process here")
        self.amp_dtype = AMP_DTYPES.get(self.tcfg.amp) if self.cuda else None
        if self.cuda:
            torch.backends.cudnn.benchmark = not cfg.run.deterministic
            torch.backends.cudnn.deterministic = bool(cfg.run.deterministic)
            if cfg.run.deterministic:  # deterministic kernels where PyTorch has them; the others are named in a warning
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
                torch.use_deterministic_algorithms(True, warn_only=True)
            # TF32 only inside the training step (``device.tf32``): k-NN model selection ranks in float32
        # SGD as the reference: momentum and weight decay on every parameter.
        self.optimizer = torch.optim.SGD(self.raw.parameters(), lr=lr_at(1, 0, 1, self.tcfg, world_size),
                                         momentum=self.tcfg.momentum, weight_decay=self.tcfg.weight_decay)
        # fp16 needs loss scaling; bf16 has float32's range and does not.
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None
        self.criterion = make_criterion(self.tcfg)
        net: torch.nn.Module = self.raw
        if is_distributed():
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(self.raw, device_ids=[self.device.index] if self.cuda else None,
                      static_graph=bool(cfg.model.grad_checkpointing))
        if self.tcfg.compile and self.cuda:
            net = torch.compile(net)
        self.net = net
        self.position = Position()
        self.global_step = 0

    # -- state

    def state(self) -> dict[str, Any]:
        """Model, optimizer, scaler and position (parts of the checkpoint)."""
        return {"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "scheduler": asdict(self.position), "step": self.global_step}

    def load_state(self, ckpt: dict[str, Any]) -> None:
        self.raw.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.position = Position(**{k: v for k, v in (ckpt.get("scheduler") or {}).items()
                                    if k in Position.__dataclass_fields__})
        self.global_step = int(ckpt.get("step", 0))

    # -- one step

    def _set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, lr: float) -> float:
        """One SupCon update on a batch ``x (B, 2, 3, S, S)``, labels ``y (B,)``; returns the loss.

        Raises ``NonFiniteLossError`` (before updating the weights) when the loss is NaN or inf.
        """
        B = x.shape[0]
        x = x.to(self.device, non_blocking=self.cuda).flatten(0, 1)  # (2B, 3, S, S): views of image i at 2i, 2i+1
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self._set_lr(lr)
        with tf32(self.cuda):  # forward and backward in TF32 on CUDA; restored before anything ranks
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                z = self.net(x)  # (2B, D) float32, L2-normalised
            feats = z.view(B, 2, -1)  # (B, V=2, D)
            labels = y.to(self.device, non_blocking=self.cuda) if self.tcfg.method == "supcon" else None
            feats, labels = global_batch(feats, labels)  # (W*B, 2, D): the loss sees the global batch
            loss = self.criterion(feats, labels)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        value = float(loss.detach())  # one sync per step: the non-finite check and the log need it
        if not math.isfinite(value):
            self._non_finite(value, idx, y)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return value

    def _non_finite(self, value: float, idx: torch.Tensor, y: torch.Tensor) -> None:
        p = self.position
        all_idx = gather_nograd(idx.to(self.device)).cpu().tolist()
        where = f"epoch {p.epoch}, step {p.step_in_epoch + 1} of {p.steps_per_epoch} (global step {self.global_step + 1})"
        saved = ""
        if self.rank == 0 and self.checkpoint_dir is not None:
            path = self.checkpoint_dir / f"nonfinite_e{p.epoch:04d}_s{self.global_step + 1:07d}.pt"
            obj = {"format": CHECKPOINT_FORMAT, "model": self.raw.state_dict(), "epoch": p.epoch,
                   "step": self.global_step + 1, "loss": value, "lr": self.optimizer.param_groups[0]["lr"],
                   "batch_indices": all_idx,
                   "batch_paths": [self.train_paths[i] for i in all_idx] if self.train_paths else [],
                   "config": self.cfg.to_dict()}
            with atomic_path(path) as tmp:
                torch.save(obj, tmp)
            saved = f"; the model and the batch's image paths are in {path}"
        raise NonFiniteLossError(
            f"non-finite loss ({value}) at {where}{saved}: lower train.learning_rate, or set train.amp to "
            f"bf16 or off, then rerun (the run continues from last.pt)")

    # -- one epoch

    def train_one_epoch(self, batches: Iterable, epoch: int, steps_per_epoch: int, start_step: int = 0,
                        on_step: Callable[[int, int, int], None] | None = None, bar: Any = None) -> EpochResult:
        """Run the steps ``start_step..steps_per_epoch-1`` of ``epoch`` over ``batches``.

        ``batches`` yields ``(x (B, 2, 3, S, S), labels (B,), indices (B,))``. The position and its
        running loss sum are kept in ``self.position`` after every step (what last.pt saves on an
        interrupt); ``on_step(epoch, step_in_epoch, global_step)`` runs after each step.
        """
        p = self.position
        if p.epoch != epoch or p.step_in_epoch != start_step:
            self.position = p = Position(epoch=epoch, step_in_epoch=start_step, steps_per_epoch=steps_per_epoch)
        p.steps_per_epoch = steps_per_epoch
        self.raw.train()
        images = 0
        t0 = time.perf_counter()
        t_prev = 0.0
        for x, y, idx in agreed(batches):  # an unreadable image on one rank stops every rank at once
            if p.step_in_epoch >= steps_per_epoch:
                break
            lr = lr_at(epoch, p.step_in_epoch, steps_per_epoch, self.tcfg, self.world_size)
            with DeferSignals():  # a whole step or none of it: the saved position stays exact
                loss = self.step(x, y, idx, lr)
                p.loss_sum += loss
                p.lr = lr
                p.step_in_epoch += 1
                self.global_step += 1
                images += x.shape[0] * self.world_size
                now = time.perf_counter() - t0
                p.train_time_s += now - t_prev
                t_prev = now
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=False)
            if on_step is not None:
                on_step(epoch, p.step_in_epoch, self.global_step)
        elapsed = time.perf_counter() - t0
        done = p.step_in_epoch
        return EpochResult(loss=p.loss_sum / done if done else float("nan"), lr=p.lr,
                           images_per_s=images / elapsed if elapsed > 0 else 0.0,
                           train_time_s=p.train_time_s, steps=done - start_step)
