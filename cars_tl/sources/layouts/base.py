"""What every local layout shares: the :class:`Layout` record each layout module registers, the staging
helpers (:func:`link_or_copy`, :func:`transfer`, :class:`Source`, :class:`Imported`), the near-miss
sentence (:func:`lacking`) and the file names of the release.

Other modules call ``base.link_or_copy`` / ``base.transfer`` through the module, so that one patch of
this module (a full disk, in the tests) reaches every layout.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from cars_tl.core.errors import BadImageError
from cars_tl.core.progress import Progress
from cars_tl.data import devkit
from cars_tl.data.images import image_size as read_image_size

SPLIT_FILES = ("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz", "cars_test_annos_withlabels.mat")
TEST_LABELS = devkit.TEST_LABELS_NAMES[0]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TEST_LABELS_HELP = (
    f"{TEST_LABELS} holds the test annotations with their classes (bbox_x1..bbox_y2, class, fname for each test image); "
    "the Kaggle copy and car_devkit.tgz leave it out. Its original URL (ai.stanford.edu/~jkrause/car196/) is dead since "
    "2023; copies are published on Kaggle (search for cars_test_annos_withlabels) and linked from the StanfordCars "
    "download issues of pytorch/vision"
)


@dataclasses.dataclass
class Imported:
    """What an import put into the staging folder."""

    layout: str
    boxes: bool = True
    splits: tuple[str, ...] = devkit.SPLITS
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # staged path -> where it came from
    subfolder: str | None = None  # where below --source (or inside its archive) the layout was found


@dataclasses.dataclass
class Source:
    """Where the files are read from: the user's folder (copied) or our own extraction (moved)."""

    root: Path  # the folder searched for the layout
    owned: bool  # True when ``root`` is our own extraction of ``archive``
    archive: Path | None = None
    test_labels: Path | None = None
    splits: tuple[str, ...] = devkit.SPLITS
    command: str = ""  # the download command being run, for hints

    def name(self, path: Path) -> str:
        """How to show ``path`` in errors: never a temporary extraction path."""
        if self.owned and self.archive is not None:
            try:
                parts = Path(path).relative_to(self.root).parts
            except ValueError:
                parts = None
            if parts == ():
                return str(self.archive)
            if parts:
                return f"{self.archive} (member {PurePosixPath(*parts)})"
        return str(path)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One accepted layout, as registered in :data:`cars_tl.sources.layouts.REGISTRY`."""

    name: str  # recorded as the origin's ``layout``, and how errors name it
    description: str  # its line in the accepted layouts (``<name>: <description>``)
    cli_help: str  # how ``cars-tl download --help`` names it
    detect: Callable[[Path], bool]  # whether the layout sits at the folder itself
    import_: Callable[[Path, Path, Path, Source, Progress], Imported]  # (folder, stage, work, src, progress)
    # What a folder holding only part of it lacks: (folder, how to show a path) -> sentences.
    near_misses: Callable[[Path, Callable[[Path], str]], list[str]] = lambda folder, shown: []

    @property
    def accepted(self) -> str:
        return f"{self.name}: {self.description}"


# --------------------------------------------------------------------------- copying


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hardlink when the filesystem allows (instant for ~2 GB of JPEGs), else copy the bytes."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class _CopyFailed(Exception):
    """The first failed copy of a folder copy, its OSError (a full disk) kept intact."""


def transfer(src: Path, dst: Path, owned: bool, progress: Progress) -> None:
    """Move what we extracted ourselves; link-or-copy the user's files (never move them)."""
    if owned:
        os.replace(src, dst)
    elif src.is_dir():
        with progress.task(f"copy {src.name}", total=sum(1 for _ in src.rglob("*")), unit="files") as task:

            def copy(s, d):
                try:
                    link_or_copy(s, d)
                except OSError as exc:  # copytree would collect it into a shutil.Error without its errno
                    raise _CopyFailed(exc) from None
                task.advance(1)

            try:
                shutil.copytree(src, dst, copy_function=copy)
            except _CopyFailed as failed:
                raise failed.args[0] from None
    else:
        link_or_copy(src, dst)


def sources_of(stage: Path, staged_dir: str, origin: Path, src: Source) -> dict[str, str]:
    folder = stage / staged_dir
    if not folder.is_dir():
        return {}
    # The folder itself too: an image missing from it is named as missing from the user's folder (or member).
    return {
        f"{staged_dir}/": src.name(origin),
        **{f"{staged_dir}/{p.name}": src.name(origin / p.name) for p in folder.iterdir()},
    }


# --------------------------------------------------------------------------- detection and hints


def has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def has(folder: Path, *names: str) -> bool:
    return any((folder / n).exists() for n in names)


def lacking(folder: Path, layout: str, items: dict[str, bool], shown: Callable[[Path], str] = str) -> list[str]:
    """The near miss of ``layout`` at ``folder`` when some but not all of ``items`` (name -> present) are there."""
    missing = [name for name, present in items.items() if not present]
    if 0 < len(missing) < len(items):
        return [f"{shown(folder)} looks like the {layout} layout but lacks {', '.join(missing)}"]
    return []


def image_size(path: Path, shown: str) -> tuple[int, int]:
    try:
        return read_image_size(path)
    except BadImageError as exc:
        raise BadImageError(shown, exc.reason) from None
