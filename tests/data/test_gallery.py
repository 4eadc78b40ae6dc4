"""Gallery-only images (common/gallery.py): folders, filled corrections.csv files, class lists."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from common.data.extras import list_extras
from common.data.labels import gallery_classes
from common.data.splits import EXTRA_SPLIT
from common.errors import UserError
from common.fileio import sha256_file
from common.store.containers import Vectors, merge, subset


def _png(p: Path, seed: int = 0) -> Path:
    from PIL import Image

    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(p)
    return p


def _corrections(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "predicted", "validated"])
        w.writerows(rows)
    return path


def test_folder_and_corrections_give_labelled_images(tmp_path):
    a = _png(tmp_path / "extra" / "copepod" / "deep" / "a.png", 1)
    b = _png(tmp_path / "extra" / "new_taxon" / "b.jpg", 2)
    (tmp_path / "extra" / "new_taxon" / "notes.txt").write_text("x")
    (tmp_path / "extra" / ".hidden").mkdir()
    c = _png(tmp_path / "review" / "c.png", 3)
    d = _png(tmp_path / "review" / "d.png", 4)
    e = _png(tmp_path / "review" / "e.png", 5)
    sheet = _corrections(tmp_path / "review" / "corrections.csv",
                         [("c.png", "copepod", "diatom"), (str(d), "diatom", ""), (str(e), "unknown", "unknown")])
    got = list_extras([tmp_path / "extra", sheet])
    assert [(Path(x.path).name, x.label) for x in got] == [("a.png", "copepod"), ("b.jpg", "new_taxon"),
                                                           ("c.png", "diatom")]
    assert all(x.split == EXTRA_SPLIT for x in got)
    assert got[0].sha256 == sha256_file(a) and got[1].path == str(b.resolve()) and got[2].path == str(c.resolve())
    assert list_extras([]) == []


def test_bad_entries_are_user_errors_naming_them(tmp_path):
    with pytest.raises(UserError, match="data.gallery_extra: .*missing does not exist"):
        list_extras([tmp_path / "missing"])
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "x.png")
    with pytest.raises(UserError, match="no class sub-folder"):
        list_extras([tmp_path / "flat"])
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.png,a\n")
    with pytest.raises(UserError, match="bad.csv has no 'path' and 'validated' columns"):
        list_extras([bad])
    gone = _corrections(tmp_path / "gone.csv", [("nothere.png", "a", "b")])
    with pytest.raises(UserError, match="gone.csv line 2: image .*nothere.png does not exist"):
        list_extras([gone])
    img = _png(tmp_path / "one" / "copepod" / "x.png")
    clash = _corrections(tmp_path / "clash.csv", [(str(img), "copepod", "diatom")])
    with pytest.raises(UserError, match="two classes"):
        list_extras([tmp_path / "one", clash])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="neither a folder"):
        list_extras([tmp_path / "notes.txt"])


def test_gallery_classes_keep_the_training_indices():
    assert gallery_classes(["b", "d"], ["d", "z", "a", "z"]) == ["b", "d", "a", "z"]
    assert gallery_classes(["b", "d"], []) == ["b", "d"]


def test_merge_orders_by_image_id_and_subset():
    a = Vectors(np.eye(3, dtype=np.float32)[[0, 1]], [0, 1], ["a0", "a1"], [5, 1])
    b = Vectors(np.eye(3, dtype=np.float32)[[2]], [2], ["b0"], [3])
    m = merge(a, b)
    assert m.ids.tolist() == [1, 3, 5] and m.paths == ["a1", "b0", "a0"] and m.labels.tolist() == [1, 2, 0]
    np.testing.assert_array_equal(m.X, np.eye(3, dtype=np.float32)[[1, 2, 0]])
    s = subset(m, m.labels != 2)
    assert s.paths == ["a1", "a0"] and s.ids.tolist() == [1, 5]


def test_gallery_extra_images_get_stage_01s_size_checks(tmp_path):
    from PIL import Image

    (tmp_path / "extra" / "a").mkdir(parents=True)
    Image.new("L", (64, 2), 9).save(tmp_path / "extra" / "a" / "thin.png")
    with pytest.raises(UserError, match=r"thin.png .*shorter than data.min_side=4"):
        list_extras([tmp_path / "extra"], min_side=4, max_pixels=10_000)
