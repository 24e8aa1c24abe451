"""Safe extraction of tar (any compression) and zip archives: nothing lands outside the destination.

:func:`safe_extract` refuses absolute members, ``..``, links pointing outside, members below links
and device files before anything is written, extracts into a temporary folder beside the
destination and moves the result into place only when complete.

Archive bombs are refused before anything is written: the total uncompressed size (the zip's
central directory, the tar's member sizes) may not exceed ``CARS_TL_MAX_ARCHIVE_BYTES`` (default
16 GiB; the official Stanford Cars archives hold about 1.9 GB), and no zip member, nor a compressed
tar as a whole, may expand more than ``CARS_TL_MAX_ARCHIVE_RATIO`` times (default 200; JPEGs barely
compress), and an archive may hold at most ``CARS_TL_MAX_ARCHIVE_MEMBERS`` members (default 40,000:
the whole dataset is 16,185 images plus about 400 folders and devkit files, and a zip made on a Mac
doubles that with ``__MACOSX/._*`` entries; a tar of 50,000 junk members took 50 s to import). Zip
members are written through a counter too, so a central directory that lies stops at the cap. Zip members without file-type bits (``zipfile.writestr``'s default) are regular files.
Links that stay inside the archive are replaced by copies of what they point to (dangling ones are
left out), so an image stored as a link is an image.
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
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

from cars_tl.core.atomic import format_size
from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import NULL, Progress

MAX_BYTES_ENV = "CARS_TL_MAX_ARCHIVE_BYTES"
MAX_RATIO_ENV = "CARS_TL_MAX_ARCHIVE_RATIO"
MAX_MEMBERS_ENV = "CARS_TL_MAX_ARCHIVE_MEMBERS"
DEFAULT_MAX_BYTES = 16 << 30
DEFAULT_MAX_RATIO = 200
DEFAULT_MAX_MEMBERS = 40_000  # see the module docstring
_RATIO_FLOOR = 1 << 20  # a small member of zeros may compress 1000:1 harmlessly: the ratio counts above 1 MiB
_FILTER_ERROR = getattr(tarfile, "FilterError", ())  # absent before 3.12 unless backported
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


def limits() -> tuple[int, float]:
    """(total bytes, expansion ratio) an archive may reach: the environment's, else the defaults."""
    values = []
    for env, default in ((MAX_BYTES_ENV, DEFAULT_MAX_BYTES), (MAX_RATIO_ENV, DEFAULT_MAX_RATIO)):
        values.append(_limit(env, default))
    return int(values[0]), values[1]


def _limit(env: str, default: float) -> float:
    raw = os.environ.get(env, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1
    if not value > 0:
        raise CarsTLError(f"{env}={raw!r} is not a positive number", f"unset it, or set e.g. {env}={default}")
    return value


def max_members() -> int:
    """How many members an archive may hold: the environment's limit, else the default."""
    return int(_limit(MAX_MEMBERS_ENV, DEFAULT_MAX_MEMBERS))


def _too_many(shown: str, count: str, cap: int) -> CarsTLError:
    return CarsTLError(
        f"refusing to extract {shown}: it holds {count} members; the limit is {cap:,} (the whole Stanford "
        "Cars dataset is about 16,600 files and folders)",
        f"check that it is the dataset; if you trust the archive, raise the limit: {MAX_MEMBERS_ENV}={2 * cap} "
        "cars-tl download ... (see the README, Data)",
    )


def _too_big(shown: str, why: str, env: str, value) -> CarsTLError:
    return CarsTLError(
        f"refusing to extract {shown}: {why} (an archive bomb, or an archive larger than expected)",
        f"if you trust the archive, raise the limit: {env}={value} cars-tl download ... (see the README, Data)",
    )


def _check_sizes(shown: str, archive: Path, sizes: Iterable[tuple[str, int, int | None]]) -> int:
    """Refuse before writing: sizes are (member, uncompressed, compressed or None). Returns the total."""
    max_bytes, max_ratio = limits()
    total = 0
    for name, size, packed in sizes:
        total += size
        if total > max_bytes:
            raise _too_big(
                shown,
                f"it expands to more than {format_size(max_bytes)} (at member {name!r})",
                MAX_BYTES_ENV,
                2 * max_bytes,
            )
        if packed is not None and size > _RATIO_FLOOR and size > max_ratio * max(packed, 1):
            raise _too_big(
                shown,
                f"member {name!r} expands {size / max(packed, 1):,.0f} times ({format_size(size)} from {packed:,} bytes; "
                f"the limit is {max_ratio:g})",
                MAX_RATIO_ENV,
                int(10 * max_ratio),
            )
    packed_total = archive.stat().st_size
    if total > _RATIO_FLOOR and total > max_ratio * max(packed_total, 1):
        raise _too_big(
            shown,
            f"it expands {total / max(packed_total, 1):,.0f} times ({format_size(total)} from {packed_total:,} bytes; "
            f"the limit is {max_ratio:g})",
            MAX_RATIO_ENV,
            int(10 * max_ratio),
        )
    return total


def uncompressed_size(archive: Path) -> int:
    """What ``archive`` expands to, from its headers (0 when unreadable): for space estimates."""
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                return sum(m.size for m in tar.getmembers() if m.isfile())
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return sum(i.file_size for i in zf.infolist())
    except (*_CORRUPT, OSError):
        pass
    return 0


def _visible(path: Path) -> Path:
    """``path`` without our temporary folders (``.x.tmp-*``, ``.x.extract-*``): what the user knows."""
    path = Path(path)
    while path.name.startswith(".") and (".tmp-" in path.name or ".extract-" in path.name) and path.parent != path:
        path = path.parent
    return path


def safe_extract(archive: Path, dest: Path, *, progress: Progress = NULL, shown: str | None = None) -> None:
    """Unpack a tar (any compression) or zip into ``dest``, refusing members that escape it.

    Absolute paths, ``..`` components, links resolving outside ``dest``, paths through links,
    device files and archives expanding past the limits (:func:`limits`) are refused
    (:class:`CarsTLError` naming archive and member) before anything is written. Extraction happens
    in a temporary folder beside ``dest``; its top-level entries are renamed into ``dest`` only
    when complete (and never over existing ones). ``shown`` is how messages name the archive (the
    user's file and member when ``archive`` lies in our own temporary extraction).
    """
    archive, dest = Path(archive), Path(dest)
    shown = shown or str(archive)
    if not archive.is_file():
        raise CarsTLError(f"archive {shown} does not exist", "check the path given to --source")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    try:
        if tarfile.is_tarfile(archive):
            _extract_tar(archive, tmp, progress, shown)
        elif zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp, progress, shown)
        else:
            raise CarsTLError(
                f"{shown} is neither a tar nor a zip archive (or it is truncated)",
                "re-download it, or pass the folder it came from with --source PATH",
            )
        _materialise_links(tmp)
        _merge_into(tmp, dest)
    except _CORRUPT as exc:
        raise CarsTLError(
            f"cannot extract {shown}: {exc}", "the archive is damaged or truncated; download it again"
        ) from None
    except OSError as exc:
        raise CarsTLError(
            f"cannot extract {shown}: {exc.strerror or exc}",
            f"check free space and permissions in {_visible(dest.parent)}",
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _materialise_links(tree: Path) -> None:
    """Replace each symlink under ``tree`` by a copy of what it points to when that lies inside ``tree``;
    remove the others (dangling: they carry no data). Links were checked to stay inside already."""
    top = os.path.realpath(tree)
    for _ in range(8):  # links to folders holding links: a few passes
        links = [Path(d) / n for d, dirs, files in os.walk(tree) for n in dirs + files if (Path(d) / n).is_symlink()]
        if not links:
            return
        for link in links:
            target = os.path.realpath(link)
            inside = os.path.commonpath([top, target]) == top and os.path.exists(target)
            link.unlink()
            if inside and os.path.isdir(target):
                shutil.copytree(target, link, symlinks=True)
            elif inside:
                shutil.copyfile(target, link)
    for d, dirs, files in os.walk(tree):  # a cycle of links: what is left carries no data
        for n in dirs + files:
            if (Path(d) / n).is_symlink():
                (Path(d) / n).unlink()


def _merge_into(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(tmp, dest)
        return
    entries = list(tmp.iterdir())
    clashes = [e.name for e in entries if (dest / e.name).exists()]
    if clashes:
        raise CarsTLError(
            f"extracting into {dest} would overwrite {', '.join(clashes[:5])}", f"remove them from {dest} first"
        )
    for entry in entries:
        os.replace(entry, dest / entry.name)


def _refuse(archive: str, member: str, why: str) -> CarsTLError:
    return CarsTLError(
        f"refusing to extract {archive}: member {member!r} {why}",
        "the archive is unsafe or not the expected one; get it from a trusted source",
    )


def _member_parts(archive: str, name: str) -> tuple[str, ...]:
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


def _check_members(archive: str, members: Iterable[tuple[str, str, str]]) -> None:
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


def _extract_tar(archive: Path, into: Path, progress: Progress, shown: str) -> None:
    with tarfile.open(archive) as tar:
        cap, members = max_members(), []
        for member in tar:  # headers only; stops past the cap, before reading the rest
            members.append(member)
            if len(members) > cap:
                raise _too_many(shown, f"over {cap:,}", cap)
        _check_members(shown, ((m.name, _tar_kind(m), m.linkname) for m in members))
        # A member's header size is exactly what tarfile writes for it: their sum bounds the output.
        _check_sizes(shown, archive, ((m.name, m.size, None) for m in members if m.isfile()))
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
                raise _refuse(shown, exc.tarinfo.name, str(exc)) from None


def _extract_zip(archive: Path, into: Path, progress: Progress, shown: str) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > (cap := max_members()):
            raise _too_many(shown, f"{len(infos):,}", cap)
        links: dict[str, str] = {}

        def kind(info: zipfile.ZipInfo) -> tuple[str, str, str]:
            # Only Unix-made zips carry a mode; one without file-type bits (zipfile.writestr) is a regular file.
            mode = info.external_attr >> 16 if info.create_system == 3 else 0
            if stat.S_ISLNK(mode):
                if info.file_size > 4096:
                    return info.filename, "other", ""
                links[info.filename] = zf.read(info).decode("utf-8", "replace")
                return info.filename, "symlink", links[info.filename]
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                return info.filename, "other", ""
            return info.filename, "dir" if info.is_dir() else "file", ""

        _check_members(shown, (kind(i) for i in infos))
        _check_sizes(
            shown, archive, ((i.filename, i.file_size, i.compress_size) for i in infos if i.filename not in links)
        )
        max_bytes, _ = limits()
        written = 0
        with progress.task(f"extract {archive.name}", total=len(infos), unit="files") as task:
            for info in infos:
                parts = _member_parts(shown, info.filename)
                target = into.joinpath(*parts) if parts else into
                if info.is_dir() or not parts:
                    target.mkdir(parents=True, exist_ok=True)
                elif info.filename in links:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(links[info.filename], target)  # made a copy of its target once all is written
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as out:
                        while block := src.read(1 << 20):
                            written += len(block)
                            if written > max_bytes:  # the central directory said less
                                raise _too_big(
                                    shown,
                                    f"it expands to more than {format_size(max_bytes)} (at member {info.filename!r})",
                                    MAX_BYTES_ENV,
                                    2 * max_bytes,
                                )
                            out.write(block)
                task.advance(1)
