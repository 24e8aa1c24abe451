"""Getting Stanford Cars and torchvision weights onto disk over HTTP, and the dataset into place.

:func:`prepare_dataset` puts the dataset into ``<data-dir>/stanford_cars/`` (torchvision's layout)
from generated demo data, a local folder or archive in any layout of :mod:`cars_tl.sources.layouts`, or
HTTP mirrors, and writes its manifest. It holds the data folder's writer lock throughout
(:func:`cars_tl.core.locks.writer_lock`; leftovers of a killed run are removed on the next one). The
folder appears only complete: everything is built and validated in a temporary folder inside
``<data-dir>`` and swapped into place at the end (:func:`cars_tl.core.atomic.swap_in`).

:func:`download_file` streams one URL to disk with resume (HTTP Range), retries with backoff,
HTML-page detection and size/MD5/SHA-256 checks; :func:`download_weights` fetches torchvision
ImageNet weights (any enum of a model) into the torch hub cache. Safe extraction lives in
:mod:`cars_tl.sources.archives`, local layouts in :mod:`cars_tl.sources.layouts`.

Nothing here prints, and torch is imported only inside :func:`download_weights`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from cars_tl import data
from cars_tl.core import locks
from cars_tl.core.atomic import swap_in
from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import NULL, Progress
from cars_tl.sources import layouts
from cars_tl.sources.archives import uncompressed_size
from cars_tl.sources.demo import generate_demo
from cars_tl.sources.layouts import SPLIT_FILES

MIRRORS_JSON = Path(__file__).with_name("mirrors.json")
DOWNLOADS_DIR = "stanford_cars_downloads"  # verified archives wait here between tries
SOURCE_CHOICES = "auto, demo, an http(s):// mirror URL, or an existing folder or archive"
CHUNK = 1 << 20
USER_AGENT = "cars-tl/0.1 (python urllib)"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's convention: resnet50-11ad3fa6.pth
_WELL_KNOWN_MODELS = (
    "resnet18",
    "resnet50",
    "efficientnet_b0",
    "convnext_tiny",
    "mobilenet_v3_large",
    "regnet_y_800mf",
    "swin_t",
    "vit_b_16",
)
RECONNECT_TRIES = 3  # a refused connection after bytes arrived: the server may be restarting
_DISK_FULL = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
}  # writing the data folder failed: not the network's fault


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

    An existing ``dest`` that passes the given checks is reused without network. A failure raises
    :class:`DownloadError` and leaves nothing under ``dest``; the ``.part`` file is kept (the next
    run resumes from it) unless what arrived failed the size or checksum check.
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
            part.unlink(missing_ok=True)  # the only failure that makes the bytes useless
            raise DownloadError(
                url,
                problem,
                f"the server sent a different file; try another mirror (--mirror URL) or download {dest.name} by hand",
            )
        os.replace(part, dest)
    finally:
        if part.is_file() and part.stat().st_size == 0:
            part.unlink()
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
    failures = refusals = 0
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
                        task = stack.enter_context(
                            progress.task(f"download {part.name[:-5]}", total=size or expected, unit="B")
                        )
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
                refused = isinstance(exc.reason, ConnectionRefusedError)
                if (
                    isinstance(exc.reason, socket.gaierror)
                    or not isinstance(exc.reason, OSError)
                    or (refused and not offset)
                ):
                    # Unknown hosts and servers that never answered do not heal in seconds: fail fast.
                    raise DownloadError(url, f"cannot connect ({exc.reason})") from None
                reason = str(exc.reason)
                if refused:  # mid-transfer: the server may be restarting; a few tries, then keep the .part
                    refusals += 1
                    if refusals > RECONNECT_TRIES:
                        raise DownloadError(
                            url,
                            f"connection refused after {offset} bytes ({RECONNECT_TRIES} retries); "
                            f"{part} is kept and the next run resumes from it",
                            "rerun the same command when the server is back (or pass another --mirror)",
                        ) from None
                    time.sleep(min(0.5 * 2 ** (refusals - 1), 8))
                    continue
            except (_Transient, OSError, http.client.HTTPException) as exc:
                if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                    raise  # our disk, not the network: retrying cannot help (prepare_dataset says where and how much)
                reason = str(exc) or type(exc).__name__
            failures = 0 if offset > before else failures + 1
            if failures > retries:
                kept = f"; {part} is kept and the next run resumes from it" if offset else ""
                raise DownloadError(url, f"gave up after {retries} retries: {reason}{kept}")
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
        raise CarsTLError(
            f"--mirror {bad[0]!r} is not an http(s):// URL",
            "pass --mirror https://host/folder (the folder holding the files)",
        )


def _fetch_split_files(bases: list[tuple[str, str]], files: dict, folder: Path, progress: Progress) -> None:
    """Download the four split files into ``folder``, each from the first mirror that works."""
    for name in SPLIT_FILES:
        failures = []
        for label, base in bases:
            url = f"{base.rstrip('/')}/{name}"
            try:
                download_file(
                    url, folder / name, size=files[name].get("size"), md5=files[name]["md5"], progress=progress
                )
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


def _origin(source: str, splits: tuple[str, ...], test_labels: Path | None, label_conflicts: str = "keep") -> dict:
    """Where ``source`` takes the data from, as recorded in ``data.ORIGIN_FILE``; rejects bad sources."""
    policy = {} if label_conflicts == "keep" else {"label_conflicts": label_conflicts}
    if source == "demo":
        return {"source": "demo", **policy}
    if source == "auto" or _is_http(source):
        return {"source": "download", **policy}
    path = Path(source).expanduser() if source else None
    if path is None or not path.exists():
        raise CarsTLError(
            f"--source {source!r} is not a known source and no such file or folder exists; valid: {SOURCE_CHOICES}",
            "cars-tl download --source auto  (or --source demo, --source https://host/folder, --source /path/to/stanford_cars)",
        )
    origin = {"source": "path", "path": str(path.resolve()), "splits": list(splits)}
    if test_labels is not None:
        origin["test_labels"] = str(Path(test_labels).expanduser().resolve())
    return {**origin, **policy}


def _satisfied(installed: dict, wanted: dict) -> bool:
    if installed.get("label_conflicts", "keep") != wanted.get("label_conflicts", "keep"):
        return False
    if wanted["source"] == "download":  # any real copy will do; only demo data is not the real thing
        return installed.get("source") != "demo"
    keys = ("source", "path", "test_labels")
    same = all(installed.get(k) == wanted.get(k) for k in keys)
    return same and list(installed.get("splits", data.SPLITS)) == list(wanted.get("splits", data.SPLITS))


def prepare_dataset(
    data_dir: Path,
    source: str,
    *,
    mirrors: Sequence[str] = (),
    mirror_list: Path | None = None,
    splits: Sequence[str] = data.SPLITS,
    test_labels: Path | None = None,
    verify: bool = False,
    label_conflicts: str = "keep",
    progress: Progress = NULL,
) -> tuple[data.Manifest, str]:
    """Put Stanford Cars into ``<data_dir>/stanford_cars`` and write its manifest.

    ``source``: ``auto`` (the mirror list), ``demo`` (generated), an http(s) mirror base URL, or a
    local folder/archive in any accepted layout (copied, never moved). ``splits=("train",)``
    imports a local copy's train split alone; ``test_labels`` supplies
    ``cars_test_annos_withlabels.mat`` to layouts without it. Returns the manifest and what was
    done: "already verified", "verified", "generated", "imported" or "downloaded". A dataset
    from the same source whose images' sizes and mtimes are as recorded makes this a fast
    no-op; ``verify`` re-hashes every image instead (SHA-256) and rebuilds the manifest.
    ``label_conflicts``: ``keep`` (the default) lists identical images with different labels in
    the manifest; ``drop`` leaves every member of such a group out (see :mod:`cars_tl.data`).
    Holds the writer lock of ``<data_dir>/stanford_cars`` throughout: a second download into
    the same folder fails at once, and what a killed one left behind is removed.
    """
    data_dir = Path(data_dir)
    root = data.stanford_root(data_dir)
    splits = layouts.check_splits(splits)
    if source in ("auto", "demo") or _is_http(source):
        if splits != data.SPLITS or test_labels is not None:
            raise CarsTLError(
                f"--splits and --test-labels apply to a local copy (--source PATH), not to --source {source}",
                "cars-tl download --source /path/to/your/copy --splits train",
            )
    wanted = _origin(source, splits, test_labels, data.check_label_conflicts(label_conflicts))
    _check_mirror_urls(mirrors)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with locks.writer_lock(root, "download"):
            return _prepare_locked(data_dir, root, source, wanted, mirrors, mirror_list, verify, progress)
    except locks.LockedError as exc:
        exc.hint = "wait for that process to finish (or stop it), or download into another folder with --data-dir DIR"
        raise
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        raise _storage_failure(exc, data_dir, wanted) from None
    except CarsTLError as exc:  # a full disk met while writing a manifest file (atomic_path's message)
        cause = exc.__context__
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL and not isinstance(exc, DownloadError):
            raise _storage_failure(cause, data_dir, wanted) from None
        raise


def _space_needed(wanted: dict) -> int | None:
    """Roughly how many bytes a download from ``wanted`` writes into the data folder (None: unknown)."""
    if wanted["source"] == "download":
        try:
            sizes = [entry.get("size") for entry in load_mirror_list()["files"].values()]
        except CarsTLError:
            return None
        return 2 * sum(sizes) if all(sizes) else None  # the archives, then the images extracted from them
    if wanted["source"] == "path":
        path = Path(wanted["path"])
        if path.is_file():
            try:
                return path.stat().st_size + uncompressed_size(path)
            except (CarsTLError, OSError):
                return None
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def _storage_failure(exc: OSError, data_dir: Path, wanted: dict) -> CarsTLError:
    """A full disk (or quota, read-only folder) while preparing the dataset, said in the data folder's terms."""
    where = data_dir.resolve()
    try:
        free = f"{shutil.disk_usage(where).free / 1e9:,.2f} GB free there"
    except OSError:
        free = "free space unknown"
    needed = _space_needed(wanted)
    need = (
        f"about {needed / 1e9:,.2f} GB needed"
        if needed
        else "the dataset needs about 2 GB (4 GB while its archives are kept)"
    )
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CarsTLError(
            f"cannot write the dataset into {where}: {reason} ({need}, {free})",
            f"free space on the disk holding {where}, or pass another --data-dir on a disk with room; "
            "then rerun the same cars-tl download (verified archives are kept)",
        )
    if exc.errno == errno.EFBIG:
        return CarsTLError(
            f"cannot write the dataset into {where}: {reason} (a file is larger than this process may write)",
            "raise the limit (ulimit -f unlimited), then rerun the same cars-tl download",
        )
    return CarsTLError(
        f"cannot write the dataset into {where}: {reason}", f"make {where} writable, or pass another --data-dir"
    )


def _prepare_locked(
    data_dir, root, source, wanted, mirrors, mirror_list, verify, progress
) -> tuple[data.Manifest, str]:
    installed = data.read_origin(root)
    satisfied = root.is_dir() and _satisfied(installed, wanted)
    if satisfied and not verify and data.manifest_is_current(data_dir):
        return data.load_manifest(data_dir), "already verified"
    policy = wanted.get("label_conflicts", "keep")
    if satisfied and verify and root.is_dir():
        try:  # the files are in place: hashing them all is the verification
            return data.build_manifest(data_dir, label_conflicts=policy, progress=progress), "verified"
        except CarsTLError:
            pass  # fetch or import a fresh copy below
    if wanted["source"] == "demo":
        return _build(data_dir, wanted, lambda stage: generate_demo(stage), progress), "generated"
    if wanted["source"] == "path":

        def fill(stage: Path) -> layouts.Imported:
            test_labels = Path(wanted["test_labels"]) if wanted.get("test_labels") else None
            command = f"cars-tl download --data-dir {shlex.quote(str(data_dir))} --source {shlex.quote(wanted['path'])}"
            return layouts.import_path(
                Path(wanted["path"]),
                stage,
                stage.parent,
                test_labels=test_labels,
                splits=wanted["splits"],
                command=command,
                progress=progress,
            )

        return _build(data_dir, wanted, fill, progress), "imported"

    spec = load_mirror_list(mirror_list)
    invalid = None
    if layouts.devkit_parts(root) and installed["source"] != "demo":
        try:  # placed by hand: a valid copy needs only its manifest
            return data.build_manifest(data_dir, label_conflicts=policy, progress=progress), "verified"
        except CarsTLError as exc:
            invalid = exc
    bases = [("--mirror", m) for m in mirrors]
    if source == "auto":
        bases += [(_mirror_label(m), m["base_url"]) for m in spec["mirrors"]]
    else:
        bases.append(("--source", source))
    downloads = data_dir / DOWNLOADS_DIR

    def fetch(stage: Path) -> layouts.Imported:
        _fetch_split_files(bases, spec["files"], downloads, progress)
        return layouts.import_split_archives(downloads, stage, stage.parent, progress=progress)

    try:
        manifest = _build(data_dir, wanted, fetch, progress)
        for name in SPLIT_FILES:  # the dataset is in place; its archives are redundant
            (downloads / name).unlink(missing_ok=True)
    except CarsTLError as exc:
        if invalid is None:
            raise
        raise CarsTLError(f"{invalid.message}\nfetching a fresh copy failed too: {exc.message}", exc.hint) from None
    finally:
        with contextlib.suppress(OSError):
            downloads.rmdir()  # only when empty: after a failure, verified archives (and .part files) stay for the next try
    return manifest, "downloaded"


def _build(
    data_dir: Path, origin: dict, fill: Callable[[Path], layouts.Imported | None], progress: Progress
) -> data.Manifest:
    """Fill a fresh ``stanford_cars`` in a temporary folder of ``data_dir``, validate, swap in.

    The temporary folder is ``.stanford_cars.tmp-*``: a killed run's is removed by the next
    run's :func:`cars_tl.core.locks.clean_stale`. The previous dataset stays in place until the new one
    has passed validation, and is kept as ``.stanford_cars.old-*`` during the swap.
    """
    target = data.stanford_root(data_dir)
    work = Path(tempfile.mkdtemp(prefix=f".{data.STANFORD_DIR}.tmp-", dir=data_dir))
    try:
        stage = work / data.STANFORD_DIR
        imported = fill(stage) or layouts.Imported("torchvision")
        recorded = dict(origin, layout=imported.layout, boxes=imported.boxes, splits=list(imported.splits))
        (stage / data.ORIGIN_FILE).write_text(json.dumps(recorded))
        data.build_manifest(work, source_names=imported.sources, shown_data_dir=data_dir, progress=progress)
        swap_in(stage, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return data.load_manifest(data_dir)


# --------------------------------------------------------------------------- weights


def download_weights(
    model_name: str, *, variant: str | None = None, mirrors: Sequence[str] = (), progress: Progress = NULL
) -> Path:
    """Fetch ImageNet weights of a torchvision classification model into the hub cache.

    ``model_name`` may name the weights enum too (``resnet50:IMAGENET1K_V1``), or ``variant`` does;
    without either, the model's DEFAULT weights. The file lands where torch.hub looks
    (``$TORCH_HOME/hub/checkpoints``), checked against the SHA-256 prefix in its name.
    ``mirrors`` (base URLs) are tried before the official URL.
    """
    import torch.hub
    import torchvision.models

    _check_mirror_urls(mirrors)
    if ":" in model_name:
        model_name, named = model_name.split(":", 1)
        if variant and variant != named:
            raise CarsTLError(
                f"--weights {model_name}:{named} and --variant {variant} disagree",
                f"cars-tl download --weights {model_name}:{named}",
            )
        variant = named
    valid = torchvision.models.list_models(module=torchvision.models)
    if model_name.lower() not in valid:
        examples = [n for n in _WELL_KNOWN_MODELS if n in valid] or valid[:8]
        raise CarsTLError(
            f"unknown torchvision classification model {model_name!r}; valid names include "
            f"{', '.join(examples)} ({len(valid)} in all, see torchvision.models.list_models())",
            "cars-tl download --weights resnet50",
        )
    enum = torchvision.models.get_model_weights(model_name.lower())
    if variant in (None, "", "DEFAULT", "imagenet"):
        chosen = enum.DEFAULT
    else:
        try:
            chosen = enum[variant]
        except KeyError:
            names = [w.name for w in enum]
            raise CarsTLError(
                f"{model_name} has no weights {variant!r}; valid: {', '.join(names)} (DEFAULT is {enum.DEFAULT.name})",
                f"cars-tl download --weights {model_name}:{names[0]}",
            ) from None
    url = chosen.url
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
        f"could not download the {model_name} weights {chosen.name} ({filename}):\n" + "\n".join(failures),
        f"download {url} by hand and place it at {dest} (torch.hub's cache; set TORCH_HOME to move it), "
        f"or pass --mirror URL of a folder holding {filename}",
    )
