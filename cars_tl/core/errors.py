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

    def __init__(self, path, reason: str, hint: str | None = None):
        from pathlib import Path

        root = Path(path).parent.parent  # <data-dir>/stanford_cars/cars_train/00001.jpg
        if hint is None and root.name == "stanford_cars":  # an image of the dataset
            hint = f"replace the file with an intact copy, or fetch the dataset again: cars-tl download --data-dir {root.parent} --source SOURCE"
        elif hint is None:  # a file of the user's own (predict IMAGE, sparsity --image): nothing to download
            hint = f"check that {path} is an intact image file (JPEG, PNG, ...): open it in an image viewer, or re-save it as JPEG or PNG"
        super().__init__(f"cannot read image {path}: {reason}", hint)
        self.path = str(path)
        self.reason = reason


def check_number(
    option: str, value, *, minimum=None, maximum=None, exclusive_minimum: bool = False, hint: str | None = None
):
    """``value`` if it is finite and in range; else a :class:`CarsTLError` naming ``option``,
    the offending value and the valid range. ``None`` (option not given) passes through."""
    import math
    import numbers

    def shown(number) -> str:  # a whole number as given (a seed of 4294967296, not 4.29497e+09)
        return str(int(number)) if isinstance(number, numbers.Integral) else f"{number:g}"

    if value is None:
        return value
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if exclusive_minimum else '>='} {shown(minimum)}")
    if maximum is not None:
        bounds.append(f"<= {shown(maximum)}")
    valid = "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")
    if not math.isfinite(value):
        raise CarsTLError(f"{option} must be {valid}, got {value}", hint)
    too_low = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    if too_low or (maximum is not None and value > maximum):
        raise CarsTLError(f"{option} must be {valid}, got {shown(value)}", hint)
    return value


MAX_JSON_DEPTH = 64  # cars_tl writes at most a handful of levels; deeper is a crafted file


def parse_json(text: str, source: str, hint: str | None = None):
    """``text`` parsed as JSON, or a :class:`CarsTLError` naming ``source``: invalid JSON, and JSON
    nested deeper than :data:`MAX_JSON_DEPTH` (which would exhaust the recursion of whatever walks it)."""
    import json

    too_deep = f"{source} holds JSON nested deeper than the {MAX_JSON_DEPTH} levels cars_tl reads"
    try:
        value = json.loads(text)
    except RecursionError:
        raise CarsTLError(too_deep, hint) from None
    except ValueError as exc:
        raise CarsTLError(f"{source} is not valid JSON: {str(exc)[:200]}", hint) from None
    pending = [(value, 1)]  # walked without recursion: the depth is what is being checked
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise CarsTLError(too_deep, hint)
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit


def check_seed(seed: int) -> int:
    return int(
        check_number(
            "--seed", seed, minimum=0, maximum=SEED_MAX, hint=f"pass a whole number from 0 to {SEED_MAX}, e.g. --seed 0"
        )
    )


def check_output_path(path, expect: str, option: str = "--out", example: str | None = None):
    """``path`` (a Path) if something of kind ``expect`` ("file" or "folder") can be written there: refuses
    an existing folder where a file is expected, an existing file where a folder is, and a path below a file."""
    from pathlib import Path

    path = Path(path)
    if expect == "file" and path.is_dir():
        raise CarsTLError(
            f"{option} {path} is a folder; a file is expected there",
            f"name a file, e.g. {option} {example or path / 'features.h5'}",
        )
    if expect == "folder" and path.exists() and not path.is_dir():
        raise CarsTLError(
            f"{option} {path} is an existing file; a folder is expected there",
            f"name a folder (a new one, or an existing run with --force), e.g. {option} {example or str(path) + '-run'}",
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CarsTLError(
                    f"{option} {path} lies below {parent}, which is a file, not a folder",
                    f"choose a path inside a folder, e.g. {option} {parent.parent / path.name}",
                )
            break
    return path


def listed(items: list[str], limit: int = 5) -> str:
    """The first ``limit`` of ``items`` for a message, then how many more."""
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
