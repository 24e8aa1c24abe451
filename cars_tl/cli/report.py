"""``cars-tl report``: every run gathered into report.md and report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cars_tl.cli.app import command
from cars_tl.cli.options import Artifacts, DataDir


@command("report")
def report(
    artifacts: Artifacts = Path("artifacts"),
    out: Annotated[Path | None, typer.Option(help="Report folder (default: ARTIFACTS/report).")] = None,
    data_dir: DataDir = Path("data"),
):
    """Gather every run: headline chart, comparison, seeds, curves, per-class and make-level accuracy, confusions, gallery (report.md, report.html).

    Thumbnails in the report come from the images of --data-dir, the dataset the runs used."""
    from cars_tl.cli.tables import runs_table
    from cars_tl.console import console, labelled
    from cars_tl.console import out as stdout
    from cars_tl.report.build import build_report

    result = build_report(artifacts, out=out, data_dir=data_dir)
    stdout.print(runs_table(result))
    for problem in result["problems"]:
        console.print(labelled((problem["status"], "yellow"), f": {problem['run']} ({problem['detail']})"))
    if result["thumbnails"]:
        console.print(labelled(("note", "yellow"), f": {result['thumbnails']}"))
    console.print("wrote " + ", ".join(result["files"].values()))
