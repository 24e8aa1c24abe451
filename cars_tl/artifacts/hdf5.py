"""What the two HDF5 formats (feature caches: :mod:`cars_tl.artifacts.features`; trunk caches:
:mod:`cars_tl.artifacts.trunks`) read alike: file attributes decoded to Python values (JSON ones
parsed), checked to be the format and schema version a reader expects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cars_tl.core.errors import CarsTLError


def decode_attrs(attrs, json_keys: tuple[str, ...]) -> dict:
    """HDF5 attributes as Python values: bytes decoded, numpy scalars unwrapped, ``json_keys`` parsed."""
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        out[key] = json.loads(value) if key in json_keys else value
    return out


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
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = decode_attrs(f.attrs, json_keys)
    except OSError as exc:
        raise CarsTLError(f"{path} is not a readable HDF5 file: {exc}", unreadable_hint) from None
    if attrs.get("kind") not in ((kind,) if isinstance(kind, str) else kind):
        raise CarsTLError(f"{path} is not a cars_tl {what} (kind={attrs.get('kind')!r})", kind_hint)
    if attrs.get("schema_version") != schema_version:
        raise CarsTLError(
            f"{path} has {what.replace(' ', '-')} schema {attrs.get('schema_version')}, this cars_tl reads {schema_version}",
            schema_hint,
        )
    return attrs
