"""Run directories, ``metrics.json`` and checkpoints: the one owner of training outputs.

Every training stage writes ``artifacts/runs/<name>/``::

    metrics.json     what the run is and how it went (below); rewritten atomically every epoch
    status.json      the status alone, in a small file rewritten in place: when metrics.json cannot be
                     rewritten (a full disk), a failure still shows here, and read_metrics honours it
    <model file>     head.pt (train-head), svm.skops (fit-svm), model.pt (finetune)
    checkpoints/     last.pt and best.pt (finetune): model, optimizer, scheduler, epoch, RNG, config

One writer at a time: every stage holds the run's :func:`cars_tl.locks.writer_lock` while it writes
(:func:`writing_run`). An existing run is replaced only with ``--force``, and then the new run is
written into a sibling ``.<name>.next/`` and swapped in only when complete: until then, and if the
new run fails, the previous run stays as it was. (A fine-tune that starts fresh, or resumes, writes in
place so that ``--resume`` finds it.)

``metrics.json`` (format_version 1)::

    kind            "head" | "svm" | "finetune"
    name, status    "running" until the run ends, then "complete" ("failed" or "interrupted" with
                    an ``error``; a run killed outright stays "running")
    created, finished, wall_time_s, device, device_name, versions
    config          every option the run used (after presets were applied)
    backbone        backbone, weights, weights_digest, num_features, transform, crop, margin, precision
    inputs          dataset_fingerprint, and for cached-feature runs the feature file (path, digest)
    class_names     index = label
    params          total and trainable parameter counts
    history         per epoch: epoch, train_loss, train_acc, test_loss, test_acc, test_top5,
                    val_loss/val_acc where a validation split exists, seconds, images_per_second
    final           train_loss, train_acc, test_loss, test_acc, test_top5, best_epoch, selected_by
    model_file      the model's file name inside the run directory
    kernels         (fit-svm) per-kernel results when several kernels were fitted

Losses are mean cross-entropy per image; accuracies are percentages. Checkpoints are
``torch.save`` dicts of tensors and plain values, and are only ever read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from cars_tl import locks
from cars_tl.atomic import atomic_path, atomic_write_text, ensure_room, swap_in
from cars_tl.errors import CarsTLError

FORMAT_VERSION = 1
METRICS = "metrics.json"
STATUS = "status.json"
STATUS_BYTES = 1024  # status.json is padded to this size when created, so rewriting it needs no new disk blocks
KINDS = ("head", "svm", "finetune")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def resolve_run_dir(out: Path | None, default_name: str, artifacts: Path) -> Path:
    return Path(out) if out else Path(artifacts) / "runs" / default_name


def _has_content(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.iterdir())


@contextlib.contextmanager
def writing_run(run_dir: Path, stage: str, *, force: bool = False, resume: bool = False):
    """Hold the run's lock and yield the folder to write the run into (see the module docstring).

    Without ``force`` an existing run is refused. With it, the new run goes to ``.<name>.next`` and
    replaces the old one only if the block completes; a failed new run is discarded (the old one
    stays), unless there was no old run, in which case the failed one is kept to show what happened.
    ``resume`` writes in place (a fine-tune continuing from its checkpoints).
    """
    run_dir = Path(run_dir)
    with locks.writer_lock(run_dir, stage):
        exists = _has_content(run_dir)
        if exists and not (force or resume):
            hint = "add --force to replace it (the old run stays until the new one completes), or --out for a new run"
            if stage == "finetune":
                hint = "add --resume to continue it, " + hint
            raise CarsTLError(f"run directory {run_dir} already exists", hint)
        if resume or not exists:
            for stale in run_dir.glob(".*.tmp-*") if run_dir.is_dir() else ():
                stale.unlink(missing_ok=True)  # a dead writer's temporaries (we hold the lock)
            run_dir.mkdir(parents=True, exist_ok=True)
            yield run_dir
            return
        staging = run_dir.with_name(f".{run_dir.name}.next")
        staging.mkdir(parents=True)
        try:
            yield staging
        except BaseException:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            raise
        swap_in(staging, run_dir)


def new_metrics(kind: str, name: str, config: dict, **fields) -> dict:
    from cars_tl import runtime

    return {
        "format_version": FORMAT_VERSION, "kind": kind, "name": name, "status": "running",
        "created": now(), "config": config, "history": [], "versions": runtime.versions(), **fields,
    }


def write_metrics(run_dir: Path, metrics: dict) -> None:
    atomic_write_text(Path(run_dir) / METRICS, json.dumps(metrics, indent=2, default=_jsonable))
    write_status(run_dir, metrics["status"], metrics.get("error"))


def write_status(run_dir: Path, status: str, error: str | None = None) -> None:
    """Rewrite status.json in place (created padded to STATUS_BYTES), so it works on a full disk."""
    path = Path(run_dir) / STATUS
    text = json.dumps({"status": status, "error": (error or "")[:600]}, ensure_ascii=True).encode()
    text = text[:STATUS_BYTES - 1] if len(text) >= STATUS_BYTES else text
    if not path.is_file() or path.stat().st_size < STATUS_BYTES:
        atomic_write_text(path, " " * STATUS_BYTES)
    with open(path, "r+b") as f:
        f.write(text.ljust(STATUS_BYTES, b" "))


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def finish(run_dir: Path, metrics: dict, started: float) -> dict:
    metrics.update(status="complete", finished=now(), wall_time_s=round(time.perf_counter() - started, 3))
    write_metrics(run_dir, metrics)
    return metrics


@contextlib.contextmanager
def recording(run_dir: Path, metrics: dict):
    """Around a run's work: a failure or Ctrl-C is written into metrics.json before it propagates."""
    try:
        yield
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        error = (getattr(exc, "message", None) or str(exc) or type(exc).__name__)[:500]
        metrics.update(status=status, finished=now(), error=error)
        try:
            write_metrics(run_dir, metrics)
        except (OSError, CarsTLError):  # e.g. the disk is full: the small in-place file still tells
            try:
                write_status(run_dir, status, error)
            except OSError:
                pass
        raise


def read_metrics(run_dir: Path) -> dict:
    """A run's metrics, checked to be a cars_tl run of a known kind."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS
    if not run_dir.is_dir():
        raise CarsTLError(f"run directory {run_dir} does not exist", "list runs with: ls artifacts/runs")
    if not path.is_file():
        raise CarsTLError(f"{run_dir} is not a cars_tl run: no {METRICS} in it", "pass a directory made by train-head, fit-svm or finetune")
    try:
        metrics = json.loads(path.read_text())
    except ValueError as exc:
        raise CarsTLError(f"{path} is not valid JSON: {exc}") from None
    if metrics.get("kind") not in KINDS:
        raise CarsTLError(f"{path}: unknown run kind {metrics.get('kind')!r}; valid: {', '.join(KINDS)}")
    if metrics.get("format_version") != FORMAT_VERSION:
        raise CarsTLError(f"{path}: run format {metrics.get('format_version')}, this cars_tl reads {FORMAT_VERSION}")
    if metrics.get("status") == "running":  # metrics.json may have been impossible to rewrite
        try:
            status = json.loads((run_dir / STATUS).read_text())
        except (OSError, ValueError):
            status = {}
        if status.get("status") in ("failed", "interrupted"):
            metrics.update(status=status["status"], error=status.get("error"))
    return metrics


def model_file(run_dir: Path) -> Path:
    """The model file of a finished run, checked to exist."""
    metrics = read_metrics(run_dir)
    name = metrics.get("model_file")
    if metrics.get("status") != "complete" or not name:
        raise CarsTLError(
            f"run {run_dir} is not complete (status {metrics.get('status')!r})",
            "finish it first (finetune: rerun with --resume)",
        )
    path = Path(run_dir) / name
    if not path.is_file():
        raise CarsTLError(f"run {run_dir} lists model file {name}, which is missing", "rerun the stage that made it")
    return path


def save_checkpoint(path: Path, payload: dict) -> None:
    """``torch.save`` to a temporary file, then rename: a kill never leaves half a checkpoint.

    Free space and ``ulimit -f`` are checked first (the tensors' size is known), and a write that
    fails anyway is reported with the path, never as torch's serializer error."""
    import torch

    path = Path(path)
    ensure_room(path, _payload_bytes(payload) + (1 << 20), "checkpoint")
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch's zip writer turns a failed write into this
            raise CarsTLError(
                f"cannot write the checkpoint {path}: {str(exc).splitlines()[0][:200]}",
                f"free space in {path.parent} (or raise ulimit -f), then rerun; a finetune continues with --resume",
            ) from None


def _payload_bytes(value) -> int:
    if hasattr(value, "untyped_storage"):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_payload_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_payload_bytes(v) for v in value)
    return 64


def load_checkpoint(path: Path) -> dict:
    """Load with ``weights_only=True``; anything needing arbitrary pickled code is refused."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CarsTLError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(exc).__name__)[:300]
        raise CarsTLError(
            f"refused to load {path}: it is not a weights-only checkpoint ({first})",
            "only load checkpoints made by cars_tl or plain state dicts; never unpickle files from others",
        ) from None


def count_params(model) -> dict[str, int]:
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def list_runs(artifacts: Path) -> list[Path]:
    root = Path(artifacts) / "runs"
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
