"""One URL onto disk over HTTP: :func:`download_file` and :class:`DownloadError`.

:func:`download_file` streams a URL to disk with resume (HTTP Range), retries with backoff,
HTML-page detection and size/MD5/SHA-256 checks. Nothing here prints or knows about Stanford Cars;
:mod:`cars_tl.sources.mirrors` and :mod:`cars_tl.sources.weights` call it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import NULL, Progress

CHUNK = 1 << 20
USER_AGENT = "cars-tl/0.1 (python urllib)"
RECONNECT_TRIES = 3  # a refused connection after bytes arrived: the server may be restarting
DISK_FULL = {
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
                if isinstance(exc, OSError) and exc.errno in DISK_FULL:
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
