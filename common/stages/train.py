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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import distributed as D
from ..augment import TwoViews, train_transform
from ..config import Config, ModelConfig, get_key
from ..data import class_names, label_indices, read_splits, read_stats, rows_of
from ..errors import UserError
from ..fileio import sha256_file
from ..model import CHECKPOINT_FORMAT, build_model
from ..runfolder import unique_previous
from ..seed import rng_state, set_rng_state
from ..signals import DeferSignals
from ..train import (AUG_PREVIEW_IMAGES, MODEL_KEYS_MUST_MATCH, EpochBatchSampler, Evaluator, Position,
                     Trainer, TwoViewDataset, augmentation_preview, copy_checkpoint, duration,
                     preview_indices, save_checkpoint, worker_errors, write_metrics_csv)
from ..plots import plot_curves, plot_image_grid
from . import SPECS, SPLIT, STATS, TRAIN

log = logging.getLogger(__name__)

CHECKPOINTS = ("last.pt", "best.pt")  # a finished run's checkpoints that must be intact to continue


@dataclass
class _Run:
    """Book-keeping that goes into every checkpoint."""

    rows: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)  # {"epoch", "val_macro_f1", "val_top1"}


def _move_aside(stage_dir: Path, why: str) -> Path | None:
    """Move the previous run's checkpoints, metrics, plots and logs to ``previous-<UTC time>/``.

    Never deletes: every earlier ``previous-*`` folder stays.
    """
    names = ("checkpoints", "metrics.csv", "loss_curve.png", "tensorboard", "augmentations.png", "manifest.json",
             "log.txt")
    present = [n for n in names if (stage_dir / n).exists() and n != "log.txt"]
    if not present:
        return None
    prev = unique_previous(stage_dir)
    prev.mkdir()
    for n in present:
        os.replace(stage_dir / n, prev / n)
    log.info("%s: starting fresh; moved the previous run's %s to %s", why, ", ".join(present), prev)
    return prev


def _declared(cfg: Config) -> dict[str, dict[str, Any]]:
    """The keys stage 03 declares, as ``{section: {key: value}}`` (what a checkpoint records)."""
    out: dict[str, dict[str, Any]] = {}
    for dotted in SPECS[TRAIN].keys:
        section, key = dotted.split(".")
        out.setdefault(section, {})[key] = get_key(cfg, dotted)
    return out


def _start_fresh(ctx: Any, ck_dir: Path, resume: bool) -> bool:
    """Decide between a fresh start (True, earlier checkpoints moved aside) and continuing from last.pt.

    Raises ``UserError`` when a finished run's checkpoint is missing or was edited.
    """
    last = ck_dir / "last.pt"
    hint = f"`python 03_main_supcon.py --run {ctx.run_dir} --force`"
    if ctx.previous is not None and ctx.force:
        _move_aside(ctx.dir, "--force on a finished training")
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


def main(ctx: Any, on_step: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
    """Run stage 03 in ``ctx`` (``common.stage.Context`` or alike); returns the manifest metrics.

    ``on_step(epoch, step_in_epoch, global_step)`` is called after every step (tests use it to
    simulate an interruption). On the CPU, denormal floats are flushed to zero while training:
    tiny weights and gradients otherwise slow convolutions and batch norm down 10-20 times.
    """
    flush = ctx.device().type == "cpu" and torch.set_flush_denormal(True)
    try:
        return _train_supcon(ctx, on_step)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _train_supcon(ctx: Any, on_step: Callable[[int, int, int], None] | None) -> dict[str, Any]:
    from tqdm import tqdm

    from ..seed import worker_init_fn

    cfg: Config = ctx.cfg
    t = cfg.train
    rank, world = int(ctx.rank), int(ctx.world_size)
    is_main = rank == 0
    device = ctx.device()
    stage_dir = Path(ctx.dir)
    ck_dir = stage_dir / "checkpoints"

    # --- inputs
    splits_csv = Path(ctx.upstream(SPLIT)) / "splits.csv"
    stats_json = Path(ctx.upstream(STATS)) / "stats.json"
    rows = read_splits(splits_csv)
    splits_sha = sha256_file(splits_csv)
    classes = class_names(rows)
    stats = read_stats(stats_json)
    train_rows, val_rows = rows_of(rows, "train"), rows_of(rows, "val")
    train_paths, train_labels = [r.path for r in train_rows], label_indices(train_rows, classes)
    if t.epochs < 1:
        raise UserError(f"train.epochs: must be >= 1, got {t.epochs}")
    if t.save_freq < 1:
        raise UserError(f"train.save_freq: must be >= 1, got {t.save_freq}")

    ds = TwoViewDataset(train_paths, train_labels, TwoViews(train_transform(cfg, stats["mean"], stats["std"])),
                        cfg.run.seed)
    sampler = EpochBatchSampler(len(ds), t.batch_size, cfg.run.seed, rank, world, t.max_steps_per_epoch)
    if sampler.steps_per_epoch < 1:
        raise UserError(f"train.batch_size: {t.batch_size} x {world} process(es) is more than the {len(ds)} training "
                        f"images of {splits_csv} (batches are kept equal): lower train.batch_size")
    steps = sampler.steps_per_epoch
    g = torch.Generator()
    g.manual_seed(cfg.run.seed)
    nw = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=nw, pin_memory=device.type == "cuda",
                                         persistent_workers=nw > 0, worker_init_fn=worker_init_fn if nw > 0 else None,
                                         generator=g)

    # --- fresh start or resume
    last = ck_dir / "last.pt"
    ckpt: dict | None = None
    fresh = _start_fresh(ctx, ck_dir, t.resume) if is_main else True
    D.barrier()
    if not fresh or (not is_main and last.exists() and t.resume):
        try:
            ckpt = torch.load(last, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file
            raise UserError(f"cannot read {last} to resume ({e.__class__.__name__}): set train.resume=false to start "
                        "again (the checkpoints are kept in previous-<UTC time>/)") from None
        _check_resumable(ckpt, last, cfg, classes, stats, splits_sha)
    mcfg = cfg.model
    if ckpt is not None and mcfg.pretrained.lower() != "none":
        mcfg = ModelConfig(**{**asdict(mcfg), "pretrained": "none"})  # weights come from last.pt: never download
    model = build_model(mcfg)
    trainer = Trainer(model, cfg, device, rank=rank, world_size=world, train_paths=train_paths,
                      checkpoint_dir=ck_dir if is_main else None)
    run = _Run()
    if ckpt is not None:
        trainer.load_state(ckpt)
        set_rng_state(ckpt.get("rng") or {})
        run.rows, run.best = list(ckpt.get("metrics") or []), dict(ckpt.get("best") or {})
        if is_main and run.best and not (ck_dir / "best.pt").exists():
            raise UserError(f"{ck_dir / 'best.pt'} (epoch {run.best.get('epoch')}, recorded in {last}) is missing: "
                            "restore it, or set train.resume=false to train again (the checkpoints are kept in "
                            "previous-<UTC time>/)")
        p = trainer.position
        if p.steps_per_epoch != steps and 0 < p.step_in_epoch:
            log.warning("steps per epoch changed (%d -> %d): epoch %d restarts from its first batch",
                        p.steps_per_epoch, steps, p.epoch)
            trainer.position = Position(epoch=p.epoch, steps_per_epoch=steps)
        p = trainer.position
        what = (f"epoch {p.epoch}, skipping its {p.step_in_epoch} batches already done" if p.step_in_epoch
                else f"the start of epoch {p.epoch}")
        log.info("resuming from %s (epoch %d done, global step %d): continuing at %s", last, int(ckpt.get("epoch", 0)),
                 trainer.global_step, what)
        if int(ckpt.get("epoch", 0)) >= t.epochs:
            log.warning("%s already completed %d epochs (train.epochs=%d): nothing to train; use --force to train "
                        "from scratch, or raise train.epochs", last, int(ckpt["epoch"]), t.epochs)
    else:
        trainer.position = Position(epoch=1, steps_per_epoch=steps)
    log.info("training %s (%s head, %d-d) with %s on %d classes, %d train / %d val images; %d step(s) of %d x %d "
             "images per epoch, %d epochs, device %s%s", cfg.model.backbone, cfg.model.head, cfg.model.feat_dim,
             t.method, len(classes), len(train_rows), len(val_rows), steps, t.batch_size, world, t.epochs, device,
             f", AMP {t.amp}" if trainer.amp_dtype is not None else "")

    evaluator = Evaluator(cfg, train_paths, train_labels, [r.path for r in val_rows],
                          label_indices(val_rows, classes), len(classes), stats, device, rank, world)
    if t.eval_every > 0 and not evaluator.enabled:
        log.warning("no validation images: k-NN model selection is off and best.pt is the last epoch")
    do_eval = t.eval_every > 0 and evaluator.enabled

    writer = None
    if is_main:
        ck_dir.mkdir(parents=True, exist_ok=True)
        preview = preview_indices(ds.labels, AUG_PREVIEW_IMAGES)
        plot_image_grid(stage_dir / "augmentations.png", augmentation_preview(ds, preview, cfg, stats, classes),
                        ("image", "view 1", "view 2"), "What the network sees (epoch 1)")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=trainer.position.epoch)

    def checkpoint_obj(completed: int) -> dict:
        return {"format": CHECKPOINT_FORMAT, **trainer.state(), "epoch": completed, "rng": rng_state(),
                "config": _declared(cfg), "classes": classes, "stats": stats, "metrics": run.rows,
                "best": run.best, "world_size": world, "splits_sha256": splits_sha}

    try:
        if ckpt is None and do_eval:  # the untrained network, so a user sees that learning happened
            m0 = evaluator(trainer.raw)
            run.rows.append({"epoch": 0, "step": 0, **m0})
            log.info("untrained network: val top-1 %.4f, k-NN %.4f, macro-F1 %.4f",
                     m0["val_top1"], m0["val_knn"], m0["val_macro_f1"])
            if writer is not None:
                for k, v in m0.items():
                    writer.add_scalar(f"val/{k[4:]}", v, 0)
        epoch_times: list[float] = []
        while trainer.position.epoch <= t.epochs:
            p = trainer.position
            epoch, start = p.epoch, p.step_in_epoch
            t_epoch = time.perf_counter()
            sampler.set_epoch(epoch, start)
            bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch}/{t.epochs}", leave=False,
                       disable=None if is_main else True, dynamic_ncols=True)
            try:
                with worker_errors():
                    res = trainer.train_one_epoch(loader, epoch, steps, start, on_step=on_step, bar=bar)
            finally:
                bar.close()
            row: dict[str, Any] = {"epoch": epoch, "step": trainer.global_step, "loss": res.loss, "lr": res.lr,
                                   "images_per_s": (steps * t.batch_size * world) / res.train_time_s
                                   if res.train_time_s > 0 else None}
            last_epoch = epoch == t.epochs
            improved = False
            if do_eval and (epoch % t.eval_every == 0 or last_epoch):
                m = evaluator(trainer.raw)
                row.update(m)
                key = (m["val_macro_f1"], m["val_top1"])
                improved = not run.best or key > (run.best["val_macro_f1"], run.best["val_top1"])
            epoch_times.append(time.perf_counter() - t_epoch)
            row["epoch_time_s"] = epoch_times[-1]
            row["eta_s"] = float(np.mean(epoch_times)) * (t.epochs - epoch)
            # the epoch's end is atomic too: rows, best and position change together with last.pt
            with DeferSignals():
                run.rows.append(row)
                if improved:
                    run.best = {"epoch": epoch, "val_macro_f1": row["val_macro_f1"], "val_top1": row["val_top1"]}
                trainer.position = Position(epoch=epoch + 1, steps_per_epoch=steps)
                if is_main:
                    save_checkpoint(last, checkpoint_obj(epoch))
                    if improved or (not do_eval and last_epoch):
                        copy_checkpoint(last, ck_dir / "best.pt")
                    if epoch % t.save_freq == 0:
                        copy_checkpoint(last, ck_dir / f"epoch_{epoch:04d}.pt")
            if is_main:
                write_metrics_csv(stage_dir / "metrics.csv", run.rows)
                if "val_top1" in row or last_epoch or epoch % t.save_freq == 0:  # a plot costs ~0.3 s
                    plot_curves(stage_dir / "loss_curve.png", run.rows)
                for k in ("loss", "lr", "images_per_s"):
                    if row.get(k) is not None:
                        writer.add_scalar(f"train/{k}", row[k], epoch)
                for k in ("val_top1", "val_knn", "val_macro_f1"):
                    if k in row:
                        writer.add_scalar(f"val/{k[4:]}", row[k], epoch)
                writer.flush()
            val = (f"; val top-1 {row['val_top1']:.4f}, k-NN {row['val_knn']:.4f}, macro-F1 {row['val_macro_f1']:.4f}"
                   f"{' (best)' if improved else ''}") if "val_top1" in row else ""
            log.info("epoch %d/%d: loss %.4f, lr %.4g, %.1f img/s, %s, ETA %s%s", epoch, t.epochs, res.loss, res.lr,
                     row["images_per_s"] or 0.0, duration(row["epoch_time_s"]), duration(row["eta_s"]), val)
            D.barrier()
    except KeyboardInterrupt:
        p = trainer.position
        if is_main and p.epoch <= t.epochs:
            save_checkpoint(last, checkpoint_obj(p.epoch - 1))
            log.warning("interrupted at epoch %d, step %d/%d: saved %s; run `python 03_main_supcon.py --run %s` "
                        "to continue", p.epoch, p.step_in_epoch, p.steps_per_epoch, last, ctx.run_dir)
        raise
    finally:
        if writer is not None:
            writer.close()

    # --- outputs for the manifest
    if is_main:
        if not (ck_dir / "best.pt").exists():
            if do_eval:  # best.pt was removed while the training ran: never replaced silently by last.pt
                raise UserError(f"{ck_dir / 'best.pt'} (epoch {run.best.get('epoch')}) disappeared during the "
                                f"training: restore it, or train again with `python 03_main_supcon.py --run "
                                f"{ctx.run_dir} --force`")
            copy_checkpoint(last, ck_dir / "best.pt")  # no validation: best is the last epoch (documented)
        plot_curves(stage_dir / "loss_curve.png", run.rows)
        if not (stage_dir / "metrics.csv").exists():
            write_metrics_csv(stage_dir / "metrics.csv", run.rows)
        for name in sorted(os.listdir(ck_dir)):
            if name in ("last.pt", "best.pt") or (name.startswith("epoch_") and name.endswith(".pt")):
                ctx.output("checkpoints", name)
        for name in ("metrics.csv", "loss_curve.png", "augmentations.png"):
            ctx.output(name)
    D.barrier()
    trained = [r for r in run.rows if r["epoch"] > 0 and r.get("loss") is not None]
    first = next((r for r in run.rows if r["epoch"] == 0), None)
    summary = {"epochs": t.epochs, "steps": trainer.global_step, "steps_per_epoch": steps,
               "final_loss": trained[-1]["loss"] if trained else None,
               "images_per_s": trained[-1].get("images_per_s") if trained else None,
               "best_epoch": run.best.get("epoch"), "best_val_macro_f1": run.best.get("val_macro_f1"),
               "best_val_top1": run.best.get("val_top1"),
               "untrained_val_top1": first.get("val_top1") if first else None,
               "resumed": ckpt is not None}
    if run.best:
        log.info("best epoch %d: val macro-F1 %.4f, top-1 %.4f (checkpoints/best.pt)", run.best["epoch"],
                 run.best["val_macro_f1"], run.best["val_top1"])
    return summary
