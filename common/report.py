"""Stage 07's pictures and its one-page, self-contained HTML report.

- ``confusion_matrix_png``: row-normalised; the figure grows with the number of classes, tick
  labels shrink, and per-cell numbers are drawn only when there are few classes, so 90 classes
  stay legible.
- ``embedding_map_png``: a 2-D map (t-SNE or PCA, scikit-learn) of test embeddings coloured by
  class, subsampled for t-SNE.
- ``write_report``: one HTML file; every picture is embedded as a base64 data URI (thumbnails
  are small JPEGs) so the page can be mailed or archived alone. All text is HTML-escaped.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .fileio import atomic_open

log = logging.getLogger(__name__)

# Presentation constants (the page's look, not results).
THUMB_PX = 96  # longest side of an embedded thumbnail
THUMB_QUALITY = 80  # JPEG quality of thumbnails
STRIP_MAX = 8  # misclassified queries shown per worst class


# ----------------------------------------------------------------------------- data URIs


def file_data_uri(path: Path, mime: str = "image/png") -> str:
    """A whole (small) file as a base64 data URI."""
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def thumbnail_data_uri(path: str | Path, px: int = THUMB_PX) -> str | None:
    """A small JPEG thumbnail of an image as a data URI, or None when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    from .data import upright

    try:
        with Image.open(path) as im:
            im.draft("RGB", (px * 2, px * 2))  # fast JPEG downscale on decode
            im = upright(im).convert("RGB")  # EXIF orientation applied, as the network sees it
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=THUMB_QUALITY)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        log.debug("no thumbnail for %s: %s", path, e)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- HTML


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(v: Any) -> str:
    """Numbers to 4 significant decimals, everything else as text."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return esc(v)
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "–"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    return esc(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """An HTML table; cells are formatted with ``fmt`` (escaped)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in r) + "</tr>\n" for r in rows)
    c = f' class="{esc(cls)}"' if cls else ""
    return f"<table{c}><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>\n"


def img_tag(uri: str | None, alt: str, cls: str = "") -> str:
    c = f' class="{esc(cls)}"' if cls else ""
    if uri is None:
        return f'<span class="missing"{c}>{esc(alt)} (unreadable)</span>'
    return f'<img src="{uri}" alt="{esc(alt)}"{c}>'


@dataclass
class StripItem:
    """One misclassified query beside its nearest gallery image."""

    query_path: str
    true_label: str
    predicted: str
    similarity: float
    neighbour_path: str | None
    neighbour_label: str | None


@dataclass
class Report:
    """Everything the page shows; sections with no data are left out."""

    title: str
    facts: list[tuple[str, Any]] = field(default_factory=list)  # run, model, gallery, ...
    metrics: dict[str, Any] = field(default_factory=dict)
    comparison: tuple[list[str], list[list[Any]]] | None = None
    comparison_note: str = ""
    images: list[tuple[str, Path, str]] = field(default_factory=list)  # (heading, png path, caption)
    per_class: tuple[list[str], list[list[Any]]] | None = None
    strips: list[tuple[str, str, list[StripItem]]] = field(default_factory=list)  # (class, note, items)
    extra_tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:2px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
img.plot{max-width:100%;height:auto;border:1px solid #eee}
.strip{display:flex;flex-wrap:wrap;gap:10px;margin:.4em 0 1em}
.pair{border:1px solid #ddd;padding:4px;font-size:.75em;text-align:center;background:#fafafa}
.pair img{width:96px;height:96px;object-fit:contain;background:#000;margin:1px}
.missing{display:inline-block;width:96px;height:96px;background:#ccc;font-size:.7em}
.note{color:#555;font-size:.9em}
"""


def render(rep: Report) -> str:
    """The report as one HTML string."""
    out: list[str] = ["<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
                      f"<title>{esc(rep.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n",
                      f"<h1>{esc(rep.title)}</h1>\n"]
    stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    out.append(f'<p class="note">Generated {esc(stamp)}.</p>\n')
    if rep.facts:
        out.append("<h2>Run</h2>\n" + table(["", "value"], [[k, v] for k, v in rep.facts]))
    if rep.metrics:
        out.append("<h2>Metrics</h2>\n" + table(["metric", "value"],
                                                 [[k, v] for k, v in rep.metrics.items()
                                                  if isinstance(v, (int, float, str)) or v is None]))
    for n in rep.notes:
        out.append(f'<p class="note">{esc(n)}</p>\n')
    if rep.comparison is not None:
        out.append("<h2>Retrieval and classical classifiers on the same frozen features</h2>\n")
        out.append(table(*rep.comparison))
        if rep.comparison_note:
            out.append(f'<p class="note">{esc(rep.comparison_note)}</p>\n')
    for heading, png, caption in rep.images:
        if png is None or not Path(png).is_file():
            continue
        out.append(f"<h2>{esc(heading)}</h2>\n")
        out.append(img_tag(file_data_uri(png), heading, "plot") + "\n")
        if caption:
            out.append(f'<p class="note">{esc(caption)}</p>\n')
    if rep.per_class is not None:
        out.append("<h2>Per class</h2>\n" + table(*rep.per_class))
    if rep.strips:
        out.append("<h2>Worst classes: misclassified queries beside their nearest gallery image</h2>\n")
        for cls_name, note, items in rep.strips:
            out.append(f"<h3>{esc(cls_name)}</h3>\n")
            if note:
                out.append(f'<p class="note">{esc(note)}</p>\n')
            out.append('<div class="strip">\n')
            for it in items:
                q = img_tag(thumbnail_data_uri(it.query_path), f"query {Path(it.query_path).name}")
                g = (img_tag(thumbnail_data_uri(it.neighbour_path), f"gallery {Path(it.neighbour_path).name}")
                     if it.neighbour_path else '<span class="missing">no neighbour</span>')
                cap = (f"true {esc(it.true_label)}<br>" if it.true_label else "") + (
                    f"predicted {esc(it.predicted)} ({it.similarity:.3f})<br>nearest: {esc(it.neighbour_label or '–')}")
                out.append(f'<div class="pair">{q}{g}<br>{cap}</div>\n')
            out.append("</div>\n")
    for heading, header, rows in rep.extra_tables:
        out.append(f"<h2>{esc(heading)}</h2>\n" + table(header, rows))
    out.append("</body>\n</html>\n")
    return "".join(out)


def write_report(path: Path, rep: Report) -> Path:
    """Render ``rep`` and write it atomically to ``path``."""
    text = render(rep)
    with atomic_open(path, "w") as fh:
        fh.write(text)
    log.debug("report: %s (%.1f MB)", path, len(text) / 1e6)
    return path


# ----------------------------------------------------------------------------- review page (predict mode)


@dataclass
class ReviewItem:
    """One query of the review page: its call, its scores, why it is doubtful, its neighbours."""

    query_path: str
    sample: str
    predicted: str
    similarity: float
    margin: float
    knn_similarity: float
    reasons: list[str]  # "unknown", "low similarity", "small margin"; empty = not doubtful
    neighbours: list[tuple[str, str, float]]  # (gallery path, class, similarity), nearest first


@dataclass
class Review:
    """``review.html``: the items (most doubtful first) and a line saying what is shown."""

    title: str
    note: str
    items: list[ReviewItem]


_REVIEW_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1em;color:#222}
h1{font-size:1.4em}.note{color:#555;font-size:.9em}
.filters{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd;z-index:1}
.filters label{margin-right:1.5em}
table{border-collapse:collapse;font-size:.8em}td,th{border:1px solid #ddd;padding:3px;vertical-align:top}
tr.doubtful td.call{background:#fff3e0}tr.unknown td.call{background:#fde0e0}
figure{display:inline-block;margin:0;text-align:center;width:100px}
figure img{width:96px;height:96px;object-fit:contain;background:#000}
figcaption{font-size:.85em;word-break:break-all}
.missing{display:inline-block;width:96px;height:96px;background:#ccc;font-size:.7em}
"""

# Filters by predicted class, sample and doubt: show or hide rows, count what is shown (the
# page's only script; no library, no network).
_REVIEW_JS = """
(function () {
  var c = document.getElementById("f-class"), s = document.getElementById("f-sample"),
      d = document.getElementById("f-doubtful"), out = document.getElementById("shown");
  function apply() {
    var n = 0, rows = document.querySelectorAll("tr.item");
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i];
      var ok = (!c.value || r.getAttribute("data-class") === c.value) &&
               (!s.value || r.getAttribute("data-sample") === s.value) &&
               (!d.checked || r.getAttribute("data-doubtful") === "1");
      r.style.display = ok ? "" : "none";
      if (ok) { n++; }
    }
    out.textContent = n + " of " + rows.length + " shown";
  }
  c.addEventListener("change", apply); s.addEventListener("change", apply); d.addEventListener("change", apply);
  // a link may preset the filters: review.html#class=NAME&sample=NAME&doubtful=1
  var h = window.location.hash.replace(/^#/, "").split("&");
  for (var j = 0; j < h.length; j++) {
    var kv = h[j].split("="), v = decodeURIComponent(kv[1] || "");
    if (kv[0] === "class") { c.value = v; } else if (kv[0] === "sample") { s.value = v; }
    else if (kv[0] === "doubtful") { d.checked = v === "1"; }
  }
  apply();
})();
"""


def _options(element_id: str, label: str, values: Sequence[str]) -> str:
    opts = '<option value="">all</option>' + "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in values)
    return f'<label>{esc(label)} <select id="{element_id}">{opts}</select></label>'


def render_review(rev: Review) -> str:
    """``review.html`` as one string: every image is a data URI (thumbnails), no external file."""
    cache: dict[str, str | None] = {}

    def thumb(path: str, alt: str) -> str:
        if path not in cache:
            cache[path] = thumbnail_data_uri(path)
        return img_tag(cache[path], alt)

    out = ["<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
           f"<title>{esc(rev.title)}</title>\n<style>{_REVIEW_CSS}</style>\n</head>\n<body>\n",
           f"<h1>{esc(rev.title)}</h1>\n<p class=\"note\">{esc(rev.note)}</p>\n",
           '<div class="filters">', _options("f-class", "Predicted class", sorted({i.predicted for i in rev.items})),
           _options("f-sample", "Sample", list(dict.fromkeys(i.sample for i in rev.items))),
           '<label><input type="checkbox" id="f-doubtful"> doubtful only</label>',
           '<span id="shown"></span></div>\n',
           '<table id="review">\n<thead><tr><th>#</th><th>query</th><th>call</th>'
           + "".join(f"<th>neighbour {j}</th>" for j in range(1, 6)) + "</tr></thead>\n<tbody>\n"]
    for n, it in enumerate(rev.items, start=1):
        cls = "item" + (" doubtful" if it.reasons else "") + (" unknown" if "unknown" in it.reasons else "")
        margin = "–" if not math.isfinite(it.margin) else f"{it.margin:.3f}"
        call = (f"<b>{esc(it.predicted)}</b><br>similarity {it.similarity:.3f}<br>margin {margin}<br>"
                f"k-th neighbour {it.knn_similarity:.3f}<br>sample {esc(it.sample)}"
                + (f"<br><i>{esc(', '.join(it.reasons))}</i>" if it.reasons else ""))
        cells = [f"<td>{n}</td>",
                 f"<td><figure>{thumb(it.query_path, 'query')}<figcaption>{esc(Path(it.query_path).name)}"
                 "</figcaption></figure></td>", f'<td class="call">{call}</td>']
        for path, label, sim in it.neighbours:
            cells.append(f"<td><figure>{thumb(path, 'gallery ' + label)}<figcaption>{esc(label)} {sim:.3f}"
                         "</figcaption></figure></td>")
        cells += ["<td></td>"] * (5 - len(it.neighbours))
        out.append(f'<tr class="{cls}" data-class="{esc(it.predicted)}" data-sample="{esc(it.sample)}" '
                   f'data-doubtful="{1 if it.reasons else 0}">' + "".join(cells) + "</tr>\n")
    out.append(f"</tbody>\n</table>\n<script>{_REVIEW_JS}</script>\n</body>\n</html>\n")
    return "".join(out)


def write_review(path: Path, rev: Review) -> Path:
    """Render ``rev`` and write ``review.html`` atomically."""
    text = render_review(rev)
    with atomic_open(path, "w") as fh:
        fh.write(text)
    log.debug("review: %s (%.1f MB, %d images)", path, len(text) / 1e6, len(rev.items))
    return path
