"""What the two HDF5 formats (feature caches: :mod:`cars_tl.artifacts.features`; trunk caches:
:mod:`cars_tl.artifacts.trunks`) read alike: file attributes decoded to Python values (JSON ones
parsed), checked to be the format and schema version a reader expects, and the checks that make a
hostile file a message rather than a traceback or a huge allocation.

A cars_tl file holds only hard-linked groups and datasets stored in the file itself, so a reader
refuses soft and external links, virtual datasets and external storage (which would make HDF5 read
other files), and checks a dataset's declared shape and type before reading it: a few hundred bytes
can declare terabytes of rows.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from cars_tl.core.atomic import format_size
from cars_tl.core.errors import CarsTLError, parse_json

# Deflate, the strongest filter a cars_tl file uses, expands at most 1032 times; a dataset that declares
# more than this many bytes per stored byte (or rows never written) cannot be one that cars_tl wrote.
MAX_EXPANSION = 1100
MAX_CLASSES = 100_000
# What h5py/numpy raise on a damaged or crafted file (sizes are checked before reading, so a MemoryError
# or an AttributeError is our fault or the machine's, never reported as the file's).
READ_ERRORS = (OSError, KeyError, RuntimeError, TypeError, ValueError)


@contextlib.contextmanager
def reading(path: Path, what: str, hint: str):
    """Around a reader's HDF5 calls: an error the file causes becomes a message naming it."""
    try:
        yield
    except CarsTLError:
        raise
    except READ_ERRORS as exc:
        raise CarsTLError(f"{path} is not a readable {what}: {type(exc).__name__}: {str(exc)[:300]}", hint) from None


def open_file(path: Path, what: str, hint: str):
    """``path`` opened read-only, after checking every link in it (:func:`check_links`)."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except READ_ERRORS as exc:
        raise CarsTLError(f"{path} is not a readable HDF5 file: {str(exc)[:300]}", hint) from None
    try:
        with reading(path, what, hint):
            check_links(f, path, hint)
    except CarsTLError:
        f.close()
        raise
    return f


def check_links(f, path: Path, hint: str) -> None:
    """Refuse any link but a hard one, and any dataset whose data lives outside the file."""
    import h5py

    def problem(name, link) -> str | None:
        if not isinstance(link, h5py.HardLink):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            return f"/{name} is {kind}; a cars_tl file holds only its own groups and datasets"
        obj = f[name]
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            return f"/{name} is a virtual dataset (its data lives in other files)"
        if isinstance(obj, h5py.Dataset) and obj.external:
            return f"/{name} has external storage (its data lives in another file)"
        return None

    found = []
    # An exception raised inside h5py's visit callback does not propagate cleanly: stop, then raise.
    f.visititems_links(lambda name, link: found.append(problem(name, link)) or found[-1])
    if found and found[-1]:
        raise CarsTLError(f"{path}: {found[-1]}", hint)


def check_dataset(ds, path: Path, name: str, *, dtype_kinds: str, ndim: int, rows: int | None, hint: str) -> int:
    """The declared shape and type of ``ds`` checked before it is read: ``ndim`` axes, ``rows`` rows
    when given, an element type of ``dtype_kinds`` (numpy kinds; ``"T"``: UTF-8 text), and no more
    bytes declared than its storage can hold. Returns its row count."""
    import h5py

    shape = ds.shape
    if shape is None or len(shape) != ndim or (rows is not None and shape[0] != rows):
        expected = f"a {ndim}-d array" + (f" of {rows} rows" if rows is not None else "")
        raise CarsTLError(f"{path}: {name} has shape {shape}, expected {expected}", hint)
    if dtype_kinds == "T":
        info = h5py.check_string_dtype(ds.dtype)
        ok = info is not None and ds.dtype.kind == "O"
    else:
        ok = ds.dtype.kind in dtype_kinds and ds.dtype.isnative
    if not ok:
        raise CarsTLError(f"{path}: {name} has dtype {ds.dtype}, which a cars_tl file never holds there", hint)
    declared = int(np.prod(shape, dtype=np.float64) * ds.dtype.itemsize)
    stored = ds.id.get_storage_size()
    if declared > max(stored, 1) * MAX_EXPANSION:
        raise CarsTLError(f"{path}: {name} declares {shape} ({format_size(declared)}) in {stored:,} stored bytes", hint)
    return shape[0]


def read_text_rows(ds, path: Path, name: str, hint: str) -> list[str]:
    """A string dataset's rows as ``str``; bytes that are not UTF-8 are refused."""
    try:
        return [p.decode() if isinstance(p, bytes) else str(p) for p in ds[:]]
    except UnicodeDecodeError:
        raise CarsTLError(f"{path}: {name} holds bytes that are not UTF-8 text", hint) from None


def decode_attr(value, key: str, path: Path, hint: str, json_key: bool = False):
    """One HDF5 attribute as a Python value: text, a number or a bool (``json_key``: parsed)."""
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            raise CarsTLError(f"{path}: attribute {key!r} holds bytes that are not UTF-8 text", hint) from None
    elif isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, (str, int, float, bool)):
        raise CarsTLError(f"{path}: attribute {key!r} holds a {type(value).__name__}, not text or a number", hint)
    if json_key:
        if not isinstance(value, str):
            raise CarsTLError(f"{path}: attribute {key!r} holds a {type(value).__name__}, not JSON text", hint)
        return parse_json(value, f"{path}: attribute {key!r}", hint)
    return value


def decode_attrs(attrs, json_keys: tuple[str, ...], path: Path, hint: str) -> dict:
    """HDF5 attributes as Python values (see :func:`decode_attr`)."""
    return {key: decode_attr(attrs[key], key, path, hint, key in json_keys) for key in attrs}


def check_attr_types(attrs: dict, types: dict[str, type | tuple], path: Path, hint: str) -> None:
    """Each attribute of ``types`` present and of its type (a bool is not a number here)."""
    for key, expected in types.items():
        value = attrs.get(key)
        if isinstance(value, bool) or not isinstance(value, expected):
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise CarsTLError(f"{path}: attribute {key!r} is {value!r:.80}, expected {names}", hint)


def check_classes(attrs: dict, path: Path, hint: str) -> None:
    """``num_classes`` a sane count and ``class_names`` that many strings."""
    check_attr_types(attrs, {"num_classes": int, "class_names": list}, path, hint)
    n, names = attrs["num_classes"], attrs["class_names"]
    if not 1 <= n <= MAX_CLASSES:
        raise CarsTLError(f"{path}: attribute 'num_classes' is {n}; valid: 1 to {MAX_CLASSES:,}", hint)
    if len(names) != n or not all(isinstance(c, str) for c in names):
        raise CarsTLError(f"{path}: attribute 'class_names' is not a list of {n} names (num_classes)", hint)


def read_format_attrs(
    path: Path,
    *,
    kind: str | tuple[str, ...],
    schema_version: int,
    json_keys: tuple[str, ...],
    what: str,
    unreadable_hint: str,
    kind_hint: str | None,
    schema_hint: str,
) -> dict:
    """``path``'s attributes, after checking it is a readable HDF5 file of ``kind`` (a cars_tl
    ``what``; several names: any of them) at ``schema_version``; each refusal names the file, what was
    found and the fix."""
    with open_file(path, what, unreadable_hint) as f, reading(path, what, unreadable_hint):
        # The format's name and version first: another program's file is told as such, whatever it holds.
        found = {
            k: decode_attr(f.attrs[k], k, path, unreadable_hint) for k in ("kind", "schema_version") if k in f.attrs
        }
        if found.get("kind") not in ((kind,) if isinstance(kind, str) else kind):
            raise CarsTLError(f"{path} is not a cars_tl {what} (kind={found.get('kind')!r})", kind_hint)
        if found.get("schema_version") != schema_version:
            raise CarsTLError(
                f"{path} has {what.replace(' ', '-')} schema {found.get('schema_version')}, this cars_tl reads {schema_version}",
                schema_hint,
            )
        return decode_attrs(f.attrs, json_keys, path, unreadable_hint)
