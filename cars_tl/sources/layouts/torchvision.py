"""The torchvision layout (``cars_train/``, ``cars_test/``, ``devkit/``, ``cars_test_annos_withlabels.mat``),
and :func:`devkit_parts` / :func:`import_devkit_folders`, which the Kaggle layout shares."""

from __future__ import annotations

from pathlib import Path

from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import Progress
from cars_tl.data.devkit import DEVKIT_FILES, IMAGE_DIRS
from cars_tl.sources.layouts import base
from cars_tl.sources.layouts.base import (
    TEST_LABELS,
    TEST_LABELS_HELP,
    Imported,
    Layout,
    Source,
    has,
    lacking,
    sources_of,
)


def devkit_parts(folder: Path) -> dict | None:
    """The devkit folder and image folders of the torchvision or Kaggle layout at ``folder``."""
    devkit = next(
        (
            d
            for d in (folder / "devkit", folder / "car_devkit" / "devkit", folder / "car_devkit")
            if (d / "cars_meta.mat").is_file() and (d / "cars_train_annos.mat").is_file()
        ),
        None,
    )
    if devkit is None:
        return None
    images = {}
    for split, name in IMAGE_DIRS.items():
        d = folder / name / name if (folder / name / name).is_dir() else folder / name
        images[split] = d if d.is_dir() else None
    if images["train"] is None:
        return None
    flat = devkit == folder / "devkit" and all(images[s] == folder / n for s, n in IMAGE_DIRS.items())
    return {"devkit": devkit, "images": images, "layout": "torchvision" if flat else "kaggle"}


def _find_test_labels(folder: Path, devkit: Path, src: Source) -> Path | None:
    if src.test_labels is not None:
        return src.test_labels
    for candidate in (folder / TEST_LABELS, devkit / TEST_LABELS):
        if candidate.is_file():
            return candidate
    found = sorted(p for p in src.root.rglob(TEST_LABELS) if p.is_file())
    if len({p.read_bytes() for p in found}) > 1:
        raise CarsTLError(
            f"several different {TEST_LABELS} files in {src.root}: {', '.join(src.name(p) for p in found)}",
            "keep the right one, or name it with --test-labels FILE",
        )
    return found[0] if found else None


def import_devkit_folders(folder: Path, stage: Path, work: Path, src: Source, progress: Progress) -> Imported:
    """torchvision's layout, or the Kaggle copy (nested image folders, car_devkit/devkit, no test labels)."""
    parts = devkit_parts(folder)
    assert parts is not None
    devkit, images = parts["devkit"], parts["images"]
    labels = None
    if "test" in src.splits:
        labels = _find_test_labels(folder, devkit, src)
        if labels is None:
            raise CarsTLError(
                f"{src.name(folder)} holds Stanford Cars ({parts['layout']} layout) without the test labels: "
                f"{TEST_LABELS} is missing. {TEST_LABELS_HELP}.",
                f"{src.command} --test-labels /path/to/{TEST_LABELS}   (or import the train split alone: {src.command} --splits train)",
            )
        if images["test"] is None:
            raise CarsTLError(
                f"{src.name(folder)} has no cars_test/ image folder", "add it, or import with --splits train"
            )
    stage.mkdir(parents=True)
    sources = {}
    for split in src.splits:
        name = IMAGE_DIRS[split]
        base.transfer(images[split], stage / name, src.owned, progress)
        sources.update(sources_of(stage, name, images[split], src))
    (stage / "devkit").mkdir()
    for rel in DEVKIT_FILES.values():
        if (devkit / Path(rel).name).is_file():
            base.transfer(devkit / Path(rel).name, stage / rel, src.owned, progress)
    if labels is not None:
        base.link_or_copy(labels, stage / TEST_LABELS)
    return Imported(parts["layout"], True, src.splits, sources)


def _detect(folder: Path) -> bool:
    parts = devkit_parts(folder)
    return parts is not None and parts["layout"] == "torchvision"


def _near_misses(folder: Path, shown) -> list[str]:
    items = {
        "cars_train/": has(folder, "cars_train"),
        "cars_test/": has(folder, "cars_test"),
        **{f: has(folder, f) for f in DEVKIT_FILES.values()},
    }
    return lacking(folder, "torchvision", items, shown)


LAYOUT = Layout(
    "torchvision",
    "stanford_cars/ holding cars_train/, cars_test/, devkit/ and "
    "cars_test_annos_withlabels.mat (or devkit/cars_test_annos_withlabels.mat)",
    "torchvision's",
    _detect,
    import_devkit_folders,
    _near_misses,
)
