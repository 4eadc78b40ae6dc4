"""The HTML report: well-formed, self-contained, images decode; figures legible at 90 classes."""
from __future__ import annotations

import base64
import io
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.report.html import Report, StripItem, render, thumbnail_data_uri, write_report
from common.report.plots import confusion_matrix_png, embedding_map_png, plot_class_distribution
from common.report.thumbs import THUMB_PX

VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}


class Checker(HTMLParser):
    """Collects images and checks that every non-void tag is closed in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict] = []
        self.text: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        for key in ("src", "href"):
            if key in a and not str(a[key]).startswith(("data:", "#")):
                self.external.append(a[key])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> (open: {self.stack[-3:]})")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> Checker:
    c = Checker()
    c.feed(text)
    c.close()
    return c


def decode_data_uri(uri: str) -> Image.Image:
    head, b64 = uri.split(",", 1)
    assert head.startswith("data:image/") and head.endswith(";base64"), head
    im = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    im.load()
    return im


def _img(path: Path, size=(40, 30), colour=(200, 100, 50)) -> str:
    Image.new("RGB", size, colour).save(path)
    return str(path)


@pytest.fixture
def sample_report(tmp_path) -> Path:
    cm = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    names = ["Noctiluca", "Copepoda <juvenile> & \"odd\"", "Diatom"]
    cm_png = confusion_matrix_png(cm, names, names, tmp_path / "cm.png")
    X = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    map_png = embedding_map_png(X, np.repeat([0, 1, 2], 10), names, tmp_path / "map.png", "tsne", 0)
    q = _img(tmp_path / "q.png")
    g = _img(tmp_path / "g.jpg", (300, 200))
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"not an image")
    rep = Report(title="Test <report>", facts=[("run", "runs/x"), ("model", "seresnext50_32x4d")],
                   metrics={"accuracy": 0.91234567, "macro_f1": 0.5, "n_queries": 12, "nested": {"x": 1}},
                   comparison=(["method", "accuracy"], [["retrieval_top1", 0.9], ["logreg", 0.8]]),
                   images=[("Confusion matrix", cm_png, "rows normalised"), ("Map", map_png, ""),
                           ("Missing plot", tmp_path / "absent.png", "")],
                   per_class=(["class", "f1"], [[n, 0.5] for n in names]),
                   strips=[(names[1], "2 misclassified", [
                       StripItem(q, names[1], names[0], 0.8, g, names[0]),
                       StripItem(str(bad), names[1], "unknown", 0.2, None, None)])])
    return write_report(tmp_path / "report.html", rep)


def test_report_is_well_formed_and_self_contained(sample_report):
    text = sample_report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    c = parse(text)
    assert not c.errors, c.errors
    assert c.stack == [], f"unclosed tags: {c.stack}"
    assert not c.external, f"external references: {c.external}"
    # 2 plots + 2 thumbnails (query, neighbour); the corrupt query and the missing plot are skipped
    assert len(c.images) == 4
    sizes = [decode_data_uri(im["src"]).size for im in c.images]
    assert all(max(s) <= THUMB_PX for s in sizes[2:])  # thumbnails are small
    body = "".join(c.text)
    assert 'Copepoda <juvenile> & "odd"' in body  # escaped in the file, intact once parsed
    assert "<juvenile>" not in text
    assert "0.9123" in body and "unreadable" in body
    # size is evidence: each thumbnail's pixel size, both drawn at one scale (40 px wide and 300 px wide)
    assert "40 × 30 px" in body and "300 × 200 px" in body and "the red bar is" in body
    widths = [float(re.search(r"width:([0-9.]+)px", im["style"]).group(1)) for im in c.images[2:]]
    assert widths[1] == pytest.approx(THUMB_PX, abs=0.1) and widths[0] == pytest.approx(widths[1] * 40 / 300, abs=0.1)
    assert '<span class="num">(0.800)</span>' in text  # a similarity never wraps mid-number


def test_strips_give_sizes_in_micrometres(tmp_path):
    q, g = _img(tmp_path / "q.png", (50, 20)), _img(tmp_path / "g.png", (60, 40))
    rep = Report(title="t", strips=[("a", "", [StripItem(q, "a", "b", 0.5, g, "b")])], pixel_size_um=2.0)
    text = render(rep)
    assert "<figcaption>50 × 20 px</figcaption><figcaption>100 × 40 µm</figcaption>" in text
    assert "120 × 80 µm" in text and "µm; a dashed frame" in text


def test_confusion_matrix_grows_with_class_count(tmp_path):
    rng = np.random.default_rng(0)
    small = confusion_matrix_png(rng.integers(0, 5, (5, 5)), list("abcde"), list("abcde"), tmp_path / "s.png")
    names = [f"species_{i:02d}_long_name" for i in range(90)]
    cm = rng.integers(0, 3, (90, 91))
    cm[np.arange(90), np.arange(90)] += 30
    big = confusion_matrix_png(cm, names, names + ["unknown"], tmp_path / "b.png")
    ws, hs = Image.open(small).size
    wb, hb = Image.open(big).size
    assert hb > 1.8 * hs and wb > 1.8 * ws
    assert hb < 3000 and wb < 3000  # and stays a reasonable picture


def test_thumbnail_is_upright(tmp_path, exif_rotated_jpeg):
    uri = thumbnail_data_uri(exif_rotated_jpeg(tmp_path / "rot6.jpg"))
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    w, h = im.size
    assert h > w  # EXIF orientation 6 applied, as load_rgb does
    a = np.asarray(im.convert("L")).astype(int)
    assert a[: h // 3].mean() < 40 and a[-h // 3:].mean() > 215


def test_thumbnail_of_unreadable_file_is_none(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(b"\xff\xd8garbage")
    assert thumbnail_data_uri(p) is None
    assert thumbnail_data_uri(tmp_path / "missing.png") is None


CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no /usr/bin/chromium on this machine")
def test_report_renders_in_headless_chromium(sample_report, tmp_path):
    shot = tmp_path / "shot.png"
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,2000",
                          f"--screenshot={shot}", sample_report.as_uri()], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    im = Image.open(shot).convert("L")
    assert np.asarray(im).std() > 5  # something was drawn, not a blank page
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          sample_report.as_uri()], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0 and "Confusion matrix" in dom.stdout


def test_class_names_are_drawn_literally(tmp_path):
    """Issue 11 #8: a `$` in a class name crashed stage 01 in matplotlib's maths-text parser."""
    from types import SimpleNamespace

    names = ["cost$1", "a$b$c", "under_score", "back\\slash", "$x^2$", "per%cent"]
    counts = [SimpleNamespace(name=n, total=5, train=3, val=1, test=1, status="kept", reason="") for n in names]
    plot_class_distribution(counts, tmp_path / "dist.png")
    cm = np.eye(len(names)) * 3
    confusion_matrix_png(cm, names, names, tmp_path / "cm.png")
    embedding_map_png(np.random.default_rng(0).normal(size=(30, 4)), np.arange(30) % len(names), names,
                        tmp_path / "map.png", method="pca")
    for f in ("dist.png", "cm.png", "map.png"):
        assert Image.open(tmp_path / f).size[0] > 100
