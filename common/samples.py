"""Whole samples in predict mode: the inputs and their samples, counts, EcoTaxa export, corrections.

A cruise or a deployment brings images grouped by sample (station, depth, time). Predict mode
(``inference.input``) takes:

- a **folder**, searched recursively (hidden files skipped): an image's sample is its first
  sub-folder under the input (``input/<sample>/.../img.png``); images directly in the input
  folder belong to a sample named after the folder itself;
- a **single image**: its sample is its folder's name;
- a **.csv** list with a ``path`` column and an optional ``sample`` column (without it: the
  image's folder name), or a **.txt** list of paths, one per line (``#`` comments and blank lines
  skipped). Relative paths are read relative to the list's folder; a listed file that does not
  exist is reported in ``predictions.csv``, never fatal.

Outputs built here (library code: no run folder): ``sample_counts.csv`` rows (samples x classes,
with ``unknown``), the EcoTaxa import table and ``corrections.csv`` rows.

**EcoTaxa** (``ecotaxa_rows``): the import format of EcoTaxa's own import help
(``ecotaxa/ecotaxa_front``, ``appli/templates/jobs/import_create_shared_doc.html``): a
tab-separated file whose name starts with ``ecotaxa``; line 1 the column names, each prefixed by
its level (``img_``, ``object_``, ``sample_``, ...), line 2 the type of each column (``[t]`` text,
``[f]`` float), then one line per image. ``img_file_name`` (the image's path relative to the
TSV's folder) and ``object_id`` (unique in the project) are mandatory;
``object_annotation_category`` and ``object_annotation_status`` (``predicted`` | ``dubious`` |
``validated``) carry a classification; other ``object_*`` columns are free numeric fields (up to
500 [f]), and ``sample_id`` groups objects into samples. A query rejected as unknown is written
without a category or status (EcoTaxa's "unclassified").
"""
from __future__ import annotations

import csv
import logging
import os
import re
import unicodedata
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import UserError
from .fileio import FORMULA_START, spreadsheet_text

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".csv", ".txt")  # predict inputs that list image paths
ECOTAXA_STATUS = "predicted"  # object_annotation_status of every classified row


class Inputs:
    """The images of one predict input: paths, their samples, the other files, the common root."""

    def __init__(self, images: list[str], samples: dict[str, str], others: list[tuple[str, str]], root: Path):
        self.images, self.samples, self.others, self.root = images, samples, others, root

    def sample_list(self) -> list[str]:
        """Every sample, in first-seen order."""
        return list(dict.fromkeys(self.samples[p] for p in [*self.images, *(o for o, _ in self.others)]))


def _folder(root: Path) -> Inputs:
    from .data import list_images

    images, others = list_images(root)
    base = root.resolve()
    samples = {}
    for p in [*images, *(o for o, _ in others)]:
        parts = Path(p).relative_to(base).parts
        samples[p] = parts[0] if len(parts) > 1 else base.name
    return Inputs(images, samples, others, base)


def _listed(lst: Path) -> Inputs:
    from .data import is_image_name

    base = lst.resolve().parent
    entries: list[tuple[str, str | None, int]] = []
    try:
        if lst.suffix.lower() == ".csv":
            with open(lst, encoding="utf-8-sig", newline="") as fh:
                reader = csv.DictReader(fh)
                if "path" not in (reader.fieldnames or ()):
                    raise UserError(f"inference.input: {lst} has no 'path' column (columns: path, optional sample)")
                for i, r in enumerate(reader, start=2):  # spreadsheet_text: our own predictions.csv listed again
                    p = spreadsheet_text((r.get("path") or "").strip())
                    if p:
                        entries.append((p, spreadsheet_text((r.get("sample") or "").strip()) or None, i))
        else:
            for i, line in enumerate(lst.read_text(encoding="utf-8-sig").splitlines(), start=1):
                line = line.strip()
                if line and not line.startswith("#"):
                    entries.append((line, None, i))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"inference.input: {lst} cannot be read ({e.__class__.__name__}: {e})") from None
    images, others, samples = [], [], {}
    for p, sample, line in entries:
        q = Path(p).expanduser()
        q = (base / q) if not q.is_absolute() else q
        path = str(q.resolve()) if q.exists() else str(q)
        if path in samples:
            raise UserError(f"inference.input: {lst} line {line}: {path} is listed twice")
        samples[path] = sample or q.parent.name
        if not q.is_file():
            others.append((path, "listed file does not exist"))
        elif not is_image_name(q):
            others.append((path, "not an image file (suffix)"))
        else:
            images.append(path)
    listed = [*images, *(o for o, _ in others)]
    root = Path(os.path.commonpath([str(Path(p).parent) for p in listed])) if listed else base
    return Inputs(images, samples, others, root)


def list_inputs(source: str | Path) -> Inputs:
    """The images of ``inference.input`` and their samples (see the module docstring)."""
    from .data import is_image_name

    p = Path(source).expanduser()
    if p.is_dir():
        return _folder(p)
    if p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        return _listed(p)
    if p.is_file() and is_image_name(p):
        q = str(p.resolve())
        return Inputs([q], {q: p.resolve().parent.name}, [], p.resolve().parent)
    if not p.exists():
        raise UserError(f"inference.input: {p} does not exist")
    raise UserError(f"inference.input: {p} is not a folder, an image or a .csv / .txt list of images")


def sample_counts(samples: Sequence[str], final: np.ndarray, classes: Sequence[str],
                  order: Sequence[str] | None = None, unreadable: dict[str, int] | None = None
                  ) -> tuple[list[str], list[list[Any]]]:
    """``sample_counts.csv``: one row per sample, one column per class, then ``unknown``,
    ``total`` (classified images) and ``unreadable`` (files not classified)."""
    from .metrics import UNKNOWN, UNKNOWN_NAME

    C = len(classes)
    order = list(order) if order is not None else list(dict.fromkeys(samples))
    index = {s: i for i, s in enumerate(order)}
    counts = np.zeros((len(order), C + 1), dtype=np.int64)
    for s, f in zip(samples, np.asarray(final, dtype=np.int64)):
        counts[index[s], C if f == UNKNOWN else f] += 1
    unreadable = unreadable or {}
    header = ["sample", *classes, UNKNOWN_NAME, "total", "unreadable"]
    rows = [[s, *counts[i].tolist(), int(counts[i].sum()), int(unreadable.get(s, 0))] for i, s in enumerate(order)]
    return header, rows


def _object_id(rel: str, used: set[str]) -> str:
    # never starting with "-", "." or "_": no spreadsheet formula, no hidden-looking name
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(Path(rel).with_suffix(""))).strip("_.-") or "object"
    oid, n = base, 1
    while oid in used:  # unique in the table (EcoTaxa: unique in the project)
        n += 1
        oid = f"{base}_{n}"
    used.add(oid)
    return oid


ECOTAXA_CONTROL = ("file name holds a tab, a line break or another control character: the EcoTaxa table "
                   "cannot name it (rename the file)")


def ecotaxa_rows(paths: Sequence[str], samples: Sequence[str], predicted: Sequence[str | None], root: Path,
                 scores: dict[str, np.ndarray]) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """The EcoTaxa import table (header row, type row, one row per classified image) and the
    images left out of it, ``(path, reason)``.

    ``predicted``: the class name, or None for a query rejected as unknown (no category, no
    status: EcoTaxa's "unclassified"). ``scores``: ``object_<name>`` float columns (similarity,
    margin, knn). ``img_file_name`` is the path relative to ``root``, where the TSV must sit
    (beside the images) when the folder is zipped for EcoTaxa's import. A path holding a control
    character (tab, line break...) is left out: a TSV cell cannot carry it, and a cleaned name
    would name no file. A path that starts with a spreadsheet formula character (``=``, ``+``,
    ``-``, ``@``) is written ``./<path>``: the same file, never read as a formula.
    """
    names = list(scores)
    header = ["img_file_name", "img_rank", "object_id", "object_annotation_category", "object_annotation_status",
              *[f"object_{n}" for n in names], "sample_id"]
    types = ["[t]", "[f]", "[t]", "[t]", "[t]", *["[f]"] * len(names), "[t]"]
    rows = [header, types]
    left_out: list[tuple[str, str]] = []
    used: set[str] = set()
    for i, p in enumerate(paths):
        rel = os.path.relpath(p, root).replace(os.sep, "/")
        if has_control(rel):
            left_out.append((p, ECOTAXA_CONTROL))
            continue
        cat = predicted[i]
        vals = [f"{float(scores[n][i]):.6f}" if np.isfinite(scores[n][i]) else "nan" for n in names]
        name = f"./{rel}" if rel.startswith(FORMULA_START) else rel
        rows.append([name, "1", _object_id(rel, used), cat or "", ECOTAXA_STATUS if cat else "", *vals,
                     _clean(samples[i])])
    return rows, left_out


def has_control(text: str) -> bool:
    """True when ``text`` holds a control character (tab, line break, DEL, C1) or a Unicode line
    or paragraph separator: what a TSV row or a one-line log cannot carry."""
    return any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text)


def _clean(text: str) -> str:
    """A TSV cell: control characters (tabs, line breaks...) would break the table."""
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in str(text))


def write_tsv(path: Path, rows: Sequence[Sequence[str]]) -> None:
    """Write rows as a tab-separated file (UTF-8, ``\\n`` line ends), atomically; control characters
    become spaces and every text cell goes through ``fileio.spreadsheet_safe``."""
    from .fileio import atomic_open, spreadsheet_safe

    with atomic_open(path, "w", newline="") as fh:
        for r in rows:
            fh.write("\t".join(spreadsheet_safe(_clean(c)) for c in r) + "\n")


def doubt_order(final: np.ndarray, best_sim: np.ndarray, margin: np.ndarray, low_similarity: float | None,
                small_margin: float) -> tuple[np.ndarray, list[list[str]]]:
    """Queries ordered most doubtful first, and each query's reasons for doubt.

    Reasons: ``unknown`` (rejected), ``low similarity`` (best similarity below ``low_similarity``,
    the val cut), ``small margin`` (the two best classes closer than ``small_margin``). Order:
    unknown first, then more reasons first, then lower similarity.
    """
    from .metrics import UNKNOWN

    n = len(final)
    reasons: list[list[str]] = []
    for q in range(n):
        r = []
        if final[q] == UNKNOWN:
            r.append("unknown")
        if low_similarity is not None and best_sim[q] < low_similarity:
            r.append("low similarity")
        if np.isfinite(margin[q]) and margin[q] < small_margin:
            r.append("small margin")
        reasons.append(r)
    key_unknown = np.array([0 if "unknown" in r else 1 for r in reasons])
    key_n = np.array([-len(r) for r in reasons])
    order = np.lexsort((np.arange(n), np.asarray(best_sim, np.float64), key_n, key_unknown)) if n else np.zeros(0, int)
    return order.astype(np.int64), reasons
