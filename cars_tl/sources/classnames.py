"""The 196 canonical Stanford Cars class names, and matching other spellings of them to it.

``stanford_cars_classes.json`` (package data) holds the names of the devkit's ``cars_meta.mat`` in
its order, so that label ``i`` is ``cars_meta.mat``'s class ``i + 1``. Layouts that carry names
instead of a devkit (class folders, Hugging Face cards) are mapped onto them by
:func:`match_to_canonical`:

1. exactly, else
2. by :func:`normalise`: Unicode compatibility form without accents, case folded, and every
   character that is not a letter or digit dropped. File systems refuse ``/`` in a folder name, so
   ``Ram C/V Cargo Van Minivan 2012`` shows up as ``Ram C-V ...``, ``Ram CV ...`` or
   ``Ram C_V ...``: all normalise to ``ramcvcargovanminivan2012``. No two canonical names
   normalise alike (tested), so a match by normalisation is never ambiguous among them.

A name that matches nothing, or two names that match the same class, is an error listing them with
their nearest canonical names: classes are never merged or dropped silently.
"""

from __future__ import annotations

import difflib
import functools
import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from cars_tl.core.errors import CarsTLError

CANONICAL_FILE = Path(__file__).with_name("stanford_cars_classes.json")
NUM_CLASSES = 196


@functools.lru_cache(maxsize=1)
def canonical_names() -> tuple[str, ...]:
    """The 196 class names of ``cars_meta.mat``, in its order."""
    names = tuple(json.loads(CANONICAL_FILE.read_text(encoding="utf-8")))
    assert len(names) == NUM_CLASSES, CANONICAL_FILE
    return names


def normalise(name: str) -> str:
    """Compatibility form without accents, case folded, letters and digits only."""
    decomposed = unicodedata.normalize("NFKD", name)
    return "".join(ch for ch in decomposed.casefold() if ch.isalnum() and not unicodedata.combining(ch))


@functools.lru_cache(maxsize=1)
def _by_key() -> dict[str, int]:
    return {normalise(n): i for i, n in enumerate(canonical_names())}


def nearest(name: str, count: int = 3) -> list[str]:
    """The canonical names closest to ``name`` (for error messages)."""
    keys = list(_by_key())
    close = difflib.get_close_matches(normalise(name), keys, n=count, cutoff=0.0)
    return [canonical_names()[_by_key()[k]] for k in close]


def match_to_canonical(names: Iterable[str], where: str) -> dict[str, int]:
    """Map each name to its canonical 0-based label; raise listing every name that fails.

    ``where`` says where the names came from (a folder, a card) for the message.
    """
    canonical = {n: i for i, n in enumerate(canonical_names())}
    mapping: dict[str, int] = {}
    unmatched: list[str] = []
    for name in sorted(set(names)):
        label = canonical.get(name)
        if label is None:
            label = _by_key().get(normalise(name))
        if label is None:
            unmatched.append(name)
        else:
            mapping[name] = label
    claimed: dict[int, list[str]] = {}
    for name, label in mapping.items():
        claimed.setdefault(label, []).append(name)
    merged = {label: group for label, group in claimed.items() if len(group) > 1}
    if not unmatched and not merged:
        return mapping
    lines = [f"class names in {where} do not map one-to-one onto the 196 Stanford Cars classes:"]
    for name in unmatched[:20]:
        lines.append(f"  {name!r} matches no class; nearest: {', '.join(repr(n) for n in nearest(name))}")
    if len(unmatched) > 20:
        lines.append(f"  ... and {len(unmatched) - 20} more unmatched names")
    for label, group in sorted(merged.items()):
        lines.append(f"  {', '.join(repr(n) for n in group)} all match {canonical_names()[label]!r} (never merged)")
    raise CarsTLError(
        "\n".join(lines),
        "rename the folders (or fix the names) to the class names of cars_meta.mat "
        "(case, spaces and punctuation may differ; see cars_tl/stanford_cars_classes.json), then rerun cars-tl download",
    )
