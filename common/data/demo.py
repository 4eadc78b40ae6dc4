"""Demo and test data: real digits rendered as a dark-field image folder, synthetic plankton,
and a set of broken files.

- ``render_digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, 10
  classes, bundled with scikit-learn: nothing is downloaded) as ``dest/digit_N/NNNN.png``,
  with a dark margin, upscaled with bilinear interpolation: bright strokes on a dark background
  like dark-field microscopy. Rendered once: a marker file written last marks the cache complete.
- ``make_synthetic_plankton``: plankton-like images (dark background, bright elongated or round
  bodies, chains, appendages, textures; class-specific shapes; non-square sizes; grey and
  colour; PNG and JPEG; noise), deterministic for a seed.
- ``make_bad_files``: every kind of file stage 01 must reject or ignore, for tests.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import UserError

log = logging.getLogger(__name__)


DIGITS_MARKER = ".rendered.json"  # hidden: ignored by the listing and by the input fingerprint
DIGITS_FORMAT = 2  # bump when the rendering changes, so old caches are redone
DIGITS_MARGIN = 2  # dark border added around the 8x8 digit (in its pixels): it floats on a dark field


# ----------------------------------------------------------------------------- digits


def _digits_marker(size: int, n: int) -> dict:
    return {"source": "sklearn.datasets.load_digits", "format": DIGITS_FORMAT, "size": size, "images": n}


def _looks_like_digits_cache(dest: Path) -> bool:
    """True when every entry of ``dest`` is one this module writes (safe to delete)."""
    return all(e.name.startswith("digit_") or e.name == DIGITS_MARKER for e in dest.iterdir())


def render_digits(dest: str | os.PathLike, size: int = 32) -> Path:
    """Render scikit-learn's digits as ``dest/digit_<d>/<NNNN>.png`` (grey PNG, ``size`` px); returns ``dest``.

    Idempotent: when ``dest`` holds a complete rendering with the same parameters it is
    returned as is (file times unchanged, so stage 01 stays up to date). A partial or outdated
    rendering is redone; the new one is written under a temporary name and renamed into place.
    """
    from sklearn.datasets import load_digits

    dest = Path(dest)
    marker = dest / DIGITS_MARKER
    digits = load_digits()
    want = _digits_marker(size, len(digits.images))
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == want:
                return dest
        except (OSError, ValueError):
            pass
    if dest.exists() and not (dest.is_dir() and _looks_like_digits_cache(dest)):
        raise UserError(f"{dest} exists and is not a digits demo cache: choose another folder")

    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    log.info("rendering %d digits at %d px into %s", len(digits.images), size, dest)
    for i, (img, target) in enumerate(zip(digits.images, digits.target)):
        # Levels 0-16 -> 0-255: 0 is the (dark) background, 16 the brightest stroke.
        a8 = np.rint(np.asarray(img, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
        a8 = np.pad(a8, DIGITS_MARGIN)  # the strokes touch the 8x8 frame; an organism rarely does
        im = Image.fromarray(a8, mode="L").resize((size, size), Image.Resampling.BILINEAR)
        folder = tmp / f"digit_{int(target)}"
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{i:04d}.png", format="PNG")
    (tmp / DIGITS_MARKER).write_text(json.dumps(want), encoding="utf-8")  # written last
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process rendered it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not (marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == want):
            raise
    return dest


# ----------------------------------------------------------------------------- synthetic plankton


def _class_shape(k: int) -> dict:
    """Shape parameters of synthetic class ``k``: cycled with co-prime periods so many classes differ."""
    return {
        "aspect": (1.0, 1.8, 2.8, 4.0)[k % 4],  # body length / width
        "appendages": (0, 2, 5, 8, 3)[k % 5],  # thin spines from the body
        "texture": ("smooth", "stripes", "speckle")[k % 3],
        "blobs": (1, 1, 3, 2, 4, 1, 2)[k % 7],  # a chain of bodies (diatom-like) when > 1
        "tint": ((1.0, 1.0, 1.0), (0.7, 0.9, 1.0), (1.0, 0.85, 0.6), (0.6, 1.0, 0.7))[k % 4],
    }


def _render_plankton(shape: dict, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """One (h, w) float image in [0, 1]: bodies, spines and texture on a noisy dark background."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.clip(rng.normal(0.05, 0.02, size=(h, w)), 0, 1)
    theta = rng.uniform(0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    nb = shape["blobs"]
    a = 0.42 * min(w, h) / (1 + 0.35 * (nb - 1)) * rng.uniform(0.75, 1.0)  # semi-major axis
    b = max(a / shape["aspect"], 1.5)
    cx, cy = w / 2 + rng.uniform(-0.06, 0.06) * w, h / 2 + rng.uniform(-0.06, 0.06) * h
    brightness = rng.uniform(0.6, 1.0)
    body = np.zeros((h, w))
    for j in range(nb):
        off = (j - (nb - 1) / 2) * 1.7 * a / max(shape["aspect"], 1.0) if nb > 1 else 0.0
        bx, by = cx + off * c, cy + off * s
        u = (xx - bx) * c + (yy - by) * s
        v = -(xx - bx) * s + (yy - by) * c
        d = (u / a) ** 2 + (v / b) ** 2
        body = np.maximum(body, 0.5 * (1 - np.tanh((d - 1) * 5)))  # soft-edged ellipse (a sigmoid)
    if shape["texture"] == "stripes":
        u = (xx - cx) * c + (yy - cy) * s
        body *= 0.7 + 0.3 * np.sin(u * rng.uniform(0.8, 1.2))
    elif shape["texture"] == "speckle":
        body *= 0.6 + 0.4 * rng.random((h, w))
    img = np.maximum(img, brightness * body)
    for j in range(shape["appendages"]):
        ang = theta + 2 * np.pi * j / shape["appendages"] + rng.normal(0, 0.15)
        length = a * rng.uniform(1.2, 1.8)
        dx, dy = np.cos(ang), np.sin(ang)
        t = np.clip((xx - cx) * dx + (yy - cy) * dy, 0, length)  # distance to the segment
        dist = np.hypot(xx - cx - t * dx, yy - cy - t * dy)
        img = np.maximum(img, 0.8 * brightness * np.clip(1.2 - dist, 0, 1))
    img += rng.normal(0, 0.03, size=(h, w))
    return np.clip(img, 0, 1)


def make_synthetic_plankton(dest: str | os.PathLike, classes: int | Sequence[str] = 5,
                            per_class: int | Sequence[int] = 20, seed: int = 0,
                            size_range: tuple[int, int] = (20, 90)) -> Path:
    """Write synthetic plankton images to ``dest/<class>/NNNN.(png|jpg)``; returns ``dest``.

    ``classes``: a number (names ``class_00``, ...) or the names. ``per_class``: one count for
    every class or one per class (to mimic the imbalance of real data). Width and height are
    drawn independently in ``size_range``; about half the files are grey ("L"), half RGB;
    PNG or JPEG at random. The same arguments give the same files.
    """
    dest = Path(dest)
    names = [f"class_{k:02d}" for k in range(classes)] if isinstance(classes, int) else list(classes)
    counts = [per_class] * len(names) if isinstance(per_class, int) else list(per_class)
    if len(counts) != len(names):
        raise ValueError(f"per_class has {len(counts)} counts for {len(names)} classes")
    lo, hi = size_range
    for k, (name, n) in enumerate(zip(names, counts)):
        shape = _class_shape(k)
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, k, i])
            w, h = (int(x) for x in rng.integers(lo, hi + 1, size=2))
            grey = _render_plankton(shape, w, h, rng)
            if i % 2 == 0:
                im = Image.fromarray(np.rint(grey * 255).astype(np.uint8), mode="L")
            else:
                rgb = grey[..., None] * np.asarray(shape["tint"])[None, None, :]
                im = Image.fromarray(np.rint(np.clip(rgb, 0, 1) * 255).astype(np.uint8), mode="RGB")
            if rng.random() < 0.5:
                im.save(folder / f"{i:04d}.png", format="PNG")
            else:
                im.save(folder / f"{i:04d}.jpg", format="JPEG", quality=90)
    return dest


# ----------------------------------------------------------------------------- broken files


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` grey pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _noise_image(size: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)


def _encoded(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def make_bad_files(dest: str | os.PathLike, label: str = "broken") -> dict[str, Path]:
    """Write one file of each problematic kind into ``dest/<label>/``; returns kind -> path.

    Bad images (stage 01 lists them in bad_images.csv): ``empty`` (0 bytes), ``truncated``
    (a JPEG cut short), ``text_as_jpg`` (text named .jpg), ``corrupt`` (a PNG with damaged
    pixel data), ``tiny`` (1x1), ``bomb`` (a PNG declaring 100000x100000 pixels).
    Ignored: ``hidden`` (.hidden.png), ``hidden_dir`` (an image in a dot-folder), ``non_image``
    (notes.txt). Usable: ``no_suffix`` (a valid PNG named without a suffix: recognised by content).
    """
    folder = Path(dest) / label
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = _encoded(_noise_image(64, 1), "JPEG")
    png = _encoded(_noise_image(32, 2, "L"), "PNG")
    # Damage the zlib stream inside IDAT (and fix the CRC so only the pixel data is broken).
    i = png.index(b"IDAT")
    n = struct.unpack(">I", png[i - 4:i])[0]
    body = bytearray(png[i + 4:i + 4 + n])
    for j in range(2, len(body), 3):
        body[j] ^= 0xFF
    corrupt = png[:i - 4] + _png_chunk(b"IDAT", bytes(body)) + png[i + 8 + n:]
    files: dict[str, tuple[str, bytes]] = {
        "empty": ("empty.jpg", b""),
        "truncated": ("truncated.jpg", jpeg[: int(len(jpeg) * 0.6)]),
        "text_as_jpg": ("text.jpg", b"this is not an image\n"),
        "corrupt": ("corrupt.png", corrupt),
        "tiny": ("tiny.png", _encoded(_noise_image(1, 3), "PNG")),
        "bomb": ("bomb.png", bomb_png()),
        "hidden": (".hidden.png", png),
        "hidden_dir": (".ipynb_checkpoints/inside.png", png),
        "non_image": ("notes.txt", b"collected 2024-05-01, station 7\n"),
        "no_suffix": ("scan_0001", _encoded(_noise_image(32, 4), "PNG")),
    }
    out = {}
    for kind, (name, data) in files.items():
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[kind] = p
    return out
