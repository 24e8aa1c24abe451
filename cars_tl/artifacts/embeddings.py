"""Penultimate features of fine-tuned runs, and stored 2-D feature maps: the one owner of both files.

``penultimate-test.npz`` (format_version 1), written by ``finetune`` beside its run at the end of
training: the kept model's pooled features (the head's input) on every test image, in the order the
stage scored them (plain ``numpy.load``, no pickle)::

    features       float16 (N, D)   compact: the map needs directions, not the last bits
    labels         int64 (N,)       true label
    ids            int64 (N,)       the image's row in the manifest (``index`` column)
    split          str              "test"
    format_version int              1

``<source>.map-<split>.npz`` (format_version 1): a 2-D map of a split's features (PCA, then t-SNE),
stored beside its source (a feature cache ``F.h5`` -> ``F.h5.map-test.npz``; a run's
``penultimate-test.npz`` -> ``penultimate-test.npz.map-test.npz``) and reused while the source's
SHA-256 and the map's settings are unchanged::

    coords          float32 (N, 2)   the map
    labels, ids     int64 (N,)
    source_sha256   str              SHA-256 of the source file the map was computed from
    settings        str (JSON)       method, seed, pca_dims, perplexity, k of the kNN figures
    knn_map, knn_full float          make-level leave-one-out kNN accuracy (%) in the map / in the full space
    seconds         float            what computing it took
    format_version  int              1
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cars_tl.core.atomic import atomic_path
from cars_tl.core.errors import CarsTLError

FORMAT_VERSION = 1
PENULTIMATE = "penultimate-{split}.npz"
_PENULTIMATE_KEYS = ("features", "labels", "ids", "split", "format_version")
_MAP_KEYS = ("coords", "labels", "ids", "source_sha256", "settings", "knn_map", "knn_full", "seconds", "format_version")


def penultimate_path(run_dir: Path, split: str = "test") -> Path:
    return Path(run_dir) / PENULTIMATE.format(split=split)


def _save_npz(path: Path, **arrays) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path


def save_penultimate(run_dir: Path, features, labels, ids, split: str = "test") -> Path:
    features = np.asarray(features, dtype=np.float16)
    labels, ids = np.asarray(labels, dtype=np.int64), np.asarray(ids, dtype=np.int64)
    if features.ndim != 2 or len(features) != len(labels) or len(ids) != len(labels):
        raise ValueError(f"penultimate features {features.shape} for {len(labels)} labels and {len(ids)} ids")
    return _save_npz(
        penultimate_path(run_dir, split),
        features=features,
        labels=labels,
        ids=ids,
        split=np.array(split),
        format_version=np.array(FORMAT_VERSION),
    )


def _load_npz(path: Path, keys: tuple[str, ...], what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CarsTLError(f"{path} does not exist", f"it is written by {what}")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise CarsTLError(f"{path} is not a readable .npz file: {exc}", f"delete it and rerun {what}") from None
    missing = [k for k in keys if k not in out]
    if missing or int(out.get("format_version", -1)) != FORMAT_VERSION:
        raise CarsTLError(
            f"{path}: not a format-{FORMAT_VERSION} file (missing {missing or 'nothing'}, "
            f"format {out.get('format_version')})",
            f"delete it and rerun {what}",
        )
    return out


def load_penultimate(path: Path) -> dict:
    """A penultimate-features file, validated (shapes agree, features finite)."""
    z = _load_npz(path, _PENULTIMATE_KEYS, "finetune (at the end of training)")
    n = len(z["labels"])
    if z["features"].ndim != 2 or len(z["features"]) != n or len(z["ids"]) != n:
        raise CarsTLError(
            f"{path}: features {z['features'].shape} do not match {n} labels", "rerun the finetune with --force"
        )
    return {"features": z["features"], "labels": z["labels"], "ids": z["ids"], "split": str(z["split"])}


def map_path(source: Path, split: str) -> Path:
    source = Path(source)
    return source.with_name(f"{source.name}.map-{split}.npz")


def save_map(
    path: Path, coords, labels, ids, source_sha256: str, settings: dict, knn_map: float, knn_full: float, seconds: float
) -> Path:
    return _save_npz(
        path,
        coords=np.asarray(coords, np.float32),
        labels=np.asarray(labels, np.int64),
        ids=np.asarray(ids, np.int64),
        source_sha256=np.array(source_sha256),
        settings=np.array(json.dumps(settings, sort_keys=True)),
        knn_map=np.array(float(knn_map)),
        knn_full=np.array(float(knn_full)),
        seconds=np.array(float(seconds)),
        format_version=np.array(FORMAT_VERSION),
    )


def load_map(path: Path) -> dict | None:
    """A stored map, or None when absent or unreadable (it is then computed again)."""
    try:
        z = _load_npz(path, _MAP_KEYS, "the feature map")
    except CarsTLError:
        return None
    if z["coords"].shape != (len(z["labels"]), 2):
        return None
    return {
        "coords": z["coords"],
        "labels": z["labels"],
        "ids": z["ids"],
        "source_sha256": str(z["source_sha256"]),
        "settings": json.loads(str(z["settings"])),
        "knn_map": float(z["knn_map"]),
        "knn_full": float(z["knn_full"]),
        "seconds": float(z["seconds"]),
    }
