"""Rich-backed progress for the CLI (library code takes a :class:`cars_tl.core.progress.Progress`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import (
    Progress as RichProgress,
)
from rich.text import Text

from cars_tl.core.progress import Progress, Task

# markup=False: messages carry paths, class names and hints such as `pip install 'cars_tl[parquet]'`, which
# rich would otherwise parse as markup (a path holding `[/]` crashed the CLI). Styles come from `labelled`.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200, markup=False)
# Piped output is read in files and logs: give wide tables room instead of 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200, markup=False)


def labelled(*parts) -> Text:
    """One line of plain text with styled pieces: each part is a string (printed verbatim, never parsed as
    markup) or a ``(text, style)`` pair, e.g. ``labelled(("error:", "bold red"), " ", message)``."""
    return Text.assemble(*parts)


class _RateColumn(TextColumn):
    """Throughput in the task's own unit (img/s, it/s)."""

    def __init__(self):
        super().__init__("")

    def render(self, task):
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        text = f"{speed:,.1f} {unit}/s" if speed else f"-- {unit}/s"
        return Text(text, style="progress.data.speed")


class _RichTask(Task):
    def __init__(self, progress: RichProgress, task_id):
        self._progress, self._id = progress, task_id

    def advance(self, amount: float = 1, **fields) -> None:
        self._progress.update(self._id, advance=amount, **fields)

    def update(self, **fields) -> None:
        self._progress.update(self._id, **fields)


class RichProgressReporter(Progress):
    """Progress bars on stderr: bytes/s for downloads, items/s (img/s) for everything else."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None, unit: str = "it") -> Iterator[Task]:
        if unit == "B":
            columns = [
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            ]
        else:
            columns = [
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                _RateColumn(),
                TextColumn("{task.fields[status]}", markup=False),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),  # "-:--:--" until the rate is known, and for a task without a total
            ]
        with RichProgress(*columns, console=console) as bar:
            task_id = bar.add_task(description, total=total, unit=unit, status="")
            yield _RichTask(bar, task_id)

    def log(self, message: str) -> None:
        console.print(message)


def progress() -> Progress:
    """Progress bars; none on the other ranks of a torchrun job (rank 0 shows the job's)."""
    from cars_tl.core.distributed import is_main_process

    return RichProgressReporter() if is_main_process() else Progress()


def rank_prefix() -> str:
    """``rank N: `` in a torchrun job of several processes (whose messages share one terminal), else nothing."""
    from cars_tl.core.distributed import launched

    world, rank, _ = launched()
    return f"rank {rank}: " if world > 1 else ""
