"""``cars-tl extract-features``: the frozen backbone over the images once, into an HDF5 feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from cars_tl.cli.app import command
from cars_tl.cli.options import (
    Artifacts,
    Backbone,
    BatchSize,
    Crop,
    DataDir,
    Device,
    ImageSize,
    Margin,
    OutFile,
    Precision,
    Preset,
    Resize,
    Tta,
    Weights,
    Workers,
)


@command("extract-features")
def extract_features(
    data_dir: DataDir = Path("data"),
    backbone: Backbone = "resnet50",
    weights: Weights = "imagenet",
    split: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SPLIT", help="Split to extract (repeatable): train, test (default: every split the dataset has)."
        ),
    ] = None,
    crop: Crop = "full",
    margin: Margin = 0.0,
    image_size: ImageSize = None,
    resize: Resize = None,
    tta: Tta = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help=(
                "final (the pooled output) | default (the family's two stages: ResNet layer3,layer4; timm blocks.N,final) | "
                "comma-separated stage names as --unfreeze knows them, pooled and concatenated in order (study: final; tuned: default)."
            )
        ),
    ] = None,
    combine: Annotated[
        Literal["l2", "raw"],  # models.feature_views.COMBINES
        typer.Option(help="With several --layers: l2 (each stage's block L2-normalised per image) | raw."),
    ] = "l2",
    preset: Preset = None,
    batch_size: BatchSize = 64,
    workers: Workers = None,
    device: Device = "auto",
    precision: Precision = "auto",
    skip_bad: Annotated[
        bool, typer.Option(help="Leave out unreadable images (listed in the file) instead of stopping.")
    ] = False,
    out: OutFile = None,
    artifacts: Artifacts = Path("artifacts"),
):
    """Run the frozen backbone over the images once and cache pooled features in HDF5.

    Resumes an interrupted run; a no-op when an identical complete file exists.
    """
    from cars_tl.console import console, labelled, progress
    from cars_tl.core.options import DeviceOptions, ImageOptions
    from cars_tl.stages.extract import extract_features as run

    result = run(
        data_dir,
        backbone=backbone,
        weights=weights,
        splits=tuple(split) if split else None,
        image=ImageOptions(crop=crop, margin=margin, image_size=image_size, resize=resize),
        compute=DeviceOptions(device=device, precision=precision, workers=workers, batch_size=batch_size),
        skip_bad=skip_bad,
        out=out,
        artifacts=artifacts,
        progress=progress(),
        tta=tta,
        layers=layers,
        combine=combine,
        preset=preset,
    )
    from cars_tl.core.distributed import is_main_process

    if not is_main_process():  # torchrun: rank 0 reports
        return
    if result.replaced_corrupt:
        console.print(
            labelled(
                ("the existing file could not be trusted and was extracted again", "yellow"),
                f": {result.replaced_corrupt}",
            ),
            highlight=False,
            soft_wrap=True,
        )
    if result.action == "up to date":
        console.print(f"up to date: {result.path} (same backbone, weights, transform and dataset)")
        return
    skipped = sum(result.skipped.values())
    console.print(
        labelled(
            f"{result.action}: {result.path} — "
            + ", ".join(f"{s} {n}" for s, n in result.counts.items())
            + f" images, {result.images_per_second:,.1f} img/s ({result.precision} on {result.device})",
            *([", ", (f"{skipped} unreadable images skipped", "yellow"), " (listed in the file)"] if skipped else []),
        )
    )
