"""The all-in-one release: ``car_ims.tgz`` (or ``car_ims/``) + ``cars_annos.mat``, converted to torchvision's
layout with the images renumbered per split."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import Progress
from cars_tl.data import devkit
from cars_tl.sources.archives import safe_extract
from cars_tl.sources.layouts import base
from cars_tl.sources.layouts.base import Imported, Layout, Source, has, lacking


def _import_all_in_one(folder: Path, stage: Path, work: Path, src: Source, progress: Progress) -> Imported:
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
        images, owned = work / "extract-car_ims", True
        safe_extract(folder / "car_ims.tgz", images, progress=progress, shown=src.name(folder / "car_ims.tgz"))
        show = lambda rel: f"{src.name(folder / 'car_ims.tgz')} (member {rel})"  # noqa: E731
    else:
        images = folder
        show = lambda rel: src.name(folder / rel)  # noqa: E731
    rows: dict[str, list[dict]] = {split: [] for split in devkit.SPLITS}
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
        if not (images / rel).is_file():
            absent.append(rel)
        moves.append((images / rel, stage / devkit.IMAGE_DIRS[split] / fname))
        sources[f"{devkit.IMAGE_DIRS[split]}/{fname}"] = show(rel)
    if absent:
        raise CarsTLError(
            f"{len(absent)} images listed in {src.name(annos_path)} are missing: {', '.join(absent[:5])}"
            + (" ..." if len(absent) > 5 else ""),
            "check that car_ims.tgz (or car_ims/) is complete",
        )
    for split in src.splits:
        (stage / devkit.IMAGE_DIRS[split]).mkdir(parents=True)
    with progress.task("convert car_ims", total=len(moves), unit="files") as task:
        for source, dst in moves:
            if owned:
                os.replace(source, dst)
            else:
                base.link_or_copy(source, dst)
            task.advance(1)
    class_names = [str(n) for n in np.atleast_1d(mat["class_names"])]
    devkit.write_devkit(stage, class_names, rows["train"], rows["test"] if "test" in src.splits else None)
    return Imported("all-in-one", True, src.splits, sources)


def _detect(folder: Path) -> bool:
    names = set(os.listdir(folder))
    return "cars_annos.mat" in names and ("car_ims.tgz" in names or (folder / "car_ims").is_dir())


def _near_misses(folder: Path, shown) -> list[str]:
    items = {
        "car_ims.tgz (or car_ims/)": has(folder, "car_ims.tgz", "car_ims"),
        "cars_annos.mat": has(folder, "cars_annos.mat"),
    }
    return lacking(folder, "all-in-one", items, shown)


LAYOUT = Layout(
    "all-in-one",
    "car_ims.tgz (or an extracted car_ims/) and cars_annos.mat in one folder",
    "car_ims.tgz + cars_annos.mat",
    _detect,
    _import_all_in_one,
    _near_misses,
)
