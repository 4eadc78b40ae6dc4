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
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..fileio import atomic_open
from .thumbs import THUMB_PX

log = logging.getLogger(__name__)


# Presentation constants (the page's look, not results).
THUMB_QUALITY = 80  # JPEG quality of thumbnails
STRIP_MAX = 8  # misclassified queries shown per worst class


# ----------------------------------------------------------------------------- data URIs


def file_data_uri(path: Path, mime: str = "image/png") -> str:
    """A whole (small) file as a base64 data URI."""
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def thumbnail_data_uri(path: str | Path, px: int = THUMB_PX) -> str | None:
    """A small JPEG thumbnail of an image as a data URI, or None when it cannot be read."""
    from .thumbs import thumbnail

    return thumbnail(path, px, "JPEG", THUMB_QUALITY).uri


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
    strips: list[tuple[str, str, list[StripItem]]] = field(default_factory=list)  # (class or "", note, items)
    strips_title: str = "Worst classes: misclassified queries beside their nearest gallery image"
    extra_tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pixel_size_um: float | None = None  # the camera's pixel size: image sizes in micrometres too


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
.figs{display:flex;gap:4px;justify-content:center}
figure{margin:0;width:126px;display:flex;flex-direction:column;align-items:center}/* THUMB_PX + 30 */
figcaption{color:#555;white-space:nowrap}
.box{position:relative;display:flex;align-items:center;justify-content:center;background:#e6e6e6}
.box img{display:block}.box.shrunk{outline:2px dashed #c60}
.bar{position:absolute;left:3px;bottom:3px;height:3px;background:#d00;border:1px solid #fff}
.num{white-space:nowrap}
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
        out.append(_strips(rep))
    for heading, header, rows in rep.extra_tables:
        out.append(f"<h2>{esc(heading)}</h2>\n" + table(header, rows))
    out.append("</body>\n</html>\n")
    return "".join(out)


def _strips(rep: Report) -> str:
    """The neighbour strips: every thumbnail at one scale (``common.thumbs``), its pixel size below."""
    from .thumbs import common_scale, size_text, thumbnail

    paths = {p for _, _, items in rep.strips for it in items for p in (it.query_path, it.neighbour_path) if p}
    thumbs = {p: thumbnail(p, THUMB_PX, "JPEG", THUMB_QUALITY) for p in sorted(paths)}
    scale = common_scale([(t.width, t.height) for t in thumbs.values() if t.uri], THUMB_PX, rep.pixel_size_um)

    def fig(path: str | None, alt: str) -> str:
        t = thumbs.get(path) if path else None
        if t is None or t.uri is None:
            return f'<span class="missing">{esc(alt)} ({"unreadable" if path else "none"})</span>'
        w, h, to_scale = scale.fit(t.width, t.height)
        shrunk = '' if to_scale else ' shrunk" title="shrunk to fit: not at the common scale'
        box = (f'<span class="box{shrunk}" style="width:{THUMB_PX}px;height:{THUMB_PX}px">'
               f'<img src="{t.uri}" alt="{esc(alt)}" style="width:{w:.1f}px;height:{h:.1f}px">'
               f'<i class="bar" style="width:{scale.bar(t.width, t.height):.1f}px"></i></span>')
        lines = "".join(f"<figcaption>{esc(x)}</figcaption>" for x in size_text(t.width, t.height,
                                                                              rep.pixel_size_um).split(" · "))
        return f"<figure>{box}{lines}</figure>"

    out = [f"<h2>{esc(rep.strips_title)}</h2>\n",
           f'<p class="note">Every thumbnail is drawn at one scale, so sizes compare: the red bar is '
           f'{esc(scale.bar_label)}; a dashed frame marks an image too large for it, shrunk to fit (its bar is '
           f'shorter). Below each image: its size in pixels{" and micrometres" if rep.pixel_size_um else ""}.</p>\n']
    for cls_name, note, items in rep.strips:
        if cls_name:
            out.append(f"<h3>{esc(cls_name)}</h3>\n")
        if note:
            out.append(f'<p class="note">{esc(note)}</p>\n')
        out.append('<div class="strip">\n')
        for it in items:
            q = fig(it.query_path, f"query {Path(it.query_path).name}")
            g = fig(it.neighbour_path, f"gallery {Path(it.neighbour_path).name}" if it.neighbour_path else "neighbour")
            cap = (f"true {esc(it.true_label)}<br>" if it.true_label else "") + (
                f'predicted {esc(it.predicted)} <span class="num">({it.similarity:.3f})</span><br>'
                f"nearest: {esc(it.neighbour_label or '–')}")
            out.append(f'<div class="pair"><div class="figs">{q}{g}</div>{cap}</div>\n')
        out.append("</div>\n")
    return "".join(out)


def write_report(path: Path, rep: Report) -> Path:
    """Render ``rep`` and write it atomically to ``path``."""
    text = render(rep)
    with atomic_open(path, "w") as fh:
        fh.write(text)
    log.debug("report: %s (%.1f MB)", path, len(text) / 1e6)
    return path
