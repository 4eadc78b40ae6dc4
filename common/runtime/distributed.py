"""Helpers for multi-process training (torchrun): rank facts, gathers, reductions, barriers.

SupCon needs the *global* batch: an anchor's positives and negatives are all the other views in
the batch, and the loss is not a sum of per-rank terms. Each rank therefore gathers every rank's
features (with gradients, ``gather_with_grad``) and labels, and computes
the same loss on the whole global batch.

Gradient scale, worked out (and checked in ``tests/runtime/test_distributed.py`` against one process on
the same global batch): let ``L`` be the loss of the global batch and ``f_r`` rank r's features.
Every rank computes the same ``L``. The backward of the gather *sums* the incoming gradients
over ranks (a reduce-scatter; gloo: all-reduce, then the rank's own rows), so rank r receives
``sum_over_ranks dL/df_r = W * dL/df_r`` for its own features (W = world size). Backpropagating,
rank r's parameter gradient is ``W * dL/dtheta|_(through f_r)``; DDP then *averages* over ranks:
``(1/W) * sum_r W * dL/dtheta|_(f_r) = dL/dtheta``, exactly the single-process gradient.
So with this all_gather **the loss must not be multiplied by W** (a gather whose backward only
keeps the local slice, as some SimCLR ports do, would need the factor W instead).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UserError



def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, rank order, differentiable (see module docstring).

    Every rank must pass a tensor of the same shape (equal batch sizes: drop_last everywhere).
    """
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the SUM over ranks of the gradient of its rows.

    The same contract as ``torch.distributed.nn.functional.all_gather`` (deprecated), written out
    because that one sends strided gradients through gloo's all-to-all as if they were contiguous
    (a transposed gradient, as a loss may hand back, arrived scrambled: found by
    ``tests/runtime/test_distributed.py``). Here the gradient is made contiguous first; NCCL reduce-scatters
    it, other backends (gloo) all-reduce it and keep their own rows.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        rank, world = dist.get_rank(), dist.get_world_size()
        x = x.contiguous()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)  # (world * n, ...)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # noqa: D102
        g = g.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            out = g.new_empty((ctx.n, *g.shape[1:]))
            dist.reduce_scatter_tensor(out, g, op=dist.ReduceOp.SUM)
            return out
        total = g.clone()  # never reduce autograd's own buffer in place
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


@torch.no_grad()
def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (no gradient: labels, indices)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def global_batch(features: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The global SupCon batch: features ``(W*B, V, D)`` with gradients, labels ``(W*B,)`` or None."""
    return gather_with_grad(features), (gather_nograd(labels) if labels is not None else None)


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (batch-norm running statistics) to every rank, in place."""
    if not is_distributed():
        return
    for b in module.buffers():
        dist.broadcast(b, src=src)


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def gather_strided(x_local: torch.Tensor, n: int) -> torch.Tensor:
    """Reassemble rows sharded as ``rows[rank::world]`` into all ``n`` rows, in order, on every rank.

    Each rank holds ``ceil`` or ``floor(n / world)`` rows; shards are padded to equal length for
    the collective and the padding dropped.
    """
    if not is_distributed():
        return x_local
    _, world = rank_world()
    m = -(-n // world)
    pad = x_local.new_zeros((m - x_local.shape[0], *x_local.shape[1:]))
    stacked = gather_nograd(torch.cat([x_local, pad], dim=0)).view(world, m, *x_local.shape[1:])
    # row j*world + r lives at stacked[r, j]
    return stacked.transpose(0, 1).reshape(world * m, *x_local.shape[1:])[:n]


# ----------------------------------------------------------------------------- go / no-go


class PeerFailed(RuntimeError):
    """Another rank failed unexpectedly (its traceback is in its own output): this rank stops too."""


def _flag_device() -> torch.device:
    """Where a collective's tensor must live: the current GPU for NCCL, the CPU otherwise."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(error: BaseException | None) -> None:
    """Go/no-go across ranks: every rank calls this at the same point, with what it raised there (or None).

    Returns when no rank failed. Otherwise every rank stops at once, instead of the healthy ones
    waiting in their next collective until the backend times out (NCCL: about 10 minutes): a rank
    that failed raises its own exception again; the others raise the first failed rank's, as one
    line: ``UserError("rank R stopped: ...")`` for a user error (exit 2 on every rank),
    ``KeyboardInterrupt`` for an interruption, ``PeerFailed`` otherwise. One 4-byte all-reduce when
    every rank is fine (cheap enough for every training step); the messages travel only on failure.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=_flag_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) == 0:
        return

    mine = None
    if error is not None:
        kind = "user" if isinstance(error, UserError) else "interrupt" if isinstance(error, KeyboardInterrupt) \
            else "other"
        line = str(error).splitlines()[0] if str(error) else type(error).__name__
        mine = (kind, line if kind == "user" else f"{type(error).__name__}: {line}")
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if error is not None:
        raise error
    rank, (kind, line) = next((r, m) for r, m in enumerate(every) if m is not None)
    if kind == "user":
        raise UserError(f"rank {rank} stopped: {line}")
    if kind == "interrupt":
        raise KeyboardInterrupt(f"rank {rank} was interrupted")
    raise PeerFailed(f"rank {rank} failed: {line}")


@contextlib.contextmanager
def go_no_go() -> Iterator[None]:
    """``with go_no_go(): <work that may fail on one rank only>``: every rank leaves the block
    together, all fine or all raising (``agree``). Every rank must enter the block; in one process
    it changes nothing."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:
        agree(e)
        raise
    agree(None)


def agreed(items: Iterable) -> Iterator:
    """``items`` (a DataLoader), each fetched under ``go_no_go``: an unreadable image on one rank
    stops every rank at that step. The identity in one process."""
    if not is_distributed():
        yield from items
        return
    it = iter(items)
    while True:
        done = False
        with go_no_go():
            try:
                item = next(it)
            except StopIteration:
                done = True
        if done:
            return
        yield item


def broadcast_object(obj: Any, rank: int, world: int) -> Any:
    """Rank 0's ``obj`` (small and picklable: a plan, an error line), on every rank."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(part: tuple[np.ndarray, np.ndarray, str | None], rank: int, world: int) -> list | None:
    if world == 1:
        return [part]
    import torch.distributed as dist

    out = [None] * world if rank == 0 else None
    dist.gather_object(part, out, dst=0)
    return out


def all_gather_objects(obj: Any, world: int) -> list:
    """Every rank's ``obj`` (small: an error line, a count), on every rank."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _init_distributed(device_spec: str) -> tuple[int, int]:
    """Under torchrun: the process group, its backend chosen by the device (``device.process_plan``:
    NCCL for CUDA, gloo for the CPU; ``ConfigError`` for a device the processes cannot share)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch
        import torch.distributed as dist

        from .device import process_plan

        if not dist.is_initialized():
            plan = process_plan(device_spec)
            if plan.device.type == "cuda":
                torch.cuda.set_device(plan.device)
            dist.init_process_group(backend=plan.backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world


def _go_no_go(world: int) -> Any:
    """``distributed.go_no_go`` under torchrun; nothing to share in one process (torch not imported)."""
    if world > 1:


        return go_no_go()
    return contextlib.nullcontext()
