"""Stage 01's scan: open, hash and decode every file (in worker processes) and say what is wrong with
the bad ones."""
from __future__ import annotations

import functools
import io
import multiprocessing as mp
import re
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from ..fileio import sha256_bytes
from .images import PIL_ERRORS, PIL_FORMATS, oriented_size
from .listing import is_image_name

# ----------------------------------------------------------------------------- scanning


@dataclass
class Scan:
    """What scanning one file found. ``kind``: image (usable), bad (rejected) or other (not an image)."""

    path: str
    label: str
    kind: str
    reason: str = ""
    sha256: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""


@functools.cache
def _open_formats() -> tuple[str, ...]:
    Image.init()  # register every plugin (preinit() only knows BMP, GIF, JPEG, PPM, PNG)
    return tuple(f for f in PIL_FORMATS if f in Image.OPEN)


def scan_file(item: tuple[str, str], min_side: int, max_pixels: int) -> Scan:
    """Read, hash and fully decode one file (a top-level function: it runs in worker processes)."""
    path, label = item
    announced = is_image_name(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return Scan(path, label, "bad", f"cannot read the file ({e.strerror or e.__class__.__name__})")
    sha = sha256_bytes(data)
    if not data:
        return Scan(path, label, "bad" if announced else "other", "empty file (0 bytes)", sha)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is bad, never padded with grey
    saved_limit = Image.MAX_IMAGE_PIXELS
    # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that, reading the declared
    # size from the header in Image.open; the warning is turned into an error below, so the
    # limit is exactly data.max_pixels, enforced before a single pixel is decoded.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(data), formats=_open_formats())
            except UnidentifiedImageError:
                if announced:
                    return Scan(path, label, "bad", "not an image (Pillow cannot identify the content)", sha)
                return Scan(path, label, "other", "not an image", sha)
            with im:
                w, h = im.size
                found = dict(sha256=sha, width=w, height=h, mode=im.mode, format=im.format or "")
                if w * h > max_pixels:  # formats whose plugins skip Pillow's own check
                    return Scan(path, label, "bad", f"too many pixels: declared {w}x{h} > data.max_pixels="
                                f"{max_pixels} (decompression bomb?)", **found)
                # Upright size, as load_rgb gives it (common/data.py). Only after the pixel check:
                # reading the EXIF of a PNG decodes it (its eXIf chunk may follow the pixels).
                w, h = oriented_size(im)
                found.update(width=w, height=h)
                if min(w, h) < min_side:
                    return Scan(path, label, "bad", f"too small: {w}x{h} px, a side under data.min_side={min_side}",
                                **found)
                im.load()  # decode every pixel: truncated and corrupt files fail here
                return Scan(path, label, "image", "", **found)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        declared = f"declared {int(m.group(1))} pixels" if m else "declared size"
        return Scan(path, label, "bad", f"too many pixels: {declared} > data.max_pixels={max_pixels} "
                    "(decompression bomb?)", sha)
    except PIL_ERRORS as e:
        return Scan(path, label, "bad", f"cannot decode: {e.__class__.__name__}: {e}".splitlines()[0], sha)
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit


def scan_files(items: Sequence[tuple[str, str]], min_side: int, max_pixels: int, num_workers: int) -> list[Scan]:
    """``scan_file`` over ``[(path, label)]`` in ``num_workers`` processes (0: in this one), in order."""
    fn = functools.partial(scan_file, min_side=min_side, max_pixels=max_pixels)
    out: list[Scan] = []
    with tqdm(total=len(items), desc="scanning images", unit="file", disable=None) as bar:
        if num_workers <= 0 or len(items) < 2:
            for it in items:
                out.append(fn(it))
                bar.update()
        else:
            workers = min(num_workers, len(items))
            chunk = max(1, min(64, len(items) // (workers * 8)))
            pool = mp.get_context().Pool(workers, initializer=_worker_signals)
            try:
                for s in pool.imap(fn, items, chunksize=chunk):
                    out.append(s)
                    bar.update()
                pool.close()
            except BaseException:
                pool.terminate()  # Ctrl-C or an error: stop the workers now
                raise
            finally:
                pool.join()
    return out


def _worker_signals() -> None:
    """Scan workers leave Ctrl-C to the parent and die quietly on SIGTERM (no tracebacks).

    Forked workers would otherwise inherit the stage wrapper's SIGTERM handler.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
