"""``cars-tl predict``: top-k classes per image, or a whole split scored into predictions files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cars_tl.cli.app import command
from cars_tl.cli.options import DataDir, JsonOutput, Models


@command("predict")
def predict(
    model: Models,
    images: Annotated[
        list[Path] | None, typer.Argument(metavar="IMAGE", help="Image files.", show_default=False)
    ] = None,
    top_k: Annotated[int, typer.Option(help="Classes shown per model.")] = 5,
    json_output: JsonOutput = False,
    split: Annotated[
        str | None,
        typer.Option(
            help="Instead of images: score this whole split of the manifest and save each run's predictions-<split>.npz."
        ),
    ] = None,
    data_dir: DataDir = Path("data"),
    boxed: Annotated[
        bool,
        typer.Option(
            "--boxed", help="The images already are box crops (for --crop box runs, cut with the run's margin)."
        ),
    ] = False,
):
    """Top-k classes per image, the given models side by side (softmax probability, or SVM decision score).

    --model takes a finetune, train-head or fit-svm run (with --split: a knn run too)."""
    import json

    from cars_tl.console import out as stdout
    from cars_tl.stages.predict import predict as run

    if split:
        from cars_tl.console import progress
        from cars_tl.stages.predict import predict_split

        for saved in predict_split(model, split=split, data_dir=data_dir, progress=progress(), images=images or []):
            stdout.print(
                f"{saved['run']}: {saved['count']} {split} images, top-1 {saved['accuracy']:.2f}% -> {saved['file']}"
            )
        return
    results = run(images or [], run_dirs=model, top_k=top_k, boxed=boxed)
    if json_output:
        print(json.dumps(results, indent=2))
        return
    from cars_tl.cli.tables import prediction_table

    for result in results:
        stdout.print(prediction_table(result))
