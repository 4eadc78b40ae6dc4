"""The one way images become vectors: stages 03 (k-NN validation), 04 (the store) and 07 (queries).

``embed_batch`` embeds a batch of transformed images (evaluation mode, no gradients; on CUDA:
AMP, channels_last, non-blocking copies) into L2-normalised float32 vectors. ``embed_paths``
streams a list of image files through a DataLoader into vectors with a progress bar; an
unreadable image, or one outside ``data.min_side`` / ``data.max_pixels``, is reported, never fatal.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ImageReadError, UserError

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def embed_batch(model: Any, x: torch.Tensor, embedding: str, amp: str, device: torch.device | str,
                channels_last: bool | None = None) -> torch.Tensor:
    """(B, D) float32 L2-normalised vectors of a batch of transformed images, on ``device``.

    ``embedding``: ``encoder`` (``model.encoder(x)``, the backbone's pooled output) or ``head``
    (``model(x)``). ``amp`` (bf16 | fp16 | off) and channels_last (default: on CUDA) apply on
    CUDA only. The model must already be on ``device`` and in eval mode.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if embedding not in ("encoder", "head"):
        raise UserError(f"extract.embedding: expected encoder or head, got {embedding!r}")
    x = x.to(device, non_blocking=cuda)
    if cuda and (channels_last if channels_last is not None else True):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=AMP_DTYPES.get(amp, torch.float32),
                                                enabled=cuda and amp in AMP_DTYPES):
        out = model.encoder(x) if embedding == "encoder" else model(x)
        # the head's output is already normalised, but in AMP precision: renormalise in float32
        return F.normalize(out.float().flatten(1), dim=1)


def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The model on ``device`` in eval mode (channels_last memory format on CUDA when asked)."""
    model = model.to(device).eval()
    if device.type == "cuda" and channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------- inputs


class SafeImages:
    """Map-style dataset over image paths that never raises on a bad image.

    ``__getitem__`` returns ``(tensor, index, "")`` or, for an unreadable image, ``(zeros, index,
    reason)``: one corrupt file in a folder of new images is reported, not fatal.
    """

    def __init__(self, paths: Sequence[str], transform: Callable, image_size: int, min_side: int = 1,
                 max_pixels: int | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.image_size = image_size
        self.min_side, self.max_pixels = min_side, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from .data import check_size, load_rgb

        try:
            why = check_size(self.paths[i], self.min_side, self.max_pixels)
            if why:
                return torch.zeros(3, self.image_size, self.image_size), i, why
            return self.transform(load_rgb(self.paths[i])), i, ""
        except ImageReadError as e:
            reason = str(e).splitlines()[0] if str(e) else "unreadable image"
            reason = reason.removeprefix(f"{self.paths[i]}: ")  # the path has its own column
        except (OSError, ValueError) as e:  # a decoder error that load_rgb let through
            reason = f"{e.__class__.__name__}: {e}".splitlines()[0]
        return torch.zeros(3, self.image_size, self.image_size), i, reason


def _collate(batch: Any) -> tuple:
    xs, idx, reasons = zip(*batch)
    return torch.stack(xs), list(idx), list(reasons)


def embed_paths(paths: Sequence[str], model: Any, transform: Callable, image_size: int, *,
                embedding: str, batch_size: int, num_workers: int, device: Any, amp: str = "off",
                channels_last: bool | None = None, min_side: int = 1, max_pixels: int | None = None) -> tuple[np.ndarray, list[int], list[tuple[str, str]], dict]:
    """Embed images in batches with a progress bar; unreadable ones are skipped and reported.

    Returns (vectors (N_ok, D) float32 L2-normalised, indices of the embedded paths, [(path, reason)]
    for the unreadable ones, timing: ``loader_wait_s`` (decoding and transforms, or waiting for the
    workers doing them), ``embed_s`` (forward passes), ``decode_embed_s`` (both)).
    Images are embedded by ``embed_batch``, the code that filled the store: same vectors, same numbers.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    device = torch.device(device) if device is not None else torch.device("cpu")
    ds = SafeImages(paths, transform, image_size, min_side, max_pixels)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    vecs: list[np.ndarray] = []
    ok: list[int] = []
    errors: list[tuple[str, str]] = []
    t_wait = t_embed = 0.0
    t0 = time.perf_counter()
    it = iter(loader)
    with tqdm(total=len(ds), desc="embedding", unit="img", disable=None) as bar:
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
                v = embed_batch(model, xb, embedding, amp, device, channels_last)  # (B, D)
                vecs.append(v.cpu().numpy().astype(np.float32, copy=False))
                ok += [idx[j] for j in good]
            t_embed += time.perf_counter() - tb
            bar.update(len(reasons))
    total = time.perf_counter() - t0
    dim = vecs[0].shape[1] if vecs else 0
    X = np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)
    return X, ok, errors, {"loader_wait_s": t_wait, "embed_s": t_embed, "decode_embed_s": total}
