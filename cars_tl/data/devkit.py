"""torchvision's Stanford Cars layout and the devkit's .mat files: where the images and annotations
live under ``<data-dir>/stanford_cars/``, reading class names and annotations, and writing a devkit
(the demo and the layouts that carry annotations in other forms produce one)::

    cars_train/00001.jpg ...  cars_test/00001.jpg ...
    devkit/cars_meta.mat  devkit/cars_train_annos.mat  devkit/cars_test_annos.mat
    cars_test_annos_withlabels.mat
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cars_tl.core.errors import CarsTLError

STANFORD_DIR = "stanford_cars"
SPLITS = ("train", "test")
DEVKIT_FILES = {
    "meta": "devkit/cars_meta.mat",
    "train": "devkit/cars_train_annos.mat",
    "test_nolabels": "devkit/cars_test_annos.mat",
}
TEST_LABELS_NAMES = ("cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat")
IMAGE_DIRS = {"train": "cars_train", "test": "cars_test"}


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
        raise CarsTLError(
            f"{meta_path} has no 'class_names' variable (found: {sorted(k for k in mat if not k.startswith('__'))})"
        )
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


def write_devkit(root: Path, class_names: Sequence[str], train: Sequence[dict], test: Sequence[dict] | None) -> None:
    """Write the four devkit files of torchvision's layout under ``root`` (a stanford_cars dir).

    ``train``/``test`` rows are dicts with ``fname``, ``box`` (1-based inclusive) and ``label``
    (0-based); ``test=None`` writes a train-only devkit. Used by the demo generator and to
    convert the all-in-one, class-folder and parquet layouts.
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
    if test is not None:
        scipy.io.savemat(root / DEVKIT_FILES["test_nolabels"], {"annotations": struct(test, False)})
        scipy.io.savemat(root / TEST_LABELS_NAMES[0], {"annotations": struct(test, True)})


def stanford_root(data_dir: Path) -> Path:
    return Path(data_dir) / STANFORD_DIR


def test_labels_path(root: Path) -> Path | None:
    for name in TEST_LABELS_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def devkit_paths(root: Path, splits: Sequence[str] = SPLITS) -> dict[str, Path]:
    paths = {"meta": root / DEVKIT_FILES["meta"], "train": root / DEVKIT_FILES["train"]}
    if "test" in splits:
        paths["test_nolabels"] = root / DEVKIT_FILES["test_nolabels"]
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if "test" in splits:
        labels = test_labels_path(root)
        if labels is None:
            missing.append(str(root / TEST_LABELS_NAMES[0]))
        paths["test"] = labels
    if missing:
        raise CarsTLError(
            f"Stanford Cars devkit incomplete under {root}: missing {', '.join(missing)}",
            "cars-tl download --data-dir <dir> (or --source demo for generated data)",
        )
    return paths


def split_annotations(paths: dict[str, Path], splits: Sequence[str]) -> dict[str, list[dict]]:
    return {split: read_annotations(paths[split], with_class=True) for split in splits}
