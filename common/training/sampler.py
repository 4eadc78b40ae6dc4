"""Batches for SupCon: two views per image, epoch-seeded sampling that resumes mid-epoch."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..data.augment import TwoViews
from ..data.images import load_rgb

# ----------------------------------------------------------------------------- data


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's two views at one epoch (independent of workers and resume)."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, index])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & 0x7FFFFFFFFFFFFFFF)


class TwoViewDataset(torch.utils.data.Dataset):
    """Training images as two augmented views: key ``(epoch, index)`` -> ``((2, 3, S, S), label, index)``.

    The views of an image at an epoch are drawn from torch's generator seeded by
    ``sample_seed(seed, epoch, index)`` inside ``fork_rng`` (the caller's generator is left alone; no
    GPU generator is touched).
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], views: TwoViews, seed: int):
        self.paths = [str(p) for p in paths]
        self.labels = [int(x) for x in labels]
        self.views = views
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def views_of(self, epoch: int, index: int, img: Any = None) -> torch.Tensor:
        """The two views ``(2, 3, S, S)`` of image ``index`` at ``epoch``."""
        img = load_rgb(self.paths[index]) if img is None else img
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also seed every CUDA/XPU/MTIA device
            # (state fork_rng(devices=[]) does not restore) or, before CUDA starts, queue a seed
            # with a formatted stack trace per image (0.13 ms each here, 25x the CPU seed alone)
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return torch.stack(self.views(img))

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        epoch, index = key
        return self.views_of(epoch, index), self.labels[index], index


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's batches of ``(epoch, index)`` keys; the order is a function of (seed, epoch).

    Global step ``s`` of an epoch takes positions ``[s*B*W, (s+1)*B*W)`` of the epoch's permutation
    (``torch.randperm`` seeded with ``seed + epoch``, as ``DistributedSampler``); rank ``r`` takes
    its ``B`` consecutive positions, so the global batch is the same whatever ``W``. The tail that
    does not fill a global batch is dropped (equal batch sizes everywhere), and ``start_step``
    skips the steps already done (resume).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 max_steps: int | None = None):
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        full = self.n // (self.batch_size * self.world_size)
        self.steps_per_epoch = min(full, max_steps) if max_steps else full
        self.epoch, self.start_step = 1, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = int(epoch), int(start_step)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.permutation(self.epoch).tolist()
        gb = self.batch_size * self.world_size
        for s in range(self.start_step, self.steps_per_epoch):
            lo = s * gb + self.rank * self.batch_size
            yield [(self.epoch, i) for i in perm[lo:lo + self.batch_size]]
