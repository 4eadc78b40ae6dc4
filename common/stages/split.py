"""Stage 01's driver: check every image under ``data.root`` and split each class into train / val / test.

Reads ``data.root``; writes splits.csv, class_counts.csv, bad_images.csv, duplicates.csv,
class_distribution.png (and the split folders with ``split.materialize``). The splitting rule is
in the docstring of ``common.split``.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.listing import Listing, list_image_folder, sort_key
from ..data.scan import Scan, scan_files
from ..data.split import SplitResult, check_enough_classes, make_split, materialize
from ..data.splits import write_splits_csv
from ..errors import UserError
from ..fileio import write_csv
from ..report.plots import plot_class_distribution
from .artefacts import SPLITS_CSV

if TYPE_CHECKING:
    from ..pipeline.context import Context


from typing import Sequence

from ..data.listing import Skipped

log = logging.getLogger(__name__)


def check(ctx: Context) -> None:
    """Read only, before anything is written: ``data.root`` lists as class folders, none of them a
    link back to ``data.root`` or to another class (kept in ``ctx.checked`` for ``main``)."""
    ctx.checked["listing"] = list_classes(ctx.cfg.data.root, ctx.cfg.data.follow_symlinks)


def main(ctx: Context) -> dict:
    """List and check the images, split each class, write the tables, plot and (optionally) folders."""
    cfg = ctx.cfg
    listing = ctx.checked.get("listing") or list_classes(cfg.data.root, cfg.data.follow_symlinks)
    scans = scan_files(listing.files, cfg.data.min_side, cfg.data.max_pixels, cfg.data.num_workers)
    good, bad, other = (([s for s in scans if s.kind == kind]) for kind in ("image", "bad", "other"))
    report_bad(ctx, listing, bad, other)
    res = split_classes(ctx, listing, good, bad, other)
    extra_copies = write_duplicates(ctx.output("duplicates.csv"), good, res)
    write_splits_csv(ctx.output(SPLITS_CSV), res.rows)
    write_csv(ctx.output("class_counts.csv"), ("class", "total", "train", "val", "test", "status", "bad", "reason"),
              ([c.name, c.total, c.train, c.val, c.test, c.status, c.bad, c.reason] for c in res.counts))
    plot_class_distribution(res.counts, ctx.output("class_distribution.png"))
    n = materialize(res.rows, Path(listing.root), ctx.dir, cfg.split.materialize)
    if n:
        log.info("materialised %d files (%s) into %s/{train,val,test}", n, cfg.split.materialize, ctx.dir)
    per_split = Counter(r.split for r in res.rows)
    kept = [c for c in res.counts if c.status == "kept"]
    dropped = res.dropped()
    log.info("split: %d images in %d classes -> %d train, %d val, %d test", len(res.rows), len(kept),
             per_split["train"], per_split["val"], per_split["test"])
    return {"images": len(res.rows), "classes": len(kept), "train": per_split["train"], "val": per_split["val"],
            "test": per_split["test"], "dropped_classes": len(dropped), "dropped": [c.name for c in dropped],
            "bad_images": len(bad), "non_images": len(other), "folders_not_listed": len(listing.skipped),
            "duplicate_groups": len(res.dup_groups), "duplicate_extra_copies": extra_copies,
            "cross_class_duplicate_groups": len(res.cross_class)}


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


def report_bad(ctx: Context, listing: Listing, bad: list[Scan], other: list[Scan]) -> None:
    """``bad_images.csv`` (bad images and folders not listed); stops with ``data.bad_images: fail``."""
    if other:
        log.info("skipped %d non-image file(s) (e.g. %s)", len(other), other[0].path)
        for s in other:
            log.debug("not an image: %s", s.path)
    csv_path = ctx.output("bad_images.csv")
    write_bad_images(csv_path, bad, listing.skipped)
    report_skipped_folders(listing, ctx.cfg.data.bad_images, csv_path)
    if bad:
        reasons = Counter(s.reason.split(":")[0] for s in bad)
        log.warning("%d bad image(s) (%s): listed in %s", len(bad),
                    ", ".join(f"{k}: {v}" for k, v in reasons.most_common()), csv_path)
        if ctx.cfg.data.bad_images == "fail":
            raise UserError(f"bad image {bad[0].path}: {bad[0].reason} (data.bad_images=fail; all {len(bad)} "
                            f"listed in {csv_path})")


def split_classes(ctx: Context, listing: Listing, good: list[Scan], bad: list[Scan], other: list[Scan]) -> SplitResult:
    """The stratified split (``common.split.make_split``); too small classes dropped, two classes at least."""
    cfg = ctx.cfg
    fractions = (cfg.split.train, cfg.split.val, cfg.split.test)
    res = make_split(good, listing.classes, fractions, cfg.split.min_images, cfg.run.seed,
                     bad_per_class=Counter(s.label for s in bad), notes=listing.class_notes())
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
    enter (unreadable folders, directory symlinks not followed). Returns the number of rows."""
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
