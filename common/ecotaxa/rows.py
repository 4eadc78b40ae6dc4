"""Which rows of an EcoTaxa export are used and as which class (status, class map, hierarchy level),
and the stages' entry points: training rows, predict inputs, gallery-only images."""
from __future__ import annotations

import csv
import logging
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..data.images import PIL_ERRORS, decode_problem
from ..errors import UserError
from .export import ANY, DROP, STATUSES, EcoObject, Export, is_export

if TYPE_CHECKING:
    from ..data.samples import Inputs

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- choosing the rows


@dataclass(frozen=True)
class ClassMap:
    """``category -> class`` (None: drop). ``unlisted``: what a category not listed becomes: None
    (skipped as unmapped), ``*`` (kept as its own class), ``-`` (dropped) or a class name."""

    mapping: Mapping[str, str | None]
    unlisted: str | None = None
    source: str = ""

    def apply(self, category: str) -> tuple[str | None, str]:
        """(class or None, skip reason kind '' | 'dropped' | 'unmapped')."""
        cls = self.mapping[category] if category in self.mapping else self.unlisted
        if category not in self.mapping and cls is None:
            return None, "unmapped"
        if cls is None or cls == DROP:
            return None, "dropped"
        return (category if cls == ANY else cls), ""


def read_pairs_csv(path: str | os.PathLike, key: str, pairs: str) -> tuple[Path, list[tuple[int, list[str]]]]:
    """The non-blank lines of a small CSV of ``pairs`` lines after a header, as (line number, stripped
    cells), header first; ``UserError`` naming ``key`` when it cannot be read or has no line after
    the header (the class map of ``data.class_map`` and the taxa map of ``inference.ecotaxa_taxa``)."""
    p = Path(path).expanduser()
    try:
        with open(p, encoding="utf-8-sig", newline="") as fh:
            lines = list(csv.reader(fh))
    except OSError as e:
        raise UserError(f"{key}: {p} cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{key}: {p} is not a UTF-8 CSV ({e})") from None
    body = [(i + 1, [c.strip() for c in r]) for i, r in enumerate(lines) if r and any(c.strip() for c in r)]
    if len(body) < 2:
        raise UserError(f"{key}: {p} has no lines (expected a header, then lines {pairs})")
    return p, body


def read_class_map(path: str | os.PathLike, key: str = "data.class_map") -> ClassMap:
    """Read a class map CSV: a header, then ``category,class`` lines.

    ``class`` ``-`` drops the category. A category not listed is skipped as unmapped, unless a
    line ``*,...`` says otherwise: ``*,*`` keeps every unlisted category as its own class,
    ``*,NAME`` merges them into NAME, ``*,-`` drops them. Categories are matched exactly (EcoTaxa
    display names, e.g. ``Calanus<Calanidae``).
    """
    p, body = read_pairs_csv(path, key, "category,class")
    mapping: dict[str, str | None] = {}
    unlisted: str | None = None
    seen: set[str] = set()
    for line, cells in body[1:]:
        if len(cells) < 2 or not cells[0] or not cells[1]:
            raise UserError(f"{key}: {p} line {line}: expected category,class (class '-' drops the category)")
        cat, cls = cells[0], cells[1]
        if cat in seen:
            raise UserError(f"{key}: {p} line {line}: category {cat!r} is listed twice")
        seen.add(cat)
        if cat == ANY:
            unlisted = cls
        else:
            mapping[cat] = None if cls == DROP else cls
    return ClassMap(mapping, unlisted, str(p))


@dataclass(frozen=True)
class Skip:
    """A row not used, and why. ``kind``: ``another image``, ``status``, ``no category``,
    ``unmapped``, ``dropped``, ``missing image`` or ``unreadable image``; ``detail``: one line."""

    row: EcoObject
    kind: str
    detail: str


@dataclass
class Selection:
    """The rows used, with their class, and every row skipped."""

    used: list[tuple[EcoObject, str]]
    skipped: list[Skip]

    def counts(self) -> dict[str, int]:
        """Skipped rows per kind."""
        out: dict[str, int] = {}
        for s in self.skipped:
            out[s.kind] = out.get(s.kind, 0) + 1
        return out

    def class_counts(self) -> dict[str, int]:
        """Used rows per class."""
        out: dict[str, int] = {}
        for _, c in self.used:
            out[c] = out.get(c, 0) + 1
        return out


def category_at(row: EcoObject, level: int | None) -> str:
    """The row's category: ``object_annotation_category``, or with ``level`` the ``level``-th name
    (from 1, left to right) of ``object_annotation_hierarchy``, which EcoTaxa writes from the root
    down (``living>Eukaryota>...>Calanus``); an object identified only to a coarser taxon keeps
    its deepest name."""
    if level is None:
        return row.category
    names = [n.strip() for n in row.hierarchy.split(">") if n.strip()]
    if not names:
        return ""
    return names[min(level, len(names)) - 1]


def select(rows: Sequence[EcoObject], export: Export | None = None, *, statuses: Sequence[str] = ("validated",),
           class_map: ClassMap | None = None, level: int | None = None, verify_images: bool = False,
           need_category: bool = True) -> Selection:
    """Choose the rows to train on and their class; every other row is listed with its reason.

    In order: a later image of an object already kept (``another image``), a status not in
    ``statuses`` (``status``; ``''`` selects unclassified objects), no category (``no category``),
    the class map (``unmapped``, ``dropped``), then with ``export`` an image the export does not
    hold (``missing image``) and with ``verify_images`` one Pillow cannot decode (``unreadable
    image``). ``need_category=False`` (objects to predict): a row without a category is used, with
    class ''.
    """
    wanted = _check_selection_args(rows, statuses, level)
    first: dict[str, EcoObject] = {}
    for r in rows:  # the first image of each object: the lowest img_rank, then TSV order
        kept = first.get(r.object_id)
        if kept is None or (r.rank is not None and (kept.rank is None or r.rank < kept.rank)):
            first[r.object_id] = r
    used: list[tuple[EcoObject, str]] = []
    skipped: list[Skip] = []
    for r in rows:
        got = _class_of(r, first, wanted, level, class_map, export, verify_images, need_category)
        if isinstance(got, Skip):
            skipped.append(got)
        else:
            used.append((r, got))
    return Selection(used, skipped)


def _check_selection_args(rows: Sequence[EcoObject], statuses: Sequence[str], level: int | None) -> set[str]:
    """The statuses to select (lower case); ``UserError`` for an unknown status or an unusable ``level``."""
    wanted = {s.strip().lower() for s in statuses}
    bad = sorted(wanted - set(STATUSES) - {""})
    if bad:
        raise UserError(f"data.ecotaxa_status: unknown status {bad[0]!r} (EcoTaxa's are {', '.join(STATUSES)}; "
                        "'' selects unclassified objects)")
    if level is not None:
        if level < 1:
            raise UserError(f"data.ecotaxa_level: {level} must be 1 or more (1 = the first name of "
                            "object_annotation_hierarchy)")
        if rows and not any(r.hierarchy for r in rows):
            raise UserError("data.ecotaxa_level: the export has no object_annotation_hierarchy (EcoTaxa writes it in "
                            "a general export, not in a backup)")
    return wanted


def _class_of(r: EcoObject, first: dict[str, EcoObject], wanted: set[str], level: int | None,
              class_map: ClassMap | None, export: Export | None, verify_images: bool,
              need_category: bool) -> str | Skip:
    """The class row ``r`` is used with, or why it is skipped (the checks in ``select``'s order)."""
    if first[r.object_id] is not r:
        return Skip(r, "another image", f"another image of object {r.object_id} (img_rank {r.rank:g})"
                    if r.rank is not None else f"another image of object {r.object_id}")
    if r.status not in wanted:
        return Skip(r, "status", f"status {r.status or 'unclassified'!r} not selected")
    cat = category_at(r, level)
    if not cat and need_category:
        return Skip(r, "no category", "no category")
    cls = cat
    if class_map is not None and cat:
        mapped, why = class_map.apply(cat)
        if mapped is None:
            detail = (f"category {cat!r} dropped by the class map" if why == "dropped"
                      else f"category {cat!r} is not in the class map")
            return Skip(r, why, detail)
        cls = mapped
    if export is not None and not export.has(r.image):
        return Skip(r, "missing image", f"image {r.image!r} is not in the export")
    if export is not None and verify_images:
        problem = _decode_problem(export, r.image)
        if problem:
            return Skip(r, "unreadable image", problem)
    return cls

def _decode_problem(export: Export, name: str) -> str:
    try:
        with export.open(name) as fh, Image.open(fh) as im:
            im.load()
    except PIL_ERRORS as e:
        return decode_problem(e)
    return ""


# ---------------------------------------------------------------------------- the stages' entry points


def export_inputs(source: str | os.PathLike, dest: str | os.PathLike | None, what: str = "inference.input") -> Inputs:
    """Predict mode on an export: every object (its first image), whatever its status, as
    ``common.data.samples.Inputs``: sample = ``sample_id`` (else the TSV's folder, else the
    export's name), ``origins`` = the export rows (their ids and ``sample_*``/``acq_*`` columns go
    back into the bundle). A zip's images are unpacked into ``dest`` (None: nothing is unpacked and
    the paths name no file: the check phase). An image the export lacks is listed in ``others``."""
    from ..data.samples import Inputs

    with Export(source, what) as ex:
        rows = ex.rows()
        sel = select(rows, ex, statuses=(*STATUSES, ""), need_category=False)
        if dest is None and ex.is_zip:
            files = {r.image: Path(ex.source.stem) / r.image for r, _ in sel.used}
        else:
            files = ex.on_disk([r.image for r, _ in sel.used], dest)
        root = Path(dest) if ex.is_zip and dest is not None else ex.source
    images: list[str] = []
    samples: dict[str, str] = {}
    origins: dict[str, EcoObject] = {}
    others: list[tuple[str, str]] = []
    fallback = Path(source).stem if Path(source).is_file() else Path(source).name
    for r, _ in sel.used:
        path = str(files[r.image])
        if path in origins:  # two objects sharing one image file: one row per file in a prediction
            others.append((f"{source}:{r.image}", f"object {r.object_id}: the image of object "
                                                  f"{origins[path].object_id} too ({r.where})"))
            continue
        images.append(path)
        origins[path] = r
        samples[path] = r.sample_id or posixpath.dirname(r.tsv) or fallback
    for s in sel.skipped:
        if s.kind == "missing image":
            key = f"{source}:{s.row.image}"
            others.append((key, s.detail))
            samples[key] = s.row.sample_id or fallback
    counts = sel.counts()
    if counts.get("another image"):
        log.info("%s: %d rows are further images of an object (only the first image is classified)", what,
                 counts["another image"])
    for k, _ in others:
        samples.setdefault(k, fallback)
    return Inputs(images, samples, others, root, origins)


def read_export(source: str | os.PathLike, *, statuses: Sequence[str], class_map: ClassMap | None,
                level: int | None, what: str) -> tuple[Export, Selection]:
    """Open an export and choose its rows (``select``, images checked to be in the export); the
    caller closes the ``Export`` (use it as a context manager)."""
    ex = Export(source, what)
    try:
        sel = select(ex.rows(), ex, statuses=statuses, class_map=class_map, level=level)
    except BaseException:
        ex.close()
        raise
    return ex, sel


def export_extras(source: str | os.PathLike, *, statuses: Sequence[str] = ("validated",),
                  class_map: ClassMap | None = None, level: int | None = None) -> list[tuple[str, str]]:
    """``data.gallery_extra`` given an export folder: (image path, class) of its selected rows (as
    for training: ``data.ecotaxa_status``, ``data.class_map``, ``data.ecotaxa_level``). A zip is
    refused: its images would have to be unpacked where the feature store can find them again."""
    if Path(source).is_file():
        raise UserError(f"data.gallery_extra: {source} is a zip: unzip it and give the folder (the feature store "
                        "keeps each image's path)")
    ex, sel = read_export(source, statuses=statuses, class_map=class_map, level=level, what="data.gallery_extra")
    with ex:
        files = ex.on_disk([r.image for r, _ in sel.used], None)
        out = [(str(files[r.image].resolve()), cls) for r, cls in sel.used]
    if sel.skipped:
        log.info("data.gallery_extra: %s: %d rows used, %d skipped (%s)", source, len(out), len(sel.skipped),
                 ", ".join(f"{k}: {v}" for k, v in sorted(sel.counts().items())))
    return out


def export_extras_of(source: str | os.PathLike, d: Any) -> list[tuple[str, str]] | None:
    """``export_extras`` with the ``data`` section's keys when ``source`` is an EcoTaxa export, else None."""
    if not is_export(source):
        return None
    cmap = read_class_map(d.class_map) if d.class_map else None
    return export_extras(source, statuses=d.ecotaxa_status, class_map=cmap, level=d.ecotaxa_level)
