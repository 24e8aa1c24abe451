"""Pixels in, tensors out: the transform spec every artifact records (``mode``: crop | squash | pad,
``resize``, ``side``: the final square's side in pixels, recorded as ``crop`` before this version and read
either way by :func:`cars_tl.core.options.side`; ``mean``/``std``, ``interpolation``) and the transforms built from it, for evaluation (resize + center crop, squash or pad, fused in one
step) and for training (the augmentations), plus :class:`PixelNormalizer` for uint8 batches normalized
after the transfer to the device."""

from __future__ import annotations

import math

import numpy as np
import torch

from cars_tl.core import options
from cars_tl.core.errors import CarsTLError

# The spec's side and its normal form are declared torch-free (names and the caches' identities use them).
from cars_tl.core.options import SIDE, legacy_spec, normalized_spec, same_transform, side, transform_key  # noqa: F401

FUSED_PIPELINE = "resize-crop-in-one-v1"  # recorded in transform specs: see eval_transform
# --resize, declared with the other image options (cars_tl.core.options checks them).
RESIZE_MODES = options.RESIZE_MODES

# Training crops for squash/pad (see train_transform): area fraction of the image kept, and the
# crop's aspect ratio relative to the image's own (log-uniform), so a wide car stays wide.
TRAIN_CROP_SCALE = (0.5, 1.0)
TRAIN_CROP_RELATIVE_RATIO = (3 / 4, 4 / 3)


def with_image_options(spec: dict, image_size: int | None, resize_mode: str, crop_pct: float | None = None) -> dict:
    """``spec`` at final side ``image_size`` (None: the weights' own) in ``resize_mode`` (checked by
    :class:`cars_tl.core.options.ImageOptions`)."""
    spec = normalized_spec(spec)
    if image_size:
        resize = math.floor(image_size / crop_pct) if crop_pct else int(round(image_size * spec["resize"] / side(spec)))
        spec.update({"resize": int(resize), SIDE: int(image_size)})
    if resize_mode != "crop":
        spec.pop("crop_mode", None)  # timm's center-crop variants belong to the crop mode
        spec["resize"] = side(spec)  # the whole image goes to the final side
    spec["mode"] = resize_mode
    return spec


class ResizeCenterCrop:
    """torchvision's ``Resize(resize)`` then ``CenterCrop(crop)`` as one PIL call on the crop's box.

    The same sample positions and filter, without resampling the pixels the crop throws away:
    about half the preprocessing cost per image here, within 2 grey levels of the two-step result
    (tested). A class, not a closure, so DataLoader workers can pickle it.
    """

    def __init__(self, resize: int, crop: int, interpolation: str):
        self.resize, self.crop, self.interpolation = resize, crop, interpolation

    def __call__(self, image):
        from PIL import Image

        w, h = image.size
        size, crop = self.resize, self.crop
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)  # Resize(int)'s rounding
        if crop > min(nw, nh):  # CenterCrop would pad: keep the two-step path for this rare case
            from torchvision import transforms as T

            mode = T.InterpolationMode(self.interpolation)
            return T.CenterCrop(crop)(T.Resize(size, interpolation=mode, antialias=True)(image))
        left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))  # CenterCrop's offsets
        sx, sy = w / nw, h / nh
        resample = Image.Resampling[self.interpolation.upper()]
        return image.resize((crop, crop), resample, box=(left * sx, top * sy, (left + crop) * sx, (top + crop) * sy))


class SquareResize:
    """A region of the image (default: all of it) to ``size`` square in one PIL resampling call.

    ``squash``: the region stretched to the square. ``pad``: the region scaled so its longer side
    is ``longest`` (default ``size``), centred on a ``size`` square of colour ``fill``; with
    ``longest > size`` what falls outside the square is cut (timm's ``border`` crop mode).
    Only the visible part of the region is resampled, in the one call; the paste copies.
    """

    def __init__(self, size: int, interpolation: str, how: str, fill=(0, 0, 0), longest: int | None = None):
        self.size, self.interpolation, self.how = size, interpolation, how
        self.fill, self.longest = tuple(fill), longest or size

    def __call__(self, image, region=None):
        from PIL import Image

        resample = Image.Resampling[self.interpolation.upper()]
        left, top, right, bottom = region or (0, 0, image.width, image.height)
        if self.how == "squash":
            return image.resize((self.size, self.size), resample, box=(left, top, right, bottom))
        w, h = right - left, bottom - top
        scale = self.longest / max(w, h)
        nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        # torchvision's conventions (timm's CenterCropOrPad): pad floor((S - n) / 2) before, crop round((n - S) / 2).
        ox, oy = ((self.size - n) // 2 if n <= self.size else -int(round((n - self.size) / 2.0)) for n in (nw, nh))
        # The part of the scaled region that lands on the canvas, and where it comes from.
        vx0, vy0 = max(0, -ox), max(0, -oy)
        vx1, vy1 = min(nw, self.size - ox), min(nh, self.size - oy)
        sx, sy = w / nw, h / nh
        visible = image.resize(
            (vx1 - vx0, vy1 - vy0), resample, box=(left + vx0 * sx, top + vy0 * sy, left + vx1 * sx, top + vy1 * sy)
        )
        if (vx1 - vx0, vy1 - vy0) == (self.size, self.size):
            return visible
        canvas = Image.new("RGB", (self.size, self.size), self.fill)
        canvas.paste(visible, (ox + vx0, oy + vy0))
        return canvas


class CenterSquash:
    """timm's ``crop_mode="squash"``: ``Resize((resize, resize))`` then ``CenterCrop(crop)``, as one
    PIL call on the source region the crop keeps."""

    def __init__(self, resize: int, crop: int, interpolation: str):
        self.resize, self.crop, self.interpolation = resize, crop, interpolation

    def __call__(self, image):
        from PIL import Image

        w, h = image.size
        offset = int(round((self.resize - self.crop) / 2.0))
        sx, sy = w / self.resize, h / self.resize
        box = (offset * sx, offset * sy, (offset + self.crop) * sx, (offset + self.crop) * sy)
        return image.resize((self.crop, self.crop), Image.Resampling[self.interpolation.upper()], box=box)


def resize_mode(spec: dict) -> str:
    """The spec's resize mode; specs recorded before modes existed mean ``crop``."""
    return spec.get("mode", "crop")


def mean_colour(spec: dict) -> tuple[int, int, int]:
    """The normalization mean as an RGB colour: padding that normalizes to zero."""
    return tuple(int(round(255 * m)) for m in spec["mean"])


def square_resize(spec: dict) -> SquareResize:
    """The ``squash`` or ``pad`` mode's region-to-square resize of ``spec``."""
    return SquareResize(side(spec), spec["interpolation"], resize_mode(spec), mean_colour(spec))


def eval_resize_crop(spec: dict):
    """The evaluation resize of ``spec``'s mode, PIL image to PIL image (``crop`` square), in one
    PIL resampling call (see the module docstring for the modes).

    Crop-mode specs made by this version carry ``pipeline`` and resize+crop in one step; specs
    recorded by older artifacts (no ``pipeline``) get the two-step transform they were made with.
    """
    from torchvision import transforms as T

    mode = resize_mode(spec)
    if mode not in RESIZE_MODES:
        raise CarsTLError(
            f"transform spec has an unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}",
            "re-extract the features (or rerun the stage) with this version of cars_tl",
        )
    if mode != "crop":
        return square_resize(spec)
    crop_mode = spec.get("crop_mode", "center")
    if crop_mode == "squash":
        return CenterSquash(spec["resize"], side(spec), spec["interpolation"])
    if crop_mode == "border":
        return SquareResize(side(spec), spec["interpolation"], "pad", mean_colour(spec), longest=spec["resize"])
    if spec.get("pipeline") == FUSED_PIPELINE:
        return ResizeCenterCrop(spec["resize"], side(spec), spec["interpolation"])
    return T.Compose(
        [
            T.Resize(spec["resize"], interpolation=T.InterpolationMode(spec["interpolation"]), antialias=True),
            T.CenterCrop(side(spec)),
        ]
    )


def eval_transform(spec: dict, output: str = "float"):
    """:func:`eval_resize_crop` (the spec's resize mode), to tensor, normalize: evaluation preprocessing.

    ``output="uint8"`` stops before normalizing (a uint8 CHW tensor): for loaders feeding a GPU,
    where :func:`cars_tl.data.loaders.batch_to_device` normalizes on the device. ``output="batch"``
    normalizes with :class:`PixelNormalizer`, the arithmetic of the evaluation loaders' batches
    (``ToTensor`` + ``Normalize`` round differently): one image gets the very values a cache's
    extraction gave it."""
    from torchvision import transforms as T

    if output == "batch":
        return T.Compose([eval_resize_crop(spec), _BatchPixels(spec)])
    return T.Compose([eval_resize_crop(spec), *_tensor_steps(spec, output)])


def _tensor_steps(spec: dict, output: str) -> list:
    from torchvision import transforms as T

    if output == "uint8":
        return [T.PILToTensor()]
    if output != "float":
        raise ValueError(f"output must be float or uint8, not {output!r}")
    return [T.ToTensor(), T.Normalize(spec["mean"], spec["std"])]


class PixelNormalizer:
    """``ToTensor`` + ``Normalize`` of :func:`eval_transform` on a uint8 HWC array, written into a
    float32 HWC slot: a row of a channels_last batch, filled without an intermediate tensor.

    numpy releases the GIL on arrays this size and stays single-threaded, so decode threads can
    normalize side by side without taking intra-op threads from the model. Each image row is
    treated as one flat run of ``width * 3`` values against a tiled mean/std row: numpy's inner
    loops then run over hundreds of values instead of 3 (7x faster here).
    """

    def __init__(self, spec: dict):
        self.offset = np.asarray(spec["mean"], np.float32) * 255
        self.scale = 1 / (np.asarray(spec["std"], np.float32) * 255)
        self._rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, pixels: np.ndarray, out: np.ndarray) -> None:
        height, width, channels = pixels.shape
        if not out.flags.c_contiguous:
            raise ValueError("PixelNormalizer writes into a C-contiguous HWC float32 slot")
        if width not in self._rows:
            self._rows[width] = (np.tile(self.offset, width), np.tile(self.scale, width))
        offset, scale = self._rows[width]
        flat_out = out.reshape(height, width * channels)
        np.subtract(pixels.reshape(height, width * channels), offset, out=flat_out)
        np.multiply(flat_out, scale, out=flat_out)


class _BatchPixels:
    """PIL RGB image -> normalized float32 CHW tensor (channels_last in memory), as
    :class:`cars_tl.data.loaders.ThreadedLoader` fills a batch row."""

    def __init__(self, spec: dict):
        self.normalize = PixelNormalizer(spec)

    def __call__(self, image) -> torch.Tensor:
        pixels = np.asarray(image)
        out = np.empty(pixels.shape, np.float32)
        self.normalize(pixels, out)
        return torch.from_numpy(out).permute(2, 0, 1)


class RandomRegionSquare:
    """Training crop for ``squash``/``pad``: a random region of the image -- ``scale`` of its area,
    aspect ratio ``relative_ratio`` times the image's own (log-uniform), placed uniformly -- then
    the mode's square resize, in one PIL call. Random numbers come from torch's generator, which
    finetune seeds per epoch."""

    def __init__(self, spec: dict, scale=TRAIN_CROP_SCALE, relative_ratio=TRAIN_CROP_RELATIVE_RATIO):
        self.resize, self.scale, self.relative_ratio = square_resize(spec), scale, relative_ratio

    def region(self, width: int, height: int) -> tuple[float, float, float, float]:
        area = float(torch.empty(1).uniform_(*self.scale))
        log_ratio = torch.empty(1).uniform_(math.log(self.relative_ratio[0]), math.log(self.relative_ratio[1]))
        ratio = math.exp(float(log_ratio))  # region aspect / image aspect
        # Region w/h = ratio * W/H and w*h = area*W*H: w = W*sqrt(area*ratio), h = H*sqrt(area/ratio).
        w = min(width, width * math.sqrt(area * ratio))
        h = min(height, height * math.sqrt(area / ratio))
        left = float(torch.rand(1)) * (width - w)
        top = float(torch.rand(1)) * (height - h)
        return left, top, left + w, top + h

    def __call__(self, image):
        return self.resize(image, self.region(image.width, image.height))


def train_transform(spec: dict, augment: str, output: str = "float"):
    """``none``: the evaluation preprocessing. ``standard``: a random crop fitting the resize mode,
    flip, light colour jitter. ``crop`` mode: ``RandomResizedCrop`` (area 0.25-1, torchvision's
    square-ish ratios), as before. ``squash``/``pad``: :class:`RandomRegionSquare` -- half the area
    or more, with the image's own aspect within 3/4-4/3, so a wide car is never cut to a square
    middle -- then the mode's square resize (what evaluation sees, slightly zoomed and shifted).
    ``output`` as in :func:`eval_transform`."""
    from torchvision import transforms as T

    if augment == "none":
        return eval_transform(spec, output)
    if augment != "standard":
        raise CarsTLError(f"unknown --augment {augment!r}; valid: none, standard")
    if resize_mode(spec) == "crop":
        crop = T.RandomResizedCrop(
            side(spec), scale=(0.25, 1.0), interpolation=T.InterpolationMode(spec["interpolation"]), antialias=True
        )
    else:
        crop = RandomRegionSquare(spec)
    return T.Compose(
        [
            crop,
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.2, 0.2, 0.2),
            *_tensor_steps(spec, output),
        ]
    )


def describe_transform(spec: dict) -> str:
    """A short human description for error messages, e.g. ``squash 288 px``."""
    mode = resize_mode(spec)
    detail = f"resize {spec['resize']} + center crop {side(spec)}" if mode == "crop" else f"{side(spec)} px"
    return f"{mode} ({detail})"
