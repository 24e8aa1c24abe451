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
import json
import time
from pathlib import Path

import numpy as np

from cars_tl.artifacts import features, names
from cars_tl.core import distributed, locks, runtime
from cars_tl.core.errors import (
    BadImageError,
    CarsTLError,
    check_number,
    check_output_path,
)
from cars_tl.core.progress import NULL, Progress
from cars_tl.data import devkit, loaders, transforms
from cars_tl.data import manifest as manifests
from cars_tl.models import backbones, feature_views
from cars_tl.models.feature_views import embed, prepare_body
from cars_tl.stages import presets

CHUNK_BATCHES = 4


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
    crop: str = "full",
    margin: float = 0.0,
    image_size: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    skip_bad: bool = False,
    out: Path | None = None,
    artifacts: Path = Path("artifacts"),
    progress: Progress = NULL,
    resize_mode: str | None = None,
    tta: str | None = None,
    layers: str | None = None,
    combine: str = feature_views.DEFAULT_COMBINE,
    preset: str | None = None,
) -> ExtractResult:
    """Extract pooled features for ``splits`` (default: every split the dataset has) into an HDF5
    cache (see :mod:`cars_tl.artifacts.features`).

    ``workers``: decode threads on the CPU, DataLoader worker processes on CUDA (default:
    :func:`loaders.default_workers` for the device, as finetune). ``resize_mode``: crop | squash | pad (see :mod:`cars_tl.data.transforms`).
    ``tta`` (none | flip), ``layers`` (final | default | A,B,...) and ``combine`` (l2 | raw): what a
    row is made of (:mod:`cars_tl.models.feature_views`). ``preset`` (study | tuned, see
    :func:`cars_tl.stages.presets.for_stage`) gives resize_mode, image_size, tta and layers unless passed (None: study).
    Tunes glibc malloc for the process (:func:`runtime.tune_malloc`).

    Under ``torchrun`` every process calls this: each extracts a contiguous, chunk-aligned shard of
    every split into its own chunks; rank 0 holds the file's writer lock, waits for the others and
    merges the chunks into the one ``.h5`` (the same arrays as one process makes).
    """
    for split in splits or ():
        if split not in devkit.SPLITS:
            raise CarsTLError(f"unknown split {split!r}; valid: {', '.join(devkit.SPLITS)}")
    if crop not in ("full", "box"):
        raise CarsTLError(f"unknown --crop {crop!r}; valid: full, box")
    if batch_size < 1:
        raise CarsTLError(f"--batch-size must be positive, got {batch_size}")
    check_number("--margin", margin, minimum=0)
    chosen = presets.for_stage(
        "extract-features", preset, resize_mode=resize_mode, image_size=image_size, tta=tta, layers=layers
    )
    resize_mode, image_size, layers = chosen["resize_mode"], chosen["image_size"], chosen["layers"]
    tta = feature_views.check_tta(chosen["tta"])
    manifest = manifests.load_manifest(data_dir)
    splits = manifest.splits if splits is None else splits
    ctx = distributed.init(runtime.resolve_device(device))
    device = ctx.device
    precision = runtime.resolve_precision(precision, device)
    runtime.prepare_device(device, precision)
    workers = loaders.default_workers(device) if workers is None else workers
    runtime.tune_malloc()
    bb = backbones.build_backbone(backbone, weights, image_size, resize_mode)
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
        "margin": float(margin),
        "precision": precision,
        "dataset_fingerprint": manifest.fingerprint,
        "skip_bad": bool(skip_bad),
    }
    # Rank 0 alone holds the lock; the other ranks write only their own chunk files.
    with distributed.rank0_output(ctx, lambda: locks.writer_lock(out, "extract-features")):
        return _extract_locked(
            manifest,
            bb,
            identity=identity,
            out=out,
            splits=splits,
            crop=crop,
            margin=margin,
            image_size=image_size,
            batch_size=batch_size,
            workers=workers,
            device=device,
            precision=precision,
            skip_bad=skip_bad,
            data_dir=data_dir,
            progress=progress,
            ctx=ctx,
        )


def with_feature_options(bb: backbones.Backbone, tta: str, layers: list[str], combine: str) -> backbones.Backbone:
    """``bb`` with the feature options in its transform spec and its row width (several layers:
    the columns of each, measured on one image of the final size)."""
    spec = feature_views.with_options(bb.transform, tta, layers, combine)
    if layers == [feature_views.FINAL]:
        return dataclasses.replace(bb, transform=spec)
    probe = feature_views.FeatureBody(bb.body, layers, "none", combine)
    columns = probe.columns(bb.transform["crop"])
    probe.close()
    spec = feature_views.with_options(bb.transform, tta, layers, combine, columns)
    return dataclasses.replace(bb, transform=spec, num_features=max(stop for _, stop in columns.values()))


def _extract_locked(
    manifest,
    bb,
    *,
    identity,
    out,
    splits,
    crop,
    margin,
    image_size,
    batch_size,
    workers,
    device,
    precision,
    skip_bad,
    data_dir,
    progress,
    ctx=distributed.SINGLE,
) -> ExtractResult:
    # Splits already extracted alike are kept (extracting test after train adds to the file); an
    # existing file that does not verify is never trusted: it is extracted again, and we say why.
    carry, distrusted, todo = {}, None, ()
    if ctx.is_main:
        carry, distrusted = features.existing_splits(out, identity)
        todo = tuple(s for s in splits if s not in carry)
    datasets = {s: loaders.eval_dataset(manifest, s, bb.transform, device, crop, margin) for s in todo}
    identity_meta = dict(
        identity,
        transform=transforms.transform_key(bb.transform),
        splits=list(todo),
        feature_dim=bb.num_features,
        batch_size=batch_size,
    )
    partial = (
        features.PartialCache(out, identity_meta, {s: len(d) for s, d in datasets.items()}, batch_size * CHUNK_BATCHES)
        if todo
        else None
    )
    # The other ranks join once rank 0 has prepared the chunk folder (and learn which splits are to do).
    todo = tuple(json.loads(distributed.broadcast_text(json.dumps(todo), ctx) or "[]")) if ctx.active else todo
    if not todo:
        return ExtractResult(out, "up to date", {}, {}, 0.0, 0.0, precision, device)
    if not ctx.is_main:
        datasets = {s: loaders.eval_dataset(manifest, s, bb.transform, device, crop, margin) for s in todo}
        identity_meta.update(splits=list(todo))
        partial = features.PartialCache(
            out, identity_meta, {s: len(d) for s, d in datasets.items()}, batch_size * CHUNK_BATCHES, join=True
        )
    resumed = partial.resumed_rows
    body = prepare_body(bb.body, device, bb.transform["crop"], bb.transform)
    start_time, processed = time.perf_counter(), 0
    skipped: dict[str, int] = {}
    for index, (split, dataset) in enumerate(datasets.items()):
        # Chunk-aligned shards: every rank's chunks are whole chunks of the one-process layout, valid for any N.
        # Every other split deals its shards in reverse rank order, so that the short last chunks do not all
        # fall to the same rank.
        order = ctx if index % 2 == 0 else dataclasses.replace(ctx, rank=ctx.world_size - 1 - ctx.rank)
        shard = distributed.shard_range(len(dataset), order, align=partial.chunk_rows)
        processed += _extract_split(
            body, dataset, split, shard, partial, batch_size, workers, device, precision, skip_bad, bb, progress
        )
    distributed.barrier(ctx)  # every rank's chunks are written
    processed = int(distributed.all_reduce_sum([processed], ctx)[0])
    seconds = time.perf_counter() - start_time
    if not ctx.is_main:
        return ExtractResult(
            out, "extracted shard", {}, {}, seconds, processed / seconds if seconds > 0 else 0.0, precision, device
        )
    rows = {
        s: {
            "labels": [r.label for r in d.records],
            "ids": [r.index for r in d.records],
            "paths": [r.path for r in d.records],
        }
        for s, d in datasets.items()
    }
    attrs = dict(
        identity,
        weights_sha256=bb.weights_file_sha256 or "",
        class_names=manifest.class_names,
        num_classes=manifest.num_classes,
        feature_dim=bb.num_features,
        backbone_params=sum(p.numel() for p in bb.body.parameters()),
        versions=runtime.versions(),
        options={
            "splits": sorted(set(todo) | set(carry)),
            "dataset_splits": list(manifest.splits),
            "batch_size": batch_size,
            "workers": workers,
            "device": device,
            "device_name": runtime.device_name(device),
            "image_size": image_size,
            "data_dir": str(data_dir),
            "world_size": ctx.world_size,
        },
    )
    written = partial.finalize(attrs, rows, carry)
    for s in todo:
        skipped[s] = len(written[s].skipped)
    return ExtractResult(
        out,
        "resumed" if resumed else "extracted",
        {s: len(written[s].labels) for s in todo},
        skipped,
        seconds,
        processed / seconds if seconds > 0 else 0.0,
        precision,
        device,
        distrusted,
    )


def _extract_split(
    body, dataset, split, shard, partial, batch_size, workers, device, precision, skip_bad, bb, progress
) -> int:
    """Extract the chunks of ``shard`` (rows of ``split``) that are not complete yet; returns the rows done."""
    missing = partial.missing_runs(split, shard)
    todo = sum(map(len, missing))
    if not todo:
        return 0
    with progress.task(f"extract {split}", total=len(shard), unit="img") as task:
        task.advance(len(shard) - todo)
        for rows in missing:
            _extract_rows(
                body, dataset, split, rows, partial, batch_size, workers, device, precision, skip_bad, bb, task
            )
    return todo


def _extract_rows(
    body, dataset, split, rows, partial, batch_size, workers, device, precision, skip_bad, bb, task
) -> None:
    total, dim = rows.stop, bb.num_features
    loader = loaders.eval_loader(dataset, rows, batch_size, workers, device, bb.transform)
    chunk_rows = partial.chunk_rows
    chunk_start = cursor = rows.start
    buffer = np.zeros((min(chunk_rows, total - chunk_start), dim), np.float32)
    valid = np.zeros(len(buffer), bool)
    reasons: dict[int, str] = {}
    for images, _, positions, bad in loader:
        if not skip_bad and bad:  # raised here, in the main process, so the error names the file
            first = bad[0].error()
            raise BadImageError(
                first.path,
                first.reason,
                "leave such files out with --skip-bad (they are listed in the cache), "
                f"or replace them; then rerun the same command to resume. {first.hint}",
            )
        reasons.update({item.position: item.reason for item in bad})
        # The dataset yields its own positions, so they are absolute whichever loader resumes mid-split.
        if len(positions):
            rel = positions.numpy() - chunk_start
            buffer[rel] = embed(body, images, device, precision, bb.transform).numpy()
            valid[rel] = True
        consumed = min(batch_size, total - cursor)
        cursor += consumed
        task.advance(consumed)
        if cursor - chunk_start >= len(buffer):
            partial.write_chunk(
                split, chunk_start, buffer, valid, {p: r for p, r in reasons.items() if p >= chunk_start}
            )
            reasons = {}
            chunk_start = cursor
            buffer = np.zeros((min(chunk_rows, total - chunk_start), dim), np.float32)
            valid = np.zeros(len(buffer), bool)
