"""common/split.py (stage 01): scanning, bad images, the split rule, determinism, duplicates, outputs."""
from __future__ import annotations

import csv
import logging
import os
import random
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config.load import load_config
from common.config.schema import Config
from common.data import splits as data_splits
from common.data.demo import make_bad_files, make_synthetic_plankton
from common.data.images import load_rgb
from common.data.scan import Scan, scan_file
from common.data.split import SplitResult, assign_units, make_split, split_counts
from common.errors import UserError


def run_split(cfg, output, stage_dir):
    """Stage 01's driver with the parts of the stage context it uses."""
    from types import SimpleNamespace

    from common.stages import split as S1

    return S1.main(SimpleNamespace(cfg=cfg, output=output, dir=stage_dir, checked={}))

def _cfg(root: Path, **over) -> Config:
    items = [f"data.root={root}", "data.num_workers=0", *[f"{k}={v}" for k, v in over.items()]]
    return load_config([], items)


def _out(folder: Path):
    def output(*parts: str) -> Path:
        p = folder.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
    return output


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("n,expected", [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (4, (2, 1, 1)),
                                        (9, (6, 2, 1)), (10, (7, 2, 1)), (100, (70, 15, 15)), (7760, (5432, 1164, 1164))])
def test_split_counts_default_fractions(n, expected):
    assert split_counts(n, (0.7, 0.15, 0.15)) == expected


def test_split_counts_properties():
    for fr in [(0.7, 0.15, 0.15), (0.8, 0.2, 0.0), (0.5, 0.25, 0.25), (1.0, 0.0, 0.0), (0.34, 0.33, 0.33)]:
        for n in range(1, 60):
            c = split_counts(n, fr)
            assert sum(c) == n and c[0] >= 1
            for i in (1, 2):
                if fr[i] == 0:
                    assert c[i] == 0
            if n >= 3 and all(f > 0 for f in fr):
                assert min(c) >= 1
            if n >= 20:  # close to the fractions once the minimums no longer matter
                assert all(abs(c[i] - n * fr[i]) <= 1.0 for i in range(3))
    assert split_counts(0, (0.7, 0.15, 0.15)) == (0, 0, 0)


def test_assign_units_meets_targets_and_keeps_units_whole():
    rng = np.random.default_rng(0)
    out = assign_units([1] * 20, (14, 3, 3), rng)
    assert Counter(out) == {0: 14, 1: 3, 2: 3}
    out = assign_units([8, 1, 1], (7, 2, 1), np.random.default_rng(0))
    assert out[0] == 0 and sorted(out[1:]) == [1, 2]  # the big group goes to train, test still gets one
    # a pinned unit goes first to its split, but train never ends empty
    assert assign_units([1, 1], (1, 1, 0), np.random.default_rng(0), pinned={1: 1}) == [0, 1]
    assert assign_units([2], (1, 1, 0), np.random.default_rng(0), pinned={0: 1}) == [0]


def _scans(spec: dict[str, int], dup: dict[str, list[int]] | None = None) -> list[Scan]:
    """Fake scans: ``spec`` class -> n images; ``dup`` class -> indices sharing one content."""
    out = []
    for c, n in spec.items():
        for i in range(n):
            h = f"{c}-{i}"
            if dup and i in dup.get(c, []):
                h = f"{c}-dup"
            out.append(Scan(f"/d/{c}/{i:04d}.png", c, "image", sha256=h, width=8, height=8, mode="L"))
    return out


def _assignment(res: SplitResult) -> dict[str, str]:
    return {r.path: r.split for r in res.rows}


def test_split_is_deterministic_order_free_and_stratified():
    spec = {"big": 200, "mid": 37, "small": 5, "pair": 2, "one": 1}
    scans = _scans(spec)
    fr = (0.7, 0.15, 0.15)
    a = make_split(scans, list(spec), fr, 2, seed=7)
    shuffled = scans[:]
    random.Random(1).shuffle(shuffled)
    b = make_split(shuffled, list(reversed(spec)), fr, 2, seed=7)
    assert _assignment(a) == _assignment(b)
    assert [r.path for r in a.rows] == sorted(r.path for r in a.rows)  # sorted by (label, path)
    c = make_split(scans, list(spec), fr, 2, seed=8)
    assert _assignment(a) != _assignment(c)  # the seed matters
    per = defaultdict(Counter)
    for r in a.rows:
        per[r.label][r.split] += 1
    for cls, n in spec.items():
        if n >= 2:
            assert tuple(per[cls][s] for s in data_splits.SPLITS) == split_counts(n, fr), cls
    assert per["pair"] == {"train": 1, "val": 1}
    counts = {c.name: c for c in a.counts}
    assert counts["one"].status == "dropped" and "one" not in per
    # one class's split does not change when another class is added (per-class generators)
    d = make_split(scans + _scans({"new": 30}), list(spec) + ["new"], fr, 2, seed=7)
    assert {p: s for p, s in _assignment(d).items() if "/new/" not in p} == _assignment(a)


def test_duplicates_stay_together_and_cross_class_copies_follow():
    scans = _scans({"a": 30, "b": 30}, dup={"a": [0, 5, 9, 13]})
    # the same content under class b as well
    scans.append(Scan("/d/b/zz.png", "b", "image", sha256="a-dup", width=8, height=8, mode="L"))
    for seed in range(5):
        res = make_split(scans, ["a", "b"], (0.7, 0.15, 0.15), 2, seed=seed)
        where = {r.path: r.split for r in res.rows}
        group = [r for r in res.rows if r.sha256 == "a-dup"]
        assert len(group) == 5 and len({where[r.path] for r in group}) == 1
        assert res.cross_class == {"a-dup"} and res.dup_groups == {"a-dup": 1}
        assert all(r.extras["dup_group"] == "1" for r in group)


# ----------------------------------------------------------------------------- on real files


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict[str, Path]]:
    root = tmp_path / "images"
    make_synthetic_plankton(root, classes=["copepod", "diatom", "rare"], per_class=[16, 9, 2], seed=3,
                            size_range=(12, 28))
    bad = make_bad_files(root, label="copepod")
    # an exact duplicate whose suffix announces nothing: recognised by content
    shutil.copy(next((root / "copepod").glob("0001.*")), root / "copepod" / "copy_of_0001.bin")
    (root / "singleton").mkdir()
    next_img = next((root / "diatom").glob("0000.*"))
    shutil.copy(next_img, root / "singleton" / "only.png")
    (root / "stray.txt").write_text("not in a class")
    return root, bad


def test_run_split_outputs(folder, tmp_path, caplog):
    root, bad = folder
    caplog.set_level(logging.INFO, logger="common.data")
    out = tmp_path / "stage"
    metrics = run_split(_cfg(root), _out(out), out)

    bad_rows = {Path(r["path"]).name: r for r in _csv(out / "bad_images.csv")}
    expected = {"empty.jpg": "empty", "truncated.jpg": "truncated", "text.jpg": "not an image",
                "corrupt.png": "cannot decode", "tiny.png": "too small", "bomb.png": "too many pixels"}
    assert set(bad_rows) == set(expected)
    for name, word in expected.items():
        assert word in bad_rows[name]["reason"] and bad_rows[name]["label"] == "copepod"
    assert "declared 10000000000 pixels" in bad_rows["bomb.png"]["reason"]

    rows = _csv(out / "splits.csv")
    assert list(rows[0]) == ["path", "label", "split", "sha256", "width", "height", "mode", "dup_group"]
    assert rows == sorted(rows, key=lambda r: (r["label"], r["path"]))
    names = {Path(r["path"]).name for r in rows}
    assert "scan_0001" in names  # recognised by content, no suffix
    assert "copy_of_0001.bin" in names
    assert not names & {".hidden.png", "inside.png", "notes.txt", "stray.txt", "only.png"}
    assert all(os.path.isabs(r["path"]) and Path(r["path"]).is_file() for r in rows)
    assert {r["mode"] for r in rows} >= {"L", "RGB"}
    assert len(rows) == 16 + 2 + 9 + 2  # synthetic + no-suffix + copy + rare

    dups = _csv(out / "duplicates.csv")
    assert len(dups) == 2 and len({d["split"] for d in dups}) == 1 and dups[0]["cross_class"] == "0"

    counts = {r["class"]: r for r in _csv(out / "class_counts.csv")}
    assert counts["singleton"]["status"] == "dropped" and counts["singleton"]["total"] == "1"
    assert (counts["rare"]["train"], counts["rare"]["val"], counts["rare"]["test"]) == ("1", "1", "0")
    assert counts["copepod"]["bad"] == "6"
    assert (out / "class_distribution.png").stat().st_size > 1000
    assert metrics["images"] == len(rows) and metrics["classes"] == 3 and metrics["dropped_classes"] == 1
    assert metrics["bad_images"] == 6 and metrics["non_images"] == 1 and metrics["duplicate_groups"] == 1
    assert "stray.txt" in caplog.text and "singleton" in caplog.text and "rare: only 2" in caplog.text


def test_splits_csv_identical_across_runs_listing_orders_and_workers(folder, tmp_path, monkeypatch):
    root, _ = folder
    run_split(_cfg(root), _out(tmp_path / "a"), tmp_path / "a")
    run_split(_cfg(root, **{"data.num_workers": 2}), _out(tmp_path / "b"), tmp_path / "b")
    real_walk, real_listdir = os.walk, os.listdir
    rnd = random.Random(5)

    def shuffled_walk(*a, **k):
        for r, dirs, files in real_walk(*a, **k):
            dirs.reverse()
            rnd.shuffle(files)
            yield r, dirs, files

    monkeypatch.setattr(os, "walk", shuffled_walk)
    monkeypatch.setattr(os, "listdir", lambda *a: sorted(real_listdir(*a), reverse=True))
    run_split(_cfg(root), _out(tmp_path / "c"), tmp_path / "c")
    first = (tmp_path / "a" / "splits.csv").read_bytes()
    assert (tmp_path / "b" / "splits.csv").read_bytes() == first
    assert (tmp_path / "c" / "splits.csv").read_bytes() == first
    run_split(_cfg(root, **{"run.seed": 1}), _out(tmp_path / "d"), tmp_path / "d")
    assert (tmp_path / "d" / "splits.csv").read_bytes() != first


def test_fail_mode_names_the_file(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "stage"
    with pytest.raises(UserError, match=r"bad image .*bomb.png: too many pixels.*data.bad_images=fail"):
        run_split(_cfg(root, **{"data.bad_images": "fail"}), _out(out), out)
    assert len(_csv(out / "bad_images.csv")) == 6  # the full list is still written
    assert not (out / "splits.csv").exists()


def test_size_limits_from_config(tmp_path):
    root = tmp_path / "img"
    (root / "c").mkdir(parents=True)
    Image.new("L", (40, 30), 9).save(root / "c" / "big.png")
    Image.new("L", (40, 5), 9).save(root / "c" / "thin.png")
    Image.new("L", (10, 10), 9).save(root / "c" / "ok.png")
    Image.new("L", (12, 10), 9).save(root / "c" / "ok2.png")
    (root / "d").mkdir()  # retrieval needs a second class
    Image.new("L", (10, 10), 7).save(root / "d" / "a.png")
    Image.new("L", (10, 12), 7).save(root / "d" / "b.png")
    out = tmp_path / "o"
    run_split(_cfg(root, **{"data.max_pixels": 1000, "data.min_side": 6}), _out(out), out)
    reasons = {Path(r["path"]).name: r["reason"] for r in _csv(out / "bad_images.csv")}
    assert set(reasons) == {"big.png", "thin.png"}
    assert "data.max_pixels=1000" in reasons["big.png"] and "data.min_side=6" in reasons["thin.png"]


def test_scan_records_the_upright_size_of_exif_rotated_images(tmp_path, exif_rotated_jpeg):
    p = exif_rotated_jpeg(tmp_path / "rot6.jpg")
    s = scan_file((str(p), "c"), min_side=4, max_pixels=10**6)
    assert s.kind == "image" and (s.width, s.height) == (24, 40)
    assert (s.width, s.height) == load_rgb(p).size  # stage 01 and the loaders agree
    thin = scan_file((str(p), "c"), min_side=30, max_pixels=10**6)
    assert thin.kind == "bad" and "24x40 px" in thin.reason


def test_no_usable_class_is_a_user_error(tmp_path):
    root = tmp_path / "img"
    (root / "c").mkdir(parents=True)
    Image.new("L", (10, 10)).save(root / "c" / "a.png")
    with pytest.raises(UserError, match="split.min_images=2"):
        run_split(_cfg(root), _out(tmp_path / "o"), tmp_path / "o")
    (root / "c" / "a.png").unlink()
    (root / "c").rmdir()
    with pytest.raises(UserError, match="no class sub-folders"):
        run_split(_cfg(root), _out(tmp_path / "o"), tmp_path / "o")


@pytest.mark.parametrize("how", ["symlink", "copy"])
def test_materialize(folder, tmp_path, how):
    root, _ = folder
    out = tmp_path / "stage"
    run_split(_cfg(root, **{"split.materialize": how}), _out(out), out)
    rows = _csv(out / "splits.csv")
    for split in data_splits.SPLITS:
        files = sorted(p for p in (out / split).rglob("*") if p.is_file())
        assert len(files) == sum(r["split"] == split for r in rows)
    p = out / rows[0]["split"] / rows[0]["label"] / Path(rows[0]["path"]).name
    assert p.read_bytes() == Path(rows[0]["path"]).read_bytes()
    assert p.is_symlink() == (how == "symlink")
    run_split(_cfg(root), _out(out), out)  # back to none: stale folders go
    assert not any((out / split).exists() for split in data_splits.SPLITS)


# ----------------------------------------------------------------------------- links, unreadable folders, classes


def _two_digits(tmp_path) -> Path:
    """digit_0 and digit_1, three distinct images each."""
    root = tmp_path / "data"
    for c, base in (("digit_0", 10), ("digit_1", 100)):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (10, 10), base + i).save(root / c / f"{i}.png")
    return root


def test_directory_symlink_is_not_followed_unless_configured(tmp_path, caplog):
    root = _two_digits(tmp_path)
    os.symlink("..", root / "digit_0" / "loop")  # ln -s .. data/digit_0/loop
    outside = tmp_path / "more"
    outside.mkdir()
    Image.new("L", (10, 10), 200).save(outside / "x.png")
    os.symlink(outside, root / "digit_0" / "more")
    caplog.set_level(logging.INFO, logger="common.data")
    out = tmp_path / "a"
    metrics = run_split(_cfg(root), _out(out), out)
    rows = _csv(out / "splits.csv")
    assert len(rows) == 6 and all(Path(r["path"]).parent.name == r["label"] for r in rows)  # nothing via links
    bad = {Path(r["path"]).name: r for r in _csv(out / "bad_images.csv")}
    assert set(bad) == {"loop", "more"} and {r["label"] for r in bad.values()} == {"digit_0"}
    assert all(r["reason"] == "directory symlink not followed (data.follow_symlinks is false)" for r in bad.values())
    counts = {r["class"]: r for r in _csv(out / "class_counts.csv")}
    assert counts["digit_0"]["reason"] == "2 directory symlink(s) not followed (see bad_images.csv)"
    assert counts["digit_0"]["bad"] == "0" and counts["digit_1"]["reason"] == ""
    assert metrics["folders_not_listed"] == 2 and metrics["bad_images"] == 0
    assert "2 directory symlink(s) not followed" in caplog.text

    out = tmp_path / "b"
    run_split(_cfg(root, **{"data.follow_symlinks": "true"}), _out(out), out)
    rows = _csv(out / "splits.csv")
    got = sorted((os.path.relpath(r["path"], root), r["label"]) for r in rows)
    assert got == [("digit_0/0.png", "digit_0"), ("digit_0/1.png", "digit_0"), ("digit_0/2.png", "digit_0"),
                   ("digit_0/more/x.png", "digit_0"), ("digit_1/0.png", "digit_1"), ("digit_1/1.png", "digit_1"),
                   ("digit_1/2.png", "digit_1")]  # each real file once, under its own class
    bad = {Path(r["path"]).name: r["reason"] for r in _csv(out / "bad_images.csv")}
    assert set(bad) == {"loop"} and "leads back to data.root" in bad["loop"]


def test_unreadable_folders_go_to_bad_images_and_class_counts(tmp_path, monkeypatch, caplog):
    root = _two_digits(tmp_path)
    (root / "digit_0" / "locked").mkdir()
    Image.new("L", (10, 10), 50).save(root / "digit_0" / "locked" / "x.png")
    (root / "digit_2").mkdir()
    Image.new("L", (10, 10), 60).save(root / "digit_2" / "x.png")
    bad_dirs = {str(root / "digit_0" / "locked"), str(root / "digit_2")}
    real_listdir, real_scandir = os.listdir, os.scandir

    def check(p):  # chmod 000 as a non-root user sees it (tests run as root, who can read anything)
        if p is not None and os.path.realpath(p) in bad_dirs:
            raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(os, "listdir", lambda p=".": (check(p), real_listdir(p))[1])
    monkeypatch.setattr(os, "scandir", lambda p=".": (check(p), real_scandir(p))[1])
    caplog.set_level(logging.INFO, logger="common.data")
    out = tmp_path / "o"
    run_split(_cfg(root), _out(out), out)
    bad = {os.path.relpath(r["path"], root): (r["label"], r["reason"]) for r in _csv(out / "bad_images.csv")}
    assert bad == {"digit_0/locked": ("digit_0", "folder unreadable: Permission denied"),
                   "digit_2": ("digit_2", "folder unreadable: Permission denied")}
    counts = {r["class"]: r for r in _csv(out / "class_counts.csv")}
    assert counts["digit_2"]["status"] == "dropped" and counts["digit_2"]["total"] == "0"
    assert "folder unreadable: Permission denied" in counts["digit_2"]["reason"]
    assert counts["digit_0"]["status"] == "kept" and counts["digit_0"]["total"] == "3"
    assert counts["digit_0"]["reason"] == "1 sub-folder(s) unreadable (see bad_images.csv)"
    assert "2 folder(s) cannot be read" in caplog.text
    with pytest.raises(UserError, match=r"folder .*digit_0/locked: folder unreadable: Permission denied "
                                        r"\(data.bad_images=fail"):
        run_split(_cfg(root, **{"data.bad_images": "fail"}), _out(tmp_path / "f"), tmp_path / "f")
    assert len(_csv(tmp_path / "f" / "bad_images.csv")) == 2


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads chmod 000 folders")
def test_unreadable_folder_chmod(tmp_path):
    root = _two_digits(tmp_path)
    locked = root / "digit_1" / "locked"
    locked.mkdir()
    os.chmod(locked, 0)
    try:
        run_split(_cfg(root), _out(tmp_path / "o"), tmp_path / "o")
    finally:
        os.chmod(locked, 0o755)
    assert [r["reason"] for r in _csv(tmp_path / "o" / "bad_images.csv")] == ["folder unreadable: Permission denied"]


def test_fewer_than_two_classes_is_a_user_error(tmp_path):
    root = tmp_path / "img"
    (root / "only").mkdir(parents=True)
    for i in range(5):
        Image.new("L", (10, 10), i).save(root / "only" / f"{i}.png")
    with pytest.raises(UserError, match=r"^data.root: .*img needs at least two classes for retrieval: found 1 class "
                                        r"folder\(s\), 1 kept \(only\) after dropping 0 with fewer than "
                                        r"split.min_images=2 usable images$"):
        run_split(_cfg(root), _out(tmp_path / "o"), tmp_path / "o")
    (root / "rare").mkdir()
    Image.new("L", (10, 10), 99).save(root / "rare" / "a.png")  # one image: dropped, one class left
    with pytest.raises(UserError, match=r"found 2 class folder\(s\), 1 kept \(only\) after dropping 1 with"):
        run_split(_cfg(root), _out(tmp_path / "o"), tmp_path / "o")
    Image.new("L", (10, 10), 98).save(root / "rare" / "b.png")
    assert run_split(_cfg(root), _out(tmp_path / "o"), tmp_path / "o")["classes"] == 2
