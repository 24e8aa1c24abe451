"""TensorBoard event files: live per-epoch logging for the training loops, and the writer ``track`` uses.

The run directory stays the source of truth; these files are a view of it. Written with
``tensorboardX`` (the optional extra ``cars_tl[tensorboard]``: tensorboardX and protobuf, about 3 MB,
against about 66 MB for the ``tensorboard`` package that ``torch.utils.tensorboard`` needs); the
files are TensorBoard's own format, read by ``tensorboard --logdir DIR``.

Layout: ``DIR/<run name>/events.out.tfevents.*``, one subfolder per run. Steps are epochs (0: the
starting point before any training step, where a stage measures it). Tags::

    loss/train  loss/val  loss/test          mean cross-entropy per image
    accuracy/train  accuracy/val  accuracy/test   top-1, %
    top5/val  top5/test                      top-5, %
    lr/group0  lr/group1 ...                 each optimizer parameter group's learning rate
    speed/images_per_second                  training images per second in that epoch
    hparam/<final metric>                    at the last step, with the hyperparameters (the hparams view)

A fresh run deletes the subfolder's earlier event files (a ``--force`` rerun replaces its curves); a
resumed run writes with ``purge_step`` = its first epoch, so TensorBoard drops any step the killed
run logged past its last checkpoint and the curves continue without duplicate steps. Under torchrun
only rank 0 writes (:func:`cars_tl.core.distributed.is_main_process`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from cars_tl.core.distributed import is_main_process
from cars_tl.core.errors import CarsTLError

EXTRA = "tensorboard"
EVENTS_GLOB = "events.out.tfevents.*"
_METRIC_TAGS = {"loss": "loss", "acc": "accuracy", "top5": "top5"}


def require_writer():
    """tensorboardX's SummaryWriter, or a CarsTLError naming the extra to install."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise CarsTLError(
            "TensorBoard logging needs the optional package tensorboardX, which is not installed",
            f"pip install 'cars_tl[{EXTRA}]' (then view with: pip install tensorboard; tensorboard --logdir DIR)",
        ) from None
    return SummaryWriter


def epoch_scalars(row: dict) -> dict[str, float]:
    """TensorBoard tags and values of one history row (see the module docstring)."""
    values = {}
    for key, value in row.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key == "epoch":
            continue
        split, _, what = key.partition("_")
        if what in _METRIC_TAGS and split in ("train", "val", "test"):
            values[f"{_METRIC_TAGS[what]}/{split}"] = float(value)
        elif key == "images_per_second":
            values["speed/images_per_second"] = float(value)
    for i, lr in enumerate(row.get("lr") or ()):
        values[f"lr/group{i}"] = float(lr)
    return values


def hparam_values(params: dict) -> dict:
    """Values the hparams view takes (numbers, strings, booleans): None as "none", the rest as JSON."""
    out = {}
    for key, value in params.items():
        if isinstance(value, bool) or isinstance(value, str):
            out[key] = value
        elif isinstance(value, (int, float)):
            out[key] = value if math.isfinite(value) else str(value)
        elif value is None:
            out[key] = "none"
        else:
            out[key] = json.dumps(value, sort_keys=True, default=str)
    return out


class EventLog:
    """One run's event files: scalars per step, and the hyperparameters with the final metrics."""

    def __init__(self, logdir: Path, run_name: str, purge_step: int | None = None):
        writer_class = require_writer()
        self.path = Path(logdir) / run_name
        if purge_step is None:  # a fresh run: its curves replace any earlier ones under this name
            for old in self.path.glob(EVENTS_GLOB) if self.path.is_dir() else ():
                old.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        # The file name's own timestamp has whole seconds: the suffix keeps a second writer within the
        # same second (a quick resume) from overwriting the first's file, and the files in order.
        self._writer = writer_class(
            logdir=str(self.path), purge_step=purge_step, flush_secs=30, filename_suffix=f".{time.time_ns()}"
        )
        self.last_step = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self.last_step = step if self.last_step is None else max(self.last_step, step)

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        self._writer.add_text(tag, markdown, global_step=step)

    def hparams(self, params: dict, final: dict, step: int | None = None) -> None:
        from tensorboardX.summary import hparams

        metrics = {
            f"hparam/{k}": float(v)
            for k, v in final.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        file_writer = self._writer._get_file_writer()
        for summary in hparams(hparam_values(params), metrics):
            file_writer.add_summary(summary)
        step = self.last_step if step is None else step
        self.scalars(step or 0, metrics)

    def close(self) -> None:
        self._writer.close()


class EpochLog:
    """The hook a training loop calls: ``on_epoch(row)`` after each epoch (a history row, plus
    ``lr``: the learning rate of each parameter group), ``on_end(hparams, final)`` once at the end.
    Inactive (every call a no-op) without a directory, or on a rank other than 0."""

    def __init__(self, logdir: Path | None, run_name: str, start_epoch: int = 1):

        self.log = None
        if logdir is not None and is_main_process():
            self.log = EventLog(logdir, run_name, purge_step=None if start_epoch <= 1 else start_epoch)

    @property
    def active(self) -> bool:
        return self.log is not None

    def on_epoch(self, row: dict) -> None:
        if self.log is not None:
            self.log.scalars(int(row["epoch"]), epoch_scalars(row))

    def on_end(self, hparams: dict, final: dict) -> None:
        if self.log is not None:
            self.log.hparams(hparams, final)
            self.close()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


def check_available(logdir: Path | None) -> None:
    """Refuse ``--tensorboard`` before any work when the extra is missing."""
    if logdir is not None:
        require_writer()
