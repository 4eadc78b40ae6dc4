"""One place to seed every random number generator (timm's ``random_seed`` habit)."""
from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard requirement
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker seeding: derive NumPy/random seeds from torch's per-worker seed."""
    import torch

    s = torch.initial_seed() % (2**32)
    np.random.seed(s)
    random.seed(s)
