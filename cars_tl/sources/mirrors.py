"""Where the split files come from: the mirror list (``mirrors.json`` beside this module), its labels,
URL checks, and fetching the four split files from the first mirror that serves each.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import Progress
from cars_tl.sources.http import DownloadError, download_file
from cars_tl.sources.layouts import SPLIT_FILES

MIRRORS_JSON = Path(__file__).with_name("mirrors.json")


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
    if not isinstance(mirrors, list) or not all(isinstance(m, dict) and is_http(m.get("base_url")) for m in mirrors):
        problems.append("'mirrors' must be a list of objects with an http(s) 'base_url'")
    if problems:
        raise CarsTLError(f"mirror list {path} is malformed: {'; '.join(problems)}", fix)
    return spec


def is_http(url) -> bool:
    return isinstance(url, str) and urllib.parse.urlsplit(url).scheme in ("http", "https") and "://" in url


def mirror_label(mirror: dict) -> str:
    """The mirror's name and the first sentence of its note (e.g. that it is dead) for errors."""
    note = str(mirror.get("note") or "").split(". ")[0].rstrip(".")
    name = mirror.get("name") or mirror["base_url"]
    return f"{name} ({note})" if note else name


def check_mirror_urls(mirrors: Sequence[str]) -> None:
    bad = [m for m in mirrors if not is_http(m)]
    if bad:
        raise CarsTLError(
            f"--mirror {bad[0]!r} is not an http(s):// URL",
            "pass --mirror https://host/folder (the folder holding the files)",
        )


def fetch_split_files(bases: list[tuple[str, str]], files: dict, folder: Path, progress: Progress) -> None:
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
