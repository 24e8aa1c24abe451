"""Local copies of Stanford Cars in the shapes people have them, converted to torchvision's layout.

:func:`import_path` finds the layout of a folder or archive (at its top or up to three folder
levels below), and fills a staging ``stanford_cars`` folder with ``cars_train/``, ``cars_test/``,
the devkit ``.mat`` files and ``cars_test_annos_withlabels.mat``. The caller
(:func:`cars_tl.sources.prepare.prepare_dataset`) validates the result and swaps it into place, so a
failed import changes nothing. Recognised layouts (:data:`ACCEPTED_LAYOUTS`):

``torchvision``   ``cars_train/``, ``cars_test/``, ``devkit/`` and ``cars_test_annos_withlabels.mat``
``kaggle``        the Kaggle copy: ``cars_train/cars_train/``, ``cars_test/cars_test/``,
                  ``car_devkit/devkit/``; no test labels (``--test-labels FILE``, or the file anywhere
                  in the source); its ``cars_annos.mat`` belongs to the all-in-one release and is ignored
``split archives`` ``cars_train.tgz``, ``cars_test.tgz``, ``car_devkit.tgz`` + ``cars_test_annos_withlabels.mat``
``all-in-one``    ``car_ims.tgz`` (or ``car_ims/``) + ``cars_annos.mat``
``class folders`` ``train/<class name>/*.jpg``, ``test/<class name>/*.jpg`` (e.g. below
                  ``car_data/car_data/``), optionally with ``anno_train.csv`` / ``anno_test.csv``
                  (file, x1, y1, x2, y2, 1-based class: the boxes) and ``names.csv`` beside or above
``parquet``       Hugging Face shards ``data/train-*.parquet``, ``data/test-*.parquet`` (columns
                  ``image`` {bytes, path} and ``label``; names from the shard's features metadata
                  or the dataset card ``README.md``); needs the ``parquet`` extra (pyarrow)

Class folders and parquet shards carry names, not the devkit: they are matched to the canonical
196 names (:mod:`cars_tl.sources.classnames`) and the devkit is written from them; the images are
renumbered per split (``00001.jpg``...), parquet images written as their original bytes. Where a
layout has no boxes, the devkit gets the full image as box and the import records ``boxes: false``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shlex
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from cars_tl import data
from cars_tl.core.errors import BadImageError, CarsTLError
from cars_tl.core.progress import NULL, Progress
from cars_tl.sources.archives import safe_extract
from cars_tl.sources.classnames import canonical_names, match_to_canonical

SPLIT_FILES = ("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz", "cars_test_annos_withlabels.mat")
SPLIT_ARCHIVES = {"cars_train.tgz": "cars_train", "cars_test.tgz": "cars_test", "car_devkit.tgz": "devkit"}
TEST_LABELS = data.TEST_LABELS_NAMES[0]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ACCEPTED_LAYOUTS = (
    "torchvision: stanford_cars/ holding cars_train/, cars_test/, devkit/ and "
    "cars_test_annos_withlabels.mat (or devkit/cars_test_annos_withlabels.mat)",
    "kaggle: cars_train/cars_train/, cars_test/cars_test/, car_devkit/devkit/ (test labels via --test-labels FILE "
    "or cars_test_annos_withlabels.mat anywhere in the source; cars_annos.mat beside them is ignored)",
    "split archives: cars_train.tgz, cars_test.tgz, car_devkit.tgz and cars_test_annos_withlabels.mat in one folder",
    "all-in-one: car_ims.tgz (or an extracted car_ims/) and cars_annos.mat in one folder",
    "class folders: train/<class name>/*.jpg and test/<class name>/*.jpg (e.g. below car_data/car_data/), "
    "boxes from anno_train.csv/anno_test.csv (+ names.csv) when present",
    "parquet: Hugging Face shards data/train-*.parquet and data/test-*.parquet (image, label; needs pyarrow)",
    "a single .tar, .tar.gz, .tgz or .zip archive holding any of these",
)
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
    splits: tuple[str, ...] = data.SPLITS
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # staged path -> where it came from


@dataclasses.dataclass
class _Source:
    """Where the files are read from: the user's folder (copied) or our own extraction (moved)."""

    root: Path  # the folder searched for the layout
    owned: bool  # True when ``root`` is our own extraction of ``archive``
    archive: Path | None = None
    test_labels: Path | None = None
    splits: tuple[str, ...] = data.SPLITS
    command: str = ""  # the download command being run, for hints

    def name(self, path: Path) -> str:
        """How to show ``path`` in errors: never a temporary extraction path."""
        if self.owned and self.archive is not None:
            try:
                return f"{self.archive} (member {PurePosixPath(*Path(path).relative_to(self.root).parts)})"
            except ValueError:
                pass
        return str(path)


# --------------------------------------------------------------------------- copying


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hardlink when the filesystem allows (instant for ~2 GB of JPEGs), else copy the bytes."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class _CopyFailed(Exception):
    """The first failed copy of a folder copy, its OSError (a full disk) kept intact."""


def _transfer(src: Path, dst: Path, owned: bool, progress: Progress) -> None:
    """Move what we extracted ourselves; link-or-copy the user's files (never move them)."""
    if owned:
        os.replace(src, dst)
    elif src.is_dir():
        with progress.task(f"copy {src.name}", total=sum(1 for _ in src.rglob("*")), unit="files") as task:

            def copy(s, d):
                try:
                    _link_or_copy(s, d)
                except OSError as exc:  # copytree would collect it into a shutil.Error without its errno
                    raise _CopyFailed(exc) from None
                task.advance(1)

            try:
                shutil.copytree(src, dst, copy_function=copy)
            except _CopyFailed as failed:
                raise failed.args[0] from None
    else:
        _link_or_copy(src, dst)


def _sources_of(stage: Path, staged_dir: str, origin: Path, src: _Source) -> dict[str, str]:
    folder = stage / staged_dir
    if not folder.is_dir():
        return {}
    # The folder itself too: an image missing from it is named as missing from the user's folder (or member).
    return {
        f"{staged_dir}/": src.name(origin),
        **{f"{staged_dir}/{p.name}": src.name(origin / p.name) for p in folder.iterdir()},
    }


# --------------------------------------------------------------------------- detection


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
    for split, name in data.IMAGE_DIRS.items():
        d = folder / name / name if (folder / name / name).is_dir() else folder / name
        images[split] = d if d.is_dir() else None
    if images["train"] is None:
        return None
    flat = devkit == folder / "devkit" and all(images[s] == folder / n for s, n in data.IMAGE_DIRS.items())
    return {"devkit": devkit, "images": images, "layout": "torchvision" if flat else "kaggle"}


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def _class_folder_parts(folder: Path) -> dict | None:
    """train/<class>/ (and test/<class>/) when some class folder of train/ holds an image (every one is looked at)."""
    train = folder / "train"
    if not train.is_dir():
        return None
    if any(sub.is_dir() and _has_images(sub) for sub in train.iterdir()):
        return {"train": train, "test": folder / "test" if (folder / "test").is_dir() else None}
    return None


def _parquet_shards(folder: Path) -> dict | None:
    for where in (folder / "data", folder):
        shards = {s: sorted(where.glob(f"{s}-*.parquet")) + sorted(where.glob(f"{s}.parquet")) for s in data.SPLITS}
        if shards["train"]:
            return {"dir": where, "shards": shards}
    return None


def _layouts_at(folder: Path) -> list[str]:
    names = set(os.listdir(folder))
    found = []
    parts = devkit_parts(folder)
    if parts:
        found.append(parts["layout"])
    if set(SPLIT_FILES[:3]) <= names:
        found.append("split archives")
    if "cars_annos.mat" in names and ("car_ims.tgz" in names or (folder / "car_ims").is_dir()):
        found.append("all-in-one")
    if _class_folder_parts(folder):
        found.append("class folders")
    if _parquet_shards(folder):
        found.append("parquet")
    return found


def _near_misses(folder: Path) -> list[str]:
    """For each layout a folder holds only part of, what it lacks (for the error message)."""

    def has(*names: str) -> bool:
        return any((folder / n).exists() for n in names)

    wanted = {
        "torchvision": {
            "cars_train/": has("cars_train"),
            "cars_test/": has("cars_test"),
            **{f: has(f) for f in data.DEVKIT_FILES.values()},
        },
        "split archives": {f: has(f) for f in SPLIT_FILES[:3]},
        "all-in-one": {
            "car_ims.tgz (or car_ims/)": has("car_ims.tgz", "car_ims"),
            "cars_annos.mat": has("cars_annos.mat"),
        },
        "class folders": {"train/<class>/": has("train"), "test/<class>/": has("test")},
    }
    misses = []
    for layout, items in wanted.items():
        missing = [name for name, present in items.items() if not present]
        if 0 < len(missing) < len(items):
            misses.append(f"{folder} looks like the {layout} layout but lacks {', '.join(missing)}")
    train = folder / "train"
    if train.is_dir():  # class folders without a single image
        classes = [d for d in train.iterdir() if d.is_dir()]
        if classes and not any(_has_images(d) for d in classes):
            misses.append(
                f"{train} holds {len(classes)} class folders, but all {len(classes)} are empty "
                f"(no {', '.join(IMAGE_SUFFIXES)} files in them)"
            )
        elif not classes and _has_images(train):
            misses.append(
                f"{train} holds images directly: the class folders layout needs one folder per class (train/<class name>/*.jpg)"
            )
    return misses


def find_layout(root: Path) -> tuple[str, Path]:
    """The accepted layout at or up to three folder levels below ``root`` (breadth first).

    Two layouts in one folder are an error (which one was meant is a guess).
    """
    not_containers = {*data.IMAGE_DIRS.values(), "car_ims", "devkit", "train", "test"}  # images, no layouts
    level, near = [root], []
    for _ in range(4):
        below = []
        for folder in level:
            layouts = _layouts_at(folder)
            if len(layouts) > 1:
                raise CarsTLError(
                    f"{folder} mixes layouts: {' and '.join(layouts)}",
                    "keep one of them in the folder (or pass the folder of one with --source PATH), then rerun cars-tl download",
                )
            if layouts:
                return layouts[0], folder
            near += _near_misses(folder)
            below += sorted(
                p
                for p in folder.iterdir()
                if p.is_dir() and p.name not in not_containers and not p.name.startswith(".")
            )
        level = below
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(found[:15]) + (f", ... ({len(found) - 15} more)" if len(found) > 15 else "") or "nothing"
    lines = [f"no Stanford Cars layout recognised in {root} (found: {shown})", *near, "accepted layouts:"]
    lines += [f"  - {layout}" for layout in ACCEPTED_LAYOUTS]
    raise CarsTLError(
        "\n".join(lines),
        "arrange the files in one of these layouts and rerun cars-tl download --source PATH, or use --source demo",
    )


# --------------------------------------------------------------------------- importers


def _find_test_labels(folder: Path, devkit: Path, src: _Source) -> Path | None:
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


def _import_devkit_folders(folder: Path, stage: Path, work: Path, src: _Source, progress: Progress) -> Imported:
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
        name = data.IMAGE_DIRS[split]
        _transfer(images[split], stage / name, src.owned, progress)
        sources.update(_sources_of(stage, name, images[split], src))
    (stage / "devkit").mkdir()
    for rel in data.DEVKIT_FILES.values():
        if (devkit / Path(rel).name).is_file():
            _transfer(devkit / Path(rel).name, stage / rel, src.owned, progress)
    if labels is not None:
        _link_or_copy(labels, stage / TEST_LABELS)
    return Imported(parts["layout"], True, src.splits, sources)


def import_split_archives(
    folder: Path, stage: Path, work: Path, src: _Source | None = None, progress: Progress = NULL
) -> Imported:
    """The four original split files in ``folder`` (also what the mirrors serve)."""
    src = src or _Source(folder, False)
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
        if member in data.IMAGE_DIRS.values():
            sources.update(
                {
                    f"{member}/{p.name}": f"{src.name(folder / archive)} (member {p.relative_to(out)})"
                    for p in found.iterdir()
                }
            )
        os.replace(found, stage / member)
        shutil.rmtree(out)
    if (folder / TEST_LABELS).is_file():
        _transfer(folder / TEST_LABELS, stage / TEST_LABELS, src.owned, progress)
    return Imported("split archives", True, data.SPLITS, sources)


def _import_split_layout(folder: Path, stage: Path, work: Path, src: _Source, progress: Progress) -> Imported:
    if "test" in src.splits and not (folder / TEST_LABELS).is_file() and src.test_labels is None:
        raise CarsTLError(
            f"{src.name(folder)} holds the split archives without {TEST_LABELS}. {TEST_LABELS_HELP}.",
            f"{src.command} --test-labels /path/to/{TEST_LABELS}   (or import the train split alone: {src.command} --splits train)",
        )
    imported = import_split_archives(folder, stage, work, src, progress)
    if src.test_labels is not None:
        (stage / TEST_LABELS).unlink(missing_ok=True)
        _link_or_copy(src.test_labels, stage / TEST_LABELS)
    return imported


def _import_all_in_one(folder: Path, stage: Path, work: Path, src: _Source, progress: Progress) -> Imported:
    """Convert ``car_ims`` + ``cars_annos.mat`` to torchvision's layout, renumbering per split."""
    import numpy as np
    import scipy.io

    annos_path = folder / "cars_annos.mat"
    try:
        mat = scipy.io.loadmat(str(annos_path), squeeze_me=True)
    except Exception as exc:  # scipy raises many types for corrupt files
        raise CarsTLError(
            f"unreadable .mat file {src.name(annos_path)}: {exc}", "get an intact cars_annos.mat"
        ) from exc
    if "annotations" not in mat or "class_names" not in mat:
        raise CarsTLError(
            f"{src.name(annos_path)} lacks 'annotations' or 'class_names' (has {sorted(k for k in mat if not k.startswith('__'))})",
            "use the original cars_annos.mat, or another accepted layout (cars-tl download --help)",
        )
    annotations = np.atleast_1d(mat["annotations"])
    needed = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    missing_fields = [f for f in needed if f not in (annotations.dtype.names or ())]
    if missing_fields:
        raise CarsTLError(
            f"{src.name(annos_path)} annotations lack fields {missing_fields} (has {list(annotations.dtype.names or ())})",
            "use the original cars_annos.mat, or another accepted layout (cars-tl download --help)",
        )
    owned = src.owned
    if (folder / "car_ims.tgz").is_file():
        base, owned = work / "extract-car_ims", True
        safe_extract(folder / "car_ims.tgz", base, progress=progress, shown=src.name(folder / "car_ims.tgz"))
        show = lambda rel: f"{src.name(folder / 'car_ims.tgz')} (member {rel})"  # noqa: E731
    else:
        base = folder
        show = lambda rel: src.name(folder / rel)  # noqa: E731
    rows: dict[str, list[dict]] = {split: [] for split in data.SPLITS}
    moves, absent, sources = [], [], {}
    for a in annotations:
        split = "test" if int(a["test"]) else "train"
        if split not in src.splits:
            continue
        fname = f"{len(rows[split]) + 1:05d}.jpg"
        box = tuple(int(a[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
        rows[split].append({"fname": fname, "box": box, "label": int(a["class"]) - 1})
        rel = str(a["relative_im_path"])
        if PurePosixPath(rel).is_absolute() or ".." in re.split(r"[/\\]", rel):  # would reach outside car_ims
            raise CarsTLError(
                f"{src.name(annos_path)} lists an image outside its folder: {rel!r}", "use the original cars_annos.mat"
            )
        if not (base / rel).is_file():
            absent.append(rel)
        moves.append((base / rel, stage / data.IMAGE_DIRS[split] / fname))
        sources[f"{data.IMAGE_DIRS[split]}/{fname}"] = show(rel)
    if absent:
        raise CarsTLError(
            f"{len(absent)} images listed in {src.name(annos_path)} are missing: {', '.join(absent[:5])}"
            + (" ..." if len(absent) > 5 else ""),
            "check that car_ims.tgz (or car_ims/) is complete",
        )
    for split in src.splits:
        (stage / data.IMAGE_DIRS[split]).mkdir(parents=True)
    with progress.task("convert car_ims", total=len(moves), unit="files") as task:
        for source, dst in moves:
            if owned:
                os.replace(source, dst)
            else:
                _link_or_copy(source, dst)
            task.advance(1)
    class_names = [str(n) for n in np.atleast_1d(mat["class_names"])]
    data.write_devkit(stage, class_names, rows["train"], rows["test"] if "test" in src.splits else None)
    return Imported("all-in-one", True, src.splits, sources)


def _ancestor_file(folder: Path, name: str, root: Path) -> Path | None:
    """``name`` in ``folder`` or a folder above it, up to ``root``."""
    for d in (folder, *folder.parents):
        if (d / name).is_file():
            return d / name
        if d == root or root not in d.parents:
            break
    return None


def _read_box_csv(path: Path, src: _Source) -> dict[str, tuple[int, tuple[int, int, int, int], int | None]]:
    """anno_*.csv rows: file name -> (line, box, 1-based class or None). A header row is allowed."""
    rows = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                numbers = [int(float(c)) for c in row[1:6]]
            except ValueError:
                if line == 1:
                    continue  # a header
                numbers = []
            if len(numbers) < 4:
                raise CarsTLError(
                    f"{src.name(path)} line {line}: expected file, x1, y1, x2, y2[, class], got {row}",
                    "fix or remove that row, then rerun cars-tl download",
                )
            fname = Path(row[0].strip()).name
            if fname in rows:
                raise CarsTLError(
                    f"{src.name(path)} line {line}: {fname} is listed twice (first on line {rows[fname][0]})",
                    "remove the duplicate row",
                )
            rows[fname] = (line, tuple(numbers[:4]), numbers[4] if len(numbers) > 4 else None)
    return rows


def _read_names_csv(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [",".join(row).strip() for row in csv.reader(f) if row and ",".join(row).strip()]


def _image_size(path: Path, shown: str) -> tuple[int, int]:
    try:
        return data.image_size(path)
    except BadImageError as exc:
        raise BadImageError(shown, exc.reason) from None


def _import_class_folders(folder: Path, stage: Path, work: Path, src: _Source, progress: Progress) -> Imported:
    parts = _class_folder_parts(folder)
    assert parts is not None
    if "test" in src.splits and parts["test"] is None:
        raise CarsTLError(
            f"{src.name(folder)} has train/ class folders but no test/",
            "add test/<class>/ folders, or import with --splits train",
        )
    files: dict[str, list[tuple[str, Path]]] = {}
    for split in src.splits:
        files[split] = []
        for class_dir in sorted(p for p in parts[split].iterdir() if p.is_dir() and not p.name.startswith(".")):
            files[split] += [
                (class_dir.name, p)
                for p in sorted(class_dir.iterdir())
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            ]
    labels = match_to_canonical({name for split_files in files.values() for name, _ in split_files}, src.name(folder))
    names_csv = _ancestor_file(folder, "names.csv", src.root)
    csv_names = _read_names_csv(names_csv) if names_csv else None
    csv_labels = match_to_canonical(csv_names, src.name(names_csv)) if csv_names else {}
    boxes_from = {s: _ancestor_file(folder, f"anno_{s}.csv", src.root) for s in src.splits}
    has_boxes = all(boxes_from.values())
    canonical = canonical_names()
    rows: dict[str, list[dict]] = {}
    sources: dict[str, str] = {}
    for split in src.splits:
        table = _read_box_csv(boxes_from[split], src) if has_boxes else {}
        out = stage / data.IMAGE_DIRS[split]
        out.mkdir(parents=True)
        rows[split] = []
        seen: dict[str, Path] = {}
        with progress.task(f"import {split} class folders", total=len(files[split]), unit="files") as task:
            for class_name, path in files[split]:
                label = labels[class_name]
                fname = f"{len(rows[split]) + 1:05d}{path.suffix.lower()}"
                if has_boxes:
                    entry = table.get(path.name)
                    if entry is None:
                        raise CarsTLError(
                            f"{src.name(path)} has no row in {src.name(boxes_from[split])}",
                            "add its row (file, x1, y1, x2, y2, class), or remove the CSV files to import without boxes",
                        )
                    if path.name in seen:
                        raise CarsTLError(
                            f"{src.name(boxes_from[split])} cannot tell {src.name(seen[path.name])} from {src.name(path)} (same file name)",
                            "give the images unique file names within the split",
                        )
                    seen[path.name] = path
                    line, box, csv_class = entry
                    if (
                        csv_class is not None and not csv_names
                    ):  # no names.csv: the devkit's 1-based classes (canonical order)
                        if not 1 <= csv_class <= len(canonical):
                            raise CarsTLError(
                                f"{src.name(boxes_from[split])} line {line}: class {csv_class} is outside 1..{len(canonical)} "
                                "(without names.csv, classes are the devkit's 1-based numbers)",
                                "fix the row, or put the names.csv that numbers these classes beside the CSV files",
                            )
                        if csv_class - 1 != label:
                            raise CarsTLError(
                                f"{src.name(boxes_from[split])} line {line} gives {path.name} class {csv_class} "
                                f"({canonical[csv_class - 1]!r} in the devkit's numbering; no names.csv) but it lies in the folder {class_name!r}",
                                "move the image to its class folder or fix the row (or add the names.csv that numbers these classes)",
                            )
                    if csv_names and csv_class is not None:
                        if not 1 <= csv_class <= len(csv_names):
                            raise CarsTLError(
                                f"{src.name(boxes_from[split])} line {line}: class {csv_class} is outside 1..{len(csv_names)} of {src.name(names_csv)}"
                            )
                        if csv_labels[csv_names[csv_class - 1]] != label:
                            raise CarsTLError(
                                f"{src.name(boxes_from[split])} line {line} gives {path.name} class {csv_class} "
                                f"({csv_names[csv_class - 1]!r}) but it lies in the folder {class_name!r}",
                                "move the image to its class folder or fix the row",
                            )
                else:
                    width, height = _image_size(path, src.name(path))
                    box = (1, 1, width, height)
                if src.owned:
                    os.replace(path, out / fname)
                else:
                    _link_or_copy(path, out / fname)
                sources[f"{data.IMAGE_DIRS[split]}/{fname}"] = src.name(path)
                rows[split].append({"fname": fname, "box": box, "label": label})
                task.advance(1)
        if has_boxes:
            listed = set(seen)
            extra = sorted((line, fname) for fname, (line, _, _) in table.items() if fname not in listed)
            if extra:
                line, fname = extra[0]
                raise CarsTLError(
                    f"{src.name(boxes_from[split])} line {line} names {fname}, which is in no class folder of {src.name(parts[split])}"
                    + (f" ({len(extra) - 1} more such rows)" if len(extra) > 1 else ""),
                    "restore the missing images or remove their rows, then rerun cars-tl download",
                )
    data.write_devkit(stage, canonical_names(), rows["train"], rows.get("test"))
    return Imported("class folders", has_boxes, src.splits, sources)


def _card_names(card: Path) -> list[str] | None:
    """Class names from a dataset card's YAML header (``class_label: names: '0': ...``)."""
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    names: dict[int, str] = {}
    inside = False
    for line in text.splitlines():
        if re.match(r"^\s*names:\s*$", line):
            inside, names = True, {}
            continue
        match = re.match(r"""^\s+['"]?(\d+)['"]?\s*:\s*(.*?)\s*$""", line) if inside else None
        if match:
            value = match.group(2)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1].replace("''", "'") if value[0] == "'" else json.loads(value)
            names[int(match.group(1))] = value
        elif inside and names:
            break
    if not names or sorted(names) != list(range(len(names))):
        return None
    return [names[i] for i in range(len(names))]


def _shard_names(schema) -> list[str] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        info = json.loads(meta)
        features = info.get("info", info).get("features", {})
        names = features["label"]["names"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def _image_suffix(blob: bytes, path: str | None) -> str:
    if blob[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if blob[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    suffix = Path(path or "").suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ".img"


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CarsTLError(
            "reading Hugging Face parquet shards needs pyarrow, which is not installed",
            "pip install 'cars_tl[parquet]'   (or: pip install pyarrow), then rerun the same cars-tl download",
        ) from None
    return pq


def _import_parquet(folder: Path, stage: Path, work: Path, src: _Source, progress: Progress) -> Imported:
    pq = _pyarrow_parquet()
    found = _parquet_shards(folder)
    assert found is not None
    shards = found["shards"]
    if "test" in src.splits and not shards["test"]:
        raise CarsTLError(
            f"{src.name(found['dir'])} has train-*.parquet shards but no test-*.parquet",
            "add the test shards, or import with --splits train",
        )
    files = {split: {shard: pq.ParquetFile(shard) for shard in shards[split]} for split in src.splits}
    names, names_from = None, None
    for split_files in files.values():
        for shard, pf in split_files.items():
            missing = [c for c in ("image", "label") if c not in pf.schema_arrow.names]
            if missing:
                raise CarsTLError(
                    f"parquet shard {src.name(shard)} has no {' or '.join(missing)} column (it has: {', '.join(pf.schema_arrow.names)})",
                    "use the shards of a Stanford Cars image-classification dataset (columns image and label)",
                )
            if names is None and (shard_names := _shard_names(pf.schema_arrow)):
                names, names_from = shard_names, f"the features metadata of {src.name(shard)}"
    if names is None:
        for card in (folder / "README.md", found["dir"] / "README.md", found["dir"].parent / "README.md"):
            if card.is_file() and (card_names := _card_names(card)):
                names, names_from = card_names, src.name(card)
                break
    if names is None:
        raise CarsTLError(
            f"no class names for the parquet shards in {src.name(found['dir'])}: neither the shards' features metadata "
            "nor a dataset card README.md (class_label names) beside them lists them",
            "put the dataset's README.md (its card, as huggingface-cli download leaves it) beside the data/ folder",
        )
    labels = match_to_canonical(names, names_from)
    rows: dict[str, list[dict]] = {}
    sources: dict[str, str] = {}
    for split in src.splits:
        out = stage / data.IMAGE_DIRS[split]
        out.mkdir(parents=True)
        rows[split] = []
        total = sum(pf.metadata.num_rows for pf in files[split].values())
        with progress.task(f"import {split} parquet", total=total, unit="img") as task:
            for shard, pf in files[split].items():
                row_number = 0
                for batch in pf.iter_batches(batch_size=64, columns=["image", "label"]):
                    for image, label in zip(batch.column("image").to_pylist(), batch.column("label").to_pylist()):
                        where = f"{src.name(shard)} row {row_number}"
                        row_number += 1
                        blob = image.get("bytes") if isinstance(image, dict) else image
                        if not isinstance(blob, (bytes, bytearray)) or not blob:
                            raise CarsTLError(
                                f"{where}: the image has no bytes",
                                "use shards that embed the images (huggingface-cli download of the dataset)",
                            )
                        if not isinstance(label, int) or not 0 <= label < len(names):
                            raise CarsTLError(
                                f"{where}: label {label!r} is outside 0..{len(names) - 1} of {names_from}",
                                "use intact shards",
                            )
                        fname = f"{len(rows[split]) + 1:05d}{_image_suffix(blob, image.get('path') if isinstance(image, dict) else None)}"
                        (out / fname).write_bytes(blob)  # the original bytes, never re-encoded
                        width, height = _image_size(out / fname, where)
                        rows[split].append(
                            {"fname": fname, "box": (1, 1, width, height), "label": labels[names[label]]}
                        )
                        sources[f"{data.IMAGE_DIRS[split]}/{fname}"] = where
                        task.advance(1)
    data.write_devkit(stage, canonical_names(), rows["train"], rows.get("test"))
    return Imported("parquet", False, src.splits, sources)


_IMPORTERS: dict[str, Callable[[Path, Path, Path, _Source, Progress], Imported]] = {
    "torchvision": _import_devkit_folders,
    "kaggle": _import_devkit_folders,
    "split archives": _import_split_layout,
    "all-in-one": _import_all_in_one,
    "class folders": _import_class_folders,
    "parquet": _import_parquet,
}


def check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(s for s in data.SPLITS if s in set(splits))
    unknown = sorted(set(splits) - set(data.SPLITS))
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
    splits: Sequence[str] = data.SPLITS,
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
        src = _Source(root, True, path, test_labels, splits, command)
    else:
        src = _Source(path, False, None, test_labels, splits, command)
    layout, folder = find_layout(src.root)
    imported = _IMPORTERS[layout](folder, stage, work, src, progress)
    imported.splits = splits
    if "test" not in splits:  # importers that always bring both splits: drop test
        shutil.rmtree(stage / data.IMAGE_DIRS["test"], ignore_errors=True)
        for rel in (data.DEVKIT_FILES["test_nolabels"], *data.TEST_LABELS_NAMES):
            (stage / rel).unlink(missing_ok=True)
        imported.sources = {
            k: v for k, v in imported.sources.items() if not k.startswith(data.IMAGE_DIRS["test"] + "/")
        }
    return imported
