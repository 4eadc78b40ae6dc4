"""Stage 01's split rule: every class into train / val / test, duplicates kept together, seeded per
class.

Scanning. Every file under a class folder is read once, hashed (sha256 of its bytes) and, when
Pillow recognises it *by content*, fully decoded, in ``data.num_workers`` processes. Hidden files
and folders are ignored. A file Pillow does not recognise is a *non-image* when its suffix does
not announce an image (a README next to the images: skipped, counted in the log) and a *bad
image* when it does (``x.jpg`` holding text). Bad images also include empty, truncated or
otherwise undecodable files, images with a side under ``data.min_side`` and images whose
*declared* size exceeds ``data.max_pixels`` (decompression bombs: checked from the header, before
anything is decoded). They are listed in ``bad_images.csv`` (path,label,reason) and left out
(``data.bad_images=skip``) or stop the stage (``fail``). Folders the listing did not enter
(unreadable folders, directory symlinks not followed: ``common.data.list_image_folder``) are
listed there too, after the images, and noted in the class's ``reason`` in class_counts.csv.

Splitting rule, per class, on its ``n`` usable images (deterministic, see ``split_counts``):

1. ``n < split.min_images``: the class is dropped (``status=dropped`` in class_counts.csv, with
   the reason). At least two classes must remain (``check_enough_classes``): retrieval needs them.
2. Largest remainder: each split gets ``floor(n * fraction)``; the images left over go one each
   to the splits with the largest fractional parts (ties: train, val, test).
3. Train gets at least one image (taken from the largest other split).
4. Then val, then test, gets at least one image *if possible*: taken from the split that has the
   most images among those with two or more (ties: train, val, test); a split whose fraction
   is 0 is never filled. So 1 image -> 1/0/0, 2 -> 1/1/0, 3 -> 1/1/1, 10 -> 7/2/1 (at 70/15/15).

Exact duplicates (same sha256) inside a class are one unit that goes to one split, so nothing
leaks from train into val or test. Units are shuffled with a generator seeded from
``run.seed`` and a stable hash of the class name (never the global RNG, never the listing
order), then placed largest first into the split furthest below its target (relative to the
target), which meets the targets exactly when there are no duplicates. The same content under
two class folders is reported (a warning and ``duplicates.csv``, ``cross_class=1``) and kept;
the later class (in sorted order) puts it in the same split as the earlier one when that split
still has room, so the copies do not straddle train and test.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import UserError
from .listing import sort_key
from .splits import SPLITS, SplitRow

if TYPE_CHECKING:
    from .scan import Scan

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- split rule


def split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Images per split (train, val, test) for a class of ``n`` usable images (module docstring rule)."""
    if n <= 0:
        return (0, 0, 0)
    raw = [n * f for f in fractions]
    counts = [int(np.floor(r + 1e-9)) for r in raw]
    # Largest remainder; ties broken in split order (train, val, test).
    order = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1

    def take_one_for(k: int) -> bool:
        donors = [i for i in range(3) if i != k and counts[i] >= 2]
        if not donors:
            return False
        d = max(donors, key=lambda i: (counts[i], -i))
        counts[d] -= 1
        counts[k] += 1
        return True

    if counts[0] == 0:  # train gets at least one (n >= 1): from the largest other split
        d = max((1, 2), key=lambda i: (counts[i], -i))
        counts[d] -= 1
        counts[0] += 1
    for k in (1, 2):
        if counts[k] == 0 and fractions[k] > 0:
            take_one_for(k)
    return (counts[0], counts[1], counts[2])


def class_rng(seed: int, label: str) -> np.random.Generator:
    """A generator for one class: seed + a stable hash of the class name (not Python's ``hash``)."""
    h = int.from_bytes(hashlib.sha256(sort_key(label).encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed) % (2**63), h])


def assign_units(sizes: Sequence[int], targets: Sequence[int], rng: np.random.Generator,
                 pinned: dict[int, int] | None = None) -> list[int]:
    """Split index (0 train, 1 val, 2 test) for each unit (a group of identical images).

    Pinned units (unit -> split) go first to their split while it is below target. The others
    are shuffled, then placed largest first into the split with the largest remaining deficit
    relative to its target (ties: train, val, test); a split with target 0 gets nothing unless
    pinned. With units of one image each the targets are met exactly. Train always ends with
    at least one unit.
    """
    pinned = dict(pinned or {})
    n_units = len(sizes)
    out = [-1] * n_units
    have = [0, 0, 0]
    for u in sorted(pinned):
        s = pinned[u]
        if have[s] < targets[s]:
            out[u] = s
            have[s] += sizes[u]
    free = [u for u in rng.permutation(n_units).tolist() if out[u] < 0]
    free.sort(key=lambda u: -sizes[u])  # stable: equal sizes keep their random order
    open_splits = [i for i in range(3) if targets[i] > 0]
    for u in free:
        s = max(open_splits, key=lambda i: ((targets[i] - have[i]) / targets[i], -i))
        out[u] = s
        have[s] += sizes[u]
    if n_units and have[0] == 0:  # only pinned units can cause this: move the smallest to train
        donor = max((1, 2), key=lambda i: have[i])
        u = min((u for u in range(n_units) if out[u] == donor), key=lambda u: (sizes[u], u))
        out[u] = 0
    return out


# ----------------------------------------------------------------------------- split


@dataclass
class ClassCount:
    """One row of ``class_counts.csv``."""

    name: str
    total: int
    train: int = 0
    val: int = 0
    test: int = 0
    status: str = "kept"  # kept | dropped (fewer than split.min_images usable images)
    bad: int = 0  # bad images of this class (in bad_images.csv)
    reason: str = ""  # why dropped, and folders of the class that were not listed (unreadable, links)


@dataclass
class SplitResult:
    rows: list[SplitRow]  # kept images, sorted by (label, path); extras["dup_group"]
    counts: list[ClassCount]  # every class folder, sorted by name
    dup_groups: dict[str, int]  # sha256 -> group number, for contents found more than once
    cross_class: set[str]  # sha256 of contents found in more than one class

    def dropped(self) -> list[ClassCount]:
        return [c for c in self.counts if c.status != "kept"]


def make_split(images: Sequence[Scan], classes: Sequence[str], fractions: Sequence[float], min_images: int,
               seed: int, bad_per_class: dict[str, int] | None = None,
               notes: dict[str, str] | None = None) -> SplitResult:
    """Split usable images (``Scan.kind == "image"``) class by class; see the module docstring.

    ``classes`` lists every class folder (a class may have no usable image at all). ``notes``
    (class -> text, e.g. ``Listing.class_notes()``: unreadable folders) go to the ``reason`` of
    the class's row. The result does not depend on the order of ``images``.
    """
    bad_per_class = bad_per_class or {}
    notes = notes or {}
    by_class: dict[str, list[Scan]] = defaultdict(list)
    for s in images:
        by_class[s.label].append(s)
    for lst in by_class.values():
        lst.sort(key=lambda s: sort_key(s.path))
    all_classes = sorted(set(classes) | set(by_class), key=sort_key)

    dup_groups, cross = _duplicate_groups(by_class, all_classes, min_images)
    rows: list[SplitRow] = []
    counts: list[ClassCount] = []
    placed: dict[str, int] = {}  # sha256 -> split index, for cross-class pinning
    for c in all_classes:
        imgs = by_class.get(c, [])
        n = len(imgs)
        if n < min_images:
            why = "; ".join([f"{n} usable image(s), fewer than split.min_images={min_images}"]
                            + ([notes[c]] if notes.get(c) else []))
            counts.append(ClassCount(c, n, status="dropped", bad=bad_per_class.get(c, 0), reason=why))
            continue
        class_rows, count = _split_class(c, imgs, fractions, seed, placed, dup_groups, bad_per_class.get(c, 0),
                                         notes.get(c, ""))
        rows += class_rows
        counts.append(count)
    rows.sort(key=lambda r: (sort_key(r.label), sort_key(r.path)))
    return SplitResult(rows, counts, dup_groups, cross)


def _duplicate_groups(by_class: dict[str, list[Scan]], classes: Sequence[str],
                      min_images: int) -> tuple[dict[str, int], set[str]]:
    """Duplicate groups among the images kept (classes with enough images), numbered in (label,
    path) order of their first member (sha256 -> group), and the contents found in more than one class."""
    ordered = [s for c in classes if len(by_class.get(c, [])) >= min_images for s in by_class[c]]
    members: dict[str, list[Scan]] = defaultdict(list)
    for s in ordered:
        members[s.sha256].append(s)
    dup_groups: dict[str, int] = {}
    for s in ordered:
        if len(members[s.sha256]) > 1 and s.sha256 not in dup_groups:
            dup_groups[s.sha256] = len(dup_groups) + 1
    cross = {h for h in dup_groups if len({m.label for m in members[h]}) > 1}
    return dup_groups, cross


def _split_class(c: str, imgs: list[Scan], fractions: Sequence[float], seed: int, placed: dict[str, int],
                 dup_groups: dict[str, int], bad: int, note: str) -> tuple[list[SplitRow], ClassCount]:
    """One kept class's rows and count: identical images form one unit (placed together), a
    content already placed in another class is pinned to that split (``placed`` grows)."""
    n = len(imgs)
    targets = split_counts(n, fractions)
    unit_of: dict[str, int] = {}
    units: list[list[Scan]] = []
    for s in imgs:
        if s.sha256 not in unit_of:
            unit_of[s.sha256] = len(units)
            units.append([])
        units[unit_of[s.sha256]].append(s)
    pinned = {unit_of[h]: placed[h] for h in unit_of if h in placed}
    where = assign_units([len(u) for u in units], targets, class_rng(seed, c), pinned)
    rows: list[SplitRow] = []
    got = [0, 0, 0]
    for u, s_idx in zip(units, where):
        got[s_idx] += len(u)
        for s in u:
            placed.setdefault(s.sha256, s_idx)
            rows.append(SplitRow(s.path, c, SPLITS[s_idx], s.sha256, s.width, s.height, s.mode,
                                 {"dup_group": str(dup_groups.get(s.sha256, ""))}))
    if any(got[i] == 0 and fractions[i] > 0 for i in range(3)):
        log.info("class %s: only %d usable image(s) -> %d train, %d val, %d test", c, n, *got)
    elif tuple(got) != targets:
        log.debug("class %s: duplicates moved the split from %s to %s", c, targets, tuple(got))
    return rows, ClassCount(c, n, got[0], got[1], got[2], "kept", bad, note)


def check_enough_classes(res: SplitResult, root: str | Path, min_images: int) -> None:
    """Retrieval tells classes apart, so at least two classes must be kept: ``UserError`` naming
    ``data.root`` and how many class folders were found and kept otherwise."""
    kept = [c.name for c in res.counts if c.status == "kept"]
    if len(kept) >= 2:
        return
    dropped = len(res.counts) - len(kept)
    raise UserError(f"data.root: {root} needs at least two classes for retrieval: found {len(res.counts)} class "
                    f"folder(s), {len(kept)} kept{f' ({kept[0]})' if kept else ''} after dropping {dropped} with "
                    f"fewer than split.min_images={min_images} usable images")


def materialize(rows: Sequence[SplitRow], root: Path, dest: Path, how: str) -> int:
    """Write ``dest/{train,val,test}/<class>/...`` as symlinks, hard links or copies of the images.

    Each split folder is built under a temporary name and renamed when complete. Returns the
    number of files written.
    """
    if how == "none":  # folders from an earlier run would no longer match splits.csv
        for split in SPLITS:
            if (dest / split).is_dir() and not (dest / split).is_symlink():
                shutil.rmtree(dest / split)
        return 0
    root = Path(root).resolve()
    n = 0
    for split in SPLITS:
        final = dest / split
        tmp = dest / f".{split}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        for r in rows:
            if r.split != split:
                continue
            rel = Path(os.path.relpath(r.path, root / r.label))
            target = tmp / r.label / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                if how == "symlink":
                    os.symlink(r.path, target)
                elif how == "hardlink":
                    os.link(r.path, target)
                else:
                    shutil.copy2(r.path, target)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise UserError(f"split.materialize={how}: cannot write {target} ({e.strerror}); "
                                "try split.materialize=copy or symlink") from None
            n += 1
        tmp.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    return n
