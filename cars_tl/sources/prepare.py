"""Getting the Stanford Cars dataset into place: :func:`prepare_dataset`.

:func:`prepare_dataset` puts the dataset into ``<data-dir>/stanford_cars/`` (torchvision's layout)
from generated demo data, a local folder or archive in any layout of :mod:`cars_tl.sources.layouts`, or
HTTP mirrors (:mod:`cars_tl.sources.mirrors`), and writes its manifest. It holds the data folder's writer
lock throughout (:func:`cars_tl.core.locks.writer_lock`; leftovers of a killed run are removed on the next
one). The folder appears only complete: everything is built and validated in a temporary folder inside
``<data-dir>`` and swapped into place at the end (:func:`cars_tl.core.atomic.swap_in`). A full disk is
reported in the data folder's terms (where, how much is needed and free).

Nothing here prints, and nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shlex
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from cars_tl.core import locks
from cars_tl.core.atomic import format_size, swap_in
from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import NULL, Progress
from cars_tl.data import devkit
from cars_tl.data import manifest as manifests
from cars_tl.data.label_conflicts import check_label_conflicts
from cars_tl.sources import layouts
from cars_tl.sources.archives import uncompressed_size
from cars_tl.sources.demo import generate_demo
from cars_tl.sources.http import DISK_FULL, DownloadError
from cars_tl.sources.layouts import SPLIT_FILES
from cars_tl.sources.mirrors import check_mirror_urls, fetch_split_files, is_http, load_mirror_list, mirror_label

DOWNLOADS_DIR = "stanford_cars_downloads"  # verified archives wait here between tries
SOURCE_CHOICES = "auto, demo, an http(s):// mirror URL, or an existing folder or archive"


def _origin(source: str, splits: tuple[str, ...], test_labels: Path | None, label_conflicts: str = "keep") -> dict:
    """Where ``source`` takes the data from, as recorded in ``manifests.ORIGIN_FILE``; rejects bad sources."""
    policy = {} if label_conflicts == "keep" else {"label_conflicts": label_conflicts}
    if source == "demo":
        return {"source": "demo", **policy}
    if source == "auto" or is_http(source):
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
    return same and list(installed.get("splits", devkit.SPLITS)) == list(wanted.get("splits", devkit.SPLITS))


def prepare_dataset(
    data_dir: Path,
    source: str,
    *,
    mirrors: Sequence[str] = (),
    mirror_list: Path | None = None,
    splits: Sequence[str] = devkit.SPLITS,
    test_labels: Path | None = None,
    verify: bool = False,
    label_conflicts: str = "keep",
    progress: Progress = NULL,
) -> tuple[manifests.Manifest, str]:
    """Put Stanford Cars into ``<data_dir>/stanford_cars`` and write its manifest.

    ``source``: ``auto`` (the mirror list), ``demo`` (generated), an http(s) mirror base URL, or a
    local folder/archive in any accepted layout (copied, never moved). ``splits=("train",)``
    imports a local copy's train split alone; ``test_labels`` supplies
    ``cars_test_annos_withlabels.mat`` to layouts without it. Returns the manifest and what was
    done: "already verified", "verified", "generated", "imported" or "downloaded". A dataset
    from the same source whose images' sizes and mtimes are as recorded makes this a fast
    no-op; ``verify`` re-hashes every image instead (SHA-256) and rebuilds the manifest.
    ``label_conflicts``: ``keep`` (the default) lists identical images with different labels in
    the manifest; ``drop`` leaves every member of such a group out (see :mod:`cars_tl.data.manifest`).
    Holds the writer lock of ``<data_dir>/stanford_cars`` throughout: a second download into
    the same folder fails at once, and what a killed one left behind is removed.
    """
    data_dir = Path(data_dir)
    root = devkit.stanford_root(data_dir)
    splits = layouts.check_splits(splits)
    if source in ("auto", "demo") or is_http(source):
        if splits != devkit.SPLITS or test_labels is not None:
            raise CarsTLError(
                f"--splits and --test-labels apply to a local copy (--source PATH), not to --source {source}",
                "cars-tl download --source /path/to/your/copy --splits train",
            )
    wanted = _origin(source, splits, test_labels, check_label_conflicts(label_conflicts))
    check_mirror_urls(mirrors)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with locks.writer_lock(root, "download"):
            return _prepare_locked(data_dir, root, source, wanted, mirrors, mirror_list, verify, progress)
    except locks.LockedError as exc:
        exc.hint = "wait for that process to finish (or stop it), or download into another folder with --data-dir DIR"
        raise
    except locks.LockUnavailableError as exc:
        # A read-only data folder: nothing can replace it from here, so a copy that verifies needs no lock.
        if not verify and _satisfied(manifests.read_origin(root), wanted) and manifests.manifest_is_current(data_dir):
            return manifests.load_manifest(data_dir), "already verified"
        cause = exc.__context__
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:
            raise _storage_failure(cause, data_dir, wanted) from None
        raise
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise _storage_failure(exc, data_dir, wanted) from None
    except CarsTLError as exc:  # a full disk met while writing a manifest file (atomic_path's message)
        cause = exc.__context__
        if isinstance(cause, OSError) and cause.errno in DISK_FULL and not isinstance(exc, DownloadError):
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
        free = f"{format_size(shutil.disk_usage(where).free)} free there"
    except OSError:
        free = "free space unknown"
    needed = _space_needed(wanted)  # None (e.g. generated demo data): no figure is made up
    space = f"about {format_size(needed)} needed, {free}" if needed else free
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CarsTLError(
            f"cannot write the dataset into {where}: {reason} ({space})",
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
) -> tuple[manifests.Manifest, str]:
    installed = manifests.read_origin(root)
    satisfied = root.is_dir() and _satisfied(installed, wanted)
    if satisfied and not verify and manifests.manifest_is_current(data_dir):
        return manifests.load_manifest(data_dir), "already verified"
    policy = wanted.get("label_conflicts", "keep")
    if satisfied and verify and root.is_dir():
        try:  # the files are in place: hashing them all is the verification
            return manifests.build_manifest(data_dir, label_conflicts=policy, progress=progress), "verified"
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
            return manifests.build_manifest(data_dir, label_conflicts=policy, progress=progress), "verified"
        except CarsTLError as exc:
            invalid = exc
    bases = [("--mirror", m) for m in mirrors]
    if source == "auto":
        bases += [(mirror_label(m), m["base_url"]) for m in spec["mirrors"]]
    else:
        bases.append(("--source", source))
    downloads = data_dir / DOWNLOADS_DIR

    def fetch(stage: Path) -> layouts.Imported:
        fetch_split_files(bases, spec["files"], downloads, progress)
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
) -> manifests.Manifest:
    """Fill a fresh ``stanford_cars`` in a temporary folder of ``data_dir``, validate, swap in.

    The temporary folder is ``.stanford_cars.tmp-*``: a killed run's is removed by the next
    run's :func:`cars_tl.core.locks.clean_stale`. The previous dataset stays in place until the new one
    has passed validation, and is kept as ``.stanford_cars.old-*`` during the swap.
    """
    target = devkit.stanford_root(data_dir)
    work = Path(tempfile.mkdtemp(prefix=f".{devkit.STANFORD_DIR}.tmp-", dir=data_dir))
    try:
        stage = work / devkit.STANFORD_DIR
        imported = fill(stage) or layouts.Imported("torchvision")
        recorded = dict(origin, layout=imported.layout, boxes=imported.boxes, splits=list(imported.splits))
        if imported.subfolder:  # the dataset below --source (or inside its archive) that was imported
            recorded["subfolder"] = imported.subfolder
        (stage / manifests.ORIGIN_FILE).write_text(json.dumps(recorded))
        manifests.build_manifest(work, source_names=imported.sources, shown_data_dir=data_dir, progress=progress)
        swap_in(stage, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifests.load_manifest(data_dir)
