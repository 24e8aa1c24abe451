"""``cars-tl sparsity``: the fraction of exactly-zero ReLU outputs per model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cars_tl.artifacts import names
from cars_tl.cli.app import command
from cars_tl.cli.options import DataDir, Models


@command("sparsity")
def sparsity(
    model: Models,
    image: Annotated[
        list[Path] | None, typer.Option("--image", metavar="IMAGE", help="Image file (repeatable).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Or take images from this split of the manifest.")] = None,
    limit: Annotated[int, typer.Option(help="With --split: how many images.")] = 32,
    data_dir: DataDir = Path("data"),
    out: Annotated[Path, typer.Option(help="Folder for sparsity.csv/.json/.png.")] = names.DEFAULT_SPARSITY_FOLDER,
):
    """Fraction of exactly-zero outputs of every ReLU call, per model; CSV, JSON and a bar chart."""
    from cars_tl.console import console, progress
    from cars_tl.stages.sparsity import measure

    summary = measure(model, images=image, split=split, limit=limit, data_dir=data_dir, out=out, progress=progress())
    for name, values in summary["models"].items():
        mean = sum(values.values()) / len(values)
        console.print(f"{name}: {len(values)} ReLU calls, mean zero fraction {mean:.3f}")
    console.print("wrote " + ", ".join(summary["files"].values()))
