"""The one exception type for user-facing mistakes.

A :class:`CarsTLError` carries what was wrong and what to do next; the CLI prints it without a
traceback and exits with status 2. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class CarsTLError(Exception):
    """A problem the user can fix: ``message`` says what is wrong, ``hint`` the next command."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nFix: {self.hint}"


class BadImageError(CarsTLError):
    """An image file that cannot be decoded (truncated, empty, not an image)."""

    def __init__(self, path, reason: str):
        super().__init__(
            f"cannot read image {path}: {reason}",
            "re-download the dataset (cars-tl download) or pass --skip-bad to leave such files out",
        )
        self.path = str(path)
        self.reason = reason
