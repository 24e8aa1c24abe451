"""``cars-tl build-trunk``: a fine-tune's frozen part over the images once, into a trunk cache."""

from __future__ import annotations

from pathlib import Path

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
    Seed,
    TrunkStorage,
    Unfreeze,
    Weights,
    Workers,
)


@command("build-trunk")
def build_trunk(
    data_dir: DataDir = Path("data"),
    backbone: Backbone = "resnet50",
    weights: Weights = "imagenet",
    unfreeze: Unfreeze = "layer4",
    crop: Crop = "full",
    margin: Margin = 0.0,
    image_size: ImageSize = None,
    resize: Resize = None,
    preset: Preset = None,
    device: Device = "auto",
    precision: Precision = "auto",
    trunk_dtype: TrunkStorage = "auto",
    batch_size: BatchSize = 64,
    workers: Workers = None,
    seed: Seed = 0,
    out: OutFile = None,
    artifacts: Artifacts = Path("artifacts"),
):
    """Run a fine-tune's frozen part over the images once, into a trunk cache (what finetune --trunk-cache reads).

    A random backbone's weights come from --seed (0: the one finetune --init-head uses)."""
    from cars_tl.console import console, labelled, progress
    from cars_tl.core.distributed import is_main_process
    from cars_tl.core.options import DeviceOptions, ImageOptions
    from cars_tl.stages.trunk_cache import build_trunk as run

    path, result = run(
        data_dir=data_dir,
        backbone=backbone,
        weights=weights,
        unfreeze=unfreeze,
        image=ImageOptions(crop=crop, margin=margin, image_size=image_size, resize=resize),
        preset=preset,
        compute=DeviceOptions(device=device, precision=precision, workers=workers, batch_size=batch_size),
        storage=trunk_dtype,
        seed=seed,
        out=out,
        artifacts=artifacts,
        progress=progress(),
    )
    if not is_main_process():
        return
    if result.get("replaced"):
        console.print(
            labelled(("the existing file was not used", "yellow"), f": {result['replaced']}"),
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"{result['action']}: {path} (maps below {result['cut']}, {result['storage']} storage, "
        f"{result['precision']} compute) in {result['seconds']:.1f} s",
        highlight=False,
    )
