"""``cars-tl knn``: weighted k-nearest-neighbour classification on cached features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cars_tl.cli.app import command
from cars_tl.cli.options import Artifacts, FeaturesFile, Force, RunOut


@command("knn")
def knn(
    features: FeaturesFile,
    k: Annotated[
        list[str] | None,
        typer.Option(
            "--k",
            help="Neighbours that vote; repeatable or comma-separated (10,20,50), each reported; the first is the run's result. [default: 20]",
        ),
    ] = None,
    temperature: Annotated[float, typer.Option(help="Vote weight exp(cosine / T).")] = 0.07,
    force: Force = False,
    out: RunOut = None,
    artifacts: Artifacts = Path("artifacts"),
):
    """Weighted k-nearest-neighbour classification on cosine similarity of cached features (DINO protocol)."""
    from cars_tl.console import out as stdout
    from cars_tl.console import progress
    from cars_tl.stages.knn import run_knn

    run_dir, metrics = run_knn(
        features,
        ks=tuple(k or ()),
        temperature=temperature,
        force=force,
        out=out,
        artifacts=artifacts,
        progress=progress(),
    )
    for r in metrics["k_results"].values():
        stdout.print(f"k={r['k']:<4} test acc {r['test_acc']:.2f}%  top-5 {r['test_top5']:.2f}%")
    stdout.print(f"knn run {run_dir}: T={temperature}, {metrics['wall_time_s']:.1f} s")
