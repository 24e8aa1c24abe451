"""The HDF5 feature cache: its schema, writing (resumable) and validated reading.

This module is the only one that touches h5py. Layout of a cache file (schema version 2)::

    /                                 file attributes
        kind                = "cars_tl.features"
        schema_version      = 2
        backbone            e.g. "resnet50", "timm/efficientnet_lite0"
        weights             "imagenet" | "random" | a path
        weights_digest      SHA-256 of the backbone's state dict (names, shapes, bytes)
        weights_sha256      SHA-256 of the weights file ("" for seeded random weights)
        transform           JSON: mode, resize, side (the final side in pixels; "crop" in files of earlier
                            versions, read alike), mean, std, interpolation; optional "features":
                            {"tta": "flip", "layers": [...], "combine": "l2"|"raw",
                            "columns": {layer: [start, stop]}} -- what a row is made of
                            (cars_tl.models.feature_views; absent: one view, the final pooled output)
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
        labels    int64 (N,)      0-based class index, fletcher32
        ids       int64 (N,)      the image's row in the manifest, fletcher32
        paths     utf-8 (N,)      image path relative to stanford_cars/
        attrs: count, skipped (JSON list of {path, reason}: images left out by --skip-bad)
        every dataset also carries ``sha256``: SHA-256 of its content (for ``paths``, the
        UTF-8 names each followed by a NUL byte), checked on every read

Everything is readable with plain h5py (``f["train/features"][:]``). While extraction runs, finished
chunks live in ``<name>.partial/`` as ``.npz`` files (each written atomically, named and stamped with
the chunk layout they were cut with), so a killed run resumes from the last complete chunk. The
``.h5`` is written under a temporary name, read back and verified in full (schema, shapes, label
range, every checksum), and only then renamed into place. :func:`verify` is what "up to date" means:
a file that fails it is never trusted, and extract-features says so and extracts again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from cars_tl.artifacts import hdf5
from cars_tl.core.atomic import atomic_path, atomic_write_text, ensure_room, file_sha256, format_size
from cars_tl.core.errors import CarsTLError
from cars_tl.core.options import same_transform

KIND = "cars_tl.features"  # the file's format name, written since the first cache (not the module's path)
# Also read: what this version wrote for a while after the package was split into layers (the module
# path had replaced the format name by mistake); the files are otherwise the same.
READ_KINDS = (KIND, "cars_tl.artifacts.features")
SCHEMA_VERSION = 2
DATASETS = ("features", "labels", "ids", "paths")
JSON_ATTRS = ("transform", "class_names", "versions", "options")
# What every reader relies on, by type (num_classes and class_names: hdf5.check_classes).
ATTR_TYPES = {
    "backbone": str,
    "weights": str,
    "weights_digest": str,
    "transform": dict,
    "crop": str,
    "margin": (int, float),
    "precision": str,
    "feature_dim": int,
    "dataset_fingerprint": str,
}
MAX_FEATURE_DIM = 1 << 20
# What makes two extractions the same: a complete file matching these is reused as it is.
IDENTITY_KEYS = (
    "backbone",
    "weights_digest",
    "transform",
    "crop",
    "margin",
    "precision",
    "dataset_fingerprint",
    "skip_bad",
)


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


def read_attrs(path: Path) -> dict:
    """The file attributes, after checking this is a cars_tl feature cache of a known schema."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.h5"))[:3]
        raise CarsTLError(
            f"{path} is a folder; a feature file (.h5) is expected"
            + (f" (it holds: {', '.join(p.name for p in found)})" if found else ""),
            f"pass the file inside it, e.g. {found[0]}"
            if found
            else "cars-tl extract-features --out FILE.h5, then pass --features FILE.h5",
        )
    if not path.is_file():
        partial = partial_dir(path)
        hint = (
            "an extraction was interrupted: rerun the same cars-tl extract-features command to resume"
            if partial.exists()
            else "cars-tl extract-features --out " + str(path)
        )
        raise CarsTLError(f"feature file {path} does not exist", hint)
    attrs = hdf5.read_format_attrs(
        path,
        kind=READ_KINDS,
        schema_version=SCHEMA_VERSION,
        json_keys=JSON_ATTRS,
        what="feature cache",
        unreadable_hint=_fix(path),
        kind_hint=None,
        schema_hint="re-extract it with this version: cars-tl extract-features ...",
    )
    hdf5.check_classes(attrs, path, _fix(path))
    hdf5.check_attr_types(attrs, ATTR_TYPES, path, _fix(path))
    if not 1 <= attrs["feature_dim"] <= MAX_FEATURE_DIM:
        raise CarsTLError(
            f"{path}: attribute 'feature_dim' is {attrs['feature_dim']}; valid: 1 to {MAX_FEATURE_DIM:,}", _fix(path)
        )
    return attrs


def _fix(path: Path) -> str:
    return f"delete {path} and rerun cars-tl extract-features (it re-extracts a corrupt file by itself)"


def content_digest(values) -> str:
    """SHA-256 of a dataset's content: array bytes (C order), or UTF-8 strings each ended by NUL."""
    digest = hashlib.sha256()
    if isinstance(values, np.ndarray) and values.dtype != object:
        digest.update(np.ascontiguousarray(values).tobytes())
    else:
        for value in values:
            digest.update((value.decode() if isinstance(value, bytes) else str(value)).encode() + b"\0")
    return digest.hexdigest()


def load(path: Path, splits: tuple[str, ...] = ("train", "test")) -> FeatureCache:
    """Read and validate a cache: schema, shapes and types (checked before anything is read), labels
    in range, checksums of every dataset."""
    attrs = read_attrs(path)
    fix = _fix(path)
    out: dict[str, SplitArrays] = {}
    with hdf5.open_file(path, "feature cache", fix) as f, hdf5.reading(path, "feature cache", fix):
        for name in splits:
            if name in f:
                out[name] = _read_split(f, path, name, attrs, fix)
    return FeatureCache(Path(path), attrs, out)


def _read_split(f, path: Path, name: str, attrs: dict, fix: str) -> SplitArrays:
    import h5py

    group = f[name]
    if not isinstance(group, h5py.Group):
        raise CarsTLError(f"{path}: /{name} is a {type(group).__name__}, not the group of a split", fix)
    missing = [d for d in DATASETS if not isinstance(group.get(d), h5py.Dataset)]
    if missing:
        raise CarsTLError(
            f"{path}: split '{name}' lacks the dataset(s) {', '.join(missing)} (it has: {', '.join(sorted(group)) or 'none'}); "
            f"a cars_tl cache holds {', '.join(DATASETS)} per split",
            fix,
        )
    n = hdf5.check_dataset(group["features"], path, f"{name}/features", dtype_kinds="f", ndim=2, rows=None, hint=fix)
    if group["features"].shape[1] != attrs["feature_dim"] or group["features"].dtype != np.float32:
        raise CarsTLError(
            f"{path}: split '{name}' has features of shape {group['features'].shape} and dtype "
            f"{group['features'].dtype}, expected float32 rows of feature_dim {attrs['feature_dim']}",
            fix,
        )
    for d, kinds in (("labels", "iu"), ("ids", "iu"), ("paths", "T")):
        hdf5.check_dataset(group[d], path, f"{name}/{d}", dtype_kinds=kinds, ndim=1, rows=n, hint=fix)
    arrays = {}
    try:
        for d in ("features", "labels", "ids"):
            arrays[d] = group[d][:]
    except OSError as exc:  # a fletcher32 mismatch lands here
        raise CarsTLError(f"{path}: split '{name}' is corrupt ({exc})", fix) from None
    paths = hdf5.read_text_rows(group["paths"], path, f"{name}/paths", fix)
    for d, values in (*arrays.items(), ("paths", paths)):
        recorded = hdf5.decode_attr(group[d].attrs.get("sha256", ""), f"{name}/{d} sha256", path, fix)
        if recorded != content_digest(values):
            raise CarsTLError(
                f"{path}: split '{name}' is corrupt ({name}/{d} does not match its recorded SHA-256)", fix
            )
    skipped = hdf5.decode_attr(group.attrs.get("skipped", "[]"), f"{name} skipped", path, fix, json_key=True)
    if not isinstance(skipped, list):
        raise CarsTLError(f"{path}: split '{name}' lists its skipped images as a {type(skipped).__name__}", fix)
    labels = arrays["labels"]
    if n and (labels.min() < 0 or labels.max() >= attrs["num_classes"]):
        raise CarsTLError(f"{path}: split '{name}' has labels outside 0..{attrs['num_classes'] - 1}", fix)
    return SplitArrays(arrays["features"], labels.astype(np.int64), arrays["ids"], paths, skipped)


def split_names(path: Path) -> list[str]:
    """The names at the top of a cache file: a cars_tl cache holds only split groups there (so
    :func:`load` of them refuses anything else)."""
    fix = _fix(path)
    with hdf5.open_file(path, "feature cache", fix) as f, hdf5.reading(path, "feature cache", fix):
        return sorted(f.keys())


def verify(path: Path) -> FeatureCache:
    """Every split of the file read and checked: what "up to date" rests on."""
    read_attrs(path)
    return load(path, tuple(split_names(path)))


def existing_splits(path: Path, identity: dict) -> tuple[dict[str, SplitArrays], str | None]:
    """The verified splits of a cache at ``path`` made from the same inputs, and why an existing
    file could not be trusted (``None`` when there is no file, or it was sound)."""
    if not Path(path).exists():
        return {}, None
    try:
        cache = verify(path)
    except CarsTLError as exc:
        return {}, exc.message
    if any(
        not same_transform(cache.attrs[k], identity[k])
        if k == "transform" and isinstance(cache.attrs.get(k), dict) and isinstance(identity.get(k), dict)
        else cache.attrs.get(k) != identity.get(k)
        for k in IDENTITY_KEYS
    ):
        return {}, None  # a sound file from other inputs: replaced, as asked
    return cache.splits, None


# --------------------------------------------------------------------------- writing


def partial_dir(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".partial")


class PartialCache:
    """Chunks of an extraction in progress; resumes when the identity and chunk layout match.

    A chunk file's name carries the layout it was cut with (``<split>-r<chunk_rows>-<start>.npz``)
    and its contents repeat it, so chunks of another layout are never mixed in. Call only while
    holding the cache's :func:`cars_tl.core.locks.writer_lock`, or with ``join`` from the other ranks of a
    torchrun job whose rank 0 holds it and made the folder: they neither clear it nor rewrite its
    ``meta.json``, and write only their own chunks (a shard aligned to ``chunk_rows``).
    """

    def __init__(self, path: Path, meta: dict, sizes: dict[str, int], chunk_rows: int, join: bool = False):
        self.path = Path(path)
        self.dir = partial_dir(path)
        self.meta = dict(meta, sizes=sizes, chunk_rows=chunk_rows)
        self.chunk_rows = chunk_rows
        self.resumed_rows = 0
        meta_file = self.dir / "meta.json"
        if join:
            try:
                joined = json.loads(meta_file.read_text())
            except (OSError, ValueError):
                joined = None
            if joined != json.loads(json.dumps(self.meta)):
                raise CarsTLError(
                    f"{self.dir} does not hold the extraction rank 0 prepared (meta.json differs or is missing)",
                    "every rank must see the same --out folder: put it on a filesystem shared by the nodes",
                )
            self.resumed_rows = 0
            return
        if self.dir.exists():
            try:
                old = json.loads(meta_file.read_text())
            except (OSError, ValueError):
                old = None
            if old != json.loads(json.dumps(self.meta)):
                shutil.rmtree(self.dir)  # other inputs or layout: its chunks are of no use
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta_file, json.dumps(self.meta, indent=2))
        self.resumed_rows = sum(sizes[s] - sum(map(len, self.missing_runs(s, range(sizes[s])))) for s in sizes)

    def _chunk(self, split: str, start: int) -> Path:
        return self.dir / f"{split}-r{self.chunk_rows}-{start:09d}.npz"

    def _rows_in(self, split: str, start: int) -> int:
        return min(self.chunk_rows, self.meta["sizes"][split] - start)

    def done_rows(self, split: str) -> int:
        """Rows of ``split`` covered by consecutive complete chunks from the start."""
        start = 0
        while start < self.meta["sizes"][split] and self._chunk(split, start).is_file():
            start += self.chunk_rows
        return min(start, self.meta["sizes"][split])

    def missing_runs(self, split: str, rows: range) -> list[range]:
        """The rows of ``rows`` (chunk-aligned start) not yet in a complete chunk, as ranges of whole chunks."""
        out: list[range] = []
        for start in range(rows.start, rows.stop, self.chunk_rows):
            if self._chunk(split, start).is_file():
                continue
            stop = start + self._rows_in(split, start)
            out[-1:] = (
                [range(out[-1].start, stop)] if out and out[-1].stop == start else out[-1:] + [range(start, stop)]
            )
        return out

    def write_chunk(
        self, split: str, start: int, features: np.ndarray, valid: np.ndarray, reasons: dict[int, str]
    ) -> None:
        if len(features) != self._rows_in(split, start) or start % self.chunk_rows:
            raise ValueError(
                f"chunk of {len(features)} rows at {start} does not fit the layout of {self.chunk_rows} rows"
            )
        with atomic_path(self._chunk(split, start)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    features=features.astype(np.float32),
                    valid=valid,
                    start=start,
                    chunk_rows=self.chunk_rows,
                    bad=json.dumps({str(k): v for k, v in reasons.items()}),
                )

    def _gather(self, split: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        feats, valid, bad = [], [], {}
        dim = self.meta["feature_dim"]
        for start in range(0, self.meta["sizes"][split], self.chunk_rows):
            path = self._chunk(split, start)
            try:
                with np.load(path) as z:
                    chunk = {k: z[k] for k in ("features", "valid", "start", "chunk_rows", "bad")}
            except (OSError, ValueError, KeyError) as exc:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise CarsTLError(
                    f"partial chunk {path} is unreadable ({exc}); the partial extraction was discarded",
                    "rerun the same cars-tl extract-features command to extract again",
                ) from None
            rows = self._rows_in(split, start)
            if (
                (int(chunk["start"]), int(chunk["chunk_rows"])) != (start, self.chunk_rows)
                or chunk["features"].shape != (rows, dim)
                or chunk["valid"].shape != (rows,)
            ):
                shutil.rmtree(self.dir, ignore_errors=True)
                raise CarsTLError(
                    f"partial chunk {path} does not fit the layout it is named for; the partial extraction was discarded",
                    "rerun the same cars-tl extract-features command to extract again",
                )
            feats.append(chunk["features"])
            valid.append(chunk["valid"])
            bad.update({int(k): v for k, v in json.loads(str(chunk["bad"])).items()})
        return (
            (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)),
            (np.concatenate(valid) if valid else np.zeros(0, bool)),
            bad,
        )

    def finalize(
        self, attrs: dict, rows: dict[str, dict], carry: dict[str, SplitArrays] | None = None
    ) -> dict[str, SplitArrays]:
        """Write the complete ``.h5`` (temporary name, verified, then renamed) and drop the chunks.

        ``rows[split]`` holds ``labels``, ``ids`` and ``paths`` for every image of the split, in order;
        ``carry`` holds splits already extracted alike, copied as they are. Returns the splits written
        (the file was read back and verified by :func:`write`: no need to read it again).
        """
        splits = dict(carry or {})
        for split, info in rows.items():
            features, valid, bad = self._gather(split)
            keep = np.flatnonzero(valid)
            splits[split] = SplitArrays(
                features[keep],
                np.asarray(info["labels"], dtype=np.int64)[keep],
                np.asarray(info["ids"], dtype=np.int64)[keep],
                [info["paths"][i] for i in keep],
                [{"path": info["paths"][i], "reason": r} for i, r in sorted(bad.items())],
            )
        write(self.path, dict(attrs, created=time.strftime("%Y-%m-%dT%H:%M:%S%z")), splits)
        shutil.rmtree(self.dir, ignore_errors=True)
        return splits


def write_split(f, split: str, features, labels, ids, paths, skipped) -> None:
    import h5py

    group = f.create_group(split)
    n, dim = features.shape
    # Filters need chunked storage, which an empty dataset cannot have.
    checked = dict(fletcher32=True) if n else {}
    arrays = {
        "features": np.ascontiguousarray(features, dtype=np.float32),
        "labels": np.asarray(labels, dtype=np.int64),
        "ids": np.asarray(ids, dtype=np.int64),
    }
    group.create_dataset(
        "features",
        data=arrays["features"],
        chunks=(max(1, min(n, 256)), dim) if n else None,
        **(dict(compression="gzip", compression_opts=4, shuffle=True, **checked) if n else {}),
    )
    group.create_dataset("labels", data=arrays["labels"], **checked)
    group.create_dataset("ids", data=arrays["ids"], **checked)
    group.create_dataset("paths", data=np.array(paths, dtype=object), dtype=h5py.string_dtype("utf-8"))
    for name, values in (*arrays.items(), ("paths", paths)):
        group[name].attrs["sha256"] = content_digest(values)
    group.attrs["count"] = n
    group.attrs["skipped"] = json.dumps(skipped)


def _file_image(attrs: dict, splits: dict[str, SplitArrays]) -> bytes:
    """The whole ``.h5`` built in memory (HDF5's core driver, no backing file): its bytes."""
    import h5py

    with h5py.File(
        f"cars-tl-cache-{os.getpid()}.h5", "w", driver="core", backing_store=False
    ) as f:  # the name is never created
        for key, value in dict(attrs, kind=KIND, schema_version=SCHEMA_VERSION).items():
            f.attrs[key] = json.dumps(value) if key in JSON_ATTRS else value
        for name, s in splits.items():
            write_split(f, name, s.features, s.labels, s.ids, s.paths, s.skipped)
        f.flush()
        return f.id.get_file_image()


def write(path: Path, attrs: dict, splits: dict[str, SplitArrays]) -> Path:
    """Write a whole cache: temporary name in the same folder, verified in full, then renamed.

    The file is built in memory first (HDF5 never touches the disk: a full disk cannot fail inside
    it), so the free space and the process's file-size limit are checked against its exact size;
    its bytes are then written with plain file I/O, where a disk that fills meanwhile is an ordinary
    error: the same message, and no file left behind. A cache that does not verify (e.g. labels out
    of range) raises and leaves no file behind.
    """
    path = Path(path)
    image = _file_image(attrs, splits)
    ensure_room(path, len(image), "feature cache")
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(image)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise CarsTLError(
                f"not enough room for the feature cache {path}: writing its {format_size(len(image))} failed "
                f"({exc.strerror or exc})",
                f"free space on the disk holding {path.parent} (or raise ulimit -f), or write elsewhere with --out, then rerun",
            ) from None
        try:
            load(tmp, tuple(splits))  # verify before anything appears under the final name
        except CarsTLError as exc:
            raise CarsTLError(
                f"refused to write {path}: the new cache does not verify ({exc.message.replace(str(tmp), 'it')})",
                "this is a bug or a bad dataset: rerun cars-tl download to rebuild the manifest",
            ) from None
    return path


def feature_run_fields(cache: FeatureCache) -> dict:
    """The ``backbone``/``inputs``/``class_names`` sections shared by train-head and fit-svm runs."""
    a = cache.attrs
    return {
        "backbone": {
            "backbone": a["backbone"],
            "weights": a["weights"],
            "weights_digest": a["weights_digest"],
            "weights_sha256": a.get("weights_sha256"),
            "num_features": a["feature_dim"],
            "transform": a["transform"],
            "crop": a["crop"],
            "margin": a["margin"],
            "precision": a["precision"],
            "params": a.get("backbone_params"),
        },
        "inputs": {
            "dataset_fingerprint": a["dataset_fingerprint"],
            "features": {
                "path": str(cache.path),
                "sha256": file_sha256(cache.path),
                "created": a.get("created"),
                # per split: what predict --split checks before scoring from the cache
                "splits": {
                    name: {"features_sha256": content_digest(arrays.features), "ids_sha256": content_digest(arrays.ids)}
                    for name, arrays in cache.splits.items()
                },
            },
        },
        "class_names": cache.class_names,
    }


def check_finite_features(cache: FeatureCache, split: str) -> None:
    """Refuse a split whose feature vectors hold NaN or Inf (no model can use them; scikit-learn would
    raise deep inside a fit): train-head, fit-svm and knn all check here, before any run is created."""
    bad = int((~np.isfinite(cache.split(split).features).all(axis=1)).sum())
    if bad:
        raise CarsTLError(
            f"{cache.path}: {bad} {split} feature vectors contain NaN or Inf (of {len(cache.split(split).labels)}); no model can use them",
            f"cars-tl inspect {cache.path}  (then re-extract it: delete the file and rerun cars-tl extract-features)",
        )


def load_train_test(path: Path, require_test: bool = True, stage: str = "this stage") -> FeatureCache:
    """The cache's train and test splits, checked finite; without ``require_test``, test may be absent
    (or empty) when the dataset itself has none (imported with ``--splits train``)."""
    cache = load(path, ("train", "test"))
    for split in ("train", "test") if require_test or dataset_has_split(cache, "test") else ("train",):
        cache.split(split)
    if len(cache.split("train").labels) == 0:
        raise CarsTLError(f"{path}: the train split is empty", "extract features for a dataset with training images")
    if require_test and len(cache.split("test").labels) == 0:
        raise CarsTLError(
            f"{path}: the test split is empty (0 images); {stage} measures accuracy on test",
            f"cars-tl inspect {path} shows its splits; extract test features from a dataset that has test images: cars-tl extract-features --split test",
        )
    for split in cache.splits:
        check_finite_features(cache, split)
    return cache
