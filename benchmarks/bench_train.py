"""Training-loop overhead of stage 03: the stage's epoch code path against a bare PyTorch loop.

Both loops train the same SupCon model (``common.model``) with SGD and the SupCon loss
(``common.losses``) on the same pre-made batches (no DataLoader in either):

- **bare**: ``z = model(x); loss = SupConLoss(z, y); zero_grad; backward; step``;
- **stage**: ``common.train.Trainer.train_one_epoch``, i.e. what stage 03 runs per epoch: the
  per-iteration learning-rate schedule, AMP handling, the global-batch gather, the non-finite
  check (one ``loss.item()`` per step), the signal-deferring critical section, running sums,
  the tqdm bar.

The two are timed in alternation, several rounds, and the median round is reported, so that
load from other processes on the machine affects both alike. Ratio = stage / bare images/s.

Usage: python benchmarks/bench_train.py [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config.load import load_config  # noqa: E402
from common.model.loss import SupConLoss  # noqa: E402
from common.model.network import build_model  # noqa: E402
from common.training.trainer import Trainer  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller: test_resnet at 32 px, batch 16")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--backbone", default=None, help="timm model (default resnet18; test_resnet with --quick)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of each loop (median reported)")
    return p.parse_args()


def main() -> None:
    a = parse()
    backbone = a.backbone or ("test_resnet" if a.quick else "resnet18")
    size, batch, steps = (32, 16, 10) if a.quick else (64, 32, 8)
    rounds = a.rounds
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as stage 03 does on the CPU, for both loops
    cfg = load_config(None, [f"model.backbone={backbone}", f"model.image_size={size}", "model.feat_dim=128",
                               f"train.batch_size={batch}", "train.learning_rate=0.05", "train.warm_epochs=1",
                               "train.epochs=10", "train.temperature=0.1", "train.amp=bf16"])
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 2, 3, size, size, generator=g), torch.randint(0, 8, (batch,), generator=g),
                torch.arange(batch)) for _ in range(steps)]
    torch.manual_seed(0)
    bare_model = build_model(cfg.model).to(device).train()
    torch.manual_seed(0)
    trainer = Trainer(build_model(cfg.model), cfg, device)
    opt = torch.optim.SGD(bare_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    crit = SupConLoss(0.1, 0.1)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    print(f"bench_train: {backbone} at {size} px, batch {batch} (x2 views), {steps} steps per round, "
          f"{rounds} rounds, device {device}, {torch.get_num_threads()} torch threads")
    # warm-up (allocator, kernels, lazy imports): stage 03's epoch 1; the timed rounds are epochs 2, 3, ...
    _bare_rate(bare_model, opt, crit, batches, batch, device, amp), _stage_rate(trainer, batches, 1, batch, device)
    b_rates, s_rates = [], []
    for r in range(rounds):
        b_rates.append(_bare_rate(bare_model, opt, crit, batches, batch, device, amp))
        s_rates.append(_stage_rate(trainer, batches, r + 2, batch, device))
    b, s = statistics.median(b_rates), statistics.median(s_rates)
    ratios = [si / bi for si, bi in zip(s_rates, b_rates)]
    print(f"  bare loop          : {b:8.1f} images/s (rounds: {', '.join(f'{r:.1f}' for r in b_rates)})")
    print(f"  stage 03 epoch code: {s:8.1f} images/s (rounds: {', '.join(f'{r:.1f}' for r in s_rates)})")
    print(f"  ratio stage / bare : {s / b:.3f} (median of per-round ratios {statistics.median(ratios):.3f}; "
          f"overhead {1000 * batch * (1 / s - 1 / b):+.2f} ms per step)")


def _bare_rate(model: torch.nn.Module, opt: torch.optim.Optimizer, crit: SupConLoss, batches: list, batch: int,
               device: torch.device, amp: dict) -> float:
    """Images per second of the bare SupCon loop (forward, loss, backward, step) over ``batches``."""
    t0 = time.perf_counter()
    for x, y, _ in batches:
        x = x.to(device, non_blocking=True).flatten(0, 1)
        with torch.autocast(**amp):
            z = model(x)
        loss = crit(z.view(batch, 2, -1), y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(batches) * batch / (time.perf_counter() - t0)


def _stage_rate(trainer: Trainer, batches: list, epoch: int, batch: int, device: torch.device) -> float:
    """Images per second of stage 03's epoch code (``Trainer.train_one_epoch``) over ``batches``."""
    from tqdm import tqdm

    steps = len(batches)
    bar = tqdm(total=steps, desc="stage", leave=False, disable=None)
    t0 = time.perf_counter()
    trainer.train_one_epoch(batches, epoch, steps, 0, bar=bar)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - t0)
    bar.close()
    return rate


if __name__ == "__main__":
    main()
