"""Many processes, one job: torch.distributed under ``torchrun`` (NCCL on CUDA, gloo on the CPU).

A stage launched by ``torchrun`` sees ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment;
without them (a plain ``cars-tl`` command, or ``torchrun --nproc_per_node 1``) it is one process
and nothing here initialises anything. What is global and what is per rank:

* ``--batch-size`` is the **global** batch: each rank takes ``batch / world_size`` of every global
  batch (:class:`ShardedEpochSampler`), so N ranks together see the same samples in the same global
  batches as one process, in the order seeded by (seed, epoch).
* Evaluation splits are cut into contiguous shards (:func:`shard_range`, no padding), and the
  per-rank sums of the meters are added up (:func:`reduce_meter`): every figure is over the whole
  split, each image counted once.
* Rank 0 alone writes files and talks to the console; it takes the writer lock of the output
  and tells the other ranks where the output goes (:func:`rank0_output`).

Every collective runs under the process group's timeout (``CARS_TL_DIST_TIMEOUT_S``, default 1800 s,
torch's own default for gloo): when a rank dies, torchrun's agent stops the others at once; the
timeout is the backstop (a node lost mid-collective) so that nothing waits forever.

Text crosses between ranks as byte tensors (:func:`broadcast_text`), never pickled objects.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import os
from pathlib import Path

from cars_tl.core import runtime
from cars_tl.core.errors import CarsTLError

TIMEOUT_ENV = "CARS_TL_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800


@dataclasses.dataclass(frozen=True)
class Context:
    """Where this process stands in the job; ``world_size == 1``: a single process, no group."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Context()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise CarsTLError(
            f"environment variable {name}={value!r} is not an integer", "launch with torchrun, which sets it"
        ) from None


def launched() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's environment; (1, 0, 0) without it."""
    return _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun job (no torch import: for the CLI)."""
    return launched()[1] == 0


class Stopped(RuntimeError):
    """torchrun's agent stopped this process (SIGTERM)."""


def peer_failure(exc: BaseException) -> bool:
    """True for the error a collective raises when another rank of the job died or timed out."""
    if launched()[0] <= 1 or not isinstance(exc, RuntimeError):
        return False
    if isinstance(exc, Stopped):
        return True
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        s in text
        for s in (
            "Connection closed by peer",
            "Connection reset by peer",
            "timed out",
            "Timed out",
            "NCCL communicator was aborted",
        )
    )


def timeout() -> datetime.timedelta:
    seconds = _env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    if seconds < 1:
        raise CarsTLError(f"{TIMEOUT_ENV}={seconds}: the process-group timeout must be at least 1 s")
    return datetime.timedelta(seconds=seconds)


def rank_device(device: str, local_rank: int) -> str:
    """One GPU per local rank: ``cuda`` (or ``auto`` resolved to it) becomes ``cuda:LOCAL_RANK``."""
    if not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise CarsTLError(
            f"--device {device} under torchrun: each process takes the GPU of its local rank (cuda:LOCAL_RANK)",
            "pass --device cuda (or auto); choose GPUs with CUDA_VISIBLE_DEVICES and --nproc_per_node",
        )
    import torch

    count = torch.cuda.device_count()
    if local_rank >= count:
        raise CarsTLError(
            f"local rank {local_rank} has no GPU: this node has {count} CUDA device(s)",
            f"launch at most {count} processes per node (torchrun --nproc_per_node {count})",
        )
    return f"cuda:{local_rank}"


def init(device: str) -> Context:
    """Join torchrun's job (when launched by it) on the resolved ``device``; returns the context.

    Initialises the default process group (nccl on CUDA, gloo on the CPU) once per process."""
    world, rank, local_rank = launched()
    if world <= 1:
        return Context(device=device)
    import torch
    import torch.distributed as dist

    device = rank_device(device, local_rank)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    runtime.use_device(device)
    if not dist.is_initialized():
        _stop_on_sigterm()
        options = dict(device_id=torch.device(device)) if device.startswith("cuda") else {}
        dist.init_process_group(backend, timeout=timeout(), **options)
        atexit.register(teardown, Context(world, rank, local_rank, backend, device))
        check_same_job(Context(world, rank, local_rank, dist.get_backend(), device))
    return Context(world, rank, local_rank, dist.get_backend(), device)


def _stop_on_sigterm() -> None:
    """SIGTERM raises :class:`Stopped`. torchrun's agent sends it (SIGKILL 30 s later) when another
    node fails or the node hosting the rendezvous is lost; by default it would end the process
    mid-write, leaving temporaries and no message."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    owner = os.getpid()

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if os.getpid() != owner:  # a forked loader worker (the agent signals the whole group): end as before
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Stopped("torchrun stopped this process (SIGTERM): another node failed or the rendezvous was lost")

    signal.signal(signal.SIGTERM, stop)


def job_facts() -> dict:
    """What every rank of one job must share: the command line, the working folder (where relative
    paths and the default ``--artifacts`` resolve), the versions and the code itself."""
    import hashlib
    import sys

    package = Path(__file__).resolve().parents[1]
    code = hashlib.sha256()
    for file in sorted(package.rglob("*.py")):
        code.update(file.relative_to(package).as_posix().encode() + b"\0" + file.read_bytes())
    return {
        "command": sys.argv[1:],
        "working folder": os.getcwd(),
        "versions": runtime.versions(),
        "cars_tl code": code.hexdigest()[:16],
    }


def check_same_job(ctx: Context, facts: dict | None = None) -> None:
    """Refuse, on every rank at once, a job whose ranks differ in :func:`job_facts`: on several nodes
    each node's torchrun command is typed apart, and another ``--lr`` or checkout would train apart
    silently (DDP averages gradients, it does not compare what the ranks were asked to do)."""
    if not ctx.active:
        return
    import json

    mine = job_facts() if facts is None else facts
    main = json.loads(broadcast_text(json.dumps(mine), ctx))
    differing = {k: (mine.get(k), main.get(k)) for k in mine.keys() | main.keys() if mine.get(k) != main.get(k)}
    odd = int(all_reduce_sum([1 if differing else 0], ctx)[0])
    hint = (
        "run the same command on every node, from the same folder of a filesystem they all share, "
        "with the same cars_tl checkout and packages"
    )
    if differing:
        raise CarsTLError(
            "this rank is not running the job of rank 0: "
            + "; ".join(_difference(k, *differing[k]) for k in sorted(differing)),
            hint,
        )
    if odd:
        raise CarsTLError(f"{odd} other rank(s) are not running the job of rank 0 (their messages say how)", hint)


def _difference(key: str, here, there) -> str:
    """``key: <this rank's> here, <rank 0's> on rank 0``, showing only what differs."""
    if isinstance(here, list) and isinstance(there, list):
        at = next((i for i, (a, b) in enumerate(zip(here, there)) if a != b), min(len(here), len(there)))
        start = at - 1 if 0 < at < min(len(here), len(there)) else at  # a changed value: with its option's name
        here, there = (" ".join(map(str, v[start : start + 4])) or "(nothing)" for v in (here, there))
        key = f"{key} (from argument {start + 1})"
    elif isinstance(here, dict) and isinstance(there, dict):
        names = sorted(k for k in here.keys() | there.keys() if here.get(k) != there.get(k))
        here, there = (", ".join(f"{k} {v.get(k)}" for k in names) for v in (here, there))
    return f"{key}: {str(here)[:200]!r} here, {str(there)[:200]!r} on rank 0"


def teardown(ctx: Context) -> None:
    if ctx.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str):
    """:func:`init` for the block, the group destroyed after it (also when the block fails)."""
    ctx = init(device)
    try:
        yield ctx
    finally:
        teardown(ctx)


def barrier(ctx: Context) -> None:
    """Wait for every rank (under the group's timeout)."""
    if ctx.active:
        import torch.distributed as dist

        dist.barrier(device_ids=[ctx.local_rank] if ctx.backend == "nccl" else None)


def _tensor_device(ctx: Context) -> str:
    return ctx.device if ctx.backend == "nccl" else "cpu"


def broadcast_text(text: str | None, ctx: Context) -> str:
    """Rank 0's ``text`` on every rank (UTF-8 bytes in a tensor, never a pickle)."""
    if not ctx.active:
        return text or ""
    import torch
    import torch.distributed as dist

    where = _tensor_device(ctx)
    payload = (text or "").encode() if ctx.is_main else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=where)
    dist.broadcast(size, 0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=where)
    if ctx.is_main and len(payload):
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    if len(buffer):
        dist.broadcast(buffer, 0)
    return bytes(buffer.cpu().tolist()).decode()


def all_reduce_sum(values, ctx: Context):
    """Element-wise sum over the ranks of a list of numbers (as float64); itself for one process."""
    if not ctx.active:
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(list(values), dtype=torch.float64, device=_tensor_device(ctx))
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def reduce_meter(meter, ctx: Context):
    """A :class:`cars_tl.models.scoring.Meter` holding the sums of every rank's meter (each image once)."""
    if not ctx.active:
        return meter
    import torch
    import torch.distributed as dist

    sums = meter.sums if meter.sums is not None else torch.zeros(3, dtype=torch.float64)
    tensor = torch.cat(
        [
            sums.double().to(_tensor_device(ctx)),
            torch.tensor([float(meter.count)], dtype=torch.float64, device=_tensor_device(ctx)),
        ]
    )
    dist.all_reduce(tensor)
    meter.sums, meter.count = tensor[:3], int(round(tensor[3].item()))
    return meter


def gather_rows(tensor, ctx: Context):
    """Rank 0: every rank's rows concatenated in rank order (other ranks: ``None``); shards may differ in length."""
    if not ctx.active:
        return tensor
    import torch
    import torch.distributed as dist

    where = _tensor_device(ctx)
    local = tensor.to(where)
    counts = [torch.zeros(1, dtype=torch.int64, device=where) for _ in range(ctx.world_size)]
    dist.all_gather(counts, torch.tensor([len(local)], dtype=torch.int64, device=where))
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=where)
    padded[: len(local)] = local
    pieces = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(pieces, padded)
    if not ctx.is_main:
        return None
    return torch.cat([p[:n] for p, n in zip(pieces, counts)]).to(tensor.device)


def broadcast_module(module, ctx: Context) -> None:
    """Rank 0's parameters and buffers copied into every rank's ``module`` (in place)."""
    if not ctx.active:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, 0)


def shard_range(size: int, ctx: Context, align: int = 1) -> range:
    """This rank's contiguous share of ``range(size)``: blocks of ``align`` dealt out as evenly as
    possible, in rank order (so shards concatenated in rank order are the whole range)."""
    blocks = -(-size // align) if size else 0
    first = ctx.rank * blocks // ctx.world_size
    last = (ctx.rank + 1) * blocks // ctx.world_size
    return range(min(first * align, size), min(last * align, size))


def local_batch(batch_size: int, ctx: Context, option: str = "--batch-size") -> int:
    """The per-rank batch of a global ``batch_size``; refuses one that does not divide evenly."""
    if batch_size % ctx.world_size:
        fits = [
            b
            for b in (
                batch_size - batch_size % ctx.world_size,
                batch_size + ctx.world_size - batch_size % ctx.world_size,
            )
            if b > 0
        ]
        raise CarsTLError(
            f"{option} {batch_size} is the global batch and must divide evenly over the {ctx.world_size} processes "
            f"(each takes batch / {ctx.world_size})",
            f"use {option} {' or '.join(str(b) for b in fits)}, or launch a number of processes that divides {batch_size}",
        )
    return batch_size // ctx.world_size


@contextlib.contextmanager
def rank0_output(ctx: Context, acquire):
    """Rank 0 enters ``acquire()`` (a context manager yielding the folder or file to write, e.g.
    :func:`cars_tl.artifacts.runs.writing_run`, which takes the writer lock) and sends its path to the other
    ranks, which never touch the lock. When rank 0 cannot acquire it, every rank fails with a message."""
    if not ctx.active:
        with acquire() as target:
            yield target
        return
    if ctx.is_main:
        with contextlib.ExitStack() as stack:
            try:
                target = stack.enter_context(acquire())
            except BaseException:
                broadcast_text("", ctx)
                raise
            broadcast_text(str(target), ctx)
            yield target
        return
    text = broadcast_text(None, ctx)
    if not text:
        raise CarsTLError(f"rank {ctx.rank}: rank 0 could not open the output (its message says why)")
    yield Path(text)


def sync_batchnorm(model, device: str):
    """``model`` with every BatchNorm replaced by SyncBatchNorm (statistics over the global batch)."""
    import torch

    if not device.startswith("cuda"):
        raise CarsTLError(
            "--sync-bn needs CUDA: torch's SyncBatchNorm runs on GPUs only (this is a CPU/gloo job)",
            "drop --sync-bn (each process then keeps statistics of its own share of the batch), or run on GPUs",
        )
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
