"""Safe extraction of tar (any compression) and zip archives: nothing lands outside the destination.

:func:`safe_extract` refuses absolute members, ``..``, links pointing outside, members below links
and device files before anything is written, extracts into a temporary folder beside the
destination and moves the result into place only when complete.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable

from cars_tl.errors import CarsTLError
from cars_tl.progress import NULL, Progress

_FILTER_ERROR = getattr(tarfile, "FilterError", ())  # absent before 3.12 unless backported
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


def safe_extract(archive: Path, dest: Path, *, progress: Progress = NULL) -> None:
    """Unpack a tar (any compression) or zip into ``dest``, refusing members that escape it.

    Absolute paths, ``..`` components, links resolving outside ``dest``, paths through links and
    device files are refused (:class:`CarsTLError` naming archive and member) before anything is
    written. Extraction happens in a temporary folder beside ``dest``; its top-level entries are
    renamed into ``dest`` only when complete (and never over existing ones).
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise CarsTLError(f"archive {archive} does not exist", "check the path given to --source")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    try:
        if tarfile.is_tarfile(archive):
            _extract_tar(archive, tmp, progress)
        elif zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp, progress)
        else:
            raise CarsTLError(
                f"{archive} is neither a tar nor a zip archive (or it is truncated)",
                "re-download it, or pass the folder it came from with --source PATH",
            )
        _merge_into(tmp, dest)
    except _CORRUPT as exc:
        raise CarsTLError(f"cannot extract {archive}: {exc}", "the archive is damaged or truncated; download it again") from None
    except OSError as exc:
        raise CarsTLError(f"cannot extract {archive} beside {dest}: {exc}", f"check free space and permissions in {dest.parent}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge_into(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(tmp, dest)
        return
    entries = list(tmp.iterdir())
    clashes = [e.name for e in entries if (dest / e.name).exists()]
    if clashes:
        raise CarsTLError(f"extracting into {dest} would overwrite {', '.join(clashes[:5])}", f"remove them from {dest} first")
    for entry in entries:
        os.replace(entry, dest / entry.name)


def _refuse(archive: Path, member: str, why: str) -> CarsTLError:
    return CarsTLError(
        f"refusing to extract {archive}: member {member!r} {why}",
        "the archive is unsafe or not the expected one; get it from a trusted source",
    )


def _member_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The path parts of a member name, refusing absolute names and ``..``."""
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive or name.startswith("\\"):
        raise _refuse(archive, name, "has an absolute path")
    parts = tuple(p for p in re.split(r"[/\\]", name) if p not in ("", "."))
    if ".." in parts:
        raise _refuse(archive, name, "contains '..'")
    return parts


def _link_stays_inside(parts: tuple[str, ...], target: str, relative_to_member: bool) -> bool:
    if not target or PurePosixPath(target).is_absolute() or PureWindowsPath(target).drive:
        return False
    depth = len(parts) - 1 if relative_to_member else 0
    stack = list(parts[:depth])
    for piece in re.split(r"[/\\]", target):
        if piece == "..":
            if not stack:
                return False
            stack.pop()
        elif piece not in ("", "."):
            stack.append(piece)
    return True


def _check_members(archive: Path, members: Iterable[tuple[str, str, str]]) -> None:
    """Members are (name, kind, link target) with kind in file/dir/symlink/hardlink/other."""
    links: set[tuple[str, ...]] = set()
    for name, kind, target in members:
        parts = _member_parts(archive, name)
        # A member below a link would be written wherever the link points.
        if any(parts[:i] in links for i in range(1, len(parts))):
            raise _refuse(archive, name, "lies below a link")
        if kind == "other":
            raise _refuse(archive, name, "is a device file or FIFO")
        if kind in ("symlink", "hardlink"):
            if not _link_stays_inside(parts, target, relative_to_member=kind == "symlink"):
                raise _refuse(archive, name, f"is a link to {target!r}, outside the destination")
            links.add(parts)


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isfile():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    return "other"


def _extract_tar(archive: Path, into: Path, progress: Progress) -> None:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        _check_members(archive, ((m.name, _tar_kind(m), m.linkname) for m in members))
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with progress.task(f"extract {archive.name}", total=len(members), unit="files") as task:

            def counted():
                for member in members:
                    yield member
                    task.advance(1)

            try:
                # extractall, not extract: it sets directory permissions last, so read-only dirs work.
                tar.extractall(into, members=counted(), **extra)
            except _FILTER_ERROR as exc:
                raise _refuse(archive, exc.tarinfo.name, str(exc)) from None


def _extract_zip(archive: Path, into: Path, progress: Progress) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()

        def kind(info: zipfile.ZipInfo) -> tuple[str, str, str]:
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                return info.filename, "symlink", zf.read(info).decode("utf-8", "replace")
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                return info.filename, "other", ""
            return info.filename, "dir" if info.is_dir() else "file", ""

        _check_members(archive, (kind(i) for i in infos))
        with progress.task(f"extract {archive.name}", total=len(infos), unit="files") as task:
            for info in infos:
                zf.extract(info, into)  # zipfile writes links as plain files: nothing to follow
                task.advance(1)
