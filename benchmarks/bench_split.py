"""Benchmark of stage 01's scan and stage 02's statistics, with ratios against baselines run here.

1. Scan (read + sha256 + full decode) of synthetic plankton images (80-320 px, PNG and JPEG):
   1 process (baseline) against ``data.num_workers`` = 2 and 4 processes.
2. Stage 02 end to end (decode, pad, resize, histogram): in process (baseline) against 2
   DataLoader workers; then the accumulation alone on the same uint8 batches: the exact
   256-level histogram (stage 02) against float64 sums and sums of squares (baseline), and
   the error of float32 sums.
3. The split itself at DYB-PlanktonNet scale (47k images, 87 imbalanced classes, 2% duplicates).

Usage: python benchmarks/bench_split.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.data.datasets import ImageListDataset  # noqa: E402
from common.data.demo import make_synthetic_plankton  # noqa: E402
from common.data.listing import list_image_folder  # noqa: E402
from common.data.scan import Scan, scan_files  # noqa: E402
from common.data.split import make_split  # noqa: E402
from common.data.stats import channel_histogram, histogram_moments  # noqa: E402
from common.data.transforms import square_uint8_transform  # noqa: E402


def _time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_scan(root: Path) -> None:
    files = list_image_folder(root).files
    print(f"\n[1] scan: {len(files)} files (read, sha256, header checks, full decode)")
    base = None
    for workers in (0, 2, 4):
        t = _time(lambda w=workers: scan_files(files, 4, 89_478_485, w))
        base = base or t
        label = "1 process (baseline)" if workers == 0 else f"{workers} worker processes"
        print(f"    {label:<24} {t:7.2f} s  {len(files) / t:8.0f} images/s  speed-up x{base / t:.2f}")


def bench_stats(root: Path, image_size: int) -> None:
    files = list_image_folder(root).files
    ds = ImageListDataset([p for p, _ in files], transform=square_uint8_transform(image_size, 0))
    batches = [x for x, _, _ in torch.utils.data.DataLoader(ds, batch_size=64)]
    n_pix = sum(b.shape[0] for b in batches) * image_size * image_size
    print(f"\n[2] mean/std accumulation: {len(ds)} images at {image_size} px ({n_pix / 1e6:.1f} M pixels per channel)")

    def hist():
        h = torch.zeros(3, 256, dtype=torch.int64)
        for x in batches:
            for c in range(3):
                h[c] += torch.bincount(x[:, c].reshape(-1), minlength=256)
        return histogram_moments(h.numpy())

    def sums(dtype):
        s1 = torch.zeros(3, dtype=torch.float64)
        s2 = torch.zeros(3, dtype=torch.float64)
        n = 0
        for x in batches:
            f = x.to(dtype) / 255.0
            s1 += f.sum(dim=(0, 2, 3)).double()
            s2 += (f * f).sum(dim=(0, 2, 3)).double()
            n += x.shape[0] * x.shape[2] * x.shape[3]
        mean = s1 / n
        return mean.tolist(), (s2 / n - mean * mean).clamp_min(0).sqrt().tolist(), n

    t64 = _time(lambda: sums(torch.float64), 3)
    th = _time(hist, 3)
    t32 = _time(lambda: sums(torch.float32), 3)
    (mh, sh, _), (_, s64, _), (m32, s32, _) = hist(), sums(torch.float64), sums(torch.float32)
    paths = [p for p, _ in files]
    base = None
    for workers in (0, 2):
        t = _time(lambda w=workers: channel_histogram(paths, image_size, 0, 64, w))
        base = base or t
        label = "in process (baseline)" if workers == 0 else f"{workers} DataLoader workers"
        print(f"    stage 02 end to end, {label:<22} {t:6.2f} s  {len(paths) / t:7.0f} images/s  x{base / t:.2f}")
    print(f"    float64 sums (baseline)  {t64 * 1e3:8.1f} ms  max |std - exact| {max(abs(a - b) for a, b in zip(s64, sh)):.1e}")
    print(f"    exact histogram          {th * 1e3:8.1f} ms  x{t64 / th:.2f} vs baseline, exact by construction")
    print(f"    float32 sums             {t32 * 1e3:8.1f} ms  x{t64 / t32:.2f}, max |std - exact| "
          f"{max(abs(a - b) for a, b in zip(s32, sh)):.1e}, max |mean - exact| {max(abs(a - b) for a, b in zip(m32, mh)):.1e}")


def bench_split_rule(n_images: int) -> None:
    rng = np.random.default_rng(0)
    # Class sizes falling from 7,760 to 2 like DYB-PlanktonNet's (log size concave in the rank,
    # bent until the total is n_images).
    t = np.linspace(0, 1, 87)
    lo, hi = 0.05, 20.0
    for _ in range(60):  # bisection on the bend
        bend = (lo + hi) / 2
        sizes = np.round(np.exp(np.log(7760) + (np.log(2) - np.log(7760)) * t ** bend)).astype(int)
        lo, hi = (bend, hi) if sizes.sum() < n_images else (lo, bend)
    scans = []
    for c, n in enumerate(sizes):
        for i in range(n):
            h = f"{c}-{i}" if rng.random() > 0.02 else f"{c}-dup{rng.integers(0, 20)}"
            scans.append(Scan(f"/d/class_{c:02d}/{i:05d}.jpg", f"class_{c:02d}", "image", sha256=h))
    classes = sorted({s.label for s in scans})
    t = _time(lambda: make_split(scans, classes, (0.7, 0.15, 0.15), 2, 42), 3)
    res = make_split(scans, classes, (0.7, 0.15, 0.15), 2, 42)
    print(f"\n[3] split rule: {len(scans)} images, {len(classes)} classes (largest {sizes.max()}, smallest "
          f"{sizes.min()}), {len(res.dup_groups)} duplicate groups: {t * 1e3:.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    a = p.parse_args()
    per_class, n_classes = (40, 8) if a.quick else (150, 12)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; synthetic images: "
          f"{n_classes} classes x {per_class}")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_plankton(Path(tmp) / "img", classes=n_classes, per_class=per_class, seed=0,
                                       size_range=(80, 320))
        bench_scan(root)
        bench_stats(root, 64 if a.quick else 224)
    bench_split_rule(47_000)  # cheap (no I/O): full DYB scale even with --quick


if __name__ == "__main__":
    main()
