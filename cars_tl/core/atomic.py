"""Files on disk: never half-written (temporary name in the same folder, then rename), and their digests."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path

from cars_tl.core.errors import CarsTLError

# Failures of the place being written to, not of the program: reported as a message naming the path.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


def storage_error(exc: OSError, path: Path) -> CarsTLError:
    """A CarsTLError for a full disk, a file-size limit or a read-only/forbidden output."""
    where = Path(exc.filename) if getattr(exc, "filename", None) else Path(path)
    reason = exc.strerror or str(exc)
    fixes = {
        errno.ENOSPC: f"free space on the disk holding {where.parent}, or write elsewhere with --out",
        errno.EDQUOT: f"free space within your quota on {where.parent}, or write elsewhere with --out",
        errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit, or write elsewhere",
    }
    hint = fixes.get(exc.errno, f"make {where.parent} writable, or write elsewhere with --out")
    return CarsTLError(f"cannot write {where}: {reason}", hint)


def format_size(n: float) -> str:
    """``n`` bytes in the unit that fits (B, KB, MB, GB; powers of 1000): 100 is "100 B", never "0.0 MB"."""
    n = float(n)
    if round(abs(n)) < 1000:
        return f"{n:,.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if round(abs(n), 1) < 1000 or unit == "GB":  # 999,960 B is "1.0 MB", not "1,000.0 KB"
            return f"{n:,.1f} {unit}"


def _sizes(needed: int, available: int) -> tuple[str, str]:
    """Both sizes for one message: in bytes where rounding would show "14.1 KB needed, 14.1 KB allowed"."""
    shown = format_size(needed), format_size(available)
    return shown if shown[0] != shown[1] else (f"{needed:,} B", f"{available:,} B")


def ensure_room(path: Path, needed: int, what: str = "output") -> None:
    """Refuse before writing ``needed`` bytes at ``path`` when the disk or ``ulimit -f`` cannot take them."""
    path = Path(path)
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    if free < needed:
        need, room = _sizes(needed, free)
        raise CarsTLError(
            f"not enough free space for the {what} {path}: about {need} needed, {room} free",
            f"free space on the disk holding {path.parent}, or write elsewhere with --out",
        )
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        need, room = _sizes(needed, soft)
        raise CarsTLError(
            f"the {what} {path} needs about {need}, more than this process may write per file (ulimit -f: {room})",
            "raise the limit (ulimit -f unlimited) and rerun",
        )


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc, path) from None
        raise
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
    output under ``.old-*``, which :func:`cars_tl.core.locks.clean_stale` puts back on the next run.
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
