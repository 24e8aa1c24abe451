"""The manifest: the one owner of ``manifest.csv`` and ``manifest.json`` (format version
:data:`MANIFEST_VERSION`), built from the devkit and the images and validated on every read.

It reads torchvision's layout (:mod:`cars_tl.data.devkit`)::

    <data-dir>/stanford_cars/
        cars_train/00001.jpg ...
        cars_test/00001.jpg ...
        devkit/cars_meta.mat            class names (196), the only source of names
        devkit/cars_train_annos.mat     bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname
        devkit/cars_test_annos.mat      the same without class
        cars_test_annos_withlabels.mat  the test annotations with class

and writes, beside them, the manifest that every later stage reads instead of the .mat files:

``manifest.csv``
    one row per image: ``index, split, path, label, class_name, x1, y1, x2, y2, width, height,
    bytes, sha256``. ``path`` is relative to ``stanford_cars/``; ``label`` is 0-based (the .mat
    files are 1-based); the box is the devkit's, 1-based and inclusive, clipped to the image; width
    and height are the image's size after its EXIF orientation; ``bytes`` and ``sha256`` are the
    file's size and digest, so the fingerprint covers the pixels.
``manifest.json``
    class names, counts, the number of clipped boxes, the fingerprint (SHA-256 of manifest.csv)
    that every artifact records, the SHA-256 of the devkit files it was built from, where the data
    came from (``origin``: source, layout), whether it has boxes, its splits, duplicate images
    (``duplicates``), identical images carrying different labels (``label_conflicts``; both
    entries, and the keep or drop policy, are :mod:`cars_tl.data.label_conflicts`'s), and each
    image's mtime (``mtime_ns``, in manifest order).

:func:`load_manifest` checks, cheaply, that nothing changed since: the fingerprint, each image's
size and mtime (a ``stat`` per image), and every row against the devkit annotations (so a hand
edit of ``manifest.csv`` with a recomputed fingerprint still fails).

Nothing here imports torch: ``cars-tl download`` stays fast.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cars_tl.core.atomic import atomic_write_bytes, file_sha256
from cars_tl.core.errors import BadImageError, CarsTLError, listed
from cars_tl.core.progress import NULL
from cars_tl.data.devkit import (
    IMAGE_DIRS,
    SPLITS,
    STANFORD_DIR,
    TEST_LABELS_NAMES,
    devkit_paths,
    read_class_names,
    split_annotations,
    stanford_root,
)
from cars_tl.data.images import image_size
from cars_tl.data.label_conflicts import (
    check_label_conflicts,
    describe_label_conflicts,
    drop_losses,
    drop_warning,
    find_conflicts,
    manifest_fields,
    same_label_duplicates,
)

MANIFEST_CSV = "manifest.csv"
MANIFEST_JSON = "manifest.json"
MANIFEST_VERSION = 2
ORIGIN_FILE = ".cars_tl_source.json"  # inside stanford_cars/: where the data came from (written by download)
COLUMNS = (
    "index",
    "split",
    "path",
    "label",
    "class_name",
    "x1",
    "y1",
    "x2",
    "y2",
    "width",
    "height",
    "bytes",
    "sha256",
)


@dataclasses.dataclass(frozen=True)
class Record:
    """One image of the manifest. ``box`` is (x1, y1, x2, y2), 1-based inclusive, clipped."""

    index: int
    split: str
    path: str
    label: int
    class_name: str
    box: tuple[int, int, int, int]
    width: int
    height: int
    bytes: int = 0
    sha256: str = ""


@dataclasses.dataclass
class Manifest:
    """The dataset as later stages see it: records, class names, fingerprint."""

    root: Path  # the stanford_cars directory
    records: list[Record]
    class_names: list[str]
    fingerprint: str
    clipped_boxes: int = 0
    splits: tuple[str, ...] = SPLITS
    has_boxes: bool = True
    origin: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> list[Record]:
        if name not in SPLITS:
            raise CarsTLError(f"unknown split {name!r}; valid splits: {', '.join(SPLITS)}")
        if name not in self.splits:
            raise CarsTLError(
                f"the dataset at {self.root} has no {name} split: it was imported with --splits {','.join(self.splits)}"
                f" ({describe_origin(self.origin)}); this stage needs {name} images",
                f"import the {name} split too: {download_command(self.root.parent, self.origin, splits=SPLITS)}"
                + (f" --test-labels /path/to/{TEST_LABELS_NAMES[0]}" if not self.origin.get("test_labels") else ""),
            )
        return [r for r in self.records if r.split == name]

    def counts(self) -> dict[str, int]:
        return {s: sum(r.split == s for r in self.records) for s in SPLITS}

    def classes_present(self) -> int:
        return len({r.label for r in self.records})


# --------------------------------------------------------------------------- devkit (.mat)


# --------------------------------------------------------------------------- images


# --------------------------------------------------------------------------- manifest


def dataset_roots(paths) -> list[Path]:
    """The data folders (``.../stanford_cars`` with a manifest) that hold any of ``paths``."""
    roots = []
    for p in paths or ():
        for parent in Path(p).resolve().parents:
            if parent.name == STANFORD_DIR and (parent / MANIFEST_JSON).is_file():
                roots.append(parent)
                break
    return list(dict.fromkeys(roots))


def read_origin(root: Path) -> dict:
    """Where the dataset under ``root`` came from (``ORIGIN_FILE``); a copy placed by hand counts as downloaded."""
    try:
        origin = json.loads((Path(root) / ORIGIN_FILE).read_text())
    except (OSError, ValueError):
        origin = None
    return origin if isinstance(origin, dict) else {"source": "download", "layout": "torchvision"}


def describe_origin(origin: dict) -> str:
    """A short phrase for messages: the layout and where it came from."""
    source, layout = origin.get("source"), origin.get("layout", "torchvision")
    if source == "demo":
        return "generated demo data"
    if source == "path":
        return f"{layout} layout imported from {origin.get('path')}"
    return f"{layout} layout, downloaded or placed by hand"


def download_command(data_dir: Path, origin: dict, splits: Sequence[str] | None = None) -> str:
    """The ``cars-tl download`` command that rebuilds this dataset from where it came from."""
    import shlex

    kind = origin.get("source")
    source = "demo" if kind == "demo" else str(origin.get("path")) if kind == "path" else "auto"
    command = f"cars-tl download --data-dir {shlex.quote(str(data_dir))} --source {shlex.quote(source)}"
    splits = tuple(origin.get("splits", SPLITS)) if splits is None else tuple(splits)
    if kind != "demo" and splits != SPLITS:
        command += " --splits " + ",".join(splits)
    if origin.get("test_labels") and "test" in splits:
        command += f" --test-labels {shlex.quote(str(origin['test_labels']))}"
    if origin.get("label_conflicts", "keep") != "keep":
        command += f" --label-conflicts {origin['label_conflicts']}"
    return command


def _clip(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    return (max(1, x1), max(1, y1), min(width, x2), min(height, y2))


def build_manifest(
    data_dir: Path,
    *,
    source_names: dict[str, str] | None = None,
    shown_data_dir: Path | None = None,
    label_conflicts: str | None = None,
    progress=None,
) -> Manifest:
    """Validate the dataset under ``data_dir`` once and write its manifest (atomically).

    Every problem is collected and reported in one error naming files and counts: missing or
    duplicate images, unreadable .mat, labels out of range, empty boxes. Boxes overshooting the
    image edge are clipped and counted. Every image is hashed (SHA-256): the fingerprint covers
    the pixels, images identical across splits with the same label are counted (a leak check),
    and groups of identical images with different labels (within or across splits) are listed
    under ``label_conflicts``, kept or, with policy ``drop``, left out whole. ``label_conflicts``
    (keep or drop) overrides the policy recorded in the origin (and is recorded there).
    ``source_names`` maps a path of the dataset to the file it was imported from, so that errors
    name what the user can fix; ``shown_data_dir`` is the data folder named in hints when
    ``data_dir`` is a staging folder.
    """

    progress = progress or NULL
    root = stanford_root(data_dir)
    shown_dir = shown_data_dir or data_dir
    if not root.is_dir():
        raise CarsTLError(
            f"no dataset at {root}",
            f"cars-tl download --data-dir {data_dir} (or --source demo for a generated one)",
        )
    origin = read_origin(root)
    policy = check_label_conflicts(label_conflicts or origin.get("label_conflicts", "keep"))
    if policy != origin.get("label_conflicts", "keep"):  # asked for another policy than recorded: record it
        origin = {k: v for k, v in origin.items() if k != "label_conflicts"}
        if policy != "keep":
            origin["label_conflicts"] = policy
        atomic_write_bytes(root / ORIGIN_FILE, json.dumps(origin).encode())
    splits = tuple(s for s in SPLITS if s in origin.get("splits", SPLITS))
    paths = devkit_paths(root, splits)
    class_names = read_class_names(paths["meta"])
    annotations = split_annotations(paths, splits)
    problems: dict[str, list[str]] = {
        "missing images": [],
        "duplicate images": [],
        "labels out of range": [],
        "empty boxes": [],
        "unreadable images": [],
    }

    def shown(rel: str) -> str:
        names = source_names or {}
        if rel in names:
            return names[rel]
        folder = rel.split("/")[0] + "/"
        return f"{rel} (not in {names[folder]})" if folder in names else rel

    records: list[Record] = []
    mtimes: list[int] = []
    clipped = 0
    with progress.task("verify images", total=sum(len(a) for a in annotations.values()), unit="img") as task:
        for split in splits:
            seen: set[str] = set()
            for row in annotations[split]:
                task.advance(1)
                rel = f"{IMAGE_DIRS[split]}/{row['fname']}"
                if rel in seen:
                    problems["duplicate images"].append(rel)
                    continue
                seen.add(rel)
                if not 1 <= row["class"] <= len(class_names):
                    problems["labels out of range"].append(
                        f"{shown(rel)} (class {row['class']}, valid 1..{len(class_names)})"
                    )
                    continue
                image_path = root / rel
                if not image_path.is_file():
                    problems["missing images"].append(shown(rel))
                    continue
                try:
                    width, height = image_size(image_path)
                except BadImageError as exc:  # Pillow's reason may quote the staged path: name the source
                    problems["unreadable images"].append(
                        f"{shown(rel)} ({exc.reason.replace(str(image_path), shown(rel))})"
                    )
                    continue
                box = _clip(row["box"], width, height)
                if box[2] < box[0] or box[3] < box[1]:
                    problems["empty boxes"].append(f"{shown(rel)} {row['box']} in {width}x{height}")
                    continue
                clipped += box != row["box"]
                label = row["class"] - 1
                stat = image_path.stat()
                records.append(
                    Record(
                        len(records),
                        split,
                        rel,
                        label,
                        class_names[label],
                        box,
                        width,
                        height,
                        stat.st_size,
                        file_sha256(image_path),
                    )
                )
                mtimes.append(stat.st_mtime_ns)
    found = {k: v for k, v in problems.items() if v}
    if found:
        lines = [
            f"dataset under {STANFORD_DIR}/ failed validation ({', '.join(paths[s].name for s in splits)}; {describe_origin(origin)}):"
        ]
        for kind, items in found.items():
            shown_items = ", ".join(items[:5]) + (f", ... ({len(items) - 5} more)" if len(items) > 5 else "")
            lines.append(f"  {len(items)} {kind}: {shown_items}")
        fix = (
            f"fix or remove the files named above in the source, then rerun {download_command(shown_dir, origin)}"
            if origin.get("source") == "path"
            else f"re-run {download_command(shown_dir, origin)} to fetch a clean copy"
        )
        raise CarsTLError("\n".join(lines), fix)

    conflicts = find_conflicts(records, shown)
    dropped, losses = 0, {}
    if policy == "drop":
        gone = {g["sha256"] for g in conflicts}
        kept = [(r, m) for r, m in zip(records, mtimes) if r.sha256 not in gone]
        dropped = len(records) - len(kept)
        losses = drop_losses(records, [r for r, _ in kept], class_names, splits)
        records = [dataclasses.replace(r, index=i) for i, (r, _) in enumerate(kept)]
        mtimes = [m for _, m in kept]
        origin = dict(origin, label_conflicts="drop", label_conflicts_dropped=dropped)
    within_splits, across = same_label_duplicates(records, splits)

    csv_bytes = _manifest_csv(records)
    has_boxes = bool(origin.get("boxes", True))
    manifest = Manifest(
        root, records, class_names, hashlib.sha256(csv_bytes).hexdigest(), clipped, splits, has_boxes, origin
    )
    meta = {
        "manifest_version": MANIFEST_VERSION,
        "fingerprint": manifest.fingerprint,
        "class_names": class_names,
        "counts": manifest.counts(),
        "classes_present": manifest.classes_present(),
        "clipped_boxes": clipped,
        "origin": origin,
        "splits": list(splits),
        "boxes": has_boxes,
        **manifest_fields(policy, conflicts, dropped, losses, within_splits, across),
        "devkit_sha256": {str(p.relative_to(root)): file_sha256(p) for p in paths.values()},
        "mtime_ns": mtimes,
    }
    atomic_write_bytes(root / MANIFEST_CSV, csv_bytes)
    atomic_write_bytes(root / MANIFEST_JSON, json.dumps(meta, indent=1).encode())
    return manifest


def _manifest_csv(records: Iterable[Record]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in records:
        writer.writerow([r.index, r.split, r.path, r.label, r.class_name, *r.box, r.width, r.height, r.bytes, r.sha256])
    return out.getvalue().encode()


def load_manifest(data_dir: Path, *, check_files: bool = True) -> Manifest:
    """Read the manifest that ``cars-tl download`` wrote and check that it still describes the data.

    Checked every time: the fingerprint (SHA-256 of manifest.csv). With ``check_files`` (every
    stage): each row against the devkit annotations (paths, splits, labels, class names, boxes;
    so a hand edit with a recomputed fingerprint fails), and each image's size and mtime
    against the recorded ones (one ``stat`` per image; ``cars-tl download --verify`` hashes the
    bytes instead). A mismatch is an error naming the files and the download command that
    rebuilds the manifest from the recorded origin.
    """
    root = stanford_root(data_dir)
    csv_path, json_path = root / MANIFEST_CSV, root / MANIFEST_JSON
    if not csv_path.is_file() or not json_path.is_file():
        raise CarsTLError(
            f"no manifest at {csv_path}",
            f"cars-tl download --data-dir {data_dir}   (or --source demo / --source PATH)",
        )
    csv_bytes = csv_path.read_bytes()
    try:
        meta = json.loads(json_path.read_text())
    except ValueError as exc:
        meta = {"error": str(exc)}
    origin = meta.get("origin") if isinstance(meta.get("origin"), dict) else read_origin(root)
    rebuild = download_command(data_dir, origin)
    if meta.get("manifest_version") != MANIFEST_VERSION:
        raise CarsTLError(
            f"{json_path} is not a manifest of version {MANIFEST_VERSION} (found {meta.get('manifest_version', 'none')}): "
            "written by another cars_tl version, or damaged",
            f"{rebuild} rebuilds it",
        )
    fingerprint = hashlib.sha256(csv_bytes).hexdigest()
    if meta.get("fingerprint") != fingerprint:
        raise CarsTLError(
            f"{csv_path} was modified after it was written (fingerprint {fingerprint[:12]} != {str(meta.get('fingerprint'))[:12]})",
            f"{rebuild} rebuilds it",
        )
    records = []
    try:
        for row in csv.DictReader(io.StringIO(csv_bytes.decode())):
            records.append(
                Record(
                    int(row["index"]),
                    row["split"],
                    row["path"],
                    int(row["label"]),
                    row["class_name"],
                    (int(row["x1"]), int(row["y1"]), int(row["x2"]), int(row["y2"])),
                    int(row["width"]),
                    int(row["height"]),
                    int(row["bytes"]),
                    row["sha256"],
                )
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise CarsTLError(f"{csv_path} has a malformed row ({exc!r})", f"{rebuild} rebuilds it") from None
    splits = tuple(s for s in SPLITS if s in meta.get("splits", SPLITS))
    manifest = Manifest(
        root,
        records,
        list(meta["class_names"]),
        fingerprint,
        int(meta.get("clipped_boxes", 0)),
        splits,
        bool(meta.get("boxes", True)),
        origin,
    )
    if check_files:
        conflicts = meta.get("label_conflicts") if isinstance(meta.get("label_conflicts"), dict) else {}
        dropped = (
            {i["path"] for g in conflicts.get("list", []) for i in g["images"]}
            if origin.get("label_conflicts") == "drop"
            else set()
        )
        _check_against_devkit(manifest, rebuild, dropped)
        _check_images(manifest, meta.get("mtime_ns"), rebuild)
    return manifest


def _check_against_devkit(manifest: Manifest, rebuild: str, dropped: set[str] = frozenset()) -> None:
    """Every manifest row as the devkit says: the same images, splits, labels, names and boxes
    (less the ``dropped`` images: identical images with different labels, left out on request)."""
    root = manifest.root
    paths = devkit_paths(root, manifest.splits)
    class_names = read_class_names(paths["meta"])
    expected = {
        f"{IMAGE_DIRS[split]}/{row['fname']}": (split, row)
        for split, rows in split_annotations(paths, manifest.splits).items()
        for row in rows
        if f"{IMAGE_DIRS[split]}/{row['fname']}" not in dropped
    }
    wrong: list[str] = []
    if class_names != manifest.class_names:
        wrong.append(f"class names differ from {paths['meta'].name}")
    in_rows = set()
    for position, r in enumerate(manifest.records):
        in_rows.add(r.path)
        split_row = expected.get(r.path)
        if split_row is None:
            wrong.append(f"{r.path} is not in the devkit annotations")
            continue
        split, row = split_row
        label = row["class"] - 1
        if r.index != position or r.split != split or r.label != label:
            wrong.append(
                f"{r.path}: row {r.index}, split {r.split}, label {r.label} (devkit: row {position}, {split}, label {label})"
            )
        elif not 0 <= label < len(class_names) or r.class_name != class_names[label]:
            wrong.append(f"{r.path}: class name {r.class_name!r} (devkit: label {label})")
        elif r.box != _clip(row["box"], r.width, r.height):
            wrong.append(f"{r.path}: box {r.box} (devkit: {row['box']})")
    absent = [p for p in expected if p not in in_rows]
    if absent:
        wrong.append(f"{len(absent)} annotated images have no row: {listed(absent, 3)}")
    if wrong:
        raise CarsTLError(
            f"{root / MANIFEST_CSV} disagrees with the devkit annotations it was built from ({len(wrong)} problems): {listed(wrong)}",
            f"{rebuild} rebuilds it",
        )


def _check_images(manifest: Manifest, mtimes, rebuild: str) -> None:
    """Size and mtime of every image as recorded: a replaced image is caught without reading it."""
    if not isinstance(mtimes, list) or len(mtimes) != len(manifest.records):
        raise CarsTLError(f"{manifest.root / MANIFEST_JSON} lacks the images' mtimes", f"{rebuild} rebuilds it")
    changed = []
    for r, mtime in zip(manifest.records, mtimes):
        try:
            stat = os.stat(manifest.root / r.path)
        except OSError:
            changed.append(f"{r.path} (missing)")
            continue
        if stat.st_size != r.bytes:
            changed.append(f"{r.path} ({r.bytes} -> {stat.st_size} bytes)")
        elif stat.st_mtime_ns != mtime:
            changed.append(f"{r.path} (modified after the manifest was written)")
    if changed:
        raise CarsTLError(
            f"{len(changed)} images under {manifest.root} changed since the manifest was written: {listed(changed)}; "
            "features or runs made from the old images would no longer match them",
            f"{rebuild} --verify re-checks every image (SHA-256) and rebuilds the manifest (and its fingerprint, if the pixels changed)",
        )


def manifest_is_current(data_dir: Path) -> bool:
    """True when the manifest still describes the data: devkit files unchanged, every image's
    size and mtime as recorded, every row as the devkit says.

    The cheap check behind ``cars-tl download`` being a no-op on a verified dataset.
    """
    root = stanford_root(data_dir)
    try:
        load_manifest(data_dir)
        meta = json.loads((root / MANIFEST_JSON).read_text())
    except (CarsTLError, OSError, ValueError, KeyError):
        return False
    for rel, digest in meta.get("devkit_sha256", {}).items():
        if not (root / rel).is_file() or file_sha256(root / rel) != digest:
            return False
    return True


def summary(manifest: Manifest) -> str:
    """One line about a dataset: where, from what layout, counts, fingerprint, boxes, duplicates."""
    meta = json.loads((manifest.root / MANIFEST_JSON).read_text())
    counts = manifest.counts()
    sizes = ", ".join(f"{s} {counts[s]}" for s in manifest.splits)
    text = (
        f"{manifest.root} ({describe_origin(manifest.origin)}) — {sizes} images, "
        f"{manifest.classes_present()} of {manifest.num_classes} classes, fingerprint {manifest.fingerprint[:12]}"
    )
    if manifest.clipped_boxes:
        text += f", {manifest.clipped_boxes} boxes clipped to the image"
    if not manifest.has_boxes:
        text += ", no bounding boxes (--crop box unavailable)"
    across = meta.get("duplicates", {}).get("across_splits", 0)
    if across:
        text += f", {across} test images identical to train images (listed in manifest.json)"
    conflicts = describe_label_conflicts(meta.get("label_conflicts"), limit=0)
    if conflicts:
        text += f"\n{conflicts[0]}: listed in {manifest.root / MANIFEST_JSON} (label_conflicts) and by cars-tl inspect {manifest.root.parent}"
    if warning := drop_warning(meta.get("label_conflicts")):
        text += f"\n{warning}"
    return text
