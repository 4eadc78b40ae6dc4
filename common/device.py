"""Device selection: CUDA when present, the CPU otherwise, the same code on both."""
from __future__ import annotations

import os

import torch

from .errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``run.device`` (auto | cpu | cuda | cuda:N) into a ``torch.device``.

    Under torchrun each process takes the GPU of its ``LOCAL_RANK``.
    """
    spec = (spec or "auto").strip().lower()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device is {spec!r} but no CUDA GPU is visible (use run.device=cpu or auto)")
        if spec == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        idx = int(spec.split(":", 1)[1])
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"run.device is {spec!r} but only {torch.cuda.device_count()} GPU(s) are visible")
        return torch.device("cuda", idx)
    raise ConfigError(f"run.device: expected auto, cpu, cuda or cuda:N, got {spec!r}")


def describe(device: torch.device) -> str:
    """Human-readable device name for logs and manifests."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
