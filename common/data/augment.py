"""Training augmentations: two random views of every image (SupCon's positive pairs).

The train transform follows the reference SupContrast ``main_supcon.py`` (random resized crop,
flip, colour jitter with p=0.8, greyscale with p=0.2), adapted to dark-field plankton images:

    RGB -> pad to square (data.pad_fill) -> random resized crop (train.crop_scale) -> horizontal /
    vertical flip -> random 90-degree rotation (plankton has no "up") -> colour jitter with
    probability -> random greyscale -> tensor in [0, 1] -> normalise (stats.json)

Every random choice draws from torch's global generator, so a caller that seeds it per image
(``common.train`` does, from (seed, epoch, index)) gets the same views whatever the number of
DataLoader workers, and after a resume.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from ..config.schema import Config
from .transforms import PadToSquare


class RandomRot90:
    """Rotate by 0, 90, 180 or 270 degrees, chosen uniformly (PIL images or tensors ``(..., H, W)``)."""

    _PIL_OPS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)

    def __call__(self, img: Any) -> Any:
        k = int(torch.randint(0, 4, (1,)).item())
        if k == 0:
            return img
        if isinstance(img, torch.Tensor):
            return torch.rot90(img, k, dims=(-2, -1))
        return img.transpose(self._PIL_OPS[k])

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"


class TwoViews:
    """Apply ``transform`` twice to the same image: ``[view1, view2]`` (SupContrast's TwoCropTransform)."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]):
        self.transform = transform

    def __call__(self, img: Any) -> list[torch.Tensor]:
        return [self.transform(img), self.transform(img)]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.transform!r})"


def train_transform(cfg: Config, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """One random training view of an RGB PIL image, from ``cfg.train``, ``cfg.data`` and ``cfg.model``.

    Geometry and colour run on the PIL image (Pillow's resize is fast on uint8); the result is a
    normalised float32 tensor ``(3, S, S)``, S = ``model.image_size``.
    """
    t = cfg.train
    size = cfg.model.image_size
    ops: list[Any] = [
        PadToSquare(cfg.data.pad_fill),
        v2.RandomResizedCrop(size, scale=(float(t.crop_scale[0]), float(t.crop_scale[1])),
                             interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
    ]
    if t.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=t.hflip))
    if t.vflip > 0:
        ops.append(v2.RandomVerticalFlip(p=t.vflip))
    if t.rot90:
        ops.append(RandomRot90())
    b, c, s, h = (float(x) for x in t.color_jitter)
    if t.color_jitter_p > 0 and any(x > 0 for x in (b, c, s, h)):
        ops.append(v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=t.color_jitter_p))
    if t.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(p=t.grayscale_p))
    ops += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(ops)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``Normalize``: ``x * std + mean``, clipped to [0, 1] (``(3, H, W)`` or ``(B, 3, H, W)``)."""
    m = torch.as_tensor(list(mean), dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(list(std), dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp_(0.0, 1.0)
