"""Predict mode's inputs: the images of ``inference.input`` and their samples (folder, image, list).

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

An EcoTaxa export given as ``inference.input`` is read by ``common.ecotaxa.export.export_inputs``
(this package knows no EcoTaxa), which returns the same ``Inputs`` with each object's export row.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import spreadsheet_text

LIST_SUFFIXES = (".csv", ".txt")  # predict inputs that list image paths


class Inputs:
    """The images of one predict input: paths, their samples, the other files, the common root;
    ``origins``: path -> the EcoTaxa export row an image comes from (empty for other inputs)."""

    def __init__(self, images: list[str], samples: dict[str, str], others: list[tuple[str, str]], root: Path,
                 origins: dict[str, Any] | None = None):
        self.images, self.samples, self.others, self.root = images, samples, others, root
        self.origins = origins or {}

    def sample_list(self) -> list[str]:
        """Every sample, in first-seen order."""
        return list(dict.fromkeys(self.samples[p] for p in [*self.images, *(o for o, _ in self.others)]))


def _folder(root: Path) -> Inputs:
    from .listing import list_images

    images, others = list_images(root)
    base = root.resolve()
    samples = {}
    for p in [*images, *(o for o, _ in others)]:
        parts = Path(p).relative_to(base).parts
        samples[p] = parts[0] if len(parts) > 1 else base.name
    return Inputs(images, samples, others, base)


def _listed(lst: Path) -> Inputs:
    from .listing import is_image_name

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
    from .listing import is_image_name

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
