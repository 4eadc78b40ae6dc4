"""Stage 03 training: the learning-rate schedule, the data order, signals, and short real runs.

The runs use timm's ``test_resnet`` on 24 px synthetic images (four shapes in random colours, so
the untrained network, which matches colours, does poorly and a trained one, taught colour
invariance by SupCon positives and colour augmentation, does well), called through a fake stage
context so that the tests do not depend on ``common/stage.py``.
"""
from __future__ import annotations

import csv
import json
import math
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config.load import load_config
from common.config.schema import Config, TrainConfig
from common.data.augment import train_transform
from common.errors import NonFiniteLossError, UserError
from common.runtime.seed import rng_state, seed_everything, set_rng_state
from common.stages import train as stages_train
from common.stages.train import restart_keys
from common.training import trainer as training_trainer
from common.training.records import METRIC_COLUMNS, preview_indices
from common.training.sampler import EpochBatchSampler, TwoViewDataset
from common.training.schedule import lr_at
from common.training.trainer import make_criterion

CLASSES = ["cross", "disk", "ring", "stripes"]
STAGE = "03_main_supcon"


# ----------------------------------------------------------------------------- schedule


def _tcfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def test_lr_warmup_then_cosine_matches_the_reference_formula():
    t = _tcfg(learning_rate=0.5, epochs=10, cosine=True, lr_decay_rate=0.1, warm=True, warm_epochs=2, warmup_from=0.01)
    n = 5
    eta_min = 0.5 * 0.1 ** 3
    cos = lambda e: eta_min + (0.5 - eta_min) * (1 + math.cos(math.pi * e / 10)) / 2  # noqa: E731
    warmup_to = cos(2)
    assert lr_at(1, 0, n, t) == pytest.approx(0.01)
    assert lr_at(2, 4, n, t) == pytest.approx(0.01 + (4 + 5) / 10 * (warmup_to - 0.01))
    warm = [lr_at(e, s, n, t) for e in (1, 2) for s in range(n)]
    assert all(a < b for a, b in zip(warm, warm[1:]))  # linear per iteration
    assert np.allclose(np.diff(warm), (warmup_to - 0.01) / 10)
    for e in (3, 6, 10):  # after warm-up: the epoch's cosine value, constant within the epoch
        assert lr_at(e, 0, n, t) == pytest.approx(cos(e)) and lr_at(e, n - 1, n, t) == pytest.approx(cos(e))
    assert lr_at(10, 0, n, t) == pytest.approx(eta_min)


def test_lr_step_decay_and_linear_scaling():
    t = _tcfg(learning_rate=0.2, epochs=10, cosine=False, lr_decay_epochs=[3, 6], lr_decay_rate=0.1, warm=False)
    got = [lr_at(e, 0, 4, t) for e in range(1, 9)]
    assert got == pytest.approx([0.2, 0.2, 0.2, 0.02, 0.02, 0.02, 0.002, 0.002])
    s = _tcfg(learning_rate=0.2, cosine=False, warm=False, scale_lr=True, batch_size=32)
    assert lr_at(1, 0, 4, s, world_size=4) == pytest.approx(0.2 * 128 / 256)
    w = _tcfg(learning_rate=0.2, cosine=False, warm=True, warm_epochs=1, warmup_from=0.01)
    assert lr_at(1, 2, 4, w) == pytest.approx(0.01 + 0.5 * (0.2 - 0.01))  # step decay warms up to lr


# ----------------------------------------------------------------------------- data order


def test_sampler_order_is_a_function_of_seed_and_epoch_and_ranks_split_the_global_batch():
    one = EpochBatchSampler(23, 4, seed=7)
    assert one.steps_per_epoch == 5  # drop_last: 23 // 4
    one.set_epoch(3)
    b3 = list(one)
    assert all(len(b) == 4 for b in b3) and all(e == 3 for b in b3 for e, _ in b)
    assert len({i for b in b3 for _, i in b}) == 20
    again = EpochBatchSampler(23, 4, seed=7)
    again.set_epoch(3)
    assert list(again) == b3
    again.set_epoch(4)
    assert list(again) != b3
    one.set_epoch(3, start_step=2)  # resume: the same epoch, its first two batches skipped
    assert len(one) == 3 and list(one) == b3[2:]
    # two ranks with batch 2 = one process with batch 4: rank 0 then rank 1 form each global batch
    r0, r1 = (EpochBatchSampler(23, 2, seed=7, rank=r, world_size=2) for r in (0, 1))
    for s in (r0, r1):
        s.set_epoch(3)
    assert [a + b for a, b in zip(r0, r1)] == b3
    capped = EpochBatchSampler(23, 4, seed=7, max_steps=2)
    assert capped.steps_per_epoch == 2


def test_views_are_a_function_of_seed_epoch_and_index(tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(p)
    cfg = load_config(None, ["model.image_size=16"])
    from common.data.augment import TwoViews

    ds = TwoViewDataset([str(p)], [0], TwoViews(train_transform(cfg, [0.5] * 3, [0.2] * 3)), seed=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    x, y, i = ds[(2, 0)]
    assert x.shape == (2, 3, 16, 16) and (y, i) == (0, 0)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is untouched
    assert torch.equal(ds[(2, 0)][0], x) and not torch.equal(ds[(3, 0)][0], x)


def test_rng_state_round_trip_weights_only(tmp_path):
    seed_everything(3)
    st = rng_state()
    torch.save(st, tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_defer_signals_finishes_the_block_then_interrupts():
    """In a fresh interpreter, as a stage runs: the whole suite's process may hold state from other
    tests' in-process stage runs (after the end-to-end tests this one failed there only, with the
    signal handled after the block: see the closing note of issue 18)."""
    code = textwrap.dedent("""
        import signal, sys
        sys.path.insert(0, %r)
        from common.runtime.signals import DeferSignals
        # a child inherits its parent's blocked signals and ignored dispositions: after the suite's
        # in-process end-to-end runs, SIGINT reached a child of pytest blocked or ignored; start clean
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.signal(signal.SIGINT, signal.default_int_handler)
        done = []
        try:
            with DeferSignals():
                signal.raise_signal(signal.SIGINT)
                done.append("step finished")
        except KeyboardInterrupt:
            assert done == ["step finished"], done
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
            print("interrupted after the block")
        else:
            sys.exit("no KeyboardInterrupt")
    """) % str(Path(__file__).resolve().parents[2])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "interrupted after the block" in res.stdout, res.stderr


# ----------------------------------------------------------------------------- real runs


def _draw(cls: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = size / 2 + rng.uniform(-2, 2, 2)
    r = np.hypot(yy - cy, xx - cx)
    R = size * rng.uniform(0.25, 0.38)
    mask = {"disk": r < R, "ring": (r < R) & (r > 0.6 * R),
            "cross": ((abs(yy - cy) < 2) | (abs(xx - cx) < 2)) & (r < 1.2 * R),
            "stripes": ((xx // 2) % 2 == 0) & (r < R)}[cls]
    colour = rng.uniform(0, 1, 3)
    colour = 255 * colour / colour.max()  # a random saturated colour: the nuisance
    a = mask[..., None] * colour + rng.uniform(0, 50, 3) + rng.normal(0, 8, (size, size, 1))
    return np.clip(a, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> Path:
    """Stages 01 and 02's artefacts for 4 classes x 16 images (12 train, 4 val) + 2 test images each."""
    root = tmp_path_factory.mktemp("stage03")
    rng = np.random.default_rng(1)
    rows = []
    for c in CLASSES:
        (root / "images" / c).mkdir(parents=True)
        for i in range(18):
            p = root / "images" / c / f"{i:02d}.png"
            Image.fromarray(_draw(c, 24, rng)).save(p)
            split = "test" if i >= 16 else ("val" if i % 4 == 3 else "train")
            rows.append([str(p), c, split, "0" * 64, 24, 24, "RGB"])
    s1 = root / "run" / "01_random_split_dataset"
    s1.mkdir(parents=True)
    with open(s1 / "splits.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "sha256", "width", "height", "mode"])
        w.writerows(rows)
    s2 = root / "run" / "02_mean_std_variables"
    s2.mkdir()
    (s2 / "stats.json").write_text(json.dumps({"mean": [0.2, 0.2, 0.2], "std": [0.3, 0.3, 0.3]}))
    return root


class FakeCtx:
    """The parts of ``common.stage.Context`` that stage 03 uses."""

    def __init__(self, cfg: Config, run_dir: Path, force: bool = False):
        self.cfg, self.run_dir, self.force = cfg, run_dir, force
        self.name = STAGE
        self.dir = run_dir / STAGE
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size = 0, 1
        self.outputs: list[str] = []
        self.checked: dict = {}
        # a finished run (its manifest) is what the wrapper hands over; these tests resume unfinished runs
        self.previous, self.changed_output = None, None

    def upstream(self, name: str) -> Path:
        return self.run_dir / name

    def output(self, *parts: str, digest: str = "sha256") -> Path:
        self.outputs.append("/".join(parts))
        return self.dir.joinpath(*parts)

    def device(self) -> torch.device:
        return torch.device("cpu")


BASE = ["model.backbone=test_resnet", "model.image_size=24", "model.feat_dim=32", "data.num_workers=0",
        "train.batch_size=8", "train.learning_rate=0.1", "train.warm=false", "train.cosine=false",
        "train.crop_scale=[0.6, 1.0]", "train.grayscale_p=0.5", "train.temperature=0.1",
        "train.base_temperature=0.1", "train.eval_knn_k=5", "run.seed=1",
        "data.pad_fill=0"]  # the expected preprocessing records below pad with 0 (the default before auto)


def _run(root: Path, run_name: str, overrides: list[str], force: bool = False, on_step=None) -> tuple[dict, FakeCtx]:
    run_dir = root / run_name
    run_dir.mkdir(exist_ok=True)
    for up in ("01_random_split_dataset", "02_mean_std_variables"):
        if not (run_dir / up).exists():
            shutil.copytree(root / "run" / up, run_dir / up)
    cfg = load_config(None, BASE + overrides)
    ctx = FakeCtx(cfg, run_dir, force=force)
    stages_train.check(ctx)  # as the stage wrapper does: check, then main
    seed_everything(cfg.run.seed)  # as the stage wrapper does before main
    return stages_train.main(ctx, on_step=on_step), ctx


def _metrics(ctx: FakeCtx) -> list[dict]:
    with open(ctx.dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_training_learns_and_writes_every_artefact(run_inputs):
    from common.model.checkpoint import load_checkpoint_model

    summary, ctx = _run(run_inputs, "learn", ["train.epochs=8", "train.eval_every=4", "train.save_freq=4"])
    d = ctx.dir
    for f in ("checkpoints/last.pt", "checkpoints/best.pt", "checkpoints/epoch_0004.pt", "checkpoints/epoch_0008.pt",
              "metrics.csv", "loss_curve.png", "augmentations.png"):
        assert (d / f).is_file(), f
        assert f in ctx.outputs, f
    assert any((d / "tensorboard").iterdir())
    ck = torch.load(d / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["format"] == "plankton-supcon/1" and ck["epoch"] == 8 and ck["step"] == 8 * 6
    assert ck["classes"] == CLASSES and ck["stats"]["mean"] == [0.2] * 3 and ck["config"]["model"]["feat_dim"] == 32
    assert ck["scheduler"]["epoch"] == 9 and ck["scheduler"]["step_in_epoch"] == 0
    assert set(ck["rng"]) >= {"torch", "cuda", "numpy", "python"} and len(ck["optimizer"]["state"]) > 0
    model, best = load_checkpoint_model(d / "checkpoints" / "best.pt")
    assert best["epoch"] in (4, 8) and model.dim_in == 96

    rows = _metrics(ctx)
    assert [int(r["epoch"]) for r in rows] == list(range(9))
    assert set(rows[0]) == set(METRIC_COLUMNS)
    assert rows[0]["loss"] == "" and rows[0]["val_top1"] != ""  # epoch 0: the untrained network
    assert all(rows[e]["val_top1"] == "" for e in (1, 2, 3, 5, 6, 7)) and rows[8]["val_top1"] != ""
    assert all(float(r["images_per_s"]) > 0 and float(r["lr"]) == pytest.approx(0.1) for r in rows[1:])
    untrained = {k: float(rows[0][k]) for k in ("val_top1", "val_macro_f1")}
    final = {k: float(rows[8][k]) for k in ("val_top1", "val_macro_f1")}
    # learning happened: retrieval on the backbone features beats the untrained network's clearly
    assert final["val_top1"] >= untrained["val_top1"] + 0.2, (untrained, final)
    assert summary["best_val_macro_f1"] >= untrained["val_macro_f1"] + 0.2
    assert summary["untrained_val_top1"] == pytest.approx(untrained["val_top1"], abs=1e-5)
    assert float(rows[8]["loss"]) < float(rows[1]["loss"])


RESUME = ["train.epochs=3", "train.eval_every=2", "train.save_freq=2", "train.max_steps_per_epoch=4"]


def _interrupt_at(epoch: int, step: int):
    def hook(e: int, s: int, g: int) -> None:
        if (e, s) == (epoch, step):
            raise KeyboardInterrupt("test interruption")
    return hook


def test_resume_after_an_interruption_is_exact(run_inputs):
    ref, ref_ctx = _run(run_inputs, "straight", RESUME)
    with pytest.raises(KeyboardInterrupt):
        _run(run_inputs, "broken", RESUME, on_step=_interrupt_at(2, 3))
    ctx_dir = run_inputs / "broken" / STAGE
    mid = torch.load(ctx_dir / "checkpoints" / "last.pt", weights_only=True)
    assert mid["epoch"] == 1 and mid["scheduler"]["epoch"] == 2 and mid["scheduler"]["step_in_epoch"] == 3
    assert mid["step"] == 4 + 3
    summary, ctx = _run(run_inputs, "broken", RESUME)  # the same command again: continues
    assert summary["resumed"] and summary["steps"] == ref["steps"] == 12
    a = torch.load(ref_ctx.dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(ctx.dir / "checkpoints" / "last.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-6, rtol=0), k
    for k, st in a["optimizer"]["state"].items():
        assert torch.allclose(st["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"], atol=1e-6, rtol=0)
    ra, rb = _metrics(ref_ctx), _metrics(ctx)
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb] == ["0", "1", "2", "3"]
    for x, y in zip(ra[1:], rb[1:]):  # the interrupted epoch's loss is its mean over all its steps
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), abs=1e-5)
        assert x["val_top1"] == y["val_top1"]
    assert a["best"] == b["best"]
    assert (ctx.dir / "checkpoints" / "epoch_0002.pt").is_file()


def test_another_model_or_split_starts_a_new_training_and_keeps_the_old(run_inputs, caplog):
    """Issue 17 #1: a changed model, split or stats.json was refused (or, for stats, continued with
    the new mean/std): it starts a new training, the old one moved to previous-*/ (nothing destroyed)."""
    quick = ["train.epochs=1", "train.eval_every=0", "train.max_steps_per_epoch=1"]
    _run(run_inputs, "guard", quick)
    d = run_inputs / "guard" / STAGE
    with caplog.at_level("INFO", logger="common.stages.train"):
        summary, ctx = _run(run_inputs, "guard", quick + ["model.feat_dim=16"])
    assert not summary["resumed"] and summary["steps"] == 1
    lines = [r.getMessage() for r in caplog.records if "starts a new training" in r.getMessage()]
    assert len(lines) == 1 and "model.feat_dim: 32 -> 16" in lines[0] and "previous-" in lines[0]
    assert len(list(d.glob("previous-*/checkpoints/last.pt"))) == 1
    assert torch.load(d / "checkpoints" / "last.pt", weights_only=True)["config"]["model"]["feat_dim"] == 16
    splits = run_inputs / "guard" / "01_random_split_dataset" / "splits.csv"
    lines_ = splits.read_text().splitlines(keepends=True)
    splits.write_text(lines_[0] + "".join(reversed(lines_[1:])))  # a new split: same classes, other rows
    caplog.clear()
    with caplog.at_level("INFO", logger="common.stages.train"):
        _run(run_inputs, "guard", quick + ["model.feat_dim=16"])
    assert "starts a new training (01_random_split_dataset/splits.csv changed)" in caplog.text
    stats = run_inputs / "guard" / "02_mean_std_variables" / "stats.json"
    stats.write_text(json.dumps({"mean": [0.25, 0.2, 0.2], "std": [0.3, 0.3, 0.3]}))
    caplog.clear()
    with caplog.at_level("INFO", logger="common.stages.train"):
        _run(run_inputs, "guard", quick + ["model.feat_dim=16"])
    assert "02_mean_std_variables/stats.json: mean/std [0.2, 0.2, 0.2]" in caplog.text
    ck = torch.load(d / "checkpoints" / "last.pt", weights_only=True)
    assert ck["preprocessing"] == {"mean": [0.25, 0.2, 0.2], "std": [0.3, 0.3, 0.3], "image_size": 24, "pad_fill": 0,
                                   "channels": "RGB"}
    assert len(list(d.glob("previous-*/checkpoints/last.pt"))) == 3
    summary, ctx = _run(run_inputs, "guard", quick + ["model.feat_dim=16", "train.method=simclr",
                                                      "train.resume=false"])
    assert not summary["resumed"] and summary["steps"] == 1
    assert len(list(d.glob("previous-*/checkpoints/last.pt"))) == 4
    assert (d / "checkpoints" / "best.pt").is_file()  # no evaluation: best = last
    # finished already: a rerun has nothing to train and says so
    again, _ = _run(run_inputs, "guard", quick + ["model.feat_dim=16", "train.method=simclr"])
    assert again["resumed"] and again["steps"] == 1
    assert len(list(d.glob("previous-*/checkpoints/last.pt"))) == 4


def test_a_checkpoint_of_an_earlier_version_is_continued(run_inputs, caplog):
    """A last.pt written before checkpoints recorded their preprocessing: derived from its stats and
    config (the same values), so raising train.epochs continues it rather than starting again."""
    quick = ["train.epochs=1", "train.eval_every=0", "train.max_steps_per_epoch=1"]
    _run(run_inputs, "earlier", quick)
    last = run_inputs / "earlier" / STAGE / "checkpoints" / "last.pt"
    ck = torch.load(last, weights_only=True)
    del ck["preprocessing"]
    torch.save(ck, last)
    with caplog.at_level("INFO", logger="common.stages.train"):
        summary, ctx = _run(run_inputs, "earlier", quick + ["train.epochs=2"])
    assert summary["resumed"] and summary["steps"] == 2 and "starts a new training" not in caplog.text
    assert not list(ctx.dir.glob("previous-*"))
    assert torch.load(last, weights_only=True)["preprocessing"]["pad_fill"] == 0  # written by this version now


def test_classification_of_every_stage_03_key():
    """Each key stage 03 hashes either may change while a training continues or starts a new one."""
    from common.config.values import is_semantic
    from common.stages import SPECS, TRAIN_CONTINUE_KEYS

    hashed = {k for k in SPECS[STAGE].hashed_keys if is_semantic(k)}
    assert set(TRAIN_CONTINUE_KEYS) <= hashed
    assert set(restart_keys()) == hashed - set(TRAIN_CONTINUE_KEYS)
    for key in ("data.pad_fill", "model.image_size", "model.feat_dim", "train.learning_rate", "train.crop_scale",
                "train.batch_size", "train.max_steps_per_epoch", "run.seed", "train.eval_knn_k"):
        assert key in restart_keys(), key


@pytest.mark.parametrize("change, restarts", [
    (["train.epochs=3"], False),  # raised: continues
    (["train.save_freq=1", "train.eval_every=1"], False),
    (["train.epochs=1"], True),  # below the 2 epochs done
    (["data.pad_fill=255"], True),
    (["train.hflip=0.0"], True),
])
def test_a_changed_key_continues_or_starts_a_new_training(run_inputs, change, restarts, caplog):
    quick = ["train.epochs=2", "train.eval_every=0", "train.max_steps_per_epoch=1", "train.hflip=0.5"]
    name = "classify_" + "_".join(c.replace(".", "").replace("=", "") for c in change)
    _run(run_inputs, name, quick)
    d = run_inputs / name / STAGE
    with caplog.at_level("INFO", logger="common.stages.train"):
        summary, _ = _run_finished(run_inputs, name, quick + change, False, {"status": "ok"})
    new = [r.getMessage() for r in caplog.records if "starts a new training" in r.getMessage()]
    assert summary["resumed"] is not restarts
    assert len(new) == int(restarts)
    assert len(list(d.glob("previous-*"))) == int(restarts)
    if restarts:
        key = change[0].split("=")[0]
        assert key in new[0]
    else:
        assert "continuing" in caplog.text and change[0].split("=")[0] in caplog.text


def test_non_finite_loss_stops_with_the_batch_saved(run_inputs, monkeypatch):
    real = make_criterion

    def poisoned(cfg):
        loss = real(cfg)
        calls = []

        def fwd(features, labels=None):
            calls.append(1)
            out = loss(features, labels)
            return out * float("nan") if len(calls) == 2 else out
        return fwd

    monkeypatch.setattr(training_trainer, "make_criterion", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2 of 6.*nonfinite_e0001_s0000002.pt"):
        _run(run_inputs, "nan", ["train.epochs=2", "train.eval_every=0"])
    bad = torch.load(run_inputs / "nan" / STAGE / "checkpoints" / "nonfinite_e0001_s0000002.pt", weights_only=True)
    assert len(bad["batch_paths"]) == 8 and all(Path(p).is_file() for p in bad["batch_paths"])
    assert all(torch.isfinite(v).all() for v in bad["model"].values() if v.is_floating_point())


def test_batch_larger_than_the_train_set_names_the_key(run_inputs):
    with pytest.raises(UserError, match=r"train.batch_size: 64 x 1"):
        _run(run_inputs, "big", ["train.batch_size=64"])


def test_preview_takes_one_image_per_class_in_turn():
    assert preview_indices([0, 0, 0, 1, 1, 2], 4) == [0, 3, 5, 1]
    assert preview_indices([0, 0], 6) == [0, 1]


def _run_finished(root: Path, run_name: str, overrides: list[str], force: bool, previous: dict | None,
                  changed: str | None = None, on_step=None) -> tuple[dict, FakeCtx]:
    """Like _run, with the wrapper's view of the last finished run (its manifest, a changed output)."""
    run_dir = root / run_name
    cfg = load_config(None, BASE + overrides)
    ctx = FakeCtx(cfg, run_dir, force=force)
    ctx.previous, ctx.changed_output = previous, changed
    stages_train.check(ctx)
    seed_everything(cfg.run.seed)
    return stages_train.main(ctx, on_step=on_step), ctx


def test_force_never_throws_away_an_unfinished_run(run_inputs):
    """Trap: `--force`, interrupted, then the same command again started from scratch."""
    quick = ["train.epochs=2", "train.eval_every=0", "train.max_steps_per_epoch=2"]
    _run(run_inputs, "unfinished", quick)  # finished once
    steps = []

    def stop_after_one(epoch, step, global_step):
        steps.append(global_step)
        if epoch == 1 and step == 1:
            raise KeyboardInterrupt("test")
    with pytest.raises(KeyboardInterrupt):  # --force on the finished run: a fresh start, then interrupted
        _run_finished(run_inputs, "unfinished", quick, True, {"status": "ok"}, on_step=stop_after_one)
    prev = list((run_inputs / "unfinished" / STAGE).glob("previous-*"))
    assert len(prev) == 1 and (prev[0] / "checkpoints" / "best.pt").is_file()
    # the same command again: the run is unfinished now (no manifest), so it continues
    summary, ctx = _run_finished(run_inputs, "unfinished", quick, True, None)
    assert summary["resumed"] and summary["steps"] == 4
    assert len(list(ctx.dir.glob("previous-*"))) == 1  # nothing moved or deleted


def test_force_on_a_finished_run_keeps_every_earlier_run(run_inputs):
    quick = ["train.epochs=1", "train.eval_every=0", "train.max_steps_per_epoch=1"]
    _run(run_inputs, "twice", quick)
    for _ in range(2):
        _run_finished(run_inputs, "twice", quick, True, {"status": "ok"})
    prev = sorted((run_inputs / "twice" / STAGE).glob("previous-*"))
    assert len(prev) == 2 and all((p / "checkpoints" / "last.pt").is_file() for p in prev)
    assert all(json.loads((p / "manifest.json").read_text()) == {"status": "ok"} for p in prev)


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_missing_checkpoint_of_a_finished_run_is_refused_never_replaced(run_inputs, name):
    """Trap: deleting best.pt and rerunning 03 silently copied last.pt over it."""
    quick = ["train.epochs=1", "train.eval_every=1", "train.max_steps_per_epoch=1"]
    _, ctx = _run(run_inputs, f"missing_{name}", quick)
    (ctx.dir / "checkpoints" / name).unlink()
    with pytest.raises(UserError, match=rf"{name} of the finished training is missing or was edited.*--force"):
        _run_finished(run_inputs, f"missing_{name}", quick, False, {"status": "ok"}, changed=f"checkpoints/{name}")
    assert not (ctx.dir / "checkpoints" / name).exists()
    # an unfinished run whose best.pt disappeared is refused too (best epoch recorded in last.pt)
    if name == "best.pt":
        with pytest.raises(UserError, match=r"best.pt \(epoch 1, recorded in .*last.pt\) is missing"):
            _run_finished(run_inputs, f"missing_{name}", quick + ["train.epochs=2"], False, None)
        assert not (ctx.dir / "checkpoints" / name).exists()
