"""``build-trunk``: run the frozen part of a fine-tune's network over the images once, into a trunk
cache (:mod:`cars_tl.artifacts.trunks`; the split of the network: :mod:`cars_tl.models.trunk`).

``finetune --trunk-cache auto|PATH`` builds the same file when it is missing; this stage exists so
that ``make`` can build it once, as a file target, for model D and all its seeds.
"""

from __future__ import annotations

from pathlib import Path

from cars_tl.core import distributed, runtime
from cars_tl.core.errors import CarsTLError, check_seed
from cars_tl.core.options import FROZEN_BATCH_SIZE, DeviceOptions, ImageOptions
from cars_tl.core.progress import NULL, Progress
from cars_tl.data import loaders
from cars_tl.data import manifest as manifests
from cars_tl.models import backbones, training, trunk, trunk_store
from cars_tl.stages import presets


def build_trunk(
    data_dir: Path = Path("data"),
    *,
    backbone: str = "resnet50",
    weights: str = "imagenet",
    unfreeze: str = "layer4",
    image: ImageOptions = ImageOptions(),
    preset: str | None = None,
    compute: DeviceOptions = DeviceOptions(),
    storage: str = "auto",
    seed: int = backbones.RANDOM_SEED,
    out: Path | None = None,
    artifacts: Path = Path("artifacts"),
    progress: Progress = NULL,
) -> tuple[Path, dict]:
    """Build (or find up to date) the trunk cache of ``--unfreeze unfreeze``; returns its path and
    {action, seconds, ...}. ``seed``: a random backbone's (the default is what D under --init-head uses).
    ``image``'s resize mode and image size: None for ``preset``'s (None: study), as finetune resolves them.
    Under torchrun every process builds its shard of the chunks; rank 0 writes the file."""
    seed = check_seed(seed)
    image = presets.image_options("build-trunk", preset, image)
    crop, margin = image.crop, image.margin
    manifest = manifests.load_manifest(data_dir)
    ctx = distributed.init(runtime.resolve_device(compute.device))
    device = ctx.device
    precision = runtime.resolve_precision(compute.precision, device)
    runtime.prepare_device(device, precision)  # as finetune's: its fp32 is fp32 (no TF32), cuda:N selected
    workers = loaders.default_workers(device) if compute.workers is None else compute.workers
    bb = backbones.build_backbone(backbone, weights, image.image_size, image.resize, seed=seed)
    unfrozen = backbones.parse_unfreeze(unfreeze, bb)
    model = backbones.classifier_model(bb, manifest.num_classes)
    training.set_trainable(model, unfrozen, everything=unfreeze == "all")
    model.eval()
    # What the plan reads of a run's options: build-trunk runs no augmentation and no mirrored views.
    options = {"unfreeze": unfreeze, "precision": precision, "crop": crop, "margin": margin}
    p = trunk.plan(str(out) if out else "auto", model, bb, options, manifest, Path(artifacts), storage)
    if p.path is None:
        raise CarsTLError(
            p.reason.replace(": trunk cache not used", ""), "finetune then runs on the images: no trunk cache to build"
        )
    model.to(device)
    result = trunk_store.ensure(
        p,
        model,
        bb,
        manifest,
        crop=crop,
        margin=margin,
        batch_size=compute.batch_size or FROZEN_BATCH_SIZE,
        workers=workers,
        device=device,
        precision=precision,
        progress=progress,
        ctx=ctx,
    )
    return p.path, dict(result, cut=p.identity["cut"], storage=p.identity["storage"], precision=precision)
