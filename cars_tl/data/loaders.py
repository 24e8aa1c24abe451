"""Batches of images for the stages that run a network over them.

Two loaders yield the same batches, ``(images, labels, positions, bad_items)``, from a
``mark_bad`` :class:`~cars_tl.data.dataset.CarsDataset` (see :func:`cars_tl.data.dataset.collate_marking_bad`):

:func:`make_loader`
    torch's ``DataLoader`` with worker processes and pinned memory on CUDA: the right shape when
    an accelerator runs the model and the CPU cores are free for decoding.
:class:`ThreadedLoader`
    for evaluation on the CPU, where the model and the decoding share the same cores. Decode
    threads (Pillow and numpy release the GIL) fill the next channels_last float batch while
    the model runs on the current one: no worker processes, no pickling of tensors between
    them, no per-image ``ToTensor``. Measured on 2 cores, extraction ran 1.13-1.19x (lite0) and
    1.17-1.25x (resnet50) faster than with the DataLoader (benchmarks/README.md).

:func:`eval_dataset` and :func:`eval_loader` pick between them by the :class:`DataPath`, which
:func:`data_path` decides in one place from the device (``CARS_TL_DATA_PATH=accelerator`` forces the
accelerator's path on the CPU, so that the tests reach it). Every stage moves an image batch to the
model through :func:`batch_to_device`.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from cars_tl.core import runtime
from cars_tl.core.distributed import Context, local_batch
from cars_tl.core.errors import CarsTLError
from cars_tl.data import transforms
from cars_tl.data.dataset import BadItem, CarsDataset, collate_marking_bad

DATA_PATH_ENV = "CARS_TL_DATA_PATH"  # internal: "accelerator" or "cpu" overrides the device's choice


@dataclasses.dataclass(frozen=True)
class DataPath:
    """How image batches reach the model, decided by :func:`data_path`.

    ``accelerator``: worker processes (the DataLoader), uint8 batches normalized after the
    transfer (:func:`batch_to_device`), non_blocking copies; ``pin_memory`` where the device is
    CUDA. Otherwise decode threads fill float batches beside the model (:class:`ThreadedLoader`).
    """

    accelerator: bool
    pin_memory: bool = False

    @property
    def batch_dtype(self) -> str:
        """What the transforms yield: ``uint8`` tensors, or ``float`` (normalized) ones."""
        return "uint8" if self.accelerator else "float"


def data_path(device: str) -> DataPath:
    """The data path for ``device``: the accelerator's anywhere but the CPU. ``CARS_TL_DATA_PATH``
    (``accelerator`` | ``cpu``) overrides it, an internal switch for tests and benchmarks."""
    forced = os.environ.get(DATA_PATH_ENV, "").strip().lower()
    if forced not in ("", "accelerator", "cpu"):
        raise CarsTLError(
            f"{DATA_PATH_ENV}={forced!r} is not a data path; valid: accelerator, cpu",
            f"unset {DATA_PATH_ENV} (the device decides)",
        )
    accelerator = forced == "accelerator" if forced else device != "cpu"
    return DataPath(accelerator, pin_memory=accelerator and device.startswith("cuda"))


def default_workers(device: str = "cpu") -> int:
    """The CPU's data path: decode threads beside the model (at most 4 help on the cores the model
    also uses). The accelerator's: every core this process may use decodes, since the device runs
    the model."""
    cores = runtime.usable_cores()
    # Under torchrun the processes of a node share its cores.
    cores = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1)))
    return cores if data_path(device).accelerator else min(4, cores)


def make_loader(
    dataset,
    batch_size: int,
    workers: int,
    device: str,
    *,
    shuffle: bool = False,
    generator=None,
    sampler=None,
    persistent: bool = True,
):
    """The DataLoader: worker processes (kept alive across epochs with ``persistent``), pinned
    memory on CUDA.

    Unreadable images come back to the main process as bad items, which the caller skips or
    raises (``raise_bad``), so that the error names the file. ``generator`` (a private one
    by default) keeps the loader from drawing on the global RNG.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        generator=generator if generator is not None else torch.Generator().manual_seed(0),
        pin_memory=data_path(device).pin_memory,
        collate_fn=collate_marking_bad,
        prefetch_factor=4 if workers else None,
        persistent_workers=persistent and workers > 0,
    )


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps): nearby inputs give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state >> 1


class EpochSampler(torch.utils.data.Sampler):
    """Training order of one epoch as keys ``epoch * n + position``: a permutation seeded by
    (seed, epoch) alone (:meth:`set_epoch`, as DistributedSampler). The key carries the epoch to
    :class:`SeededAugmentation`, also inside worker processes that persist across epochs."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch))).tolist()

    def __iter__(self):
        base = self.epoch * self.size
        return iter([base + p for p in self.order()])

    def __len__(self) -> int:
        return self.size


class SeededAugmentation(torch.utils.data.Dataset):
    """``dataset[position]`` for a key of :class:`EpochSampler`, with torch's RNG seeded from
    (seed, epoch, position) for the transform and restored afterwards: the random crops, flips and
    jitter of a sample depend on nothing else, whatever the number of workers (torchvision's
    transforms draw from torch's RNG only), and the caller's RNG stream is left as it was."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        epoch, position = divmod(int(key), len(self.dataset))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, epoch, position))
            return self.dataset[position]


_NORMALIZERS: dict = {}  # (device, mean, std) -> (mean * 255, 1 / (std * 255)) on that device


def _normalizer(device: torch.device, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and scale tensors of ``spec`` on ``device``, built (and copied there) once."""
    key = (str(device), tuple(map(float, spec["mean"])), tuple(map(float, spec["std"])))
    if key not in _NORMALIZERS:
        mean = torch.tensor(key[1], dtype=torch.float32).view(1, -1, 1, 1) * 255
        scale = 1 / (torch.tensor(key[2], dtype=torch.float32).view(1, -1, 1, 1) * 255)
        _NORMALIZERS[key] = (mean.to(device), scale.to(device))
    return _NORMALIZERS[key]


def batch_to_device(images: torch.Tensor, device: str, spec: dict) -> torch.Tensor:
    """A batch on ``device`` as the model takes it (channels_last float): the one way image batches
    reach a model. uint8 batches (the accelerator's data path: 4x less to copy) are normalized
    after the transfer with the weights' mean and std, whose tensors are built once per device."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        mean, scale = _normalizer(images.device, spec)
        images = (images.float() - mean) * scale
    return images.contiguous(memory_format=torch.channels_last)


def eval_dataset(manifest, split: str, spec: dict, device: str, crop: str = "full", margin: float = 0.0) -> CarsDataset:
    """A ``mark_bad`` dataset of ``split`` for :func:`eval_loader` on ``device``: on the CPU's data
    path it stops at the resize and crop (the threaded loader normalizes into its batches), on the
    accelerator's it yields uint8 tensors that :func:`batch_to_device` normalizes on the device."""
    accelerator = data_path(device).accelerator
    transform = transforms.eval_transform(spec, output="uint8") if accelerator else transforms.eval_resize_crop(spec)
    return CarsDataset(manifest, split, transform, crop, margin, mark_bad=True)


def eval_loader(dataset: CarsDataset, positions, batch_size: int, workers: int, device: str, spec: dict):
    """Evaluation batches of ``dataset[positions]`` in order (``dataset`` from :func:`eval_dataset`):
    the threaded loader on the CPU's data path, the DataLoader on the accelerator's. Its worker
    processes live for one pass (not persistent): an evaluation loader is idle most of a run, and
    would hold a worker per core beside the training loader's."""
    if not data_path(device).accelerator:
        return ThreadedLoader(dataset, positions, batch_size, workers, spec)
    return make_loader(Subset(dataset, list(positions)), batch_size, workers, device, persistent=False)


class ThreadedLoader:
    """Evaluation batches of ``dataset[positions]`` in order, decoded by ``workers`` threads.

    ``dataset`` must yield PIL images of ``transforms.side(spec)`` square (its transform is
    :func:`cars_tl.models.transforms.eval_resize_crop`); the loader normalizes them as
    :func:`cars_tl.models.transforms.eval_transform` does. ``workers=0`` decodes in the calling thread.
    Each batch is a fresh array (with :func:`cars_tl.core.runtime.tune_malloc`, reused heap memory).
    """

    def __init__(self, dataset, positions, batch_size: int, workers: int, spec: dict):
        self.dataset, self.positions, self.batch_size, self.workers = dataset, positions, batch_size, workers
        self.normalize = transforms.PixelNormalizer(spec)
        self.size = transforms.side(spec)

    def __len__(self) -> int:
        return (len(self.positions) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        batches = [self.positions[i : i + self.batch_size] for i in range(0, len(self.positions), self.batch_size)]
        if not self.workers:
            for positions in batches:
                yield self._assemble(None, positions)
            return
        if not batches:
            return
        decoders = ThreadPoolExecutor(self.workers, thread_name_prefix="cars_tl-decode")
        # One more thread assembles the next batch, so that the caller's model never waits on it.
        assembler = ThreadPoolExecutor(1, thread_name_prefix="cars_tl-batch")
        try:
            pending = assembler.submit(self._assemble, decoders, batches[0])
            for following in batches[1:]:
                batch = pending.result()
                pending = assembler.submit(self._assemble, decoders, following)
                yield batch
            yield pending.result()
        finally:
            assembler.shutdown(wait=True, cancel_futures=True)
            decoders.shutdown(wait=True, cancel_futures=True)

    def _assemble(self, decoders, positions):
        buffer = np.empty((len(positions), self.size, self.size, 3), np.float32)

        def fill(slot: int):
            item = self.dataset[positions[slot]]
            if isinstance(item, BadItem):
                return item
            image, label, position = item
            pixels = np.asarray(image)
            if pixels.shape != (self.size, self.size, 3):
                raise CarsTLError(
                    f"internal: a {pixels.shape} image where the transform promises {self.size}x{self.size} RGB"
                )
            self.normalize(pixels, buffer[slot])
            return label, position

        results = (
            list(decoders.map(fill, range(len(positions)))) if decoders else [fill(s) for s in range(len(positions))]
        )
        bad = [r for r in results if isinstance(r, BadItem)]
        kept = [s for s, r in enumerate(results) if not isinstance(r, BadItem)]
        rows = buffer if len(kept) == len(positions) else buffer[kept]
        images = torch.from_numpy(rows).permute(0, 3, 1, 2)  # NCHW view, channels_last in memory
        labels = torch.tensor([results[s][0] for s in kept], dtype=torch.long)
        where = torch.tensor([results[s][1] for s in kept], dtype=torch.long)
        return images, labels, where, bad


class ShardedEpochSampler:
    """This rank's part of :class:`EpochSampler`'s order: the global order (a
    permutation seeded by (seed, epoch)) cut into global batches of ``batch_size``, and of each the
    rank's slice (``batch_size / world_size`` images; the last, shorter batch split as evenly as
    possible). Keys are the same ``epoch * size + position`` that
    :class:`cars_tl.data.loaders.SeededAugmentation` reads, so every sample gets the same augmentation as
    in one process. A rank whose slice of the last batch would be empty (fewer images than ranks)
    gets that batch's first image as a stand-in, so every rank runs the same number of steps;
    :meth:`share` says to count it with weight 0."""

    def __init__(self, size: int, seed: int, batch_size: int, ctx: Context, shuffle: bool = True):

        self.epoch_sampler = EpochSampler(size, seed, shuffle)
        self.size, self.batch_size, self.ctx = size, batch_size, ctx
        self.local_batch = local_batch(batch_size, ctx)

    def set_epoch(self, epoch: int) -> None:
        self.epoch_sampler.set_epoch(epoch)

    def steps(self) -> int:
        return -(-self.size // self.batch_size)

    def _bounds(self, step: int) -> tuple[int, int, int]:
        """(start, stop) of this rank's slice of global batch ``step`` within it, and the batch's size."""
        count = min(self.batch_size, self.size - step * self.batch_size)
        if count == self.batch_size:
            return self.ctx.rank * self.local_batch, (self.ctx.rank + 1) * self.local_batch, count
        return self.ctx.rank * count // self.ctx.world_size, (self.ctx.rank + 1) * count // self.ctx.world_size, count

    def share(self, step: int) -> tuple[int, int]:
        """(images this rank really holds in global batch ``step``, images in that global batch)."""
        start, stop, count = self._bounds(step)
        return stop - start, count

    def __iter__(self):
        keys = list(iter(self.epoch_sampler))
        mine = []
        for step in range(self.steps()):
            batch = keys[step * self.batch_size : (step + 1) * self.batch_size]
            start, stop, _ = self._bounds(step)
            mine.extend(batch[start:stop] if stop > start else batch[:1])
        return iter(mine)

    def __len__(self) -> int:
        return sum(max(1, self.share(s)[0]) for s in range(self.steps()))
