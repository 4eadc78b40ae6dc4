"""common/stats.py (stage 02): exact mean and std against a direct numpy computation."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.config.load import load_config
from common.data.splits import SPLITS_COLUMNS
from common.data.stats import channel_histogram, histogram_moments, mean_std, read_stats
from common.errors import ImageReadError


def _folder(tmp_path) -> list[str]:
    """Grey and colour, square and non-square (both orientations, odd padding), PNG and JPEG."""
    rng = np.random.default_rng(0)
    paths = []
    specs = [("L", 20, 33, "png"), ("RGB", 31, 12, "png"), ("L", 16, 16, "jpg"), ("RGB", 9, 40, "jpg"),
             ("RGBA", 25, 18, "png"), ("L", 7, 50, "png")]
    for i, (mode, w, h, fmt) in enumerate(specs):
        shape = (h, w) if mode == "L" else (h, w, len(mode))
        a = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if mode == "RGBA":
            a[..., 3] = 255
        p = tmp_path / f"img{i}.{fmt}"
        Image.fromarray(a, mode=mode).save(p, format="JPEG" if fmt == "jpg" else "PNG")
        paths.append(str(p))
    return paths


def _direct_numpy(paths, size, fill):
    """What the network sees, written out by hand: RGB, pad to square, resize, /255; float64 moments."""
    pix = []
    for p in paths:
        a = np.asarray(Image.open(p).convert("RGB"))
        h, w = a.shape[:2]
        s = max(h, w)
        sq = np.full((s, s, 3), fill, np.uint8)
        top, left = (s - h) // 2, (s - w) // 2
        sq[top:top + h, left:left + w] = a
        r = np.asarray(Image.fromarray(sq).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64) / 255
        pix.append(r.reshape(-1, 3))
    x = np.concatenate(pix)
    return x.mean(0), x.std(0), len(x)


@pytest.mark.parametrize("size,fill", [(16, 0), (24, 37)])
def test_mean_std_equals_direct_numpy(tmp_path, size, fill):
    paths = _folder(tmp_path)
    st = mean_std(paths, size, fill, batch_size=4, num_workers=0)
    mean, std, n = _direct_numpy(paths, size, fill)
    np.testing.assert_allclose(st["mean"], mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(st["std"], std, rtol=0, atol=1e-6)
    assert st["pixels"] == n == len(paths) * size * size and st["images"] == len(paths)
    assert st["image_size"] == size and st["pad_fill"] == fill


def test_batch_size_and_workers_do_not_change_the_result(tmp_path):
    paths = _folder(tmp_path)
    a = mean_std(paths, 16, 5, batch_size=1, num_workers=0)
    b = mean_std(paths, 16, 5, batch_size=5, num_workers=1)
    assert a == b  # integer histograms: bit-identical, not just close


def test_histogram_moments_known_answers():
    h = np.zeros((3, 256), np.int64)
    h[:, 0] = 10
    h[:, 255] = 10
    mean, std, n = histogram_moments(h)
    assert mean == [0.5] * 3 and std == [0.5] * 3 and n == 20
    # tiny spread on a large mean: exact, where E[x^2] - E[x]^2 in float32 would lose it
    h = np.zeros((3, 256), np.int64)
    h[:, 200] = 10**9
    h[:, 201] = 10**9
    mean, std, _ = histogram_moments(h)
    assert mean[0] == pytest.approx(200.5 / 255, abs=1e-15) and std[0] == pytest.approx(0.5 / 255, rel=1e-12)


def test_stage_02_writes_train_stats(tmp_path):
    from types import SimpleNamespace

    from common.stages import stats as S2

    paths = _folder(tmp_path)
    (tmp_path / "01_random_split_dataset").mkdir()
    splits = tmp_path / "01_random_split_dataset" / "splits.csv"
    with open(splits, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SPLITS_COLUMNS)
        for i, p in enumerate(paths):
            w.writerow([p, "a", "train" if i % 3 else "test", "h", 1, 1, "L"])
    cfg = load_config([], ["model.image_size=12", "data.pad_fill=3", "data.num_workers=0", "stats.batch_size=2"])
    out = tmp_path / "stats.json"
    ctx = SimpleNamespace(cfg=cfg, upstream=lambda name: tmp_path / name, output=lambda name: out,
                          device=lambda: torch.device("cpu"))
    m = S2.main(ctx)
    st = read_stats(out)
    train = [p for i, p in enumerate(paths) if i % 3]
    mean, std, n = _direct_numpy(train, 12, 3)
    np.testing.assert_allclose(st["mean"], mean, atol=1e-6)
    np.testing.assert_allclose(st["std"], std, atol=1e-6)
    assert st["images"] == len(train) == m["images"] and st["pixels"] == n
    assert set(json.loads(out.read_text())) >= {"mean", "std", "pixels", "images", "image_size", "pad_fill"}


def test_unreadable_image_in_a_worker_names_the_file(tmp_path):
    paths = _folder(tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nrubbish")
    with pytest.raises(ImageReadError) as e:
        mean_std(paths + [str(broken)], 8, 0, batch_size=4, num_workers=1)
    assert str(e.value).startswith(str(broken)) and "\n" not in str(e.value)


def test_histogram_on_the_accelerator_matches_cpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    paths = _folder(tmp_path)
    cpu = channel_histogram(paths, 16, 0, 4, 0, torch.device("cpu"))
    gpu = channel_histogram(paths, 16, 0, 4, 0, torch.device("cuda"))
    np.testing.assert_array_equal(cpu, gpu)
