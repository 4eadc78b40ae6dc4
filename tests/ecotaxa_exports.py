"""Test data: the demo digits written as an EcoTaxa export, the way EcoTaxa writes one.

EcoTaxa's export (ecotaxa_back ``py/API_operations/exports/ForProject.py:509-700``): one TSV per
sample (``split_by=sample``) written with ``csv.DictWriter(delimiter='\\t', quoting=QUOTE_NONNUMERIC)``
(every text cell quoted, numbers bare), UTF-8 with a BOM or latin-1, the ``[t]``/``[f]`` type row
when asked for. A general export puts ``ecotaxa_<sample>.tsv`` at the root and the images in
``<sample>/`` (``img_file_name`` = ``<sample>/<file>``); a backup puts the TSV inside ``<sample>/``
beside its images. Categories are display names (``zero<even``), the hierarchy is the
``>``-joined names from the root.
"""
from __future__ import annotations

import csv
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLES = ("Station é1", "st2", "Ñandú 3")  # accented sample names


def category(d: int) -> str:
    """Digit ``d``'s EcoTaxa display name: ``<word><<parity>`` (names repeat under two parents)."""
    return f"{WORDS[d]}<{'even' if d % 2 == 0 else 'odd'}"


def hierarchy(d: int) -> str:
    return f"living>digits>{'even' if d % 2 == 0 else 'odd'}>{WORDS[d]}"


@dataclass
class Truth:
    """What the export holds: object_id -> (category, status, sample_id, image path in the export)."""

    objects: dict[str, tuple[str, str, str, str]]
    tsvs: list[str]


HEADER = ["img_file_name", "img_rank", "object_id", "object_lat", "object_annotation_status",
          "object_annotation_person_name", "object_annotation_category", "object_annotation_hierarchy",
          "object_area", "sample_id", "sample_station", "acq_id", "acq_instrument"]
TYPES = ["[t]", "[f]", "[t]", "[f]", "[t]", "[t]", "[t]", "[t]", "[f]", "[t]", "[t]", "[t]", "[t]"]


def make_export(dest: Path, digits: Path, *, per_class: int = 3, encoding: str = "utf-8-sig", types_row: bool = True,
                layout: str = "general", with_hierarchy: bool = True, extra_image: bool = False,
                as_zip: bool = False) -> tuple[Path, Truth]:
    """Write an export of ``per_class`` digits per class over ``SAMPLES``; returns (its path, the truth).

    Per class: the first image validated, the second predicted, the third unclassified, further
    ones validated. ``encoding``: ``utf-8-sig`` (EcoTaxa's default), ``latin-1`` (``use_latin1``)
    or ``utf-8`` (a hand-made file without a BOM). ``layout``: ``general`` or ``backup``.
    ``extra_image``: the first object also has a second image (``img_rank`` 1).
    """
    folder = dest.with_suffix("") if as_zip else dest
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[list]] = {s: [] for s in SAMPLES}
    truth: dict[str, tuple[str, str, str, str]] = {}
    n = 0
    for d in range(10):
        files = sorted((digits / f"digit_{d}").glob("*.png"))[:per_class]
        for i, f in enumerate(files):
            sample = SAMPLES[n % len(SAMPLES)]
            n += 1
            status = ("validated", "predicted", "")[i] if i < 3 else "validated"
            cat = category(d) if status else ""
            oid = f"{sample.replace(' ', '_')}_{d}_{i}"
            fname = f"{oid}.png"
            img_dir = folder / sample
            img_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, img_dir / fname)
            rel = f"{sample}/{fname}" if layout == "general" else fname
            row = [rel, 0, oid, 43.5 + d, status, "Ana Núñez" if status == "validated" else "", cat,
                   hierarchy(d) if status else "", float(100 + n), sample, f"station «{sample}»", f"{sample}_acq",
                   "zooscan"]
            if not with_hierarchy:
                row[7] = ""
            rows[sample].append(row)
            truth[oid] = (cat, status, sample, f"{sample}/{fname}")
            if extra_image and n == 1:
                shutil.copyfile(files[-1], img_dir / f"{oid}_b.png")
                rows[sample].append([f"{rel[:-4]}_b.png", 1, *row[2:]])
    header = HEADER if with_hierarchy else [h for h in HEADER if h != "object_annotation_hierarchy"]
    types = TYPES if with_hierarchy else [t for h, t in zip(HEADER, TYPES) if h != "object_annotation_hierarchy"]
    tsvs = []
    for sample, sample_rows in rows.items():
        tsv = f"ecotaxa_{sample}.tsv" if layout == "general" else f"{sample}/ecotaxa_{sample}.tsv"
        tsvs.append(tsv)
        with open(folder / tsv, "w", encoding=encoding, newline="") as fh:
            w = csv.writer(fh, delimiter="\t", quotechar='"', lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
            w.writerow(header)
            if types_row:
                w.writerow(types)
            for r in sample_rows:
                w.writerow(r if with_hierarchy else r[:7] + r[8:])
    if not as_zip:
        return folder, Truth(truth, tsvs)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    shutil.rmtree(folder)
    return dest, Truth(truth, tsvs)
