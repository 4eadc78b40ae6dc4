"""What the store hands out: Vectors (a split's vectors, labels and ids), ImageRecord, ModelInfo,
SyncReport."""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.fill import pad_fill_value
from ..errors import UserError
from .schema import DTYPES, NORM_TOLERANCE, STAGE

# ----------------------------------------------------------------------------- records


@dataclass
class Vectors:
    """The one container of a set of vectors: ``X`` (N, D) float32 L2-normalised, class indices
    ``labels`` (N,) (-1 = none), image ``paths``, and the store's image ``ids`` when they come from one.
    ``X`` may be a ``common.retrieval.streamed.StoreMatrix`` (a gallery read from the store block by block)."""

    X: np.ndarray
    labels: np.ndarray
    paths: list[str]
    ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not hasattr(self.X, "blocks"):  # a common.retrieval.streamed.StoreMatrix stays in the store
            self.X = np.ascontiguousarray(self.X, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not (self.X.shape[0] == self.labels.shape[0] == len(self.paths)):
            raise ValueError(f"vectors, labels and paths differ in length: {self.X.shape[0]}, "
                             f"{self.labels.shape[0]}, {len(self.paths)}")
        if self.ids is not None:
            self.ids = np.asarray(self.ids, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.X.shape[0])


@dataclass(frozen=True)
class ImageRecord:
    """One row of ``images``."""

    id: int
    path: str
    label: str
    split: str
    sha256: str


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``models``: the checkpoint and the transform that produced a set of vectors."""

    id: int
    checkpoint_sha256: str
    embedding: str
    backbone: str
    dim: int
    mean: list[float]
    std: list[float]
    image_size: int
    pad_fill: int | str  # a grey level, or "auto" (stored as AUTO_FILL_CODE)
    classes: list[str]
    checkpoint_path: str
    epoch: int | None
    created: str
    complete: bool
    dtype: str = "float32"  # the stored values: float32 or float16 (DTYPES)

    @property
    def itemsize(self) -> int:
        """Bytes per stored value (4 for float32, 2 for float16)."""
        return np.dtype(DTYPES[self.dtype]).itemsize

    def describe(self) -> str:
        """One line naming the checkpoint, embedding and dimension (for error messages)."""
        return (f"model {self.id} (checkpoint {self.checkpoint_path} sha256 {self.checkpoint_sha256[:12]}, "
                f"{self.embedding} embedding, dim {self.dim}{'' if self.dtype == 'float32' else ', ' + self.dtype})")

    def same_transform(self, other: "ModelInfo") -> bool:
        """True when both give the same stored vectors (same checkpoint, embedding, preprocessing and
        dtype: float16 vectors of a checkpoint are another model than its float32 ones)."""
        keys = ("checkpoint_sha256", "embedding", "backbone", "dim", "image_size", "pad_fill", "dtype")
        return (all(getattr(self, k) == getattr(other, k) for k in keys)
                and np.allclose(self.mean, other.mean, rtol=0, atol=1e-7)
                and np.allclose(self.std, other.std, rtol=0, atol=1e-7))


@dataclass(frozen=True)
class SyncReport:
    """What ``sync_images`` changed."""

    added: int
    removed: int
    content_changed: int  # same path, new file content: its vectors were deleted
    moved: int  # same file, new label or split (vectors kept)
    total: int

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.content_changed or self.moved)


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="microseconds")


def _model_from_row(r: Any) -> ModelInfo:
    m = r._mapping
    return ModelInfo(
        id=int(m["id"]), checkpoint_sha256=m["checkpoint_sha256"], embedding=m["embedding"],
        backbone=m["backbone"], dim=int(m["dim"]), mean=json.loads(m["mean"]), std=json.loads(m["std"]),
        image_size=int(m["image_size"]), pad_fill=pad_fill_value(m["pad_fill"]), classes=json.loads(m["classes"]),
        checkpoint_path=m["checkpoint_path"], epoch=m["epoch"], created=m["created"], complete=bool(m["complete"]),
        dtype=m["dtype"],
    )


# ----------------------------------------------------------------------------- checks and digest


def check_unit_vectors(X: np.ndarray, ids: np.ndarray, path: Any) -> None:
    """``UserError`` naming the first image whose vector is not finite or not unit-norm.

    Every read of the store calls this (one vectorised pass per block): a corrupted vector is
    never used, whatever SQLite's own integrity check says.
    """
    if X.size == 0:
        return
    norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
    bad = ~np.isfinite(norms) | (np.abs(norms - 1.0) > NORM_TOLERANCE)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = "not finite" if not np.isfinite(norms[i]) else f"of norm {norms[i]:.6g}, not 1"
        raise UserError(f"{path}: the vector of image {int(ids[i])} is {what} (the store is corrupted): rerun "
                        f"{STAGE} with --force")


def merge(*parts: Vectors) -> Vectors:
    """One ``Vectors`` of several (the store's train and extra splits), ordered by image id."""
    parts = tuple(p for p in parts if p is not None)
    if len(parts) == 1:
        return parts[0]
    X = np.concatenate([p.X for p in parts])
    y = np.concatenate([p.labels for p in parts])
    paths = [q for p in parts for q in p.paths]
    if all(p.ids is not None for p in parts):
        ids = np.concatenate([p.ids for p in parts])
        order = np.argsort(ids, kind="stable")
        return Vectors(X[order], y[order], [paths[i] for i in order], ids[order])
    return Vectors(X, y, paths)


def subset(v: Vectors, mask: np.ndarray) -> Vectors:
    """The rows of ``v`` where ``mask`` is true."""
    mask = np.asarray(mask, dtype=bool)
    return Vectors(v.X[mask], v.labels[mask], [p for p, m in zip(v.paths, mask) if m],
                   v.ids[mask] if v.ids is not None else None)
