"""review.html (common/report/review.py, common/report/assets/review.js) and the thumbnails at one scale
(common/report/thumbs.py): the builder without a browser, then the page in a real headless Chromium
(Selenium + chromedriver): re-label, reload, save, filters, and 20,000 images with a bounded DOM."""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.extras import read_corrections
from common.ecotaxa.bundle import Prediction, TaxaMap, read_bundle_table, write_bundle
from common.report.review import (
    KEY_PREFIX,
    Review,
    ReviewEcotaxa,
    ReviewItem,
    build_data,
    doubt_note,
    review_key,
    write_review,
)
from common.stages.inference.predict import Queries, review_ecotaxa
from common.report.thumbs import MAX_UPSCALE, Thumb, common_scale, size_text, thumbnail

CLASSES = ["Copepoda & co", "Diatom", "b", "Noctiluca </script>"]


def _img(path: Path, size=(40, 30), colour=(200, 100, 50)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return str(path)


def _review(tmp_path: Path, n_rows: int = 5, n_items: int = 4, pixel_size_um: float | None = None) -> Review:
    """``n_rows`` queries (two samples) with real image files; the first ``n_items`` are shown."""
    g = [_img(tmp_path / "gallery" / f"g{i}.png", (30 + 40 * i, 20 + 30 * i), (10, 60 * i, 200)) for i in range(4)]
    preds = ["unknown", "b", "Copepoda & co", "b", "Diatom"]
    reasons = [["unknown", "low similarity"], ["small margin"], [], [], []]
    items, rows = [], []
    for q in range(n_rows):
        p = _img(tmp_path / "in" / f"st{q % 2}" / f"q{q}.png", (20 + 10 * q, 16 + 5 * q), (40 * q, 90, 90))
        rows.append((p, preds[q % 5]))
        items.append(ReviewItem(p, f"st{q % 2}", preds[q % 5], 0.9 - 0.01 * q, 0.02 * q if q else float("nan"),
                                   0.8 - 0.01 * q, reasons[q % 5],
                                   [(g[j], CLASSES[j], 0.9 - 0.01 * q - 0.05 * j) for j in range(4)]))
    rev = Review(title="Review <x>", note="note", name="cruise", items=items[:n_items], classes=CLASSES,
                 rows=rows, pixel_size_um=pixel_size_um)
    rev.ecotaxa = _bundle_rows(tmp_path, rev, TAXA)
    return rev


TAXA = TaxaMap({"Diatom": 12345, "Copepoda & co": "Copepoda<Maxillopoda"}, "taxa.csv")  # an id and a display name


def _bundle_rows(tmp_path: Path, rev: Review, taxa: TaxaMap | None, name: str = "cruise") -> ReviewEcotaxa:
    """The predict bundle of ``rev``'s queries (written by write_bundle, as stage 07 does) and its rows
    of the items, as stage 07 gives them to the page (``review_ecotaxa``)."""
    root = tmp_path / "in"
    samples = {p: Path(p).parent.name for p, _ in rev.all_rows()}
    res = write_bundle(tmp_path / "bundle", name, (
        Prediction(p, Path(p).relative_to(root).as_posix(), samples[p], None if c == "unknown" else c,
                   {"similarity": 0.5}) for p, c in rev.all_rows()), taxa=taxa)
    return review_ecotaxa(res, [it.query_path for it in rev.items], Queries(samples, [], root), taxa)


def _bundle_table(path: Path) -> list[list[str]]:
    """The TSV of a bundle: header, types, rows."""
    with zipfile.ZipFile(path) as zf:
        tsv = next(n for n in zf.namelist() if n.endswith(".tsv"))
    return list(read_bundle_table(path, tsv))


def _blob(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


# ----------------------------------------------------------------------------- no browser


def test_common_scale_fits_most_images_and_marks_the_rest():
    sizes = [(100, 50)] * 19 + [(400, 300)]
    s = common_scale(sizes, 96)
    assert s.per_px == pytest.approx(96 / 100)  # the 90 % quantile of the longest sides fills the box
    w, h, to_scale = s.fit(100, 50)
    assert (w, h, to_scale) == (pytest.approx(96), pytest.approx(48), True)
    w, h, to_scale = s.fit(400, 300)
    assert (w, h, to_scale) == (pytest.approx(96), pytest.approx(72), False)  # shrunk to fit, marked
    assert s.bar(400, 300) == pytest.approx(s.bar(100, 50) / 4)  # its bar is shorter, in proportion
    assert s.bar_px == 20 and s.bar_label == "20 px"  # a round length near 40 % of the box
    tiny = common_scale([(8, 8)], 96)
    assert tiny.per_px == MAX_UPSCALE
    um = common_scale(sizes, 96, pixel_size_um=2.5)
    assert um.bar_label == "100 µm" and um.bar_px == pytest.approx(40)
    assert size_text(120, 80) == "120 × 80 px"
    assert size_text(120, 80, 2.5) == "120 × 80 px · 300 × 200 µm"
    assert size_text(1000, 3, 1.5) == "1000 × 3 px · 1,500 × 4.5 µm"


def test_thumbnail_keeps_the_upright_size(tmp_path, exif_rotated_jpeg):
    t = thumbnail(exif_rotated_jpeg(tmp_path / "rot6.jpg"), 16, "WEBP")
    assert (t.width, t.height) == (24, 40)  # EXIF orientation 6: stored 40 x 24
    im = Image.open(io.BytesIO(base64.b64decode(t.uri.split(",", 1)[1])))
    assert t.uri.startswith("data:image/webp;base64,") and im.size == (10, 16)
    big = thumbnail(_img(tmp_path / "big.png", (300, 120)), 96, "JPEG")
    assert (big.width, big.height) == (300, 120) and big.uri.startswith("data:image/jpeg")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert thumbnail(tmp_path / "bad.png", 96) == Thumb(None)


def test_build_data_layout(tmp_path):
    rev = _review(tmp_path, pixel_size_um=2.0)
    (tmp_path / "gallery" / "g3.png").write_bytes(b"broken")  # an unreadable neighbour
    d = build_data(rev)
    assert len(d["items"]) == 4 and len(d["rows"]) == 5 and len(d["ecotaxa"]["row"]) == 4
    assert d["rows"][4] == [rev.rows[4][0], "Diatom"]  # every query, shown or not, is saved
    assert len(d["images"]) == 4 + 4  # four queries and four gallery images, each once
    sample, pred, sim, margin, knn, mask, img, nbs = d["items"][0]
    assert d["samples"][sample] == "st0" and d["names"][pred] == "unknown" and margin is None
    assert mask == 0b011 and d["reasons"][:2] == ["unknown", "low similarity"]
    q = d["images"][img]
    assert q[1:] == [20, 16, "20 × 16 px · 40 × 32 µm"]
    assert [d["names"][n[1]] for n in nbs] == CLASSES and d["images"][nbs[3][0]][0] is None
    assert d["images"][nbs[2][0]][1:3] == [110, 80]
    assert d["scale"]["pixel_size_um"] == 2.0 and d["scale"]["bar_label"].endswith("µm")
    e = d["ecotaxa"]
    assert e["header"][:6] == ["img_file_name", "img_rank", "object_id", "object_annotation_category",
                               "object_annotation_category_id", "object_annotation_status"]
    assert (e["bundle"], e["zip"], e["tsv"]) == ("ecotaxa_cruise.zip", "ecotaxa_cruise_reviewed.zip",
                                                 "ecotaxa_cruise_reviewed.tsv")
    assert e["taxa"] == {"Diatom": 12345, "Copepoda & co": "Copepoda<Maxillopoda"} and e["why"] == []
    # the storage key: the same prediction gives the same key; another call, another key
    assert d["key"] == review_key(rev) and d["key"].startswith(KEY_PREFIX + "cruise/")
    again = _review(tmp_path)
    assert review_key(again) == d["key"]
    again.rows[4] = (again.rows[4][0], "b")
    assert review_key(again) != d["key"]
    bad = _review(tmp_path)
    bad.items = bad.items[1:]
    with pytest.raises(ValueError, match="first rows"):
        build_data(bad)
    bad = _review(tmp_path)
    bad.ecotaxa.rows = bad.ecotaxa.rows[:-1]
    with pytest.raises(ValueError, match="3 rows for 4 items"):
        build_data(bad)


def _decode(e: dict) -> list[list[str] | None]:
    """The blob's ecotaxa columns back to one row (or None: left out) per item, as review.js reads them."""
    def cell(col, k):
        return col[k] if isinstance(col, list) else col["d"][col["i"][k]]
    return [[cell(c, k) for c in e["columns"]] if k >= 0 else None for k in e["row"]]


def test_page_data_carries_the_bundle_rows_of_the_items(tmp_path):
    """The rows the page saves for EcoTaxa are the bundle's own, read back from its zip, in the page's
    order (not the bundle's); an image the bundle left out is marked with the bundle writer's reason."""
    rev = _review(tmp_path, n_rows=6, n_items=5)
    (tmp_path / "in" / "st1" / "q3.png").write_bytes(b"broken")  # the bundle leaves it out
    rev.items = rev.items[::-1]  # a page order that is not the bundle's (the doubt order)
    rev.rows = [(it.query_path, it.predicted) for it in rev.items] + rev.rows[5:]
    rev.ecotaxa = _bundle_rows(tmp_path, rev, TAXA)
    table = _bundle_table(tmp_path / "bundle" / "ecotaxa_cruise.zip")
    by_id = {Path(r[0]).stem: r for r in table[2:]}
    assert len(table) == 2 + 5  # six queries, one left out
    d = build_data(rev)
    e = d["ecotaxa"]
    assert e["header"] == table[0] and e["types"] == table[1]
    got = _decode(e)
    assert [r[0] if r else None for r in got] == ["st0/q4.png", None, "st0/q2.png", "st1/q1.png", "st0/q0.png"]
    assert [r for r in got if r] == [by_id[s] for s in ("q4", "q2", "q1", "q0")]  # every cell as written
    assert e["row"][1] == -1 and len(e["why"]) == 1 and e["why"][0].startswith("cannot decode")
    # a repeated column is stored once per distinct cell; a column of distinct cells as it is
    assert e["columns"][e["header"].index("sample_id")] == {"d": ["cruise_st0", "cruise_st1"], "i": [0, 0, 1, 0]}
    assert isinstance(e["columns"][e["header"].index("object_id")], list)
    assert e["taxa"] == dict(TAXA.taxa)
    # without a taxa map: no id column, no map
    plain = _bundle_rows(tmp_path, rev, None, name="plain")
    assert "object_annotation_category_id" not in plain.header and build_data(
        Review("t", "", "plain", rev.items, CLASSES, rev.rows, plain))["ecotaxa"]["taxa"] is None
    # every image left out of the bundle: the page still knows each one and why
    for p, _ in rev.rows:
        Path(p).write_bytes(b"broken")
    none = build_data(Review("t", "", "none", rev.items, CLASSES, rev.rows, _bundle_rows(tmp_path, rev, TAXA, "none")))
    assert all(k < 0 for k in none["ecotaxa"]["row"]) and all(w.startswith("cannot decode")
                                                              for w in none["ecotaxa"]["why"])
    assert all(c == [] for c in none["ecotaxa"]["columns"])


def test_page_is_one_self_contained_file(tmp_path):
    rev = _review(tmp_path)
    path = write_review(tmp_path / "review.html", rev)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<title>Review &lt;x&gt;</title>" in text
    # a class named "... </script>" cannot end the data block: two scripts open and close
    assert text.count("<script") == 2 and text.count("</script>") == 2
    assert _blob(text)["classes"] == CLASSES
    assert not re.search(r'(src|href)="(?!data:)', text) and "http" not in text.split("<script>")[1]
    assert "function saveEcotaxa" in text and "localStorage" in text  # the assets are inlined


def test_doubt_note_says_what_is_shown():
    off = doubt_note(15, 10, 15, 500, None, None, 0.05)
    assert "(off (" not in off and "rejected as unknown (" not in off
    assert "Open-set rejection is off (inference.reject_below=null)" in off
    assert "15 images, 10 doubtful" in off and "All 15 images are shown, the doubtful ones first." in off
    cut = doubt_note(2000, 10, 500, 500, "inference.reject_below=0.7 on similarity", 0.81, 0.05)
    assert "rejected as unknown (inference.reject_below=0.7 on similarity)" in cut and "0.8100" in cut
    assert "The 500 most doubtful are shown (inference.review_max=500), 10 of them doubtful" in cut
    many = doubt_note(2000, 900, 500, 500, None, 0.81, 0.05)
    assert "The 500 most doubtful are shown (inference.review_max=500);" in many


# ----------------------------------------------------------------------------- a real browser


def _chromium() -> tuple[str, str] | None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if Path(p).is_file()), None)
    return (browser, driver) if browser and driver else None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium and chromedriver on this machine "
                                    "(.ci/run installs Debian's chromium and chromium-driver)")


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium driven by Selenium, downloads into ``tmp_path / "downloads"``."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM[0]
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    # the background-networking flags: the closed test network refuses those connections
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,900"):
        opts.add_argument(a)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    drv = webdriver.Chrome(service=Service(CHROMIUM[1]), options=opts)
    drv.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    drv.downloads = downloads
    yield drv
    drv.quit()


def _keys(drv, *keys):
    """Keys typed into whatever has the focus (as a user types)."""
    from selenium.webdriver.common.action_chains import ActionChains

    for k in keys:
        ActionChains(drv).send_keys(k).perform()


def _text(drv, css: str) -> str:
    return drv.find_element("css selector", css).text


def _row(drv, n: int):
    return drv.find_element("css selector", f'.row[data-item="{n}"]')


def _downloaded(folder: Path, name: str) -> Path:
    p = folder / name
    for _ in range(100):  # a download is written in the background: wait for it (up to 10 s)
        if p.is_file() and not (folder / (name + ".crdownload")).exists() and p.stat().st_size:
            return p
        time.sleep(0.1)
    raise AssertionError(f"{name} was not downloaded: {sorted(x.name for x in folder.iterdir())}")


@needs_chromium
def test_relabel_reload_and_save_in_chromium(tmp_path, browser):
    from selenium.webdriver.common.keys import Keys

    rev = _review(tmp_path)
    page = write_review(tmp_path / "review.html", rev)
    browser.get(page.as_uri())
    assert browser.get_log("browser") == []  # no script error
    assert _text(browser, "#progress") == "0 of 4 reviewed"
    assert "Image #1" in _text(browser, "#panel h2")
    _keys(browser, "c")  # confirm #1 (predicted unknown); the next image becomes current
    assert "confirmed" in _row(browser, 0).text and "current" in _row(browser, 1).get_attribute("class")
    _keys(browser, "/", "dia")  # re-label #2 with the keyboard: type to filter, Enter
    options = [o.text for o in browser.find_elements("css selector", "#label-options div")]
    assert options[0] == "Diatom" and options[-1] == "new class “dia”"
    _keys(browser, Keys.ENTER)
    assert "→ Diatom" in _row(browser, 1).text
    _keys(browser, "j")  # skip #3
    filt = browser.find_element("css selector", "#label-filter")
    filt.click()
    filt.send_keys("cop")
    browser.find_element("css selector", '#label-options div[data-label="Copepoda & co"]').click()
    assert "→ Copepoda & co" in _row(browser, 3).text
    assert _text(browser, "#progress") == "3 of 4 reviewed"

    browser.refresh()  # the work survives a reload (localStorage)
    assert _text(browser, "#progress") == "3 of 4 reviewed"
    assert "confirmed" in _row(browser, 0).text and "→ Diatom" in _row(browser, 1).text
    assert "not reviewed" in _row(browser, 2).text and "→ Copepoda & co" in _row(browser, 3).text
    stored = json.loads(browser.execute_script("return window.localStorage.getItem(arguments[0])", review_key(rev)))
    assert stored["labels"] == {"0": "unknown", "1": "Diatom", "3": "Copepoda & co"}

    browser.find_element("css selector", "#save-csv").click()
    saved = _downloaded(browser.downloads, "corrections_cruise.csv")
    with open(saved, newline="", encoding="utf-8") as fh:
        sheet = list(csv.DictReader(fh))
    assert [(r["path"], r["predicted"]) for r in sheet] == rev.rows  # every query, the stage's order
    assert [r["validated"] for r in sheet] == ["unknown", "Diatom", "", "Copepoda & co", ""]
    # exactly what data.gallery_extra takes: the two re-labelled images (unknown adds nothing)
    assert read_corrections(saved) == [(str(Path(rev.rows[1][0]).resolve()), "Diatom"),
                                       (str(Path(rev.rows[3][0]).resolve()), "Copepoda & co")]

    browser.find_element("css selector", "#save-eco").click()
    raw, table = _reviewed_zip(_downloaded(browser.downloads, "ecotaxa_cruise_reviewed.zip"),
                               "ecotaxa_cruise_reviewed.tsv")
    bundle = _bundle_table(tmp_path / "bundle" / "ecotaxa_cruise.zip")
    assert table[:2] == bundle[:2]  # the bundle's columns and type row
    # only the reviewed rows, in the page's order: #1 (unknown) is left out, #3 was not reviewed
    want = _validated(bundle, {"q1": "Diatom", "q3": "Copepoda & co"}, TAXA)
    assert table[2:] == want and raw == _tsv_bytes(bundle[:2] + want)
    cols = table[0]
    assert [(r[cols.index("object_annotation_category")], r[cols.index("object_annotation_category_id")])
            for r in table[2:]] == [("Diatom", "12345"), ("Copepoda<Maxillopoda", "")]  # id, and display name
    assert _text(browser, "#eco-status") == (
        "Saved ecotaxa_cruise_reviewed.zip: 2 reviewed images, status validated. Left out: 1 reviewed as unknown "
        "(EcoTaxa has no class “unknown”, and an empty category corrects nothing in update mode).")
    assert "“update classification” (Cla) and “skip existing objects”" in _text(browser, "#eco-note")


def _reviewed_zip(path: Path, tsv: str) -> tuple[bytes, list[list[str]]]:
    """The zip the page saved: one stored entry ``tsv``, CRC checked, UTF-8 name flag, fixed date; its
    raw bytes (BOM first) and its table as EcoTaxa's csv reader reads it."""
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None and zf.namelist() == [tsv]  # testzip: every CRC-32 checked
        info = zf.getinfo(tsv)
        assert info.compress_type == zipfile.ZIP_STORED and info.flag_bits & 0x800
        assert info.date_time == (1980, 1, 1, 0, 0, 0) and info.external_attr >> 16 == 0o644
        raw = zf.read(tsv)
    assert raw.startswith("\ufeff".encode("utf-8"))
    return raw, list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline=""), delimiter="\t", quotechar='"'))


def _validated(bundle: list[list[str]], labels: dict[str, str], taxa: TaxaMap | None) -> list[list[str]]:
    """The bundle's rows of ``labels`` (image stem -> reviewed class, in the page's order), validated and
    mapped through ``taxa`` as common.ecotaxa.bundle's _row maps a prediction."""
    cols = bundle[0]
    by_stem = {Path(r[0]).stem: r for r in bundle[2:]}
    out = []
    for stem, label in labels.items():
        row = list(by_stem[stem])
        taxon = taxa.taxa.get(label) if taxa is not None else None
        row[cols.index("object_annotation_category")] = taxon if isinstance(taxon, str) else label
        if "object_annotation_category_id" in cols:
            row[cols.index("object_annotation_category_id")] = str(taxon) if isinstance(taxon, int) else ""
        row[cols.index("object_annotation_status")] = "validated"
        out.append(row)
    return out


def _tsv_bytes(table: list[list[str]]) -> bytes:
    """``table`` as common.ecotaxa.bundle writes a TSV: BOM, clean_text, csv writer, '\\n'."""
    from common.ecotaxa.export import clean_text

    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", quotechar='"', lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    for r in table:
        w.writerow([clean_text(c) for c in r])
    return ("\ufeff" + buf.getvalue()).encode("utf-8")


ODD = ["tab\there", "new\nline", 'quote "q"', "back\\slash", "Ceratium é ü 日本", "Noctiluca </script>", "L" * 300]


@needs_chromium
def test_ecotaxa_zip_with_odd_class_names_and_nothing_to_save_in_chromium(tmp_path, browser):
    """Class names with a tab, a newline, a quote, a backslash, non-ASCII, '</script>' and 300 characters
    go into the zip as the bundle writer writes them; an empty review, and a review of images the
    bundle left out, save nothing and say why."""
    g = [_img(tmp_path / "gallery" / f"g{i}.png", (30, 30)) for i in range(len(ODD))]
    items = []
    for q, c in enumerate(ODD):
        p = _img(tmp_path / "in" / "st é" / f"q{q}.png", (20 + q, 20))
        items.append(ReviewItem(p, "st é", c, 0.5, 0.1, 0.4, [], [(g[j], ODD[j], 0.5) for j in range(len(ODD))]))
    (tmp_path / "in" / "st é" / "q6.png").write_bytes(b"broken")  # left out of the bundle
    taxa = TaxaMap({"tab\there": 4242, 'quote "q"': 'Quoted "name"', "Noctiluca </script>": "Noctiluca"})
    rev = Review("odd", "", "odd", items, ODD)
    rev.ecotaxa = _bundle_rows(tmp_path, rev, taxa, name="odd")
    page = write_review(tmp_path / "review.html", rev)
    browser.get(page.as_uri())
    assert browser.get_log("browser") == []
    browser.find_element("css selector", "#save-eco").click()  # nothing reviewed yet
    assert _text(browser, "#eco-status") == "Nothing saved for EcoTaxa: no image is reviewed yet."
    labels = {"0": "tab here", "1": "new line", "2": "unknown", "3": "back\\slash\tsaved raw", "4": ODD[4],
              "5": "L" * 300, "6": "Noctiluca </script>"}  # as labelCurrent stores them, but one raw tab
    browser.execute_script("window.localStorage.setItem(arguments[0], arguments[1])", review_key(rev),
                           json.dumps({"labels": labels}))
    browser.refresh()
    _keys(browser, "j", "6")  # #2 (predicted "new line") takes its sixth neighbour's class, through the page
    assert "→ Noctiluca </script>" in _row(browser, 1).text
    browser.find_element("css selector", "#save-eco").click()
    raw, table = _reviewed_zip(_downloaded(browser.downloads, "ecotaxa_odd_reviewed.zip"), "ecotaxa_odd_reviewed.tsv")
    assert sorted(x.name for x in browser.downloads.iterdir()) == ["ecotaxa_odd_reviewed.zip"]  # one file, once
    bundle = _bundle_table(tmp_path / "bundle" / "ecotaxa_odd.zip")
    want = _validated(bundle, {"q0": "tab\there", "q1": "Noctiluca </script>", "q3": "back\\slash saved raw",
                               "q4": ODD[4], "q5": "L" * 300}, taxa)
    assert raw == _tsv_bytes(bundle[:2] + want) and table[2:] == [[c.replace("\t", " ") for c in r] for r in want]
    cat, cid = table[0].index("object_annotation_category"), table[0].index("object_annotation_category_id")
    assert [(r[cat], r[cid]) for r in table[2:]] == [
        ("tab here", "4242"), ("Noctiluca", ""), ("back\\slash saved raw", ""), (ODD[4], ""), ("L" * 300, "")]
    status = _text(browser, "#eco-status")
    assert status.startswith("Saved ecotaxa_odd_reviewed.zip: 5 reviewed images, status validated. Left out: "
                             "1 reviewed as unknown") and "; 1 not in ecotaxa_odd.zip, left out when it was written "
    assert "(1: cannot decode" in status

    # a prediction whose every image the bundle left out: reviewed, but nothing can go back
    for it in items:
        Path(it.query_path).write_bytes(b"broken")
    none = Review("none", "", "none", items[:2], ODD)
    none.ecotaxa = _bundle_rows(tmp_path, none, taxa, name="none")
    browser.get(write_review(tmp_path / "none.html", none).as_uri())
    _keys(browser, "c")
    browser.find_element("css selector", "#save-eco").click()
    assert _text(browser, "#eco-status").startswith("Nothing saved for EcoTaxa: none of the 1 reviewed images can go "
                                                    "back. Left out: 1 not in ecotaxa_none.zip")


@needs_chromium
def test_filters_hash_presets_and_clear_in_chromium(tmp_path, browser):
    from selenium.webdriver.support.ui import Select

    page = write_review(tmp_path / "review.html", _review(tmp_path))
    browser.get(page.as_uri() + "#sample=st1")
    assert _text(browser, "#shown") == "2 of 4 shown"
    browser.get(page.as_uri() + "#class=Copepoda%20%26%20co")
    assert _text(browser, "#shown") == "1 of 4 shown" and "Image #3" in _text(browser, "#panel h2")
    browser.get(page.as_uri() + "#doubtful=1&status=todo")
    assert _text(browser, "#shown") == "2 of 4 shown"
    _keys(browser, "2")  # #1 takes its second neighbour's class, and leaves the "to review" view
    assert _text(browser, "#shown") == "1 of 4 shown" and "Image #2" in _text(browser, "#panel h2")
    assert _text(browser, "#progress") == "1 of 4 reviewed"
    Select(browser.find_element("css selector", "#f-status")).select_by_value("done")
    assert _text(browser, "#shown") == "1 of 4 shown" and "→ Diatom" in _row(browser, 0).text
    _keys(browser, "x")  # clear: back to "not reviewed"
    assert _text(browser, "#progress") == "0 of 4 reviewed" and _text(browser, "#shown") == "0 of 4 shown"
    # one scale: the query (20 x 16 px) and a neighbour (110 x 80 px) keep their size ratio
    Select(browser.find_element("css selector", "#f-status")).select_by_value("")
    imgs = _row(browser, 0).find_elements("css selector", "img")
    widths = [float(i.value_of_css_property("width")[:-2]) for i in imgs[:4]]
    assert widths[3] / widths[0] == pytest.approx(110 / 20, rel=0.02)
    assert "20 × 16 px" in _row(browser, 0).text and "110 × 80 px" in _row(browser, 0).text


def _dom_counts(drv) -> tuple[int, int]:
    return drv.execute_script("return [document.getElementsByTagName('*').length, "
                              "document.querySelectorAll('img[src^=\"data:\"]').length]")


@needs_chromium
def test_20000_images_render_a_bounded_dom(tmp_path, browser):
    """The list is virtualised: the DOM (and the thumbnails decoded) stay bounded, wherever one looks."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    n = 20_000
    files = [_img(tmp_path / "img" / f"{i}.png", (20 + i, 30), (i * 8, 50, 100)) for i in range(30)]
    items = [ReviewItem(files[i % 30], f"st{i % 7}", CLASSES[i % 3], 0.5, 0.1, 0.4, ["small margin"] if i % 2 else [],
                           [(files[(i + j) % 30], CLASSES[j % 4], 0.5) for j in range(5)]) for i in range(n)]
    # the bundle's rows of every item, as an export gives them: unique ids and scores, repeated sample columns
    header = ["img_file_name", "img_rank", "object_id", "object_annotation_category", "object_annotation_status",
              "object_similarity", "object_margin", "object_source_file", "sample_id", "acq_id", "acq_instrument",
              "sample_station"]
    eco_rows = [[f"st{i % 7}/img_{i:06d}.png", "0", f"big_img_{i:06d}_{i * 7919:012x}", CLASSES[i % 3], "predicted",
                 f"{0.5 + i / 1e5:.6g}", f"{0.1 + i / 1e6:.6g}", f"/data/big/st{i % 7}/img_{i:06d}.png",
                 f"big_st{i % 7}", f"acq{i % 7}", "FlowCam", f"station {i % 7}"] for i in range(n)]
    eco = ReviewEcotaxa("ecotaxa_big.zip", "ecotaxa_big.tsv", header, ["[t]", "[f]", *["[t]"] * 3, "[f]", "[f]",
                                                                      *["[t]"] * 5], eco_rows)
    rev = Review("big", "", "big", items, CLASSES, ecotaxa=eco)
    page = write_review(tmp_path / "review.html", rev)
    size_mb = page.stat().st_size / 1e6
    assert size_mb < 8, size_mb  # 20,000 rows of data and of EcoTaxa rows; thumbnails stored once per image file
    browser.get(page.as_uri())
    assert _text(browser, "#progress") == f"0 of {n} reviewed"
    rows = browser.execute_script("return document.querySelectorAll('.row').length")
    nodes, thumbs = _dom_counts(browser)
    # a query and five neighbours per row, and the current image large in the side panel
    assert 3 <= rows <= 30 and nodes < 2500 and thumbs <= 6 * rows + 1, (rows, nodes, thumbs)
    browser.execute_script("document.getElementById('list').scrollTop = 1e9")  # to the end
    time.sleep(0.2)  # one animation frame renders the rows in view
    _keys(browser, Keys.END)  # the last image becomes current
    assert "Image #20000" in _text(browser, "#panel h2") and _row(browser, n - 1).is_displayed()
    _keys(browser, "c")
    assert _text(browser, "#progress") == f"1 of {n} reviewed"
    nodes2, thumbs2 = _dom_counts(browser)
    assert nodes2 < 2500 and thumbs2 <= 6 * 30 + 1, (nodes2, thumbs2)
    Select(browser.find_element("css selector", "#f-doubt")).select_by_value("doubtful")
    assert _text(browser, "#shown") == f"{n // 2} of {n} shown"
    assert _dom_counts(browser)[0] < 2500
    # every image reviewed (stored, as the page keeps the work), then saved for EcoTaxa: 20,000 rows
    browser.execute_script("window.localStorage.setItem(arguments[0], JSON.stringify({labels: Object.fromEntries("
                           "Array.from({length: arguments[1]}, (_, i) => [i, i % 2 ? 'Diatom' : 'b']))}))",
                           review_key(rev), n)
    browser.refresh()
    assert _text(browser, "#progress") == f"{n} of {n} reviewed"
    browser.find_element("css selector", "#save-eco").click()
    _, table = _reviewed_zip(_downloaded(browser.downloads, "ecotaxa_big_reviewed.zip"), "ecotaxa_big_reviewed.tsv")
    assert len(table) == 2 + n and table[2][:5] == [*eco_rows[0][:3], "b", "validated"]
    assert table[-1] == [*eco_rows[-1][:3], "Diatom", "validated", *eco_rows[-1][5:]]


def _predict_review_and_save(tmp_path: Path, browser) -> tuple[Path, list[list[str]], list[list[str]]]:
    """One path through the real predict code (write_outputs, with a taxa map giving an id and a display
    name): its review.html re-labelled in the browser and both files saved. Returns the saved zip, its
    table and the predict bundle's table."""
    from selenium.webdriver.common.keys import Keys

    from common.config.schema import InferenceConfig
    from common.evaluate.prediction import predict
    from common.store.containers import Vectors

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))
    G = centres.repeat(4, axis=0) + 0.3 * rng.normal(size=(12, 8))
    Q = centres[[0, 1, 2, 0, 1]] + 0.6 * rng.normal(size=(5, 8))
    G, Q = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (G, Q))
    gallery = Vectors(G.astype(np.float32), np.arange(12) // 4,
                        [_img(tmp_path / "g" / f"{i}.png", (30 + 5 * i, 30)) for i in range(12)])
    queries = Vectors(Q.astype(np.float32), np.full(5, -1),
                        [_img(tmp_path / "in" / f"q{i}.png", (20 + 20 * i, 40)) for i in range(5)])
    cfg = InferenceConfig()
    cfg.mode, cfg.input, cfg.classifiers = "predict", str(tmp_path / "in"), []

    def output(*parts, digest="sha256"):
        (tmp_path / "out").mkdir(exist_ok=True)
        return tmp_path.joinpath("out", *parts)

    from common.stages.inference.predict import write_outputs

    taxa = TaxaMap({"Tripos": 84963, "Acartia": "Acartia<Acartiidae", "Ceratium": "Ceratium"}, "taxa.csv")
    pred = predict(queries, gallery, ["Acartia", "Ceratium", "Tripos"], cfg)
    write_outputs(output, pred, Queries({p: "st" for p in queries.paths}, [], tmp_path / "in"), cfg, name="st",
                  pixel_size_um=1.5, taxa=taxa)
    browser.get((tmp_path / "out" / "review.html").as_uri())
    assert _text(browser, "#progress") == "0 of 5 reviewed" and "µm" in _row(browser, 0).text
    sheet = list(csv.DictReader(io.StringIO((tmp_path / "out" / "corrections.csv").read_text(encoding="utf-8"))))
    first = sheet[0]["predicted"]
    _keys(browser, "c", "/", "trip", Keys.ENTER)  # confirm the first, re-label the second
    browser.find_element("css selector", "#save-csv").click()
    with open(_downloaded(browser.downloads, "corrections_st.csv"), newline="", encoding="utf-8") as fh:
        saved = list(csv.DictReader(fh))
    assert [(r["path"], r["predicted"]) for r in saved] == [(r["path"], r["predicted"]) for r in sheet]
    assert [r["validated"] for r in saved] == [first, "Tripos", "", "", ""]
    browser.find_element("css selector", "#save-eco").click()
    zipped = _downloaded(browser.downloads, "ecotaxa_st_reviewed.zip")
    _, table = _reviewed_zip(zipped, "ecotaxa_st_reviewed.tsv")
    bundle = _bundle_table(tmp_path / "out" / "ecotaxa_st.zip")
    stems = [Path(r["path"]).stem for r in sheet[:2]]
    if first != "unknown":
        assert table[2:] == _validated(bundle, {stems[0]: first, stems[1]: "Tripos"}, taxa)
    else:  # a rejected first image confirmed as unknown does not go back
        assert table[2:] == _validated(bundle, {stems[1]: "Tripos"}, taxa)
    return zipped, table, bundle


@needs_chromium
def test_the_page_predict_writes_in_chromium(tmp_path, browser):
    """Stage 07's own review.html: re-labelled and saved in the browser; the EcoTaxa zip holds the
    bundle's rows (same ids) of the two reviewed images, one through a numeric taxon id."""
    _, table, bundle = _predict_review_and_save(tmp_path, browser)
    cols = table[0]
    assert cols == bundle[0] and "object_annotation_category_id" in cols
    relabelled = table[-1]  # the second image of the page, the last row
    assert relabelled[cols.index("object_annotation_category_id")] == "84963"
    assert relabelled[cols.index("object_annotation_category")] == "Tripos"  # the class name kept beside the id
    ids = {r[cols.index("object_id")] for r in bundle[2:]}
    assert {r[cols.index("object_id")] for r in table[2:]} <= ids and len(table) - 2 in (1, 2)


ECOTAXA_CHECK = Path(os.environ.get("ECOTAXA_CHECK", "/work/ecotaxa_check"))
needs_validator = pytest.mark.skipif(
    not (ECOTAXA_CHECK / "validate.py").is_file() or not (ECOTAXA_CHECK / "venv" / "bin" / "python").is_file(),
    reason=f"EcoTaxa's own import validation (validate.py and its venv in {ECOTAXA_CHECK}, or $ECOTAXA_CHECK) "
           "is not on this machine")


@needs_chromium
@needs_validator
def test_saved_zip_passes_ecotaxa_import_validation(tmp_path, browser):
    """The zip the browser saved, through EcoTaxa's own import validation (ecotaxa_back's
    validate_import) in update mode Cla with "skip existing objects", as docs/ecotaxa.md says to import it."""
    zipped, table, _ = _predict_review_and_save(tmp_path, browser)
    r = subprocess.run([str(ECOTAXA_CHECK / "venv" / "bin" / "python"), str(ECOTAXA_CHECK / "validate.py"),
                        str(zipped), "--update", "Cla", "--skip-existing"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)  # EcoTaxa's code writes ecotaxa_back_0.log into its cwd
    assert r.returncode == 0 and "\nerrors: 0\n" in r.stdout, r.stdout + r.stderr
    assert f"\nrows: {len(table) - 2}\n" in r.stdout
    assert "category ids seen (checked by TaxonomyBO.find_ids, not here): [84963]" in r.stdout
