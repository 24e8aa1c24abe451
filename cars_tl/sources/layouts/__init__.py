"""Local copies of Stanford Cars in the shapes people have them, converted to torchvision's layout: the registry.

:func:`import_path` finds the layout of a folder or archive (at its top or up to three folder
levels below), and fills a staging ``stanford_cars`` folder with ``cars_train/``, ``cars_test/``,
the devkit ``.mat`` files and ``cars_test_annos_withlabels.mat``. The caller
(:func:`cars_tl.sources.prepare.prepare_dataset`) validates the result and swaps it into place, so a
failed import changes nothing.

Each layout is one module of this package holding a :class:`~cars_tl.sources.layouts.base.Layout`
(name, detection at a folder, importer, near-miss hints, description and help text), listed once in
:data:`REGISTRY`; :data:`ACCEPTED_LAYOUTS` and the ``cars-tl download --source`` help
(:func:`cli_help`) are generated from it, so a new layout is one new module and one line here:

``torchvision``     :mod:`~cars_tl.sources.layouts.torchvision`
``kaggle``          :mod:`~cars_tl.sources.layouts.kaggle`
``split archives``  :mod:`~cars_tl.sources.layouts.split_archives`
``all-in-one``      :mod:`~cars_tl.sources.layouts.all_in_one`
``class folders``   :mod:`~cars_tl.sources.layouts.class_folders`
``parquet``         :mod:`~cars_tl.sources.layouts.parquet`

Class folders and parquet shards carry names, not the devkit: they are matched to the canonical
196 names (:mod:`cars_tl.sources.classnames`) and the devkit is written from them. Where a layout
has no boxes, the devkit gets the full image as box and the import records ``boxes: false``.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import NULL, Progress
from cars_tl.data import devkit
from cars_tl.sources.archives import safe_extract
from cars_tl.sources.layouts import all_in_one, class_folders, kaggle, parquet, split_archives, torchvision
from cars_tl.sources.layouts.base import SPLIT_FILES, TEST_LABELS, Imported, Layout, Source
from cars_tl.sources.layouts.split_archives import import_split_archives
from cars_tl.sources.layouts.torchvision import devkit_parts

__all__ = [
    "ACCEPTED_LAYOUTS",
    "REGISTRY",
    "SPLIT_FILES",
    "Imported",
    "Layout",
    "check_splits",
    "cli_help",
    "devkit_parts",
    "find_layout",
    "import_path",
    "import_split_archives",
]

# A folder holding two layouts is an error, so this order only decides how layouts are listed
# (the mixes-layouts error, the near misses, the accepted layouts, the --source help).
REGISTRY: dict[str, Layout] = {
    module.LAYOUT.name: module.LAYOUT
    for module in (torchvision, kaggle, split_archives, all_in_one, class_folders, parquet)
}
ACCEPTED_LAYOUTS = (
    *(layout.accepted for layout in REGISTRY.values()),
    "a single .tar, .tar.gz, .tgz or .zip archive holding any of these",
)


def cli_help() -> str:
    """The layouts as ``cars-tl download --source`` lists them (``a, b, ..., or z``)."""
    names = [layout.cli_help for layout in REGISTRY.values()]
    return ", ".join(names[:-1]) + ", or " + names[-1]


def _layouts_at(folder: Path) -> list[str]:
    return [layout.name for layout in REGISTRY.values() if layout.detect(folder)]


def _near_misses(folder: Path, shown: Callable[[Path], str]) -> list[str]:
    """For each layout a folder holds only part of, what it lacks (for the error message)."""
    return [miss for layout in REGISTRY.values() for miss in layout.near_misses(folder, shown)]


def _one_of(found: list[tuple[str, Path]], root: Path, src: Source | None) -> CarsTLError:
    """The refusal of a source holding several datasets (in sibling folders, say): which to import is a guess."""
    shown = src.name if src else str
    listed = "; ".join(f"{shown(folder)} ({layout} layout)" for layout, folder in found)
    if src is not None and src.owned:
        fix = f"extract {src.archive} and point --source at one of these folders (or pack one of them alone)"
    else:
        command = src.command if src else ""
        where = f"--source {shlex.quote(str(root))}"
        pick = f"--source {shlex.quote(str(found[0][1]))}"
        example = command.replace(where, pick) if where in command else f"cars-tl download {pick}"
        fix = f"point --source at the one you mean, e.g. {example}"
    return CarsTLError(
        f"{shown(root)} holds {len(found)} datasets: {listed}; which one to import would be a guess", fix
    )


def find_layout(root: Path, src: Source | None = None) -> tuple[str, Path]:
    """The accepted layout at or up to three folder levels below ``root`` (breadth first).

    Two layouts in one folder, or datasets in two folders (``a/stanford_cars``, ``b/stanford_cars``),
    are an error (which one was meant is a guess). A found layout's own subfolders are not searched.
    Paths are shown as ``src`` names them (the user's archive and member, never our extraction).
    """
    shown = src.name if src else str
    not_containers = {*devkit.IMAGE_DIRS.values(), "car_ims", "devkit", "train", "test"}  # images, no layouts
    level, near, found = [root], [], []
    for _ in range(4):
        below = []
        for folder in level:
            layouts = _layouts_at(folder)
            if len(layouts) > 1:
                raise CarsTLError(
                    f"{shown(folder)} mixes layouts: {' and '.join(layouts)}",
                    "keep one of them in the folder (or pass the folder of one with --source PATH), then rerun cars-tl download",
                )
            if layouts:
                found.append((layouts[0], folder))
                continue
            near += _near_misses(folder, shown)
            below += sorted(
                p
                for p in folder.iterdir()
                if p.is_dir() and p.name not in not_containers and not p.name.startswith(".")
            )
        level = below
    if len(found) > 1:
        raise _one_of(found, root, src)
    if found:
        return found[0]
    listing = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    items = ", ".join(listing[:15]) + (f", ... ({len(listing) - 15} more)" if len(listing) > 15 else "") or "nothing"
    lines = [f"no Stanford Cars layout recognised in {shown(root)} (found: {items})", *near, "accepted layouts:"]
    lines += [f"  - {layout}" for layout in ACCEPTED_LAYOUTS]
    raise CarsTLError(
        "\n".join(lines),
        "arrange the files in one of these layouts and rerun cars-tl download --source PATH, or use --source demo",
    )


def check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(s for s in devkit.SPLITS if s in set(splits))
    unknown = sorted(set(splits) - set(devkit.SPLITS))
    if unknown or "train" not in chosen:
        raise CarsTLError(
            f"--splits {', '.join(splits) or '(none)'} is not supported; valid: train and test (the default), or train alone",
            "cars-tl download --source PATH --splits train",
        )
    return chosen


def import_path(
    path: Path,
    stage: Path,
    work: Path,
    *,
    test_labels: Path | None = None,
    splits: Sequence[str] = devkit.SPLITS,
    command: str | None = None,
    progress: Progress = NULL,
) -> Imported:
    """Fill ``stage`` (a new ``stanford_cars`` folder) from a local folder or archive in any layout.

    ``command`` is the download command being run, which hints extend (default: ``cars-tl
    download --source PATH``).
    """
    command = command or f"cars-tl download --source {shlex.quote(str(path))}"
    splits = check_splits(splits)
    if test_labels is not None and not Path(test_labels).is_file():
        raise CarsTLError(f"--test-labels {test_labels} does not exist", f"pass the path of {TEST_LABELS}")
    if path.is_file():
        root = work / "source"
        safe_extract(path, root, progress=progress)
        src = Source(root, True, path, test_labels, splits, command)
    else:
        src = Source(path, False, None, test_labels, splits, command)
    layout, folder = find_layout(src.root, src)
    imported = REGISTRY[layout].import_(folder, stage, work, src, progress)
    imported.splits = splits
    if folder != src.root:
        imported.subfolder = folder.relative_to(src.root).as_posix()
    if "test" not in splits:  # importers that always bring both splits: drop test
        shutil.rmtree(stage / devkit.IMAGE_DIRS["test"], ignore_errors=True)
        for rel in (devkit.DEVKIT_FILES["test_nolabels"], *devkit.TEST_LABELS_NAMES):
            (stage / rel).unlink(missing_ok=True)
        imported.sources = {
            k: v for k, v in imported.sources.items() if not k.startswith(devkit.IMAGE_DIRS["test"] + "/")
        }
    return imported
