"""Run directories, ``metrics.json`` and checkpoints: the one owner of training outputs.

Every training stage writes ``artifacts/runs/<name>/``::

    metrics.json     what the run is and how it went (below); rewritten atomically every epoch
    config.toml      the options the stage was called with, as the command's options (rerun:
                     ``cars-tl <stage> --config RUN/config.toml --out NEW``; :mod:`cars_tl.artifacts.run_config`)
    status.json      the status alone, in a small file rewritten in place: when metrics.json cannot be
                     rewritten (a full disk), a failure still shows here, and read_metrics honours it
    <model file>     head.pt (train-head), svm.skops (fit-svm), model.pt (finetune); knn has none
    checkpoints/     last.pt and best.pt (finetune): model, optimizer, scheduler, epoch, RNG, config
    predictions-test.npz   the kept model's top-5 on every test image (below)

One writer at a time: every stage holds the run's :func:`cars_tl.core.locks.writer_lock` while it writes
(:func:`writing_run`). An existing run is replaced only with ``--force``, and then the new run is
written into a sibling ``.<name>.next/`` and swapped in only when complete: until then, and if the
new run fails, the previous run stays as it was. (A fine-tune that starts fresh, or resumes, writes in
place so that ``--resume`` finds it.)

``metrics.json`` (format_version 1)::

    kind            "head" | "svm" | "finetune" | "knn" | "calibrated" (:mod:`cars_tl.artifacts.kinds`)
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
    final           train_loss, train_acc, test_loss, test_acc, test_top5, best_epoch, selected_by,
                    selected_on ("test" | "validation" | "train-cv" | "none": what the reported number
                    was chosen on); finetune also ``last_epoch`` (epoch, test_loss, test_acc, test_top5)
    selection       what a run chose rather than was told (never written into ``config``, so seeds
                    that chose differently stay one configuration): selected_on, by, ``chosen``
                    (train-head tuned: weight_decay; finetune: best_epoch; fit-svm: kernel and per
                    kernel C / gamma_value), and the search's grid where there was one
    model_file      the model's file name inside the run directory
    kernels         (fit-svm) per-kernel results when several kernels were fitted
    k_results       (knn) per-k results; ``final`` is the first k asked for

``predictions-<split>.npz`` (format_version 1; plain ``numpy.load``, no pickle), one row per image
of the split, in the order the stage scored them::

    ids          int64 (N,)     the image's row in the manifest (``index`` column)
    labels       int64 (N,)     true label
    top_classes  int64 (N, K)   predicted labels, best first (K = 5, fewer with fewer classes)
    top_scores   float32 (N, K) their scores: ``score_kind`` says what they are
    score_kind   str            "probability" (softmax: train-head, finetune), "decision score"
                                (fit-svm, one-vs-rest shaped; rank 1 is ``SVC.predict`` and ranks
                                2.. follow the decision scores), "vote share" (knn: summed neighbour
                                weights, divided by their total)
    split        str            "test"
    format_version int          1

Accuracy is ``(top_classes[:, 0] == labels).mean()``; the stages write the file from the same
scores their reported ``final`` test metrics come from, and ``predict --split test`` rewrites it
for any run.

Losses are mean cross-entropy per image; accuracies are percentages. Checkpoints are
``torch.save`` dicts of tensors and plain values, and are only ever read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from cars_tl.artifacts import kinds, names, run_config

# The run kinds live in artifacts.kinds; their old names here keep working.
from cars_tl.artifacts.kinds import KINDS, RUN_KINDS, SCORE_KINDS, RunKind, rerun_hint, stages_of  # noqa: F401
from cars_tl.core import locks, runtime
from cars_tl.core.atomic import atomic_path, atomic_write_text, ensure_room, format_size, swap_in
from cars_tl.core.errors import CarsTLError, check_output_path, parse_json

FORMAT_VERSION = 1
METRICS = "metrics.json"
STATUS = "status.json"
STATUS_BYTES = 1024  # status.json is padded to this size when created, so rewriting it needs no new disk blocks


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def resolve_run_dir(out: Path | None, default_name: str, artifacts: Path) -> Path:
    return check_output_path(Path(out) if out else names.runs_folder(artifacts) / default_name, "folder")


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
            kind = kinds.of_stage(stage)
            if kind is not None and kind.resumes:
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
        except BaseException as exc:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RerunInterrupted):
                raise RerunInterrupted(run_dir, stage) from None
            raise
        swap_in(staging, run_dir)


class RerunInterrupted(KeyboardInterrupt):
    """Ctrl-C of a forced rerun: the staged new run is gone and the old run untouched, so ``--resume``
    would continue the *old* run; ``hint`` says what to do instead."""

    def __init__(self, run_dir: Path, stage: str):
        super().__init__()
        self.hint = (
            f"the new run was discarded and {run_dir} is unchanged; to start the new run again, rerun the same "
            f"cars-tl {stage} command with --force (not --resume: that would continue the old run)"
        )


def new_metrics(kind: str, name: str, config: dict, **fields) -> dict:

    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "name": name,
        "status": "running",
        "created": now(),
        "config": config,
        "history": [],
        "versions": runtime.versions(),
        **fields,
    }


def write_metrics(run_dir: Path, metrics: dict) -> None:
    if not (Path(run_dir) / run_config.FILE).exists():  # with the run's first record (a resumed run keeps its own)
        run_config.write_current(run_dir)
    atomic_write_text(Path(run_dir) / METRICS, json.dumps(metrics, indent=2, default=_jsonable))
    write_status(run_dir, metrics["status"], metrics.get("error"))


def write_status(run_dir: Path, status: str, error: str | None = None) -> None:
    """Rewrite status.json in place (created padded to STATUS_BYTES), so it works on a full disk."""
    path = Path(run_dir) / STATUS
    text = json.dumps({"status": status, "error": (error or "")[:600]}, ensure_ascii=True).encode()
    text = text[: STATUS_BYTES - 1] if len(text) >= STATUS_BYTES else text
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
    run_config.write_current(run_dir)
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
        raise CarsTLError(
            f"{run_dir} is not a cars_tl run: no {METRICS} in it",
            f"pass a directory made by {stages_of()}",
        )
    try:
        text = path.read_text()
    except (OSError, ValueError) as exc:
        raise CarsTLError(
            f"{path} cannot be read as text: {exc}", "rerun the stage that made it with --force"
        ) from None
    metrics = parse_json(text, str(path), f"rerun the stage that made it with --force, or delete {run_dir}")
    if not isinstance(metrics, dict):
        raise CarsTLError(
            f"{path} holds a JSON {type(metrics).__name__}, not the object a cars_tl run writes",
            f"pass a directory made by {stages_of()} (or rerun that stage with --force)",
        )
    if metrics.get("kind") not in RUN_KINDS:
        raise CarsTLError(f"{path}: unknown run kind {metrics.get('kind')!r}; valid: {', '.join(RUN_KINDS)}")
    if metrics.get("format_version") != FORMAT_VERSION:
        raise CarsTLError(f"{path}: run format {metrics.get('format_version')}, this cars_tl reads {FORMAT_VERSION}")
    if metrics.get("status") == "running":  # metrics.json may have been impossible to rewrite
        try:
            status = parse_json((run_dir / STATUS).read_text(), str(run_dir / STATUS))
        except (OSError, ValueError, CarsTLError):
            status = {}
        status = status if isinstance(status, dict) else {}
        if status.get("status") in ("failed", "interrupted"):
            metrics.update(status=status["status"], error=status.get("error"))
    return metrics


def model_file(run_dir: Path) -> Path:
    """The model file of a finished run, checked to exist."""
    metrics = read_metrics(run_dir)
    name = metrics.get("model_file")
    if metrics.get("status") != "complete" or not name:
        raise CarsTLError(
            f"run {run_dir} is not complete (status {metrics.get('status')!r})", rerun_hint(run_dir, metrics)
        )
    path = Path(run_dir) / name
    if not path.is_file():
        raise CarsTLError(f"run {run_dir} lists model file {name}, which is missing", "rerun the stage that made it")
    return path


def save_checkpoint(path: Path, payload: dict) -> None:
    """``torch.save`` to memory, then to a temporary file and rename: a kill never leaves half a checkpoint.

    Serialising first gives the exact size, so free space and ``ulimit -f`` are checked against what
    the file needs (an estimate plus a margin refused a 14 KB head under ``ulimit -f 100``), and a
    write that fails anyway is a message with the path and size, never torch's serializer error."""
    import io

    import torch

    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    ensure_room(path, len(data), "checkpoint")
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as exc:  # the disk filled meanwhile
            raise CarsTLError(
                f"cannot write the checkpoint {path} ({format_size(len(data))}): {exc.strerror or exc}",
                f"free space in {path.parent} (or raise ulimit -f), then rerun; a finetune continues with --resume",
            ) from None


def load_checkpoint(path: Path) -> dict:
    """Load with ``weights_only=True``; anything needing arbitrary pickled code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CarsTLError(f"checkpoint {path} does not exist")
    return load_weights_only(
        path,
        "cars_tl's checkpoints hold tensors only: rerun the stage that made it; for weights of your own, "
        "re-save them as a state dict where the model is defined, torch.save(model.state_dict(), PATH), and pass that",
    )


def load_weights_only(path: Path, hint: str):
    """``torch.load(path, weights_only=True)`` on the CPU, quietly; a file it cannot or will not load is a
    CarsTLError saying what the file is. torch's own text is not passed on: it advises ``weights_only=False``,
    which would run whatever code the file carries."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CarsTLError(_why_not_loaded(path, exc), hint) from None


def _why_not_loaded(path: Path, exc: Exception) -> str:
    import re

    text = str(exc)
    found = re.search(r"GLOBAL (\w[\w.]*)", text)  # "Unsupported global: GLOBAL x.Y", "unsupported GLOBAL posix.system"
    if found:
        return (
            f"refused to load {path}: it holds a pickled Python object ({found.group(1)}), not only tensors; "
            "unpickling it could run code from the file"
        )
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"cannot load {path}: it is not a file saved by torch.save (pickle instruction {found.group(1)} is not one a weights-only load reads)"
    if text.startswith("Weights only load failed"):
        return f"refused to load {path}: it holds pickled content that is not only tensors (loading it could run code)"
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    sentence = re.split(r"(?<=[.!?])\s+", line)[0]
    if not sentence or "weights_only" in sentence:
        return f"cannot load {path}: it is empty, cut short or not a PyTorch file ({type(exc).__name__})"
    return f"cannot load {path}: it is damaged or not a PyTorch file ({sentence.rstrip('.')})"


def count_params(model) -> dict[str, int]:
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def list_runs(artifacts: Path) -> list[Path]:
    root = names.runs_folder(artifacts)
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


# --------------------------------------------------------------------------- test predictions

PREDICTIONS_FORMAT = 1
PREDICTION_TOP_K = 5


@dataclasses.dataclass
class Predictions:
    """A run's saved top-k on one split (see the module docstring for the file)."""

    ids: np.ndarray
    labels: np.ndarray
    top_classes: np.ndarray
    top_scores: np.ndarray
    score_kind: str
    split: str = "test"

    @property
    def correct(self) -> np.ndarray:
        return self.top_classes[:, 0] == self.labels if len(self.labels) else np.zeros(0, bool)

    def accuracy(self) -> float | None:
        """Top-1 accuracy in % (None for an empty split)."""
        return float(100.0 * self.correct.mean()) if len(self.labels) else None


def predictions_path(run_dir: Path, split: str = "test") -> Path:
    return Path(run_dir) / f"predictions-{split}.npz"


def top_predictions(scores, k: int = PREDICTION_TOP_K, columns=None, first=None) -> tuple[np.ndarray, np.ndarray]:
    """(top labels, their scores) from a score matrix, best first.

    ``columns[j]`` is the label of score column ``j`` (an SVM scores only the classes it saw);
    a 1-D ``scores`` is sklearn's binary decision value (positive: ``columns[1]``). ``first`` forces
    each row's rank 1 (the model's own prediction, e.g. ``SVC.predict``); the rest follow the scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:  # an empty split
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float64)
    if scores.ndim == 1:
        scores = np.stack([-scores, scores], axis=1)
    columns = np.arange(scores.shape[1]) if columns is None else np.asarray(columns, dtype=np.int64)
    if len(columns) != scores.shape[1]:
        raise ValueError(f"{scores.shape[1]} score columns for {len(columns)} labels")
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")
    if first is not None:
        position = {int(label): j for j, label in enumerate(columns)}
        forced = np.array([position[int(label)] for label in np.asarray(first)], dtype=np.int64)
        rest = order[order != forced[:, None]].reshape(len(order), -1) if len(order) else order[:, 1:]
        order = np.concatenate([forced[:, None], rest], axis=1)
    order = order[:, :k]
    return columns[order], np.take_along_axis(scores, order, axis=1)


def write_predictions(
    run_dir: Path, ids, labels, scores, score_kind: str, *, split: str = "test", columns=None, first=None
) -> Path:
    """Save a run's top-k on ``split`` from its (N, classes) scores, atomically; returns the file."""
    if score_kind not in kinds.score_kinds():
        raise ValueError(f"score_kind {score_kind!r} not in {kinds.score_kinds()}")
    top_classes, top_scores = top_predictions(scores, PREDICTION_TOP_K, columns, first)
    ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if not len(ids) == len(labels) == len(top_classes):
        raise ValueError(f"{len(ids)} ids, {len(labels)} labels, {len(top_classes)} score rows")
    path = predictions_path(run_dir, split)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                ids=ids,
                labels=labels,
                top_classes=top_classes.astype(np.int64),
                top_scores=top_scores.astype(np.float32),
                score_kind=np.array(score_kind),
                split=np.array(split),
                format_version=np.array(PREDICTIONS_FORMAT),
            )
    return path


# Far above any split cars_tl scores (Stanford Cars' test split: 8,041 images); a file declaring more is
# refused from its headers, before numpy allocates and inflates what they declare.
PREDICTIONS_MAX_ROWS = 1_000_000
PREDICTIONS_MAX_COLUMNS = PREDICTION_TOP_K
# The arrays a predictions file holds: any other member is never read (nor its header).
PREDICTIONS_KEYS = ("ids", "labels", "top_classes", "top_scores", "score_kind", "split", "format_version")
PREDICTIONS_MAX_STRING = 1000  # characters of score_kind and split


def _npz_headers(path: Path) -> dict[str, tuple[tuple, np.dtype]]:
    """Each array's (shape, dtype) as its .npy header in the .npz declares it, nothing else read."""
    import zipfile

    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.filename.removesuffix(".npy") not in PREDICTIONS_KEYS:
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(f)
            out[info.filename.removesuffix(".npy")] = (shape, dtype)
    return out


def _check_prediction_sizes(path: Path, headers: dict, split: str) -> None:
    limits = {"ids": 1, "labels": 1, "top_classes": 2, "top_scores": 2}
    for key, (shape, dtype) in headers.items():
        rank = limits.get(key, 0)
        too_big = (
            len(shape) != rank
            or (rank and shape[0] > PREDICTIONS_MAX_ROWS)
            or (rank == 2 and shape[1] > PREDICTIONS_MAX_COLUMNS)
            or (rank == 0 and dtype.itemsize > 4 * PREDICTIONS_MAX_STRING)
        )
        if too_big:
            holds = {0: "a value", 1: f"a 1-D array of at most {PREDICTIONS_MAX_ROWS:,} rows"}.get(
                rank, f"a 2-D array of at most {PREDICTIONS_MAX_ROWS:,} rows and {PREDICTIONS_MAX_COLUMNS} columns"
            )
            raise CarsTLError(
                f"{path}: {key} is declared with shape {shape} and dtype {dtype}; a predictions file holds {holds} there",
                f"rewrite it: cars-tl predict --split {split} --model {path.parent}",
            )


def read_predictions(run_dir: Path, split: str = "test") -> Predictions:
    """A run's saved predictions, checked: sizes declared within bounds (before reading), arrays present,
    shapes consistent, no pickled objects."""
    path = predictions_path(run_dir, split)
    if not path.is_file():
        raise CarsTLError(
            f"{run_dir} has no saved {split} predictions ({path.name})",
            f"cars-tl predict --split {split} --model {run_dir}",
        )
    try:
        headers = _npz_headers(path)
    except Exception as exc:  # not a zip, or a member that is not .npy
        raise CarsTLError(
            f"{path} is not a readable predictions file: {exc}",
            f"rewrite it: cars-tl predict --split {split} --model {run_dir}",
        ) from None
    _check_prediction_sizes(path, headers, split)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in PREDICTIONS_KEYS if key in z.files}
    except Exception as exc:  # zip, header or dtype errors of a damaged file
        raise CarsTLError(
            f"{path} is not a readable predictions file: {exc}",
            f"rewrite it: cars-tl predict --split {split} --model {run_dir}",
        ) from None
    missing = [key for key in ("ids", "labels", "top_classes", "top_scores", "score_kind") if key not in arrays]
    if missing:
        raise CarsTLError(
            f"{path} lacks {', '.join(missing)}", f"rewrite it: cars-tl predict --split {split} --model {run_dir}"
        )
    if int(arrays.get("format_version", PREDICTIONS_FORMAT)) != PREDICTIONS_FORMAT:
        raise CarsTLError(
            f"{path}: predictions format {int(arrays['format_version'])}, this cars_tl reads {PREDICTIONS_FORMAT}"
        )
    n = len(arrays["ids"])
    top, scores = arrays["top_classes"], arrays["top_scores"]
    if len(arrays["labels"]) != n or top.ndim != 2 or len(top) != n or scores.shape != top.shape:
        raise CarsTLError(
            f"{path}: inconsistent shapes (ids {arrays['ids'].shape}, labels {arrays['labels'].shape}, "
            f"top_classes {top.shape}, top_scores {scores.shape})"
        )
    return Predictions(
        arrays["ids"].astype(np.int64),
        arrays["labels"].astype(np.int64),
        top.astype(np.int64),
        scores.astype(np.float32),
        str(arrays["score_kind"]),
        str(arrays.get("split", split)),
    )
