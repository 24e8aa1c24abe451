"""``cars-tl paths``: the pipeline's names and preset settings as KEY=value lines (what make reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cars_tl.artifacts import names
from cars_tl.cli.app import command
from cars_tl.cli.options import (
    Artifacts,
    Backbone,
    Gamma,
    ImageSize,
    Kernel,
    Preset,
    Resize,
    Scale,
    SvmC,
    Unfreeze,
    Weights,
)
from cars_tl.core.errors import CarsTLError


@command("paths")
def paths(
    key: Annotated[
        str | None,
        typer.Argument(
            metavar="KEY", help="Print only this value (e.g. FEATURES, HEAD_RUN_0, SVM_RUN).", show_default=False
        ),
    ] = None,
    artifacts: Artifacts = Path("artifacts"),
    backbone: Backbone = "resnet50",
    weights: Weights = "imagenet",
    preset: Preset = "study",
    resize: Resize = None,
    image_size: ImageSize = None,
    kernel: Kernel = "poly",
    c: SvmC = None,
    gamma: Gamma = None,
    scale: Scale = None,
    unfreeze: Unfreeze = "layer4",
    seed: Annotated[
        list[int] | None,
        typer.Option("--seed", help="Seed of B, A and D (repeatable; several: run names gain -s<seed>)."),
    ] = None,
    check_backbone: Annotated[
        bool,
        typer.Option(
            help="Also check --backbone, --unfreeze, --resize and --image-size as the stages do (imports torch; "
            "make skips it for a combination that passed once)."
        ),
    ] = True,
):
    """Print the pipeline's names and preset settings as KEY=value lines: what `make` reads.

    These are the names `make` passes with --out; a stage run without --out names its output itself
    (e.g. runs/head-<backbone>-<weights>-<preset>). Every option is checked as its stage checks it, and
    must be a name make can carry (letters, digits and . _ - + , / @): nothing is printed otherwise."""
    from cars_tl.core.errors import check_seed
    from cars_tl.models.svm.model import Scaler, parse_gamma
    from cars_tl.models.svm.search import parse_C
    from cars_tl.stages.presets import pipeline_values

    texts = dict(artifacts=str(artifacts), backbone=backbone, weights=weights, preset=preset, resize=resize)
    texts.update(kernel=kernel, C=c, gamma=gamma, scale=scale, unfreeze=unfreeze)
    for option, value in texts.items():
        if value is not None:
            names.check_pipeline_value(f"--{option.replace('_', '-')}", value)
    for s in seed or ():
        check_seed(s)
    values = pipeline_values(
        artifacts=artifacts,
        backbone=backbone,
        weights=weights,
        preset=preset,
        resize=resize,
        image_size=image_size,
        kernel=kernel,
        C=c,
        gamma=gamma,
        scale=scale,
        unfreeze=unfreeze,
        seeds=seed,
    )
    # The preset's values are checked too: an explicit one may have replaced only some of them.
    parse_C(values["SVM_C"])
    Scaler(values["SVM_SCALE"])
    if values["SVM_GAMMA"] != "cv":
        parse_gamma(values["SVM_GAMMA"])
    if check_backbone:
        from cars_tl.models.backbones import check_options

        check_options(backbone, unfreeze)
    if key is not None:
        if key not in values:
            raise CarsTLError(f"unknown KEY {key!r}; valid: {', '.join(values)}", "cars-tl paths (every KEY=value)")
        print(values[key])
        return
    for name, value in values.items():
        print(f"{name}={value}")
