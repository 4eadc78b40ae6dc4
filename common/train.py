"""Stage 03: Supervised Contrastive training of the backbone, built to survive days-long runs.

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
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import distributed as D
from .augment import TwoViews, denormalize
from .config import Config, TrainConfig
from .data import ImageListDataset, eval_transform, load_rgb, worker_errors
from .device import tf32
from .embed import AMP_DTYPES, embed_batch
from .errors import NonFiniteLossError
from .signals import DeferSignals
from .fileio import atomic_path, write_csv
from .model import CHECKPOINT_FORMAT, SupConModel

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "step", "loss", "lr", "images_per_s", "epoch_time_s", "eta_s",
                  "val_top1", "val_knn", "val_macro_f1")
AUG_PREVIEW_IMAGES = 6  # training images shown (each with its two views) in augmentations.png
EVAL_BATCH_FACTOR = 2  # k-NN evaluation batch = this x train.batch_size (no activations kept for backward)


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


# ----------------------------------------------------------------------------- data


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's two views at one epoch (independent of workers and resume)."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, index])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & 0x7FFFFFFFFFFFFFFF)


class TwoViewDataset(torch.utils.data.Dataset):
    """Training images as two augmented views: key ``(epoch, index)`` -> ``((2, 3, S, S), label, index)``.

    The views of an image at an epoch are drawn from torch's generator seeded by
    ``sample_seed(seed, epoch, index)`` inside ``fork_rng`` (the caller's generator is left alone).
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], views: TwoViews, seed: int):
        self.paths = [str(p) for p in paths]
        self.labels = [int(x) for x in labels]
        self.views = views
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def views_of(self, epoch: int, index: int, img: Any = None) -> torch.Tensor:
        """The two views ``(2, 3, S, S)`` of image ``index`` at ``epoch``."""
        img = load_rgb(self.paths[index]) if img is None else img
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return torch.stack(self.views(img))

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        epoch, index = key
        return self.views_of(epoch, index), self.labels[index], index


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's batches of ``(epoch, index)`` keys; the order is a function of (seed, epoch).

    Global step ``s`` of an epoch takes positions ``[s*B*W, (s+1)*B*W)`` of the epoch's permutation
    (``torch.randperm`` seeded with ``seed + epoch``, as ``DistributedSampler``); rank ``r`` takes
    its ``B`` consecutive positions, so the global batch is the same whatever ``W``. The tail that
    does not fill a global batch is dropped (equal batch sizes everywhere), and ``start_step``
    skips the steps already done (resume).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 max_steps: int | None = None):
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        full = self.n // (self.batch_size * self.world_size)
        self.steps_per_epoch = min(full, max_steps) if max_steps else full
        self.epoch, self.start_step = 1, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = int(epoch), int(start_step)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.permutation(self.epoch).tolist()
        gb = self.batch_size * self.world_size
        for s in range(self.start_step, self.steps_per_epoch):
            lo = s * gb + self.rank * self.batch_size
            yield [(self.epoch, i) for i in perm[lo:lo + self.batch_size]]


# ----------------------------------------------------------------------------- signals


# ----------------------------------------------------------------------------- RNG states


# ----------------------------------------------------------------------------- the training step


def make_criterion(cfg: TrainConfig) -> torch.nn.Module:
    """The SupCon loss of ``common.losses`` with the configured temperatures and anchor mode."""
    from .losses import SupConLoss

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
        if self.tcfg.sync_bn and D.is_distributed():
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
        if D.is_distributed():
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
            feats, labels = D.global_batch(feats, labels)  # (W*B, 2, D): the loss sees the global batch
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
        all_idx = D.gather_nograd(idx.to(self.device)).cpu().tolist()
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
        for x, y, idx in D.agreed(batches):  # an unreadable image on one rank stops every rank at once
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


# ----------------------------------------------------------------------------- evaluation


def embed(model: SupConModel, loader: Iterable, device: torch.device, amp: str, channels_last: bool) -> torch.Tensor:
    """L2-normalised backbone features ``(N, dim_in)`` float32 of every batch of ``loader`` (CPU)."""
    out = [embed_batch(model, x, "encoder", amp, device, channels_last).cpu() for x, _, _ in loader]
    return torch.cat(out) if out else torch.zeros((0, model.dim_in))


def knn_metrics(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                n_classes: int, k: int, temperature: float, device: torch.device | None = None) -> dict[str, float]:
    """Retrieval of ``val`` in ``train``: top-1 accuracy, weighted k-NN accuracy, top-1 macro-F1."""
    from sklearn.metrics import f1_score

    from .retrieval import knn_vote, topk

    k = max(1, min(k, train_x.shape[0]))
    sims, idx = topk(val_x, train_x, k, device=device)
    sims, idx = torch.as_tensor(sims).cpu(), torch.as_tensor(idx).cpu()
    top1 = train_y[idx[:, 0]]
    pred, _ = knn_vote(sims, idx, train_y, n_classes, temperature)
    pred = torch.as_tensor(pred).cpu()
    y = val_y.numpy()
    return {"val_top1": float((top1 == val_y).float().mean()),
            "val_knn": float((pred == val_y).float().mean()),
            "val_macro_f1": float(f1_score(y, top1.numpy(), average="macro", zero_division=0))}


class Evaluator:
    """k-NN validation on backbone features: train split = gallery, val split = queries.

    Every rank embeds the rows ``rank::world`` of each split; the shards are reassembled on every
    rank (``gather_strided``) and the metrics computed there.
    """

    def __init__(self, cfg: Config, train_paths: Sequence[str], train_labels: Sequence[int],
                 val_paths: Sequence[str], val_labels: Sequence[int], n_classes: int, stats: dict,
                 device: torch.device, rank: int = 0, world_size: int = 1):
        self.cfg, self.device, self.n_classes = cfg, device, n_classes
        self.rank, self.world_size = rank, world_size
        tf = eval_transform(cfg.model.image_size, stats["mean"], stats["std"], cfg.data.pad_fill)
        self.sets = {}
        for name, paths, labels in (("train", train_paths, train_labels), ("val", val_paths, val_labels)):
            ds = ImageListDataset(list(paths)[rank::world_size], list(labels)[rank::world_size], tf)
            self.sets[name] = (ds, len(paths), torch.as_tensor(list(labels), dtype=torch.long))

    @property
    def enabled(self) -> bool:
        return self.sets["val"][1] > 0 and self.sets["train"][1] > 0

    def _loader(self, ds: ImageListDataset) -> torch.utils.data.DataLoader:
        g = torch.Generator()
        g.manual_seed(self.cfg.run.seed)  # the loader's own generator: evaluation never moves the global RNG
        from .seed import worker_init_fn

        w = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(ds, batch_size=self.cfg.train.batch_size * EVAL_BATCH_FACTOR, shuffle=False,
                                           num_workers=w, pin_memory=self.device.type == "cuda",
                                           worker_init_fn=worker_init_fn if w > 0 else None, generator=g)

    def __call__(self, model: SupConModel) -> dict[str, float]:
        was_training = model.training
        D.broadcast_buffers(model)  # every rank embeds with rank 0's batch-norm statistics
        model.eval()
        cl = self.device.type == "cuda" and self.cfg.model.channels_last
        feats = {}
        try:
            for name, (ds, n, _) in self.sets.items():
                with D.go_no_go(), worker_errors():  # a rank's unreadable image stops every rank
                    local = embed(model, self._loader(ds), self.device, self.cfg.train.amp, cl)
                feats[name] = D.gather_strided(local.to(self.device), n).cpu()
        finally:
            model.train(was_training)
        t = self.cfg.train
        return knn_metrics(feats["train"], self.sets["train"][2], feats["val"], self.sets["val"][2], self.n_classes,
                           t.eval_knn_k, t.temperature, device=self.device)


# ----------------------------------------------------------------------------- files


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def write_metrics_csv(path: Path, rows: Sequence[dict]) -> None:
    """``metrics.csv`` rewritten atomically from all rows (append-safe across resume)."""
    write_csv(path, METRIC_COLUMNS, ([_fmt(r.get(c)) for c in METRIC_COLUMNS] for r in rows))


def augmentation_preview(ds: TwoViewDataset, indices: Sequence[int], cfg: Config, stats: dict,
                         classes: Sequence[str], epoch: int = 1) -> list[tuple[str, list[np.ndarray]]]:
    """For ``augmentations.png``: each image (padded, resized) and the two views the network gets at ``epoch``."""
    tf = eval_transform(cfg.model.image_size, stats["mean"], stats["std"], cfg.data.pad_fill)
    rows = []
    for i in indices:
        img = load_rgb(ds.paths[i])
        pics = [tf(img), *ds.views_of(epoch, i, img)]
        rows.append((classes[ds.labels[i]],
                     [denormalize(p, stats["mean"], stats["std"]).permute(1, 2, 0).numpy() for p in pics]))
    return rows


def preview_indices(labels: Sequence[int], n: int) -> list[int]:
    """Up to ``n`` image indices, one per class in turn (the first image of each class first)."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    out: list[int] = []
    depth = 0
    while len(out) < min(n, len(labels)):
        for idx in by_class.values():
            if depth < len(idx) and len(out) < n:
                out.append(idx[depth])
        depth += 1
    return out


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


def duration(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


# ----------------------------------------------------------------------------- the stage
