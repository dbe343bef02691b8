"""The report as one HTML page: each figure beside the numbers it shows, then what was skipped.

The page is plain HTML with its style inline: no script, no web font, nothing fetched. Figures
are referenced by their file name, since the page sits in the same folder as the PNGs, so it
opens from disk (``file://``) and the folder can be copied or archived whole. Every text that
comes from the run (captions, class names, paths) is escaped.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Sequence

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1500px; }
section { border-top: 1px solid #ccc; padding-top: 0.6em; margin-top: 1.2em; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.row img { max-width: 62%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.85em; margin-bottom: 0.8em; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.own { color: #176b1e; font-weight: bold; }
.note { color: #555; font-size: 0.9em; }
.skipped { color: #8a4b00; }
"""


@dataclass(frozen=True)
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[object]]  # str (escaped here), float (formatted), or Cell
    caption: str = ""


@dataclass(frozen=True)
class Cell:
    """A cell with a CSS class (e.g. ``own``: a retrieved caption that is the image's own)."""
    value: object
    css: str = ""


@dataclass(frozen=True)
class Section:
    title: str
    figure: str | None  # file name next to the page; None: skipped (see ``note``)
    note: str = ""  # one paragraph under the title: what the figure shows, or why it is absent
    tables: list[Table] = field(default_factory=list)


def render(title: str, subtitle: str, sections: Sequence[Section],
           skipped: dict[str, str]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{_e(title)}</h1>", f'<p class="note">{_e(subtitle)}</p>']
    for s in sections:
        parts.append(f"<section><h2>{_e(s.title)}</h2>")
        if s.note:
            css = "note" if s.figure else "note skipped"
            parts.append(f'<p class="{css}">{_e(s.note)}</p>')
        parts.append('<div class="row">')
        if s.figure:
            parts.append(f'<img src="{_e(s.figure)}" alt="{_e(s.title)}">')
        parts.append("<div>" + "".join(_table(t) for t in s.tables) + "</div></div></section>")
    if skipped:
        parts.append("<section><h2>Skipped</h2><ul>")
        parts += [f'<li class="skipped"><b>{_e(name)}</b>: {_e(why)}</li>'
                  for name, why in skipped.items()]
        parts.append("</ul></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _table(t: Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in t.rows)
    cap = f"<caption>{_e(t.caption)}</caption>" if t.caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: object) -> str:
    css = ""
    if isinstance(value, Cell):
        value, css = value.value, value.css
    if isinstance(value, float):
        css = (css + " num").strip()
        value = f"{value:.4g}"
    elif isinstance(value, int) and not isinstance(value, bool):
        css = (css + " num").strip()
    attr = f' class="{css}"' if css else ""
    return f"<td{attr}>{_e(str(value))}</td>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
