"""Benchmark: the SupCon loss of ``common.losses`` against the reference formulation.

The reference is the loss of HobbitLong/SupContrast ``losses.py`` (Khosla et al. 2020), copied
below as ``reference_supcon``: a ``(B, B)`` label mask repeated to ``(N, N)`` (``mask.repeat``),
the self-contrast removed by a scattered ``(N, N)`` ``logits_mask``, ``exp`` / ``log`` / mask
products on full ``(N, N)`` tensors. ``common.losses`` computes the same number with the positive
term reduced to per-class vector sums (no ``(N, N)`` mask) and a log-sum-exp that keeps one
``(N, N)`` buffer (the softmax, made in place) and differentiates by two matrix products.

Workload: batch 1024 x 2 views x 128-d (the paper's projection size), L2-normalised float32,
labels drawn from 87 classes (DYB-PlanktonNet) with a long-tailed distribution, temperature 0.07;
``--quick``: batch 256. Rows: SupCon with ``contrast_mode`` all and one, and SimCLR (no labels).

- **Time**: forward + backward (gradient of the features), median of ``--repeats`` runs after a
  warm-up, both implementations interleaved in this process.
- **Peak memory**, measured, not estimated:
  - CPU: the peak-RSS growth of one forward + backward in a fresh subprocess per implementation
    (``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs`` after a warm-up step,
    minus VmRSS at that point). The subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
    glibc serves every large tensor by ``mmap`` and gives it back on free: RSS then follows the
    live tensors instead of the heap's high-water mark. Median of 3 steps.
  - CUDA: ``torch.cuda.max_memory_allocated`` growth over one step, in this process.
  Both are also printed in units of one ``(N, N)`` float32 matrix (the logits, the least any
  formulation that materialises them needs).
- **Agreement**: the two losses to 1e-5 and their feature gradients to 1e-5 (max abs), checked
  on every row; the script exits 1 if they differ.

Usage:  python benchmarks/bench_loss.py [--quick] [--threads 1] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.model.loss import supcon_loss  # noqa: E402

N_CLASSES = 87  # DYB-PlanktonNet
TEMPERATURE = 0.07
ROWS = [("supcon", "all"), ("supcon", "one"), ("simclr", "all")]


def reference_supcon(features: torch.Tensor, labels: Optional[torch.Tensor] = None,
                     mask: Optional[torch.Tensor] = None, temperature: float = 0.07,
                     base_temperature: float = 0.07, contrast_mode: str = "all") -> torch.Tensor:
    """HobbitLong/SupContrast ``SupConLoss.forward`` (losses.py), as published (baseline)."""
    device = features.device
    batch_size = features.shape[0]
    if labels is not None and mask is not None:
        raise ValueError("Cannot define both `labels` and `mask`")
    elif labels is None and mask is None:
        mask = torch.eye(batch_size, dtype=torch.float32).to(device)
    elif labels is not None:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).float().to(device)
    else:
        mask = mask.float().to(device)

    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    if contrast_mode == "one":
        anchor_feature = features[:, 0]
        anchor_count = 1
    else:
        anchor_feature = contrast_feature
        anchor_count = contrast_count

    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()

    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1,
                                torch.arange(batch_size * anchor_count).view(-1, 1).to(device), 0)
    mask = mask * logits_mask

    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))

    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs

    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


IMPLS: dict[str, Callable] = {"ours": supcon_loss, "reference": reference_supcon}


def make_inputs(batch: int, views: int, dim: int, device: torch.device, seed: int = 0):
    """L2-normalised features (B, V, D) and long-tailed labels of 87 classes (Zipf-like weights)."""
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(batch, views, dim, generator=g), dim=-1)
    weights = 1.0 / torch.arange(1, N_CLASSES + 1, dtype=torch.float64)
    labels = torch.multinomial(weights, batch, replacement=True, generator=g)
    return feats.to(device), labels.to(device)


def step(fn: Callable, feats: torch.Tensor, labels: Optional[torch.Tensor], mode: str):
    """One forward + backward; returns (loss, gradient of the features)."""
    x = feats.detach().requires_grad_(True)
    loss = fn(x, labels, temperature=TEMPERATURE, base_temperature=TEMPERATURE, contrast_mode=mode)
    loss.backward()
    return loss.detach(), x.grad


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- peak memory

def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024  # kB -> bytes
    return out


def _child_peak(impl: str, kind: str, mode: str, batch: int, views: int, dim: int, threads: int) -> None:
    """(subprocess) Print the peak-RSS growth of one forward + backward, median of 3 steps."""
    torch.set_num_threads(threads)
    feats, labels = make_inputs(batch, views, dim, torch.device("cpu"))
    labels = labels if kind == "supcon" else None
    step(IMPLS[impl], feats, labels, mode)  # warm-up: kernels, thread pools
    peaks = []
    for _ in range(3):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        before = _proc_status()
        loss, grad = step(IMPLS[impl], feats, labels, mode)
        after = _proc_status()
        peaks.append(after["VmHWM"] - before["VmRSS"])
        del loss, grad
    print(json.dumps({"peak": statistics.median(peaks)}))


def peak_cpu(impl: str, kind: str, mode: str, batch: int, views: int, dim: int, threads: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", impl, kind, mode,
           str(batch), str(views), str(dim), str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak"])


def peak_cuda(impl: str, feats, labels, mode: str, device: torch.device) -> float:
    step(IMPLS[impl], feats, labels, mode)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    loss, grad = step(IMPLS[impl], feats, labels, mode)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del loss, grad
    return float(peak)


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 256 instead of 1024")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per implementation")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--_child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        impl, kind, mode, b, v, d, t = args._child
        _child_peak(impl, kind, mode, int(b), int(v), int(d), int(t))
        return 0

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch, views, dim = (256 if args.quick else 1024), 2, 128
    repeats = args.repeats or (5 if args.quick else 15)
    N = batch * views
    nn_bytes = N * N * 4
    feats, labels = make_inputs(batch, views, dim, device)
    print(f"SupCon loss: batch {batch} x {views} views x {dim}-d (N = {N}), T = {TEMPERATURE}, "
          f"{N_CLASSES} long-tailed classes, device {device}, torch {torch.__version__}, "
          f"{args.threads} CPU thread(s), median of {repeats} forward+backward")
    print(f"one (N, N) float32 matrix = {nn_bytes / 2**20:.1f} MiB")
    print()
    header = (f"{'loss':<14} {'ours ms':>9} {'ref ms':>9} {'time ratio':>10}   "
              f"{'ours MiB':>9} {'ref MiB':>9} {'(NxN units)':>13} {'mem ratio':>9}   {'|dloss|':>8} {'|dgrad|':>8}")
    print(header)
    print("-" * len(header))
    ok = True
    for kind, mode in ROWS:
        lab = labels if kind == "supcon" else None
        # agreement (also the warm-up)
        l_ours, g_ours = step(supcon_loss, feats, lab, mode)
        l_ref, g_ref = step(reference_supcon, feats, lab, mode)
        dloss = abs(l_ours.item() - l_ref.item())
        dgrad = (g_ours - g_ref).abs().max().item()
        ok &= dloss <= 1e-5 and dgrad <= 1e-5
        times: dict[str, list[float]] = {"ours": [], "reference": []}
        for _ in range(repeats):
            for name, fn in IMPLS.items():  # interleaved, so both see the same machine load
                sync(device)
                t0 = time.perf_counter()
                step(fn, feats, lab, mode)
                sync(device)
                times[name].append(time.perf_counter() - t0)
        t_ours, t_ref = (statistics.median(times[k]) * 1e3 for k in ("ours", "reference"))
        if device.type == "cuda":
            m_ours, m_ref = (peak_cuda(k, feats, lab, mode, device) for k in ("ours", "reference"))
        else:
            m_ours, m_ref = (peak_cpu(k, kind, mode, batch, views, dim, args.threads) for k in ("ours", "reference"))
        name = f"{kind} {mode}"
        print(f"{name:<14} {t_ours:9.2f} {t_ref:9.2f} {t_ours / t_ref:10.2f}   "
              f"{m_ours / 2**20:9.1f} {m_ref / 2**20:9.1f} {m_ours / nn_bytes:5.2f} / {m_ref / nn_bytes:5.2f} "
              f"{m_ours / m_ref:9.2f}   {dloss:8.1e} {dgrad:8.1e}")
    print()
    print("ratios are ours / reference (lower is better); "
          + ("losses and gradients agree to 1e-5" if ok else "DISAGREEMENT above 1e-5"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
