"""Reading an EcoTaxa export (zip or folder of ecotaxa_*.tsv with images) as EcoTaxa writes it.

EcoTaxa (ecotaxa/ecotaxa_back, commit cb44b19) is cited by file:line below; the figures come from
running its own import validation (``InBundle.validate_import`` -> ``TSVFile.do_validate``).

**Reading an export** (``Export``, ``select``). An export is a ``.zip`` or a folder holding one or
more ``ecotaxa*.tsv`` / ``ecotaxa*.txt`` files (EcoTaxa's own filter, Bundle.py:44) with their
images; EcoTaxa writes one TSV per sample (``split_by=sample``), either at the root with images in
``<sample>/`` (general export) or inside ``<sample>/`` beside its images (backup). Each TSV is read
the way EcoTaxa writes it (ForProject.py:592-609): a UTF-8 BOM (default) or latin-1 (``use_latin1``),
strings quoted (``QUOTE_NONNUMERIC``), the ``[t]``/``[f]`` type row present or not. Without a BOM
EcoTaxa itself assumes latin-1 (TSVFile.py:103-111); here a file without a BOM is read as UTF-8
when it decodes as UTF-8 (a hand-made file) and as latin-1 otherwise. Column names are stripped
and lower-cased as EcoTaxa does (TSVFile.py:120). ``img_file_name`` is relative to the TSV's folder
(TSVFile.py:84-85, 427-434); a path that leaves the export is refused, and so is a zip member
whose name would (zip slip). ``object_id`` is unique in a project: a second row with the same
``object_id`` is refused (every one listed) unless it is another image of the object (another
``img_rank``, EcoTaxa's "all images" export); ``select`` then keeps the first image. Images in a
zip are read member by member, never all at once.

Why not ``pyecotaxa`` (0.0.5, ``pyecotaxa.archive.read_tsv``): it reads one encoding it is told
(default UTF-8: a latin-1 export fails with UnicodeDecodeError), its fixed dtypes make a TSV with
an empty ``img_rank`` fail ("Integer column has NA values", EcoTaxa's own test data has such rows),
it returns a pandas DataFrame (pandas is not a dependency here, and a DataFrame of every column
of a large export is what ``Export.rows(columns=...)`` avoids), and it pulls in requests,
werkzeug, anytree and python-dotenv for its EcoTaxa client, under the GPL-3.0. Its type-row test
(every cell ``[t]``/``[f]``) is the one used here. The csv module and ~100 lines do the reading.

**Writing a bundle** (``write_bundle``): ``ecotaxa_<name>.zip`` with ``ecotaxa_<name>.tsv`` at
its root (UTF-8 with a BOM, else EcoTaxa reads latin-1: TSVFile.py:103-111), the column names,
the ``[t]``/``[f]`` type row, one row per image, and each image at its ``img_file_name``:

- images are streamed into the zip one at a time; the TSV rows are spooled to a temporary file
  and added last, so memory does not grow with the images' bytes (only a few hundred bytes of
  zip directory and ids per image, plus the result's lists of converted and renamed files);
- EcoTaxa takes JPEG, PNG and GIF only (py/BO/Image.py:16, 36-40; one other file stops the whole
  import): other formats (BMP, TIFF, WebP, MPO, ...) are converted to PNG, pixel for pixel; a
  mode PNG cannot hold (float, CMYK, 32-bit) is converted to the nearest one and listed as lossy;
- a name EcoTaxa cannot carry (tab, line break and other control characters, bytes that are
  not UTF-8, ``"``, ``\\``, ``..``, longer than ``img_file_name``'s 255 characters, or an extension that does not match
  its format) is renamed inside the bundle: the cleaned name, ``_`` and 8 hex digits of the
  original path; every renamed or converted file is listed in the result, and its original path
  (relative to the input) is in the free column ``object_source_file``;
- ``object_id`` = ``<prefix>_<file stem>_<12 hex digits of sha256(path in the input, content)>``
  and ``sample_id`` = ``<prefix>_<sample>``: the same for the same image and prefix whatever the
  listing order or run, and distinct across predictions with other prefixes (default: the
  prediction's name), so two cruises never merge samples or collide as "already in EcoTaxa"
  (TSVFile.py:489-492, 1092-1099);
- a row from an EcoTaxa export (``Prediction.origin``) keeps its own ``object_id``, ``sample_id``,
  ``acq_id`` and ``sample_*``/``acq_*`` columns: imported with update mode "Cla" (update with
  classification; "Yes" drops annotation columns, TSVFile.py:452-456) and "skip existing
  objects" (otherwise an unchanged ``img_file_name`` is "already in EcoTaxa", TSVFile.py:1092-1099;
  EcoTaxa's own update test sets it), EcoTaxa finds each object by ``object_id`` alone
  (TSVFile.py:800-805, Object.py:135-143) and updates its classification. An object a person has
  already validated or marked dubious is not written (its classification would be replaced by a
  prediction) unless ``overwrite_validated``; it is listed as skipped;
- taxonomy: EcoTaxa matches each ``object_annotation_category`` to exactly one taxon
  (case-insensitive name, display name, or ``name<parent``: Taxonomy.py:116-146, Import.py:246-280);
  an unmatched or ambiguous name makes the import job stop and ask a person to map it
  (Import.py:139-148). ``read_taxa_map`` reads a CSV ``class,taxon``: a taxon that is a number is
  written to ``object_annotation_category_id`` (checked against the taxonomy, never matched by
  name: TSVFile.py:1247-1255, Bundle.py:264-265, 331-346) with the class name kept in
  ``object_annotation_category`` for people (EcoTaxa drops it when the id is set,
  TSVFile.py:180-185); any other taxon is written as the category name. Classes without a map
  entry are written as they are and returned as ``unmatched_classes``;
- a classified row has ``object_annotation_status`` ``predicted``; a row rejected as unknown has
  no category and no status (EcoTaxa's "unclassified"). EcoTaxa stores a fixed score of 1.0 for
  every predicted row it imports (``PSEUDO_TRAINING_SCORE``, TSVFile.py:222-227, 376-377;
  DB/Prediction.py:21): the similarity, margin and k-NN scores arrive only as free numeric
  ``object_<score>`` columns (up to 500 per project), not as EcoTaxa's prediction score.

Text cells are written as they are, apart from control characters (a tab or line break would
cut the row): no spreadsheet formula escaping, since a leading ``'`` would become part of the
ids and names EcoTaxa stores.
"""
from __future__ import annotations

import codecs
import csv
import io
import logging
import os
import posixpath
import re
import shutil
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


from ..errors import UserError
from ..fileio import atomic_path


log = logging.getLogger(__name__)


TSV_PATTERN = re.compile(r"^ecotaxa.*\.(tsv|txt)$")  # Bundle.py:44 (case-sensitive glob there too)
TYPE_CELLS = frozenset({"[t]", "[f]"})
STATUSES = ("predicted", "dubious", "validated", "discarded")  # DB/Object.py:52-57
HUMAN_STATUSES = frozenset({"validated", "dubious", "discarded"})  # set by a person, not a classifier
MAX_NAME = 255  # images.orig_file_name, obj_head.orig_id, samples.orig_id: VARCHAR(255)
DROP = "-"  # class map: drop this category
ANY = "*"  # class map: every category not listed
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# The lone surrogates Python uses for file-name bytes that are not UTF-8: they cannot be written
# as UTF-8 at all.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_COLUMN = re.compile(r"[^a-z0-9_]+")
_COPY_CHUNK = 1 << 20


def clean_text(value: Any) -> str:
    """A TSV cell: control characters (tab, line breaks) would cut the row: each run becomes a
    space; a file-name byte that is not UTF-8 becomes U+FFFD."""
    return _SURROGATE.sub("\ufffd", _CONTROL.sub(" ", str(value)))


# ============================================================================ reading an export


@dataclass(eq=False)
class EcoObject:
    """One row of an EcoTaxa export: an image of an object.

    ``image``: the image's path inside the export ('/'-separated, relative to the export's root);
    ``category``: ``object_annotation_category`` ('' when none); ``hierarchy``:
    ``object_annotation_hierarchy`` ('>'-separated names from the root, '' when absent);
    ``status``: ``object_annotation_status`` in lower case ('' = not classified); ``rank``:
    ``img_rank`` (None when empty); ``fields``: the row's other columns that ``Export.rows`` was
    asked to keep, by lower-case column name.
    """

    object_id: str
    sample_id: str
    image: str
    category: str
    hierarchy: str
    status: str
    rank: float | None
    tsv: str
    line: int
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """``<tsv>:<line>``, for messages."""
        return f"{self.tsv}:{self.line}"


def _is_tsv(name: str) -> bool:
    parts = name.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts[:-1]) or parts[-1].startswith("."):
        return False  # hidden files and the resource forks macOS adds to a zip
    return bool(TSV_PATTERN.match(parts[-1]))


def _escapes(name: str) -> bool:
    """True when a '/'-separated relative name is absolute or climbs out of its root."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return any(p == ".." for p in re.split(r"[/\\]", name))


def is_export(source: str | os.PathLike) -> bool:
    """True when ``source`` is a .zip file or a folder holding an ``ecotaxa*.tsv|txt`` at its top
    or in a sub-folder (where EcoTaxa puts them: ``ecotaxa_<sample>.tsv`` or
    ``<sample>/ecotaxa_<sample>.tsv``); deeper files are not looked for, so a large folder of class
    sub-folders is not walked."""
    p = Path(source).expanduser()
    if p.is_file():
        return p.suffix.lower() == ".zip"
    if not p.is_dir():
        return False
    try:
        top = list(os.scandir(p))
        if any(e.is_file() and _is_tsv(e.name) for e in top):
            return True
        for d in top:
            if d.is_dir() and not d.name.startswith("."):
                if any(e.is_file() and _is_tsv(f"{d.name}/{e.name}") for e in os.scandir(d.path)):
                    return True
    except OSError:
        return False
    return False


def _walk_tsv_candidates(root: Path) -> Iterator[Path]:
    for pattern in ("ecotaxa*.tsv", "ecotaxa*.txt"):
        yield from root.rglob(pattern)


class Export:
    """An EcoTaxa export: a .zip or a folder of ``ecotaxa*.tsv`` files with their images.

    Use as a context manager (a zip stays open for reading members). ``tsv_files``: the TSVs,
    relative to the export's root, sorted.
    """

    def __init__(self, source: str | os.PathLike, what: str = "EcoTaxa export"):
        self.source = Path(source).expanduser()
        self.what = what
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, zipfile.ZipInfo] = {}
        if self.source.is_file() and self.source.suffix.lower() == ".zip":
            try:
                self._zip = zipfile.ZipFile(self.source)
            except (OSError, zipfile.BadZipFile) as e:
                raise UserError(f"{what}: {self.source} cannot be read as a zip ({e})") from None
            for info in self._zip.infolist():
                name = _member_name(info)
                if _escapes(name):
                    self.close()
                    raise UserError(f"{what}: {self.source} holds a member that leaves the archive: {name!r}")
                if not info.is_dir():
                    self._members[name] = info
            self.tsv_files = sorted(n for n in self._members if _is_tsv(n))
        elif self.source.is_dir():
            root = self.source
            self.tsv_files = sorted({f.relative_to(root).as_posix() for f in _walk_tsv_candidates(root)
                                     if f.is_file() and _is_tsv(f.relative_to(root).as_posix())})
        elif not self.source.exists():
            raise UserError(f"{what}: {self.source} does not exist")
        else:
            raise UserError(f"{what}: {self.source} is neither a .zip nor a folder")
        if not self.tsv_files:
            self.close()
            raise UserError(f"{what}: {self.source} holds no ecotaxa*.tsv file (an EcoTaxa export has one per "
                            "sample, or one in all)")

    # -- files

    @property
    def is_zip(self) -> bool:
        return self._zip is not None

    def has(self, name: str) -> bool:
        """True when the export holds the file ``name`` (relative to its root)."""
        if self._zip is not None:
            return name in self._members
        return self._local(name).is_file()

    def _local(self, name: str) -> Path:
        return self.source / name

    def local_path(self, name: str) -> Path | None:
        """The file on disk for a folder export, None for a zip (read it with ``open`` or ``extract``)."""
        return None if self._zip is not None else self._local(name)

    def open(self, name: str) -> IO[bytes]:
        """A binary file object for ``name`` (a zip member is decompressed as it is read)."""
        if self._zip is not None:
            info = self._members.get(name)
            if info is None:
                raise FileNotFoundError(f"{self.source}: no member {name!r}")
            return self._zip.open(info)
        return open(self._local(name), "rb")

    def extract(self, names: Iterable[str], dest: str | os.PathLike) -> dict[str, Path]:
        """Copy the files ``names`` to ``dest/<name>`` one at a time (streamed); returns name -> path.

        Each file is written under a temporary name and renamed, so a file at its final path is
        complete. Names were checked not to leave the export, so they stay inside ``dest``.
        """
        dest = Path(dest)
        out: dict[str, Path] = {}
        for name in names:
            target = dest / name
            with self.open(name) as src, atomic_path(target) as tmp, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, _COPY_CHUNK)
            out[name] = target
        return out

    def on_disk(self, names: Iterable[str], dest: str | os.PathLike | None) -> dict[str, Path]:
        """A file on disk for each of ``names``: a folder export's own files, a zip's members
        copied to ``dest/<name>`` (``extract``; a file already there with the member's size is
        kept, so a rerun does not copy again); ``dest`` is needed for a zip."""
        names = list(dict.fromkeys(names))
        if self._zip is None:
            return {n: self._local(n) for n in names}
        if dest is None:
            raise ValueError("a zipped export's images need a folder to be unpacked into")
        todo = [n for n in names if not ((Path(dest) / n).is_file()
                                        and (Path(dest) / n).stat().st_size == self._members[n].file_size)]
        if todo:
            log.info("%s: unpacking %d of %d images into %s", self.what, len(todo), len(names), dest)
        out = self.extract(todo, dest)
        return {n: out.get(n, Path(dest) / n) for n in names}

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> Export:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- rows

    def rows(self, columns: Sequence[str] | None = ("sample_", "acq_")) -> list[EcoObject]:
        """Every row of every TSV, in TSV order. Refuses (UserError listing them) object ids that
        appear twice, unless the rows are different images (``img_rank``) of the object.

        ``columns``: prefixes of the other columns to keep in ``EcoObject.fields`` (None: all).
        Values repeated from row to row (sample and acquisition columns) share one string.
        """
        out: list[EcoObject] = []
        for tsv in self.tsv_files:
            out.extend(self._read_tsv(tsv, columns))
        _refuse_duplicates(out, self)
        return out

    def _read_tsv(self, tsv: str, columns: Sequence[str] | None) -> list[EcoObject]:
        with self.open(tsv) as fh:
            bom = fh.read(3) == codecs.BOM_UTF8
        encodings = ["utf-8-sig"] if bom else ["utf-8", "latin-1"]
        for enc in encodings:
            try:
                with self.open(tsv) as raw:
                    text = io.TextIOWrapper(raw, encoding=enc, newline="")
                    rows = list(self._parse(tsv, text, columns))
                if enc == "latin-1":
                    log.info("%s: %s is not UTF-8 and has no BOM: read as latin-1 (as EcoTaxa does)", self.what, tsv)
                return rows
            except UnicodeDecodeError:
                continue
        raise AssertionError("latin-1 decodes every byte")  # pragma: no cover

    def _parse(self, tsv: str, text: IO[str], columns: Sequence[str] | None) -> Iterator[EcoObject]:
        """The objects of one TSV, row by row (blank lines and EcoTaxa's type row skipped)."""
        where = f"{self.what}: {self.source}"
        reader = csv.reader(text, delimiter="\t", quotechar='"')
        header = _read_header(reader, tsv, where)
        if header is None:
            return
        names, seen = header
        keep = [i for i, n in enumerate(names) if n and (columns is None or n.startswith(tuple(columns)))]
        col = {n: seen.get(n) for n in ("object_id", "sample_id", "img_file_name", "img_rank", "object_annotation_category",
                                        "object_annotation_hierarchy", "object_annotation_status")}
        shared: dict[str, str] = {}
        first = True
        try:
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue  # blank line
                if first:
                    first = False
                    cells = [c.strip() for c in row if c.strip()]
                    if cells and all(c in TYPE_CELLS for c in cells):
                        continue  # the type row
                yield self._object(row, reader.line_num, names, col, keep, shared, tsv, where)
        except csv.Error as e:
            raise UserError(f"{where}: {tsv} line {reader.line_num}: {e}") from None

    def _object(self, row: list[str], line: int, names: list[str], col: dict[str, int | None], keep: list[int],
                shared: dict[str, str], tsv: str, where: str) -> EcoObject:
        """One data row of ``tsv`` (``where``: the export, for the error lines) as an ``EcoObject``;
        ``UserError`` naming the line when a value is missing or unusable."""
        at = f"{where}: {tsv}"
        if len(row) > len(names) and any(c.strip() for c in row[len(names):]):
            raise UserError(f"{at} line {line}: {len(row)} values for {len(names)} columns")
        row = row + [""] * (len(names) - len(row))

        def get(name: str) -> str:
            i = col[name]
            return row[i].strip() if i is not None else ""

        oid = get("object_id")
        if not oid:
            raise UserError(f"{at} line {line}: empty object_id")
        img = get("img_file_name")
        if not img:
            raise UserError(f"{at} line {line}: empty img_file_name")
        if _escapes(img):
            raise UserError(f"{at} line {line}: img_file_name {img!r} leaves the export")
        image = posixpath.normpath(posixpath.join(posixpath.dirname(tsv), img))
        if not self.is_zip and not _inside(self.source, image):
            raise UserError(f"{at} line {line}: img_file_name {img!r} leads outside the export")
        rank_text = get("img_rank")
        try:
            rank = float(rank_text) if rank_text else None
        except ValueError:
            raise UserError(f"{at} line {line}: img_rank {rank_text!r} is not a number") from None
        fields = {names[i]: shared.setdefault(row[i], row[i]) for i in keep}
        return EcoObject(oid, get("sample_id"), image, get("object_annotation_category"),
                         get("object_annotation_hierarchy"), get("object_annotation_status").lower(), rank,
                         tsv, line, fields)


def _read_header(reader: Any, tsv: str, where: str) -> tuple[list[str], dict[str, int]] | None:
    """A TSV's column names (lower case, as EcoTaxa's TSVFile.py:120) and their indices; None for an
    empty file. ``UserError`` for a column named twice, or without object_id or img_file_name."""
    try:
        header = next(reader)
    except StopIteration:
        return None
    except csv.Error as e:
        raise UserError(f"{where}: {tsv} line 1: {e}") from None
    names = [h.strip(" \t").lower() for h in header]  # TSVFile.py:120
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n and n in seen:
            raise UserError(f"{where}: {tsv} has the column {n!r} twice (columns {seen[n] + 1} and {i + 1})")
        seen[n] = i
    for need in ("object_id", "img_file_name"):
        if need not in seen:
            hint = " (export again with images)" if need == "img_file_name" else ""
            raise UserError(f"{where}: {tsv} has no {need} column{hint}")
    return names, seen


def _member_name(info: zipfile.ZipInfo) -> str:
    """A member's name as its creator meant it: a zip tool that does not set the UTF-8 flag
    (Windows Explorer) stores UTF-8 bytes that zipfile decodes as cp437."""
    name = info.filename
    if not info.flag_bits & 0x800 and not name.isascii():
        try:
            name = name.encode("cp437").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass  # not UTF-8 read as cp437: the name zipfile decoded is the name
    return name


def _inside(root: Path, name: str) -> bool:
    """True when ``root/name`` resolves inside ``root`` (a symlink may point elsewhere)."""
    base = root.resolve()
    target = (root / name).resolve()
    return target == base or base in target.parents


def _refuse_duplicates(rows: Sequence[EcoObject], export: Export) -> None:
    by_id: dict[str, list[EcoObject]] = {}
    for r in rows:
        by_id.setdefault(r.object_id, []).append(r)
    clashes = []
    for oid, group in by_id.items():
        if len(group) < 2:
            continue
        ranks = [g.rank for g in group]
        if None in ranks or len(set(ranks)) < len(ranks) or len({g.image for g in group}) < len(group):
            clashes.append(f"{oid} ({', '.join(g.where for g in group)})")
    if clashes:
        more = f" and {len(clashes) - 10} more" if len(clashes) > 10 else ""
        raise UserError(f"{export.what}: {export.source}: {len(clashes)} object_id(s) appear on several rows "
                        f"(EcoTaxa's object_id is unique in a project): {'; '.join(clashes[:10])}{more}")
