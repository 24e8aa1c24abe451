"""The split archives: ``cars_train.tgz``, ``cars_test.tgz``, ``car_devkit.tgz`` + ``cars_test_annos_withlabels.mat``
in one folder; :func:`import_split_archives` also imports what the mirrors serve."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import NULL, Progress
from cars_tl.data import devkit
from cars_tl.sources.archives import safe_extract
from cars_tl.sources.layouts import base
from cars_tl.sources.layouts.base import (
    SPLIT_FILES,
    TEST_LABELS,
    TEST_LABELS_HELP,
    Imported,
    Layout,
    Source,
    has,
    lacking,
)

SPLIT_ARCHIVES = {"cars_train.tgz": "cars_train", "cars_test.tgz": "cars_test", "car_devkit.tgz": "devkit"}


def import_split_archives(
    folder: Path, stage: Path, work: Path, src: Source | None = None, progress: Progress = NULL
) -> Imported:
    """The four original split files in ``folder`` (also what the mirrors serve)."""
    src = src or Source(folder, False)
    stage.mkdir(parents=True)
    sources = {}
    for archive, member in SPLIT_ARCHIVES.items():
        out = work / f"extract-{member}"
        safe_extract(folder / archive, out, progress=progress, shown=src.name(folder / archive))
        found = next((p for p in (out / member, *out.glob(f"*/{member}")) if p.is_dir()), None)
        if found is None:
            raise CarsTLError(
                f"{src.name(folder / archive)} does not contain a {member}/ folder (it holds: {', '.join(sorted(os.listdir(out))[:10])})",
                f"check that {archive} is the original Stanford Cars file",
            )
        if member in devkit.IMAGE_DIRS.values():
            sources.update(
                {
                    f"{member}/{p.name}": f"{src.name(folder / archive)} (member {p.relative_to(out)})"
                    for p in found.iterdir()
                }
            )
        os.replace(found, stage / member)
        shutil.rmtree(out)
    if (folder / TEST_LABELS).is_file():
        base.transfer(folder / TEST_LABELS, stage / TEST_LABELS, src.owned, progress)
    return Imported("split archives", True, devkit.SPLITS, sources)


def _import_split_layout(folder: Path, stage: Path, work: Path, src: Source, progress: Progress) -> Imported:
    if "test" in src.splits and not (folder / TEST_LABELS).is_file() and src.test_labels is None:
        raise CarsTLError(
            f"{src.name(folder)} holds the split archives without {TEST_LABELS}. {TEST_LABELS_HELP}.",
            f"{src.command} --test-labels /path/to/{TEST_LABELS}   (or import the train split alone: {src.command} --splits train)",
        )
    imported = import_split_archives(folder, stage, work, src, progress)
    if src.test_labels is not None:
        (stage / TEST_LABELS).unlink(missing_ok=True)
        base.link_or_copy(src.test_labels, stage / TEST_LABELS)
    return imported


def _detect(folder: Path) -> bool:
    return set(SPLIT_FILES[:3]) <= set(os.listdir(folder))


LAYOUT = Layout(
    "split archives",
    "cars_train.tgz, cars_test.tgz, car_devkit.tgz and cars_test_annos_withlabels.mat in one folder",
    "the split archives",
    _detect,
    _import_split_layout,
    lambda folder, shown: lacking(folder, "split archives", {f: has(folder, f) for f in SPLIT_FILES[:3]}, shown),
)
