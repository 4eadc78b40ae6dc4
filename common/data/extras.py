"""The gallery beyond the training split: gallery-only images, gallery-only classes, held-out classes.

Retrieval can learn a class from a handful of examples without retraining: a new image joins
the gallery as soon as it has a vector. ``data.gallery_extra`` lists where such images come from:

- a **folder** with one sub-folder per class (``extra/<class>/<image>``, searched recursively,
  hidden files skipped, images recognised by their suffix as in predict mode);
- an **EcoTaxa export** folder (``ecotaxa*.tsv`` with its images): its rows chosen as for training
  (``data.ecotaxa_status``, ``data.class_map``, ``data.ecotaxa_level``), through the ``export``
  reader stage 04 passes;
- a filled **corrections.csv** (written by stage 07's predict mode: columns ``path``,
  ``predicted``, ``validated``): every row whose ``validated`` cell names a class joins the
  gallery under that class; blank rows and rows validated as ``unknown`` are left out. A relative
  path is read relative to the CSV's folder.

Stage 04 embeds these images into the feature store under the split ``extra`` (only the ones
without a vector: the store is incremental); stages 05-07 use ``train`` + ``extra`` as the
gallery; stages 01-03 never see them, so the backbone is never trained on them and stage 03 stays
up to date. A class that only the extras hold (the backbone never saw it) is a *gallery-only
class*: ``gallery_classes`` appends those, sorted, after the checkpoint's classes, so the index
of every training class is unchanged.
"""
from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fileio import spreadsheet_text
from .splits import EXTRA_SPLIT

log = logging.getLogger(__name__)

CORRECTIONS_COLUMNS = ("path", "predicted", "validated")  # corrections.csv, as stage 07 writes it
NOT_A_CLASS = ("", "unknown")  # validated cells that add nothing to the gallery


@dataclass(frozen=True)
class ExtraImage:
    """One gallery-only image (the fields ``FeatureStore.sync_images`` reads)."""

    path: str
    label: str
    sha256: str
    source: str  # the data.gallery_extra entry it comes from
    split: str = EXTRA_SPLIT


def _folder_images(folder: Path) -> list[tuple[str, str]]:
    from .listing import check_class_links, class_folders, list_images

    classes = class_folders(folder)
    if not classes:
        raise UserError(f"data.gallery_extra: {folder} holds no class sub-folder (expected {folder}/<class>/<images>)")
    check_class_links(folder, classes, key="data.gallery_extra")
    return [(p, c) for c in classes for p in list_images(folder / c, "data.gallery_extra")[0]]


def read_corrections(path: Path) -> list[tuple[str, str]]:
    """(absolute image path, validated class) of every filled row of a corrections.csv."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or ())
            if not {"path", "validated"} <= cols:
                raise UserError(f"data.gallery_extra: {path} has no 'path' and 'validated' columns (a corrections.csv "
                                f"of 07_inference predict mode has {', '.join(CORRECTIONS_COLUMNS)})")
            # spreadsheet_text: a class copied from the "predicted" column keeps no formula guard quote
            rows = [(i, spreadsheet_text((r.get("path") or "").strip()), spreadsheet_text((r.get("validated") or "").strip()))
                    for i, r in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"data.gallery_extra: {path} cannot be read ({e.__class__.__name__}: {e})") from None
    out = []
    for line, p, label in rows:
        if label.lower() in NOT_A_CLASS:
            continue
        if not p:
            raise UserError(f"data.gallery_extra: {path} line {line}: validated as {label!r} but the path is blank")
        img = Path(p).expanduser()
        img = (path.parent / img) if not img.is_absolute() else img
        if not img.is_file():
            raise UserError(f"data.gallery_extra: {path} line {line}: image {img} does not exist")
        out.append((str(img.resolve()), label))
    return out


def list_extras(sources: Sequence[str | Path], min_side: int = 1, max_pixels: int | None = None,
                export: Callable[[Path], list[tuple[str, str]] | None] | None = None) -> list[ExtraImage]:
    """Every gallery-only image of ``data.gallery_extra`` with its class and sha256, by path.

    ``export(path)``: (image path, class) of an entry that is an EcoTaxa export, None for any
    other entry (stage 04 passes ``common.ecotaxa.export.export_extras_of``: this package knows no
    EcoTaxa).

    ``UserError`` naming the entry when it is neither a folder nor a .csv file, a folder without
    class sub-folders, a corrections file without its columns or naming a missing image, when
    one image is given two different classes, or when an image is outside ``data.min_side`` /
    ``data.max_pixels`` (stage 01's rule, checked from the header).
    """
    from ..fileio import sha256_file
    from .images import check_size

    found: dict[str, tuple[str, str]] = {}
    for src in sources:
        p = Path(src).expanduser()
        listed = export(p) if export is not None else None
        if listed is not None:
            items = listed
        elif p.is_dir():
            items = _folder_images(p)
        elif p.is_file() and p.suffix.lower() == ".csv":
            items = read_corrections(p)
        elif not p.exists():
            raise UserError(f"data.gallery_extra: {p} does not exist")
        else:
            raise UserError(f"data.gallery_extra: {p} is neither a folder of class sub-folders nor a corrections .csv")
        for path, label in items:
            old = found.get(path)
            if old is not None and old[0] != label:
                raise UserError(f"data.gallery_extra: {path} is given two classes: {old[0]!r} ({old[1]}) and "
                                f"{label!r} ({p})")
            found.setdefault(path, (label, str(p)))
        log.info("data.gallery_extra: %s: %d images", p, len(items))
    out = []
    for path in sorted(found):
        label, source = found[path]
        why = check_size(path, min_side, max_pixels)
        if why:
            raise UserError(f"data.gallery_extra: {path} ({source}): {why}")
        try:
            sha = sha256_file(path)
        except OSError as e:
            raise UserError(f"data.gallery_extra: {path} ({source}) cannot be read ({e.strerror})") from None
        out.append(ExtraImage(path, label, sha, source))
    return out


def check_decodable(extras: Sequence[ExtraImage]) -> None:
    """Every gallery-only image decodes (``UserError`` naming the first that does not and its
    ``data.gallery_extra`` entry): stage 04 checks this before it writes anything."""
    from ..errors import ImageReadError
    from .images import load_rgb

    for e in extras:
        try:
            load_rgb(e.path)
        except ImageReadError as err:
            why = str(err).splitlines()[0].removeprefix(f"{e.path}: ")
            raise UserError(f"data.gallery_extra: {e.path} ({e.source}): {why}") from None


def check_no_overlap(extras: Sequence[ExtraImage], split_paths: set[str], splits_csv: Path) -> None:
    """An extra image must not already be in the splits (it would be both trained on and gallery-only)."""
    both = [e for e in extras if e.path in split_paths]
    if both:
        raise UserError(f"data.gallery_extra: {both[0].path} ({both[0].source}) is already in {splits_csv}"
                        f"{f' (and {len(both) - 1} more)' if len(both) > 1 else ''}: an image is either trained "
                        "on or gallery-only; remove it from one of them")
