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
and is ignored (and removed). That folder is listed and emptied, so it is opened without following
links: a link, file or FIFO at its name is refused (by readers and writers alike), never followed.

A forked child (a DataLoader worker) lets go of the locks its parent holds as soon as it starts, so a
killed stage's lingering workers do not keep the data folder locked; a lock still held for a process
that has exited is reported as such (being released), not as that process.
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


class LockUnavailableError(CarsTLError):
    """The lock file cannot be created there (a read-only folder, say)."""


# Descriptors holding a flock of this process. A forked child (a DataLoader worker) shares them,
# and would keep the lock after its parent is killed until it notices (seconds): it lets go at once.
_HELD: set[int] = set()


def _let_go_in_child() -> None:
    for fd in list(_HELD):
        # /dev/null over the number, not close(): the number stays taken, so nothing reuses it.
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            os.dup2(null, fd, inheritable=False)
            os.close(null)
    _HELD.clear()


os.register_at_fork(after_in_child=_let_go_in_child)


def _close(fd: int) -> None:
    _HELD.discard(fd)
    os.close(fd)


def lock_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def readers_dir(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.readers")


def _describe(info: dict) -> str:
    return f"PID {info.get('pid')} ({info.get('stage')}: {info.get('command')}) on {info.get('host')} since {info.get('since')}"


def _holder(lock_file: Path) -> tuple[str, bool]:
    """Who holds ``lock_file`` as its record says, and whether that process still runs."""
    try:
        with open(lock_file, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW | os.O_NONBLOCK)) as f:
            info = json.loads(f.read(1 << 16) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info:
        return "another process", True
    return _describe(info), _alive(info)


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
        raise LockUnavailableError(
            f"cannot create the lock file {target} for {path}: {exc.strerror or exc}",
            f"check that {target.parent} exists and is writable",
        ) from None
    try:
        _refuse_odd_file(target, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    _HELD.add(fd)
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
        folder = _readers_folder(path)  # refused before anything is taken: never list or clear through a link
    except OSError:
        folder = None
    except BaseException:
        _close(fd)
        raise
    if folder is not None:
        os.close(folder)
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
            if readers and all(r.get("exited") for r in readers):
                raise _being_released(path, f"read by {'; '.join(map(_describe, readers))}", target) from None
            if readers:
                live = [r for r in readers if not r.get("exited")]
                raise LockedError(
                    f"{path} is being read by {'; '.join(map(_describe, live))}; {stage} cannot replace it "
                    f"while it is read (the readers would mix two datasets)",
                    "wait for that process to finish (or stop it), then rerun",
                ) from None
            holder, alive = _holder(target)
            if not alive:
                raise _being_released(path, f"written by {holder}", target) from None
            raise LockedError(
                f"{path} is being written by {holder}; a second {stage} into it would corrupt it",
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
        _close(fd)  # releases the flock


# --------------------------------------------------------------------------- readers


def _readers_folder(path: Path, create: bool = False) -> int | None:
    """A descriptor of ``.<name>.readers`` (None when absent), opened without following a link.

    Its entries are listed and deleted, so anything but a real folder at that name is refused
    (a link planted there would make a download delete ``*.json`` files wherever it points).
    """
    folder = readers_dir(path)
    if create:
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):  # not swapped for a link meanwhile: unreadable
                raise
        else:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) == (st.st_dev, st.st_ino):
                return fd
            os.close(fd)
        st = os.lstat(folder)
    what = (
        "a symbolic link"
        if stat.S_ISLNK(st.st_mode)
        else "a file"
        if stat.S_ISREG(st.st_mode)
        else "a FIFO"
        if stat.S_ISFIFO(st.st_mode)
        else "not a folder"
    )
    raise LockFileError(
        f"the readers folder {folder} is {what}; refusing to use it (cars-tl lists and deletes the reader "
        "records in it, and would do so wherever a link points)",
        f"remove it (rm {folder}) if no cars-tl process made it, then rerun",
    )


def _alive(info: dict) -> bool:
    """Whether the process a record names still runs (records of other hosts are taken as alive)."""
    if info.get("host") not in (None, socket.gethostname()):
        return True
    try:
        os.kill(int(info.get("pid")), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def _being_released(path: Path, was: str, lock_file: Path) -> LockedError:
    """The refusal for a lock whose holder has exited while processes it started still hold it:
    ``was`` says what the holder did, e.g. "written by pid 12 (finetune)"."""
    return LockedError(
        f"{path} was being {was}: that process has exited, but processes it started (e.g. its data loader "
        f"workers) still hold {lock_file}; they exit within seconds",
        f"rerun in a few seconds; if it stays refused, stop what still holds the lock (fuser -v {lock_file})",
    )


def live_readers(path: Path) -> list[dict]:
    """The records of the processes holding :func:`reader_lock` of ``path`` (dead ones' are removed).

    A record whose process has exited while a child of it still holds the record's lock comes
    back with ``"exited": True``.
    """
    found = []
    folder = _readers_folder(path)
    if folder is None:
        return found
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
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
                    info = info if isinstance(info, dict) and info else {"pid": name.split("-")[0]}
                    found.append(info if _alive(info) else {**info, "exited": True})
                else:  # nobody holds it: its reader is gone
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=folder)
            finally:
                os.close(fd)
    except OSError:
        pass
    finally:
        os.close(folder)
    return found


def _clear_readers(path: Path) -> None:
    """Drop every reader record (call holding the exclusive lock: no reader can be alive)."""
    folder = _readers_folder(path)
    if folder is None:
        return
    try:
        for name in os.listdir(folder):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def _record_reader(path: Path, stage: str) -> tuple[int, int, str] | None:
    """A locked record of this reader in ``.<name>.readers/``: (record fd, folder fd, name), or None
    when the folder cannot take one (read-only)."""
    try:
        folder = _readers_folder(path, create=True)
    except LockFileError:
        raise
    except OSError:
        return None
    if folder is None:
        return None
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp, entry = f".{token}.tmp", f"{token}.json"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=folder)
    except OSError:
        os.close(folder)
        return None
    _HELD.add(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held before the record appears under its listed name
        os.write(fd, json.dumps(_my_info(stage)).encode())
        os.replace(tmp, entry, src_dir_fd=folder, dst_dir_fd=folder)
    except OSError:
        _close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=folder)
        os.close(folder)
        return None
    return fd, folder, entry


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
        except LockUnavailableError:
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
            holder, alive = _holder(target)
            if not alive:
                raise _being_released(path, f"replaced by {holder}", target) from None
            raise LockedError(
                f"{path} is being replaced by {holder}; {stage} cannot read it until that finishes",
                "wait for that process to finish (or stop it), then rerun",
            ) from None
        record = _record_reader(path, stage)
        yield target
    finally:
        if record is not None:
            with contextlib.suppress(OSError):
                os.unlink(record[2], dir_fd=record[1])
            _close(record[0])
            os.close(record[1])
        _close(fd)


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
