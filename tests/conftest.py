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
