"""``cars-tl finetune``: a backbone + head trained on the images (models A and D)."""

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
    Epochs,
    Force,
    ImageSize,
    LearningRate,
    Margin,
    Precision,
    Preset,
    Resize,
    RunOut,
    Seed,
    TensorBoard,
    TrunkStorage,
    Tta,
    Unfreeze,
    Weights,
    Workers,
)


@command("finetune")
def finetune(
    data_dir: DataDir = Path("data"),
    backbone: Backbone = "resnet50",
    weights: Weights = "imagenet",
    unfreeze: Unfreeze = "layer4",
    init_head: Annotated[
        Path | None, typer.Option(help="Start the head from this train-head run (model D from model B).")
    ] = None,
    preset: Preset = "study",
    epochs: Epochs = None,
    lr: LearningRate = None,
    batch_size: BatchSize = None,
    optimizer: Annotated[
        Literal["adam", "adamw", "sgd"] | None, typer.Option(help="Optimizer (study: adam; tuned: adamw).")
    ] = None,
    augment: Annotated[
        Literal["none", "standard"] | None, typer.Option(help="Training augmentation (study: none; tuned: standard).")
    ] = None,
    crop: Crop = "full",
    margin: Margin = 0.0,
    image_size: ImageSize = None,
    resize: Resize = None,
    device: Device = "auto",
    precision: Precision = "auto",
    workers: Workers = None,
    seed: Seed = 0,
    resume: Annotated[bool, typer.Option(help="Continue a killed run from its last checkpoint.")] = False,
    force: Force = False,
    out: RunOut = None,
    artifacts: Artifacts = Path("artifacts"),
    tta: Tta = None,
    sync_bn: Annotated[
        bool | None,
        typer.Option(
            "--sync-bn/--no-sync-bn",
            help="Under torchrun: SyncBatchNorm where BatchNorm statistics train (CUDA only). Default: on for CUDA jobs of several processes, so BN sees the global batch.",
            show_default=False,
        ),
    ] = None,
    trunk_cache: Annotated[
        str,
        typer.Option(
            help="auto | off | PATH: run the frozen part below the first unfrozen module once into a trunk cache (built if missing) and train on its maps, when that is exact (no augmentation, frozen part in eval mode, same transform and precision); otherwise the images, saying why."
        ),
    ] = "auto",
    trunk_dtype: TrunkStorage = "auto",
    tensorboard: TensorBoard = None,
):
    """Fine-tune a backbone + head on the images (model A: --weights random --unfreeze all; model D: --unfreeze layer4 --init-head B)."""
    from cars_tl.cli.tables import final_line
    from cars_tl.console import console, labelled, progress
    from cars_tl.console import out as stdout
    from cars_tl.core.distributed import is_main_process
    from cars_tl.core.options import DeviceOptions, ImageOptions
    from cars_tl.stages.finetune import finetune as run

    run_dir, metrics = run(
        data_dir,
        backbone=backbone,
        weights=weights,
        unfreeze=unfreeze,
        init_head=init_head,
        preset=preset,
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        augment=augment,
        image=ImageOptions(crop=crop, margin=margin, image_size=image_size, resize=resize),
        compute=DeviceOptions(device=device, precision=precision, workers=workers, batch_size=batch_size),
        seed=seed,
        resume=resume,
        force=force,
        out=out,
        artifacts=artifacts,
        progress=progress(),
        sync_bn=sync_bn,
        tta=tta,
        trunk_cache=trunk_cache,
        trunk_dtype=trunk_dtype,
        tensorboard=tensorboard,
    )
    if not is_main_process():  # torchrun: rank 0 reports
        return
    p = metrics["params"]
    console.print(f"parameters: total {p['total']:,}, trainable {p['trainable']:,}")
    if metrics.get("resumed_with_changes"):
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in metrics["resumed_with_changes"].items())
        restarted = (
            "; the optimizer and learning-rate schedule started afresh" if metrics.get("optimizer_restarted") else ""
        )
        console.print(
            labelled(("resumed with changed options", "yellow"), f" ({changes}){restarted}"),
            highlight=False,
            soft_wrap=True,
        )
    stdout.print(final_line(run_dir, metrics))
