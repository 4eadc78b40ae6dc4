"""EcoTaxa both ways: reading exports as EcoTaxa writes them, writing bundles EcoTaxa imports."""
from __future__ import annotations

import codecs
import csv
import io
import os
import random
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from ecotaxa_exports import SAMPLES, category, make_export
from PIL import Image

from common.ecotaxa.bundle import Prediction, read_taxa_map, write_bundle
from common.ecotaxa.export import Export, _member_name
from common.ecotaxa.rows import read_class_map, select
from common.errors import UserError


def _truth_of(rows):
    return {r.object_id: (r.category, r.status, r.sample_id, r.image) for r in rows}


def _read_bundle(path: Path) -> tuple[bytes, list[str], list[str], list[dict[str, str]], zipfile.ZipFile]:
    zf = zipfile.ZipFile(path)
    tsvs = [n for n in zf.namelist() if n.endswith(".tsv")]
    assert len(tsvs) == 1 and "/" not in tsvs[0]  # the TSV at the root
    raw = zf.read(tsvs[0])
    text = raw.decode("utf-8-sig")
    lines = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
    header, types = lines[0], lines[1]
    return raw, header, types, [dict(zip(header, r)) for r in lines[2:]], zf


def _pixels(data: bytes) -> tuple[str, tuple[int, int], np.ndarray]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.mode, im.size, np.asarray(im)


# ============================================================================ reading


@pytest.mark.parametrize("kw", [
    {},                                              # EcoTaxa's default: BOM, type row, general layout
    {"encoding": "latin-1"},                         # use_latin1
    {"encoding": "utf-8", "types_row": False},       # hand-made: no BOM, no type row
    {"layout": "backup"},                            # TSVs beside their images, in sub-folders
    {"as_zip": True},                                # the zip EcoTaxa hands out
])
def test_export_variants_read_the_same(tmp_path, digits, kw):
    dest = tmp_path / ("export.zip" if kw.get("as_zip") else "export")
    path, truth = make_export(dest, digits, **kw)
    with Export(path) as exp:
        assert exp.tsv_files == sorted(truth.tsvs)
        rows = exp.rows()
        assert _truth_of(rows) == truth.objects  # accents intact, images resolved from each TSV's folder
        assert all(exp.has(r.image) for r in rows)
        first = next(r for r in rows if r.sample_id == SAMPLES[0])
        assert first.fields["sample_station"] == f"station «{SAMPLES[0]}»"
        assert first.fields["acq_id"] == f"{SAMPLES[0]}_acq"
        assert "object_area" not in first.fields  # only the columns asked for
        assert "object_area" in exp.rows(columns=None)[0].fields
        with exp.open(first.image) as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_zip_is_read_member_by_member(tmp_path, digits, monkeypatch):
    path, truth = make_export(tmp_path / "e.zip", digits, as_zip=True)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", lambda *a, **k: pytest.fail("extracted everything"))
    with Export(path) as exp:
        rows = exp.rows()
        got = exp.extract([rows[0].image, rows[1].image], tmp_path / "out")
    assert got[rows[0].image].read_bytes()[:4] == b"\x89PNG"
    assert got[rows[1].image] == tmp_path / "out" / rows[1].image
    assert len(list((tmp_path / "out").rglob("*.png"))) == 2


def test_select_statuses_classes_levels_and_reasons(tmp_path, digits):
    path, truth = make_export(tmp_path / "e", digits, per_class=4)
    (path / "st2" / "st2_1_3.png").unlink()               # a validated row whose image is gone
    (path / "Ñandú 3" / "Ñandú_3_2_3.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with Export(path) as exp:
        rows = exp.rows()
        sel = select(rows, exp, verify_images=True)
        assert len(sel.used) + len(sel.skipped) == len(rows) == 40
        assert sel.counts() == {"status": 20, "missing image": 1, "unreadable image": 1}
        assert all(cls == r.category and r.status == "validated" for r, cls in sel.used)
        missing = next(s for s in sel.skipped if s.kind == "missing image")
        assert missing.row.object_id == "st2_1_3" and "st2/st2_1_3.png" in missing.detail
        both = select(rows, exp, statuses=["validated", "predicted"])
        assert len(both.used) == 29 and both.counts() == {"status": 10, "missing image": 1}
        level = select(rows, exp, level=3)
        assert level.class_counts() == {"even": 10, "odd": 9}
        assert select(rows, exp, level=9).class_counts()["zero"] == 2  # coarser than asked: its deepest name
        todo = select(rows, exp, statuses=["", "predicted"], need_category=False)  # objects to predict on
        assert todo.counts() == {"status": 20} and {r.status for r, _ in todo.used} == {"", "predicted"}
        assert {c for r, c in todo.used if not r.status} == {""}
        with pytest.raises(UserError, match="data.ecotaxa_status"):
            select(rows, statuses=["valid"])


def test_class_map_merges_drops_and_lists_unmapped(tmp_path, digits):
    path, _ = make_export(tmp_path / "e", digits, per_class=4)
    cm = tmp_path / "map.csv"
    cm.write_text("category,class\nzero<even,round\nsix<even,round\neight<even,round\none<odd,-\n", encoding="utf-8")
    with Export(path) as exp:
        rows = exp.rows()
        sel = select(rows, exp, class_map=read_class_map(cm))
        assert sel.class_counts() == {"round": 6}
        assert sel.counts() == {"status": 20, "dropped": 2, "unmapped": 12}
        assert any(s.kind == "unmapped" and "'two<even' is not in the class map" in s.detail for s in sel.skipped)
        cm.write_text("category,class\nzero<even,round\none<odd,-\n*,*\n", encoding="utf-8")
        kept = select(rows, exp, class_map=read_class_map(cm)).class_counts()
        assert kept["round"] == 2 and "one<odd" not in kept and kept["two<even"] == 2
        cm.write_text("category,class\nzero<even,round\n*,other\n", encoding="utf-8")
        assert select(rows, exp, class_map=read_class_map(cm)).class_counts() == {"round": 2, "other": 18}
        cm.write_text("category,class\nzero<even,round\n*,-\n", encoding="utf-8")
        sel = select(rows, exp, class_map=read_class_map(cm))
        assert sel.counts()["dropped"] == 18 and "unmapped" not in sel.counts()
    for bad, msg in [("category,class\nzero<even,a\nzero<even,b\n", "listed twice"),
                     ("category,class\nzero<even\n", "line 2"), ("category,class\n", "no lines")]:
        cm.write_text(bad, encoding="utf-8")
        with pytest.raises(UserError, match=msg):
            read_class_map(cm)


def test_duplicate_object_ids_refused_other_images_kept_apart(tmp_path, digits):
    path, _ = make_export(tmp_path / "e", digits, extra_image=True)
    with Export(path) as exp:
        rows = exp.rows()
        sel = select(rows, exp, statuses=["validated", "predicted", ""])
    assert len(rows) == 31
    extra = [s for s in sel.skipped if s.kind == "another image"]
    assert len(extra) == 1 and extra[0].row.rank == 1.0 and extra[0].row.image.endswith("_b.png")
    # the same object twice, in two TSVs: refused, both places listed
    tsv = path / "ecotaxa_st2.tsv"
    text = tsv.read_text(encoding="utf-8-sig").splitlines()
    (path / "ecotaxa_st2b.tsv").write_text("\n".join([*text[:2], text[2], text[3]]) + "\n", encoding="utf-8-sig")
    with Export(path) as exp, pytest.raises(UserError) as e:
        exp.rows()
    msg = str(e.value)
    assert "2 object_id(s)" in msg and "ecotaxa_st2.tsv:3" in msg and "ecotaxa_st2b.tsv:3" in msg
    assert "\n" not in msg


def test_quoted_fields_bom_and_header_rules(tmp_path):
    folder = tmp_path / "e"
    folder.mkdir()
    Image.new("L", (8, 8), 3).save(folder / "a b.png")
    body = ('  Object_ID \t"img_file_name"\t"object_annotation_category"\t"object_annotation_status"\t"sample_id"\n'
            '"[t]"\t"[t]"\t"[t]"\t"[t]"\t"[t]"\n'
            '"x1"\t"a b.png"\t"Calanus ""big""\tone"\t"validated"\t"s ""1"""\n')
    (folder / "ecotaxa_q.tsv").write_bytes(codecs.BOM_UTF8 + body.encode("utf-8"))
    with Export(folder) as exp:
        (row,) = exp.rows()
    assert (row.object_id, row.image, row.category, row.sample_id) == ("x1", "a b.png", 'Calanus "big"\tone', 's "1"')
    (folder / "ecotaxa_q.tsv").write_text("object_id\timg_file_name\tobject_id\nx\ta b.png\tx\n", encoding="utf-8")
    with Export(folder) as exp, pytest.raises(UserError, match="'object_id' twice"):
        exp.rows()
    (folder / "ecotaxa_q.tsv").write_text("object_id\tsample_id\nx\ts\n", encoding="utf-8")
    with Export(folder) as exp, pytest.raises(UserError, match="no img_file_name column"):
        exp.rows()
    (folder / "ecotaxa_q.tsv").unlink()
    with pytest.raises(UserError, match="no ecotaxa"):
        Export(folder)


@pytest.mark.parametrize("img", ["../outside.png", "/etc/hostname", "sub/../../outside.png", "C:\\x.png"])
def test_image_paths_leaving_the_export_are_refused(tmp_path, img):
    folder = tmp_path / "e"
    folder.mkdir()
    (tmp_path / "outside.png").write_bytes(b"x")
    (folder / "ecotaxa_x.tsv").write_text(f"object_id\timg_file_name\no1\t{img}\n", encoding="utf-8")
    with Export(folder) as exp, pytest.raises(UserError, match="leaves the export|outside the export"):
        exp.rows()


def test_symlink_out_of_a_folder_export_is_refused(tmp_path):
    folder = tmp_path / "e"
    folder.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    (folder / "ecotaxa_x.tsv").write_text("object_id\timg_file_name\no1\tlink.png\n", encoding="utf-8")
    with Export(folder) as exp, pytest.raises(UserError, match="outside the export"):
        exp.rows()


def test_zip_slip_member_is_refused(tmp_path):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ecotaxa_x.tsv", "object_id\timg_file_name\no1\ta.png\n")
        zf.writestr("../../a.png", b"x")
    with pytest.raises(UserError, match="leaves the archive"):
        Export(path)


def test_zip_member_names_without_the_utf8_flag():
    info = zipfile.ZipInfo("Station é1/a.png".encode("utf-8").decode("cp437"))
    info.flag_bits = 0
    assert _member_name(info) == "Station é1/a.png"


# ============================================================================ writing


def _images(folder: Path) -> list[Path]:
    """Images in every format stage 07 reads that EcoTaxa does not, plus the three it takes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (11, 9), dtype=np.uint8)
    deep = rng.integers(0, 65536, (7, 5), dtype=np.uint16)
    made = {
        "rgb.bmp": Image.fromarray(rgb), "grey.bmp": Image.fromarray(grey),
        "pal.bmp": Image.fromarray(grey).convert("P"), "rgb.tif": Image.fromarray(rgb),
        "grey.tiff": Image.fromarray(grey), "deep.tif": Image.fromarray(deep),
        "rgba.webp": Image.fromarray(np.dstack([rgb, rgb[..., 0]])), "plain.png": Image.fromarray(grey),
        "photo.jpg": Image.fromarray(rgb), "anim.gif": Image.fromarray(grey).convert("P"),
    }
    out = []
    for name, im in made.items():
        p = folder / name
        im.save(p, lossless=True) if name.endswith(".webp") else im.save(p)
        out.append(p)
    return out


def _preds(paths: list[Path], root: Path, labels=None) -> list[Prediction]:
    return [Prediction(str(p), p.relative_to(root).as_posix(), p.parent.name if p.parent != root else "top",
                       (labels or {}).get(p.name, "zero<even"), {"similarity": 0.5 + i / 100, "margin": float("nan")})
            for i, p in enumerate(paths)]


def test_bundle_layout_formats_and_lossless_png(tmp_path):
    root = tmp_path / "in"
    paths = _images(root / "Station é")
    res = write_bundle(tmp_path / "out", "cruise 42", _preds(paths, root, {"plain.png": None}))
    assert res.path == tmp_path / "out" / "ecotaxa_cruise_42.zip" and res.rows == len(paths)
    raw, header, types, rows, zf = _read_bundle(res.path)
    assert raw.startswith(codecs.BOM_UTF8)
    assert types == [{"img_rank": "[f]", "object_similarity": "[f]", "object_margin": "[f]"}.get(h, "[t]")
                     for h in header]
    assert header[:5] == ["img_file_name", "img_rank", "object_id", "object_annotation_category",
                          "object_annotation_status"]
    names = set(zf.namelist())
    by_source = {r["object_source_file"]: r for r in rows}
    for p in paths:
        r = by_source[p.relative_to(root).as_posix()]
        assert r["img_file_name"] in names  # each image at its img_file_name, beside the TSV
        data = zf.read(r["img_file_name"])
        with Image.open(io.BytesIO(data)) as im:
            assert im.format in ("JPEG", "PNG", "GIF")
        if p.suffix in (".png", ".jpg", ".gif"):
            assert data == p.read_bytes() and r["img_file_name"] == f"Station é/{p.name}"
        else:  # converted: pixel for pixel, the name says PNG
            assert r["img_file_name"].endswith(".png") and r["img_file_name"].startswith("Station é/" + p.stem)
            with Image.open(p) as src:
                src.load()
                want = np.asarray(src.convert("RGBA") if src.mode == "P" else src)
            mode, size, got = _pixels(data)
            got = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")) if mode == "P" else got
            assert got.shape == want.shape and np.array_equal(got.astype(np.int64), want.astype(np.int64)), p.name
    assert sorted(s for s, _ in res.converted) == sorted(p.relative_to(root).as_posix() for p in paths
                                                        if p.suffix not in (".png", ".jpg", ".gif"))
    assert res.lossy == [] and res.skipped == []
    unknown = by_source["Station é/plain.png"]
    assert unknown["object_annotation_category"] == "" and unknown["object_annotation_status"] == ""
    known = by_source["Station é/rgb.bmp"]
    assert known["object_annotation_status"] == "predicted" and known["object_annotation_category"] == "zero<even"
    assert known["sample_id"] == "cruise_42_Station é" and known["object_id"].startswith("cruise_42_rgb_")
    assert known["object_similarity"] == "0.5" and known["object_margin"] == ""
    assert res.unmatched_classes == ["zero<even"]


def test_names_ecotaxa_cannot_carry_are_renamed_never_dropped(tmp_path):
    root = tmp_path / "in"
    (root / "s").mkdir(parents=True)
    png = io.BytesIO()
    Image.new("L", (5, 5), 7).save(png, format="PNG")
    deep = "/".join(["d" * 100] * 3)  # a path longer than img_file_name's 255 characters
    odd = ["tab\there.png", "new\nline.png", 'quote".png', "back\\slash.png", "png_named.jpg", "jpeg.jfif",
           f"{deep}/x.png", "fine é.png", "no_extension"]
    paths = []
    for n in odd:
        p = root / "s" / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(png.getvalue())
        paths.append(p)
    res = write_bundle(tmp_path / "out", "p", _preds(paths, root))
    assert res.rows == len(odd) and not res.skipped
    _, _, _, rows, zf = _read_bundle(res.path)
    got = {r["object_source_file"]: r["img_file_name"] for r in rows}
    assert len(set(got.values())) == len(odd)
    renamed = {s: why for s, _, why in res.renamed}
    assert "longer than 255" in renamed[f"s/{deep}/x.png"]
    assert set(renamed) == {f"s/{n}" for n in odd if n != "fine é.png"}
    assert got["s/fine é.png"] == "s/fine é.png"
    assert "PNG written as .png" in renamed["s/png_named.jpg"] and got["s/png_named.jpg"].endswith(".png")
    for name in got.values():
        assert name in zf.namelist() and len(name) <= 255
        assert not any(c in name for c in '\t\n\r"\\') and ".." not in name.split("/")
    # the long path's source is cut to the free column's 250 characters, keeping its end
    assert f"s/{deep}/x.png"[-250:] in got


def test_ids_stable_across_order_and_runs_unique_across_prefixes(tmp_path):
    root = tmp_path / "in"
    paths = _images(root / "st")
    Image.new("L", (4, 4), 1).save(root / "st" / "a b.png")
    Image.new("L", (4, 4), 1).save(root / "st" / "a_b.png")  # same content, a name the old ids merged
    paths += [root / "st" / "a b.png", root / "st" / "a_b.png"]
    preds = _preds(paths, root)

    def ids(folder, items, **kw):
        res = write_bundle(tmp_path / folder, "run", items, **kw)
        _, _, _, rows, _ = _read_bundle(res.path)
        return {r["object_source_file"]: (r["object_id"], r["sample_id"], r["img_file_name"]) for r in rows}, res

    first, res1 = ids("a", preds)
    shuffled = preds[:]
    random.Random(3).shuffle(shuffled)
    second, _ = ids("b", shuffled)
    assert first == second
    assert len({v[0] for v in first.values()}) == len(paths)
    again, res3 = ids("c", preds)
    assert res3.path.read_bytes() == res1.path.read_bytes()  # a rerun writes the same bytes
    other, _ = ids("d", preds, prefix="cruise43")
    assert not {v[0] for v in other.values()} & {v[0] for v in first.values()}
    assert not {v[1] for v in other.values()} & {v[1] for v in first.values()}


def test_taxa_map_ids_names_and_checks(tmp_path):
    root = tmp_path / "in"
    paths = _images(root / "st")[:4]
    labels = {paths[0].name: "zero<even", paths[1].name: "one<odd", paths[2].name: "Copepoda_type1",
              paths[3].name: None}
    tm = tmp_path / "taxa.csv"
    tm.write_text("class,taxon\nzero<even,25828\none<odd,Calanus<Calanidae\nghost,12\n", encoding="utf-8")
    taxa = read_taxa_map(tm)
    assert taxa.check(["zero<even", "one<odd", "Copepoda_type1"]) == [
        f"inference.ecotaxa_taxa: {tm} maps 'ghost', which is not a trained class",
        f"inference.ecotaxa_taxa: {tm} has no line for the trained class 'Copepoda_type1': written as it is, "
        "EcoTaxa must match it by name"]
    res = write_bundle(tmp_path / "out", "p", _preds(paths, root, labels), taxa=taxa)
    _, header, types, rows, _ = _read_bundle(res.path)
    assert types[header.index("object_annotation_category_id")] == "[f]"
    by = {r["object_source_file"]: r for r in rows}
    r0, r1, r2, r3 = (by[p.relative_to(root).as_posix()] for p in paths)
    assert (r0["object_annotation_category"], r0["object_annotation_category_id"]) == ("zero<even", "25828")
    assert (r1["object_annotation_category"], r1["object_annotation_category_id"]) == ("Calanus<Calanidae", "")
    assert (r2["object_annotation_category"], r2["object_annotation_category_id"]) == ("Copepoda_type1", "")
    assert (r3["object_annotation_category"], r3["object_annotation_status"]) == ("", "")
    assert res.unmatched_classes == ["Copepoda_type1"]
    tm.write_text("class,taxon\na,1\na,2\n", encoding="utf-8")
    with pytest.raises(UserError, match="listed twice"):
        read_taxa_map(tm)


def test_predict_on_an_export_keeps_its_ids_for_update_mode(tmp_path, digits):
    path, truth = make_export(tmp_path / "e.zip", digits, as_zip=True)
    with Export(path) as exp:
        rows = exp.rows()
        preds = [Prediction(r.image, r.image, r.sample_id, "nine<odd", {"similarity": 0.9}, origin=r) for r in rows]
        res = write_bundle(tmp_path / "out", "update", preds, open_image=exp.open)
    _, header, _, out, zf = _read_bundle(res.path)
    human = {r.object_id for r in rows if r.status in ("validated", "dubious")}
    assert len(res.skipped) == len(human) == 10 and all("validated in EcoTaxa" in w for _, w in res.skipped)
    assert {r["object_id"] for r in out} == set(truth.objects) - human
    for r in out:
        cat, status, sample, image = truth.objects[r["object_id"]]
        assert r["sample_id"] == sample and r["acq_id"] == f"{sample}_acq"
        assert r["sample_station"] == f"station «{sample}»" and r["object_source_file"] == image
        assert zf.read(r["img_file_name"])[:4] == b"\x89PNG"
    assert "object_area" not in header and "object_annotation_person_name" not in header
    res = write_bundle(tmp_path / "out2", "update", preds, open_image=Export(path).open, overwrite_validated=True)
    assert res.rows == 30


def test_bundle_round_trip_through_the_reader(tmp_path, digits):
    root = tmp_path / "in"
    paths = _images(root / "Station é")
    labels = {p.name: category(i % 10) for i, p in enumerate(paths)}
    res = write_bundle(tmp_path / "out", "rt", _preds(paths, root, labels))
    with Export(res.path) as exp:
        rows = exp.rows()
        sel = select(rows, exp, statuses=["predicted"], verify_images=True)
        assert not sel.skipped and len(sel.used) == len(paths)
        got = {r.fields.get("sample_id", r.sample_id) for r in rows}
        assert got == {"rt_Station é"}
        assert sorted(c for _, c in sel.used) == sorted(labels.values())


def test_bundle_memory_does_not_grow_with_the_images(tmp_path):
    """Peak traced memory for 2,000 images stays within per-image bookkeeping of the 200-image
    peak: a full copy of the images would add 1,800 x ~12 kB."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    payload = buf.getvalue()
    assert len(payload) > 12_000

    def peak(n: int) -> int:
        preds = (Prediction(f"p{i}", f"s{i % 7}/img_{i:05d}.png", f"s{i % 7}", "a", {"similarity": 0.5})
                 for i in range(n))
        tracemalloc.start()
        try:
            write_bundle(tmp_path / f"m{n}", "mem", preds, open_image=lambda _p: io.BytesIO(payload))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(200), peak(2000)
    assert large - small < 1800 * 3_000, (small, large)


def test_unreadable_input_is_listed_not_written(tmp_path):
    root = tmp_path / "in"
    (root / "s").mkdir(parents=True)
    (root / "s" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    Image.new("L", (4, 4)).save(root / "s" / "ok.png")
    res = write_bundle(tmp_path / "out", "p", _preds([root / "s" / "bad.png", root / "s" / "ok.png"], root))
    assert res.rows == 1 and res.skipped[0][0] == "s/bad.png" and "cannot decode" in res.skipped[0][1]
    assert " at 0x" not in res.skipped[0][1], res.skipped  # no memory address: the same text on every run


def test_modes_png_cannot_hold_are_listed_as_lossy(tmp_path):
    root = tmp_path / "in"
    (root / "s").mkdir(parents=True)
    rng = np.random.default_rng(2)
    ints = rng.integers(0, 65536, (6, 7)).astype(np.int32)
    Image.fromarray(ints, mode="I").save(root / "s" / "int32.tif")             # fits 16 bits: lossless
    Image.fromarray(rng.random((6, 7)).astype(np.float32), mode="F").save(root / "s" / "float.tif")
    Image.new("CMYK", (5, 5), (10, 20, 30, 40)).save(root / "s" / "cmyk.tif")
    frames = [Image.new("L", (5, 5), v) for v in (10, 200)]
    frames[0].save(root / "s" / "pages.tif", save_all=True, append_images=frames[1:])
    paths = sorted((root / "s").iterdir())
    res = write_bundle(tmp_path / "out", "p", _preds(paths, root))
    assert res.rows == 4 and len(res.converted) == 4
    lossy = dict(res.lossy)
    assert set(lossy) == {"s/float.tif", "s/cmyk.tif", "s/pages.tif"}
    assert "float" in lossy["s/float.tif"] and "CMYK" in lossy["s/cmyk.tif"] and "first of 2" in lossy["s/pages.tif"]
    _, _, _, rows, zf = _read_bundle(res.path)
    (int_row,) = [r for r in rows if r["object_source_file"] == "s/int32.tif"]
    assert np.array_equal(_pixels(zf.read(int_row["img_file_name"]))[2].astype(np.int64), ints)


def test_file_names_that_are_not_utf8(tmp_path):
    root = tmp_path / "in"
    (root / "s").mkdir(parents=True)
    p = Path(os.fsdecode(bytes(root / "s") + b"/caf\xe9.png"))  # latin-1 bytes in a UTF-8 file system
    Image.new("L", (4, 4), 9).save(p, format="PNG")
    res = write_bundle(tmp_path / "out", "p", [Prediction(str(p), "s/" + p.name, "s\udce9", "a")])
    _, _, _, rows, zf = _read_bundle(res.path)
    assert res.rows == 1 and rows[0]["img_file_name"].startswith("s/caf_") and "not UTF-8" in res.renamed[0][2]
    assert rows[0]["img_file_name"] in zf.namelist() and rows[0]["sample_id"] == "p_s\ufffd"
    assert rows[0]["object_source_file"] == "s/caf\ufffd.png"


# ----------------------------------------------------------------------------- the stages' entry points


def test_is_export_looks_where_ecotaxa_writes_tsvs_only(tmp_path, digits):
    from common.ecotaxa.export import is_export

    general, _ = make_export(tmp_path / "general", digits)
    backup, _ = make_export(tmp_path / "backup", digits, layout="backup")
    assert is_export(general) and is_export(backup) and not is_export(digits)
    deep = tmp_path / "classes" / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "ecotaxa_old.tsv").write_text("object_id\n")  # a stray TSV deep in a class folder
    assert not is_export(tmp_path / "classes") and not is_export(tmp_path / "missing")


@pytest.mark.parametrize("as_zip", [False, True])
def test_export_inputs_keep_each_object_and_unpack_a_zip_once(tmp_path, digits, as_zip):
    from common.ecotaxa.rows import export_inputs

    src, truth = make_export(tmp_path / ("e.zip" if as_zip else "e"), digits, extra_image=True, as_zip=as_zip)
    dest = tmp_path / "unpacked"
    inp = export_inputs(src, dest)
    assert len(inp.images) == len(truth.objects) and not inp.others  # one image per object, every status
    for p in inp.images:
        row = inp.origins[p]
        assert Path(p).is_file() and inp.samples[p] == truth.objects[row.object_id][2]
        assert row.fields["acq_instrument"] == "zooscan"
        assert (dest in Path(p).parents) == as_zip
    if as_zip:
        first = Path(inp.images[0])
        before = first.stat().st_mtime_ns
        again = export_inputs(src, dest)  # a rerun copies nothing again
        assert again.images == inp.images and first.stat().st_mtime_ns == before
        assert export_inputs(src, None).images  # the check phase: read only
        assert not any(dest.rglob("*.tsv"))


def test_export_inputs_list_missing_images(tmp_path, digits):
    from common.ecotaxa.rows import export_inputs

    src, truth = make_export(tmp_path / "e", digits)
    gone = next(iter(truth.objects.values()))[3]
    (src / gone).unlink()
    inp = export_inputs(src, None)
    assert len(inp.images) == len(truth.objects) - 1
    assert [o for o, _ in inp.others] == [f"{src}:{gone}"] and "not in the export" in inp.others[0][1]


def test_gallery_extra_takes_an_export_folder_not_a_zip(tmp_path, digits):
    from types import SimpleNamespace

    from common.data.extras import list_extras
    from common.ecotaxa.rows import export_extras_of

    src, truth = make_export(tmp_path / "e", digits)
    cmap = tmp_path / "map.csv"
    cmap.write_text("category,class\nzero<even,zero\n*,-\n", encoding="utf-8")
    d = SimpleNamespace(ecotaxa_status=["validated"], class_map=str(cmap), ecotaxa_level=None)
    got = list_extras([src], export=lambda p: export_extras_of(p, d))
    want = [o for o in truth.objects.values() if o[1] == "validated" and o[0] == "zero<even"]
    assert [e.label for e in got] == ["zero"] * len(want) and all(Path(e.path).is_file() for e in got)
    assert export_extras_of(digits, d) is None  # a class folder: not an export
    zipped, _ = make_export(tmp_path / "z.zip", digits, as_zip=True)
    with pytest.raises(UserError, match="is a zip: unzip it"):
        list_extras([zipped], export=lambda p: export_extras_of(p, d))
