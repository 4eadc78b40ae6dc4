"""Shared test set-up: small, CPU-only, quiet."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def exif_rotated_jpeg():
    """Factory: ``make(path, orientation=6)`` writes a 40 x 24 JPEG (dark left half, bright right
    half) whose EXIF orientation is ``orientation``. 6 means "rotate 90 degrees clockwise to
    display": upright it is 24 x 40 with the dark half on top."""
    import numpy as np
    from PIL import Image

    def make(path: Path, orientation: int = 6) -> Path:
        a = np.zeros((24, 40), np.uint8)
        a[:, 20:] = 255
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(a, "L").save(path, format="JPEG", exif=exif, quality=95)
        return path

    return make
