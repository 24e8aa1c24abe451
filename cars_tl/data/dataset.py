"""The map-style Dataset over a manifest's split (a ``torch.utils.data.DataLoader`` accepts it as it
is; nothing here imports torch) and the collation that carries unreadable images through a batch
as :class:`BadItem` marks instead of stopping (``--skip-bad``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from cars_tl.core.errors import BadImageError, CarsTLError
from cars_tl.data.images import crop_box, open_image
from cars_tl.data.manifest import Manifest, describe_origin


@dataclasses.dataclass(frozen=True)
class BadItem:
    """What a ``mark_bad`` dataset yields for an unreadable image (picklable across workers)."""

    position: int
    path: str
    reason: str

    def error(self) -> BadImageError:
        return BadImageError(self.path, self.reason)


class CarsDataset:
    """Map-style dataset over one split of a manifest: yields ``(image, label, position)``.

    ``transform`` turns a PIL RGB image into a tensor (take it from the backbone). ``crop="box"``
    crops the annotated box (plus ``margin``) first. An unreadable image raises
    :class:`BadImageError`; with ``mark_bad`` it yields a :class:`BadItem` instead, so that the
    caller (in the main process, whatever its DataLoader workers) decides: skip it, or raise
    ``item.error()``. :func:`collate_marking_bad` collates such batches.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        transform: Callable | None = None,
        crop: str = "full",
        margin: float = 0.0,
        mark_bad: bool = False,
    ):
        # crop and margin come checked (cars_tl.core.options.ImageOptions); the boxes are the dataset's.
        if crop == "box" and not manifest.has_boxes:
            raise CarsTLError(
                f"--crop box needs bounding boxes, and the dataset at {manifest.root} has none "
                f"({describe_origin(manifest.origin)}: that layout carries no boxes)",
                "use --crop full, or import a copy with boxes (the devkit, or class folders with anno_train.csv/anno_test.csv): cars-tl download --source PATH",
            )
        self.manifest = manifest
        self.records = manifest.split(split)
        self.transform = transform
        self.crop = crop
        self.margin = margin
        self.mark_bad = mark_bad

    def __len__(self) -> int:
        return len(self.records)

    def load(self, position: int):
        record = self.records[position]
        image = open_image(self.manifest.root / record.path)
        if self.crop == "box":
            image = crop_box(image, record.box, self.margin)
        return image

    def __getitem__(self, position: int):
        try:
            image = self.load(position)
        except BadImageError as exc:
            if self.mark_bad:
                return BadItem(position, exc.path, exc.reason)
            raise
        if self.transform is not None:
            image = self.transform(image)
        return image, self.records[position].label, position


def collate_marking_bad(batch):
    """Collate a ``mark_bad`` dataset's batch into ``(images, labels, positions, bad_items)``."""
    import torch
    from torch.utils.data import default_collate

    bad = [item for item in batch if isinstance(item, BadItem)]
    kept = [item for item in batch if not isinstance(item, BadItem)]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad
    return (*default_collate(kept), bad)


def raise_bad(bad: list) -> None:
    """Raise the first unreadable image of a batch (for stages that do not skip them)."""
    if bad:
        raise bad[0].error()
