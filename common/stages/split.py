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

from ..data import list_image_folder, sort_key
from ..errors import UserError
from ..fileio import write_csv
from ..plots import plot_class_distribution
from ..split import (check_enough_classes, make_split, materialize, report_skipped_folders, scan_files,
                     write_bad_images, write_splits_csv)

if TYPE_CHECKING:
    from ..stage import Context

log = logging.getLogger(__name__)


def main(ctx: Context) -> dict:
    """Scan ``data.root``, write splits.csv, class_counts.csv, bad_images.csv, duplicates.csv,
    class_distribution.png (and the split folders); return the metrics."""
    cfg, output, stage_dir = ctx.cfg, ctx.output, ctx.dir
    listing = list_image_folder(cfg.data.root, cfg.data.follow_symlinks)
    files, strays, classes, root = listing.files, listing.strays, listing.classes, Path(listing.root)
    if not classes:
        raise UserError(f"data.root: {root} has no class sub-folders (expected one folder per class)")
    if strays:
        log.warning("%d file(s) directly in %s belong to no class folder and are ignored (e.g. %s)",
                    len(strays), root, Path(strays[0]).name)
    log.info("data.root %s: %d files in %d class folders", root, len(files), len(classes))

    scans = scan_files(files, cfg.data.min_side, cfg.data.max_pixels, cfg.data.num_workers)
    good = [s for s in scans if s.kind == "image"]
    bad = [s for s in scans if s.kind == "bad"]
    other = [s for s in scans if s.kind == "other"]
    if other:
        log.info("skipped %d non-image file(s) (e.g. %s)", len(other), other[0].path)
        for s in other:
            log.debug("not an image: %s", s.path)

    write_bad_images(output("bad_images.csv"), bad, listing.skipped)
    report_skipped_folders(listing, cfg.data.bad_images, stage_dir / "bad_images.csv")
    n_bad = len(bad)
    if bad:
        reasons = Counter(s.reason.split(":")[0] for s in bad)
        log.warning("%d bad image(s) (%s): listed in %s", n_bad,
                    ", ".join(f"{k}: {v}" for k, v in reasons.most_common()), stage_dir / "bad_images.csv")
        if cfg.data.bad_images == "fail":
            raise UserError(f"bad image {bad[0].path}: {bad[0].reason} (data.bad_images=fail; all {n_bad} "
                            f"listed in {stage_dir / 'bad_images.csv'})")

    fractions = (cfg.split.train, cfg.split.val, cfg.split.test)
    res = make_split(good, classes, fractions, cfg.split.min_images, cfg.run.seed,
                     bad_per_class=Counter(s.label for s in bad), notes=listing.class_notes())
    if not res.rows:
        raise UserError(f"data.root: no class in {root} has at least split.min_images={cfg.split.min_images} "
                        f"usable images ({len(good)} usable, {len(bad)} bad, {len(other)} non-images)")
    dropped = res.dropped()
    if dropped:
        log.warning("dropped %d class(es) with fewer than split.min_images=%d usable images: %s", len(dropped),
                    cfg.split.min_images, ", ".join(f"{c.name} ({c.total})" for c in dropped))
    check_enough_classes(res, root, cfg.split.min_images)

    # Duplicates: counted, listed, and warned about when one content sits in two classes.
    split_of = {r.path: r.split for r in res.rows}
    dup_rows = sorted(([g, s.sha256, s.label, s.path, split_of.get(s.path, ""), int(s.sha256 in res.cross_class)]
                       for s in good if (g := res.dup_groups.get(s.sha256))), key=lambda r: (r[0], sort_key(r[3])))
    write_csv(output("duplicates.csv"), ("dup_group", "sha256", "label", "path", "split", "cross_class"), dup_rows)
    extra_copies = len(dup_rows) - len(res.dup_groups)
    if res.dup_groups:
        log.info("%d group(s) of exact duplicates (%d extra copies): each group stays in one split per class; "
                 "listed in duplicates.csv", len(res.dup_groups), extra_copies)
    if res.cross_class:
        example = next(r for r in dup_rows if r[5])
        log.warning("%d duplicate group(s) span two or more classes (kept; e.g. group %d: %s): see duplicates.csv",
                    len(res.cross_class), example[0],
                    ", ".join(f"{r[2]}/{Path(r[3]).name}" for r in dup_rows if r[0] == example[0]))

    write_splits_csv(output("splits.csv"), res.rows)
    write_csv(output("class_counts.csv"), ("class", "total", "train", "val", "test", "status", "bad", "reason"),
              ([c.name, c.total, c.train, c.val, c.test, c.status, c.bad, c.reason] for c in res.counts))
    plot_class_distribution(res.counts, output("class_distribution.png"))
    n = materialize(res.rows, root, stage_dir, cfg.split.materialize)
    if n:
        log.info("materialised %d files (%s) into %s/{train,val,test}", n, cfg.split.materialize, stage_dir)

    per_split = Counter(r.split for r in res.rows)
    kept = [c for c in res.counts if c.status == "kept"]
    log.info("split: %d images in %d classes -> %d train, %d val, %d test", len(res.rows), len(kept),
             per_split["train"], per_split["val"], per_split["test"])
    return {
        "images": len(res.rows),
        "classes": len(kept),
        "train": per_split["train"],
        "val": per_split["val"],
        "test": per_split["test"],
        "dropped_classes": len(dropped),
        "dropped": [c.name for c in dropped],
        "bad_images": len(bad),
        "non_images": len(other),
        "folders_not_listed": len(listing.skipped),
        "duplicate_groups": len(res.dup_groups),
        "duplicate_extra_copies": extra_copies,
        "cross_class_duplicate_groups": len(res.cross_class),
    }

