"""Thumbnails that keep size as evidence: pixel sizes, one display scale per page, scale bars.

An organism's size is a first identification cue, and a thumbnail scaled to fill its box loses
it. The pages (``review.html``, the report's strips) therefore draw every thumbnail at one scale,
CSS pixels per image pixel (``Scale.per_px``), chosen so that most images (``FIT_QUANTILE`` of
the longest sides) fit the box; a larger image is shrunk to fit and marked, with its own, shorter
scale bar. Each image's pixel size is printed beside it, in micrometres too with a pixel size
(``pixel_size_um``, the camera's calibration).
"""
from __future__ import annotations

import base64
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

log = logging.getLogger(__name__)


THUMB_PX = 96  # longest side of a thumbnail, and the side of each image's box, on both pages (report, review)
FIT_QUANTILE = 0.9  # share of the images (by longest side) drawn at the common scale; the rest are shrunk
MAX_UPSCALE = 4.0  # a page of tiny images is enlarged at most this much (blocky pixels tell nothing more)
BAR_SHARE = 0.4  # the scale bar is about this share of the box at the common scale


def image_format() -> tuple[str, str]:
    """(Pillow format, MIME type) of embedded thumbnails: WebP where Pillow writes it (about half
    the bytes of a JPEG at the same look), else JPEG."""
    from PIL import features

    return ("WEBP", "image/webp") if features.check("webp") else ("JPEG", "image/jpeg")


@dataclass(frozen=True)
class Thumb:
    """A small image as a data URI (None: unreadable) and the original's upright pixel size."""

    uri: str | None
    width: int = 0
    height: int = 0


def thumbnail(path: str | Path, px: int, fmt: str | None = None, quality: int = 75) -> Thumb:
    """An upright thumbnail (longest side at most ``px``, never enlarged) as a data URI, with the
    original's pixel size. ``fmt``: "WEBP" or "JPEG" (default: ``image_format``)."""
    from PIL import Image

    from ..data.images import PIL_ERRORS, oriented_size, upright

    fmt = fmt or image_format()[0]
    mime = "image/webp" if fmt == "WEBP" else "image/jpeg"
    try:
        with Image.open(path) as im:
            full = oriented_size(im)  # before draft, which shrinks what is decoded
            im.draft("RGB", (px * 2, px * 2))  # fast JPEG downscale on decode (at least 2x the thumbnail)
            im = upright(im).convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, format=fmt, quality=quality)
    except PIL_ERRORS as e:
        log.debug("no thumbnail for %s: %s", path, e)
        return Thumb(None)
    return Thumb(f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii"), *full)


@dataclass(frozen=True)
class Scale:
    """One display scale for the images of a page: ``per_px`` CSS pixels per image pixel inside a
    ``box`` x ``box`` square, and a scale bar ``bar_px`` image pixels long, labelled ``bar_label``."""

    per_px: float
    box: int
    bar_px: float
    bar_label: str

    def fit(self, width: int, height: int) -> tuple[float, float, bool]:
        """Display (width, height) in CSS px, and whether the image is at the common scale (False:
        shrunk to fit the box)."""
        longest = max(width, height, 1)
        s = min(self.per_px, self.box / longest)
        return width * s, height * s, s >= self.per_px * (1 - 1e-9)

    def bar(self, width: int, height: int) -> float:
        """The scale bar's length in CSS px for an image drawn by ``fit`` (shorter when shrunk)."""
        longest = max(width, height, 1)
        return self.bar_px * min(self.per_px, self.box / longest)


def _nice(x: float) -> float:
    """The largest 1, 2 or 5 x 10^k not above ``x`` (a scale bar's round length)."""
    if x <= 0 or not math.isfinite(x):
        return 1.0
    e = math.floor(math.log10(x))
    for m in (5, 2, 1):
        if m * 10 ** e <= x:
            return float(m * 10 ** e)
    return float(10 ** e)


def common_scale(sizes: Iterable[tuple[int, int]], box: int, pixel_size_um: float | None = None) -> Scale:
    """The page's scale: the ``FIT_QUANTILE`` longest side fills the box (enlarged at most
    ``MAX_UPSCALE``); the scale bar a round number of pixels, or of micrometres with
    ``pixel_size_um``."""
    longest = np.array([max(w, h) for w, h in sizes if w > 0 and h > 0], dtype=np.float64)
    # "higher": a quantile that is one of the sizes, so a page of few images has them all at scale
    ref = float(np.quantile(longest, FIT_QUANTILE, method="higher")) if longest.size else float(box)
    per_px = min(MAX_UPSCALE, box / max(ref, 1.0))
    target = BAR_SHARE * box / per_px  # image pixels
    if pixel_size_um:
        um = _nice(target * pixel_size_um)
        return Scale(per_px, box, um / pixel_size_um, f"{um:g} µm")
    px = _nice(target)
    return Scale(per_px, box, px, f"{px:g} px")


def size_text(width: int, height: int, pixel_size_um: float | None = None) -> str:
    """'120 × 80 px', or '120 × 80 px · 240 × 160 µm' with a pixel size."""
    if not width or not height:
        return ""
    text = f"{width} × {height} px"
    if pixel_size_um:
        text += f" · {_um(width * pixel_size_um)} × {_um(height * pixel_size_um)} µm"
    return text


def _um(v: float) -> str:
    """Micrometres to three significant digits, never in exponent notation."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
