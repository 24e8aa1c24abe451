"""Stanford Cars on disk: the devkit, the manifest, and a Dataset over it.

This module owns the dataset. It reads torchvision's layout::

    <data-dir>/stanford_cars/
        cars_train/00001.jpg ...
        cars_test/00001.jpg ...
        devkit/cars_meta.mat            class names (196), the only source of names
        devkit/cars_train_annos.mat     bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname
        devkit/cars_test_annos.mat      the same without class
        cars_test_annos_withlabels.mat  the test annotations with class

and writes, beside them, the manifest that every later stage reads instead of the .mat files:

``manifest.csv``
    one row per image: ``index, split, path, label, class_name, x1, y1, x2, y2, width, height``.
    ``path`` is relative to ``stanford_cars/``; ``label`` is 0-based (the .mat files are 1-based);
    the box is the devkit's, 1-based and inclusive, clipped to the image; width and height are the
    image's size after its EXIF orientation.
``manifest.json``
    class names, counts, the number of clipped boxes, the fingerprint (SHA-256 of manifest.csv)
    that every artifact records, and the SHA-256 of the devkit files it was built from.

Nothing here imports torch: ``cars-tl download`` stays fast. :class:`CarsDataset` is a plain
map-style dataset that a ``torch.utils.data.DataLoader`` accepts as it is.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from cars_tl.atomic import atomic_write_bytes, file_sha256
from cars_tl.errors import BadImageError, CarsTLError

STANFORD_DIR = "stanford_cars"
MANIFEST_CSV = "manifest.csv"
MANIFEST_JSON = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "test")
COLUMNS = ("index", "split", "path", "label", "class_name", "x1", "y1", "x2", "y2", "width", "height")
DEVKIT_FILES = {
    "meta": "devkit/cars_meta.mat",
    "train": "devkit/cars_train_annos.mat",
    "test_nolabels": "devkit/cars_test_annos.mat",
}
TEST_LABELS_NAMES = ("cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat")
IMAGE_DIRS = {"train": "cars_train", "test": "cars_test"}
_EXIF_ORIENTATION = 0x0112


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


@dataclasses.dataclass
class Manifest:
    """The dataset as later stages see it: records, class names, fingerprint."""

    root: Path  # the stanford_cars directory
    records: list[Record]
    class_names: list[str]
    fingerprint: str
    clipped_boxes: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> list[Record]:
        if name not in SPLITS:
            raise CarsTLError(f"unknown split {name!r}; valid splits: {', '.join(SPLITS)}")
        return [r for r in self.records if r.split == name]

    def counts(self) -> dict[str, int]:
        return {s: sum(r.split == s for r in self.records) for s in SPLITS}

    def classes_present(self) -> int:
        return len({r.label for r in self.records})


# --------------------------------------------------------------------------- devkit (.mat)


def _loadmat(path: Path) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as exc:  # scipy raises many types for corrupt files
        raise CarsTLError(f"unreadable .mat file {path}: {exc}") from exc


def read_class_names(meta_path: Path) -> list[str]:
    """Class names from ``cars_meta.mat`` (never from folder names: one contains a slash)."""
    mat = _loadmat(meta_path)
    if "class_names" not in mat:
        raise CarsTLError(f"{meta_path} has no 'class_names' variable (found: {sorted(k for k in mat if not k.startswith('__'))})")
    return [str(n) for n in np.atleast_1d(mat["class_names"])]


def read_annotations(path: Path, *, with_class: bool) -> list[dict]:
    """Rows of a devkit annotation file: fname, box (1-based inclusive) and 1-based class."""
    mat = _loadmat(path)
    if "annotations" not in mat:
        raise CarsTLError(f"{path} has no 'annotations' variable")
    ann = np.atleast_1d(mat["annotations"])
    fields = ann.dtype.names or ()
    needed = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "fname"] + (["class"] if with_class else [])
    missing = [f for f in needed if f not in fields]
    if missing:
        raise CarsTLError(f"{path} lacks annotation fields {missing} (has {list(fields)})")
    rows = []
    for a in ann:
        rows.append(
            {
                "fname": str(a["fname"]),
                "box": tuple(int(a[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")),
                "class": int(a["class"]) if with_class else None,
            }
        )
    return rows


def write_devkit(root: Path, class_names: Sequence[str], train: Sequence[dict], test: Sequence[dict]) -> None:
    """Write the four devkit files of torchvision's layout under ``root`` (a stanford_cars dir).

    ``train``/``test`` rows are dicts with ``fname``, ``box`` (1-based inclusive) and ``label``
    (0-based). Used by the demo generator and to convert the all-in-one layout.
    """
    import scipy.io

    def struct(rows: Sequence[dict], with_class: bool) -> np.ndarray:
        names = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
        arr = np.zeros((1, len(rows)), dtype=[(n, "O") for n in names])
        for i, r in enumerate(rows):
            values = [np.array([[v]], dtype=np.uint16) for v in r["box"]]
            if with_class:
                values.append(np.array([[r["label"] + 1]], dtype=np.uint8 if len(class_names) < 256 else np.uint16))
            values.append(np.array([r["fname"]]))
            arr[0, i] = tuple(values)
        return arr

    root = Path(root)
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    names = np.empty((1, len(class_names)), dtype=object)
    names[0, :] = list(class_names)
    scipy.io.savemat(root / DEVKIT_FILES["meta"], {"class_names": names})
    scipy.io.savemat(root / DEVKIT_FILES["train"], {"annotations": struct(train, True)})
    scipy.io.savemat(root / DEVKIT_FILES["test_nolabels"], {"annotations": struct(test, False)})
    scipy.io.savemat(root / TEST_LABELS_NAMES[0], {"annotations": struct(test, True)})


# --------------------------------------------------------------------------- images


def open_image(path: Path):
    """Open an image as RGB with its EXIF orientation applied.

    Grayscale, CMYK, palette and alpha modes all become RGB (alpha composited on white).
    Pillow's decompression-bomb limit stays on. Any decoding failure raises
    :class:`BadImageError` naming the file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc) or type(exc).__name__
        if os.path.exists(path) and os.path.getsize(path) == 0:
            reason = "empty file (0 bytes)"
        raise BadImageError(path, reason) from None
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB") if im.mode != "RGB" else im


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation, from the header alone."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(path, str(exc) or type(exc).__name__) from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def crop_box(image, box: tuple[int, int, int, int], margin: float = 0.0):
    """Crop a 1-based inclusive box, widened by ``margin`` (a fraction of its size) per side."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1 + 1, y2 - y1 + 1
    left = max(0, int(round(x1 - 1 - margin * bw)))
    top = max(0, int(round(y1 - 1 - margin * bh)))
    right = min(image.width, int(round(x2 + margin * bw)))
    bottom = min(image.height, int(round(y2 + margin * bh)))
    return image.crop((left, top, right, bottom))


@dataclasses.dataclass(frozen=True)
class BadItem:
    """What a ``mark_bad`` dataset yields for an unreadable image (picklable across workers)."""

    position: int
    path: str
    reason: str

    def error(self) -> BadImageError:
        return BadImageError(self.path, self.reason)


class CarsDataset:
    """Map-style dataset over one split of a manifest: yields ``(image, label, position)``.

    ``transform`` turns a PIL RGB image into a tensor (take it from the backbone). ``crop="box"``
    crops the annotated box (plus ``margin``) first. An unreadable image raises
    :class:`BadImageError`; with ``mark_bad`` it yields a :class:`BadItem` instead, so that the
    caller (in the main process, whatever its DataLoader workers) decides: skip it, or raise
    ``item.error()``. :func:`collate_marking_bad` collates such batches.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        transform: Callable | None = None,
        crop: str = "full",
        margin: float = 0.0,
        mark_bad: bool = False,
    ):
        if crop not in ("full", "box"):
            raise CarsTLError(f"unknown crop mode {crop!r}; valid: full, box")
        if margin < 0:
            raise CarsTLError(f"--margin must be >= 0, got {margin}")
        self.manifest = manifest
        self.records = manifest.split(split)
        self.transform = transform
        self.crop = crop
        self.margin = margin
        self.mark_bad = mark_bad

    def __len__(self) -> int:
        return len(self.records)

    def load(self, position: int):
        record = self.records[position]
        image = open_image(self.manifest.root / record.path)
        if self.crop == "box":
            image = crop_box(image, record.box, self.margin)
        return image

    def __getitem__(self, position: int):
        try:
            image = self.load(position)
        except BadImageError as exc:
            if self.mark_bad:
                return BadItem(position, exc.path, exc.reason)
            raise
        if self.transform is not None:
            image = self.transform(image)
        return image, self.records[position].label, position


def collate_marking_bad(batch):
    """Collate a ``mark_bad`` dataset's batch into ``(images, labels, positions, bad_items)``."""
    import torch
    from torch.utils.data import default_collate

    bad = [item for item in batch if isinstance(item, BadItem)]
    kept = [item for item in batch if not isinstance(item, BadItem)]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad
    return (*default_collate(kept), bad)


def raise_bad(bad: list) -> None:
    """Raise the first unreadable image of a batch (for stages that do not skip them)."""
    if bad:
        raise bad[0].error()


# --------------------------------------------------------------------------- manifest


def stanford_root(data_dir: Path) -> Path:
    return Path(data_dir) / STANFORD_DIR


def _test_labels_path(root: Path) -> Path | None:
    for name in TEST_LABELS_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def _devkit_paths(root: Path) -> dict[str, Path]:
    paths = {key: root / rel for key, rel in DEVKIT_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    labels = _test_labels_path(root)
    if labels is None:
        missing.append(str(root / TEST_LABELS_NAMES[0]))
    if missing:
        raise CarsTLError(
            f"Stanford Cars devkit incomplete under {root}: missing {', '.join(missing)}",
            "cars-tl download --data-dir <dir> (or --source demo for generated data)",
        )
    paths["test"] = labels
    return paths


def build_manifest(data_dir: Path) -> Manifest:
    """Validate the dataset under ``data_dir`` once and write its manifest (atomically).

    Every problem is collected and reported in one error naming files and counts: missing or
    duplicate images, unreadable .mat, labels out of range, empty boxes. Boxes overshooting the
    image edge are clipped and counted.
    """
    root = stanford_root(data_dir)
    if not root.is_dir():
        raise CarsTLError(
            f"no dataset at {root}",
            f"cars-tl download --data-dir {data_dir} (or --source demo for a generated one)",
        )
    paths = _devkit_paths(root)
    class_names = read_class_names(paths["meta"])
    annotations = {
        "train": read_annotations(paths["train"], with_class=True),
        "test": read_annotations(paths["test"], with_class=True),
    }
    problems: dict[str, list[str]] = {
        "missing images": [], "duplicate images": [], "labels out of range": [],
        "empty boxes": [], "unreadable images": [],
    }
    records: list[Record] = []
    clipped = 0
    for split in SPLITS:
        seen: set[str] = set()
        for row in annotations[split]:
            rel = f"{IMAGE_DIRS[split]}/{row['fname']}"
            if rel in seen:
                problems["duplicate images"].append(rel)
                continue
            seen.add(rel)
            if not 1 <= row["class"] <= len(class_names):
                problems["labels out of range"].append(f"{rel} (class {row['class']}, valid 1..{len(class_names)})")
                continue
            image_path = root / rel
            if not image_path.is_file():
                problems["missing images"].append(rel)
                continue
            try:
                width, height = image_size(image_path)
            except BadImageError as exc:
                problems["unreadable images"].append(f"{rel} ({exc.reason})")
                continue
            x1, y1, x2, y2 = row["box"]
            box = (max(1, x1), max(1, y1), min(width, x2), min(height, y2))
            if box[2] < box[0] or box[3] < box[1]:
                problems["empty boxes"].append(f"{rel} {row['box']} in {width}x{height}")
                continue
            clipped += box != row["box"]
            label = row["class"] - 1
            records.append(Record(len(records), split, rel, label, class_names[label], box, width, height))
    found = {k: v for k, v in problems.items() if v}
    if found:
        lines = [f"dataset under {root} failed validation ({paths['train'].name}, {paths['test'].name}):"]
        for kind, items in found.items():
            shown = ", ".join(items[:5]) + (f", ... ({len(items) - 5} more)" if len(items) > 5 else "")
            lines.append(f"  {len(items)} {kind}: {shown}")
        raise CarsTLError("\n".join(lines), f"re-run cars-tl download --data-dir {data_dir} to fetch a clean copy")

    csv_bytes = _manifest_csv(records)
    manifest = Manifest(root, records, class_names, hashlib.sha256(csv_bytes).hexdigest(), clipped)
    meta = {
        "manifest_version": MANIFEST_VERSION,
        "fingerprint": manifest.fingerprint,
        "class_names": class_names,
        "counts": manifest.counts(),
        "classes_present": manifest.classes_present(),
        "clipped_boxes": clipped,
        "devkit_sha256": {str(p.relative_to(root)): file_sha256(p) for p in paths.values()},
    }
    atomic_write_bytes(root / MANIFEST_CSV, csv_bytes)
    atomic_write_bytes(root / MANIFEST_JSON, json.dumps(meta, indent=2).encode())
    return manifest


def _manifest_csv(records: Iterable[Record]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in records:
        writer.writerow([r.index, r.split, r.path, r.label, r.class_name, *r.box, r.width, r.height])
    return out.getvalue().encode()


def load_manifest(data_dir: Path) -> Manifest:
    """Read the manifest that ``cars-tl download`` wrote; verify its fingerprint."""
    root = stanford_root(data_dir)
    csv_path, json_path = root / MANIFEST_CSV, root / MANIFEST_JSON
    if not csv_path.is_file() or not json_path.is_file():
        raise CarsTLError(
            f"no manifest at {csv_path}",
            f"cars-tl download --data-dir {data_dir}   (or --source demo / --source PATH)",
        )
    csv_bytes = csv_path.read_bytes()
    meta = json.loads(json_path.read_text())
    fingerprint = hashlib.sha256(csv_bytes).hexdigest()
    if meta.get("fingerprint") != fingerprint:
        raise CarsTLError(
            f"{csv_path} was modified after it was written (fingerprint {fingerprint[:12]} != {str(meta.get('fingerprint'))[:12]})",
            f"cars-tl download --data-dir {data_dir} rebuilds it",
        )
    records = []
    for row in csv.DictReader(io.StringIO(csv_bytes.decode())):
        records.append(
            Record(
                int(row["index"]), row["split"], row["path"], int(row["label"]), row["class_name"],
                (int(row["x1"]), int(row["y1"]), int(row["x2"]), int(row["y2"])),
                int(row["width"]), int(row["height"]),
            )
        )
    return Manifest(root, records, list(meta["class_names"]), fingerprint, int(meta.get("clipped_boxes", 0)))


def manifest_is_current(data_dir: Path) -> bool:
    """True when a manifest exists, its devkit files are unchanged and every image is present.

    The cheap check behind ``cars-tl download`` being a no-op on a verified dataset.
    """
    root = stanford_root(data_dir)
    try:
        manifest = load_manifest(data_dir)
        meta = json.loads((root / MANIFEST_JSON).read_text())
    except (CarsTLError, OSError, ValueError, KeyError):
        return False
    for rel, digest in meta.get("devkit_sha256", {}).items():
        if not (root / rel).is_file() or file_sha256(root / rel) != digest:
            return False
    return all((root / r.path).is_file() for r in manifest.records)
