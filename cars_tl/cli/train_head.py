"""``cars-tl train-head``: a linear head (model B) on cached features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from cars_tl.cli.app import command
from cars_tl.cli.options import (
    Artifacts,
    BatchSize,
    Epochs,
    FeaturesFile,
    Force,
    LearningRate,
    Preset,
    RunOut,
    Seed,
    TensorBoard,
)


@command("train-head")
def train_head(
    features: FeaturesFile,
    preset: Preset = "study",
    epochs: Epochs = None,
    lr: LearningRate = None,
    batch_size: BatchSize = None,
    optimizer: Annotated[
        Literal["adam", "adamw", "sgd", "lbfgs"] | None,  # stages.train_head.OPTIMIZERS
        typer.Option(help="Optimizer (study: adam; tuned: lbfgs)."),
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="Weight decay (study: 0; tuned: chosen on a validation split).")
    ] = None,
    seed: Seed = 0,
    force: Force = False,
    out: RunOut = None,
    artifacts: Artifacts = Path("artifacts"),
    tensorboard: TensorBoard = None,
    refit: Annotated[
        bool,
        typer.Option(
            "--refit/--no-refit",
            help="tuned: refit the head on all of train once its weight decay is chosen; --no-refit keeps the "
            "chosen head trained on the fit rows, its validation split held out (needed by cars-tl calibrate).",
        ),
    ] = True,
):
    """Train a Linear head (model B) on cached features; saves head.pt and metrics.json."""
    from cars_tl.cli.tables import final_line
    from cars_tl.console import out as stdout
    from cars_tl.console import progress
    from cars_tl.stages.train_head import train_head as run

    run_dir, metrics = run(
        features,
        preset=preset,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        optimizer=optimizer,
        weight_decay=weight_decay,
        seed=seed,
        out=out,
        artifacts=artifacts,
        progress=progress(),
        force=force,
        tensorboard=tensorboard,
        refit=refit,
    )
    stdout.print(final_line(run_dir, metrics))
