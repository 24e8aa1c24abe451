"""The trunk cache: the output maps of a network's frozen part, its schema, writing and reading.

Model D trains only the top of a network (``--unfreeze layer4``); the frozen part below it (the
*trunk*: stem and ``layer1``-``layer3`` of a ResNet, ``conv_stem``-``blocks.5`` of a timm
EfficientNet) gives the same maps at every epoch when no augmentation runs and it is in eval
mode. This module owns the file those maps are kept in (written by
:func:`cars_tl.models.trunk_store.ensure`). Layout of a cache file (HDF5, schema version 2)::

    /                                 file attributes
        kind                = "cars_tl.artifacts.trunks"
        schema_version      = 2
        backbone, weights, weights_digest, weights_sha256     as in a feature cache
        trunk_digest        SHA-256 of the frozen part's state (what the maps came from)
        transform           JSON: the preprocessing spec (resize mode, size, mean/std, ...)
        crop, margin        "full" | "box", and the box margin
        precision           "fp32" | "bf16" | "fp16": what the trunk ran in (autocast)
        storage             "fp32" | "fp16" | "bf16": how the maps are stored (bf16 as uint16 bits)
        cut                 the last module of the trunk (e.g. "layer3", "blocks.5")
        top                 the first module above it (e.g. "layer4", "blocks.6")
        map_shape           JSON [C, H, W] of one image's maps
        dataset_fingerprint SHA-256 of the manifest the images came from
        num_classes, class_names (JSON), versions (JSON), options (JSON), created
    /<split>/                         "train", "test"
        maps    (N, C, H, W) float32 | float16 | uint16 (bf16 bits), CONTIGUOUS and uncompressed,
                so that it can be memory-mapped and read at random rows at disk speed
        labels  int64 (N,), ids int64 (N,) (the image's row in the manifest), paths utf-8 (N,)
        every dataset carries ``sha256`` (SHA-256 of its content, as in the feature cache);
        attrs: count

Sizes per image (16-bit storage): ResNet50 ``layer3`` at 224 px is 1024x14x14 values = 392 KiB
(about 6.5 GB for the 16,185 images of both splits; fp32 doubles it); efficientnet_lite0
``blocks.5`` at 224 px is 192x7x7 = 18.4 KiB.

Guarantees, as for feature caches: while building, finished chunks live in ``<name>.partial/``
(each written atomically, named by the chunk layout), so a killed build resumes; the ``.h5`` is
written under a temporary name after a free-space check, read back and verified in full (schema,
shapes, label range, every SHA-256), then renamed into place; one writer at a time
(:func:`cars_tl.core.locks.writer_lock`, taken by the builder). :func:`verify` is what "up to
date" means. Reading (:func:`open_split`) loads a split into memory when it fits in half the
available memory (hashing it on the way), and otherwise memory-maps the contiguous dataset (after
one sequential hashing pass): the epoch's random order then reads rows, never compressed chunks.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np

from cars_tl.artifacts import hdf5
from cars_tl.artifacts.features import PartialCache, content_digest
from cars_tl.core.atomic import atomic_path, ensure_room, format_size
from cars_tl.core.errors import CarsTLError
from cars_tl.core.options import transform_key

KIND = "cars_tl.artifacts.trunks"
SCHEMA_VERSION = 2  # 2: trunk_digest (the frozen part's own state) in the identity
STORAGES = ("fp32", "fp16", "bf16")
NUMPY_DTYPE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}
JSON_ATTRS = ("transform", "class_names", "versions", "options", "map_shape")
SMALL = ("labels", "ids", "paths")
# What makes two builds the same: a verified file matching all of these is used as it is.
IDENTITY_KEYS = (
    "backbone",
    "weights_digest",
    "trunk_digest",
    "transform",
    "crop",
    "margin",
    "precision",
    "storage",
    "cut",
    "top",
    "dataset_fingerprint",
)
HASH_BLOCK = 64 << 20  # bytes hashed per read when verifying a memory-mapped split
MEMORY_FRACTION = 0.5  # a split is loaded into memory when it takes at most this share of MemAvailable


def _fix(path: Path) -> str:
    return f"delete {path} and rerun (cars-tl build-trunk, or finetune with --trunk-cache, builds it again)"


def read_attrs(path: Path) -> dict:
    """The file attributes, after checking this is a cars_tl trunk cache of a known schema."""

    path = Path(path)
    if not path.is_file():
        raise CarsTLError(f"trunk cache {path} does not exist", f"cars-tl build-trunk --out {path} ...")
    attrs = hdf5.read_format_attrs(
        path,
        kind=KIND,
        schema_version=SCHEMA_VERSION,
        json_keys=JSON_ATTRS,
        what="trunk cache",
        unreadable_hint=_fix(path),
        kind_hint=_fix(path),
        schema_hint=_fix(path),
    )
    if attrs.get("storage") not in STORAGES:
        raise CarsTLError(f"{path}: unknown storage {attrs.get('storage')!r}; valid: {', '.join(STORAGES)}", _fix(path))
    hdf5.check_classes(attrs, path, _fix(path))
    shape = attrs.get("map_shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 16 for v in shape)
    ):
        raise CarsTLError(f"{path}: attribute 'map_shape' is {shape!r:.80}, expected [C, H, W]", _fix(path))
    return attrs


def _recorded(dataset) -> str | None:
    value = dataset.attrs.get("sha256")
    return value.decode() if isinstance(value, bytes) else value


@dataclasses.dataclass
class TrunkSplit:
    """One split's maps (an in-memory array or a memory map) and its rows' labels, ids and paths."""

    maps: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    paths: list[str]
    storage: str
    mode: str  # "memory" | "mmap"

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, index) -> np.ndarray:
        """Rows ``index`` (any order) as a contiguous array of the storage dtype."""
        return np.ascontiguousarray(self.maps[np.asarray(index)])


def to_float(rows: np.ndarray, storage: str, native: bool = False):
    """Stored rows as a float32 torch tensor (16-bit values widened exactly); ``native``: in the
    storage's own dtype (bf16/fp16: what the trunk computed under that autocast)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(rows))
    if storage == "bf16":
        tensor = tensor.view(torch.bfloat16)
    return tensor if native else tensor.float()


def from_float(maps, storage: str) -> np.ndarray:
    """A float torch tensor of maps as stored (fp16/bf16 round to nearest)."""
    import torch

    maps = maps.detach().cpu()
    if storage == "bf16":
        return maps.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return maps.to(torch.float16 if storage == "fp16" else torch.float32).numpy()


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def choose_mode(nbytes: int, mode: str = "auto", share: int = 1) -> str:
    """``memory`` when ``nbytes`` takes at most half the available memory (split ``share`` ways,
    e.g. between the processes of a node), else ``mmap``; ``mode`` other than auto is kept."""
    if mode != "auto":
        return mode
    return "memory" if nbytes <= MEMORY_FRACTION * _available_memory() / max(1, share) else "mmap"


def open_split(path: Path, split: str, mode: str = "auto", share: int = 1, verify: bool = True) -> TrunkSplit:
    """Read and verify one split (every SHA-256, shapes, label range): into memory or memory-mapped
    (see :func:`choose_mode`). ``verify=False`` skips the maps' SHA-256 (a file :func:`verify` just
    passed; under torchrun the ranks then read only the rows they use)."""
    path = Path(path)
    attrs = read_attrs(path)
    with hdf5.open_file(path, "trunk cache", _fix(path)) as f, hdf5.reading(path, "trunk cache", _fix(path)):
        offset, recorded, maps, small, shape, mode = _read_split(f, path, split, attrs, mode, share)
    if maps is None:
        maps = np.memmap(path, dtype=NUMPY_DTYPE[attrs["storage"]], mode="r", offset=offset, shape=shape)
    if verify and _digest_rows(maps) != recorded:
        raise CarsTLError(
            f"{path}: split '{split}' is corrupt ({split}/maps does not match its recorded SHA-256)", _fix(path)
        )
    return TrunkSplit(maps, small["labels"].astype(np.int64), small["ids"], small["paths"], attrs["storage"], mode)


def _read_split(f, path: Path, split: str, attrs: dict, mode: str, share: int):
    """(offset of the maps, their recorded SHA-256, the maps read into memory or ``None`` to be
    memory-mapped, the small datasets, the maps' shape, the read mode): shapes and types checked first."""
    import h5py

    group = f.get(split)
    if not isinstance(group, h5py.Group):
        raise CarsTLError(f"{path} has no '{split}' split", _fix(path))
    missing = [d for d in ("maps", *SMALL) if not isinstance(group.get(d), h5py.Dataset)]
    if missing:
        raise CarsTLError(f"{path}: split '{split}' lacks the dataset(s) {', '.join(missing)}", _fix(path))
    ds = group["maps"]
    n = hdf5.check_dataset(ds, path, f"{split}/maps", dtype_kinds="fu", ndim=4, rows=None, hint=_fix(path))
    shape = (n, *attrs["map_shape"])
    if ds.shape != shape or ds.dtype != np.dtype(NUMPY_DTYPE[attrs["storage"]]):
        raise CarsTLError(
            f"{path}: split '{split}' has maps of shape {ds.shape} and dtype {ds.dtype}, "
            f"expected {shape} {np.dtype(NUMPY_DTYPE[attrs['storage']])} ({attrs['storage']} storage)",
            _fix(path),
        )
    for d, kinds in (("labels", "iu"), ("ids", "iu"), ("paths", "T")):
        hdf5.check_dataset(group[d], path, f"{split}/{d}", dtype_kinds=kinds, ndim=1, rows=n, hint=_fix(path))
    try:
        small = {d: group[d][:] for d in ("labels", "ids")}
    except OSError as exc:  # fletcher32 mismatch
        raise CarsTLError(f"{path}: split '{split}' is corrupt ({exc})", _fix(path)) from None
    small["paths"] = hdf5.read_text_rows(group["paths"], path, f"{split}/paths", _fix(path))
    for d in SMALL:
        if _recorded(group[d]) != content_digest(small[d]):
            raise CarsTLError(
                f"{path}: split '{split}' is corrupt ({split}/{d} does not match its recorded SHA-256)", _fix(path)
            )
    if n and (small["labels"].min() < 0 or small["labels"].max() >= attrs["num_classes"]):
        raise CarsTLError(f"{path}: split '{split}' has labels outside 0..{attrs['num_classes'] - 1}", _fix(path))
    offset = ds.id.get_offset() if n else None
    nbytes = int(np.prod(shape)) * ds.dtype.itemsize
    mode = choose_mode(nbytes, mode, share)
    if mode not in ("memory", "mmap"):
        raise CarsTLError(f"unknown trunk-cache read mode {mode!r}; valid: auto, memory, mmap")
    if n and (offset is None or ds.chunks is not None or ds.compression or offset + nbytes > path.stat().st_size):
        raise CarsTLError(
            f"{path}: split '{split}' maps are not stored contiguously within the file (a cars_tl trunk cache's are)",
            _fix(path),
        )
    maps = None
    if mode == "memory" or not n:
        maps = np.empty(shape, ds.dtype)
        if n:
            ds.read_direct(maps)
    return offset, _recorded(ds), maps, small, shape, mode


def _digest_rows(maps: np.ndarray) -> str:
    """SHA-256 of an (N, ...) array's bytes in C order, read in blocks of rows (a memory map
    streams through the page cache once)."""
    digest = hashlib.sha256()
    if len(maps):
        per_row = max(1, maps[0].nbytes)
        step = max(1, HASH_BLOCK // per_row)
        for start in range(0, len(maps), step):
            digest.update(memoryview(np.ascontiguousarray(maps[start : start + step])).cast("B"))
    return digest.hexdigest()


def split_names(path: Path) -> list[str]:
    """The names at the top of the file: only split groups in a cars_tl trunk cache (so
    :func:`open_split` of them refuses anything else)."""
    with hdf5.open_file(path, "trunk cache", _fix(path)) as f, hdf5.reading(path, "trunk cache", _fix(path)):
        return sorted(f.keys())


def verify(path: Path) -> dict:
    """Every split read and checked (memory-mapped, so any size fits); returns the attributes."""
    attrs = read_attrs(path)
    for name in split_names(path):
        open_split(path, name, mode="mmap")
    return attrs


def check_existing(path: Path, identity: dict) -> tuple[bool, str | None]:
    """(up to date, why an existing file was not trusted or does not fit): up to date means it
    verifies and was made from these very inputs (:data:`IDENTITY_KEYS`)."""
    if not Path(path).exists():
        return False, None
    try:
        attrs = verify(path)
    except CarsTLError as exc:
        return False, exc.message
    differing = [k for k in IDENTITY_KEYS if not _same(k, attrs.get(k), identity.get(k))]
    if differing:
        return False, "made from other inputs (" + ", ".join(
            f"{k}: {attrs.get(k)!r} != {identity.get(k)!r}" for k in differing
        ) + ")"
    return True, None


def _same(key: str, recorded, asked) -> bool:
    """Equal identity values; transforms by what they compute (a spec of an older version names its side
    ``crop``)."""
    if key == "transform" and isinstance(recorded, str) and isinstance(asked, str):
        return transform_key(json.loads(recorded)) == transform_key(json.loads(asked))
    return recorded == asked


# --------------------------------------------------------------------------- writing


class PartialTrunk(PartialCache):
    """Chunks of a build in progress (see :class:`cars_tl.artifacts.features.PartialCache`: the
    same naming, meta check, resume and ``join`` for torchrun ranks); a chunk holds maps as stored."""

    def write_chunk(self, split: str, start: int, maps: np.ndarray) -> None:  # type: ignore[override]
        if len(maps) != self._rows_in(split, start) or start % self.chunk_rows:
            raise ValueError(f"chunk of {len(maps)} rows at {start} does not fit the layout of {self.chunk_rows} rows")
        with atomic_path(self._chunk(split, start)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, maps=maps, start=start, chunk_rows=self.chunk_rows)

    def read_chunk(self, split: str, start: int, shape: tuple, dtype) -> np.ndarray:
        path = self._chunk(split, start)
        try:
            with np.load(path) as z:
                maps, first, rows = z["maps"], int(z["start"]), int(z["chunk_rows"])
        except (OSError, ValueError, KeyError) as exc:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise CarsTLError(
                f"partial chunk {path} is unreadable ({exc}); the partial build was discarded",
                "rerun the same command to build the trunk cache again",
            ) from None
        if (
            (first, rows) != (start, self.chunk_rows)
            or maps.shape != (self._rows_in(split, start), *shape)
            or maps.dtype != dtype
        ):
            shutil.rmtree(self.dir, ignore_errors=True)
            raise CarsTLError(
                f"partial chunk {path} does not fit the layout it is named for; the partial build was discarded",
                "rerun the same command to build the trunk cache again",
            )
        return maps

    def finalize(self, attrs: dict, rows: dict[str, dict]) -> Path:  # type: ignore[override]
        """Stream the chunks into the ``.h5`` (temporary name, verified, renamed); drop the chunks."""
        write(self.path, attrs, rows, self)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.path


def estimated_size(attrs: dict, rows: dict[str, dict]) -> int:
    """An upper bound of the file's size: the maps, each row's label, id and path (a path's heap
    entry and reference take under 64 bytes besides its text), the attributes and 64 KiB of HDF5's
    own structures (the demo cache of 0.92 MB is estimated at 0.97 MB; it was 2.0 MB with 1 MiB and
    300 bytes a row, refused under a file-size limit it fits)."""
    per_image = int(np.prod(attrs["map_shape"])) * np.dtype(NUMPY_DTYPE[attrs["storage"]]).itemsize
    small = sum(len(r["labels"]) * 64 + sum(len(str(p).encode()) for p in r["paths"]) for r in rows.values())
    maps = sum(len(r["labels"]) * per_image for r in rows.values())
    return (64 << 10) + len(json.dumps(attrs, default=str).encode()) + small + maps


def _write_failure(exc: Exception) -> tuple[int | None, str]:
    """(errno, reason) of a failed HDF5 write: h5py raises an OSError, or a RuntimeError from the
    close that flushes the file, with the system's error inside HDF5's text."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.errno, exc.strerror
    found = re.search(r"errno = (\d+), error message = '([^']*)'", str(exc))
    return (int(found[1]), found[2]) if found else (None, str(exc).splitlines()[0][:200] if str(exc) else repr(exc))


def write(path: Path, attrs: dict, rows: dict[str, dict], partial: PartialTrunk) -> Path:
    """Write the cache from ``partial``'s chunks: free space checked, temporary name, every
    dataset hashed as written, read back and verified, then renamed into place."""
    import h5py

    path = Path(path)
    attrs = dict(attrs, kind=KIND, schema_version=SCHEMA_VERSION, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    shape, dtype = tuple(attrs["map_shape"]), np.dtype(NUMPY_DTYPE[attrs["storage"]])
    sizes = {s: len(r["labels"]) for s, r in rows.items()}
    needed = estimated_size(attrs, rows)
    ensure_room(path, needed, "trunk cache")
    with atomic_path(path) as tmp:
        try:
            with h5py.File(tmp, "w") as f:
                for key, value in attrs.items():
                    f.attrs[key] = json.dumps(value) if key in JSON_ATTRS else value
                for split, info in rows.items():
                    n = sizes[split]
                    group = f.create_group(split)
                    ds = group.create_dataset("maps", shape=(n, *shape), dtype=dtype)  # contiguous, uncompressed
                    digest = hashlib.sha256()
                    for start in range(0, n, partial.chunk_rows):
                        maps = partial.read_chunk(split, start, shape, dtype)
                        ds[start : start + len(maps)] = maps
                        digest.update(memoryview(np.ascontiguousarray(maps)).cast("B"))
                    ds.attrs["sha256"] = digest.hexdigest()
                    checked = dict(fletcher32=True) if n else {}
                    small = {"labels": np.asarray(info["labels"], np.int64), "ids": np.asarray(info["ids"], np.int64)}
                    for name, values in small.items():
                        group.create_dataset(name, data=values, **checked)
                    group.create_dataset(
                        "paths", data=np.array(info["paths"], dtype=object), dtype=h5py.string_dtype("utf-8")
                    )
                    for name, values in (*small.items(), ("paths", info["paths"])):
                        group[name].attrs["sha256"] = content_digest(values)
                    group.attrs["count"] = n
        except (OSError, RuntimeError) as exc:
            code, reason = _write_failure(exc)
            if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise CarsTLError(
                    f"not enough room for the trunk cache {path}: writing about {format_size(needed)} failed ({reason})",
                    f"free space on the disk holding {path.parent} (or raise ulimit -f), or write elsewhere with "
                    "--out, then rerun (the computed maps are kept)",
                ) from None
            raise CarsTLError(
                f"cannot write the trunk cache {path}: {reason}",
                f"free space or check permissions in {path.parent}, then rerun",
            ) from None
        try:
            verify(tmp)
        except CarsTLError as exc:
            raise CarsTLError(
                f"refused to write {path}: the new trunk cache does not verify ({exc.message.replace(str(tmp), 'it')})",
                "this is a bug or a bad dataset: rerun cars-tl download to rebuild the manifest",
            ) from None
    return path
