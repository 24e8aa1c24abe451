"""Files on disk: never half-written (temporary name in the same folder, then rename), and their digests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def swap_in(staged: Path, target: Path) -> None:
    """Put the finished folder (or file) ``staged`` at ``target``, keeping the previous one until then.

    The previous ``target`` is renamed to ``.<name>.old-<pid>`` beside it, ``staged`` takes its
    name, and only then is the old one deleted. A kill between the two renames leaves the old
    output under ``.old-*``, which :func:`cars_tl.locks.clean_stale` puts back on the next run.
    """
    staged, target = Path(staged), Path(target)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    had_old = target.exists() or target.is_symlink()
    if had_old:
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except OSError:
        if had_old:
            os.replace(old, target)
        raise
    if had_old:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
