"""One writer at a time: an exclusive lock beside every output a stage writes.

``with writer_lock(path, "extract-features"):`` takes ``fcntl.flock`` on ``.<name>.lock`` in the
folder of ``path`` (a feature cache, a run directory, a report folder, a data folder). A second
writer fails at once with a :class:`LockedError` naming the holder's PID and command line, which
the lock file records. The kernel drops a dead process's lock, so a lock that can be taken means
no writer is alive: temporaries that a dead writer left beside ``path`` (``.<name>.tmp-*``,
``.<name>.next`` ...) are removed by :func:`clean_stale` right after taking it.

Lock files stay in place after use (removing them would race with a writer that just opened one);
they are empty of meaning once no process holds them. A lock file is opened with ``O_NOFOLLOW`` and
must be a regular file with one link: a symbolic link, a hard link to another file, a FIFO or a
device planted at its name is refused with a message, never truncated or written through. Only the
process holding the lock writes (or empties) the file: a refused writer leaves the holder's record.

Readers of a data folder (every stage that decodes its images) hold :func:`reader_lock`: a SHARED
``flock`` on the same ``.<name>.lock`` that ``download`` takes exclusively, so a download cannot
swap the folder while a stage reads it (and a reader cannot start while a download runs): either
side fails at once with a :class:`LockedError` naming the other. Shared holders cannot all write
into one file, so each reader records itself in its own file, ``.<name>.readers/<pid>-<token>.json``,
which it holds locked while it reads: an entry whose lock can be taken belongs to a dead reader
and is ignored (and removed).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import secrets
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cars_tl.core.errors import CarsTLError


class LockedError(CarsTLError):
    """Another live process is writing the same output."""


class LockFileError(CarsTLError):
    """Something other than a plain file sits at a lock file's name (a planted symlink, say)."""


def lock_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def readers_dir(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.readers")


def _describe(info: dict) -> str:
    return f"PID {info.get('pid')} ({info.get('stage')}: {info.get('command')}) on {info.get('host')} since {info.get('since')}"


def _holder(lock_file: Path) -> str:
    try:
        with open(lock_file, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW | os.O_NONBLOCK)) as f:
            info = json.loads(f.read(1 << 16) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info:
        return "another process"
    return _describe(info)


def _my_info(stage: str) -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "stage": stage,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv)[:500],
    }


def _refuse_odd_file(target: Path, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return
    what = (
        "a symbolic link"
        if stat.S_ISLNK(st.st_mode)
        else "a regular file with other hard links"
        if stat.S_ISREG(st.st_mode)
        else "not a regular file"
    )
    raise LockFileError(
        f"the lock file {target} is {what}; refusing to use it (locking would write through it)",
        f"remove it (rm {target}) if no cars-tl process made it, then rerun",
    )


def _open_lock(target: Path, path: Path) -> int:
    """The lock file's descriptor: created if missing, never through a symlink, only a plain file."""
    with contextlib.suppress(FileNotFoundError):
        _refuse_odd_file(target, os.lstat(target))  # before open(): a FIFO or device is never opened
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # planted between the check and the open
            _refuse_odd_file(target, os.lstat(target))
        raise CarsTLError(
            f"cannot create the lock file {target} for {path}: {exc.strerror or exc}",
            f"check that {target.parent} exists and is writable",
        ) from None
    try:
        _refuse_odd_file(target, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _busy(exc: OSError) -> bool:
    return exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


@contextlib.contextmanager
def writer_lock(path: Path, stage: str) -> Iterator[Path]:
    """Hold the exclusive lock of ``path`` for the block; fail at once if another process holds it
    (a writer, or the readers of :func:`reader_lock`)."""
    path = Path(path)
    target = lock_path(path)
    fd = _open_lock(target, path)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if not _busy(exc):
                raise
            readers = live_readers(path)
            if not readers:  # a reader between its flock and its record: look once more
                time.sleep(0.2)
                readers = live_readers(path)
            if readers:
                raise LockedError(
                    f"{path} is being read by {'; '.join(map(_describe, readers))}; {stage} cannot replace it "
                    f"while it is read (the readers would mix two datasets)",
                    "wait for that process to finish (or stop it), then rerun",
                ) from None
            raise LockedError(
                f"{path} is being written by {_holder(target)}; a second {stage} into it would corrupt it",
                "wait for that process to finish (or stop it), or write elsewhere with --out",
            ) from None
        held = True  # only now is the file ours to rewrite
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_my_info(stage)).encode(), 0)
        clean_stale(path)
        _clear_readers(path)
        yield target
    finally:
        if held:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


# --------------------------------------------------------------------------- readers


def live_readers(path: Path) -> list[dict]:
    """The records of the processes holding :func:`reader_lock` of ``path`` (dead ones' are removed)."""
    found = []
    folder = readers_dir(path)
    with contextlib.suppress(OSError):
        for entry in sorted(folder.glob("*.json")):
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError as exc:
                    if not _busy(exc):
                        continue
                    try:
                        info = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
                    except (OSError, ValueError):
                        info = {}
                    found.append(info if isinstance(info, dict) and info else {"pid": entry.name.split("-")[0]})
                else:  # nobody holds it: its reader is gone
                    with contextlib.suppress(OSError):
                        entry.unlink()
            finally:
                os.close(fd)
    return found


def _clear_readers(path: Path) -> None:
    """Drop every reader record (call holding the exclusive lock: no reader can be alive)."""
    folder = readers_dir(path)
    if folder.is_dir() and not folder.is_symlink():
        for entry in folder.iterdir():
            with contextlib.suppress(OSError):
                entry.unlink()


def _record_reader(path: Path, stage: str) -> tuple[int, Path] | None:
    """A locked record of this reader in ``.<name>.readers/`` (None when the folder cannot take one)."""
    folder = readers_dir(path)
    try:
        folder.mkdir(exist_ok=True)
        if folder.is_symlink() or not folder.is_dir():
            return None
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        tmp = folder / f".{token}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held before the record appears under its listed name
        os.write(fd, json.dumps(_my_info(stage)).encode())
        entry = folder / f"{token}.json"
        os.replace(tmp, entry)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    return fd, entry


@contextlib.contextmanager
def reader_lock(path: Path, stage: str) -> Iterator[Path | None]:
    """Hold a shared lock of ``path`` (a data folder) while reading it: :func:`writer_lock` of the
    same path (``download``) fails while any reader holds it, and a reader fails while a writer does.

    A folder where the lock file cannot be created (read-only data) is read without a lock: no
    download can replace it from here either.
    """
    path = Path(path)
    target = lock_path(path)
    fd = None
    if path.parent.is_dir():  # no data folder: nothing to read (the stage says so), nothing to create
        try:
            fd = _open_lock(target, path)
        except LockFileError:
            raise
        except CarsTLError:
            pass  # not writable: nothing to coordinate with
    if fd is None:
        yield None
        return
    record = None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if not _busy(exc):
                raise
            raise LockedError(
                f"{path} is being replaced by {_holder(target)}; {stage} cannot read it until that finishes",
                "wait for that process to finish (or stop it), then rerun",
            ) from None
        record = _record_reader(path, stage)
        yield target
    finally:
        if record is not None:
            with contextlib.suppress(OSError):
                record[1].unlink()
            os.close(record[0])
        os.close(fd)


@contextlib.contextmanager
def reading(folders: Iterable[Path], stage: str) -> Iterator[None]:
    """:func:`reader_lock` of every folder in ``folders`` (duplicates once) for the block."""
    with contextlib.ExitStack() as stack:
        for folder in dict.fromkeys(Path(f) for f in folders):
            stack.enter_context(reader_lock(folder, stage))
        yield


def reads(stage: str, folders: Callable[[dict], Iterable[Path]]):
    """Decorator: the call holds :func:`reading` of ``folders(arguments)`` (the call's arguments by
    name, defaults included) from its first line to its return."""

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with reading(folders(bound.arguments), stage):
                return fn(*args, **kwargs)

        return call

    return wrap


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
