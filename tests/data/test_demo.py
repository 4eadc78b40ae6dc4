"""common/demo.py: the digits demo folder, synthetic plankton, broken files."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.demo import DIGITS_MARKER, make_bad_files, make_synthetic_plankton, render_digits
from common.errors import UserError


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_render_digits(tmp_path):
    dest = render_digits(tmp_path / "digits", size=16)
    files = sorted(p for p in dest.rglob("*.png"))
    assert len(files) == 1797
    per_class = Counter(p.parent.name for p in files)
    assert sorted(per_class) == [f"digit_{d}" for d in range(10)] and min(per_class.values()) >= 170
    im = Image.open(files[0])
    assert im.size == (16, 16) and im.mode == "L"
    a = np.stack([np.asarray(Image.open(p)) for p in files[:50]]).astype(float)
    corners = a[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.median(a) < 20 and corners.mean() < 10 and a.max() > 200  # bright strokes on a dark background

    # idempotent: a complete cache is not rewritten (file times unchanged keep stage 01 up to date)
    mtimes = {p: p.stat().st_mtime_ns for p in files[:20]}
    assert render_digits(dest, size=16) == dest
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())

    # a half-rendered cache (no marker: it is written last) is redone; so is another size
    (dest / DIGITS_MARKER).unlink()
    files[0].unlink()
    render_digits(dest, size=16)
    assert files[0].is_file() and (dest / DIGITS_MARKER).is_file()
    render_digits(dest, size=12)
    assert Image.open(files[0]).size == (12, 12) and len(list(dest.rglob("*.png"))) == 1797


def test_render_digits_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="not a digits demo cache"):
        render_digits(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").is_file()


def test_synthetic_plankton_is_deterministic_and_varied(tmp_path):
    a = make_synthetic_plankton(tmp_path / "a", classes=4, per_class=[6, 4, 3, 2], seed=5)
    b = make_synthetic_plankton(tmp_path / "b", classes=4, per_class=[6, 4, 3, 2], seed=5)
    c = make_synthetic_plankton(tmp_path / "c", classes=4, per_class=[6, 4, 3, 2], seed=6)
    assert _digest(a) == _digest(b) and _digest(a) != _digest(c)
    files = sorted(p for p in a.rglob("*") if p.is_file())
    assert Counter(p.parent.name for p in files) == {"class_00": 6, "class_01": 4, "class_02": 3, "class_03": 2}
    ims = [Image.open(p) for p in files]
    assert {im.mode for im in ims} == {"L", "RGB"} and {im.format for im in ims} == {"PNG", "JPEG"}
    assert all(20 <= s <= 90 for im in ims for s in im.size)
    assert any(im.size[0] != im.size[1] for im in ims)
    for im in ims:  # dark background, bright organism
        g = np.asarray(im.convert("L"), dtype=float)
        assert np.median(g) < 60 and g.max() > 120
    named = make_synthetic_plankton(tmp_path / "n", classes=["Noctiluca", "Copepoda"], per_class=1)
    assert sorted(p.name for p in named.iterdir()) == ["Copepoda", "Noctiluca"]
    with pytest.raises(ValueError):
        make_synthetic_plankton(tmp_path / "x", classes=2, per_class=[1])


def test_bad_files(tmp_path):
    files = make_bad_files(tmp_path)
    assert files["empty"].stat().st_size == 0
    assert files["hidden"].name.startswith(".") and files["hidden_dir"].parent.name.startswith(".")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(files["bomb"])
    with pytest.raises(OSError):
        Image.open(files["truncated"]).load()
    assert Image.open(files["tiny"]).size == (1, 1)
    assert Image.open(files["no_suffix"]).format == "PNG"
