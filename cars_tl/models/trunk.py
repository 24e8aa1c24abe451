"""A network cut in two at the first module that trains: a frozen *trunk* run once over the images
into a trunk cache (:mod:`cars_tl.artifacts.trunks`), and a trainable *top* that fine-tuning runs
on the cached maps.

Families with a known execution order (both forward passes are written out here and checked
against the network's own ``forward`` in the tests):

torchvision ResNets (resnet18 ... resnext, wide_resnet)
    ``conv1 bn1 relu maxpool layer1 layer2 layer3 layer4`` then ``avgpool``, flatten, ``fc``.
timm EfficientNet-style models (``conv_stem``, ``blocks``, ``forward_head``)
    ``conv_stem bn1 blocks.0 ... blocks.N conv_head bn2`` then ``forward_head`` (pool, dropout, classifier).

The cut is before the first unit with a trainable parameter: ``--unfreeze layer4`` caches the maps
after ``layer3``, ``--unfreeze blocks.6`` those after ``blocks.5``. :func:`plan` says whether the
cache is exact for a fine-tune (and why not, in one line, when it is not); :func:`build` writes it
(sharded over torchrun ranks like extract-features); :class:`CachedBatches` yields batches of maps
in the very order and shape the image loaders would, from memory, a memory map or device memory.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cars_tl.artifacts import names, trunks
from cars_tl.core import distributed, locks, runtime
from cars_tl.core.errors import BadImageError, CarsTLError
from cars_tl.core.progress import NULL
from cars_tl.data import loaders, transforms
from cars_tl.data.dataset import CarsDataset
from cars_tl.models import backbones

CHUNK_BATCHES = 4
DEVICE_FRACTION = 0.5  # the cache goes to accelerator memory when it takes at most this share of the free memory
# Parameter-free modules whose output does not depend on train/eval mode: the only ones the frozen
# part may leave in train mode (a dropout or drop-path there would change its maps per batch).
MODE_FREE = (nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid)
MODE_FREE += (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Sequential, nn.ModuleList)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


# --------------------------------------------------------------------------- splitting a network


def units(body: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The body's modules in execution order up to the pooling, or None for an unknown family."""
    if all(hasattr(body, n) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer4", "avgpool", "fc")):
        names = ["conv1", "bn1", "relu", "maxpool"] + [
            n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(body, n)
        ]
        return [(n, getattr(body, n)) for n in names]
    if all(hasattr(body, n) for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")) and isinstance(
        body.blocks, nn.Sequential
    ):
        return (
            [("conv_stem", body.conv_stem), ("bn1", body.bn1)]
            + [(f"blocks.{i}", b) for i, b in enumerate(body.blocks)]
            + [("conv_head", body.conv_head), ("bn2", body.bn2)]
        )
    return None


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def cut_index(body: nn.Module) -> int | None:
    """Index of the first unit with a trainable parameter (None: unknown family or nothing trains)."""
    seq = units(body)
    if seq is None:
        return None
    return next((i for i, (_, m) in enumerate(seq) if _trains(m)), None)


def finish(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooling and what follows the last unit (the body's classifier is an identity)."""
    if hasattr(body, "forward_head"):
        return body.forward_head(x)
    return body.fc(torch.flatten(body.avgpool(x), 1))


class Trunk(nn.Module):
    """Units ``[0, cut)`` of a body (shared, not copied)."""

    def __init__(self, body: nn.Module, cut: int):
        super().__init__()
        self.parts = nn.ModuleList(m for _, m in units(body)[:cut])

    def forward(self, x):
        for m in self.parts:
            x = m(x)
        return x


class Top(nn.Module):
    """``head(body-from-unit-cut(maps))`` of a :class:`~cars_tl.models.backbones.ClassifierModel`:
    what fine-tuning runs on cached maps. ``model`` is the whole network (a submodule, so
    ``.train()``/``.eval()`` and DDP see its parameters); its state dict stays the run's."""

    def __init__(self, model: nn.Module, cut: int):
        super().__init__()
        self.model = model
        self.cut = cut

    def forward(self, maps):
        body = self.model.body
        x = maps
        for _, m in units(body)[self.cut :]:
            x = m(x)
        return self.model.head(finish(body, x))


# --------------------------------------------------------------------------- when the cache is exact


@dataclasses.dataclass
class Plan:
    """The decision for one fine-tune: ``path`` is None when the image path runs (``reason`` says why)."""

    path: Path | None
    reason: str | None
    identity: dict | None = None
    cut: int | None = None

    def record(self) -> dict:
        return {
            "used": self.path is not None,
            "path": str(self.path) if self.path else None,
            "reason": self.reason,
            **(
                {
                    "cut": self.identity["cut"],
                    "top": self.identity["top"],
                    "storage": self.identity["storage"],
                    "precision": self.identity["precision"],
                }
                if self.identity
                else {}
            ),
        }


def storage_for(precision: str, storage: str = "auto") -> str:
    """``auto``: the dtype the trunk's output already has under ``precision`` (bf16/fp16 autocast:
    16-bit, exact; fp32: fp32, exact). fp16 or bf16 storage of fp32 maps halves the size and rounds
    them (measured cost: README, "Trunk cache")."""
    if storage == "auto":
        return precision
    if storage not in trunks.STORAGES:
        raise CarsTLError(f"unknown --trunk-dtype {storage!r}; valid: auto, {', '.join(trunks.STORAGES)}")
    return storage


def identity_for(bb, model, cut: int, crop: str, margin: float, precision: str, storage: str, manifest) -> dict:
    seq = units(model.body)
    return {
        "backbone": bb.name,
        "weights": bb.weights,
        "weights_digest": bb.weights_digest,
        # The frozen part as it is now, not as the weights file made it: a resumed run may have
        # trained these layers in earlier epochs (e.g. --unfreeze all, then --resume --force --unfreeze layer4).
        "trunk_digest": backbones.state_digest(Trunk(model.body, cut).state_dict()),
        "transform": transforms.transform_key(bb.transform),
        "crop": crop,
        "margin": float(margin),
        "precision": precision,
        "storage": storage,
        "cut": seq[cut - 1][0],
        "top": seq[cut][0],
        "dataset_fingerprint": manifest.fingerprint,
    }


def plan(choice: str, model, bb, config: dict, manifest, artifacts: Path, storage: str = "auto") -> Plan:
    """Whether the trunk cache is exact for this fine-tune (``model`` already in train mode, as its
    epochs run it): ``choice`` is auto | off | PATH. Returns the cache's path (maybe not built yet)
    or the one-line reason the image path runs."""
    if choice == "off":
        return Plan(None, "--trunk-cache off: trunk cache not used")
    if config.get("tta", "none") not in (None, "none"):
        return Plan(
            None,
            f"--tta {config['tta']} evaluates mirrored images, and a mirrored image's maps are not the mirrored maps: trunk cache not used",
        )
    if config.get("augment", "none") != "none":
        return Plan(
            None, f"{config.get('preset')} preset augments images (--augment {config['augment']}): trunk cache not used"
        )
    body = model.body
    seq = units(body)
    if seq is None:
        return Plan(
            None,
            f"no known cut point for backbone {bb.name} (torchvision ResNets and timm EfficientNets have one): trunk cache not used",
        )
    cut = cut_index(body)
    if cut is None:
        return Plan(
            None,
            "nothing in the backbone trains: trunk cache not used (extract-features + train-head is the cached path)",
        )
    if cut == 0:
        return Plan(
            None,
            f"{seq[0][0]}, the network's first module, trains (--unfreeze {config.get('unfreeze')}): no frozen part to cache: trunk cache not used",
        )
    moving = [
        f"{name}.{n}" if n else name
        for name, unit in seq[:cut]
        for n, m in unit.named_modules()
        if m.training and not isinstance(m, MODE_FREE)
    ]
    if moving:
        return Plan(
            None,
            f"the frozen part would run in train mode ({moving[0]}): its output changes per batch: trunk cache not used",
        )
    storage = storage_for(config["precision"], storage)
    identity = identity_for(bb, model, cut, config["crop"], config["margin"], config["precision"], storage, manifest)
    if choice == "auto":
        key = {k: identity[k] for k in trunks.IDENTITY_KEYS}
        return Plan(names.trunk_path(artifacts, bb.name, bb.weights, key), None, identity, cut)
    path = Path(choice)
    if path.exists():
        try:
            attrs = trunks.read_attrs(path)
        except CarsTLError as exc:
            if _damaged_hdf5(path):  # a truncated or overwritten cache: ensure() rebuilds it and says why
                return Plan(path, None, identity, cut)
            return Plan(None, f"{exc.message}: trunk cache not used")
        why = mismatch(attrs, identity, seq)
        if why:
            return Plan(None, f"{path} {why}: trunk cache not used")
    return Plan(path, None, identity, cut)


def _damaged_hdf5(path: Path) -> bool:
    """An empty file, an HDF5 file that does not open, or a trunk cache of an older schema: a cache to
    rebuild. Any other file named by mistake (a feature cache, a newer cars_tl's cache) is left alone."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(HDF5_SIGNATURE))
    except OSError:
        return False
    if head == b"":
        return True
    if head != HDF5_SIGNATURE:
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            kind, schema = f.attrs.get("kind"), f.attrs.get("schema_version")
    except Exception:  # cut short or overwritten: h5py's errors are many; none of them makes it another file
        return True
    if isinstance(kind, bytes):
        kind = kind.decode("utf-8", "replace")
    try:
        older = int(schema) < trunks.SCHEMA_VERSION
    except (TypeError, ValueError):
        older = False
    return kind == trunks.KIND and older


def mismatch(attrs: dict, identity: dict, seq) -> str | None:
    """Why a cache made with ``attrs`` is not exact for ``identity`` (None when it is)."""
    names = [n for n, _ in seq]
    if attrs.get("dataset_fingerprint") != identity["dataset_fingerprint"]:
        return "was built from another dataset (fingerprint differs)"
    if attrs.get("backbone") != identity["backbone"] or attrs.get("weights_digest") != identity["weights_digest"]:
        return f"was built from other weights ({attrs.get('backbone')} {attrs.get('weights')})"
    if attrs.get("cut") != identity["cut"]:
        if attrs.get("cut") in names and names.index(attrs["cut"]) >= names.index(identity["cut"]):
            return f"cuts after {attrs['cut']}, but {identity['top']} below that cut trains in this run"
        return f"cuts after {attrs.get('cut')}, this run's frozen part ends at {identity['cut']}"
    if attrs.get("trunk_digest") != identity["trunk_digest"]:
        return "was built from other weights of the frozen part (e.g. before a resumed run had trained them)"
    if (
        not transforms.same_transform(
            json.loads(attrs["transform"]) if isinstance(attrs.get("transform"), str) else attrs.get("transform", {}),
            json.loads(identity["transform"]),
        )
        or attrs.get("crop") != identity["crop"]
        or float(attrs.get("margin", 0.0)) != identity["margin"]
    ):
        return "was built with other preprocessing (transform, crop or margin differ)"
    if attrs.get("precision") != identity["precision"]:
        return (
            f"was built in {attrs.get('precision')}, this run computes in {identity['precision']} (precision mismatch)"
        )
    if attrs.get("storage") != identity["storage"]:
        return f"stores {attrs.get('storage')} maps, this run asks for {identity['storage']}"
    return None


# --------------------------------------------------------------------------- building


def ensure(
    p: Plan,
    model,
    bb,
    manifest,
    *,
    crop: str,
    margin: float,
    batch_size: int,
    workers: int,
    device: str,
    precision: str,
    progress=None,
    ctx=distributed.SINGLE,
) -> dict:
    """Build the cache of plan ``p`` unless a verified file of the same inputs is there; returns
    {action, seconds, why a file was replaced}. Every torchrun rank calls it."""
    path, identity, cut = p.path, p.identity, p.cut
    started = time.perf_counter()
    # Rank 0 holds the lock and decides; the other ranks build their shards of the chunks only.
    with distributed.rank0_output(ctx, lambda: locks.writer_lock(path, "trunk-cache")):
        fresh, why = trunks.check_existing(path, identity) if ctx.is_main else (False, None)
        fresh = json.loads(distributed.broadcast_text(json.dumps(fresh), ctx) if ctx.active else json.dumps(fresh))
        if fresh:
            return {"action": "up to date", "seconds": round(time.perf_counter() - started, 3)}
        trunk = Trunk(model.body, cut).to(device, memory_format=torch.channels_last).eval()
        # Each split through the pipeline the image path feeds it through, on the data path that
        # path takes (not the device's name): train through the training transform (the evaluation
        # loaders' fused normalisation rounds differently in the last bit), test through the
        # evaluation loaders, so that cached maps are those training and evaluation would compute.
        transform = transforms.train_transform(bb.transform, "none", loaders.data_path(device).batch_dtype)
        datasets = {
            s: CarsDataset(manifest, s, transform, crop, margin, mark_bad=True)
            if s == "train"
            else loaders.eval_dataset(manifest, s, bb.transform, device, crop, margin)
            for s in ("train", "test")
            if s in manifest.splits
        }
        size = bb.transform["crop"]
        with torch.inference_mode():
            probe = trunk(torch.zeros(1, 3, size, size, device=device).contiguous(memory_format=torch.channels_last))
        shape = tuple(probe.shape[1:])
        meta = dict(identity, map_shape=list(shape), batch_size=batch_size)
        sizes = {s: len(d) for s, d in datasets.items()}
        chunk_rows = batch_size * CHUNK_BATCHES
        partial = trunks.PartialTrunk(path, meta, sizes, chunk_rows) if ctx.is_main else None
        distributed.barrier(ctx)
        if not ctx.is_main:
            partial = trunks.PartialTrunk(path, meta, sizes, chunk_rows, join=True)
        resumed = partial.resumed_rows
        for index, (split, dataset) in enumerate(datasets.items()):
            order = ctx if index % 2 == 0 else dataclasses.replace(ctx, rank=ctx.world_size - 1 - ctx.rank)
            shard = distributed.shard_range(len(dataset), order, align=chunk_rows)
            for rows in partial.missing_runs(split, shard):
                _build_rows(
                    trunk,
                    dataset,
                    split,
                    rows,
                    partial,
                    batch_size,
                    workers,
                    device,
                    precision,
                    identity["storage"],
                    bb,
                    progress,
                )
        distributed.barrier(ctx)
        if ctx.is_main:
            attrs = dict(
                identity,
                weights_sha256=bb.weights_file_sha256 or "",
                class_names=manifest.class_names,
                num_classes=manifest.num_classes,
                map_shape=list(shape),
                versions=runtime.versions(),
                options={
                    "batch_size": batch_size,
                    "device": device,
                    "world_size": ctx.world_size,
                    "splits": list(datasets),
                },
            )
            rows = {
                s: {
                    "labels": [r.label for r in d.records],
                    "ids": [r.index for r in d.records],
                    "paths": [r.path for r in d.records],
                }
                for s, d in datasets.items()
            }
            partial.finalize(attrs, rows)
        distributed.barrier(ctx)  # the file is in place before any rank reads it
    return {
        "action": "resumed" if resumed else "built",
        "seconds": round(time.perf_counter() - started, 3),
        "replaced": why,
    }


def _build_rows(
    trunk, dataset, split, rows, partial, batch_size, workers, device, precision, storage, bb, progress
) -> None:
    if split == "train":
        loader = loaders.make_loader(dataset, batch_size, workers, device, sampler=list(rows))
    else:
        loader = loaders.eval_loader(dataset, list(rows), batch_size, workers, device, bb.transform)
    chunk_start, pending = rows.start, []
    with (progress or NULL).task(f"trunk cache {split}", total=len(rows), unit="img") as t:
        for maps, _, positions in _trunk_batches(trunk, loader, device, precision, bb.transform):
            pending.append(trunks.from_float(maps.float(), storage))
            t.advance(len(positions))
            done = sum(map(len, pending))
            end = min(chunk_start + partial.chunk_rows, rows.stop)
            if chunk_start + done >= end:
                block = np.concatenate(pending)
                partial.write_chunk(split, chunk_start, block[: end - chunk_start])
                pending = [block[end - chunk_start :]] if len(block) > end - chunk_start else []
                chunk_start = end


def _trunk_batches(trunk, loader, device: str, precision: str, spec: dict):
    """(maps, labels, positions) of each image batch of ``loader``; a bad image stops the build."""
    for images, labels, positions, bad in loader:
        if bad:
            first = bad[0].error()
            raise BadImageError(
                first.path, first.reason, "a trunk cache needs every image: replace the file, then rerun to resume"
            )
        images = loaders.batch_to_device(images, device, spec)
        with torch.inference_mode(), runtime.autocast(device, precision):
            maps = trunk(images)
        yield maps, labels, positions


def evaluation_store(trunk, loader, device: str, precision: str, storage: str, spec: dict, map_shape, native: bool):
    """The maps of an image evaluation ``loader`` (the validation rows, whose cached train maps went
    through the training transform), stored and read back as the cache's are: (store, labels)."""
    parts, labels = [np.empty((0, *map_shape), trunks.NUMPY_DTYPE[storage])], [np.empty(0, np.int64)]
    for maps, batch_labels, _ in _trunk_batches(trunk, loader, device, precision, spec):
        parts.append(trunks.from_float(maps.float(), storage))
        labels.append(batch_labels.numpy())
    split = trunks.TrunkSplit(np.concatenate(parts), np.concatenate(labels), np.empty(0), [], storage, "memory")
    return to_device(split, device, native=native), split.labels


# --------------------------------------------------------------------------- reading


class CachedBatches:
    """Batches ``(maps, labels, positions, [])`` shaped as the image loaders' ``(images, labels,
    positions, bad)``: from ``sampler`` keys (``epoch * n + position``, as EpochSampler and the
    sharded sampler give them; ``index`` maps a position to a cache row, e.g. a Subset's indices) or
    from fixed ``positions`` in order. ``store`` is a :class:`~cars_tl.artifacts.trunks.TrunkSplit`
    or, on an accelerator, a device tensor of float maps (see :func:`to_device`); it holds the
    rows from ``base`` on, and ``labels`` are its rows' labels."""

    def __init__(
        self,
        store,
        labels: np.ndarray,
        batch_size: int,
        *,
        sampler=None,
        positions=None,
        index=None,
        base: int = 0,
        native: bool = False,
    ):
        self.store, self.labels, self.batch_size = store, np.asarray(labels), batch_size
        self.sampler, self.positions = sampler, None if positions is None else np.asarray(list(positions), np.int64)
        self.index = None if index is None else np.asarray(index, np.int64)
        self.base, self.native = base, native
        self.size = len(self.index) if self.index is not None else len(self.labels)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.positions)
        return -(-n // self.batch_size)

    def _batch(self, positions: np.ndarray):
        rows = self.index[positions] if self.index is not None else positions
        local = rows - self.base
        if isinstance(self.store, torch.Tensor):
            maps = self.store[torch.as_tensor(local, device=self.store.device)]
        else:
            maps = trunks.to_float(self.store.rows(local), self.store.storage, self.native)
        return maps, torch.as_tensor(self.labels[local]), torch.as_tensor(rows), []

    def __iter__(self):
        if self.sampler is not None:
            order = np.fromiter((int(k) % self.size for k in iter(self.sampler)), np.int64)
        else:
            order = self.positions
        for start in range(0, len(order), self.batch_size):
            yield self._batch(order[start : start + self.batch_size])


def to_device(split: trunks.TrunkSplit, device: str, force: bool = False, native: bool = False):
    """The split's maps as one float tensor in ``device`` memory when it fits (``force``: also on
    the CPU, for tests of the device path), else the split itself (rows gathered per batch)."""
    if not (device.startswith("cuda") or force):
        return split
    per_row = int(np.prod(split.maps.shape[1:])) * (split.maps.dtype.itemsize if native else 4)
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if len(split) * per_row > DEVICE_FRACTION * free:
            return split
    dtype = (
        {"fp16": torch.float16, "bf16": torch.bfloat16}.get(split.storage, torch.float32) if native else torch.float32
    )
    out = torch.empty((len(split), *split.maps.shape[1:]), dtype=dtype, device=device)
    step = max(1, (256 << 20) // per_row)
    for start in range(0, len(split), step):
        out[start : start + step] = trunks.to_float(
            split.rows(np.arange(start, min(len(split), start + step))), split.storage, native
        ).to(device)
    return out


def open_store(
    path: Path,
    split: str,
    device: str,
    rows: range | None = None,
    mode: str = "auto",
    on_device: bool = False,
    native: bool = False,
):
    """One split (or this rank's ``rows`` of it) for fine-tuning, after :func:`ensure` verified the
    file: loaded into memory when it fits in half the available memory (shared by the processes of
    a node), else memory-mapped; then moved to accelerator memory when it fits there (``on_device``:
    also on the CPU, which tests the device path). Returns (store, first row held)."""
    import os

    share = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    s = trunks.open_split(path, split, mode="mmap", verify=False)
    if rows is not None:
        s = dataclasses.replace(
            s,
            maps=s.maps[rows.start : rows.stop],
            labels=s.labels[rows.start : rows.stop],
            ids=s.ids[rows.start : rows.stop],
            paths=s.paths[rows.start : rows.stop],
        )
    if trunks.choose_mode(s.maps.nbytes, mode, share) == "memory":
        s = dataclasses.replace(s, maps=np.array(s.maps), mode="memory")
    store = to_device(s, device, force=on_device, native=native)
    return store, (rows.start if rows is not None else 0)


# --------------------------------------------------------------------------- the touch point in finetune


@dataclasses.dataclass
class Source:
    """What fine-tuning reads: ``net`` is the module its steps and evaluations call (the whole
    model, or its :class:`Top` on cached maps); the loaders replace the image loaders when cached."""

    net: nn.Module
    record: dict
    train_loader: object = None
    eval_loaders: dict | None = None

    @property
    def cached(self) -> bool:
        return self.train_loader is not None


def data_source(
    choice: str,
    model,
    bb,
    manifest,
    config: dict,
    *,
    artifacts: Path = Path("artifacts"),
    storage: str = "auto",
    fit_idx=None,
    val_idx=None,
    sampler=None,
    local_batch: int,
    eval_batch: int,
    workers: int,
    device: str,
    ctx=distributed.SINGLE,
    progress=NULL,
    read_mode: str = "auto",
    on_device: bool = False,
    train_mode=None,
    val_images=None,
) -> Source:
    """Plan (after ``train_mode(model)``: the modes the epochs run in), build if missing, open the
    cache and make the loaders; or say in ``record["reason"]`` (and once on ``progress``) why the
    image path runs. ``fit_idx``/``val_idx``: the train rows trained on and validated on (with a
    validation split), ``sampler``: the training sampler (its keys pick positions of ``fit_idx``),
    ``val_images``: the image path's validation loader (its maps are computed once, from it)."""
    if train_mode is not None:
        train_mode(model)
    p = plan(choice, model, bb, config, manifest, artifacts, storage)
    model.eval()
    if p.path is None:
        if ctx.is_main and choice != "off":
            progress.log(p.reason)
        return Source(model, p.record())
    # Built in batches of the global training batch on every rank: the maps do not depend on the process count.
    built = ensure(
        p,
        model,
        bb,
        manifest,
        crop=config["crop"],
        margin=config["margin"],
        batch_size=config["batch_size"],
        workers=workers,
        device=device,
        precision=config["precision"],
        progress=progress,
        ctx=ctx,
    )
    train_labels, test_labels = _labels(p.path, "train"), _labels(p.path, "test")
    # 16-bit maps of a 16-bit autocast run go in as they are (what the trunk handed on); others as float32.
    native = p.identity["storage"] == p.identity["precision"] != "fp32"
    # Under torchrun each epoch deals every rank other rows of train: memory-mapped (one page cache per node),
    # a rank reads only the rows dealt to it; the test split is cut into shards and each rank holds its own.
    train_mode_read = "mmap" if ctx.active and read_mode == "auto" and not device.startswith("cuda") else read_mode
    train, _ = open_store(p.path, "train", device, mode=train_mode_read, on_device=on_device, native=native)
    has_val = val_idx is not None and len(val_idx) > 0
    train_loader = CachedBatches(
        train, train_labels, local_batch, sampler=sampler, index=np.asarray(fit_idx) if has_val else None, native=native
    )
    test_rows = distributed.shard_range(len(test_labels), ctx)
    test, base = open_store(
        p.path,
        "test",
        device,
        rows=test_rows if ctx.active else None,
        mode=read_mode,
        on_device=on_device,
        native=native,
    )
    eval_loaders = {
        "test": CachedBatches(
            test, test_labels[base : base + len(test)], eval_batch, positions=test_rows, base=base, native=native
        )
    }
    map_shape = trunks.read_attrs(p.path)["map_shape"]
    if has_val:
        # Evaluated as the image path evaluates them: through the evaluation loader, not the training transform.
        val, val_labels = evaluation_store(
            Trunk(model.body, p.cut),
            val_images,
            device,
            config["precision"],
            p.identity["storage"],
            bb.transform,
            map_shape,
            native,
        )
        eval_loaders["val"] = CachedBatches(
            val, val_labels, eval_batch, positions=range(len(val_labels)), native=native
        )
    mode = "device" if isinstance(train, torch.Tensor) else train.mode
    per_image = int(np.prod(map_shape)) * np.dtype(trunks.NUMPY_DTYPE[p.identity["storage"]]).itemsize
    record = dict(p.record(), **built, read=mode, bytes_per_image=per_image)
    if ctx.is_main:
        if built.get("replaced"):
            progress.log(f"trunk cache {p.path} rebuilt: the file there was not used ({built['replaced']})")
        progress.log(
            f"trunk cache {p.path} ({built['action']}; frozen part up to {p.identity['cut']}, read from {mode}): "
            f"each epoch runs {p.identity['top']} and above only"
        )
    return Source(Top(model, p.cut), record, train_loader, eval_loaders)


def _labels(path: Path, split: str) -> np.ndarray:
    return trunks.open_split(path, split, mode="mmap", verify=False).labels
