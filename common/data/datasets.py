"""PyTorch datasets over image lists: unreadable images reported in one line, also from worker
processes."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from ..errors import ImageReadError, UserError
from .images import load_rgb


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
        from .images import check_size, load_rgb

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
