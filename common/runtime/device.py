"""Device selection: CUDA when present, the CPU otherwise, the same code on both.

Under torchrun the device is resolved first and the process-group backend follows from it
(``plan_processes``): NCCL for CUDA, gloo for the CPU (also on a machine whose GPUs are visible:
``run.device=cpu``). Each process takes the GPU of its ``LOCAL_RANK``; ``run.device=cuda:N`` with
more than one process, and more processes on a machine than it has GPUs, are refused in one line.

CPU precision of the embedding forward (stages 04 and 07, ``extract.cpu_precision``):
``resolve_cpu_precision`` turns ``auto`` into ``bf16`` when the CPU computes bfloat16 natively
(AVX512-BF16 or AMX-BF16: ``cpu_flags``), ``fp32`` otherwise.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..errors import ConfigError

CPU_PRECISIONS = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags that mean native bfloat16 arithmetic (dot products of bf16 pairs into float32)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class ProcessPlan:
    """What a process of a run uses: its device and, under torchrun, the process-group backend."""

    device: torch.device
    backend: str | None  # "nccl" | "gloo" | None (one process)


def plan_processes(spec: str, world: int, local_rank: int, local_world: int, cuda: bool, n_gpus: int) -> ProcessPlan:
    """Device and backend of one process, from ``run.device`` and the launch facts (pure: tested directly).

    ``world``: processes in the run (``WORLD_SIZE``); ``local_rank``/``local_world``: this
    process's index among, and the number of, the run's processes on this machine; ``cuda`` and
    ``n_gpus``: what this machine's torch sees. Raises ``ConfigError`` (one line) for a device that
    is absent or cannot be shared out: ``cuda:N`` with several processes (every rank on one GPU),
    more processes on a machine than it has GPUs (NCCL refuses two ranks on one GPU).
    """
    spec = (spec or "auto").strip().lower()
    if spec not in ("auto", "cpu", "cuda") and not spec.startswith("cuda:"):
        raise ConfigError(f"run.device: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    if spec.startswith("cuda") and not cuda:
        raise ConfigError(f"run.device is {spec!r} but no CUDA GPU is visible (use run.device=cpu or auto)")
    backend = None if world <= 1 else "gloo"
    if spec == "cpu" or (spec == "auto" and not cuda):
        return ProcessPlan(torch.device("cpu"), backend)
    backend = None if world <= 1 else "nccl"
    if spec.startswith("cuda:"):
        try:
            idx = int(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"run.device: expected auto, cpu, cuda or cuda:N, got {spec!r}") from None
        if world > 1:
            raise ConfigError(f"run.device is {spec!r} but {world} processes were started: every process would "
                              "use that one GPU; use run.device=cuda (each process takes the GPU of its LOCAL_RANK), "
                              "or choose the GPUs with CUDA_VISIBLE_DEVICES")
        if not 0 <= idx < n_gpus:
            raise ConfigError(f"run.device is {spec!r} but only {n_gpus} GPU(s) are visible")
        return ProcessPlan(torch.device("cuda", idx), backend)
    if world > 1 and local_world > n_gpus:
        raise ConfigError(f"run.device is {spec!r} with {local_world} processes on this machine but only {n_gpus} "
                          f"GPU(s) are visible: start at most {n_gpus} (torchrun --nproc_per_node={n_gpus}), or "
                          "set run.device=cpu")
    return ProcessPlan(torch.device("cuda", local_rank if world > 1 else 0), backend)


def process_plan(spec: str = "auto") -> ProcessPlan:
    """``plan_processes`` for this process (torchrun's environment variables, this machine's GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cuda = torch.cuda.is_available()
    return plan_processes(spec, world, local_rank, local_world, cuda, torch.cuda.device_count() if cuda else 0)


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``run.device`` (auto | cpu | cuda | cuda:N) into a ``torch.device`` (see ``plan_processes``).

    Under torchrun each process takes the GPU of its ``LOCAL_RANK``.
    """
    return process_plan(spec).device


def describe(device: torch.device) -> str:
    """Human-readable device name for logs and manifests."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matrix products and convolutions on CUDA inside the block only (restored after it).

    Training's forward and backward use it; every similarity that ranks (stage 03's k-NN model
    selection, the LUT, retrieval) stays in full float32 outside it. A no-op when not ``enabled``.
    """
    if not enabled:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Plain float32 products inside the block (no TF32 / bf16 shortcut), bf16 products accumulated
    in float32 (cuBLAS may otherwise reduce split sums in bf16), and no autograd: what the error
    bounds of exact search and LUT pruning assume. The previous settings come back after it."""
    cuda = torch.backends.cuda.matmul
    prec, tf32, bf16 = (torch.get_float32_matmul_precision(), cuda.allow_tf32,
                        cuda.allow_bf16_reduced_precision_reduction)
    torch.set_float32_matmul_precision("highest")
    cuda.allow_tf32 = cuda.allow_bf16_reduced_precision_reduction = False
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_float32_matmul_precision(prec)
        cuda.allow_tf32, cuda.allow_bf16_reduced_precision_reduction = tf32, bf16


# ----------------------------------------------------------------------------- CPU precision


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``, Linux); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_native() -> bool:
    """True when the CPU computes bfloat16 products natively (AVX512-BF16 or AMX-BF16) and oneDNN uses them.

    Without such instructions bfloat16 is emulated (slower than float32), so ``auto`` stays fp32.
    """
    if sys.platform != "linux" or not torch.backends.mkldnn.is_available():
        return False
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private: may move between versions
    try:
        if probe is not None and probe():
            return True
    except RuntimeError:
        pass
    return bool(set(BF16_FLAGS) & cpu_flags())


def resolve_cpu_precision(spec: str) -> str:
    """``extract.cpu_precision`` (auto | fp32 | bf16) as ``fp32`` or ``bf16`` on this machine."""
    spec = (spec or "auto").strip().lower()
    if spec not in CPU_PRECISIONS:
        raise ConfigError(f"extract.cpu_precision: expected auto, fp32 or bf16, got {spec!r}")
    if spec == "auto":
        return "bf16" if cpu_bf16_native() else "fp32"
    return spec


def _device(vectors: Any, device: Any) -> torch.device:
    """``device``, else the device of a tensor ``vectors``, else the CPU."""
    if device is not None:
        return torch.device(device)
    return vectors.device if isinstance(vectors, torch.Tensor) else torch.device("cpu")
