"""Stage 03's driver: Supervised Contrastive training of the backbone, built to survive days-long runs.

The story: read the splits and stats and decide, read only, between a new training and
continuing ``checkpoints/last.pt`` (``check``); train epoch by epoch (k-NN model selection,
checkpoints, metrics, plots); record the outputs.

What a rerun does (nothing finished is ever destroyed):

- ``last.pt`` is continued only when it was trained with what this run would train with: the
  values of stage 03's keys (those of ``TRAIN_CONTINUE_KEYS`` aside), the mean/std of
  ``stats.json`` and ``splits.csv`` (the class list with it). An unfinished run continues exactly
  where it stopped, with or without ``--force``; a finished one continues when only
  ``TRAIN_CONTINUE_KEYS`` changed (raising ``train.epochs`` trains the epochs added);
- otherwise a new training starts: the present checkpoints, metrics, plots and TensorBoard files
  move to ``03_main_supcon/previous-<UTC time>/`` (as ``--force`` on a finished run and
  ``train.resume: false`` do), and one line names the keys or inputs that changed;
- a finished run whose ``best.pt`` or ``last.pt`` is missing or was edited, with nothing that
  asks for a new training, is refused with what to do; a checkpoint is never replaced silently.

Every checkpoint records the preprocessing it was trained with (``common.data.Preprocessing``:
mean/std, image size, pad fill, RGB); stages 04 and 07 embed with exactly that.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..config.schema import Config, ModelConfig, get_key
from ..config.values import diff_values, is_semantic, key_values
from ..data.augment import TwoViews, train_transform
from ..data.datasets import worker_errors
from ..data.labels import class_index
from ..data.splits import class_names, read_splits, rows_of
from ..data.stats import read_stats
from ..data.transforms import Preprocessing
from ..errors import UserError
from ..fileio import sha256_file, write_json
from ..model.checkpoint import CHECKPOINT_FORMAT, checkpoint_preprocessing, copy_checkpoint, save_checkpoint
from ..model.network import build_model
from ..pipeline.folders import unique_previous
from ..report.plots import plot_curves, plot_image_grid
from ..runtime.distributed import barrier, go_no_go
from ..runtime.seed import rng_state, set_rng_state
from ..runtime.signals import DeferSignals
from ..training.records import AUG_PREVIEW_IMAGES, augmentation_preview, duration, preview_indices, write_metrics_csv
from ..training.sampler import EpochBatchSampler, TwoViewDataset
from ..training.trainer import Position, Trainer
from ..training.validate import Evaluator
from . import SPECS, SPLIT, STATS, TRAIN, TRAIN_CONTINUE_KEYS
from .artefacts import CHECKPOINTS_DIR, SPLITS_CSV, STATS_JSON

if TYPE_CHECKING:
    from ..pipeline.context import Context

log = logging.getLogger(__name__)


# what a new training moves to previous-<UTC time>/ (with the manifest and a copy of log.txt)
RUN_FILES = (CHECKPOINTS_DIR, "metrics.csv", "loss_curve.png", "tensorboard", "augmentations.png")


def _move_aside(stage_dir: Path, why: str, manifest: dict | None = None) -> Path | None:
    """Start a new training: move the present checkpoints, metrics, plots and TensorBoard files to
    ``previous-<UTC time>/`` and say so in one line naming ``why``.

    Its ``manifest`` (the wrapper has already taken it out of the stage folder) and a copy of
    ``log.txt`` so far go with them. Never deletes: every earlier ``previous-*`` folder stays.
    """
    present = [n for n in RUN_FILES if (stage_dir / n).exists()]
    if not present:
        return None
    prev = unique_previous(stage_dir)
    prev.mkdir()
    for n in present:
        os.replace(stage_dir / n, prev / n)
    if manifest is not None:
        write_json(prev / "manifest.json", manifest)
    if (stage_dir / "log.txt").is_file():
        shutil.copyfile(stage_dir / "log.txt", prev / "log.txt")
    log.info("%s starts a new training (%s); the previous one (%s) is moved to %s", TRAIN, why, ", ".join(present),
             prev)
    return prev


def _declared(cfg: Config) -> dict[str, dict[str, Any]]:
    """The keys stage 03 declares, as ``{section: {key: value}}`` (what a checkpoint records)."""
    out: dict[str, dict[str, Any]] = {}
    for dotted in SPECS[TRAIN].keys:
        section, key = dotted.split(".")
        out.setdefault(section, {})[key] = get_key(cfg, dotted)
    return out


def restart_keys() -> tuple[str, ...]:
    """Stage 03's hashed keys whose change starts a new training: every semantic one but
    ``TRAIN_CONTINUE_KEYS`` (speed knobs such as ``data.num_workers`` never count)."""
    return tuple(k for k in SPECS[TRAIN].hashed_keys if is_semantic(k) and k not in TRAIN_CONTINUE_KEYS)


def preprocessing_of(cfg: Config, stats: dict) -> Preprocessing:
    """What the network sees under ``cfg`` and ``stats.json``: what a checkpoint of this run records."""
    return Preprocessing(tuple(stats["mean"]), tuple(stats["std"]), cfg.model.image_size, cfg.data.pad_fill)


def new_training_reasons(ckpt: dict, path: Path, cfg: Config, inp: Inputs) -> list[str]:
    """Why ``ckpt`` cannot be continued under ``cfg`` and these inputs (empty: it may be).

    Each reason is short: ``data.pad_fill: 0 -> 255``, ``02_mean_std_variables/stats.json``'s
    mean/std, ``01_random_split_dataset/splits.csv``, the class list, or ``train.epochs`` below
    the epochs already done. A key the checkpoint does not record (added to the tool since) counts
    at its default, what that version trained with.
    """
    stored = ckpt.get("config") or {}
    keys = restart_keys()
    defaults = key_values(Config(), keys)
    old = {k: (stored.get(k.split(".")[0]) or {}).get(k.split(".")[1], v) for k, v in defaults.items()}
    reasons = diff_values(old, key_values(cfg, keys))
    was, now = checkpoint_preprocessing(ckpt, path), preprocessing_of(cfg, inp.stats)
    if not Preprocessing(was.mean, was.std, now.image_size, now.pad_fill).same_as(now):  # size, fill: keys above
        reasons.append(f"{STATS}/{STATS_JSON}: mean/std {_rounded(was.mean)}/{_rounded(was.std)} -> "
                       f"{_rounded(now.mean)}/{_rounded(now.std)}")
    if ckpt.get("splits_sha256") not in (None, inp.splits_sha):
        # continuing on another split would train on former validation images (and select on them)
        reasons.append(f"{SPLIT}/{SPLITS_CSV} changed")
    elif list(ckpt.get("classes") or []) != list(inp.classes):
        reasons.append(f"the class list: {len(ckpt.get('classes') or [])} -> {len(inp.classes)} classes")
    done, epochs = int(ckpt.get("epoch", 0)), cfg.train.epochs
    if done > epochs:
        reasons.append(f"train.epochs={epochs} is below the {done} epochs {path.name} has done")
    return reasons


def _rounded(v: Any) -> list[float]:
    return [round(float(x), 4) for x in v]


@dataclass
class Inputs:
    """What stage 03 reads: the split rows, class list and normalisation statistics."""

    splits_csv: Path
    splits_sha: str
    classes: list[str]
    stats: dict
    train_paths: list[str]
    train_labels: list[int]
    val_paths: list[str]
    val_labels: list[int]


def read_inputs(ctx: Context) -> Inputs:
    splits_csv = Path(ctx.upstream(SPLIT)) / SPLITS_CSV
    rows = read_splits(splits_csv)
    classes = class_names(rows)
    train_rows, val_rows = rows_of(rows, "train"), rows_of(rows, "val")
    def labels(rows: list) -> list[int]:
        return class_index([r.label for r in rows], classes, lambda v: f"label {v!r} of {splits_csv} is not among the "
                           f"{len(classes)} known classes").tolist()

    return Inputs(splits_csv, sha256_file(splits_csv), classes, read_stats(Path(ctx.upstream(STATS)) / STATS_JSON),
                  [r.path for r in train_rows], labels(train_rows), [r.path for r in val_rows], labels(val_rows))


@dataclass
class Plan:
    """What stage 03 does with what its folder holds, decided read only by ``check``."""

    inputs: Inputs
    resume_from: dict | None = None  # the checkpoint (last.pt) to continue
    new_training: str | None = None  # why a new training starts (the present files then move aside)


def _read_last(ctx: Context, last: Path, hint: str) -> dict:
    """``last.pt``, refused with what to do when it cannot be read or is not a stage-03 checkpoint."""
    edited = ctx.previous is not None and ctx.changed_output
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file
        if edited:
            raise UserError(f"{ctx.dir / ctx.changed_output} of the finished training is missing or was edited: "
                            f"restore it, or train again with {hint} (the present checkpoints are then kept in "
                            f"{ctx.dir.name}/previous-<UTC time>/)") from None
        raise UserError(f"cannot read {last} to resume ({e.__class__.__name__}): set train.resume=false to start "
                        "again (the checkpoints are kept in previous-<UTC time>/)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{last} is not a 03_main_supcon.py checkpoint: set train.resume=false to start a new "
                        "training (this one is kept in previous-<UTC time>/)")
    return ckpt


def decide(ctx: Context, inp: Inputs) -> Plan:
    """A new training or continuing ``last.pt`` (read only; ``UserError`` when neither may be done).

    ``--force`` on a finished run and ``train.resume=false`` start a new training; so does a
    ``last.pt`` trained with something else (``new_training_reasons``). A finished run whose
    checkpoint is missing or edited is refused; an unfinished one continues.
    """
    ck_dir = ctx.dir / CHECKPOINTS_DIR
    last = ck_dir / "last.pt"
    hint = f"`python 03_main_supcon.py --run {ctx.run_dir} --force`"
    if ctx.previous is not None and ctx.force:
        return Plan(inp, new_training="--force on a finished training")
    if not ctx.cfg.train.resume:
        return Plan(inp, new_training="train.resume is false")
    ckpt = _read_last(ctx, last, hint) if last.is_file() else None
    if ckpt is not None:
        reasons = new_training_reasons(ckpt, last, ctx.cfg, inp)
        if reasons:
            return Plan(inp, new_training="; ".join(reasons))
    if ctx.previous is not None and ctx.changed_output:
        raise UserError(f"{ctx.dir / ctx.changed_output} of the finished training is missing or was edited: restore "
                        f"it, or train again with {hint} (the present checkpoints are then kept in "
                        f"{ctx.dir.name}/previous-<UTC time>/)")
    if ckpt is None:
        return Plan(inp)
    best = dict(ckpt.get("best") or {})
    if best and not (ck_dir / "best.pt").exists():
        raise UserError(f"{ck_dir / 'best.pt'} (epoch {best.get('epoch')}, recorded in {last}) is missing: restore "
                        "it, or set train.resume=false to train again (the checkpoints are kept in "
                        "previous-<UTC time>/)")
    if ctx.force:
        log.info("--force: the training has not finished, so it continues from %s (--force never throws away "
                 "progress; train.resume=false starts again and keeps these checkpoints in previous-<UTC time>/)",
                 last)
    return Plan(inp, resume_from=ckpt)


def check(ctx: Context) -> None:
    """Read the inputs and decide between a new training and continuing (``decide``), before anything
    is written; ``main`` follows the plan (``ctx.checked["plan"]``)."""
    ctx.checked["plan"] = decide(ctx, read_inputs(ctx))


def main(ctx: Context, on_step: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
    """Stage 03: follow ``check``'s plan (start or continue), train epoch by epoch, record the outputs.

    ``on_step(epoch, step_in_epoch, global_step)`` is called after every step (tests use it to
    simulate an interruption). On the CPU, denormal floats are flushed to zero while training:
    tiny weights and gradients otherwise slow convolutions and batch norm down 10-20 times.
    """
    flush = ctx.device().type == "cpu" and torch.set_flush_denormal(True)
    try:
        training = Training(ctx, ctx.checked["plan"], on_step)
        training.start_or_resume()
        training.open_logs()
        try:
            training.train()
        finally:
            training.close_logs()
        return training.finish()
    finally:
        if flush:
            torch.set_flush_denormal(False)


class Training:
    """State that outlives one step of stage 03's story: data, trainer, evaluator, logs, history."""

    def __init__(self, ctx: Context, plan: Plan, on_step: Callable[[int, int, int], None] | None):
        from ..runtime.seed import worker_init_fn

        self.ctx, self.cfg, self.t, self.on_step = ctx, ctx.cfg, ctx.cfg.train, on_step
        self.plan = plan
        self.rank, self.world = int(ctx.rank), int(ctx.world_size)
        self.is_main = self.rank == 0
        self.device = ctx.device()
        self.dir = Path(ctx.dir)
        self.ck_dir = self.dir / CHECKPOINTS_DIR
        self.last = self.ck_dir / "last.pt"
        self.inp = plan.inputs
        cfg, t, inp = self.cfg, self.t, self.inp
        self.ds = TwoViewDataset(inp.train_paths, inp.train_labels,
                                 TwoViews(train_transform(cfg, inp.stats["mean"], inp.stats["std"])), cfg.run.seed)
        self.sampler = EpochBatchSampler(len(self.ds), t.batch_size, cfg.run.seed, self.rank, self.world,
                                         t.max_steps_per_epoch)
        if self.sampler.steps_per_epoch < 1:
            raise UserError(f"train.batch_size: {t.batch_size} x {self.world} process(es) is more than the "
                            f"{len(self.ds)} training images of {inp.splits_csv} (batches are kept equal): lower "
                            "train.batch_size")
        self.steps = self.sampler.steps_per_epoch
        g = torch.Generator()
        g.manual_seed(cfg.run.seed)
        nw = cfg.data.num_workers
        self.loader = torch.utils.data.DataLoader(
            self.ds, batch_sampler=self.sampler, num_workers=nw, pin_memory=self.device.type == "cuda",
            persistent_workers=nw > 0, worker_init_fn=worker_init_fn if nw > 0 else None, generator=g)
        self.rows: list[dict] = []  # metrics.csv rows (epoch 0 = the untrained network)
        self.best: dict = {}  # {"epoch", "val_macro_f1", "val_top1"}
        self.ckpt: dict | None = None  # the checkpoint resumed from
        self.writer: Any = None

    # -- start

    def start_or_resume(self) -> None:
        """Build the model; continue from last.pt or start a new training (the present one moved aside),
        as ``check`` planned."""
        cfg, t, plan = self.cfg, self.t, self.plan
        barrier()  # every rank has planned (read last.pt) before rank 0 moves anything
        with go_no_go():  # a failure of rank 0 moving the old training aside stops every rank at once
            if self.is_main and plan.new_training is not None:
                _move_aside(self.dir, plan.new_training, self.ctx.previous)
        self.ckpt = plan.resume_from
        mcfg = cfg.model
        if self.ckpt is not None and mcfg.pretrained.lower() != "none":
            mcfg = ModelConfig(**{**asdict(mcfg), "pretrained": "none"})  # weights come from last.pt: never download
        self.trainer = Trainer(build_model(mcfg), cfg, self.device, rank=self.rank, world_size=self.world,
                               train_paths=self.inp.train_paths, checkpoint_dir=self.ck_dir if self.is_main else None)
        with go_no_go():  # rank 0 alone checks best.pt
            if self.ckpt is not None:
                self._resume(self.ckpt)
            else:
                self.trainer.position = Position(epoch=1, steps_per_epoch=self.steps)
        inp = self.inp
        log.info("training %s (%s head, %d-d) with %s on %d classes, %d train / %d val images; %d step(s) of %d x %d "
                 "images per epoch, %d epochs, device %s%s", cfg.model.backbone, cfg.model.head, cfg.model.feat_dim,
                 t.method, len(inp.classes), len(inp.train_paths), len(inp.val_paths), self.steps, t.batch_size,
                 self.world, t.epochs, self.device,
                 f", AMP {t.amp}" if self.trainer.amp_dtype is not None else "")
        self.evaluator = Evaluator(cfg, inp.train_paths, inp.train_labels, inp.val_paths, inp.val_labels,
                                   len(inp.classes), inp.stats, self.device, self.rank, self.world)
        if t.eval_every > 0 and not self.evaluator.enabled:
            log.warning("no validation images: k-NN model selection is off and best.pt is the last epoch")
        self.do_eval = t.eval_every > 0 and self.evaluator.enabled

    def _resume(self, ckpt: dict) -> None:
        trainer, t = self.trainer, self.t
        trainer.load_state(ckpt)
        set_rng_state(ckpt.get("rng") or {})
        self.rows, self.best = list(ckpt.get("metrics") or []), dict(ckpt.get("best") or {})
        stored = ckpt.get("config") or {}
        changed = diff_values({k: (stored.get(k.split(".")[0]) or {}).get(k.split(".")[1], "(unset)")
                               for k in TRAIN_CONTINUE_KEYS}, key_values(self.cfg, TRAIN_CONTINUE_KEYS))
        if changed:
            log.info("continuing %s with %s (keys that may change while a training continues)", self.last,
                     "; ".join(changed))
        p = trainer.position
        if p.steps_per_epoch != self.steps and 0 < p.step_in_epoch:
            log.warning("steps per epoch changed (%d -> %d): epoch %d restarts from its first batch",
                        p.steps_per_epoch, self.steps, p.epoch)
            trainer.position = Position(epoch=p.epoch, steps_per_epoch=self.steps)
        p = trainer.position
        what = (f"epoch {p.epoch}, skipping its {p.step_in_epoch} batches already done" if p.step_in_epoch
                else f"the start of epoch {p.epoch}")
        log.info("resuming from %s (epoch %d done, global step %d): continuing at %s", self.last,
                 int(ckpt.get("epoch", 0)), trainer.global_step, what)
        if int(ckpt.get("epoch", 0)) >= t.epochs:
            log.info("%s already completed the %d epochs of train.epochs: nothing to train; use --force to train "
                     "from scratch, or raise train.epochs", self.last, t.epochs)

    def open_logs(self) -> None:
        """augmentations.png (a new training's; a continued one keeps it: the same views) and the
        TensorBoard writer (rank 0)."""
        if not self.is_main:
            return
        self.ck_dir.mkdir(parents=True, exist_ok=True)
        if self.ckpt is None or not (self.dir / "augmentations.png").is_file():
            preview = preview_indices(self.ds.labels, AUG_PREVIEW_IMAGES)
            plot_image_grid(self.dir / "augmentations.png",
                            augmentation_preview(self.ds, preview, self.cfg, self.inp.stats, self.inp.classes),
                            ("image", "view 1", "view 2"), "What the network sees (epoch 1)")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=self.trainer.position.epoch)

    def close_logs(self) -> None:
        if self.writer is not None:
            self.writer.close()

    # -- epochs

    def checkpoint(self, completed: int) -> dict:
        """Everything a resume needs, as plain tensors and lists (``torch.load(weights_only=True)``)."""
        inp = self.inp
        return {"format": CHECKPOINT_FORMAT, **self.trainer.state(), "epoch": completed, "rng": rng_state(),
                "config": _declared(self.cfg), "classes": inp.classes, "stats": inp.stats,
                "preprocessing": preprocessing_of(self.cfg, inp.stats).as_dict(), "metrics": self.rows,
                "best": self.best, "world_size": self.world, "splits_sha256": inp.splits_sha}

    def train(self) -> None:
        """Every epoch left; on Ctrl-C / SIGTERM last.pt is saved at the exact step before stopping."""
        try:
            if self.ckpt is None and self.do_eval:  # the untrained network, so a user sees that learning happened
                m0 = self.evaluator(self.trainer.raw)
                self.rows.append({"epoch": 0, "step": 0, **m0})
                log.info("untrained network: val top-1 %.4f, k-NN %.4f, macro-F1 %.4f",
                         m0["val_top1"], m0["val_knn"], m0["val_macro_f1"])
                self._scalars({f"val/{k[4:]}": v for k, v in m0.items()}, 0)
            epoch_times: list[float] = []
            while self.trainer.position.epoch <= self.t.epochs:
                t0 = time.perf_counter()
                row, improved = self.one_epoch()
                epoch_times.append(time.perf_counter() - t0)
                row["epoch_time_s"] = epoch_times[-1]
                row["eta_s"] = float(np.mean(epoch_times)) * (self.t.epochs - row["epoch"])
                with go_no_go():  # rank 0 writes the checkpoints: its error (a full disk) stops every rank
                    self.end_epoch(row, improved)
        except KeyboardInterrupt:
            p = self.trainer.position
            if self.is_main and p.epoch <= self.t.epochs:
                save_checkpoint(self.last, self.checkpoint(p.epoch - 1))
                log.warning("interrupted at epoch %d, step %d/%d: saved %s; run `python 03_main_supcon.py --run %s` "
                            "to continue", p.epoch, p.step_in_epoch, p.steps_per_epoch, self.last, self.ctx.run_dir)
            raise

    def one_epoch(self) -> tuple[dict[str, Any], bool]:
        """Train the epoch in progress (from its first step not done) and evaluate it when due."""
        from ..runtime.progress import progress

        t, p = self.t, self.trainer.position
        epoch, start = p.epoch, p.step_in_epoch
        self.sampler.set_epoch(epoch, start)
        # a terminal: a tqdm bar of steps; none (nohup, a file): a log line of images/s and ETA every ~30 s
        bar = progress(self.steps, f"epoch {epoch}/{t.epochs}", unit="it", initial=start, enabled=self.is_main,
                       scale=t.batch_size * self.world, log_unit="img", leave=False, dynamic_ncols=True)
        try:
            with worker_errors():
                res = self.trainer.train_one_epoch(self.loader, epoch, self.steps, start, on_step=self.on_step,
                                                   bar=bar)
        finally:
            bar.close()
        row: dict[str, Any] = {"epoch": epoch, "step": self.trainer.global_step, "loss": res.loss, "lr": res.lr,
                               "images_per_s": (self.steps * t.batch_size * self.world) / res.train_time_s
                               if res.train_time_s > 0 else None}
        improved = False
        if self.do_eval and (epoch % t.eval_every == 0 or epoch == t.epochs):
            m = self.evaluator(self.trainer.raw)
            row.update(m)
            key = (m["val_macro_f1"], m["val_top1"])
            improved = not self.best or key > (self.best["val_macro_f1"], self.best["val_top1"])
        return row, improved

    def end_epoch(self, row: dict[str, Any], improved: bool) -> None:
        """Record the epoch: history, best, position and checkpoints change together; then logs and plots."""
        t, epoch = self.t, row["epoch"]
        last_epoch = epoch == t.epochs
        with DeferSignals():  # the epoch's end is atomic too
            self.rows.append(row)
            if improved:
                self.best = {"epoch": epoch, "val_macro_f1": row["val_macro_f1"], "val_top1": row["val_top1"]}
            self.trainer.position = Position(epoch=epoch + 1, steps_per_epoch=self.steps)
            if self.is_main:
                save_checkpoint(self.last, self.checkpoint(epoch))
                if improved or (not self.do_eval and last_epoch):
                    copy_checkpoint(self.last, self.ck_dir / "best.pt")
                if epoch % t.save_freq == 0:
                    copy_checkpoint(self.last, self.ck_dir / f"epoch_{epoch:04d}.pt")
        if self.is_main:
            write_metrics_csv(self.dir / "metrics.csv", self.rows)
            if "val_top1" in row or last_epoch or epoch % t.save_freq == 0:  # a plot costs ~0.3 s
                plot_curves(self.dir / "loss_curve.png", self.rows)
            self._scalars({f"train/{k}": row[k] for k in ("loss", "lr", "images_per_s") if row.get(k) is not None}
                          | {f"val/{k[4:]}": row[k] for k in ("val_top1", "val_knn", "val_macro_f1") if k in row},
                          epoch)
        val = (f"; val top-1 {row['val_top1']:.4f}, k-NN {row['val_knn']:.4f}, macro-F1 {row['val_macro_f1']:.4f}"
               f"{' (best)' if improved else ''}") if "val_top1" in row else ""
        log.info("epoch %d/%d: loss %.4f, lr %.4g, %.1f img/s, %s, ETA %s%s", epoch, t.epochs, row["loss"], row["lr"],
                 row["images_per_s"] or 0.0, duration(row["epoch_time_s"]), duration(row["eta_s"]), val)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    # -- finish

    def finish(self) -> dict[str, Any]:
        """Register the outputs (rank 0) and return the manifest metrics."""
        ck_dir = self.ck_dir
        with go_no_go():  # rank 0 alone checks best.pt and registers the outputs
            if self.is_main:
                if not (ck_dir / "best.pt").exists():
                    if self.do_eval:  # best.pt was removed while the training ran: never replaced silently by last.pt
                        raise UserError(f"{ck_dir / 'best.pt'} (epoch {self.best.get('epoch')}) disappeared during the "
                                        f"training: restore it, or train again with `python 03_main_supcon.py --run "
                                        f"{self.ctx.run_dir} --force`")
                    copy_checkpoint(self.last, ck_dir / "best.pt")  # no validation: best is the last epoch (documented)
                plot_curves(self.dir / "loss_curve.png", self.rows)
                if not (self.dir / "metrics.csv").exists():
                    write_metrics_csv(self.dir / "metrics.csv", self.rows)
                for name in sorted(os.listdir(ck_dir)):
                    if name in ("last.pt", "best.pt") or (name.startswith("epoch_") and name.endswith(".pt")):
                        self.ctx.output(CHECKPOINTS_DIR, name)
                for name in ("metrics.csv", "loss_curve.png", "augmentations.png"):
                    self.ctx.output(name)
        trained = [r for r in self.rows if r["epoch"] > 0 and r.get("loss") is not None]
        first = next((r for r in self.rows if r["epoch"] == 0), None)
        best = self.best
        if best:
            log.info("best epoch %d: val macro-F1 %.4f, top-1 %.4f (checkpoints/best.pt)", best["epoch"],
                     best["val_macro_f1"], best["val_top1"])
        return {"epochs": self.t.epochs, "steps": self.trainer.global_step, "steps_per_epoch": self.steps,
                "final_loss": trained[-1]["loss"] if trained else None,
                "images_per_s": trained[-1].get("images_per_s") if trained else None,
                "best_epoch": best.get("epoch"), "best_val_macro_f1": best.get("val_macro_f1"),
                "best_val_top1": best.get("val_top1"),
                "untrained_val_top1": first.get("val_top1") if first else None, "resumed": self.ckpt is not None,
                "preprocessing": preprocessing_of(self.cfg, self.inp.stats).as_dict()}
