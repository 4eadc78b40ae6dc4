"""Finding images: the one folder walker (class folders, image suffixes, symbolic links, stable order)."""
from __future__ import annotations

import logging
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import UserError

log = logging.getLogger(__name__)


# File suffixes that announce an image. A file with one of these that Pillow cannot decode is a
# *bad image*; a file with another suffix is recognised by its content, and when Pillow does
# not recognise it either it is a non-image and skipped silently (a README next to the images).
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".tif", ".tiff", ".gif", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".j2k", ".jpx", ".tga", ".mpo",
})


def is_hidden(name: str) -> bool:
    """Dot-files and dot-folders are ignored everywhere (``.DS_Store``, ``.ipynb_checkpoints``)."""
    return name.startswith(".")


def sort_key(path: str) -> str:
    """Sort key independent of the file system's Unicode normalisation (macOS NFD vs Linux NFC)."""
    return unicodedata.normalize("NFC", path)


# ----------------------------------------------------------------------------- listing


LINK_NOT_FOLLOWED = "directory symlink not followed (data.follow_symlinks is false)"


@dataclass
class Skipped:
    """A folder that listing did not enter: unreadable, or a directory symlink not followed."""

    path: str
    label: str  # the class folder it was found in ("" outside a class listing)
    reason: str
    kind: str  # "unreadable" | "symlink"


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies below it (both real, absolute paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(folder: str, label: str, follow: bool, seen: dict[str, str], skipped: list[Skipped],
          link_check: Callable[[str, str], str | None], via_link: bool) -> Iterator[str]:
    """Depth-first walk behind ``walk_files``: a folder's files (sorted), then its sub-folders."""
    real = os.path.realpath(folder)
    if via_link and real in seen:  # two links to one folder, or a loop below a followed link
        what = "directory symlink not followed" if os.path.islink(folder) else "folder not listed again"
        skipped.append(Skipped(folder, label, f"{what}: {real} is already listed (as {seen[real]})", "symlink"))
        return
    seen.setdefault(real, folder)
    try:
        names = os.listdir(folder)
    except OSError as e:
        skipped.append(Skipped(folder, label, f"folder unreadable: {e.strerror or e.__class__.__name__}",
                               "unreadable"))
        return
    subdirs = []
    for name in sorted((n for n in names if not is_hidden(n)), key=sort_key):
        p = os.path.join(folder, name)
        if os.path.isdir(p):
            subdirs.append(p)
        else:
            yield p  # files, file symlinks (followed when read) and broken links (bad when read)
    for p in subdirs:
        if os.path.islink(p):
            if not follow:
                skipped.append(Skipped(p, label, LINK_NOT_FOLLOWED, "symlink"))
                continue
            why = link_check(p, os.path.realpath(p))
            if why is not None:
                skipped.append(Skipped(p, label, why, "symlink"))
                continue
            yield from _walk(p, label, follow, seen, skipped, link_check, True)
        else:
            yield from _walk(p, label, follow, seen, skipped, link_check, via_link)


def walk_files(folder: str | Path, follow_symlinks: bool = True, skipped: list[Skipped] | None = None, *,
               label: str = "", seen: dict[str, str] | None = None,
               link_check: Callable[[str, str], str | None] | None = None) -> Iterator[Path]:
    """Every non-hidden file under ``folder``, recursively: a folder's files (sorted), then its
    sub-folders (sorted). The order never depends on the file system's listing order.

    Symbolic links to folders below ``folder`` are followed when ``follow_symlinks`` (each real
    folder at most once, so a loop ends), else skipped. A followed link whose target contains
    ``folder`` (a loop) is not entered. Links not followed and folders that cannot be listed are
    appended to ``skipped`` (``Skipped``, tagged ``label``); with ``skipped=None`` they are logged as
    warnings instead. ``seen`` (real folder -> path listed as) may be shared between calls;
    ``link_check(link, real_target)`` returns a reason to skip a link, or None to follow it.
    """
    top = str(folder)
    real_top = os.path.realpath(top)

    def default_check(link: str, target: str) -> str | None:
        if _inside(real_top, target):
            return f"directory symlink to {target} not followed: it contains {top} (a loop)"
        return None

    out = [] if skipped is None else skipped
    yield from (Path(p) for p in _walk(top, label, follow_symlinks, {} if seen is None else seen, out,
                                        link_check or default_check, False))
    if skipped is None:
        for s in out:
            log.warning("%s: %s", s.path, s.reason)


@dataclass
class Listing:
    """An image folder with one sub-folder per class, as ``list_image_folder`` found it."""

    root: str  # data.root, resolved
    files: list[tuple[str, str]]  # (absolute path, class), sorted by (class, path)
    strays: list[str]  # files directly in root: no class, reported and ignored
    classes: list[str]  # every (non-hidden) class folder, readable or not, sorted
    skipped: list[Skipped]  # folders not listed, with the reason

    def unreadable(self) -> list[Skipped]:
        """The folders (class folders or below) that could not be listed."""
        return [s for s in self.skipped if s.kind == "unreadable"]

    def class_notes(self) -> dict[str, str]:
        """A note per class with folders not listed, for ``class_counts.csv``."""
        notes: dict[str, str] = {}
        for c in self.classes:
            own = [s for s in self.skipped if s.label == c]
            if not own:
                continue
            top = os.path.join(self.root, c)
            whole = next((s for s in own if s.kind == "unreadable" and s.path == top), None)
            if whole is not None:
                notes[c] = whole.reason
                continue
            n_unread = sum(s.kind == "unreadable" for s in own)
            n_links = sum(s.kind == "symlink" for s in own)
            parts = ([f"{n_unread} sub-folder(s) unreadable"] if n_unread else []) + \
                    ([f"{n_links} directory symlink(s) not followed"] if n_links else [])
            notes[c] = ", ".join(parts) + " (see bad_images.csv)"
        return notes


def check_class_links(root: str | Path, classes: Sequence[str], key: str = "data.root") -> None:
    """``UserError`` naming the link when a class folder of ``root`` is a symbolic link to ``root``
    itself or a folder above it (the class would hold every image), or to another class folder, a
    folder inside one or a folder holding one (images listed under two classes), whatever
    ``data.follow_symlinks`` says. A class folder linked to a folder elsewhere stays fine.
    """
    root_p = Path(root)
    real_root = os.path.realpath(root_p)
    real = {c: os.path.realpath(root_p / c) for c in classes}
    for c in classes:
        link = root_p / c
        if not os.path.islink(link):
            continue
        if _inside(real_root, real[c]):
            raise UserError(f"{key}: class folder {link} is a symbolic link to {real[c]}, which is the {key} folder or one "
                            "above it (the class would hold every image): remove the link")
    links = [c for c in classes if os.path.islink(root_p / c)]  # few: the check costs links x classes
    for c in links:
        for d in classes:
            if d == c or not (_inside(real[c], real[d]) or _inside(real[d], real[c])):
                continue
            if d in links and real[c] == real[d] and sort_key(d) > sort_key(c):
                c, d = d, c  # two links to one folder: name the later one
            raise UserError(f"{key}: class folder {root_p / c} is a symbolic link to {real[c]}, which is, holds or lies "
                            f"inside class folder {d!r} (its images would count in two classes): remove the link")


def list_image_folder(root: str | Path, follow_symlinks: bool = False) -> Listing:
    """List an image folder with one sub-folder per class (``data.root``).

    Every non-hidden file anywhere under a class folder is listed (whether it is an image is
    decided later, by content). A class folder may itself be a symbolic link, to a folder outside
    ``data.root`` and the other class folders (``check_class_links`` refuses the others). Directory symlinks
    *inside* class folders are followed only with ``follow_symlinks`` (``data.follow_symlinks``);
    otherwise they are skipped and listed in ``Listing.skipped``. When followed, each real folder
    is listed once, under the class whose folder holds the link, except that a link into a
    class folder (or to ``data.root``) is not entered: those files are listed under the class
    they really belong to; a link to a folder containing ``data.root`` or a class folder is a
    loop and is not entered either (both in ``skipped`` with the reason). Folders that cannot be
    read are in ``skipped`` too. Raises ``UserError`` when ``root`` is not a readable folder.
    """
    root_p = Path(root).expanduser()
    if not root_p.is_dir():
        raise UserError(f"data.root: {root_p} is not a folder (expected one sub-folder per class)")
    root_p = root_p.resolve()
    try:
        entries = sorted((e for e in os.listdir(root_p) if not is_hidden(e)), key=sort_key)
    except OSError as e:
        raise UserError(f"data.root: cannot list {root_p} ({e.strerror or e.__class__.__name__})") from None
    classes = [e for e in entries if (root_p / e).is_dir()]
    strays = [str(root_p / e) for e in entries if e not in classes and (root_p / e).is_file()]
    check_class_links(root_p, classes)
    real_root = str(root_p)
    class_real = {c: os.path.realpath(root_p / c) for c in classes}

    def link_check(link: str, target: str) -> str | None:
        if target == real_root:
            return (f"directory symlink to {target} not followed: it leads back to data.root "
                    "(its images are listed under their own classes)")
        owner = next((c for c in classes if _inside(target, class_real[c])), None)
        if owner is not None:
            return (f"directory symlink to {target} not followed: it points into class folder "
                    f"{owner!r} (listed as that class)")
        if _inside(real_root, target) or any(_inside(r, target) for r in class_real.values()):
            return f"directory symlink to {target} not followed: it contains data.root or a class folder (a loop)"
        return None

    files: list[tuple[str, str]] = []
    skipped: list[Skipped] = []
    seen: dict[str, str] = {}
    for c in classes:
        files.extend((str(f), c) for f in walk_files(root_p / c, follow_symlinks, skipped, label=c, seen=seen,
                                                     link_check=link_check))
    files.sort(key=lambda t: (sort_key(t[1]), sort_key(t[0])))
    skipped.sort(key=lambda s: (sort_key(s.label), sort_key(s.path)))
    return Listing(real_root, files, strays, classes, skipped)


def is_image_name(path: str | os.PathLike) -> bool:
    """Whether a file's suffix is an image's (``IMAGE_SUFFIXES``): how every input list but stage
    01's tells images from other files (stage 01 decides by content)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: str | Path, what: str = "inference.input") -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under ``folder`` (recursively, sorted, hidden files and folders skipped): the
    one image lister of a folder without classes (``what`` names the key in its refusal). Returns
    (image paths, [(path, reason)] for the other files, which callers report rather than drop)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{what}: {root} is not a folder")
    images, others = [], []
    for p in walk_files(root.resolve()):
        (images if is_image_name(p) else others).append(str(p))
    return images, [(p, "not an image file (suffix)") for p in others]


def class_folders(root: str | Path) -> list[str]:
    """Names of the (non-hidden) class folders of ``root``, sorted."""
    root_p = Path(root)
    return sorted((e for e in os.listdir(root_p) if not is_hidden(e) and (root_p / e).is_dir()), key=sort_key)
