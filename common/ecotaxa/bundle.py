"""Writing what EcoTaxa imports: the bundle ``ecotaxa_<name>.zip`` (``write_bundle``) and the taxa
map (``read_taxa_map``); the rules are in the docstring of ``common.ecotaxa.export``."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..data.images import PIL_ERRORS, decode_problem
from ..errors import UserError
from ..fileio import atomic_path
from .export import _COLUMN, HUMAN_STATUSES, MAX_NAME, clean_text
from .rows import read_pairs_csv

if TYPE_CHECKING:
    from .export import EcoObject

log = logging.getLogger(__name__)

PREDICTED = "predicted"
ECOTAXA_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif"}  # py/BO/Image.py:16
FORMAT_SUFFIXES = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "GIF": (".gif",)}  # vault keeps the suffix
PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})  # modes Pillow writes to PNG as they are
EXPAND_MODES = {"PA": "RGBA", "RGBX": "RGB"}  # modes whose conversion loses nothing
MAX_FREE_TEXT = 250  # free text columns: VARCHAR(250) (DB/Object.py:242-243)
ID_HASH_HEX = 12  # hex digits of the object id's hash: 48 bits, ~2e-5 chance of one clash in 100k images
NAME_HASH_HEX = 8  # hex digits added to a renamed file's name
STEM_CHARS = 40  # the file stem's share of an object id
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff\"\\]+")  # and the csv quote, backslash
_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


# ============================================================================ writing a bundle


@dataclass
class Prediction:
    """One image to write into a bundle.

    ``path``: the file to read (with ``write_bundle``'s ``open_image``: any key it takes, e.g. an
    export member); ``name``: its path relative to the input ('/'-separated), the name in the
    bundle when EcoTaxa can carry it; ``sample``: its sample; ``label``: the predicted class, None
    when rejected as unknown; ``scores``: free numeric columns (``object_<name>``); ``origin``: the
    export row it came from (its ids and parent columns are kept).
    """

    path: str
    name: str
    sample: str
    label: str | None
    scores: Mapping[str, float] = field(default_factory=dict)
    origin: EcoObject | None = None


@dataclass(frozen=True)
class TaxaMap:
    """class -> EcoTaxa taxon: a display name (str) or a taxon id (int)."""

    taxa: Mapping[str, str | int]
    source: str = ""

    @property
    def has_ids(self) -> bool:
        return any(isinstance(t, int) for t in self.taxa.values())

    def check(self, classes: Sequence[str], key: str = "inference.ecotaxa_taxa") -> list[str]:
        """One line per class named in the map but not trained, and per trained class the map lacks."""
        trained = set(classes)
        lines = [f"{key}: {self.source} maps {c!r}, which is not a trained class" for c in self.taxa if c not in trained]
        lines += [f"{key}: {self.source} has no line for the trained class {c!r}: written as it is, EcoTaxa must "
                  "match it by name" for c in classes if c not in self.taxa]
        return lines


def read_taxa_map(path: str | os.PathLike, key: str = "inference.ecotaxa_taxa") -> TaxaMap:
    """Read ``class,taxon`` lines after a header: taxon a number -> ``object_annotation_category_id``,
    otherwise the name written to ``object_annotation_category`` (use EcoTaxa's unique display name)."""
    p, body = read_pairs_csv(path, key, "class,taxon")
    taxa: dict[str, str | int] = {}
    for line, cells in body[1:]:
        if len(cells) < 2 or not cells[0] or not cells[1]:
            raise UserError(f"{key}: {p} line {line}: expected class,taxon (an EcoTaxa display name or taxon id)")
        if cells[0] in taxa:
            raise UserError(f"{key}: {p} line {line}: class {cells[0]!r} is listed twice")
        taxa[cells[0]] = int(cells[1]) if cells[1].isdigit() else clean_text(cells[1])
    return TaxaMap(taxa, str(p))


@dataclass
class BundleResult:
    """What ``write_bundle`` wrote. ``converted``/``renamed``: (source, name in the bundle[, why]);
    ``lossy``: (source, why) converted with a loss; ``skipped``: (source, why) not written;
    ``unmatched_classes``: classes written as names without a taxa map entry (EcoTaxa must match
    each to exactly one taxon or asks a person); ``sources``: the ``Prediction.path`` of each TSV
    row, in the TSV's order (what ``read_bundle_table`` gives back is row ``i`` of ``sources[i]``)."""

    path: Path
    tsv: str
    rows: int = 0
    sources: list[str] = field(default_factory=list)
    converted: list[tuple[str, str]] = field(default_factory=list)
    renamed: list[tuple[str, str, str]] = field(default_factory=list)
    lossy: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unmatched_classes: list[str] = field(default_factory=list)


def _hex(*parts: bytes, n: int) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))  # unambiguous concatenation
        h.update(p)
    return h.hexdigest()[:n]


def safe_stem(text: str, limit: int = STEM_CHARS) -> str:
    """ASCII letters, digits, ``_ . -`` (for ids): every other run becomes ``_``."""
    return _ID_CHARS.sub("_", text).strip("_.")[:limit].strip("_.") or "x"


def bundle_name(rel: str, fmt: str) -> tuple[str, str]:
    """The image's name in the bundle and why it differs from ``rel`` ('' when it does not).

    ``fmt``: the Pillow format of the file written (JPEG, PNG or GIF). The name keeps ``rel``'s
    folders and file name unless EcoTaxa cannot carry them (see the module docstring); a renamed
    file gets ``_`` and 8 hex digits of ``rel``, so names do not depend on the listing order.
    """
    why: list[str] = []
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
    if "\\" in rel:
        why.append("backslash")
    if any(p == ".." for p in parts):
        why.append("'..' in the path")
        parts = [p for p in parts if p != ".."]
    cleaned = []
    for p in parts:
        q = _UNSAFE_NAME.sub("_", p).strip()
        if q != p:
            why.append("control character, quote or bytes that are not UTF-8")
        cleaned.append(q or "_")
    if not cleaned:
        cleaned = ["image"]
    stem, ext = posixpath.splitext(cleaned[-1])
    if ext.lower() not in FORMAT_SUFFIXES[fmt]:
        why.append(f"{fmt} written as {ECOTAXA_FORMATS[fmt]}" if ext else "no extension")
        ext = ECOTAXA_FORMATS[fmt]
    name = "/".join([*cleaned[:-1], stem + ext])
    if len(name) > MAX_NAME:
        why.append(f"longer than {MAX_NAME} characters")
        folder = "/".join(cleaned[:-1])[: MAX_NAME // 2]
        name = "/".join(x for x in (folder, stem[:40] + ext) if x)
    why = list(dict.fromkeys(why))
    if not why:
        return name, ""
    tag = _hex(rel.encode("utf-8", "surrogateescape"), n=NAME_HASH_HEX)
    folder, base = posixpath.split(name)
    stem, ext = posixpath.splitext(base)
    return posixpath.join(folder, f"{stem}_{tag}{ext}"), "; ".join(why)


def _png_bytes(im: Image.Image) -> tuple[bytes, str]:
    """``im`` (first frame) as PNG bytes; '' or why the conversion could not be lossless."""
    frames = getattr(im, "n_frames", 1)
    notes = [f"only the first of {frames} frames"] if frames > 1 else []
    if im.mode in PNG_MODES:
        out = im
    elif im.mode in EXPAND_MODES:
        out = im.convert(EXPAND_MODES[im.mode])
    elif im.mode in ("I", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            notes.append(f"mode {im.mode} values outside 0-65535 clipped to 16 bits")
        out = Image.fromarray(np.clip(a, 0, 65535).astype(np.uint16))  # Pillow: mode I;16
    elif im.mode == "F":
        notes.append("32-bit float pixels written as 16-bit grey (scaled to 0-65535)")
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if a.size else (0.0, 1.0)
        scaled = (np.nan_to_num(a, nan=lo) - lo) / (hi - lo or 1.0) * 65535.0
        out = Image.fromarray(np.rint(scaled).astype(np.uint16))
    else:  # CMYK, YCbCr, LAB, HSV, La, RGBa, ...: Pillow's own conversion
        target = "RGBA" if "A" in im.mode or "a" in im.mode else "RGB"
        notes.append(f"mode {im.mode} converted to {target}")
        out = im.convert(target)
    buf = io.BytesIO()
    params: dict[str, Any] = {}
    exif = im.info.get("exif")
    if isinstance(exif, bytes) and exif:
        params["exif"] = exif  # keeps the orientation tag: EcoTaxa shows it as the camera meant
    if "transparency" in im.info and out is im:
        params["transparency"] = im.info["transparency"]
    if "icc_profile" in im.info:
        params["icc_profile"] = im.info["icc_profile"]
    out.save(buf, format="PNG", **params)
    return buf.getvalue(), "; ".join(notes)


class _Rows:
    """TSV rows spooled to a temporary file as JSON lines; the columns are known at the end."""

    def __init__(self, folder: Path, columns: Mapping[str, str]):
        self.fh = tempfile.TemporaryFile("w+", encoding="utf-8", dir=folder)
        self.columns: dict[str, str] = dict(columns)  # name -> [t] | [f], in first-seen order
        self.n = 0

    def add(self, row: dict[str, str], types: Mapping[str, str]) -> None:
        for k in row:
            if k not in self.columns:
                self.columns[k] = types.get(k, "[t]")
        self.fh.write(json.dumps(row) + "\n")  # ASCII escapes: lone surrogates survive until clean_text
        self.n += 1

    def write_tsv(self, out: IO[bytes]) -> None:
        text = io.TextIOWrapper(out, encoding="utf-8-sig", newline="")  # the BOM: TSVFile.py:103-111
        w = csv.writer(text, delimiter="\t", quotechar='"', lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        cols = list(self.columns)
        w.writerow(cols)
        w.writerow([self.columns[c] for c in cols])
        self.fh.seek(0)
        for line in self.fh:
            row = json.loads(line)
            w.writerow([clean_text(row.get(c, "")) for c in cols])
        text.flush()
        text.detach()

    def close(self) -> None:
        self.fh.close()


def _score_column(name: str) -> str:
    col = _COLUMN.sub("_", name.lower()).strip("_")
    return f"object_{col}" if not col.startswith("object_") else col


def ecotaxa_stem(name: str) -> str:
    """``ecotaxa_<name>``: EcoTaxa imports tables whose name starts with ``ecotaxa``; a name that
    already does (a prediction of a file from an EcoTaxa export) is not prefixed twice."""
    return name if name.lower().startswith("ecotaxa") else f"ecotaxa_{name}"


def write_bundle(folder: str | os.PathLike, name: str, predictions: Iterable[Prediction], *, prefix: str | None = None,
                 taxa: TaxaMap | None = None, open_image: Callable[[str], IO[bytes]] | None = None,
                 overwrite_validated: bool = False) -> BundleResult:
    """Write ``folder/ecotaxa_<name>.zip`` (see the module docstring); returns what was written.

    ``predictions`` is consumed once, image by image. ``prefix``: of object and sample ids
    (default ``name``). ``open_image(path)``: a binary file object (default: the file on disk).
    The zip is written under a temporary name and renamed when complete.
    """
    safe = safe_stem(name, limit=80)
    prefix = safe_stem(prefix if prefix is not None else name, limit=60)
    open_image = open_image or (lambda p: open(p, "rb"))
    dest = Path(folder) / f"{ecotaxa_stem(safe)}.zip"
    tsv_name = f"{ecotaxa_stem(safe)}.tsv"
    result = BundleResult(dest, tsv_name)
    taxa_map = dict(taxa.taxa) if taxa is not None else {}
    with_ids = taxa is not None and taxa.has_ids
    unmatched: set[str] = set()
    used_names: set[str] = {tsv_name}
    used_ids: set[str] = set()
    dest.parent.mkdir(parents=True, exist_ok=True)
    base = {"img_file_name": "[t]", "img_rank": "[f]", "object_id": "[t]", "object_annotation_category": "[t]",
            **({"object_annotation_category_id": "[f]"} if with_ids else {}), "object_annotation_status": "[t]"}
    spool = _Rows(dest.parent, base)  # these columns even in a bundle without rows
    try:
        with atomic_path(dest) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for pred in predictions:
                added = _add_image(zf, pred, open_image, used_names, result, overwrite_validated)
                if added is None:
                    continue
                arc, data = added
                row, types = _row(pred, arc, data, prefix, taxa_map, with_ids, used_ids, unmatched)
                del data, added
                spool.add(row, types)
                result.sources.append(pred.path)
            info = _member(tsv_name)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as out:
                spool.write_tsv(out)
            result.rows = spool.n
    finally:
        spool.close()
    result.unmatched_classes = sorted(unmatched)
    log.info("EcoTaxa bundle %s: %d rows, %d converted to PNG, %d renamed, %d skipped", dest, result.rows,
             len(result.converted), len(result.renamed), len(result.skipped))
    return result


def read_bundle_table(path: str | os.PathLike, tsv: str) -> Iterator[list[str]]:
    """The rows of the TSV ``tsv`` inside the bundle ``path`` as EcoTaxa reads them (UTF-8 after
    the BOM, tab-separated, '"'-quoted): the header, the type row, then one list per object. Read
    from the zip one row at a time."""
    with zipfile.ZipFile(path) as zf, zf.open(tsv) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        yield from csv.reader(text, delimiter="\t", quotechar='"')


def _add_image(zf: zipfile.ZipFile, pred: Prediction, open_image: Callable[[str], IO[bytes]], used_names: set[str],
               result: BundleResult, overwrite_validated: bool) -> tuple[str, bytes] | None:
    """Put one prediction's image into the zip: converted to PNG when EcoTaxa cannot show it,
    renamed when its name is not usable or already taken (``used_names`` grows). Returns its name
    in the zip and the file's own bytes, or None when it is left out (the reason in ``result.skipped``:
    validated in EcoTaxa, unreadable, or not an image EcoTaxa can take)."""
    origin = pred.origin
    if origin is not None and origin.status in HUMAN_STATUSES and not overwrite_validated:
        result.skipped.append((pred.name, f"{origin.status} in EcoTaxa: a prediction would replace it"))
        return None
    try:
        with open_image(pred.path) as fh:
            data = fh.read()
    except OSError as e:
        result.skipped.append((pred.name, f"cannot read the file ({e.strerror or e})"))
        return None
    written, fmt, problem, lossy = _ecotaxa_image(data)
    if problem:
        result.skipped.append((pred.name, problem))
        return None
    arc, why = bundle_name(pred.name, fmt)
    if arc in used_names:  # a renamed file meeting another's name: only then does order matter
        stem, ext = posixpath.splitext(arc)
        k = 2
        while f"{stem}_{k}{ext}" in used_names:
            k += 1
        arc, why = f"{stem}_{k}{ext}", (why + "; " if why else "") + "name taken"
    used_names.add(arc)
    if written is not data:
        result.converted.append((pred.name, arc))
    if lossy:
        result.lossy.append((pred.name, lossy))
    if why:
        result.renamed.append((pred.name, arc, why))
    zf.writestr(_member(arc), written, zipfile.ZIP_STORED)  # already compressed: stored
    return arc, data


def _member(name: str) -> zipfile.ZipInfo:
    """A zip entry with a fixed date (a rerun writes the same bytes) and rw-r--r-- permissions."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.external_attr = 0o644 << 16
    return info


def _ecotaxa_image(data: bytes) -> tuple[bytes, str, str, str]:
    """(bytes to write, their format, why the file cannot be written or '', why a conversion was lossy or '').

    JPEG, PNG and GIF are written as they are, after a full decode (EcoTaxa decodes each image
    and one failure stops the import: TSVFile.py:1069-1081); any other image becomes a PNG.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format in ECOTAXA_FORMATS:
                return data, im.format, "", ""
            png, lossy = _png_bytes(im)
            return png, "PNG", "", lossy
    except PIL_ERRORS as e:
        return b"", "", decode_problem(e), ""


def _row(pred: Prediction, arc: str, data: bytes, prefix: str, taxa: Mapping[str, str | int], with_ids: bool,
         used_ids: set[str], unmatched: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """One TSV row (column -> text) and the types of its columns."""
    origin = pred.origin
    if origin is not None:
        oid, sid = origin.object_id, origin.sample_id
    else:
        tag = _hex(pred.name.encode("utf-8", "surrogateescape"), hashlib.sha256(data).digest(), n=ID_HASH_HEX)
        oid = f"{prefix}_{safe_stem(posixpath.splitext(posixpath.basename(pred.name))[0])}_{tag}"
        if oid in used_ids:  # the same file listed twice under one name; never a different image
            k = 2
            while f"{oid}_{k}" in used_ids:
                k += 1
            oid = f"{oid}_{k}"
        sid = f"{prefix}_{clean_text(pred.sample).strip()}"[:MAX_NAME]
    used_ids.add(oid)
    row = {"img_file_name": arc, "img_rank": "0", "object_id": oid}
    types = {"img_rank": "[f]"}
    label = pred.label
    taxon = taxa.get(label) if label is not None else None
    row["object_annotation_category"] = (taxon if isinstance(taxon, str) else label) or ""
    if with_ids:
        row["object_annotation_category_id"] = str(taxon) if isinstance(taxon, int) else ""
        types["object_annotation_category_id"] = "[f]"
    row["object_annotation_status"] = PREDICTED if label is not None else ""
    if label is not None and taxon is None:
        unmatched.add(label)
    for k, v in pred.scores.items():
        col = _score_column(k)
        row[col] = f"{float(v):.6g}" if np.isfinite(v) else ""
        types[col] = "[f]"
    source = pred.name if origin is None else origin.image
    row["object_source_file"] = source[-MAX_FREE_TEXT:]
    row["sample_id"] = sid
    if origin is not None:
        for k, v in origin.fields.items():
            if (k.startswith(("sample_", "acq_")) or k == "acq_id") and k not in row:
                row[k] = v  # parent columns: EcoTaxa stores them as text whatever the type row says
    return row, types
