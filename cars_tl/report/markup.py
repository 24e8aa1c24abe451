"""Text for the report: Markdown and HTML escaping, Markdown and HTML tables, number and image formatting."""

from __future__ import annotations

import base64
import html
import math
import os
import re
from pathlib import Path


def fmt(value, digits: int = 2) -> str:
    """A table cell: ``–`` for None, floats to ``digits`` places, integers with thousands separators."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def duration(seconds) -> str:
    """Seconds as ``12.3s`` or ``4m 05.0s``."""
    if seconds is None:
        return "–"
    minutes, secs = divmod(float(seconds), 60)
    return f"{int(minutes)}m {secs:04.1f}s" if minutes else f"{secs:.1f}s"


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>~])")


def md(text) -> str:
    """Text safe inside a Markdown table cell or heading: special characters escaped, one line."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def esc(text) -> str:
    """Text safe in HTML, quotes included."""
    return html.escape(str(text), quote=True)


def md_table(columns, rows) -> str:
    """A Markdown table of ``rows`` (dicts by column); every cell escaped."""
    lines = ["| " + " | ".join(md(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(md(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def html_table(columns, rows, cls: str = "", raw: tuple = ()) -> str:
    """``raw`` columns hold HTML already made safe (images, marks); everything else is escaped."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{r[c] if c in raw else esc(r[c])}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pct(value) -> str:
    """A percentage to one place; ``–`` for None."""
    return "–" if value is None else f"{value:.1f}"


def score(value: float, kind: str) -> str:
    """A prediction score: probabilities and vote shares in %, decision scores as numbers."""
    if not math.isfinite(value):
        return "–"
    return f"{100 * value:.0f}%" if kind in ("probability", "vote share") else f"{value:.2f}"


def img(uri: str | None, alt: str, cls: str = "thumb") -> str:
    """An image from a data URI, or its alt text where there is no picture."""
    return f"<img class='{cls}' alt='{esc(alt)}' src='{uri}'>" if uri else f"<span class='noimg'>{esc(alt)}</span>"


def png(path: Path, alt: str) -> str:
    """A PNG file inlined as an HTML image."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img alt='{esc(alt)}' src='data:image/png;base64,{data}'>"


def relative(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` (a Markdown link beside the report)."""
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())
