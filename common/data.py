"""Shared data code: image listing, ``splits.csv`` and ``stats.json`` readers, image loading,
the square-padding transform and the dataset every stage iterates over.

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

import contextlib
import csv
import logging
import math
import os
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from .errors import ImageReadError, UserError
from .fileio import read_json, spreadsheet_text

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLITS_COLUMNS = ("path", "label", "split", "sha256", "width", "height", "mode")

# File suffixes that announce an image. A file with one of these that Pillow cannot decode is a
# *bad image*; a file with another suffix is recognised by its content, and when Pillow does
# not recognise it either it is a non-image and skipped silently (a README next to the images).
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".tif", ".tiff", ".gif", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".j2k", ".jpx", ".tga", ".mpo",
})
# Pillow formats tried when sniffing a file's content. Only formats with a magic number: TGA,
# for example, has none and Pillow would take some text files for TGA images.
PIL_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "TIFF", "GIF", "WEBP", "PPM", "JPEG2000", "MPO")
# Errors Pillow raises on undecodable input (OSError covers truncated files and decoder errors;
# ValueError covers oversized text chunks; SyntaxError is raised by some plugin headers).
PIL_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, struct.error,
              Image.DecompressionBombError)


def is_hidden(name: str) -> bool:
    """Dot-files and dot-folders are ignored everywhere (``.DS_Store``, ``.ipynb_checkpoints``)."""
    return name.startswith(".")


def sort_key(path: str) -> str:
    """Sort key independent of the file system's Unicode normalisation (macOS NFD vs Linux NFC)."""
    return unicodedata.normalize("NFC", path)


# ----------------------------------------------------------------------------- listing


LINK_NOT_FOLLOWED = "directory symlink not followed (data.follow_symlinks is false)"


@dataclass
class Skipped:
    """A folder that listing did not enter: unreadable, or a directory symlink not followed."""

    path: str
    label: str  # the class folder it was found in ("" outside a class listing)
    reason: str
    kind: str  # "unreadable" | "symlink"


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies below it (both real, absolute paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(folder: str, label: str, follow: bool, seen: dict[str, str], skipped: list[Skipped],
          link_check: Callable[[str, str], str | None], via_link: bool) -> Iterator[str]:
    """Depth-first walk behind ``walk_files``: a folder's files (sorted), then its sub-folders."""
    real = os.path.realpath(folder)
    if via_link and real in seen:  # two links to one folder, or a loop below a followed link
        what = "directory symlink not followed" if os.path.islink(folder) else "folder not listed again"
        skipped.append(Skipped(folder, label, f"{what}: {real} is already listed (as {seen[real]})", "symlink"))
        return
    seen.setdefault(real, folder)
    try:
        names = os.listdir(folder)
    except OSError as e:
        skipped.append(Skipped(folder, label, f"folder unreadable: {e.strerror or e.__class__.__name__}",
                               "unreadable"))
        return
    subdirs = []
    for name in sorted((n for n in names if not is_hidden(n)), key=sort_key):
        p = os.path.join(folder, name)
        if os.path.isdir(p):
            subdirs.append(p)
        else:
            yield p  # files, file symlinks (followed when read) and broken links (bad when read)
    for p in subdirs:
        if os.path.islink(p):
            if not follow:
                skipped.append(Skipped(p, label, LINK_NOT_FOLLOWED, "symlink"))
                continue
            why = link_check(p, os.path.realpath(p))
            if why is not None:
                skipped.append(Skipped(p, label, why, "symlink"))
                continue
            yield from _walk(p, label, follow, seen, skipped, link_check, True)
        else:
            yield from _walk(p, label, follow, seen, skipped, link_check, via_link)


def walk_files(folder: str | Path, follow_symlinks: bool = True, skipped: list[Skipped] | None = None, *,
               label: str = "", seen: dict[str, str] | None = None,
               link_check: Callable[[str, str], str | None] | None = None) -> Iterator[Path]:
    """Every non-hidden file under ``folder``, recursively: a folder's files (sorted), then its
    sub-folders (sorted). The order never depends on the file system's listing order.

    Symbolic links to folders below ``folder`` are followed when ``follow_symlinks`` (each real
    folder at most once, so a loop ends), else skipped. A followed link whose target contains
    ``folder`` (a loop) is not entered. Links not followed and folders that cannot be listed are
    appended to ``skipped`` (``Skipped``, tagged ``label``); with ``skipped=None`` they are logged as
    warnings instead. ``seen`` (real folder -> path listed as) may be shared between calls;
    ``link_check(link, real_target)`` returns a reason to skip a link, or None to follow it.
    """
    top = str(folder)
    real_top = os.path.realpath(top)

    def default_check(link: str, target: str) -> str | None:
        if _inside(real_top, target):
            return f"directory symlink to {target} not followed: it contains {top} (a loop)"
        return None

    out = [] if skipped is None else skipped
    yield from (Path(p) for p in _walk(top, label, follow_symlinks, {} if seen is None else seen, out,
                                        link_check or default_check, False))
    if skipped is None:
        for s in out:
            log.warning("%s: %s", s.path, s.reason)


@dataclass
class Listing:
    """An image folder with one sub-folder per class, as ``list_image_folder`` found it."""

    root: str  # data.root, resolved
    files: list[tuple[str, str]]  # (absolute path, class), sorted by (class, path)
    strays: list[str]  # files directly in root: no class, reported and ignored
    classes: list[str]  # every (non-hidden) class folder, readable or not, sorted
    skipped: list[Skipped]  # folders not listed, with the reason

    def unreadable(self) -> list[Skipped]:
        """The folders (class folders or below) that could not be listed."""
        return [s for s in self.skipped if s.kind == "unreadable"]

    def class_notes(self) -> dict[str, str]:
        """A note per class with folders not listed, for ``class_counts.csv``."""
        notes: dict[str, str] = {}
        for c in self.classes:
            own = [s for s in self.skipped if s.label == c]
            if not own:
                continue
            top = os.path.join(self.root, c)
            whole = next((s for s in own if s.kind == "unreadable" and s.path == top), None)
            if whole is not None:
                notes[c] = whole.reason
                continue
            n_unread = sum(s.kind == "unreadable" for s in own)
            n_links = sum(s.kind == "symlink" for s in own)
            parts = ([f"{n_unread} sub-folder(s) unreadable"] if n_unread else []) + \
                    ([f"{n_links} directory symlink(s) not followed"] if n_links else [])
            notes[c] = ", ".join(parts) + " (see bad_images.csv)"
        return notes


def check_class_links(root: str | Path, classes: Sequence[str], key: str = "data.root") -> None:
    """``UserError`` naming the link when a class folder of ``root`` is a symbolic link to ``root``
    itself or a folder above it (the class would hold every image), or to another class folder, a
    folder inside one or a folder holding one (images listed under two classes), whatever
    ``data.follow_symlinks`` says. A class folder linked to a folder elsewhere stays fine.
    """
    root_p = Path(root)
    real_root = os.path.realpath(root_p)
    real = {c: os.path.realpath(root_p / c) for c in classes}
    for c in classes:
        link = root_p / c
        if not os.path.islink(link):
            continue
        if _inside(real_root, real[c]):
            raise UserError(f"{key}: class folder {link} is a symbolic link to {real[c]}, which is the {key} folder or one "
                            "above it (the class would hold every image): remove the link")
    links = [c for c in classes if os.path.islink(root_p / c)]  # few: the check costs links x classes
    for c in links:
        for d in classes:
            if d == c or not (_inside(real[c], real[d]) or _inside(real[d], real[c])):
                continue
            if d in links and real[c] == real[d] and sort_key(d) > sort_key(c):
                c, d = d, c  # two links to one folder: name the later one
            raise UserError(f"{key}: class folder {root_p / c} is a symbolic link to {real[c]}, which is, holds or lies "
                            f"inside class folder {d!r} (its images would count in two classes): remove the link")


def list_image_folder(root: str | Path, follow_symlinks: bool = False) -> Listing:
    """List an image folder with one sub-folder per class (``data.root``).

    Every non-hidden file anywhere under a class folder is listed (whether it is an image is
    decided later, by content). A class folder may itself be a symbolic link, to a folder outside
    ``data.root`` and the other class folders (``check_class_links`` refuses the others). Directory symlinks
    *inside* class folders are followed only with ``follow_symlinks`` (``data.follow_symlinks``);
    otherwise they are skipped and listed in ``Listing.skipped``. When followed, each real folder
    is listed once, under the class whose folder holds the link, except that a link into a
    class folder (or to ``data.root``) is not entered: those files are listed under the class
    they really belong to; a link to a folder containing ``data.root`` or a class folder is a
    loop and is not entered either (both in ``skipped`` with the reason). Folders that cannot be
    read are in ``skipped`` too. Raises ``UserError`` when ``root`` is not a readable folder.
    """
    root_p = Path(root).expanduser()
    if not root_p.is_dir():
        raise UserError(f"data.root: {root_p} is not a folder (expected one sub-folder per class)")
    root_p = root_p.resolve()
    try:
        entries = sorted((e for e in os.listdir(root_p) if not is_hidden(e)), key=sort_key)
    except OSError as e:
        raise UserError(f"data.root: cannot list {root_p} ({e.strerror or e.__class__.__name__})") from None
    classes = [e for e in entries if (root_p / e).is_dir()]
    strays = [str(root_p / e) for e in entries if e not in classes and (root_p / e).is_file()]
    check_class_links(root_p, classes)
    real_root = str(root_p)
    class_real = {c: os.path.realpath(root_p / c) for c in classes}

    def link_check(link: str, target: str) -> str | None:
        if target == real_root:
            return (f"directory symlink to {target} not followed: it leads back to data.root "
                    "(its images are listed under their own classes)")
        owner = next((c for c in classes if _inside(target, class_real[c])), None)
        if owner is not None:
            return (f"directory symlink to {target} not followed: it points into class folder "
                    f"{owner!r} (listed as that class)")
        if _inside(real_root, target) or any(_inside(r, target) for r in class_real.values()):
            return f"directory symlink to {target} not followed: it contains data.root or a class folder (a loop)"
        return None

    files: list[tuple[str, str]] = []
    skipped: list[Skipped] = []
    seen: dict[str, str] = {}
    for c in classes:
        files.extend((str(f), c) for f in walk_files(root_p / c, follow_symlinks, skipped, label=c, seen=seen,
                                                     link_check=link_check))
    files.sort(key=lambda t: (sort_key(t[1]), sort_key(t[0])))
    skipped.sort(key=lambda s: (sort_key(s.label), sort_key(s.path)))
    return Listing(real_root, files, strays, classes, skipped)


def is_image_name(path: str | os.PathLike) -> bool:
    """Whether a file's suffix is an image's (``IMAGE_SUFFIXES``): how every input list but stage
    01's tells images from other files (stage 01 decides by content)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: str | Path, what: str = "inference.input") -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under ``folder`` (recursively, sorted, hidden files and folders skipped): the
    one image lister of a folder without classes (``what`` names the key in its refusal). Returns
    (image paths, [(path, reason)] for the other files, which callers report rather than drop)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{what}: {root} is not a folder")
    images, others = [], []
    for p in walk_files(root.resolve()):
        (images if is_image_name(p) else others).append(str(p))
    return images, [(p, "not an image file (suffix)") for p in others]


def class_folders(root: str | Path) -> list[str]:
    """Names of the (non-hidden) class folders of ``root``, sorted."""
    root_p = Path(root)
    return sorted((e for e in os.listdir(root_p) if not is_hidden(e) and (root_p / e).is_dir()), key=sort_key)


# ----------------------------------------------------------------------------- splits.csv


@dataclass
class SplitRow:
    """One row of ``splits.csv``."""

    path: str
    label: str
    split: str
    sha256: str
    width: int
    height: int
    mode: str
    extras: dict[str, str] = field(default_factory=dict)  # any further columns (dup_group, ...)


def read_splits(path: str | Path) -> list[SplitRow]:
    """Read ``splits.csv`` (stage 01). Raises ``UserError`` naming the file on any problem."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p} is missing: run 01_random_split_dataset.py")
    rows: list[SplitRow] = []
    with open(p, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in SPLITS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{p}: missing column(s) {', '.join(missing)}: rerun 01_random_split_dataset.py --force")
        for i, r in enumerate(reader, start=2):
            if r["split"] not in SPLITS:
                raise UserError(f"{p}, line {i}: split must be one of {'/'.join(SPLITS)}, got {r['split']!r}")
            try:
                w, h = int(r["width"]), int(r["height"])
            except (TypeError, ValueError):
                raise UserError(f"{p}, line {i}: width and height must be integers") from None
            extras = {k: v for k, v in r.items() if k not in SPLITS_COLUMNS and k is not None}
            rows.append(SplitRow(spreadsheet_text(r["path"]), spreadsheet_text(r["label"]), r["split"], r["sha256"],
                                 w, h, r["mode"], extras))
    return rows


def class_names(rows: Sequence[SplitRow]) -> list[str]:
    """The class list: sorted unique labels; a label's index is its position here."""
    return sorted({r.label for r in rows})


def rows_of(rows: Sequence[SplitRow], split: str) -> list[SplitRow]:
    """The rows of one split (train, val or test), in file order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [r for r in rows if r.split == split]


def class_index(labels: Sequence[str], classes: Sequence[str], unknown: Callable[[str], str]) -> np.ndarray:
    """The index in ``classes`` of every label (int64): the one label -> class-index map of the
    pipeline. ``UserError(unknown(label))`` for the first label that is not a class (each caller
    words its refusal: which file, which key, which stage to rerun)."""
    index = {c: i for i, c in enumerate(classes)}
    try:
        return np.fromiter((index[v] for v in labels), dtype=np.int64, count=len(labels))
    except KeyError as e:
        raise UserError(unknown(e.args[0])) from None


# ----------------------------------------------------------------------------- stats.json


def read_stats(path: str | Path) -> dict[str, Any]:
    """Read ``stats.json`` (stage 02): at least ``mean`` and ``std``, three floats each."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p} is missing: run 02_mean_std_variables.py")
    try:
        d = read_json(p)
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: not readable JSON ({e.__class__.__name__}): rerun 02_mean_std_variables.py --force") from None
    for key in ("mean", "std"):
        v = d.get(key) if isinstance(d, dict) else None
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)):
            raise UserError(f"{p}: {key!r} must be a list of three numbers: rerun 02_mean_std_variables.py --force")
    if any(s <= 0 for s in d["std"]):
        raise UserError(f"{p}: std must be > 0 in every channel, got {d['std']} (are all images blank?)")
    return d


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


class PadToSquare:
    """Pad the shorter side symmetrically to a square with the grey level ``fill`` (0-255).

    Works on PIL images of any mode (palette, CMYK and other colour spaces go to RGB(A) first) and on
    tensors ``(..., C, H, W)`` (uint8: ``fill`` as is; float: ``fill / 255``). An odd padding
    puts the extra pixel on the right / bottom. Usable in torchvision transforms (v1 and v2).
    """

    def __init__(self, fill: int = 0):
        if not 0 <= int(fill) <= 255:
            raise ValueError(f"fill must be a grey level 0-255, got {fill}")
        self.fill = int(fill)

    def __call__(self, img: Any) -> Any:
        if isinstance(img, torch.Tensor):
            h, w = img.shape[-2:]
            s = max(h, w)
            if h == w:
                return img
            left, top = (s - w) // 2, (s - h) // 2
            value = float(self.fill) if not img.is_floating_point() else self.fill / 255.0
            return torch.nn.functional.pad(img, (left, s - w - left, top, s - h - top), value=value)
        if img.mode not in _PAD_MODES:
            has_alpha = "A" in img.getbands() or "transparency" in img.info
            img = img.convert("RGBA" if has_alpha else "RGB")
        w, h = img.size
        if w == h:
            return img
        s = max(w, h)
        out = Image.new(img.mode, (s, s), fill_value(img.mode, self.fill))
        out.paste(img, ((s - w) // 2, (s - h) // 2))
        return out

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(fill={self.fill})"


def square_uint8_transform(image_size: int, fill: int) -> v2.Compose:
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
    pad_fill: int
    channels: str = PREPROCESSING_CHANNELS

    def as_dict(self) -> dict[str, Any]:
        return {"mean": [float(x) for x in self.mean], "std": [float(x) for x in self.std],
                "image_size": int(self.image_size), "pad_fill": int(self.pad_fill), "channels": self.channels}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Preprocessing:
        """The record ``as_dict`` wrote (``UserError`` naming ``where`` when it is not one)."""
        try:
            mean, std = (tuple(float(x) for x in d[k]) for k in ("mean", "std"))
            pre = cls(mean, std, int(d["image_size"]), int(d["pad_fill"]), str(d.get("channels", PREPROCESSING_CHANNELS)))
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


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], fill: int) -> v2.Compose:
    """The deterministic view of an image: RGB -> pad to square -> resize -> [0, 1] -> normalise.

    ``mean`` and ``std``: ``stats.json`` (``read_stats``) while training, the checkpoint's own
    (``Preprocessing``) afterwards.
    """
    return v2.Compose([
        square_uint8_transform(image_size, fill),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def _to_float_tensor(img: Image.Image) -> torch.Tensor:
    return v2.functional.to_dtype(v2.functional.pil_to_tensor(img), torch.float32, scale=True)


class ImageListDataset(torch.utils.data.Dataset):
    """Images from a list of paths: ``(transform(load_rgb(path)), label or -1, index)``.

    Without a transform the image comes back as a float tensor (3, H, W) in [0, 1]. The index
    lets a consumer map a batch back to its rows (feature store, predictions).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Sequence[int] | None = None,
                 transform: Callable[[Image.Image], Any] | None = None):
        self.paths = [str(p) for p in paths]
        if labels is not None and len(labels) != len(self.paths):
            raise ValueError(f"{len(labels)} labels for {len(self.paths)} paths")
        self.labels = None if labels is None else [int(x) for x in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        img = load_rgb(self.paths[index])
        x = self.transform(img) if self.transform is not None else _to_float_tensor(img)
        return x, (self.labels[index] if self.labels is not None else -1), index


def loader_error_line(e: BaseException) -> str:
    """One line for an error re-raised by a DataLoader worker.

    PyTorch re-raises a worker's exception with a message that starts "Caught X in DataLoader
    worker process N" and carries the original traceback; the original message (which names
    the file) is its last line.
    """
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        prefix = f"{e.__class__.__name__}: "
        for cls in type(e).__mro__:
            p = f"{cls.__module__}.{cls.__name__}: "
            if last.startswith(p):
                return last[len(p):]
        return last[len(prefix):] if last.startswith(prefix) else last
    return lines[0] if lines else e.__class__.__name__


@contextlib.contextmanager
def worker_errors(hint: str = "") -> Iterator[None]:
    """Around a DataLoader loop: a ``UserError`` (an unreadable image) that a worker re-raised,
    made one line again (``loader_error_line``), with ``hint`` appended (then to an error of this
    process too)."""
    try:
        yield
    except UserError as e:
        if str(e).startswith("Caught ") or hint:
            raise type(e)(loader_error_line(e) + hint) from None
        raise
