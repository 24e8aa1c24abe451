"""The trunk cache's data: building it (one frozen pass of the :class:`~cars_tl.models.trunk.Trunk`,
:mod:`cars_tl.models.frozen_pass`, sharded over torchrun ranks like extract-features), reading it
back (:class:`CachedBatches` yields batches of maps in the very order and shape the image loaders
would, from memory, a memory map or device memory) and finetune's touch point (:func:`data_source`).
When the cache is exact, and where the network is cut: :mod:`cars_tl.models.trunk`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cars_tl.artifacts import trunks
from cars_tl.core import distributed, runtime
from cars_tl.core.errors import BadImageError
from cars_tl.core.progress import NULL
from cars_tl.data import loaders, transforms
from cars_tl.data.dataset import CarsDataset
from cars_tl.models import frozen_pass
from cars_tl.models.trunk import Plan, Top, Trunk, plan

DEVICE_FRACTION = 0.5  # the cache goes to accelerator memory when it takes at most this share of the free memory


# --------------------------------------------------------------------------- building


@dataclasses.dataclass
class _TrunkJob(frozen_pass.Job):
    """The frozen part's maps of every split, stored as ``identity["storage"]``: rebuilt whole
    unless a verified file of the same inputs is there (``replaced`` says why one was not used)."""

    path: Path
    identity: dict
    trunk: nn.Module
    bb: object
    manifest: object
    crop: str
    margin: float
    batch_size: int
    workers: int
    device: str
    precision: str
    world_size: int
    replaced: str | None = None
    lock, label = "trunk-cache", "trunk cache"

    def pending(self):
        fresh, self.replaced = trunks.check_existing(self.path, self.identity)
        return () if fresh else tuple(s for s in ("train", "test") if s in self.manifest.splits)

    def dataset(self, split):
        # Each split through the pipeline the image path feeds it through, on the data path that
        # path takes (not the device's name): train through the training transform (the evaluation
        # loaders' fused normalisation rounds differently in the last bit), test through the
        # evaluation loaders, so that cached maps are those training and evaluation would compute.
        if split != "train":
            return loaders.eval_dataset(self.manifest, split, self.bb.transform, self.device, self.crop, self.margin)
        transform = transforms.train_transform(self.bb.transform, "none", loaders.data_path(self.device).batch_dtype)
        return CarsDataset(self.manifest, split, transform, self.crop, self.margin, mark_bad=True)

    def start(self, todo):
        self.trunk = self.trunk.to(self.device, memory_format=torch.channels_last).eval()
        size = transforms.side(self.bb.transform)
        with torch.inference_mode():
            probe = torch.zeros(1, 3, size, size, device=self.device).contiguous(memory_format=torch.channels_last)
            self.row_shape = tuple(self.trunk(probe).shape[1:])
        self.row_dtype = trunks.NUMPY_DTYPE[self.identity["storage"]]
        return dict(self.identity, map_shape=list(self.row_shape), batch_size=self.batch_size)

    def partial(self, meta, sizes, chunk_rows, join):
        return trunks.PartialTrunk(self.path, meta, sizes, chunk_rows, join=join)

    def loader(self, split, dataset, rows):
        if split == "train":
            return loaders.make_loader(dataset, self.batch_size, self.workers, self.device, sampler=list(rows))
        return loaders.eval_loader(dataset, list(rows), self.batch_size, self.workers, self.device, self.bb.transform)

    def check_bad(self, bad):
        _refuse_bad(bad)

    def compute(self, images):
        maps = trunk_maps(self.trunk, images, self.device, self.precision, self.bb.transform)
        return trunks.from_float(maps.float(), self.identity["storage"])

    def write_chunk(self, partial, split, start, block, valid, reasons):
        partial.write_chunk(split, start, block)  # every row is there: check_bad stops at an unreadable image

    def finish(self, partial, datasets, todo):
        attrs = dict(
            self.identity,
            weights_sha256=self.bb.weights_file_sha256 or "",
            class_names=self.manifest.class_names,
            num_classes=self.manifest.num_classes,
            map_shape=list(self.row_shape),
            versions=runtime.versions(),
            options={
                "batch_size": self.batch_size,
                "device": self.device,
                "world_size": self.world_size,
                "splits": list(datasets),
            },
        )
        return partial.finalize(attrs, frozen_pass.records(datasets))


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
    started = time.perf_counter()
    job = _TrunkJob(
        path=p.path,
        identity=p.identity,
        trunk=Trunk(model.body, p.cut),
        bb=bb,
        manifest=manifest,
        crop=crop,
        margin=margin,
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        world_size=ctx.world_size,
    )
    done = frozen_pass.run(job, ctx=ctx, progress=progress or NULL)
    seconds = round(time.perf_counter() - started, 3)
    if done.action == "up to date":
        return {"action": "up to date", "seconds": seconds}
    return {"action": "resumed" if done.action == "resumed" else "built", "seconds": seconds, "replaced": job.replaced}


def _refuse_bad(bad: list) -> None:
    first = bad[0].error()
    raise BadImageError(
        first.path, first.reason, "a trunk cache needs every image: replace the file, then rerun to resume"
    )


def trunk_maps(trunk, images, device: str, precision: str, spec: dict) -> torch.Tensor:
    """The trunk's maps of one image batch, as the image path computes them."""
    images = loaders.batch_to_device(images, device, spec)
    with torch.inference_mode(), runtime.autocast(device, precision):
        return trunk(images)


def evaluation_store(trunk, loader, device: str, precision: str, storage: str, spec: dict, map_shape, native: bool):
    """The maps of an image evaluation ``loader`` (the validation rows, whose cached train maps went
    through the training transform), stored and read back as the cache's are: (store, labels)."""
    parts, labels = [np.empty((0, *map_shape), trunks.NUMPY_DTYPE[storage])], [np.empty(0, np.int64)]
    for images, batch_labels, _, bad in loader:
        if bad:
            _refuse_bad(bad)
        parts.append(trunks.from_float(trunk_maps(trunk, images, device, precision, spec).float(), storage))
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
