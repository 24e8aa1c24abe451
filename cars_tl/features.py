"""The HDF5 feature cache: its schema, writing (resumable) and validated reading.

This module is the only one that touches h5py. Layout of a cache file (schema version 1)::

    /                                 file attributes
        kind                = "cars_tl.features"
        schema_version      = 1
        backbone            e.g. "resnet50", "timm/efficientnet_lite0"
        weights             "imagenet" | "random" | a path
        weights_digest      SHA-256 of the backbone's state dict (names, shapes, bytes)
        weights_sha256      SHA-256 of the weights file ("" for seeded random weights)
        transform           JSON: resize, crop, mean, std, interpolation
        crop                "full" | "box";  margin (float, for box crops)
        precision           "fp32" | "bf16" | "fp16" (what the backbone ran in)
        class_names         JSON list, index = label
        num_classes, feature_dim
        dataset_fingerprint SHA-256 of the manifest the images came from
        versions            JSON: python, torch, torchvision, ...
        options             JSON: the extraction options (batch size, device, ...)
        created             ISO time
    /<split>/                         one group per split ("train", "test")
        features  float32 (N, D)  chunked by rows, gzip + shuffle, fletcher32 checksums
        labels    int64 (N,)      0-based class index
        ids       int64 (N,)      the image's row in the manifest
        paths     utf-8 (N,)      image path relative to stanford_cars/
        attrs: count, skipped (JSON list of {path, reason}: images left out by --skip-bad)

Everything is readable with plain h5py (``f["train/features"][:]``). While extraction runs, finished
chunks live in ``<name>.partial/`` as ``.npz`` files (each written atomically), so a killed run
resumes from the last complete chunk; the ``.h5`` appears, by rename, only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from cars_tl.atomic import atomic_path, atomic_write_text
from cars_tl.errors import CarsTLError

KIND = "cars_tl.features"
SCHEMA_VERSION = 1
JSON_ATTRS = ("transform", "class_names", "versions", "options")
# What makes two extractions the same: a complete file matching these is reused as it is.
IDENTITY_KEYS = ("backbone", "weights_digest", "transform", "crop", "margin", "precision", "dataset_fingerprint", "skip_bad")


@dataclasses.dataclass
class SplitArrays:
    features: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    paths: list[str]
    skipped: list[dict]


@dataclasses.dataclass
class FeatureCache:
    path: Path
    attrs: dict
    splits: dict[str, SplitArrays]

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def feature_dim(self) -> int:
        return int(self.attrs["feature_dim"])

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    def split(self, name: str) -> SplitArrays:
        if name not in self.splits and not dataset_has_split(self, name):
            raise CarsTLError(
                f"{self.path} has no '{name}' split because its dataset has none (imported with --splits train); "
                f"this stage needs {name} features",
                "import the test split too (cars-tl download --source PATH --test-labels FILE), then rerun cars-tl extract-features",
            )
        if name not in self.splits:
            raise CarsTLError(
                f"{self.path} has no '{name}' split (it has: {', '.join(self.splits) or 'none'})",
                f"cars-tl extract-features --split {name} ... --out {self.path}",
            )
        return self.splits[name]


def dataset_has_split(cache: FeatureCache, name: str) -> bool:
    """Whether the dataset the cache was extracted from has ``name`` (older caches: both splits)."""
    return name in cache.attrs.get("options", {}).get("dataset_splits", ("train", "test"))


def weights_tag(weights: str) -> str:
    """A short name for weights in default file names: ``imagenet``, ``random``, or ``file-<stem>``."""
    return f"file-{Path(weights).stem}" if "/" in weights or "\\" in weights or Path(weights).exists() else weights


def default_path(artifacts: Path, backbone: str, weights: str, crop: str) -> Path:
    name = f"{backbone.replace('/', '-')}-{weights_tag(weights)}" + ("-box" if crop == "box" else "")
    return Path(artifacts) / "features" / f"{name}.h5"


def _decode(attrs) -> dict:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        out[key] = json.loads(value) if key in JSON_ATTRS else value
    return out


def read_attrs(path: Path) -> dict:
    """The file attributes, after checking this is a cars_tl feature cache of a known schema."""
    import h5py

    path = Path(path)
    if not path.is_file():
        partial = partial_dir(path)
        hint = (
            "an extraction was interrupted: rerun the same cars-tl extract-features command to resume"
            if partial.exists() else "cars-tl extract-features --out " + str(path)
        )
        raise CarsTLError(f"feature file {path} does not exist", hint)
    try:
        with h5py.File(path, "r") as f:
            attrs = _decode(f.attrs)
    except OSError as exc:
        raise CarsTLError(f"{path} is not a readable HDF5 file: {exc}", "delete it and rerun cars-tl extract-features") from None
    if attrs.get("kind") != KIND:
        raise CarsTLError(f"{path} is not a cars_tl feature cache (kind={attrs.get('kind')!r})")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise CarsTLError(
            f"{path} has feature-cache schema {attrs.get('schema_version')}, this cars_tl reads {SCHEMA_VERSION}",
            "re-extract it with this version: cars-tl extract-features ...",
        )
    return attrs


def load(path: Path, splits: tuple[str, ...] = ("train", "test")) -> FeatureCache:
    """Read and validate a cache: schema, shapes, labels in range, checksums of every chunk."""
    import h5py

    attrs = read_attrs(path)
    out: dict[str, SplitArrays] = {}
    with h5py.File(path, "r") as f:
        for name in splits:
            if name not in f:
                continue
            group = f[name]
            try:
                features = group["features"][:]
                labels = group["labels"][:]
                ids = group["ids"][:]
                paths = [p.decode() if isinstance(p, bytes) else str(p) for p in group["paths"][:]]
            except OSError as exc:  # fletcher32 mismatch lands here
                raise CarsTLError(
                    f"{path}: split '{name}' is corrupt ({exc})", "delete the file and rerun cars-tl extract-features"
                ) from None
            skipped = json.loads(group.attrs.get("skipped", "[]"))
            n = len(labels)
            if features.shape != (n, attrs["feature_dim"]) or len(ids) != n or len(paths) != n:
                raise CarsTLError(f"{path}: split '{name}' has inconsistent shapes {features.shape}, {n} labels")
            if n and (labels.min() < 0 or labels.max() >= attrs["num_classes"]):
                raise CarsTLError(f"{path}: split '{name}' has labels outside 0..{attrs['num_classes'] - 1}")
            out[name] = SplitArrays(features, labels.astype(np.int64), ids, paths, skipped)
    return FeatureCache(Path(path), attrs, out)


def splits_made_alike(path: Path, identity: dict) -> set[str]:
    """The splits of a complete cache at ``path`` made from the same inputs (empty if none)."""
    import h5py

    try:
        attrs = read_attrs(path)
        with h5py.File(path, "r") as f:
            present = set(f.keys())
    except CarsTLError:
        return set()
    return present if all(attrs.get(k) == identity.get(k) for k in IDENTITY_KEYS) else set()


# --------------------------------------------------------------------------- writing


def partial_dir(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".partial")


class PartialCache:
    """Chunks of an extraction in progress; resumes when the identity and chunking match."""

    def __init__(self, path: Path, meta: dict, sizes: dict[str, int], chunk_rows: int):
        self.path = Path(path)
        self.dir = partial_dir(path)
        self.meta = dict(meta, sizes=sizes, chunk_rows=chunk_rows)
        self.chunk_rows = chunk_rows
        self.resumed_rows = 0
        meta_file = self.dir / "meta.json"
        if self.dir.exists():
            try:
                old = json.loads(meta_file.read_text())
            except (OSError, ValueError):
                old = None
            if old != json.loads(json.dumps(self.meta)):
                shutil.rmtree(self.dir)  # other inputs: its chunks are of no use
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta_file, json.dumps(self.meta, indent=2))
        self.resumed_rows = sum(self.done_rows(s) for s in sizes)

    def _chunk(self, split: str, start: int) -> Path:
        return self.dir / f"{split}-{start:09d}.npz"

    def done_rows(self, split: str) -> int:
        """Rows of ``split`` covered by consecutive complete chunks from the start."""
        start = 0
        while self._chunk(split, start).is_file():
            start += self.chunk_rows
        return min(start, self.meta["sizes"][split])

    def write_chunk(self, split: str, start: int, features: np.ndarray, valid: np.ndarray, reasons: dict[int, str]) -> None:
        with atomic_path(self._chunk(split, start)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=features.astype(np.float32), valid=valid, bad=json.dumps({str(k): v for k, v in reasons.items()}))

    def _gather(self, split: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        feats, valid, bad = [], [], {}
        for start in range(0, self.meta["sizes"][split], self.chunk_rows):
            with np.load(self._chunk(split, start)) as z:
                feats.append(z["features"])
                valid.append(z["valid"])
                bad.update({int(k): v for k, v in json.loads(str(z["bad"])).items()})
        dim = self.meta["feature_dim"]
        return (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)), (np.concatenate(valid) if valid else np.zeros(0, bool)), bad

    def finalize(self, attrs: dict, rows: dict[str, dict], carry: dict[str, SplitArrays] | None = None) -> Path:
        """Write the complete ``.h5`` (temp name, then rename) and drop the partial chunks.

        ``rows[split]`` holds ``labels``, ``ids`` and ``paths`` for every image of the split, in order;
        ``carry`` holds splits already extracted alike, copied as they are.
        """
        import h5py

        with atomic_path(self.path) as tmp:
            with h5py.File(tmp, "w") as f:
                for key, value in dict(attrs, kind=KIND, schema_version=SCHEMA_VERSION, created=time.strftime("%Y-%m-%dT%H:%M:%S%z")).items():
                    f.attrs[key] = json.dumps(value) if key in JSON_ATTRS else value
                for split, arrays in (carry or {}).items():
                    write_split(f, split, arrays.features, arrays.labels, arrays.ids, arrays.paths, arrays.skipped)
                for split, info in rows.items():
                    features, valid, bad = self._gather(split)
                    keep = np.flatnonzero(valid)
                    write_split(
                        f, split, features[keep], np.asarray(info["labels"])[keep], np.asarray(info["ids"])[keep],
                        [info["paths"][i] for i in keep], [{"path": info["paths"][i], "reason": r} for i, r in sorted(bad.items())],
                    )
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.path


def write_split(f, split: str, features, labels, ids, paths, skipped) -> None:
    import h5py

    group = f.create_group(split)
    n, dim = features.shape
    group.create_dataset(
        "features", data=features.astype(np.float32), chunks=(max(1, min(n, 256)), dim) if n else None,
        compression="gzip", compression_opts=4, shuffle=True, fletcher32=True,
    )
    group.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    group.create_dataset("ids", data=np.asarray(ids, dtype=np.int64))
    group.create_dataset("paths", data=np.array(paths, dtype=object), dtype=h5py.string_dtype("utf-8"))
    group.attrs["count"] = n
    group.attrs["skipped"] = json.dumps(skipped)


def write(path: Path, attrs: dict, splits: dict[str, SplitArrays]) -> Path:
    """Write a whole cache at once (tests, conversions); atomic like :meth:`PartialCache.finalize`."""
    import h5py

    with atomic_path(Path(path)) as tmp:
        with h5py.File(tmp, "w") as f:
            for key, value in dict(attrs, kind=KIND, schema_version=SCHEMA_VERSION).items():
                f.attrs[key] = json.dumps(value) if key in JSON_ATTRS else value
            for name, s in splits.items():
                write_split(f, name, s.features, s.labels, s.ids, s.paths, s.skipped)
    return Path(path)
