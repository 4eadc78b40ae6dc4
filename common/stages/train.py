"""Stage 03's driver: Supervised Contrastive training of the backbone, built to survive days-long runs.

The story: read the splits and stats; start fresh or resume from ``checkpoints/last.pt``; train
epoch by epoch (k-NN model selection, checkpoints, metrics, plots); record the outputs.

What a rerun does (nothing finished is ever destroyed):

- an unfinished run (no manifest) continues from ``last.pt`` exactly where it stopped, with or
  without ``--force``;
- ``--force`` on a finished run (or ``train.resume: false``) moves its checkpoints, metrics and
  logs to ``03_main_supcon/previous-<UTC time>/`` and trains from scratch;
- a finished run whose ``best.pt`` or ``last.pt`` is missing or was edited is refused with what to
  do; a checkpoint is never replaced silently;
- a finished run with a changed configuration (say ``train.epochs`` raised) continues from
  ``last.pt`` when the model is the same, and is refused otherwise.
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

from .. import distributed as D
from ..augment import TwoViews, train_transform
from ..config import Config, ModelConfig, get_key
from ..data import class_names, label_indices, read_splits, read_stats, rows_of
from ..errors import UserError
from ..fileio import sha256_file, write_json
from ..model import CHECKPOINT_FORMAT, build_model
from ..runfolder import unique_previous
from ..seed import rng_state, set_rng_state
from ..signals import DeferSignals
from ..train import (AUG_PREVIEW_IMAGES, MODEL_KEYS_MUST_MATCH, EpochBatchSampler, Evaluator, Position,
                     Trainer, TwoViewDataset, augmentation_preview, copy_checkpoint, duration,
                     preview_indices, save_checkpoint, worker_errors, write_metrics_csv)
from ..plots import plot_curves, plot_image_grid
from . import SPECS, SPLIT, STATS, TRAIN

if TYPE_CHECKING:
    from ..stage import Context

log = logging.getLogger(__name__)

CHECKPOINTS = ("last.pt", "best.pt")  # a finished run's checkpoints that must be intact to continue


def _move_aside(stage_dir: Path, why: str, manifest: dict | None = None) -> Path | None:
    """Move the previous run's checkpoints, metrics, plots and TensorBoard files to ``previous-<UTC time>/``.

    Its ``manifest`` (the wrapper has already taken it out of the stage folder) and a copy of
    ``log.txt`` so far go with them. Never deletes: every earlier ``previous-*`` folder stays.
    """
    names = ("checkpoints", "metrics.csv", "loss_curve.png", "tensorboard", "augmentations.png")
    present = [n for n in names if (stage_dir / n).exists()]
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
    log.info("%s: starting fresh; moved the previous run's %s to %s", why, ", ".join(present), prev)
    return prev


def _declared(cfg: Config) -> dict[str, dict[str, Any]]:
    """The keys stage 03 declares, as ``{section: {key: value}}`` (what a checkpoint records)."""
    out: dict[str, dict[str, Any]] = {}
    for dotted in SPECS[TRAIN].keys:
        section, key = dotted.split(".")
        out.setdefault(section, {})[key] = get_key(cfg, dotted)
    return out


def _start_fresh(ctx: Context, ck_dir: Path, resume: bool) -> bool:
    """Decide between a fresh start (True, earlier checkpoints moved aside) and continuing from last.pt.

    Raises ``UserError`` when a finished run's checkpoint is missing or was edited.
    """
    last = ck_dir / "last.pt"
    hint = f"`python 03_main_supcon.py --run {ctx.run_dir} --force`"
    if ctx.previous is not None and ctx.force:
        _move_aside(ctx.dir, "--force on a finished training", ctx.previous)
        return True
    if not resume:
        _move_aside(ctx.dir, "train.resume is false")
        return True
    if ctx.previous is not None and ctx.changed_output:
        raise UserError(f"{ctx.dir / ctx.changed_output} of the finished training is missing or was edited: restore "
                        f"it, or train again with {hint} (the present checkpoints are then kept in "
                        f"{ctx.dir.name}/previous-<UTC time>/)")
    if ctx.force and last.exists():
        log.info("--force: the training has not finished, so it continues from %s (--force never throws away "
                 "progress; train.resume=false starts again and keeps these checkpoints in previous-<UTC time>/)",
                 last)
    return not last.exists()


def _check_resumable(ckpt: dict, path: Path, cfg: Config, classes: list[str], stats: dict, splits_sha: str) -> None:
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a 03_main_supcon.py checkpoint: set train.resume=false to start a new training (this one is kept in previous-<UTC time>/)")
    if ckpt.get("splits_sha256") not in (None, splits_sha):
        # continuing on another split would train on former validation images (and select on them)
        raise UserError(f"splits.csv changed since {path} was written (01_random_split_dataset was rerun): "
                        f"set train.resume=false to train from scratch on the new split (the checkpoints are kept in "
                        f"previous-<UTC time>/), or use a new --run folder")
    if list(ckpt.get("classes") or []) != list(classes):
        old = ckpt.get("classes") or []
        raise UserError(f"{path} was trained on {len(old)} classes, the splits now have {len(classes)} "
                        f"(class list differs): set train.resume=false to start again (the checkpoints are kept in "
                        f"previous-<UTC time>/), or use a new --run folder")
    stored = (ckpt.get("config") or {}).get("model", {})
    now = _declared(cfg)["model"]
    diff = [f"model.{k} {stored.get(k)!r} -> {now[k]!r}" for k in MODEL_KEYS_MUST_MATCH if stored.get(k) != now[k]]
    if diff:
        raise UserError(f"cannot resume from {path}: {', '.join(diff)}: set train.resume=false to start again "
                        "(the checkpoints are kept in previous-<UTC time>/), or use a new --run folder")
    old_stats = ckpt.get("stats") or {}
    if any(abs(a - b) > 1e-6 for key in ("mean", "std") for a, b in zip(old_stats.get(key, []), stats[key])):
        log.warning("stats.json changed since %s was written: training continues with the new mean/std", path)
    old_train = (ckpt.get("config") or {}).get("train", {})
    changed = [f"train.{k} {old_train.get(k)!r} -> {v!r}" for k, v in _declared(cfg)["train"].items()
               if k in old_train and old_train[k] != v and k not in ("resume",)]
    if changed:
        log.warning("resuming with changed training settings: %s", "; ".join(changed))


def main(ctx: Context, on_step: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
    """Stage 03: read the inputs, start or resume, train epoch by epoch, record the outputs.

    ``on_step(epoch, step_in_epoch, global_step)`` is called after every step (tests use it to
    simulate an interruption). On the CPU, denormal floats are flushed to zero while training:
    tiny weights and gradients otherwise slow convolutions and batch norm down 10-20 times.
    """
    flush = ctx.device().type == "cpu" and torch.set_flush_denormal(True)
    try:
        training = Training(ctx, on_step)
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
    splits_csv = Path(ctx.upstream(SPLIT)) / "splits.csv"
    rows = read_splits(splits_csv)
    classes = class_names(rows)
    train_rows, val_rows = rows_of(rows, "train"), rows_of(rows, "val")
    return Inputs(splits_csv, sha256_file(splits_csv), classes, read_stats(Path(ctx.upstream(STATS)) / "stats.json"),
                  [r.path for r in train_rows], label_indices(train_rows, classes),
                  [r.path for r in val_rows], label_indices(val_rows, classes))


class Training:
    """State that outlives one step of stage 03's story: data, trainer, evaluator, logs, history."""

    def __init__(self, ctx: Context, on_step: Callable[[int, int, int], None] | None):
        from ..seed import worker_init_fn

        self.ctx, self.cfg, self.t, self.on_step = ctx, ctx.cfg, ctx.cfg.train, on_step
        self.rank, self.world = int(ctx.rank), int(ctx.world_size)
        self.is_main = self.rank == 0
        self.device = ctx.device()
        self.dir = Path(ctx.dir)
        self.ck_dir = self.dir / "checkpoints"
        self.last = self.ck_dir / "last.pt"
        self.inp = read_inputs(ctx)
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
        """Build the model; continue from last.pt (checked) or start fresh (earlier runs moved aside)."""
        cfg, t = self.cfg, self.t
        # go/no-go after each check that may fail on one rank only: the others stop with it, not in a collective
        with D.go_no_go():
            fresh = _start_fresh(self.ctx, self.ck_dir, t.resume) if self.is_main else True
        with D.go_no_go():
            if not fresh or (not self.is_main and self.last.exists() and t.resume):
                try:
                    self.ckpt = torch.load(self.last, map_location="cpu", weights_only=True)
                except Exception as e:  # noqa: BLE001 - a torn or foreign file
                    raise UserError(f"cannot read {self.last} to resume ({e.__class__.__name__}): set "
                                    "train.resume=false to start again (the checkpoints are kept in "
                                    "previous-<UTC time>/)") from None
                _check_resumable(self.ckpt, self.last, cfg, self.inp.classes, self.inp.stats, self.inp.splits_sha)
        mcfg = cfg.model
        if self.ckpt is not None and mcfg.pretrained.lower() != "none":
            mcfg = ModelConfig(**{**asdict(mcfg), "pretrained": "none"})  # weights come from last.pt: never download
        self.trainer = Trainer(build_model(mcfg), cfg, self.device, rank=self.rank, world_size=self.world,
                               train_paths=self.inp.train_paths, checkpoint_dir=self.ck_dir if self.is_main else None)
        with D.go_no_go():  # rank 0 alone checks best.pt
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
        if self.is_main and self.best and not (self.ck_dir / "best.pt").exists():
            raise UserError(f"{self.ck_dir / 'best.pt'} (epoch {self.best.get('epoch')}, recorded in {self.last}) is "
                            "missing: restore it, or set train.resume=false to train again (the checkpoints are "
                            "kept in previous-<UTC time>/)")
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
            log.warning("%s already completed %d epochs (train.epochs=%d): nothing to train; use --force to train "
                        "from scratch, or raise train.epochs", self.last, int(ckpt["epoch"]), t.epochs)

    def open_logs(self) -> None:
        """augmentations.png and the TensorBoard writer (rank 0)."""
        if not self.is_main:
            return
        self.ck_dir.mkdir(parents=True, exist_ok=True)
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
                "config": _declared(self.cfg), "classes": inp.classes, "stats": inp.stats, "metrics": self.rows,
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
                with D.go_no_go():  # rank 0 writes the checkpoints: its error (a full disk) stops every rank
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
        from tqdm import tqdm

        t, p = self.t, self.trainer.position
        epoch, start = p.epoch, p.step_in_epoch
        self.sampler.set_epoch(epoch, start)
        bar = tqdm(total=self.steps, initial=start, desc=f"epoch {epoch}/{t.epochs}", leave=False,
                   disable=None if self.is_main else True, dynamic_ncols=True)
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
        with D.go_no_go():  # rank 0 alone checks best.pt and registers the outputs
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
                        self.ctx.output("checkpoints", name)
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
                "untrained_val_top1": first.get("val_top1") if first else None, "resumed": self.ckpt is not None}
