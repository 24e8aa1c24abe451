"""One writer at a time: an exclusive lock beside every output a stage writes.

``with writer_lock(path, "extract-features"):`` takes ``fcntl.flock`` on ``.<name>.lock`` in the
folder of ``path`` (a feature cache, a run directory, a report folder, a data folder). A second
writer fails at once with a :class:`LockedError` naming the holder's PID and command line, which
the lock file records. The kernel drops a dead process's lock, so a lock that can be taken means
no writer is alive: temporaries that a dead writer left beside ``path`` (``.<name>.tmp-*``,
``.<name>.next`` ...) are removed by :func:`clean_stale` right after taking it.

Lock files stay in place after use (removing them would race with a writer that just opened one);
they are empty of meaning once no process holds them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from cars_tl.errors import CarsTLError


class LockedError(CarsTLError):
    """Another live process is writing the same output."""


def lock_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def _holder(lock_file: Path) -> str:
    try:
        info = json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return f"PID {info.get('pid')} ({info.get('stage')}: {info.get('command')}) on {info.get('host')} since {info.get('since')}"


@contextlib.contextmanager
def writer_lock(path: Path, stage: str) -> Iterator[Path]:
    """Hold the exclusive lock of ``path`` for the block; fail at once if another process holds it."""
    path = Path(path)
    target = lock_path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CarsTLError(
            f"cannot create the lock file {target} for {path}: {exc.strerror or exc}",
            f"check that {target.parent} exists and is writable",
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise LockedError(
                f"{path} is being written by {_holder(target)}; a second {stage} into it would corrupt it",
                f"wait for that process to finish (or stop it), or write elsewhere with --out",
            ) from None
        info = {
            "pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:500],
        }
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        clean_stale(path)
        yield target
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


def clean_stale(path: Path) -> list[Path]:
    """Remove what a dead writer of ``path`` left beside it: ``.<name>.tmp-*``, ``.<name>.next``,
    ``.<name>.old-*``. Call only while holding :func:`writer_lock` of ``path``."""
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    # A swap killed between its two renames: the previous output waits under .old-*; put it back.
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    if olds and not (path.exists() or path.is_symlink()):
        os.replace(olds[-1], path)
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.next", f".{path.name}.old-*"):
        for stale in path.parent.glob(pattern):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    stale.unlink()
            removed.append(stale)
    return removed
