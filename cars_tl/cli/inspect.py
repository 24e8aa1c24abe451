"""``cars-tl inspect``: what a feature cache, a run or a data folder holds; ``--embedding`` draws its map."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cars_tl.cli.app import command
from cars_tl.cli.options import DataDir, JsonOutput, Seed


@command("inspect")
def inspect(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="A feature cache (.h5), a run directory or a data folder (its manifest); two caches (or two runs) are compared."
        ),
    ],
    json_output: JsonOutput = False,
    embedding: Annotated[
        Path | None,
        typer.Option(
            metavar="OUT.png",
            help="Instead: draw the 2-D feature map (PCA 50 -> t-SNE, by make) of the cache's split, or of a fine-tuned run's test features.",
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="With --embedding: the split to map.")] = "test",
    data_dir: DataDir = Path("data"),
    seed: Seed = 0,
):
    """Look inside a feature cache, a run or a data folder: provenance, splits, skipped images, feature statistics, final metrics, label conflicts.

    With --embedding, --data-dir gives the thumbnails on the map and --seed seeds its PCA and t-SNE."""
    import json

    from cars_tl.console import out as stdout

    if embedding is not None:
        from cars_tl.stages.embedding import embedding_picture

        r = embedding_picture(paths[0], out=embedding, split=split, data_dir=data_dir, seed=seed)
        stdout.print(
            f"{r['png']}: {r['images']} images, {r['makes']} makes; make-level 10-NN accuracy {r['knn_map']:.1f}% "
            f"in the 2-D map, {r['knn_full']:.1f}% in the full space; map {'reused' if r['reused'] else 'computed'} "
            f"({r['map_file']}, {r['seconds']:.1f} s)",
            highlight=False,
            soft_wrap=True,
        )
        return
    from cars_tl.stages.inspect import inspect_paths, render_text

    result = inspect_paths(paths)
    if json_output:
        print(json.dumps(result, indent=2))
        return
    stdout.print(render_text(result), markup=False, highlight=False, soft_wrap=True)
