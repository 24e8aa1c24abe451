"""Progress reporting without printing.

Library functions take a ``progress`` argument (a :class:`Progress`); the default does nothing.
The CLI passes a rich-backed implementation. This keeps the core quiet and testable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Task:
    """One unit of long work; ``advance`` moves it, ``update`` sets live fields (loss, acc...)."""

    def advance(self, amount: float = 1, **fields) -> None:  # noqa: D401 - protocol
        pass

    def update(self, **fields) -> None:
        pass


class Progress:
    """Null progress: the default for library calls."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None, unit: str = "it") -> Iterator[Task]:
        yield Task()

    def log(self, message: str) -> None:
        pass


NULL = Progress()
