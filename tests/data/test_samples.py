"""Predict-mode inputs and samples, counts, the EcoTaxa table and the doubt order (common/samples.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data.samples import list_inputs
from common.errors import UserError
from common.evaluate.metrics import UNKNOWN
from common.evaluate.tables import doubt_order, sample_counts


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return p


def test_folder_samples_are_first_sub_folders(tmp_path):
    root = tmp_path / "cruise"
    for rel in ("st1/a.png", "st1/deep/b.png", "st2/c.jpg", "loose.png", "st2/readme.txt", "st2/.d.png"):
        _touch(root / rel)
    inp = list_inputs(root)
    got = {Path(p).relative_to(root.resolve()).as_posix(): inp.samples[p] for p in inp.images}
    assert got == {"st1/a.png": "st1", "st1/deep/b.png": "st1", "st2/c.jpg": "st2", "loose.png": "cruise"}
    assert [Path(p).name for p, _ in inp.others] == ["readme.txt"] and inp.root == root.resolve()
    assert inp.sample_list() == ["cruise", "st1", "st2"]


def test_single_image_csv_and_text_lists(tmp_path):
    img = _touch(tmp_path / "st9" / "x.png")
    one = list_inputs(img)
    assert one.images == [str(img.resolve())] and one.samples[one.images[0]] == "st9"
    a = _touch(tmp_path / "imgs" / "a.png")
    b = _touch(tmp_path / "imgs" / "sub" / "b.png")
    lst = tmp_path / "list.csv"
    lst.write_text(f"path,sample\nimgs/a.png,north\n{b},\nimgs/missing.png,north\nimgs/notes.txt,x\n")
    _touch(tmp_path / "imgs" / "notes.txt")
    inp = list_inputs(lst)
    assert inp.images == [str(a.resolve()), str(b.resolve())]
    assert inp.samples[str(a.resolve())] == "north" and inp.samples[str(b.resolve())] == "sub"
    assert [(Path(p).name, why) for p, why in inp.others] == [("missing.png", "listed file does not exist"),
                                                              ("notes.txt", "not an image file (suffix)")]
    assert inp.root == (tmp_path / "imgs").resolve()
    txt = tmp_path / "list.txt"
    txt.write_text(f"# images\n\nimgs/a.png\n{b}\n")
    assert list_inputs(txt).images == [str(a.resolve()), str(b.resolve())]
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.png\n")
    with pytest.raises(UserError, match="bad.csv has no 'path' column"):
        list_inputs(bad)
    with pytest.raises(UserError, match="does not exist"):
        list_inputs(tmp_path / "nothing")
    twice = tmp_path / "twice.txt"
    twice.write_text("imgs/a.png\nimgs/a.png\n")
    with pytest.raises(UserError, match="listed twice"):
        list_inputs(twice)


def test_sample_counts_table():
    header, rows = sample_counts(["s1", "s2", "s1", "s1"], np.array([0, 1, UNKNOWN, 0]), ["a", "b"],
                                   unreadable={"s2": 3})
    assert header == ["sample", "a", "b", "unknown", "total", "unreadable"]
    assert rows == [["s1", 2, 0, 1, 3, 0], ["s2", 0, 1, 0, 1, 3]]


def test_doubt_order_puts_unknown_then_more_reasons_then_lower_similarity():
    final = np.array([0, UNKNOWN, 1, 0, 1])
    sim = np.array([0.95, 0.5, 0.6, 0.9, 0.99])
    margin = np.array([0.2, 0.01, 0.01, 0.2, np.nan])
    order, reasons = doubt_order(final, sim, margin, low_similarity=0.7, small_margin=0.05)
    assert order.tolist() == [1, 2, 3, 0, 4]
    assert reasons[1] == ["unknown", "low similarity", "small margin"]
    assert reasons[2] == ["low similarity", "small margin"] and reasons[0] == [] and reasons[4] == []


def test_every_csv_cell_a_spreadsheet_would_run_is_neutralised_and_read_back(tmp_path):
    """Issue 17 #6: CSV injection through class, sample or file names; numbers never change."""
    import csv

    from common.data.extras import read_corrections
    from common.data.splits import SplitRow, read_splits, write_splits_csv
    from common.fileio import spreadsheet_safe, spreadsheet_text, write_csv

    cells = ["=HYPERLINK(\"http://evil\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(1)", "\tx", "plain", "-", "'=x",
             "''@y", "'s-Hertogenbosch", "-0.5", "+3", "1e-4", "-inf", "nan", "", -0.25, 7]
    out = tmp_path / "t.csv"
    write_csv(out, [f"c{i}" for i in range(len(cells))], [cells])
    with open(out, newline="", encoding="utf-8") as fh:
        got = list(csv.reader(fh))[1]
    assert got[:10] == ["'=HYPERLINK(\"http://evil\")", "'+cmd|' /C calc'!A0", "'-2+3", "'@SUM(1)", "'\tx", "plain",
                        "'-", "''=x", "'''@y", "'s-Hertogenbosch"]
    assert got[10:] == ["-0.5", "+3", "1e-4", "-inf", "nan", "", "-0.25", "7"]  # numbers untouched
    assert [spreadsheet_text(c) for c in got[:16]] == cells[:16]  # exactly the original text back
    assert all(spreadsheet_safe(c) == c for c in (1.5, -2, None))
    # the tool's own readers undo it: splits.csv labels, corrections.csv classes, predict .csv lists
    img = tmp_path / "=img" / "-5m.png"
    img.parent.mkdir()
    img.write_bytes(b"x")
    rows = [SplitRow(str(img), "-5m depth", "train", "0" * 64, 8, 8, "L"),
            SplitRow(str(tmp_path / "b.png"), "=cmd", "val", "1" * 64, 8, 8, "L")]
    write_splits_csv(tmp_path / "splits.csv", rows)
    assert "'-5m depth" in (tmp_path / "splits.csv").read_text()
    assert [(r.path, r.label) for r in read_splits(tmp_path / "splits.csv")] == [(r.path, r.label) for r in rows]
    write_csv(tmp_path / "corrections.csv", ["path", "predicted", "validated"], [[str(img), "-5m depth", ""]])
    text = (tmp_path / "corrections.csv").read_text()  # the user copies the predicted cell, quote and all
    (tmp_path / "corrections.csv").write_text(text.replace(",'-5m depth,", ",'-5m depth,'-5m depth"))
    assert read_corrections(tmp_path / "corrections.csv") == [(str(img.resolve()), "-5m depth")]
    write_csv(tmp_path / "list.csv", ["path", "sample"], [[str(img), "=station"]])
    inp = list_inputs(tmp_path / "list.csv")
    assert inp.images == [str(img.resolve())] and inp.samples[str(img.resolve())] == "=station"
