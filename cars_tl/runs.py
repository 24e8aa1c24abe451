"""Run directories, ``metrics.json`` and checkpoints: the one owner of training outputs.

Every training stage writes ``artifacts/runs/<name>/``::

    metrics.json     what the run is and how it went (below); rewritten atomically every epoch
    <model file>     head.pt (train-head), svm.skops (fit-svm), model.pt (finetune)
    checkpoints/     last.pt and best.pt (finetune): model, optimizer, scheduler, epoch, RNG, config

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

from cars_tl.atomic import atomic_path, atomic_write_text
from cars_tl.errors import CarsTLError

FORMAT_VERSION = 1
METRICS = "metrics.json"
KINDS = ("head", "svm", "finetune")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def resolve_run_dir(out: Path | None, default_name: str, artifacts: Path) -> Path:
    return Path(out) if out else Path(artifacts) / "runs" / default_name


def new_metrics(kind: str, name: str, config: dict, **fields) -> dict:
    from cars_tl import runtime

    return {
        "format_version": FORMAT_VERSION, "kind": kind, "name": name, "status": "running",
        "created": now(), "config": config, "history": [], "versions": runtime.versions(), **fields,
    }


def write_metrics(run_dir: Path, metrics: dict) -> None:
    atomic_write_text(Path(run_dir) / METRICS, json.dumps(metrics, indent=2, default=_jsonable))


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
        metrics.update(status=status, finished=now(), error=(str(exc) or type(exc).__name__)[:500])
        write_metrics(run_dir, metrics)
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
    """``torch.save`` to a temporary file, then rename: a kill never leaves half a checkpoint."""
    import torch

    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


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
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
