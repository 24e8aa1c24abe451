"""One frozen pass: a network that does not train, run once over the images of some splits into
one HDF5 file. extract-features (pooled feature rows, :mod:`cars_tl.artifacts.features`) and the
trunk cache (the frozen part's maps, :mod:`cars_tl.artifacts.trunks`; built by build-trunk and by
``finetune --trunk-cache``) are both such a pass; a :class:`Job` says what one computes and where
it goes, :func:`run` does the rest:

locked
    rank 0 holds the file's writer lock (:func:`cars_tl.core.locks.writer_lock`) for the whole pass.
sharded
    under ``torchrun`` every rank computes a contiguous, chunk-aligned shard of every split into its
    own chunks (every other split deals its shards in reverse rank order, so that the short last
    chunks do not all fall to one rank); rank 0 waits for the others and merges them into the one
    file, the same arrays as one process makes.
chunked and resumable
    rows are kept in chunk files of ``batch_size * CHUNK_BATCHES`` rows as they finish (the job's
    ``Partial*`` folder); an interrupted pass computes only the chunks that are missing.
checksummed
    the file is written by the artifact's own writer (fletcher32 datasets, content digests, read
    back and verified under a temporary name, then renamed).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from cars_tl.core import distributed, locks
from cars_tl.core.progress import NULL, Progress

CHUNK_BATCHES = 4


class Job:
    """What one frozen pass computes. :func:`run` calls, in this order: :meth:`pending` (rank 0
    alone, under the lock), then on every rank :meth:`dataset` per split to do, :meth:`start`
    (the chunk folder's metadata), :meth:`partial`, :meth:`loader`, :meth:`check_bad` and
    :meth:`compute` per batch, :meth:`write_chunk` per chunk, and :meth:`finish` (rank 0)."""

    path: Path
    lock: str  # the stage a writer lock names
    label: str  # progress: "<label> <split>"
    batch_size: int
    row_shape: tuple[int, ...]  # set by start(): one row as stored
    row_dtype: type = np.float32

    def pending(self) -> tuple[str, ...]:
        """The splits to compute (none: the file is up to date)."""
        raise NotImplementedError

    def dataset(self, split: str):
        raise NotImplementedError

    def start(self, todo: tuple[str, ...]) -> dict:
        """Prepare the network (there is work to do); returns the chunk folder's metadata."""
        raise NotImplementedError

    def partial(self, meta: dict, sizes: dict[str, int], chunk_rows: int, join: bool):
        raise NotImplementedError

    def loader(self, split: str, dataset, rows: range):
        raise NotImplementedError

    def check_bad(self, bad: list) -> None:
        """Raise for unreadable images the job does not leave out (they come back as ``bad`` items)."""
        raise NotImplementedError

    def compute(self, images) -> np.ndarray:
        """The stored rows of one image batch."""
        raise NotImplementedError

    def write_chunk(self, partial, split: str, start: int, block, valid, reasons: dict[int, str]) -> None:
        raise NotImplementedError

    def finish(self, partial, datasets: dict, todo: tuple[str, ...]):
        """Rank 0, every chunk written: merge them into the file; returns what the stage reports."""
        raise NotImplementedError


@dataclasses.dataclass
class Outcome:
    """``action``: up to date | resumed | computed; ``written``: what :meth:`Job.finish` returned
    (rank 0), ``processed``: rows computed by every rank together, in ``seconds``."""

    action: str
    todo: tuple[str, ...] = ()
    processed: int = 0
    seconds: float = 0.0
    written: object = None

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def run(job: Job, *, ctx=distributed.SINGLE, progress: Progress = NULL) -> Outcome:
    """Run ``job`` unless its file is up to date. Every torchrun rank calls it."""
    # Rank 0 alone holds the lock and decides; the other ranks write only their own chunk files.
    with distributed.rank0_output(ctx, lambda: locks.writer_lock(job.path, job.lock)):
        todo = job.pending() if ctx.is_main else ()
        if ctx.active:
            todo = tuple(json.loads(distributed.broadcast_text(json.dumps(todo), ctx) or "[]"))
        if not todo:
            return Outcome("up to date")
        datasets = {s: job.dataset(s) for s in todo}
        meta = job.start(todo)
        sizes = {s: len(d) for s, d in datasets.items()}
        chunk_rows = job.batch_size * CHUNK_BATCHES
        partial = job.partial(meta, sizes, chunk_rows, False) if ctx.is_main else None
        distributed.barrier(ctx)  # the other ranks join once rank 0 has prepared the chunk folder
        if not ctx.is_main:
            partial = job.partial(meta, sizes, chunk_rows, True)
        resumed = partial.resumed_rows
        started, processed = time.perf_counter(), 0
        for index, (split, dataset) in enumerate(datasets.items()):
            # Chunk-aligned shards: every rank's chunks are whole chunks of the one-process layout, valid for any N.
            order = ctx if index % 2 == 0 else dataclasses.replace(ctx, rank=ctx.world_size - 1 - ctx.rank)
            shard = distributed.shard_range(len(dataset), order, align=chunk_rows)
            processed += _run_shard(job, dataset, split, shard, partial, progress)
        distributed.barrier(ctx)  # every rank's chunks are written
        processed = int(distributed.all_reduce_sum([processed], ctx)[0])
        seconds = time.perf_counter() - started
        written = job.finish(partial, datasets, todo) if ctx.is_main else None
        distributed.barrier(ctx)  # the file is in place before any rank reads it
    return Outcome("resumed" if resumed else "computed", todo, processed, seconds, written)


def _run_shard(job: Job, dataset, split: str, shard: range, partial, progress: Progress) -> int:
    """Compute the chunks of ``shard`` (rows of ``split``) that are not complete yet; returns the rows done."""
    missing = partial.missing_runs(split, shard)
    todo = sum(map(len, missing))
    if not todo:
        return 0
    with progress.task(f"{job.label} {split}", total=len(shard), unit="img") as task:
        task.advance(len(shard) - todo)
        for rows in missing:
            _run_rows(job, dataset, split, rows, partial, task)
    return todo


def _run_rows(job: Job, dataset, split: str, rows: range, partial, task) -> None:
    """``rows`` (whole chunks) through the network, each chunk written as it fills. A batch covers
    ``batch_size`` rows of the run whether or not some were unreadable (left out by the job)."""
    total, batch_size, chunk_rows = rows.stop, job.batch_size, partial.chunk_rows
    chunk_start = cursor = rows.start

    def empty(start):
        n = min(chunk_rows, total - start)
        return np.zeros((n, *job.row_shape), job.row_dtype), np.zeros(n, bool)

    buffer, valid = empty(chunk_start)
    reasons: dict[int, str] = {}
    for images, _, positions, bad in job.loader(split, dataset, rows):
        if bad:  # raised here, in the main process, so the error names the file
            job.check_bad(bad)
        reasons.update({item.position: item.reason for item in bad})
        # The dataset yields its own positions, so they are absolute whichever loader resumes mid-split.
        if len(positions):
            rel = positions.numpy() - chunk_start
            buffer[rel] = job.compute(images)
            valid[rel] = True
        consumed = min(batch_size, total - cursor)
        cursor += consumed
        task.advance(consumed)
        if cursor - chunk_start >= len(buffer):
            job.write_chunk(
                partial, split, chunk_start, buffer, valid, {p: r for p, r in reasons.items() if p >= chunk_start}
            )
            reasons = {}
            chunk_start = cursor
            buffer, valid = empty(chunk_start)


def records(datasets: dict) -> dict[str, dict]:
    """Each split's ``labels``, ``ids`` and ``paths``, every image in order: what :meth:`Job.finish` files beside the rows."""
    return {
        s: {
            "labels": [r.label for r in d.records],
            "ids": [r.index for r in d.records],
            "paths": [r.path for r in d.records],
        }
        for s, d in datasets.items()
    }
