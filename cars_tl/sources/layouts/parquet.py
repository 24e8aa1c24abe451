"""Hugging Face parquet shards: ``data/train-*.parquet``, ``data/test-*.parquet`` (columns ``image`` {bytes, path}
and ``label``; names from the shard's features metadata or the dataset card ``README.md``), matched to the
canonical 196 names; images written as their original bytes, every box the full image (``boxes: false``).
Needs the ``parquet`` extra (pyarrow, imported only when importing)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import Progress
from cars_tl.data import devkit
from cars_tl.sources.classnames import canonical_names, match_to_canonical
from cars_tl.sources.layouts.base import Imported, Layout, Source, image_size


def _parquet_shards(folder: Path) -> dict | None:
    for where in (folder / "data", folder):
        shards = {s: sorted(where.glob(f"{s}-*.parquet")) + sorted(where.glob(f"{s}.parquet")) for s in devkit.SPLITS}
        if shards["train"]:
            return {"dir": where, "shards": shards}
    return None


def _card_names(card: Path) -> list[str] | None:
    """Class names from a dataset card's YAML header (``class_label: names: '0': ...``)."""
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    names: dict[int, str] = {}
    inside = False
    for line in text.splitlines():
        if re.match(r"^\s*names:\s*$", line):
            inside, names = True, {}
            continue
        match = re.match(r"""^\s+['"]?(\d+)['"]?\s*:\s*(.*?)\s*$""", line) if inside else None
        if match:
            value = match.group(2)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1].replace("''", "'") if value[0] == "'" else json.loads(value)
            names[int(match.group(1))] = value
        elif inside and names:
            break
    if not names or sorted(names) != list(range(len(names))):
        return None
    return [names[i] for i in range(len(names))]


def _shard_names(schema) -> list[str] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        info = json.loads(meta)
        features = info.get("info", info).get("features", {})
        names = features["label"]["names"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def _image_suffix(blob: bytes, path: str | None) -> str:
    if blob[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if blob[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    suffix = Path(path or "").suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ".img"


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CarsTLError(
            "reading Hugging Face parquet shards needs pyarrow, which is not installed",
            "pip install 'cars_tl[parquet]'   (or: pip install pyarrow), then rerun the same cars-tl download",
        ) from None
    return pq


def _import_parquet(folder: Path, stage: Path, work: Path, src: Source, progress: Progress) -> Imported:
    pq = _pyarrow_parquet()
    found = _parquet_shards(folder)
    assert found is not None
    shards = found["shards"]
    if "test" in src.splits and not shards["test"]:
        raise CarsTLError(
            f"{src.name(found['dir'])} has train-*.parquet shards but no test-*.parquet",
            "add the test shards, or import with --splits train",
        )
    files = {split: {shard: pq.ParquetFile(shard) for shard in shards[split]} for split in src.splits}
    names, names_from = None, None
    for split_files in files.values():
        for shard, pf in split_files.items():
            missing = [c for c in ("image", "label") if c not in pf.schema_arrow.names]
            if missing:
                raise CarsTLError(
                    f"parquet shard {src.name(shard)} has no {' or '.join(missing)} column (it has: {', '.join(pf.schema_arrow.names)})",
                    "use the shards of a Stanford Cars image-classification dataset (columns image and label)",
                )
            if names is None and (shard_names := _shard_names(pf.schema_arrow)):
                names, names_from = shard_names, f"the features metadata of {src.name(shard)}"
    if names is None:
        for card in (folder / "README.md", found["dir"] / "README.md", found["dir"].parent / "README.md"):
            if card.is_file() and (card_names := _card_names(card)):
                names, names_from = card_names, src.name(card)
                break
    if names is None:
        raise CarsTLError(
            f"no class names for the parquet shards in {src.name(found['dir'])}: neither the shards' features metadata "
            "nor a dataset card README.md (class_label names) beside them lists them",
            "put the dataset's README.md (its card, as huggingface-cli download leaves it) beside the data/ folder",
        )
    labels = match_to_canonical(names, names_from)
    rows: dict[str, list[dict]] = {}
    sources: dict[str, str] = {}
    for split in src.splits:
        out = stage / devkit.IMAGE_DIRS[split]
        out.mkdir(parents=True)
        rows[split] = []
        total = sum(pf.metadata.num_rows for pf in files[split].values())
        with progress.task(f"import {split} parquet", total=total, unit="img") as task:
            for shard, pf in files[split].items():
                row_number = 0
                for batch in pf.iter_batches(batch_size=64, columns=["image", "label"]):
                    for image, label in zip(batch.column("image").to_pylist(), batch.column("label").to_pylist()):
                        where = f"{src.name(shard)} row {row_number}"
                        row_number += 1
                        blob = image.get("bytes") if isinstance(image, dict) else image
                        if not isinstance(blob, (bytes, bytearray)) or not blob:
                            raise CarsTLError(
                                f"{where}: the image has no bytes",
                                "use shards that embed the images (huggingface-cli download of the dataset)",
                            )
                        if not isinstance(label, int) or not 0 <= label < len(names):
                            raise CarsTLError(
                                f"{where}: label {label!r} is outside 0..{len(names) - 1} of {names_from}",
                                "use intact shards",
                            )
                        fname = f"{len(rows[split]) + 1:05d}{_image_suffix(blob, image.get('path') if isinstance(image, dict) else None)}"
                        (out / fname).write_bytes(blob)  # the original bytes, never re-encoded
                        width, height = image_size(out / fname, where)
                        rows[split].append(
                            {"fname": fname, "box": (1, 1, width, height), "label": labels[names[label]]}
                        )
                        sources[f"{devkit.IMAGE_DIRS[split]}/{fname}"] = where
                        task.advance(1)
    devkit.write_devkit(stage, canonical_names(), rows["train"], rows.get("test"))
    return Imported("parquet", False, src.splits, sources)


LAYOUT = Layout(
    "parquet",
    "Hugging Face shards data/train-*.parquet and data/test-*.parquet (image, label; needs pyarrow)",
    "Hugging Face data/train-*.parquet shards",
    lambda folder: _parquet_shards(folder) is not None,
    _import_parquet,
)
