"""The option groups that travel together, each a frozen record checked once, in its constructor.

:class:`ImageOptions` (``--crop``, ``--margin``, ``--image-size``, ``--resize``) and :class:`DeviceOptions`
(``--device``, ``--precision``, ``--workers``, ``--batch-size``): the CLI builds them from its options, a Python
caller builds them alike, and the stages take them; nothing below the stages checks these values again, since
a record cannot be built with a bad one. Field names are the CLI's option names (``dataclasses.asdict`` of a
record is what the user passed). The device string itself is checked where it is resolved
(:func:`cars_tl.core.runtime.resolve_device`: ``cuda:N`` needs the machine's device count).

Standard library only: the CLI's ``--help`` imports nothing that imports torch.
"""

from __future__ import annotations

import dataclasses
import json

from cars_tl.core.errors import CarsTLError, check_number

CROPS = ("full", "box")
RESIZE_MODES = ("crop", "squash", "pad")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MIN_IMAGE_SIZE = 32  # below this the backbones' strided stems leave (next to) nothing to pool

# Above this one image tensor alone is over 12 MB and a batch's activations many GB (--image-size 100000 asked
# for a 120 GB allocation): 4.5x the weights' own 224, past the resolution of most Stanford Cars photos.
MAX_IMAGE_SIZE = 1024
FROZEN_BATCH_SIZE = 64  # a frozen pass's batch (extract-features, build-trunk) when batch_size is None


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """What an image stage reads of each image: ``crop`` full | box (the annotated box, widened by ``margin``
    per side), the final side ``image_size`` in pixels and the ``resize`` mode (None for either: the
    preset's, :func:`cars_tl.stages.presets.image_options`; an image_size still None after it: the weights')."""

    crop: str = "full"
    margin: float = 0.0
    image_size: int | None = None
    resize: str | None = None

    def __post_init__(self):
        if self.crop not in CROPS:
            raise CarsTLError(
                f"unknown --crop {self.crop!r}; valid: {', '.join(CROPS)}",
                "--crop full (the whole image) or --crop box (the annotated box, see --margin)",
            )
        margin = check_number("--margin", self.margin, minimum=0, hint="e.g. --margin 0.1 (10% of the box per side)")
        object.__setattr__(self, "margin", float(margin))
        if self.resize is not None and self.resize not in RESIZE_MODES:
            raise CarsTLError(
                f"unknown --resize {self.resize!r}; valid: {', '.join(RESIZE_MODES)}",
                "--resize crop (the weights' resize + center crop, the study's), squash or pad",
            )
        if self.image_size is not None and not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise CarsTLError(
                f"--image-size must be at least {MIN_IMAGE_SIZE} and at most {MAX_IMAGE_SIZE} pixels, got {self.image_size}",
                "omit it for the weights' own size (224 for most), or pass e.g. --image-size 288",
            )


@dataclasses.dataclass(frozen=True)
class DeviceOptions:
    """Where and how a stage computes: ``device`` (auto | cpu | cuda | cuda:N), ``precision``, image
    loading ``workers`` (None: :func:`cars_tl.data.loaders.default_workers` for the device) and
    ``batch_size`` (None: the preset's, for the stages that have one; else :data:`FROZEN_BATCH_SIZE`)."""

    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    batch_size: int | None = FROZEN_BATCH_SIZE

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise CarsTLError(
                f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}",
                "--precision auto (bf16 where the hardware has it, else fp32)",
            )
        if self.workers is not None:
            check_workers(self.workers)
        if self.batch_size is not None:
            check_batch_size(self.batch_size)


def check_batch_size(batch_size: int) -> int:
    """``--batch-size``: images per batch here, feature rows per step in train-head (which takes no device)."""
    if batch_size < 1:
        raise CarsTLError(f"--batch-size must be positive, got {batch_size}", "e.g. --batch-size 32")
    return batch_size


def check_workers(workers: int) -> int:
    """``--workers``: here, and in the loaders for predict and calibrate (which take no device)."""
    if workers < 0:
        raise CarsTLError(
            f"--workers must be >= 0, got {workers}", "use 0 to load in the main thread, or a positive count"
        )
    return workers


# The transform spec (cars_tl.data.transforms) records the final square's side in pixels as "side"; versions
# before recorded it as "crop", a name --crop (full | box) also has. Torch-free here: names read it.
SIDE = "side"


def side(spec: dict) -> int:
    """The final square's side in pixels, from a spec of this version or an older one (``crop``)."""
    return int(spec[SIDE] if SIDE in spec else spec["crop"])


def legacy_spec(spec: dict) -> dict:
    """``spec`` as versions before ``side`` recorded it: default file names hash this form, so they stay
    the names earlier versions gave the same preprocessing (caches made before are found, not redone)."""
    return {"crop" if k == SIDE else k: v for k, v in spec.items()}


def normalized_spec(spec: dict) -> dict:
    """``spec`` as this version writes it: the defaults of older recordings made explicit (no ``mode``:
    crop) and their names updated (the side was ``crop``)."""
    spec = {SIDE if k == "crop" and SIDE not in spec else k: v for k, v in spec.items()}
    return dict(spec, mode=spec.get("mode", "crop"))


def transform_key(spec: dict) -> str:
    """One string per preprocessing: equal keys, equal tensors (older specs normalized first)."""
    return json.dumps(normalized_spec(spec), sort_keys=True)


def same_transform(a: dict, b: dict) -> bool:
    return transform_key(a) == transform_key(b)
