"""Class folders: ``train/<class name>/*.jpg``, ``test/<class name>/*.jpg`` (e.g. below ``car_data/car_data/``),
optionally with ``anno_train.csv`` / ``anno_test.csv`` (file, x1, y1, x2, y2, 1-based class: the boxes) and
``names.csv`` beside or above. The folder names are matched to the canonical 196 names
(:mod:`cars_tl.sources.classnames`) and the devkit is written from them; images are renumbered per split
(``00001.jpg``...); without the CSV files every box is the full image (``boxes: false``)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import Progress
from cars_tl.data import devkit
from cars_tl.sources.classnames import canonical_names, match_to_canonical
from cars_tl.sources.layouts import base
from cars_tl.sources.layouts.base import IMAGE_SUFFIXES, Imported, Layout, Source, has, has_images, image_size, lacking


def _class_folder_parts(folder: Path) -> dict | None:
    """train/<class>/ (and test/<class>/) when some class folder of train/ holds an image (every one is looked at)."""
    train = folder / "train"
    if not train.is_dir():
        return None
    if any(sub.is_dir() and has_images(sub) for sub in train.iterdir()):
        return {"train": train, "test": folder / "test" if (folder / "test").is_dir() else None}
    return None


def _ancestor_file(folder: Path, name: str, root: Path) -> Path | None:
    """``name`` in ``folder`` or a folder above it, up to ``root``."""
    for d in (folder, *folder.parents):
        if (d / name).is_file():
            return d / name
        if d == root or root not in d.parents:
            break
    return None


def _read_box_csv(path: Path, src: Source) -> dict[str, tuple[int, tuple[int, int, int, int], int | None]]:
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


def _import_class_folders(folder: Path, stage: Path, work: Path, src: Source, progress: Progress) -> Imported:
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
        out = stage / devkit.IMAGE_DIRS[split]
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
                    width, height = image_size(path, src.name(path))
                    box = (1, 1, width, height)
                if src.owned:
                    os.replace(path, out / fname)
                else:
                    base.link_or_copy(path, out / fname)
                sources[f"{devkit.IMAGE_DIRS[split]}/{fname}"] = src.name(path)
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
    devkit.write_devkit(stage, canonical_names(), rows["train"], rows.get("test"))
    return Imported("class folders", has_boxes, src.splits, sources)


def _near_misses(folder: Path, shown) -> list[str]:
    misses = lacking(
        folder, "class folders", {"train/<class>/": has(folder, "train"), "test/<class>/": has(folder, "test")}, shown
    )
    train = folder / "train"
    if train.is_dir():  # class folders without a single image
        classes = [d for d in train.iterdir() if d.is_dir()]
        if classes and not any(has_images(d) for d in classes):
            misses.append(
                f"{shown(train)} holds {len(classes)} class folders, but all {len(classes)} are empty "
                f"(no {', '.join(IMAGE_SUFFIXES)} files in them)"
            )
        elif not classes and has_images(train):
            misses.append(
                f"{shown(train)} holds images directly: the class folders layout needs one folder per class (train/<class name>/*.jpg)"
            )
    return misses


LAYOUT = Layout(
    "class folders",
    "train/<class name>/*.jpg and test/<class name>/*.jpg (e.g. below car_data/car_data/), "
    "boxes from anno_train.csv/anno_test.csv (+ names.csv) when present",
    "class folders train/<class>/ test/<class>/ (+ anno_*.csv)",
    lambda folder: _class_folder_parts(folder) is not None,
    _import_class_folders,
    _near_misses,
)
