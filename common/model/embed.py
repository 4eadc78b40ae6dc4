"""The one way images become vectors: stages 03 (k-NN validation), 04 (the store) and 07 (queries).

``embed_batch`` embeds a batch of transformed images (evaluation mode, no gradients) into
L2-normalised float32 vectors: on CUDA with AMP (``extract.amp``), channels_last and
non-blocking copies; on a CPU with channels_last and, for ``cpu_precision="bf16"``
(``extract.cpu_precision``, resolved by ``device.resolve_cpu_precision``), bfloat16 autocast.
Either way the vectors are normalised in float32 after the forward. ``CompiledCpuModel`` adds
``torch.compile`` (inductor, weights frozen) on a CPU for long jobs (``extract.cpu_compile``,
off by default: see below).
``embed_paths`` streams a list of image files through a DataLoader into vectors with a progress
bar; an unreadable image, or one outside ``data.min_side`` / ``data.max_pixels``, is reported,
never fatal.

CPU figures (``benchmarks/bench_embed.py``, SE-ResNeXt-50 at 224 px, on a shared 2-core Xeon
with AMX-BF16): channels_last, batch norms folded (``fold_batchnorm``) and bfloat16 autocast
2.4-2.5x the former float32 path (2.2-3.0x without the folding), every vector's cosine to the
float32 one above 0.9999, the demo's predictions unchanged; compiled with frozen weights
3.5-4.9x, but opt-in: it needs a C++ compiler and a minute per process, makes the vectors depend
on whether a job was long enough to compile, and before the folding it changed one top-1 answer
of the demo's 268 (a near-tie: two gallery images 4.5e-4 apart in float32). ONNX Runtime
(float32; its CPU provider has no bfloat16 convolutions) 1.2-1.3x: not used.
"""
from __future__ import annotations

import logging
import shutil
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.datasets import SafeImages, _collate
from ..errors import UserError

log = logging.getLogger(__name__)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# extract.cpu_compile compiles when a process has at least this many images to embed: compiling
# SE-ResNeXt-50 takes about a minute (once per process) and then saves about 0.03 s per image.
CPU_COMPILE_MIN_IMAGES = 2000


def embed_batch(model: Any, x: torch.Tensor, embedding: str, amp: str, device: torch.device | str,
                channels_last: bool | None = None, cpu_precision: str = "fp32") -> torch.Tensor:
    """(B, D) float32 L2-normalised vectors of a batch of transformed images, on ``device``.

    ``embedding``: ``encoder`` (``model.encoder(x)``, the backbone's pooled output) or ``head``
    (``model(x)``). ``amp`` (bf16 | fp16 | off) applies on CUDA, ``cpu_precision`` (fp32 | bf16,
    already resolved) on a CPU; channels_last (default on) on both. The model must already be on
    ``device`` in eval mode (``prepare_model``), in the same memory format.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if embedding not in ("encoder", "head"):
        raise UserError(f"extract.embedding: expected encoder or head, got {embedding!r}")
    x = x.to(device, non_blocking=cuda)
    if channels_last if channels_last is not None else True:
        x = x.contiguous(memory_format=torch.channels_last)
    if cuda:
        dtype, on = AMP_DTYPES.get(amp, torch.float32), amp in AMP_DTYPES
    else:
        dtype, on = torch.bfloat16, cpu_precision == "bf16"
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=dtype, enabled=on):
        out = model.encoder(x) if embedding == "encoder" else model(x)
        # the head's output is already normalised, but in AMP precision: renormalise in float32
        return F.normalize(out.float().flatten(1), dim=1)


def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The model on ``device`` in eval mode (channels_last memory format when asked); on a CPU with
    its backbone's batch norms folded into their convolutions (``fold_batchnorm``)."""
    model = model.to(device).eval()
    if torch.device(device).type == "cpu":
        fold_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def fold_batchnorm(model: torch.nn.Module) -> bool:
    """Replace ``model.backbone`` (eval mode) by a copy whose batch norms are folded into the
    convolutions before them (``torch.fx``: ``w * gamma / sqrt(var + eps)``, computed in float32):
    one pass over each activation instead of two, about 1.25x the CPU speed of SE-ResNeXt-50 in
    bfloat16; the vectors move by rounding only. A backbone that ``torch.fx`` cannot trace is left
    as it is. Returns whether it folded."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or backbone.training:
        return False
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(backbone)
    except Exception as e:  # noqa: BLE001 - tracing fails on dynamic control flow: run it unfused
        log.debug("batch norms not folded (%s: %s)", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
    for name in ("num_features", "pretrained_cfg", "default_cfg"):  # what timm code may read off a backbone
        if hasattr(backbone, name):
            setattr(fused, name, getattr(backbone, name))
    model.backbone = fused
    return True


def use_cpu_compile(enabled: bool, device: torch.device | str, n_images: int,
                    min_images: int = CPU_COMPILE_MIN_IMAGES) -> bool:
    """Whether to ``torch.compile`` the embedding (``extract.cpu_compile``): on a CPU, with at least
    ``min_images`` images to embed (and one) and a C++ compiler (inductor needs one)."""
    if not enabled or torch.device(device).type != "cpu" or n_images < max(1, min_images):
        return False
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


class CompiledCpuModel:
    """A model's ``encoder`` and forward through ``torch.compile`` (inductor, weights frozen: the
    convolutions' weights prepacked for oneDNN), for ``embed_batch`` on a CPU.

    Every batch is padded to ``batch_size`` rows (rows are independent in eval mode) so that one
    compiled graph serves the whole job, the last short batch included. When compiling fails (no
    C++ compiler, an unsupported operator) the model runs uncompiled, said in one line.
    """

    def __init__(self, model: torch.nn.Module, batch_size: int):
        self.model, self.batch_size = model, int(batch_size)
        self._fns: dict[str, Any] = {}
        self.failed: str | None = None

    def encoder(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._run("encoder", x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run("head", x)

    def _run(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        eager = self.model.encoder if kind == "encoder" else self.model
        if self.failed is not None:
            return eager(x)
        n = x.shape[0]
        if n > self.batch_size:
            return torch.cat([self._run(kind, x[a:a + self.batch_size]) for a in range(0, n, self.batch_size)])
        if n < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))]).contiguous(
                memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                else torch.contiguous_format)
        first = kind not in self._fns
        if first:
            self._fns[kind] = torch.compile(eager, dynamic=False, options={"freezing": True})
            t0 = time.perf_counter()
        try:
            out = self._fns[kind](x)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the uncompiled model gives the same vectors
            if not first:
                raise
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning("torch.compile failed (%s): embedding without it (extract.cpu_compile=false skips the "
                        "attempt)", self.failed)
            return eager(x[:n])
        if first:
            log.info("compiled the %s forward for the CPU in %.1f s (extract.cpu_compile)", kind,
                     time.perf_counter() - t0)
        return out[:n]


def embed_paths(paths: Sequence[str], model: Any, transform: Callable, image_size: int, *,
                embedding: str, batch_size: int, num_workers: int, device: Any, amp: str = "off",
                channels_last: bool | None = None, min_side: int = 1, max_pixels: int | None = None,
                cpu_precision: str = "fp32", cpu_compile: bool = False,
                compile_min_images: int = CPU_COMPILE_MIN_IMAGES) -> tuple[np.ndarray, list[int], list[tuple[str, str]], dict]:
    """Embed images in batches with a progress bar; unreadable ones are skipped and reported.

    Returns (vectors (N_ok, D) float32 L2-normalised, indices of the embedded paths, [(path, reason)]
    for the unreadable ones, timing: ``loader_wait_s`` (decoding and transforms, or waiting for the
    workers doing them), ``embed_s`` (forward passes), ``decode_embed_s`` (both)).
    Images are embedded by ``embed_batch``, the code that filled the store: same vectors, same numbers
    (``cpu_precision``: the store's, from ``model.json``; ``cpu_compile``: ``extract.cpu_compile``).
    """
    from torch.utils.data import DataLoader
    from ..runtime.progress import progress

    device = torch.device(device) if device is not None else torch.device("cpu")
    ds = SafeImages(paths, transform, image_size, min_side, max_pixels)
    if use_cpu_compile(cpu_compile, device, len(ds), compile_min_images):
        model = CompiledCpuModel(model, batch_size)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    vecs: list[np.ndarray] = []
    ok: list[int] = []
    errors: list[tuple[str, str]] = []
    t_wait = t_embed = 0.0
    t0 = time.perf_counter()
    it = iter(loader)
    with progress(len(ds), "embedding", unit="img") as bar:  # no terminal: a log line every ~30 s
        while True:
            ta = time.perf_counter()
            try:
                x, idx, reasons = next(it)
            except StopIteration:
                break
            tb = time.perf_counter()
            t_wait += tb - ta
            good = [j for j, r in enumerate(reasons) if not r]
            for j, r in enumerate(reasons):
                if r:
                    errors.append((ds.paths[idx[j]], r))
                    log.warning("unreadable image %s: %s", ds.paths[idx[j]], r)
            if good:
                xb = x if len(good) == len(reasons) else x[good]
                v = embed_batch(model, xb, embedding, amp, device, channels_last, cpu_precision)  # (B, D)
                vecs.append(v.cpu().numpy().astype(np.float32, copy=False))
                ok += [idx[j] for j in good]
            t_embed += time.perf_counter() - tb
            bar.update(len(reasons))
    total = time.perf_counter() - t0
    dim = vecs[0].shape[1] if vecs else 0
    X = np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)
    return X, ok, errors, {"loader_wait_s": t_wait, "embed_s": t_embed, "decode_embed_s": total}
