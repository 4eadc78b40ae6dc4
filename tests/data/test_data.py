"""common/data.py: listing, splits.csv / stats.json readers, image loading, transforms, dataset."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.datasets import ImageListDataset, loader_error_line
from common.data.images import exif_orientation, load_rgb, oriented_size, upright
from common.data.labels import class_index
from common.data.listing import class_folders, list_image_folder, walk_files
from common.data.splits import SPLITS_COLUMNS, SplitRow, class_names, read_splits, rows_of
from common.data.stats import read_stats
from common.data.transforms import PadToSquare, eval_transform, square_uint8_transform
from common.errors import ImageReadError, UserError


def _save(path, array, mode=None, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array), mode=mode).save(path, format=fmt)
    return path


def _tree(root):
    rng = np.random.default_rng(0)
    for cls in ("b_class", "a_class"):
        for name in ("z.png", "a.png", "m.png"):
            _save(root / cls / name, rng.integers(0, 255, (8, 8), dtype=np.uint8))
    _save(root / "a_class" / "sub" / "deep.png", np.zeros((8, 8), np.uint8))
    _save(root / "a_class" / ".hidden.png", np.zeros((8, 8), np.uint8))
    _save(root / "a_class" / ".cache" / "x.png", np.zeros((8, 8), np.uint8))
    _save(root / ".trash" / "y.png", np.zeros((8, 8), np.uint8))
    (root / "README.txt").write_text("strays")
    (root / "empty_class").mkdir()


def test_listing_sorted_hidden_ignored_strays_reported(tmp_path):
    _tree(tmp_path)
    listing = list_image_folder(tmp_path)
    files, strays = listing.files, listing.strays
    rel = [(os.path.relpath(p, tmp_path), lbl) for p, lbl in files]
    assert rel == [("a_class/a.png", "a_class"), ("a_class/m.png", "a_class"), ("a_class/sub/deep.png", "a_class"),
                   ("a_class/z.png", "a_class"), ("b_class/a.png", "b_class"), ("b_class/m.png", "b_class"),
                   ("b_class/z.png", "b_class")]
    assert all(os.path.isabs(p) for p, _ in files)
    assert [os.path.basename(s) for s in strays] == ["README.txt"]
    assert class_folders(tmp_path) == ["a_class", "b_class", "empty_class"]


def test_listing_does_not_depend_on_file_system_order(tmp_path, monkeypatch):
    _tree(tmp_path)
    expected = list_image_folder(tmp_path)
    real_walk, real_listdir = os.walk, os.listdir
    rnd = random.Random(3)

    def shuffled_walk(*a, **k):
        for root, dirs, files in real_walk(*a, **k):
            rnd.shuffle(dirs)
            rnd.shuffle(files)
            yield root, dirs, files

    def shuffled_listdir(*a, **k):
        out = real_listdir(*a, **k)
        rnd.shuffle(out)
        return out

    monkeypatch.setattr(os, "walk", shuffled_walk)
    monkeypatch.setattr(os, "listdir", shuffled_listdir)
    for _ in range(3):
        assert list_image_folder(tmp_path) == expected


def test_missing_root_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data.root"):
        list_image_folder(tmp_path / "nope")


def _write_splits(path, rows, header=SPLITS_COLUMNS + ("dup_group",)):
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def test_read_splits_round_trip_and_helpers(tmp_path):
    p = tmp_path / "splits.csv"
    _write_splits(p, [["/x/b/1.png", "b", "train", "h1", 10, 20, "L", ""],
                      ["/x/a/1.png", "a", "val", "h2", 30, 40, "RGB", "3"],
                      ["/x/a/2.png", "a", "train", "h3", 5, 6, "RGB", ""]])
    rows = read_splits(p)
    assert rows[1] == SplitRow("/x/a/1.png", "a", "val", "h2", 30, 40, "RGB", {"dup_group": "3"})
    assert class_names(rows) == ["a", "b"]
    assert [r.path for r in rows_of(rows, "train")] == ["/x/b/1.png", "/x/a/2.png"]
    assert class_index([r.label for r in rows], class_names(rows), str).tolist() == [1, 0, 0]
    with pytest.raises(UserError, match="^label 'b' is unknown$"):
        class_index([r.label for r in rows], ["a", "c"], lambda v: f"label {v!r} is unknown")


def test_read_splits_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"splits.csv is missing: run 01_random_split_dataset.py"):
        read_splits(tmp_path / "splits.csv")
    p = tmp_path / "bad.csv"
    _write_splits(p, [["/x/a.png", "a", "holdout", "h", 1, 1, "L", ""]])
    with pytest.raises(UserError, match=r"bad.csv, line 2: split must be"):
        read_splits(p)
    _write_splits(p, [["/x/a.png", "a"]], header=("path", "label"))
    with pytest.raises(UserError, match="missing column"):
        read_splits(p)


def test_read_stats(tmp_path):
    with pytest.raises(UserError, match=r"stats.json is missing: run 02_mean_std_variables.py"):
        read_stats(tmp_path / "stats.json")
    p = tmp_path / "stats.json"
    p.write_text(json.dumps({"mean": [0.1, 0.2], "std": [1, 1, 1]}))
    with pytest.raises(UserError, match="'mean' must be a list of three numbers"):
        read_stats(p)
    p.write_text(json.dumps({"mean": [0.1, 0.2, 0.3], "std": [0.1, 0.0, 0.1]}))
    with pytest.raises(UserError, match="std must be > 0"):
        read_stats(p)
    p.write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        read_stats(p)
    p.write_text(json.dumps({"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "pixels": 9}))
    assert read_stats(p)["std"] == [0.4, 0.5, 0.6]


def test_load_rgb_modes(tmp_path):
    grey = _save(tmp_path / "g.png", np.full((3, 5), 200, np.uint8))
    im = load_rgb(grey)
    assert im.mode == "RGB" and im.size == (5, 3) and np.asarray(im)[0, 0].tolist() == [200, 200, 200]
    # 16-bit grey: scaled from the 16-bit range
    p16 = tmp_path / "g16.png"
    Image.fromarray(np.full((4, 4), 257 * 100, np.uint16)).save(p16)
    assert np.asarray(load_rgb(p16))[0, 0].tolist() == [100, 100, 100]
    rgba = _save(tmp_path / "a.png", np.dstack([np.full((4, 4, 3), 50, np.uint8), np.zeros((4, 4), np.uint8)]), "RGBA")
    assert np.asarray(load_rgb(rgba))[0, 0].tolist() == [50, 50, 50]
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "p.gif")
    assert np.asarray(load_rgb(tmp_path / "p.gif"))[0, 0].tolist() == [10, 20, 30]


def test_exif_orientation_is_applied(tmp_path, exif_rotated_jpeg):
    p = exif_rotated_jpeg(tmp_path / "rot6.jpg")
    with Image.open(p) as raw:
        assert raw.size == (40, 24)  # stored sideways
        assert exif_orientation(raw) == 6 and oriented_size(raw) == (24, 40)
    im = load_rgb(p)
    assert im.mode == "RGB" and im.size == (24, 40)
    a = np.asarray(im).astype(int)
    assert a[:20].mean() < 30 and a[20:].mean() > 225  # the dark half is on top: turned clockwise
    plain = _save(tmp_path / "plain.jpg", np.zeros((24, 40), np.uint8), fmt="JPEG")
    assert load_rgb(plain).size == (40, 24)  # no tag: as stored
    with Image.open(plain) as raw:
        assert upright(raw) is raw and oriented_size(raw) == (40, 24)
    exif_rotated_jpeg(tmp_path / "rot3.jpg", orientation=3)  # 180 degrees: sides kept, content turned
    a3 = np.asarray(load_rgb(tmp_path / "rot3.jpg")).astype(int)
    assert a3.shape[:2] == (24, 40) and a3[:, :20].mean() > 225 and a3[:, 20:].mean() < 30


def test_load_rgb_errors_name_the_file(tmp_path):
    from common.data.demo import make_bad_files

    bad = make_bad_files(tmp_path)
    for kind in ("truncated", "text_as_jpg", "empty", "corrupt"):
        with pytest.raises(ImageReadError, match=str(bad[kind].name)):
            load_rgb(bad[kind])
    with pytest.raises(ImageReadError, match="not found"):
        load_rgb(tmp_path / "gone.png")


def test_pad_to_square_pil_and_tensor_agree(tmp_path):
    a = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3) + 1  # H=2, W=5: 3 rows of padding
    im = Image.fromarray(a, "RGB")
    out = PadToSquare(7)(im)
    o = np.asarray(out)
    assert out.size == (5, 5)
    assert (o[0] == 7).all() and (o[3:] == 7).all()  # 1 row on top, 2 at the bottom (extra goes last)
    np.testing.assert_array_equal(o[1:3], a)
    t = PadToSquare(7)(torch.from_numpy(a).permute(2, 0, 1))
    np.testing.assert_array_equal(t.permute(1, 2, 0).numpy(), o)
    tf = PadToSquare(255)(torch.zeros(1, 4, 2))
    assert tf.shape == (1, 4, 4) and tf[0, 0, 0] == 1.0 and tf[0, 0, 1] == 0.0
    # any mode; alpha padding is opaque; square images are returned unchanged
    la = PadToSquare(9)(Image.new("LA", (2, 4), (0, 0)))
    assert la.size == (4, 4) and la.getpixel((0, 0)) == (9, 255)
    for mode in ("1", "L", "I;16", "I", "F", "P", "CMYK", "RGBA"):
        assert PadToSquare(3)(Image.new(mode, (3, 6))).size == (6, 6)
    sq = Image.new("L", (4, 4))
    assert PadToSquare(1)(sq) is sq
    with pytest.raises(ValueError):
        PadToSquare(256)


def test_eval_transform_is_pad_resize_normalise():
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (10, 30, 3), dtype=np.uint8), "RGB")
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    x = eval_transform(16, mean, std, fill=40)(im)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    padded = Image.new("RGB", (30, 30), (40, 40, 40))
    padded.paste(im, (0, 10))
    ref = np.asarray(padded.resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    ref = (ref - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    u8 = square_uint8_transform(16, 40)(im)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 16, 16)


def test_image_list_dataset(tmp_path):
    paths = [_save(tmp_path / f"{i}.png", np.full((6 + i, 4, 3), 10 * i, np.uint8)) for i in range(3)]
    ds = ImageListDataset(paths, labels=[2, 0, 1], transform=eval_transform(8, [0, 0, 0], [1, 1, 1], 0))
    x, y, i = ds[1]
    assert x.shape == (3, 8, 8) and y == 0 and i == 1
    xb, yb, ib = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert xb.shape == (3, 3, 8, 8) and yb.tolist() == [2, 0, 1] and ib.tolist() == [0, 1, 2]
    raw = ImageListDataset(paths)
    x, y, _ = raw[2]
    assert y == -1 and x.shape == (3, 8, 4) and torch.allclose(x, torch.full_like(x, 20 / 255))
    with pytest.raises(ValueError):
        ImageListDataset(paths, labels=[1])


def test_loader_error_line_keeps_the_file_name():
    e = ImageReadError("Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                       "call last):\n  File \"x.py\", line 1\ncommon.errors.ImageReadError: /d/a.jpg: cannot decode")
    assert loader_error_line(e) == "/d/a.jpg: cannot decode"
    assert loader_error_line(ImageReadError("/d/b.jpg: bad")) == "/d/b.jpg: bad"


# ----------------------------------------------------------------------------- links and unreadable folders


def _png(path, value):
    return _save(path, np.full((8, 8), value, np.uint8))


def _linked_tree(tmp_path):
    """Classes a and b, an outside folder, and directory links of every kind inside class a."""
    root = tmp_path / "root"
    _png(root / "a" / "a1.png", 1)
    _png(root / "a" / "sub" / "a2.png", 2)
    _png(root / "b" / "b1.png", 3)
    _png(root / "b" / "deep" / "b2.png", 4)
    outside = tmp_path / "outside"
    _png(outside / "o1.png", 5)
    _png(outside / "sub" / "o2.png", 6)
    os.symlink("..", root / "a" / "loop")  # back to data.root: images of b would be labelled a
    os.symlink("../b/deep", root / "a" / "into_b")  # into another class
    os.symlink(outside, root / "a" / "ext")  # outside the data root
    os.symlink(outside, root / "b" / "ext_again")  # the same outside folder from a second class
    os.symlink("..", outside / "sub" / "up")  # a loop below a followed link
    os.symlink(tmp_path, root / "b" / "above")  # a folder that contains data.root
    os.symlink("../b/b1.png", root / "a" / "file_link.png")  # a file symlink: listed as before
    return root, outside


def test_directory_symlinks_are_not_followed_by_default(tmp_path):
    root, _ = _linked_tree(tmp_path)
    listing = list_image_folder(root)
    rel = [(os.path.relpath(p, root), lbl) for p, lbl in listing.files]
    assert rel == [("a/a1.png", "a"), ("a/file_link.png", "a"), ("a/sub/a2.png", "a"),
                   ("b/b1.png", "b"), ("b/deep/b2.png", "b")]
    assert listing.classes == ["a", "b"]
    assert [(os.path.relpath(s.path, root), s.label, s.kind) for s in listing.skipped] == [
        ("a/ext", "a", "symlink"), ("a/into_b", "a", "symlink"), ("a/loop", "a", "symlink"),
        ("b/above", "b", "symlink"), ("b/ext_again", "b", "symlink")]
    assert all(s.reason == "directory symlink not followed (data.follow_symlinks is false)" for s in listing.skipped)
    assert listing.class_notes() == {"a": "3 directory symlink(s) not followed (see bad_images.csv)",
                                     "b": "2 directory symlink(s) not followed (see bad_images.csv)"}


def test_followed_directory_symlinks_list_each_real_file_once_under_its_own_class(tmp_path):
    root, outside = _linked_tree(tmp_path)
    listing = list_image_folder(root, follow_symlinks=True)
    rel = [(os.path.relpath(p, root), lbl) for p, lbl in listing.files]
    assert rel == [("a/a1.png", "a"), ("a/ext/o1.png", "a"), ("a/ext/sub/o2.png", "a"), ("a/file_link.png", "a"),
                   ("a/sub/a2.png", "a"), ("b/b1.png", "b"), ("b/deep/b2.png", "b")]
    real = [os.path.realpath(p) for p, _ in listing.files if not p.endswith("file_link.png")]
    assert len(real) == len(set(real))  # each real file once
    why = {os.path.relpath(s.path, root): s.reason for s in listing.skipped}
    assert set(why) == {"a/loop", "a/into_b", "a/ext/sub/up", "b/above", "b/ext_again"}
    assert "leads back to data.root" in why["a/loop"]
    assert "points into class folder 'b'" in why["a/into_b"]
    assert "already listed" in why["a/ext/sub/up"] and "already listed" in why["b/ext_again"]
    assert "contains data.root" in why["b/above"]
    assert all(s.kind == "symlink" for s in listing.skipped)
    # the generic walk (stage 07's predict folders) follows links too, and ends on loops
    walked = [os.path.relpath(p, outside) for p in walk_files(outside)]
    assert walked == ["o1.png", "sub/o2.png"]


@pytest.mark.parametrize("follow", [False, True])
def test_class_folder_linked_to_the_root_or_another_class_is_refused_naming_the_link(tmp_path, follow):
    """Issue 17 #6: a class folder linked to data.root became a class holding every image; one
    linked to another class folder a duplicate class (only a warning), whatever follow_symlinks said."""
    root = tmp_path / "root"
    _png(root / "a" / "a1.png", 1)
    _png(root / "b" / "b1.png", 2)
    _png(root / "b" / "sub" / "b2.png", 3)
    outside = tmp_path / "outside"
    _png(outside / "o1.png", 4)
    os.symlink(outside, root / "c_elsewhere")  # a class kept on another disk: fine
    listing = list_image_folder(root, follow)
    assert listing.classes == ["a", "b", "c_elsewhere"] and len(listing.files) == 4
    for name, target, says in [("all", ".", "data.root folder or one above it"),
                               ("up", "..", "data.root folder or one above it"),
                               ("z_copy_of_b", "b", "inside class folder 'b'"),
                               ("b_sub", "b/sub", "inside class folder 'b'"),
                               ("x_also_elsewhere", str(outside), "class folder 'c_elsewhere'")]:
        link = root / name
        os.symlink(target, link)
        try:
            with pytest.raises(UserError) as e:
                list_image_folder(root, follow)
        finally:
            link.unlink()
        msg = str(e.value)
        assert msg.startswith(f"data.root: class folder {link} is a symbolic link to ") and says in msg, msg
        assert "\n" not in msg
    # two links to one outside folder: the later one is named
    os.symlink(outside, root / "d_again")
    with pytest.raises(UserError, match=f"class folder {root / 'd_again'} is a symbolic link"):
        list_image_folder(root, follow)


def _unreadable(monkeypatch, *folders):
    """Make ``folders`` unreadable as chmod 000 would for a non-root user (tests run as root)."""
    bad = {os.path.realpath(f) for f in folders}
    real_listdir, real_scandir = os.listdir, os.scandir

    def check(p):
        if p is not None and os.path.realpath(p) in bad:
            raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(os, "listdir", lambda p=".": (check(p), real_listdir(p))[1])
    monkeypatch.setattr(os, "scandir", lambda p=".": (check(p), real_scandir(p))[1])


def test_unreadable_folders_are_listed_with_the_reason(tmp_path, monkeypatch):
    root = tmp_path / "root"
    _png(root / "a" / "a1.png", 1)
    _png(root / "a" / "locked" / "a2.png", 2)
    _png(root / "c" / "c1.png", 3)
    _unreadable(monkeypatch, root / "a" / "locked", root / "c")
    listing = list_image_folder(root)
    assert [(os.path.relpath(p, root), lbl) for p, lbl in listing.files] == [("a/a1.png", "a")]
    assert listing.classes == ["a", "c"]
    assert [(os.path.relpath(s.path, root), s.label, s.reason, s.kind) for s in listing.skipped] == [
        ("a/locked", "a", "folder unreadable: Permission denied", "unreadable"),
        ("c", "c", "folder unreadable: Permission denied", "unreadable")]
    assert listing.class_notes() == {"a": "1 sub-folder(s) unreadable (see bad_images.csv)",
                                     "c": "folder unreadable: Permission denied"}
    _unreadable(monkeypatch, root)
    with pytest.raises(UserError, match=r"data.root: cannot list .*root \(Permission denied\)"):
        list_image_folder(root)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads chmod 000 folders")
def test_unreadable_folders_chmod(tmp_path):
    root = tmp_path / "root"
    _png(root / "a" / "a1.png", 1)
    _png(root / "a" / "locked" / "a2.png", 2)
    os.chmod(root / "a" / "locked", 0)
    try:
        listing = list_image_folder(root)
    finally:
        os.chmod(root / "a" / "locked", 0o755)
    assert [s.reason for s in listing.skipped] == ["folder unreadable: Permission denied"]
