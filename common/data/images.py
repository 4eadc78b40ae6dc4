"""Decoding one image: upright (EXIF), RGB, within the size limits."""
from __future__ import annotations

import os
import re
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageReadError

# Pillow formats tried when sniffing a file's content. Only formats with a magic number: TGA,
# for example, has none and Pillow would take some text files for TGA images.
PIL_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "TIFF", "GIF", "WEBP", "PPM", "JPEG2000", "MPO")
# Errors Pillow raises on undecodable input (OSError covers truncated files and decoder errors;
# ValueError covers oversized text chunks; SyntaxError is raised by some plugin headers).
PIL_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, struct.error,
              Image.DecompressionBombError)
_FILE_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")  # Pillow names an in-memory file by its repr


def decode_problem(e: BaseException) -> str:
    """``cannot decode: <error>`` in one line, without the memory address Pillow puts in the message
    of an image read from memory (it differs on every run: reports and metrics.json stay stable)."""
    return _FILE_REPR.sub("", f"cannot decode: {e.__class__.__name__}: {e}".splitlines()[0])


# ----------------------------------------------------------------------------- images


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB.

    16/32-bit integer grey (``I;16*``, ``I``) is scaled from the 16-bit range (value / 257);
    float (``F``) is taken as 0-255 and clipped; palette images go through RGBA so their
    transparency is resolved by the palette colours; alpha is dropped.
    """
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im)
        if im.mode == "F":
            a8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        else:
            a8 = np.clip(np.rint(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    return im.convert("RGB")


EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 2-8 ask for a flip and/or a rotation
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # orientations that turn the image by 90 or 270 degrees


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation of an opened image (1 = as stored; 1 also when there is no tag)."""
    value = im.getexif().get(EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of ``upright(im)``, from the header alone (nothing is decoded)."""
    w, h = im.size
    return (h, w) if exif_orientation(im) in _SWAPS_SIDES else (w, h)


def upright(im: Image.Image) -> Image.Image:
    """The image as a viewer shows it: ``ImageOps.exif_transpose`` when the EXIF orientation is
    2-8, else ``im`` itself (no copy). The rule for every decode (module docstring)."""
    if exif_orientation(im) == 1:
        return im
    return ImageOps.exif_transpose(im)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as upright (EXIF orientation applied) 8-bit RGB;
    ``ImageReadError`` names the file otherwise.

    Multi-frame files (GIF, TIFF) give their first frame.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(upright(im))
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image file not found (was it moved since 01_random_split_dataset.py ran?)") from None
    except PIL_ERRORS as e:
        raise ImageReadError(f"{path}: cannot decode image ({e.__class__.__name__}: {e})") from None


def check_size(path: str | os.PathLike, min_side: int, max_pixels: int | None) -> str | None:
    """Why an image is refused by its header size (``data.min_side``, ``data.max_pixels``), else None.

    Reads the header only, before any decoding (a decompression bomb is never decoded). The
    rule is stage 01's, applied to every image any stage reads.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
    except PIL_ERRORS:
        return None  # not a size problem: decoding reports what is wrong with the file
    if max_pixels is not None and w * h > max_pixels:
        return f"{w} x {h} = {w * h:,} pixels is more than data.max_pixels={max_pixels:,}"
    if min(w, h) < min_side:
        return f"{w} x {h}: a side is shorter than data.min_side={min_side}"
    return None
