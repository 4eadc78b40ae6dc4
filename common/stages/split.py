"""Stage 01's driver: check every image under ``data.root`` and split each class into train / val / test.

Reads ``data.root``: a folder with one sub-folder per class, or an EcoTaxa export (a ``.zip``, or
a folder of ``ecotaxa*.tsv`` files with their images: ``common.ecotaxa.export``). From an export,
the rows whose ``object_annotation_status`` is in ``data.ecotaxa_status`` are used, each image's
class being its category (``data.ecotaxa_level``: a level of its hierarchy) through
``data.class_map``; a zip's used images are unpacked into ``01_random_split_dataset/ecotaxa_images/``
(the later stages read images by path). Writes splits.csv, class_counts.csv, bad_images.csv,
duplicates.csv, class_distribution.png (and the split folders with ``split.materialize``); from an
export, every row not used is in bad_images.csv with its reason, and class_counts.csv lists the
categories not used (status ``not used``). The splitting rule is in the docstring of
``common.data.split``.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.listing import Listing, Skipped, list_image_folder, sort_key
from ..data.scan import Scan, scan_files
from ..data.split import ClassCount, SplitResult, check_enough_classes, make_split, materialize
from ..data.splits import write_splits_csv
from ..ecotaxa.export import Export, is_export
from ..ecotaxa.rows import Selection, category_at, read_class_map, read_export
from ..errors import UserError
from ..fileio import write_csv
from ..report.plots import plot_class_distribution
from .artefacts import SPLITS_CSV

if TYPE_CHECKING:
    from ..pipeline.context import Context
from typing import Sequence

log = logging.getLogger(__name__)


ECOTAXA_IMAGES = "ecotaxa_images"  # a zipped export's used images, unpacked


def check(ctx: Context) -> None:
    """Read only, before anything is written: ``data.root`` lists as class folders, none of them a
    link back to ``data.root`` or to another class, or reads as an EcoTaxa export with usable rows
    (kept in ``ctx.checked`` for ``main``)."""
    d = ctx.cfg.data
    if is_export(d.root):
        ctx.checked["export"] = select_export(d)
        return
    for key in ("class_map", "ecotaxa_level"):
        if getattr(d, key) is not None:
            raise UserError(f"data.{key}: applies to an EcoTaxa export, but data.root {d.root} is a folder of class "
                            "sub-folders (no ecotaxa*.tsv at its top or in its sub-folders)")
    ctx.checked["listing"] = list_classes(d.root, d.follow_symlinks)


@dataclass
class Found:
    """What stage 01 splits: the listing, plus from an EcoTaxa export the rows not used and the
    notes and rows class_counts.csv adds."""

    listing: Listing
    not_used: list[Skipped] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    unused_categories: list[ClassCount] = field(default_factory=list)
    export: dict | None = None


def main(ctx: Context) -> dict:
    """List and check the images, split each class, write the tables, plot and (optionally) folders."""
    cfg = ctx.cfg
    if "export" in ctx.checked or ("listing" not in ctx.checked and is_export(cfg.data.root)):
        found = export_listing(ctx, ctx.checked.get("export") or select_export(cfg.data))
    else:
        listing = ctx.checked.get("listing") or list_classes(cfg.data.root, cfg.data.follow_symlinks)
        found = Found(listing, notes=listing.class_notes())
    listing = found.listing
    scans = scan_files(listing.files, cfg.data.min_side, cfg.data.max_pixels, cfg.data.num_workers)
    good, bad, other = (([s for s in scans if s.kind == kind]) for kind in ("image", "bad", "other"))
    report_bad(ctx, listing, bad, other, found.not_used)
    res = split_classes(ctx, listing, good, bad, other, found.notes)
    extra_copies = write_duplicates(ctx.output("duplicates.csv"), good, res)
    write_splits_csv(ctx.output(SPLITS_CSV), res.rows)
    counts = [*res.counts, *found.unused_categories]
    write_csv(ctx.output("class_counts.csv"), ("class", "total", "train", "val", "test", "status", "bad", "reason"),
              ([c.name, c.total, c.train, c.val, c.test, c.status, c.bad, c.reason] for c in counts))
    plot_class_distribution(counts, ctx.output("class_distribution.png"))
    n = materialize(res.rows, Path(listing.root), ctx.dir, cfg.split.materialize)
    if n:
        log.info("materialised %d files (%s) into %s/{train,val,test}", n, cfg.split.materialize, ctx.dir)
    per_split = Counter(r.split for r in res.rows)
    kept = [c for c in res.counts if c.status == "kept"]
    dropped = res.dropped()
    log.info("split: %d images in %d classes -> %d train, %d val, %d test", len(res.rows), len(kept),
             per_split["train"], per_split["val"], per_split["test"])
    out = {"images": len(res.rows), "classes": len(kept), "train": per_split["train"], "val": per_split["val"],
           "test": per_split["test"], "dropped_classes": len(dropped), "dropped": [c.name for c in dropped],
           "bad_images": len(bad), "non_images": len(other), "folders_not_listed": len(listing.skipped),
           "duplicate_groups": len(res.dup_groups), "duplicate_extra_copies": extra_copies,
           "cross_class_duplicate_groups": len(res.cross_class)}
    if found.export is not None:
        out["ecotaxa"] = found.export
    return out


# ----------------------------------------------------------------------------- an EcoTaxa export


def select_export(d: Any) -> Selection:
    """The rows of the export ``data.root`` to train on (read only; ``UserError`` when none)."""
    cmap = read_class_map(d.class_map) if d.class_map else None
    ex, sel = read_export(d.root, statuses=d.ecotaxa_status, class_map=cmap, level=d.ecotaxa_level, what="data.root")
    ex.close()
    why = ", ".join(f"{k}: {v}" for k, v in sorted(sel.counts().items()))
    if not sel.used:
        raise UserError(f"data.root: no row of the EcoTaxa export {d.root} is usable ({why or 'no rows'}; "
                        f"data.ecotaxa_status={list(d.ecotaxa_status)})")
    log.info("data.root %s: EcoTaxa export, %d rows used in %d classes, %d not used%s", d.root, len(sel.used),
             len(sel.class_counts()), len(sel.skipped), f" ({why})" if why else "")
    return sel


def export_listing(ctx: Context, sel: Selection) -> Found:
    """The listing of an export's used rows (a zip's images unpacked first), the rows not used as
    bad_images.csv rows, a note per class (the categories it merges, its rows not used) and a
    class_counts.csv row per category not used at all."""
    d = ctx.cfg.data
    with Export(d.root, "data.root") as ex:
        files = ex.on_disk([r.image for r, _ in sel.used], ctx.dir / ECOTAXA_IMAGES)
        root = (ctx.dir / ECOTAXA_IMAGES) if ex.is_zip else ex.source.resolve()
        shown = str(ex.source)
    pairs = sorted(((str(files[r.image]), c) for r, c in sel.used), key=lambda x: (x[1], sort_key(x[0])))
    classes = sorted({c for _, c in pairs})
    listing = Listing(str(root), pairs, [], classes, [])
    not_used = [Skipped(f"{shown}/{s.row.image}", s.row.category, f"EcoTaxa row not used ({s.row.where}, object "
                        f"{s.row.object_id}): {s.detail}", "ecotaxa") for s in sel.skipped]
    merged: dict[str, set[str]] = {}
    for r, c in sel.used:
        merged.setdefault(c, set()).add(r.category or category_at(r, d.ecotaxa_level))
    by_category: dict[str, Counter] = {}
    for s in sel.skipped:
        if s.kind != "another image":
            by_category.setdefault(category_at(s.row, d.ecotaxa_level) or "(no category)", Counter())[s.kind] += 1
    notes = {c: f"EcoTaxa categories: {', '.join(sorted(cats))}" for c, cats in merged.items() if cats != {c}}
    unused = []
    for cat, kinds in sorted(by_category.items()):
        text = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        if cat in classes:
            notes[cat] = "; ".join(x for x in (notes.get(cat), f"EcoTaxa rows not used: {text}") if x)
        else:
            unused.append(ClassCount(cat, sum(kinds.values()), status="not used", reason=f"EcoTaxa rows: {text}"))
    summary = {"rows": len(sel.used) + len(sel.skipped), "used": len(sel.used), "not_used": sel.counts(),
               "statuses": list(d.ecotaxa_status), "class_map": d.class_map, "level": d.ecotaxa_level}
    return Found(listing, not_used, notes, unused, summary)


def list_classes(data_root: str, follow_symlinks: bool) -> Listing:
    """``data.root``'s class folders and files (``UserError`` when it has no class folder)."""
    listing = list_image_folder(data_root, follow_symlinks)
    root = Path(listing.root)
    if not listing.classes:
        raise UserError(f"data.root: {root} has no class sub-folders (expected one folder per class)")
    if listing.strays:
        log.warning("%d file(s) directly in %s belong to no class folder and are ignored (e.g. %s)",
                    len(listing.strays), root, Path(listing.strays[0]).name)
    log.info("data.root %s: %d files in %d class folders", root, len(listing.files), len(listing.classes))
    return listing


def report_bad(ctx: Context, listing: Listing, bad: list[Scan], other: list[Scan],
               not_used: Sequence[Skipped] = ()) -> None:
    """``bad_images.csv`` (bad images, folders not listed, EcoTaxa rows not used); stops with
    ``data.bad_images: fail``."""
    if other:
        log.info("skipped %d non-image file(s) (e.g. %s)", len(other), other[0].path)
        for s in other:
            log.debug("not an image: %s", s.path)
    csv_path = ctx.output("bad_images.csv")
    write_bad_images(csv_path, bad, [*listing.skipped, *not_used])
    report_skipped_folders(listing, ctx.cfg.data.bad_images, csv_path)
    if bad:
        reasons = Counter(s.reason.split(":")[0] for s in bad)
        log.warning("%d bad image(s) (%s): listed in %s", len(bad),
                    ", ".join(f"{k}: {v}" for k, v in reasons.most_common()), csv_path)
        if ctx.cfg.data.bad_images == "fail":
            raise UserError(f"bad image {bad[0].path}: {bad[0].reason} (data.bad_images=fail; all {len(bad)} "
                            f"listed in {csv_path})")


def split_classes(ctx: Context, listing: Listing, good: list[Scan], bad: list[Scan], other: list[Scan],
                  notes: dict[str, str]) -> SplitResult:
    """The stratified split (``common.data.split.make_split``); too small classes dropped, two classes at least."""
    cfg = ctx.cfg
    fractions = (cfg.split.train, cfg.split.val, cfg.split.test)
    res = make_split(good, listing.classes, fractions, cfg.split.min_images, cfg.run.seed,
                     bad_per_class=Counter(s.label for s in bad), notes=notes)
    if not res.rows:
        raise UserError(f"data.root: no class in {listing.root} has at least split.min_images={cfg.split.min_images} "
                        f"usable images ({len(good)} usable, {len(bad)} bad, {len(other)} non-images)")
    dropped = res.dropped()
    if dropped:
        log.warning("dropped %d class(es) with fewer than split.min_images=%d usable images: %s", len(dropped),
                    cfg.split.min_images, ", ".join(f"{c.name} ({c.total})" for c in dropped))
    check_enough_classes(res, listing.root, cfg.split.min_images)
    return res


def write_duplicates(path: Path, good: list[Scan], res: SplitResult) -> int:
    """``duplicates.csv``; warns when one content sits in two classes. Returns the extra copies."""
    split_of = {r.path: r.split for r in res.rows}
    dup_rows = sorted(([g, s.sha256, s.label, s.path, split_of.get(s.path, ""), int(s.sha256 in res.cross_class)]
                       for s in good if (g := res.dup_groups.get(s.sha256))), key=lambda r: (r[0], sort_key(r[3])))
    write_csv(path, ("dup_group", "sha256", "label", "path", "split", "cross_class"), dup_rows)
    extra_copies = len(dup_rows) - len(res.dup_groups)
    if res.dup_groups:
        log.info("%d group(s) of exact duplicates (%d extra copies): each group stays in one split per class; "
                 "listed in duplicates.csv", len(res.dup_groups), extra_copies)
    if res.cross_class:
        example = next(r for r in dup_rows if r[5])
        log.warning("%d duplicate group(s) span two or more classes (kept; e.g. group %d: %s): see duplicates.csv",
                    len(res.cross_class), example[0],
                    ", ".join(f"{r[2]}/{Path(r[3]).name}" for r in dup_rows if r[0] == example[0]))
    return extra_copies


# ----------------------------------------------------------------------------- outputs


def write_bad_images(path: Path, bad: Sequence[Scan], skipped: Sequence[Skipped]) -> int:
    """``bad_images.csv`` (path,label,reason): the bad images, then the folders listing did not
    enter (unreadable folders, directory symlinks not followed), then an EcoTaxa export's rows not
    used. Returns the number of rows."""
    return write_csv(path, ("path", "label", "reason"),
                     ([s.path, s.label, s.reason] for s in [*bad, *skipped]))


def report_skipped_folders(listing: Listing, bad_images: str, csv_path: Path) -> None:
    """Log the folders listing did not enter (listed in ``csv_path``). An unreadable folder stops
    the stage with ``data.bad_images=fail`` (its images could not be checked); a directory symlink
    not followed never does (``data.follow_symlinks`` decides)."""
    unreadable = listing.unreadable()
    links = [s for s in listing.skipped if s.kind == "symlink"]
    for s in listing.skipped:
        log.debug("%s (class %s): %s", s.path, s.label, s.reason)
    if links:
        log.warning("%d directory symlink(s) not followed (e.g. %s: %s): listed in %s", len(links), links[0].path,
                    links[0].reason, csv_path)
    if unreadable:
        log.warning("%d folder(s) cannot be read, their images are left out (e.g. %s: %s): listed in %s",
                    len(unreadable), unreadable[0].path, unreadable[0].reason, csv_path)
        if bad_images == "fail":
            raise UserError(f"folder {unreadable[0].path}: {unreadable[0].reason} (data.bad_images=fail; all "
                            f"{len(listing.skipped)} folder(s) not listed are in {csv_path})")
