"""The one HTML writer of lossfloor: every page, a dashboard or a single figure, is standalone and offline.

    page_html(title, [Section("J*", [fig, "<p>html</p>"])])     # sections of figures and HTML blocks
    figure_page(fig)                                            # one figure as a page
    write_page(text, "page.html"); write_html(fig, "jstar.html")  # atomic, folders created
    is_offline_html(text)                                       # plotly.js embedded, nothing loaded

`page_html` lays out sections around ONE embedded copy of plotly.js (no CDN: pages open offline), so a page opens
offline. A page reports whether it rendered: `<body data-rendered="ok: N plots">` once every
`Plotly.newPlot` promise has resolved, or `data-rendered="error: ..."` plus a red banner on the first
script error (what the headless browser test reads).
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lossfloor.atomic import write_output
from lossfloor.pages.layout import DEFAULT_HEIGHT

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 0 auto;
       max-width: 1280px; padding: 16px 24px 64px; color: #222; background: #fff; }
h1 { font-size: 1.6em; margin: 0.4em 0; } h2 { font-size: 1.25em; margin: 1.6em 0 0.4em;
       border-bottom: 1px solid #ddd; padding-bottom: 4px; }
nav a { margin-right: 1.2em; } .about { color: #555; font-size: 0.85em; }
.about dt { font-weight: 600; float: left; clear: left; width: 10em; } .about dd { margin-left: 10.5em; }
.note { color: #555; font-size: 0.9em; }
table.fits { border-collapse: collapse; font-size: 0.85em; width: 100%; }
.table-wrap { overflow-x: auto; }
table.fits th, table.fits td { border: 1px solid #ddd; padding: 4px 6px; text-align: left; vertical-align: top; }
table.fits td:nth-child(-n+2) { white-space: nowrap; }
table.claims { border-collapse: collapse; font-size: 0.85em; width: 100%; table-layout: fixed; }
table.claims th, table.claims td { border: 1px solid #ddd; padding: 4px 6px; text-align: left; vertical-align: top; }
table.claims th { background: #f4f4f4; }
table.fits th { background: #f4f4f4; } table.fits tr.first td { border-top: 2px solid #999; }
#render-error { display: none; background: #fdd; color: #900; padding: 8px; border: 1px solid #c00; }
"""

# Runs first in <body>, after plotly.js: records every Plotly.newPlot promise and script error, then
# marks <body data-rendered> (what the headless browser test reads) and shows errors in a red banner.
RENDER_STATUS_JS = """
(function () {
  var pending = [], errors = [];
  function mark() {
    if (errors.length) {
      document.body.dataset.rendered = "error: " + errors.join(" | ");
      var box = document.getElementById("render-error");
      if (box) { box.textContent = "This page failed to render: " + errors.join(" | "); box.style.display = "block"; }
    }
  }
  window.addEventListener("error", function (e) { errors.push(String(e.message || e)); mark(); });
  window.addEventListener("unhandledrejection", function (e) { errors.push(String(e.reason)); mark(); });
  if (typeof Plotly === "undefined") { errors.push("plotly.js is not loaded"); }
  else {
    var newPlot = Plotly.newPlot;
    Plotly.newPlot = function () { var p = newPlot.apply(this, arguments); pending.push(p); return p; };
  }
  document.addEventListener("DOMContentLoaded", function () {
    Promise.all(pending).then(function () {
      if (!errors.length) { document.body.dataset.rendered = "ok: " + pending.length + " plots"; }
    }, function (e) { errors.push("Plotly.newPlot: " + e); mark(); });
    mark();
  });
})();
"""


@dataclass(frozen=True)
class Section:
    """One part of a page: a heading, an optional intro, then figures and raw HTML blocks in order."""

    title: str
    blocks: Sequence[object]  # plotly Figures, or str (HTML, inserted as is)
    intro: str = ""  # plain text, escaped

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def figure_html(fig, div_id: str) -> str:
    """A figure's <div> and script, without plotly.js (the page embeds it once)."""
    import plotly.io as pio

    height = fig.layout.height or DEFAULT_HEIGHT
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                       default_height=f"{height}px",
                       config={"responsive": True, "displaylogo": False})


def page_html(title: str, sections: Sequence[Section], *, about: Mapping[str, str] | None = None) -> str:
    """A standalone page: plotly.js embedded once in <head>, then the sections (see module docstring).
    With a single untitled section the page has no navigation and no section heading."""
    from plotly.offline import get_plotlyjs

    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{STYLE}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        '</head><body data-rendered="pending">',
        f"<script>{RENDER_STATUS_JS}</script>",
        '<div id="render-error"></div>',
        f"<h1>{e(title)}</h1>",
    ]
    if about:
        items = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in about.items())
        parts.append(f'<dl class="about">{items}</dl>')
    if any(s.title for s in sections):
        parts.append("<nav>" + "".join(f'<a href="#{s.anchor}">{e(s.title)}</a>' for s in sections) + "</nav>")
    n_fig = 0
    for i, s in enumerate(sections):
        anchor = s.anchor or f"section-{i + 1}"
        parts.append(f'<section id="{anchor}">' + (f"<h2>{e(s.title)}</h2>" if s.title else ""))
        if s.intro:
            parts.append(f'<p class="note">{e(s.intro)}</p>')
        for block in s.blocks:
            if isinstance(block, str):
                parts.append(block)
            else:
                n_fig += 1
                parts.append(figure_html(block, f"fig-{anchor}-{n_fig}"))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_page(text: str, path: str | os.PathLike) -> Path:
    """Write a page atomically (a temporary name in the same folder, then renamed); creates the folder."""
    return write_output(path, text)


def figure_page(fig, title: str | None = None) -> str:
    """One figure as a standalone page (the page title: `title`, else the figure's own, first line)."""
    text = title or (fig.layout.title.text or "figure").split("<br>")[0]
    return page_html(text, [Section("", [fig])])


def write_html(fig, path: str | os.PathLike) -> Path:
    """`figure_page(fig)` written atomically."""
    return write_page(figure_page(fig), path)


_SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc\s*=", re.IGNORECASE)


def is_offline_html(text: str) -> bool:
    """True if a page embeds plotly.js and loads no script from elsewhere (a CDN)."""
    return "plotly.js v" in text and _SCRIPT_SRC.search(text) is None and "Plotly.newPlot" in text


__all__ = ["Section", "figure_html", "figure_page", "is_offline_html", "page_html", "write_html", "write_page"]
