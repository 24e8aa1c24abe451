"""``cars-tl track``: finished runs mirrored into TensorBoard or MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cars_tl.artifacts import names
from cars_tl.cli.app import command
from cars_tl.cli.options import Artifacts


@command("track")
def track(
    to: Annotated[
        tuple[str, str],
        typer.Option(
            "--to",
            metavar="KIND TARGET",
            help="tensorboard DIR (event files, one folder per run) | mlflow URI (sqlite:///mlflow.db or a tracking server's URL).",
        ),
    ],
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="RUN_DIR", help="Run directories, or folders of runs [default: ARTIFACTS/runs].", show_default=False
        ),
    ] = None,
    artifacts: Artifacts = Path("artifacts"),
    experiment: Annotated[str, typer.Option(help="MLflow experiment the runs go into.")] = "cars_tl",
):
    """Mirror finished runs into TensorBoard or MLflow (params, per-epoch metrics, tags, small files); rerunning adds nothing new."""
    from cars_tl.console import console
    from cars_tl.console import out as stdout
    from cars_tl.report.track import track as run

    results = run(paths or [names.runs_folder(artifacts)], to=to[0], target=to[1], experiment=experiment)
    for r in results:
        line = (
            f"{r['action']:<9} {r['run']} -> {r['detail']}"
            if r["action"] != "skipped"
            else f"skipped   {r['run']}: {r['detail']}"
        )
        (console if r["action"] == "skipped" else stdout).print(line, markup=False, highlight=False, soft_wrap=True)
    counts = {a: sum(r["action"] == a for r in results) for a in ("created", "replaced", "unchanged", "skipped")}
    console.print(", ".join(f"{n} {a}" for a, n in counts.items()) + f" ({to[0]} {to[1]})", highlight=False)
