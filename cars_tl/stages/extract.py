"""``extract-features``: run a frozen backbone over the images once, into an HDF5 cache.

Eval mode under ``torch.inference_mode()``, BatchNorm folded into the convolutions, channels_last,
bf16 autocast where the hardware has it. On CUDA a DataLoader with worker processes and pinned
memory feeds the model; on the CPU, where decoding and the model share the cores, decode threads
fill the next batch while the model runs (:class:`cars_tl.data.loaders.ThreadedLoader`); the choice is
:func:`cars_tl.data.loaders.data_path`'s. Chunks are
kept as they finish, so an interrupted run resumes; identical inputs and a complete file make it
a no-op.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cars_tl.artifacts import features, names
from cars_tl.core import distributed, locks, runtime
from cars_tl.core.errors import BadImageError, CarsTLError, check_output_path
from cars_tl.core.options import FROZEN_BATCH_SIZE, DeviceOptions, ImageOptions
from cars_tl.core.progress import NULL, Progress
from cars_tl.data import devkit, loaders, transforms
from cars_tl.data import manifest as manifests
from cars_tl.models import backbones, feature_views, frozen_pass
from cars_tl.models.feature_views import embed, prepare_body
from cars_tl.stages import presets


@dataclasses.dataclass
class ExtractResult:
    path: Path
    action: str  # "extracted" | "resumed" | "up to date"
    counts: dict[str, int]
    skipped: dict[str, int]
    seconds: float
    images_per_second: float
    precision: str
    device: str
    replaced_corrupt: str | None = None  # why an existing file at the path was not trusted


@locks.reads("extract-features", lambda a: [devkit.stanford_root(a["data_dir"])])  # download cannot swap it meanwhile
def extract_features(
    data_dir: Path = Path("data"),
    *,
    backbone: str = "resnet50",
    weights: str = "imagenet",
    splits: tuple[str, ...] | None = None,
    image: ImageOptions = ImageOptions(),
    compute: DeviceOptions = DeviceOptions(),
    skip_bad: bool = False,
    out: Path | None = None,
    artifacts: Path = Path("artifacts"),
    progress: Progress = NULL,
    tta: str | None = None,
    layers: str | None = None,
    combine: str = feature_views.DEFAULT_COMBINE,
    preset: str | None = None,
) -> ExtractResult:
    """Extract pooled features for ``splits`` (default: every split the dataset has) into an HDF5
    cache (see :mod:`cars_tl.artifacts.features`).

    ``image``: crop, margin, image size and resize mode (crop | squash | pad, see :mod:`cars_tl.data.transforms`).
    ``compute``: device, precision, batch size and ``workers``: decode threads on the CPU, DataLoader worker
    processes on CUDA (default: :func:`loaders.default_workers` for the device, as finetune).
    ``tta`` (none | flip), ``layers`` (final | default | A,B,...) and ``combine`` (l2 | raw): what a
    row is made of (:mod:`cars_tl.models.feature_views`). ``preset`` (study | tuned, see
    :func:`cars_tl.stages.presets.for_stage`) gives the resize mode, image size, tta and layers unless passed (None: study).
    Tunes glibc malloc for the process (:func:`runtime.tune_malloc`).

    Under ``torchrun`` every process calls this: each extracts a contiguous, chunk-aligned shard of
    every split into its own chunks; rank 0 holds the file's writer lock, waits for the others and
    merges the chunks into the one ``.h5`` (the same arrays as one process makes).
    """
    for split in splits or ():
        if split not in devkit.SPLITS:
            raise CarsTLError(f"unknown split {split!r}; valid: {', '.join(devkit.SPLITS)}")
    image = presets.image_options("extract-features", preset, image)
    crop, margin = image.crop, image.margin
    chosen = presets.for_stage("extract-features", preset, tta=tta, layers=layers)
    layers = chosen["layers"]
    tta = feature_views.check_tta(chosen["tta"])
    manifest = manifests.load_manifest(data_dir)
    splits = manifest.splits if splits is None else splits
    ctx = distributed.init(runtime.resolve_device(compute.device))
    device = ctx.device
    precision = runtime.resolve_precision(compute.precision, device)
    runtime.prepare_device(device, precision)
    workers = loaders.default_workers(device) if compute.workers is None else compute.workers
    runtime.tune_malloc()
    bb = backbones.build_backbone(backbone, weights, image.image_size, image.resize)
    bb = with_feature_options(bb, tta, feature_views.parse_layers(layers, bb), combine)
    out = (
        Path(out)
        if out
        else names.features_path(
            artifacts, backbone, weights, crop, bb.transform, margin, precision, feature_views.name_tag(bb.transform)
        )
    )
    check_output_path(out, "file")
    identity = {
        "backbone": bb.name,
        "weights": bb.weights,
        "weights_digest": bb.weights_digest,
        "transform": bb.transform,
        "crop": crop,
        "margin": margin,
        "precision": precision,
        "dataset_fingerprint": manifest.fingerprint,
        "skip_bad": bool(skip_bad),
    }
    job = _FeatureJob(
        manifest=manifest,
        bb=bb,
        identity=identity,
        path=out,
        splits=tuple(splits),
        crop=crop,
        margin=margin,
        image_size=image.image_size,
        batch_size=compute.batch_size or FROZEN_BATCH_SIZE,
        workers=workers,
        device=device,
        precision=precision,
        skip_bad=skip_bad,
        data_dir=data_dir,
        world_size=ctx.world_size,
    )
    # Under torchrun rank 0 alone holds the lock; the other ranks write only their own chunk files.
    done = frozen_pass.run(job, ctx=ctx, progress=progress)
    if done.action == "up to date":
        return ExtractResult(out, "up to date", {}, {}, 0.0, 0.0, precision, device)
    if not ctx.is_main:
        return ExtractResult(out, "extracted shard", {}, {}, done.seconds, done.images_per_second, precision, device)
    return ExtractResult(
        out,
        "resumed" if done.action == "resumed" else "extracted",
        {s: len(done.written[s].labels) for s in done.todo},
        {s: len(done.written[s].skipped) for s in done.todo},
        done.seconds,
        done.images_per_second,
        precision,
        device,
        job.distrusted,
    )


def with_feature_options(bb: backbones.Backbone, tta: str, layers: list[str], combine: str) -> backbones.Backbone:
    """``bb`` with the feature options in its transform spec and its row width (several layers:
    the columns of each, measured on one image of the final size)."""
    spec = feature_views.with_options(bb.transform, tta, layers, combine)
    if layers == [feature_views.FINAL]:
        return dataclasses.replace(bb, transform=spec)
    probe = feature_views.FeatureBody(bb.body, layers, "none", combine)
    columns = probe.columns(transforms.side(bb.transform))
    probe.close()
    spec = feature_views.with_options(bb.transform, tta, layers, combine, columns)
    return dataclasses.replace(bb, transform=spec, num_features=max(stop for _, stop in columns.values()))


@dataclasses.dataclass
class _FeatureJob(frozen_pass.Job):
    """Pooled feature rows of the splits not already in the file alike (extracting test after
    train adds to the file); an existing file that does not verify is never trusted: it is
    extracted again, and ``distrusted`` says why."""

    manifest: manifests.Manifest
    bb: backbones.Backbone
    identity: dict
    path: Path
    splits: tuple[str, ...]
    crop: str
    margin: float
    image_size: int | None
    batch_size: int
    workers: int
    device: str
    precision: str
    skip_bad: bool
    data_dir: Path
    world_size: int
    carry: dict = dataclasses.field(default_factory=dict)
    distrusted: str | None = None
    lock, label = "extract-features", "extract"

    def __post_init__(self):
        self.row_shape = (self.bb.num_features,)

    def pending(self):
        self.carry, self.distrusted = features.existing_splits(self.path, self.identity)
        return tuple(s for s in self.splits if s not in self.carry)

    def dataset(self, split):
        return loaders.eval_dataset(self.manifest, split, self.bb.transform, self.device, self.crop, self.margin)

    def start(self, todo):
        self.body = prepare_body(self.bb.body, self.device, transforms.side(self.bb.transform), self.bb.transform)
        return dict(
            self.identity,
            transform=transforms.transform_key(self.bb.transform),
            splits=list(todo),
            feature_dim=self.bb.num_features,
            batch_size=self.batch_size,
        )

    def partial(self, meta, sizes, chunk_rows, join):
        return features.PartialCache(self.path, meta, sizes, chunk_rows, join=join)

    def loader(self, split, dataset, rows):
        return loaders.eval_loader(dataset, rows, self.batch_size, self.workers, self.device, self.bb.transform)

    def check_bad(self, bad):
        if not self.skip_bad:
            first = bad[0].error()
            raise BadImageError(
                first.path,
                first.reason,
                "leave such files out with --skip-bad (they are listed in the cache), "
                f"or replace them; then rerun the same command to resume. {first.hint}",
            )

    def compute(self, images):
        return embed(self.body, images, self.device, self.precision, self.bb.transform).numpy()

    def write_chunk(self, partial, split, start, block, valid, reasons):
        partial.write_chunk(split, start, block, valid, reasons)

    def finish(self, partial, datasets, todo):
        bb, manifest = self.bb, self.manifest
        attrs = dict(
            self.identity,
            weights_sha256=bb.weights_file_sha256 or "",
            class_names=manifest.class_names,
            num_classes=manifest.num_classes,
            feature_dim=bb.num_features,
            backbone_params=sum(p.numel() for p in bb.body.parameters()),
            versions=runtime.versions(),
            options={
                "splits": sorted(set(todo) | set(self.carry)),
                "dataset_splits": list(manifest.splits),
                "batch_size": self.batch_size,
                "workers": self.workers,
                "device": self.device,
                "device_name": runtime.device_name(self.device),
                "image_size": self.image_size,
                "data_dir": str(self.data_dir),
                "world_size": self.world_size,
            },
        )
        return partial.finalize(attrs, frozen_pass.records(datasets), self.carry)
