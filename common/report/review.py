"""``review.html``: the page where a biologist checks predict mode's calls and corrects them.

One self-contained file that works from ``file://`` with no server and no network: the data is
one JSON blob in the page (thumbnails as WebP/JPEG data URIs), the script and style are
``common/report/assets/review.js`` and ``review.css``, inlined when the page is written.

In the page, each image is confirmed or re-labelled (a class list with type-to-filter, plus
``unknown``; keyboard shortcuts listed in the page), filtered by predicted class, sample, doubt
and review status, with a progress count. The work is kept in the browser's ``localStorage``
under ``review_key`` (a digest of the prediction), so it survives a reload, and two buttons save
it. "Save corrections (CSV)": ``corrections_<name>.csv`` (``path``, ``predicted``, ``validated``
for every query of the prediction, ``Review.rows``: the sheet stage 07 writes, filled, which
``data.gallery_extra`` reads). "Save for EcoTaxa (zip)" (only with ``Review.ecotaxa``):
``ecotaxa_<name>_reviewed.zip``, written by the page's script (stored entries, CRC-32), holding
one ``ecotaxa_<name>_reviewed.tsv``: the predict bundle's own rows (``ReviewEcotaxa``: same
columns and ids) of the REVIEWED images only, ``object_annotation_status`` ``validated`` and the
reviewed class mapped through the taxa map as the bundle maps predictions. Left out of it, and
counted in the page: images reviewed as ``unknown`` (EcoTaxa has no such class, and an empty
category in update mode corrects nothing) and images the bundle itself left out. Unreviewed
images are not written (their prediction would replace what a person did in EcoTaxa meanwhile).
It is imported into the same EcoTaxa project with "update classification" (update mode ``Cla``)
and "skip existing objects"; images are optional in update mode (docs/ecotaxa.md).

Large predictions stay responsive: the list is virtualised (only the rows in view, plus a few,
exist in the DOM), so only their thumbnails are decoded. Every thumbnail is drawn at one scale
(``common.report.thumbs``) with its pixel size, so relative organism size stays visible.

The data blob (``build_data``), arrays to keep 20,000 items small::

    {"key", "title", "note", "name", "classes": [gallery classes],
     "names": [every label string the items use], "samples": [...], "reasons": [...],
     "scale": {"per_px", "box", "bar_px", "bar_label", "pixel_size_um"},
     "images": [[data URI or null, width, height, size text], ...],
     "rows": [[path, predicted], ...]                      # every query, corrections.csv's order
     "items": [[sample, predicted, similarity, margin or null, k-th similarity, reasons bitmask,
                query image, [[image, label, similarity], ...]], ...]   # item i is rows[i]
     "ecotaxa": null or {"bundle": ecotaxa_<name>.zip, "zip", "tsv": the names of the file saved and of
                 its TSV, "header", "types": the bundle TSV's first two rows,
                 "row": [one per item: k >= 0 its row k in "columns", -1 - j left out, why[j]],
                 "why": [reasons], "columns": [one per header entry: [cell, ...] over the rows, or
                 {"d": [distinct cells], "i": [index into "d", ...]} when cells repeat],
                 "taxa": {class: display name or numeric id} or null}}
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

from ..fileio import atomic_open
from .thumbs import THUMB_PX

log = logging.getLogger(__name__)


THUMB_QUALITY = 70  # WebP/JPEG quality of the thumbnails (96 px: artefacts are not visible at 70)
REASONS = ("unknown", "low similarity", "small margin")  # the doubt reasons of common.evaluate.tables.doubt_order
UNKNOWN = "unknown"  # the label of a rejected query, and the re-label that adds nothing to the gallery
KEY_PREFIX = "plankton-review/v1/"  # localStorage key prefix (v1: the layout of the stored labels)
THUMB_WORKERS = 4  # threads reading images for the thumbnails (decoding is mostly I/O and C code)


@dataclass
class ReviewItem:
    """One query of the review page: its call, its scores, why it is doubtful, its neighbours."""

    query_path: str
    sample: str
    predicted: str
    similarity: float
    margin: float
    knn_similarity: float
    reasons: list[str]  # of REASONS; empty = not doubtful
    neighbours: list[tuple[str, str, float]]  # (gallery path, class, similarity), nearest first


@dataclass
class ReviewEcotaxa:
    """What "Save for EcoTaxa (zip)" writes from: the predict bundle's TSV rows of the items.

    ``bundle``: the bundle's file name (``ecotaxa_<name>.zip``); ``tsv``: its TSV's name;
    ``header``/``types``: the TSV's column names and type row; ``rows``: one per ``Review.items``
    entry, its row in the bundle as written there (``common.ecotaxa.bundle.read_bundle_table``),
    or None when the bundle left the image out (``left_out[i]``: why); ``taxa``: the taxa map the
    bundle used (class -> display name or numeric id), so a re-label maps as a prediction does.
    """

    bundle: str
    tsv: str
    header: list[str]
    types: list[str]
    rows: Sequence[Sequence[str] | None]
    left_out: Mapping[int, str] = field(default_factory=dict)
    taxa: Mapping[str, str | int] | None = None

    def reviewed_names(self) -> tuple[str, str]:
        """The names of the saved zip and of its TSV: ``<tsv stem>_reviewed`` (EcoTaxa imports a
        TSV whose name starts with ``ecotaxa``, as the bundle's does)."""
        stem = self.tsv[:-4] if self.tsv.lower().endswith(".tsv") else self.tsv
        return f"{stem}_reviewed.zip", f"{stem}_reviewed.tsv"


@dataclass
class Review:
    """Everything the page shows and saves.

    ``items``: the queries shown, most doubtful first; item ``i`` is ``rows[i]``. ``rows``: (path,
    predicted) of every query in ``corrections.csv``'s order (None: the items'). ``classes``: the
    re-label list (the gallery's classes). ``ecotaxa``: the bundle's rows of the items, or None
    (no EcoTaxa button).
    """

    title: str
    note: str
    name: str
    items: list[ReviewItem]
    classes: list[str]
    rows: list[tuple[str, str]] | None = None
    ecotaxa: ReviewEcotaxa | None = None
    pixel_size_um: float | None = None
    key: str = field(default="")  # localStorage key; "" = review_key(self)

    def all_rows(self) -> list[tuple[str, str]]:
        """``rows``, or the items' (path, predicted) when not given."""
        return list(self.rows) if self.rows is not None else [(i.query_path, i.predicted) for i in self.items]


def review_key(rev: Review) -> str:
    """The ``localStorage`` key of a prediction: its name and a digest of every (path, predicted) row.

    The same images with the same calls give the same key, so a copied or moved ``review.html``
    (or a rerun that changed nothing) keeps the work; a new prediction starts afresh. Every
    ``file://`` page of a browser shares one storage, hence a key per prediction.
    """
    digest = hashlib.sha256(json.dumps(rev.all_rows(), ensure_ascii=False).encode("utf-8")).hexdigest()[:20]
    return f"{KEY_PREFIX}{rev.name}/{digest}"


def _number(x: float, nd: int = 4) -> float | None:
    return round(float(x), nd) if x is not None and math.isfinite(float(x)) else None


def build_data(rev: Review) -> dict[str, Any]:
    """The page's JSON blob (see the module docstring). Each image is read once (thumbnail and
    pixel size), in ``THUMB_WORKERS`` threads."""
    from .thumbs import common_scale, image_format, size_text, thumbnail

    rows = rev.all_rows()
    if len(rows) < len(rev.items) or any(rows[i][0] != it.query_path for i, it in enumerate(rev.items)):
        raise ValueError("Review.items must be the first rows of Review.rows, in the same order")
    if rev.ecotaxa is not None and len(rev.ecotaxa.rows) != len(rev.items):
        raise ValueError(f"Review.ecotaxa has {len(rev.ecotaxa.rows)} rows for {len(rev.items)} items")
    paths = list(dict.fromkeys(p for it in rev.items for p in [it.query_path, *(n[0] for n in it.neighbours)]))
    index = {p: i for i, p in enumerate(paths)}
    fmt = image_format()[0]

    def thumb(p: str):
        return thumbnail(p, THUMB_PX, fmt, THUMB_QUALITY)

    if len(paths) > 1:
        from tqdm import tqdm

        with ThreadPoolExecutor(THUMB_WORKERS) as pool:
            thumbs = list(tqdm(pool.map(thumb, paths), total=len(paths), desc="review thumbnails", unit="img",
                               disable=None, leave=False))
    else:
        thumbs = [thumb(p) for p in paths]
    scale = common_scale([(t.width, t.height) for t in thumbs if t.uri], THUMB_PX, rev.pixel_size_um)
    names: dict[str, int] = {}
    samples: dict[str, int] = {}

    def name(label: str) -> int:
        return names.setdefault(label, len(names))

    items = []
    for it in rev.items:
        mask = sum(1 << REASONS.index(r) for r in it.reasons if r in REASONS)
        items.append([samples.setdefault(it.sample, len(samples)), name(it.predicted), _number(it.similarity),
                      _number(it.margin), _number(it.knn_similarity), mask, index[it.query_path],
                      [[index[p], name(lab), _number(s)] for p, lab, s in it.neighbours]])
    eco = _ecotaxa_data(rev.ecotaxa) if rev.ecotaxa is not None else None
    return {"key": rev.key or review_key(rev), "title": rev.title, "note": rev.note, "name": rev.name,
            "classes": list(rev.classes), "names": list(names), "samples": list(samples), "reasons": list(REASONS),
            "scale": {"per_px": scale.per_px, "box": scale.box, "bar_px": scale.bar_px, "bar_label": scale.bar_label,
                      "pixel_size_um": rev.pixel_size_um},
            "images": [[t.uri, t.width, t.height, size_text(t.width, t.height, rev.pixel_size_um)] for t in thumbs],
            "rows": [list(r) for r in rows], "items": items, "ecotaxa": eco}


def _ecotaxa_data(e: ReviewEcotaxa) -> dict[str, Any]:
    """The blob's ``ecotaxa`` (see the module docstring): columns, not rows, and a column whose cells
    repeat (samples, acquisitions, classes) as distinct cells and indices, so 20,000 rows of an
    export with dozens of ``acq_*`` columns stay small."""
    width = len(e.header)
    if len(e.types) != width:
        raise ValueError(f"ReviewEcotaxa: {len(e.types)} types for {width} columns")
    kept: list[Sequence[str]] = []
    row: list[int] = []
    why: dict[str, int] = {}
    for i, r in enumerate(e.rows):
        if r is None:
            row.append(-1 - why.setdefault(e.left_out.get(i) or f"not in {e.bundle}", len(why)))
            continue
        if len(r) != width:
            raise ValueError(f"ReviewEcotaxa: item {i} has {len(r)} cells for {width} columns")
        row.append(len(kept))
        kept.append(r)
    columns: list[Any] = []
    for c in range(width):
        cells = [r[c] for r in kept]
        distinct: dict[str, int] = {}
        codes = [distinct.setdefault(v, len(distinct)) for v in cells]
        columns.append({"d": list(distinct), "i": codes} if cells and 2 * len(distinct) <= len(cells) else cells)
    zip_name, tsv_name = e.reviewed_names()
    return {"bundle": e.bundle, "zip": zip_name, "tsv": tsv_name, "header": list(e.header), "types": list(e.types),
            "row": row, "why": list(why), "columns": columns,
            "taxa": dict(e.taxa) if e.taxa is not None else None}


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    """JSON safe inside a <script> element: '</' and '<!--' cannot end or open anything."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def render_review(rev: Review) -> str:
    """``review.html`` as one string: style, data and script inlined, nothing external."""
    import html

    data = build_data(rev)
    title = html.escape(rev.title)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{title}</title>\n<style>\n{_asset('review.css')}</style>\n</head>\n<body>\n"
            f"<noscript><p>This page needs JavaScript to show the {len(rev.items)} images.</p></noscript>\n"
            f"<script type=\"application/json\" id=\"review-data\">{_script_json(data)}</script>\n"
            f"<script>\n{_asset('review.js')}</script>\n</body>\n</html>\n")


def write_review(path: Path, rev: Review) -> Path:
    """Render ``rev`` and write ``review.html`` atomically."""
    text = render_review(rev)
    with atomic_open(path, "w") as fh:
        fh.write(text)
    log.debug("review: %s (%.1f MB, %d images)", path, len(text.encode("utf-8")) / 1e6, len(rev.items))
    return path


def doubt_note(n: int, n_doubtful: int, shown: int, review_max: int, rejection: str | None,
               low_similarity: float | None, small_margin: float) -> str:
    """The line under the page's title: how many images, how many doubtful and why, what is shown.

    ``rejection``: the open-set rule (``Rejection.source``), None when rejection is off.
    """
    why = [f"rejected as unknown ({rejection})" if rejection else None,
           f"best similarity below the val cut {low_similarity:.4f}" if low_similarity is not None else None,
           f"a margin between the two best classes below {small_margin:g}"]
    text = f"{n} images, {n_doubtful} doubtful: " + ", or ".join(w for w in why if w) + "."
    if rejection is None:
        text += " Open-set rejection is off (inference.reject_below=null)."
    if low_similarity is None:
        text += " No val cut (no correct val predictions to choose it on)."
    if shown >= n:
        text += f" All {n} images are shown, the doubtful ones first."
    else:
        text += (f" The {shown} most doubtful are shown (inference.review_max={review_max})"
                 + (f", {min(shown, n_doubtful)} of them doubtful" if n_doubtful < shown else "")
                 + "; every image is in predictions.csv and in the saved files.")
    return text
