"""Getting Stanford Cars and torchvision weights onto disk, safely.

:func:`prepare_dataset` puts the dataset into ``<data-dir>/stanford_cars/`` (torchvision's layout)
from generated demo data, a local folder or archive in one of three layouts, or HTTP mirrors, and
writes its manifest. The folder appears only complete: everything is built and validated in a
temporary folder inside ``<data-dir>`` and renamed into place at the end.

:func:`download_file` streams one URL to disk with resume (HTTP Range), HTML-page detection and
size/MD5/SHA-256 checks; :func:`safe_extract` unpacks tar/zip archives refusing members that would
land outside the destination; :func:`download_weights` fetches torchvision ImageNet weights into
the torch hub cache.

Nothing here prints, and torch is imported only inside :func:`download_weights`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import lzma
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Iterable, Sequence

from cars_tl import data
from cars_tl.errors import CarsTLError
from cars_tl.progress import NULL, Progress

MIRRORS_JSON = Path(__file__).with_name("mirrors.json")
SPLIT_FILES = ("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz", "cars_test_annos_withlabels.mat")
SPLIT_ARCHIVES = {"cars_train.tgz": "cars_train", "cars_test.tgz": "cars_test", "car_devkit.tgz": "devkit"}
TEST_LABELS = data.TEST_LABELS_NAMES[0]
SOURCE_FILE = ".cars_tl_source.json"  # inside stanford_cars/: where the data came from
DOWNLOADS_DIR = "stanford_cars_downloads"  # verified archives wait here between tries
ACCEPTED_LAYOUTS = (
    "torchvision: stanford_cars/ holding cars_train/, cars_test/, devkit/ and "
    "cars_test_annos_withlabels.mat (or devkit/cars_test_annos_withlabels.mat)",
    "split archives: cars_train.tgz, cars_test.tgz, car_devkit.tgz and cars_test_annos_withlabels.mat in one folder",
    "all-in-one: car_ims.tgz (or an extracted car_ims/) and cars_annos.mat in one folder",
    "a single .tar, .tar.gz, .tgz or .zip archive holding any of these",
)
SOURCE_CHOICES = "auto, demo, an http(s):// mirror URL, or an existing folder or archive"
CHUNK = 1 << 20
USER_AGENT = "cars-tl/0.1 (python urllib)"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's convention: resnet50-11ad3fa6.pth
_FILTER_ERROR = getattr(tarfile, "FilterError", ())  # absent before 3.12 unless backported
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)
_WELL_KNOWN_MODELS = ("resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_large", "regnet_y_800mf", "swin_t", "vit_b_16")


class DownloadError(CarsTLError):
    """One URL could not be fetched or did not verify; ``reason`` says why, without the URL."""

    def __init__(self, url: str, reason: str, hint: str | None = None):
        super().__init__(
            f"download of {url} failed: {reason}",
            hint or "check the URL and your connection, then rerun; or fetch the file by hand",
        )
        self.url = url
        self.reason = reason


# --------------------------------------------------------------------------- one file


def download_file(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    md5: str | None = None,
    sha256_prefix: str | None = None,
    progress: Progress = NULL,
    retries: int = 5,
    timeout: float = 30,
) -> Path:
    """Fetch ``url`` to ``dest`` via ``dest.part``, resuming dropped connections; verify; rename.

    An existing ``dest`` that passes the given checks is reused without network. Any failure
    removes the ``.part`` file and leaves nothing under ``dest``; it raises :class:`DownloadError`.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    checks = {"md5": md5, "sha256": sha256_prefix}
    if dest.is_file():
        if _verify(dest, size, checks, _file_digests(dest, checks)) is None:
            return dest
        dest.unlink()  # a wrong file must not stay under the final name
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        digests = _stream(url, part, size=size, checks=checks, progress=progress, retries=retries, timeout=timeout)
        problem = _verify(part, size, checks, digests)
        if problem:
            raise DownloadError(
                url, problem,
                f"the server sent a different file; try another mirror (--mirror URL) or download {dest.name} by hand",
            )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def _new_digests(checks: dict) -> dict:
    return {name: hashlib.new(name) for name, expected in checks.items() if expected}


def _file_digests(path: Path, checks: dict) -> dict:
    digests = _new_digests(checks)
    if digests:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                for d in digests.values():
                    d.update(block)
    return digests


def _verify(path: Path, size: int | None, checks: dict, digests: dict) -> str | None:
    """The first mismatch as a sentence, or None when every given check passes."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"got {actual} bytes, expected {size}"
    if checks.get("md5") and digests["md5"].hexdigest() != checks["md5"].lower():
        return f"MD5 {digests['md5'].hexdigest()} does not match the expected {checks['md5']}"
    if checks.get("sha256") and not digests["sha256"].hexdigest().startswith(checks["sha256"].lower()):
        return f"SHA-256 {digests['sha256'].hexdigest()[:16]}... does not start with the expected {checks['sha256']}"
    return None


class _Transient(Exception):
    """The body ended before its Content-Length: resume it."""


def _stream(url, part: Path, *, size, checks, progress, retries, timeout) -> dict:
    """Write ``url`` into ``part``; return the digests of what was written."""
    # A .part left by a killed run is resumed rather than thrown away.
    offset = part.stat().st_size if part.is_file() else 0
    digests = _file_digests(part, checks) if offset else _new_digests(checks)
    failures = 0
    with contextlib.ExitStack() as stack:
        task = None
        while True:
            before = offset
            try:
                headers = {"User-Agent": USER_AGENT}
                if offset:
                    headers["Range"] = f"bytes={offset}-"
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
                    if offset and not _resumes_at(response, offset):
                        offset, digests = 0, _new_digests(checks)  # the server ignored Range: start over
                    _refuse_html(url, response.headers.get("Content-Type", ""))
                    length = response.headers.get("Content-Length")
                    expected = offset + int(length) if length and length.isdigit() else None
                    if task is None:
                        task = stack.enter_context(progress.task(f"download {part.name[:-5]}", total=size or expected, unit="B"))
                        task.advance(offset)
                    with open(part, "ab" if offset else "wb") as f:
                        while chunk := response.read(CHUNK):
                            if offset == 0:
                                _refuse_html(url, "", chunk)
                            f.write(chunk)
                            for d in digests.values():
                                d.update(chunk)
                            offset += len(chunk)
                            task.advance(len(chunk))
                    if expected is not None and offset < expected:
                        raise _Transient(f"connection closed after {offset} of {expected} bytes")
                    return digests
            except urllib.error.HTTPError as exc:
                if exc.code == 416:  # our .part is not a prefix of what is served now
                    part.unlink(missing_ok=True)
                    offset, digests = 0, _new_digests(checks)
                    reason = "HTTP 416 (range not satisfiable)"
                elif exc.code in (408, 429) or exc.code >= 500:
                    reason = f"HTTP {exc.code} {exc.reason}"
                else:
                    raise DownloadError(url, f"HTTP {exc.code} {exc.reason}") from None
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (ConnectionRefusedError, socket.gaierror)) or not isinstance(exc.reason, OSError):
                    # Refused connections and unknown hosts do not heal in seconds: fail fast.
                    raise DownloadError(url, f"cannot connect ({exc.reason})") from None
                reason = str(exc.reason)
            except (_Transient, OSError, http.client.HTTPException) as exc:
                reason = str(exc) or type(exc).__name__
            failures = 0 if offset > before else failures + 1
            if failures > retries:
                raise DownloadError(url, f"gave up after {retries} retries: {reason}")
            if failures:
                time.sleep(min(0.25 * 2**failures, 8))


def _resumes_at(response, offset: int) -> bool:
    if response.status != 206:
        return False
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return bool(match) and int(match.group(1)) == offset


def _refuse_html(url: str, content_type: str, head: bytes = b"") -> None:
    start = head[:256].lstrip().lower()
    if "text/html" in content_type.lower() or start.startswith((b"<!doctype html", b"<html")):
        raise DownloadError(
            url,
            "the server sent an HTML page instead of the file (a login, consent or error page)",
            "open the URL in a browser, download the file by hand and pass its folder with --source PATH, or use another --mirror",
        )


# --------------------------------------------------------------------------- archives


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


# --------------------------------------------------------------------------- local layouts


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hardlink when the filesystem allows (instant for ~2 GB of JPEGs), else copy the bytes."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _transfer(src: Path, dst: Path, owned: bool, progress: Progress) -> None:
    """Move what we extracted ourselves; link-or-copy the user's files (never move them)."""
    if owned:
        os.replace(src, dst)
    elif src.is_dir():
        with progress.task(f"copy {src.name}", total=sum(1 for _ in src.rglob("*")), unit="files") as task:

            def copy(s, d):
                _link_or_copy(s, d)
                task.advance(1)

            shutil.copytree(src, dst, copy_function=copy)
    else:
        _link_or_copy(src, dst)


def _has_torchvision(folder: Path) -> bool:
    return (
        all((folder / d).is_dir() for d in data.IMAGE_DIRS.values())
        and all((folder / f).is_file() for f in data.DEVKIT_FILES.values())
        and any((folder / f).is_file() for f in data.TEST_LABELS_NAMES)
    )


def _layout_at(folder: Path) -> str | None:
    names = set(os.listdir(folder))
    if _has_torchvision(folder):
        return "torchvision"
    if set(SPLIT_FILES) <= names:
        return "split"
    if "cars_annos.mat" in names and ("car_ims.tgz" in names or (folder / "car_ims").is_dir()):
        return "all-in-one"
    return None


def _near_misses(folder: Path) -> list[str]:
    """For each layout a folder holds only part of, what it lacks (for the error message)."""

    def has(*names: str) -> bool:
        return any((folder / n).exists() for n in names)

    wanted = {
        "torchvision": {
            "cars_train/": has("cars_train"), "cars_test/": has("cars_test"),
            **{f: has(f) for f in data.DEVKIT_FILES.values()}, TEST_LABELS: has(*data.TEST_LABELS_NAMES),
        },
        "split archives": {f: has(f) for f in SPLIT_FILES},
        "all-in-one": {"car_ims.tgz (or car_ims/)": has("car_ims.tgz", "car_ims"), "cars_annos.mat": has("cars_annos.mat")},
    }
    misses = []
    for layout, items in wanted.items():
        missing = [name for name, present in items.items() if not present]
        if 0 < len(missing) < len(items):
            misses.append(f"{folder} looks like the {layout} layout but lacks {', '.join(missing)}")
    return misses


def _find_layout(root: Path) -> tuple[str, Path]:
    """The first accepted layout at or up to three folder levels below ``root`` (breadth first)."""
    not_containers = {*data.IMAGE_DIRS.values(), "car_ims", "devkit"}  # thousands of JPEGs, no layouts
    level, near = [root], []
    for _ in range(4):
        below = []
        for folder in level:
            layout = _layout_at(folder)
            if layout:
                return layout, folder
            near += _near_misses(folder)
            below += sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in not_containers and not p.name.startswith("."))
        level = below
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(found[:15]) + (f", ... ({len(found) - 15} more)" if len(found) > 15 else "") or "nothing"
    lines = [f"no Stanford Cars layout recognised in {root} (found: {shown})", *near, "accepted layouts:"]
    lines += [f"  - {layout}" for layout in ACCEPTED_LAYOUTS]
    raise CarsTLError("\n".join(lines), "arrange the files in one of these layouts and rerun cars-tl download --source PATH, or use --source demo")


def _import_torchvision(folder: Path, stage: Path, work: Path, owned: bool, progress: Progress) -> None:
    stage.mkdir(parents=True)
    for name in (*data.IMAGE_DIRS.values(), "devkit"):
        _transfer(folder / name, stage / name, owned, progress)
    if (folder / TEST_LABELS).is_file():
        _transfer(folder / TEST_LABELS, stage / TEST_LABELS, owned, progress)


def _import_split(folder: Path, stage: Path, work: Path, owned: bool, progress: Progress) -> None:
    stage.mkdir(parents=True)
    for archive, member in SPLIT_ARCHIVES.items():
        out = work / f"extract-{member}"
        safe_extract(folder / archive, out, progress=progress)
        found = next((p for p in (out / member, *out.glob(f"*/{member}")) if p.is_dir()), None)
        if found is None:
            raise CarsTLError(
                f"{folder / archive} does not contain a {member}/ folder (it holds: {', '.join(sorted(os.listdir(out))[:10])})",
                f"check that {archive} is the original Stanford Cars file",
            )
        os.replace(found, stage / member)
        shutil.rmtree(out)
    _transfer(folder / TEST_LABELS, stage / TEST_LABELS, owned, progress)


def _import_all_in_one(folder: Path, stage: Path, work: Path, owned: bool, progress: Progress) -> None:
    """Convert ``car_ims`` + ``cars_annos.mat`` to torchvision's layout, renumbering per split."""
    import numpy as np
    import scipy.io

    annos_path = folder / "cars_annos.mat"
    try:
        mat = scipy.io.loadmat(str(annos_path), squeeze_me=True)
    except Exception as exc:  # scipy raises many types for corrupt files
        raise CarsTLError(f"unreadable .mat file {annos_path}: {exc}", "get an intact cars_annos.mat") from exc
    if "annotations" not in mat or "class_names" not in mat:
        raise CarsTLError(
            f"{annos_path} lacks 'annotations' or 'class_names' (has {sorted(k for k in mat if not k.startswith('__'))})",
            "use the original cars_annos.mat, or another accepted layout (cars-tl download --help)",
        )
    annotations = np.atleast_1d(mat["annotations"])
    needed = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    missing_fields = [f for f in needed if f not in (annotations.dtype.names or ())]
    if missing_fields:
        raise CarsTLError(
            f"{annos_path} annotations lack fields {missing_fields} (has {list(annotations.dtype.names or ())})",
            "use the original cars_annos.mat, or another accepted layout (cars-tl download --help)",
        )
    if (folder / "car_ims.tgz").is_file():
        base, owned = work / "extract-car_ims", True
        safe_extract(folder / "car_ims.tgz", base, progress=progress)
    else:
        base = folder
    rows: dict[str, list[dict]] = {split: [] for split in data.SPLITS}
    moves, absent = [], []
    for a in annotations:
        split = "test" if int(a["test"]) else "train"
        fname = f"{len(rows[split]) + 1:05d}.jpg"
        box = tuple(int(a[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
        rows[split].append({"fname": fname, "box": box, "label": int(a["class"]) - 1})
        rel = str(a["relative_im_path"])
        if PurePosixPath(rel).is_absolute() or ".." in re.split(r"[/\\]", rel):  # would reach outside car_ims
            raise CarsTLError(f"{annos_path} lists an image outside its folder: {rel!r}", "use the original cars_annos.mat")
        src = base / rel
        if not src.is_file():
            absent.append(rel)
        moves.append((src, stage / data.IMAGE_DIRS[split] / fname))
    if absent:
        raise CarsTLError(
            f"{len(absent)} images listed in {annos_path} are missing: {', '.join(absent[:5])}" + (" ..." if len(absent) > 5 else ""),
            "check that car_ims.tgz (or car_ims/) is complete",
        )
    for split_dir in data.IMAGE_DIRS.values():
        (stage / split_dir).mkdir(parents=True)
    with progress.task("convert car_ims", total=len(moves), unit="files") as task:
        for src, dst in moves:
            if owned:
                os.replace(src, dst)
            else:
                _link_or_copy(src, dst)
            task.advance(1)
    class_names = [str(n) for n in np.atleast_1d(mat["class_names"])]
    data.write_devkit(stage, class_names, rows["train"], rows["test"])


_IMPORTERS: dict[str, Callable[[Path, Path, Path, bool, Progress], None]] = {
    "torchvision": _import_torchvision,
    "split": _import_split,
    "all-in-one": _import_all_in_one,
}


def _import_path(path: Path, stage: Path, work: Path, progress: Progress) -> None:
    if path.is_file():
        root, owned = work / "source", True
        safe_extract(path, root, progress=progress)
    else:
        root, owned = path, False
    layout, folder = _find_layout(root)
    _IMPORTERS[layout](folder, stage, work, owned, progress)


# --------------------------------------------------------------------------- mirrors


def load_mirror_list(path: Path | None = None) -> dict:
    """The mirror list (built-in ``mirrors.json`` unless ``path``), validated."""
    path = Path(path) if path else MIRRORS_JSON
    fix = f"pass --mirror-list a JSON file shaped like {MIRRORS_JSON}"
    try:
        spec = json.loads(path.read_text())
    except OSError as exc:
        raise CarsTLError(f"cannot read mirror list {path}: {exc.strerror or exc}", fix) from None
    except ValueError as exc:
        raise CarsTLError(f"mirror list {path} is not valid JSON: {exc}", fix) from None
    problems = []
    files = spec.get("files") if isinstance(spec, dict) else None
    if not isinstance(files, dict):
        problems.append("no 'files' object")
        files = {}
    for name in SPLIT_FILES:
        entry = files.get(name)
        if not isinstance(entry, dict) or not re.fullmatch(r"[0-9a-fA-F]{32}", str(entry.get("md5"))):
            problems.append(f"files.{name} needs an 'md5' of 32 hex digits")
        elif not (entry.get("size") is None or (isinstance(entry["size"], int) and entry["size"] > 0)):
            problems.append(f"files.{name}.size must be a positive integer or null")
    mirrors = spec.get("mirrors") if isinstance(spec, dict) else None
    if not isinstance(mirrors, list) or not all(isinstance(m, dict) and _is_http(m.get("base_url")) for m in mirrors):
        problems.append("'mirrors' must be a list of objects with an http(s) 'base_url'")
    if problems:
        raise CarsTLError(f"mirror list {path} is malformed: {'; '.join(problems)}", fix)
    return spec


def _is_http(url) -> bool:
    return isinstance(url, str) and urllib.parse.urlsplit(url).scheme in ("http", "https") and "://" in url


def _mirror_label(mirror: dict) -> str:
    """The mirror's name and the first sentence of its note (e.g. that it is dead) for errors."""
    note = str(mirror.get("note") or "").split(". ")[0].rstrip(".")
    name = mirror.get("name") or mirror["base_url"]
    return f"{name} ({note})" if note else name


def _check_mirror_urls(mirrors: Sequence[str]) -> None:
    bad = [m for m in mirrors if not _is_http(m)]
    if bad:
        raise CarsTLError(f"--mirror {bad[0]!r} is not an http(s):// URL", "pass --mirror https://host/folder (the folder holding the files)")


def _fetch_split_files(bases: list[tuple[str, str]], files: dict, folder: Path, progress: Progress) -> None:
    """Download the four split files into ``folder``, each from the first mirror that works."""
    for name in SPLIT_FILES:
        failures = []
        for label, base in bases:
            url = f"{base.rstrip('/')}/{name}"
            try:
                download_file(url, folder / name, size=files[name].get("size"), md5=files[name]["md5"], progress=progress)
                break
            except DownloadError as exc:
                failures.append(f"  {label}: {url}: {exc.reason}")
        else:
            tried = "\n".join(failures) or "  (no mirror to try: the mirror list is empty)"
            raise CarsTLError(
                f"could not download {name} from any mirror:\n{tried}",
                f"download {', '.join(SPLIT_FILES)} by hand (e.g. from Kaggle) into {folder} and run "
                f"cars-tl download --source {folder} --data-dir {folder.parent}; or pass --mirror URL of a folder serving them",
            )


# --------------------------------------------------------------------------- the dataset


def _origin(source: str) -> dict:
    """Where ``source`` takes the data from, as recorded in ``SOURCE_FILE``; rejects bad sources."""
    if source == "demo":
        return {"source": "demo"}
    if source == "auto" or _is_http(source):
        return {"source": "download"}
    path = Path(source).expanduser() if source else None
    if path is None or not path.exists():
        raise CarsTLError(
            f"--source {source!r} is not a known source and no such file or folder exists; valid: {SOURCE_CHOICES}",
            "cars-tl download --source auto  (or --source demo, --source https://host/folder, --source /path/to/stanford_cars)",
        )
    return {"source": "path", "path": str(path.resolve())}


def _installed_origin(root: Path) -> dict:
    try:
        origin = json.loads((root / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        origin = None
    return origin if isinstance(origin, dict) else {"source": "download"}  # placed by hand: assume the real thing


def _satisfied(installed: dict, wanted: dict) -> bool:
    if wanted["source"] == "download":  # any real copy will do; only demo data is not the real thing
        return installed.get("source") != "demo"
    return installed == wanted


def prepare_dataset(
    data_dir: Path,
    source: str,
    *,
    mirrors: Sequence[str] = (),
    mirror_list: Path | None = None,
    progress: Progress = NULL,
) -> tuple[data.Manifest, str]:
    """Put Stanford Cars into ``<data_dir>/stanford_cars`` and write its manifest.

    ``source``: ``auto`` (the mirror list), ``demo`` (generated), an http(s) mirror base URL, or a
    local folder/archive in any accepted layout (copied, never moved). Returns the manifest and
    what was done: "already verified", "verified", "generated", "imported" or "downloaded".
    A verified dataset from the same kind of source makes this a fast no-op.
    """
    data_dir = Path(data_dir)
    root = data.stanford_root(data_dir)
    wanted = _origin(source)
    _check_mirror_urls(mirrors)
    if data.manifest_is_current(data_dir) and _satisfied(_installed_origin(root), wanted):
        return data.load_manifest(data_dir), "already verified"
    if wanted["source"] == "demo":
        from cars_tl.demo import generate_demo

        return _build(data_dir, wanted, generate_demo), "generated"
    if wanted["source"] == "path":
        return _build(data_dir, wanted, lambda stage: _import_path(Path(wanted["path"]), stage, stage.parent, progress)), "imported"

    spec = load_mirror_list(mirror_list)
    invalid = None
    if _has_torchvision(root) and _installed_origin(root)["source"] != "demo":
        try:  # placed by hand: a valid copy needs only its manifest
            return data.build_manifest(data_dir), "verified"
        except CarsTLError as exc:
            invalid = exc
    bases = [("--mirror", m) for m in mirrors]
    if source == "auto":
        bases += [(_mirror_label(m), m["base_url"]) for m in spec["mirrors"]]
    else:
        bases.append(("--source", source))
    downloads = data_dir / DOWNLOADS_DIR

    def fetch(stage: Path) -> None:
        _fetch_split_files(bases, spec["files"], downloads, progress)
        _import_split(downloads, stage, stage.parent, False, progress)

    try:
        manifest = _build(data_dir, wanted, fetch)
        for name in SPLIT_FILES:  # the dataset is in place; its archives are redundant
            (downloads / name).unlink(missing_ok=True)
    except CarsTLError as exc:
        if invalid is None:
            raise
        raise CarsTLError(f"{invalid.message}\nfetching a fresh copy failed too: {exc.message}", exc.hint) from None
    finally:
        with contextlib.suppress(OSError):
            downloads.rmdir()  # only when empty: after a failure, verified archives stay for the next try
    return manifest, "downloaded"


def _build(data_dir: Path, origin: dict, fill: Callable[[Path], None]) -> data.Manifest:
    """Fill a fresh ``stanford_cars`` in a temporary folder of ``data_dir``, validate, swap in."""
    data_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{data.STANFORD_DIR}.tmp-", dir=data_dir))
    try:
        stage = work / data.STANFORD_DIR
        fill(stage)
        (stage / SOURCE_FILE).write_text(json.dumps(origin))
        data.build_manifest(work)  # validate before anything becomes visible
        _swap_into_place(stage, data.stanford_root(data_dir), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return data.load_manifest(data_dir)


def _swap_into_place(stage: Path, target: Path, work: Path) -> None:
    old = work / "previous"
    had_old = target.exists() or target.is_symlink()
    if had_old:
        os.replace(target, old)
    try:
        os.replace(stage, target)
    except OSError:
        if had_old:
            os.replace(old, target)
        raise


# --------------------------------------------------------------------------- weights


def download_weights(model_name: str, *, mirrors: Sequence[str] = (), progress: Progress = NULL) -> Path:
    """Fetch the DEFAULT ImageNet weights of a torchvision classification model into the hub cache.

    The file lands where torch.hub looks (``$TORCH_HOME/hub/checkpoints``), checked against the
    SHA-256 prefix in its name. ``mirrors`` (base URLs) are tried before the official URL.
    """
    import torch.hub
    import torchvision.models

    _check_mirror_urls(mirrors)
    valid = torchvision.models.list_models(module=torchvision.models)
    if model_name.lower() not in valid:
        examples = [n for n in _WELL_KNOWN_MODELS if n in valid] or valid[:8]
        raise CarsTLError(
            f"unknown torchvision classification model {model_name!r}; valid names include "
            f"{', '.join(examples)} ({len(valid)} in all, see torchvision.models.list_models())",
            "cars-tl download --weights resnet50",
        )
    url = torchvision.models.get_model_weights(model_name.lower()).DEFAULT.url
    filename = os.path.basename(urllib.parse.urlsplit(url).path)
    dest = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if dest.is_file():
        return dest
    match = _HASH_IN_NAME.search(filename)
    prefix = match.group(1) if match and match.group(1) else None
    failures = []
    for candidate in [f"{m.rstrip('/')}/{filename}" for m in mirrors] + [url]:
        try:
            return download_file(candidate, dest, sha256_prefix=prefix, progress=progress)
        except DownloadError as exc:
            failures.append(f"  {candidate}: {exc.reason}")
    raise CarsTLError(
        f"could not download the {model_name} weights {filename}:\n" + "\n".join(failures),
        f"download {url} by hand and place it at {dest} (torch.hub's cache; set TORCH_HOME to move it), "
        f"or pass --mirror URL of a folder holding {filename}",
    )
