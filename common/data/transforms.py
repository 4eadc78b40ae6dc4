"""What the network sees: pad to a square, resize, normalise, and the preprocessing record a checkpoint
carries.

The network sees every image the same way, whatever its size or mode (DYB-PlanktonNet mixes
grey and colour images of very different sizes and aspect ratios):

    load_rgb (any mode -> 8-bit RGB) -> PadToSquare(data.pad_fill) -> resize to model.image_size
    (bilinear, antialiased) -> uint8 tensor (3, S, S) -> float in [0, 1] -> normalise (stats.json)

Padding to a square before resizing keeps the organism's aspect ratio (a long diatom chain stays
long), which matters for plankton where shape is most of the signal. ``square_uint8_transform``
is the part before the float conversion: stage 02 measures mean and std on exactly its output,
so the statistics describe what the network sees (see ``common/stats.py``).

EXIF orientation, one rule everywhere: an image is used *upright*, as a photo viewer shows it.
Every decode goes through ``upright`` (``PIL.ImageOps.exif_transpose`` when the EXIF orientation
tag is 2-8): ``load_rgb`` (stages 02-07), the report's thumbnails, and stage 01's scan, which
records the upright width and height in ``splits.csv`` (``oriented_size``, read from the header
before decoding). A 40 x 24 JPEG with orientation 6 is 24 x 40 in ``splits.csv`` and to the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from ..errors import UserError
from .fill import AUTO_FILL, pad_fill_value

# Modes PadToSquare pads as they are; others (palette, CMYK, YCbCr, LAB, HSV) go to RGB(A) first.
_PAD_MODES = frozenset({"1", "L", "LA", "RGB", "RGBA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def fill_value(mode: str, fill: int) -> Any:
    """The pad colour in a Pillow mode for grey level ``fill`` (0-255); alpha bands opaque."""
    if mode == "1":
        return 255 if fill >= 128 else 0
    if mode.startswith("I"):
        return fill * 257  # same relative level in the 16-bit range (see to_rgb)
    bands = Image.new(mode, (1, 1)).getbands()
    if len(bands) == 1:
        return fill
    return tuple(255 if b == "A" else fill for b in bands)




def edge_median(a: np.ndarray) -> np.ndarray:
    """Median of the edge pixels (top, bottom, left, right) of an image ``(H, W)`` or ``(H, W, bands)``,
    per band: the image's own background where the organism does not touch the border (bright
    field gives a light grey, dark field black), so that padding draws no frame around it."""
    a = a if a.ndim == 3 else a[:, :, None]
    edges = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]]) if a.shape[0] > 1 else a[0]
    return np.median(edges, axis=0)


class PadToSquare:
    """Pad the shorter side symmetrically to a square with the grey level ``fill`` (0-255), or
    with ``"auto"`` the image's own border colour (``edge_median``, per band; alpha opaque).

    Works on PIL images of any mode (palette, CMYK and other colour spaces go to RGB(A) first) and on
    tensors ``(..., C, H, W)`` (uint8: ``fill`` as is; float: ``fill / 255``). An odd padding
    puts the extra pixel on the right / bottom. Usable in torchvision transforms (v1 and v2).
    """

    def __init__(self, fill: int | str = 0):
        if fill != AUTO_FILL and not 0 <= int(fill) <= 255:
            raise ValueError(f"fill must be a grey level 0-255 or {AUTO_FILL!r}, got {fill}")
        self.fill: int | str = AUTO_FILL if fill == AUTO_FILL else int(fill)

    def __call__(self, img: Any) -> Any:
        if isinstance(img, torch.Tensor):
            h, w = img.shape[-2:]
            s = max(h, w)
            if h == w:
                return img
            left, top = (s - w) // 2, (s - h) // 2
            pad = (left, s - w - left, top, s - h - top)
            if self.fill == AUTO_FILL:  # per channel: pad each with its border median
                x = img.reshape(-1, h, w)
                med = edge_median(x.permute(1, 2, 0).cpu().numpy())
                out = torch.stack([torch.nn.functional.pad(x[c], pad, value=float(med[c])) for c in range(x.shape[0])])
                return out.reshape(*img.shape[:-2], s, s)
            value = float(self.fill) if not img.is_floating_point() else self.fill / 255.0
            return torch.nn.functional.pad(img, pad, value=value)
        if img.mode not in _PAD_MODES:
            has_alpha = "A" in img.getbands() or "transparency" in img.info
            img = img.convert("RGBA" if has_alpha else "RGB")
        w, h = img.size
        if w == h:
            return img
        s = max(w, h)
        out = Image.new(img.mode, (s, s), self._fill_of(img))
        out.paste(img, ((s - w) // 2, (s - h) // 2))
        return out

    def _fill_of(self, img: Image.Image) -> Any:
        """The pad colour of ``img`` in its own mode."""
        if self.fill != AUTO_FILL:
            return fill_value(img.mode, int(self.fill))
        med = edge_median(np.asarray(img))
        if img.mode == "1":
            return 255 if med[0] >= 0.5 else 0
        if img.mode == "F":
            return float(med[0])
        bands = img.getbands()
        vals = tuple(255 if b == "A" else int(round(float(m))) for b, m in zip(bands, med))
        return vals[0] if len(vals) == 1 else vals

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(fill={self.fill})"


def square_uint8_transform(image_size: int, fill: int | str) -> v2.Compose:
    """RGB PIL image -> pad to square -> resize (bilinear, antialiased) -> uint8 tensor (3, S, S).

    Resizing runs on the PIL image (Pillow's antialiased bilinear filter, fast on uint8).
    """
    return v2.Compose([
        PadToSquare(fill),
        v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.PILToTensor(),
    ])


PREPROCESSING_CHANNELS = "RGB"  # load_rgb's output: every image becomes 8-bit RGB (3 channels)
STATS_TOLERANCE = 1e-6  # two records of mean / std are the same statistics within this


@dataclass(frozen=True)
class Preprocessing:
    """What the network sees of an image, as one record: ``load_rgb`` (``channels``) -> pad to a
    square with ``pad_fill`` -> resize to ``image_size`` -> normalise with ``mean`` / ``std``.

    Stage 03 stores it in every checkpoint (``as_dict``: plain lists, ints and a string, so
    ``torch.load(weights_only=True)`` reads it); stages 04 and 07 embed with exactly the
    checkpoint's (``common.model.checkpoint_preprocessing``), never with ``stats.json`` or the
    configuration.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    pad_fill: int | str  # a grey level 0-255, or "auto" (each image's border colour)
    channels: str = PREPROCESSING_CHANNELS

    def as_dict(self) -> dict[str, Any]:
        return {"mean": [float(x) for x in self.mean], "std": [float(x) for x in self.std],
                "image_size": int(self.image_size), "pad_fill": pad_fill_value(self.pad_fill),
                "channels": self.channels}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Preprocessing:
        """The record ``as_dict`` wrote (``UserError`` naming ``where`` when it is not one)."""
        try:
            mean, std = (tuple(float(x) for x in d[k]) for k in ("mean", "std"))
            pre = cls(mean, std, int(d["image_size"]), pad_fill_value(d["pad_fill"]),
                      str(d.get("channels", PREPROCESSING_CHANNELS)))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"{where}: its preprocessing record is incomplete (mean, std, image_size, pad_fill): "
                            "is it a checkpoint of 03_main_supcon.py?") from None
        if len(pre.mean) != 3 or len(pre.std) != 3 or pre.channels != PREPROCESSING_CHANNELS:
            raise UserError(f"{where}: its preprocessing is not 3-channel {PREPROCESSING_CHANNELS} "
                            f"({pre.channels}, mean of {len(pre.mean)} values)")
        return pre

    def same_as(self, other: Preprocessing) -> bool:
        """Equal, mean and std within ``STATS_TOLERANCE`` (they pass through JSON and float32)."""
        return (self.image_size, self.pad_fill, self.channels) == (other.image_size, other.pad_fill, other.channels) \
            and all(len(a) == len(b) and all(abs(x - y) <= STATS_TOLERANCE for x, y in zip(a, b))
                    for a, b in ((self.mean, other.mean), (self.std, other.std)))

    def describe(self) -> str:
        """``mean [0.1, ...], std [...], 224 px, pad 0, RGB``."""
        return (f"mean {[round(x, 6) for x in self.mean]}, std {[round(x, 6) for x in self.std]}, "
                f"{self.image_size} px, pad {self.pad_fill}, {self.channels}")

    def transform(self) -> v2.Compose:
        """The evaluation transform of this preprocessing (``eval_transform``)."""
        return eval_transform(self.image_size, self.mean, self.std, self.pad_fill)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], fill: int | str) -> v2.Compose:
    """The deterministic view of an image: RGB -> pad to square -> resize -> [0, 1] -> normalise.

    ``mean`` and ``std``: ``stats.json`` (``read_stats``) while training, the checkpoint's own
    (``Preprocessing``) afterwards.
    """
    return v2.Compose([
        square_uint8_transform(image_size, fill),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])
