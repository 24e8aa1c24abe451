"""The report's "Feature space by make" section: one 2-D map per model group.

B, C and kNN map their feature cache's test split (frozen features; one cache is computed once and
shared), A and D their fine-tuned run's ``penultimate-test.npz``. Each map is stored beside its source
keyed by the source's SHA-256 (:mod:`cars_tl.models.feature_map`), so a report rebuilt on the same
runs reuses it. Returns Markdown and HTML; the caller puts them in the page.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from cars_tl.core.errors import CarsTLError
from cars_tl.models import feature_map
from cars_tl.report.catalog import GROUP_ORDER, model_group

TITLE = "Feature space by make"
INTRO = (
    "Test-split features of each model group, PCA to 50 dimensions then t-SNE (seed 0), one colour per make. "
    "B, C and kNN share their frozen features; A and D show the features a fine-tune made (the head's input). "
    "t-SNE keeps neighbourhoods, not distances: the make-level 10-NN accuracy in the map and in the full space "
    "say how much of the structure the picture shows."
)


def _sources(complete: list[dict]) -> list[tuple[str, str, Path]]:
    """(group, run name, run directory) for the first run of each group that has something to map."""
    chosen: dict[str, tuple[str, str, Path]] = {}
    for m in complete:
        group = model_group(m)
        if group in chosen or group not in GROUP_ORDER:
            continue
        run_dir = Path(m["run_dir"])
        try:
            feature_map.source_of(run_dir)
        except CarsTLError:
            continue
        chosen[group] = (group, m["name"], run_dir)
    return [chosen[g] for g in GROUP_ORDER if g in chosen]


def section(complete: list[dict], out: Path, data_dir: Path | None) -> tuple[str, str]:
    """(markdown, html) of the section; empty strings when no run has features to map."""
    maps = []
    images = None
    for group, name, run_dir in _sources(complete):
        try:
            result = feature_map.load_map(run_dir, "test")
        except CarsTLError as exc:
            maps.append((group, name, None, exc.message, None))
            continue
        if images is None:
            images = feature_map.image_paths(data_dir)
        png = Path(out) / f"feature-map-{group}.png"
        feature_map.plot(result, png, title=f"{group}: {name} (test features by make)", images=images)
        maps.append((group, name, png, None, result))
    if not maps:
        return "", ""
    md = ["", f"## {TITLE}", "", INTRO]
    parts = [f"<h2 id='feature-maps'>{TITLE}</h2>", f"<p>{html.escape(INTRO)}</p>"]
    for group, name, png, problem, r in maps:
        if png is None:
            md += ["", f"### {group}: {name}", "", f"_no map: {problem}_"]
            parts.append(f"<h3>{html.escape(group)}: {html.escape(name)}</h3><p>No map: {html.escape(problem)}</p>")
            continue
        figures = f"make-level 10-NN accuracy: 2-D map {r['knn_map']:.1f}%, full space {r['knn_full']:.1f}% ({len(r['coords'])} images)"
        md += ["", f"### {group}: {name}", "", f"![feature map {group}]({png.name})", "", figures]
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(
            f"<h3>{html.escape(group)}: {html.escape(name)}</h3><img alt='feature map {html.escape(group)}' "
            f"src='data:image/png;base64,{data}'><p>{html.escape(figures)}</p>"
        )
    return "\n".join(md), "\n".join(parts)
