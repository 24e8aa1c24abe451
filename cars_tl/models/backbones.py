"""Backbones and their preprocessing: the one place that builds networks.

A backbone is any torchvision classification model by name (``resnet50``), or ``timm/<name>`` when
timm is installed. Its classifier is replaced by an identity so the network returns the globally
pooled features (2048 for resnet50); :class:`ClassifierModel` puts a fresh ``Linear`` head back on.

Weights (``--weights``):

``imagenet``
    the library's default pretrained weights (torchvision: ``Weights.DEFAULT``), read from the torch
    cache only; a missing file is an error that gives the download command. A torchvision weights
    enum name (``IMAGENET1K_V1``: what the study's ``pretrained=True`` loaded) works too.
``random``
    a seeded random initialisation, so that every stage rebuilds the same network.
``PATH``
    a state dict, or a cars_tl checkpoint / run directory, loaded with ``weights_only=True``.

Preprocessing (the *transform spec*, recorded in every cache and run) comes from the weights --
resize, center crop, mean/std, interpolation; for timm models exactly timm's ``resolve_data_config``
(``floor(crop / crop_pct)``, its ``crop_mode``) -- and from the resize mode (``--resize``):

``crop`` (default; the study's setting)
    the weights' resize of the shorter side then a center crop of ``image_size`` (timm weights made
    with ``crop_mode`` squash or border get timm's own variant).
``squash``
    the whole image (or the box, with ``--crop box``) resized to ``image_size`` square, aspect not kept:
    nothing of a wide car is cut off.
``pad``
    the whole image letterboxed into ``image_size`` square on the normalization mean colour (zero
    after normalization), aspect kept.

``image_size`` is the final side in every mode (crop mode: the resize keeps the weights' ratio).
Specs recorded before resize modes existed (no ``mode``) mean ``crop``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cars_tl.core import atomic
from cars_tl.core.errors import CarsTLError

TIMM_PREFIX = "timm/"
FUSED_PIPELINE = "resize-crop-in-one-v1"  # recorded in transform specs: see eval_transform
RANDOM_SEED = 0
RESIZE_MODES = ("crop", "squash", "pad")
MIN_IMAGE_SIZE = 32  # below this the backbones' strided stems leave (next to) nothing to pool
# Above this one image tensor alone is over 12 MB and a batch's activations many GB (--image-size 100000 asked
# for a 120 GB allocation): 4.5x the weights' own 224, past the resolution of most Stanford Cars photos.
MAX_IMAGE_SIZE = 1024
# Training crops for squash/pad (see train_transform): area fraction of the image kept, and the
# crop's aspect ratio relative to the image's own (log-uniform), so a wide car stays wide.
TRAIN_CROP_SCALE = (0.5, 1.0)
TRAIN_CROP_RELATIVE_RATIO = (3 / 4, 4 / 3)


@dataclasses.dataclass
class Backbone:
    """A feature extractor: ``body(x)`` returns pooled features of width ``num_features``."""

    name: str
    weights: str
    weights_digest: str
    body: Any  # torch.nn.Module
    num_features: int
    transform: dict
    stages: list[str]
    classifier_name: str
    weights_file_sha256: str | None = None  # SHA-256 of the file the weights came from, if any

    def describe(self) -> dict:
        return {
            "backbone": self.name, "weights": self.weights, "weights_digest": self.weights_digest,
            "weights_file_sha256": self.weights_file_sha256, "num_features": self.num_features,
            "transform": self.transform,
        }


def state_digest(state: dict) -> str:
    """SHA-256 over a state dict's names, shapes, dtypes and bytes: the weights' identity."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# --------------------------------------------------------------------------- construction


def _is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _create(name: str, seed: int = RANDOM_SEED):
    """The bare network (1000-class head, initialised from ``seed``) and its default transform spec."""
    torch.manual_seed(seed)
    if _is_timm(name):
        try:
            import timm
        except ImportError:
            raise CarsTLError(
                f"backbone {name!r} needs timm, which is not installed", "pip install 'cars_tl[timm]'"
            ) from None
        arch = name[len(TIMM_PREFIX):]
        if arch not in timm.list_models():
            raise CarsTLError(f"unknown timm model {arch!r}", "see timm.list_models() for valid names, e.g. timm/efficientnet_lite0")
        model = timm.create_model(arch, pretrained=False)
        return model, timm_spec(model)
    import torchvision

    names = _torchvision_names()
    if name not in names:
        close = [n for n in names if name.split("_")[0][:4] in n][:8] or names[:8]
        raise CarsTLError(
            f"unknown backbone {name!r}", f"use a torchvision model name such as {', '.join(close)}, or timm/<name>"
        )
    model = torchvision.models.get_model(name, weights=None)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    return model, _transform_from_weights(weights)


def timm_spec(model) -> dict:
    """timm's own evaluation preprocessing for ``model`` (``resolve_data_config``), as a spec:
    resize ``floor(crop / crop_pct)`` as ``create_transform`` computes it, and its ``crop_mode``."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    crop, crop_pct = int(cfg["input_size"][-1]), float(cfg["crop_pct"])
    spec = {
        "resize": int(math.floor(crop / crop_pct)), "crop": crop, "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]], "interpolation": cfg["interpolation"], "pipeline": FUSED_PIPELINE,
        "mode": "crop",
    }
    if cfg.get("crop_mode", "center") != "center":
        spec["crop_mode"] = cfg["crop_mode"]  # squash | border: timm's variants of resize + center crop
    return spec


def _transform_from_weights(weights) -> dict:
    t = weights.transforms()
    return {
        "resize": int(t.resize_size[0]), "crop": int(t.crop_size[0]), "mean": [float(v) for v in t.mean],
        "std": [float(v) for v in t.std], "interpolation": t.interpolation.value, "pipeline": FUSED_PIPELINE,
        "mode": "crop",
    }


def _classifier_path(model, name: str) -> str:
    if _is_timm(name):
        return model.pretrained_cfg.get("classifier", "classifier")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CarsTLError(f"backbone {name!r} has no Linear classifier to replace")
    return linears[-1]


def _set_module(model, path: str, module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def _cache_file_for(weights) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _load_state(name: str, weights: str) -> tuple[dict, dict | None, Path]:
    """The state dict for ``weights`` and, for torchvision enums, that enum's transform spec."""
    if Path(weights).exists():
        path = Path(weights)
        return load_weights_file(path), None, path if path.is_file() else _run_model_file(path)
    if _is_timm(name):
        raise CarsTLError(
            f"--weights {weights!r} for {name}: timm weights come from the Hugging Face hub, which is not used offline",
            "download the state dict once and pass --weights PATH (a .pth state dict)",
        )
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    key = "DEFAULT" if weights == "imagenet" else weights
    try:
        chosen = enum[key] if key != "DEFAULT" else enum.DEFAULT
    except KeyError:
        valid = ["imagenet", "random", *[w.name for w in enum], "PATH"]
        raise CarsTLError(f"unknown weights {weights!r} for {name} (and no such file)", f"valid: {', '.join(valid)}") from None
    path = _cache_file_for(chosen)
    if not path.is_file():
        raise CarsTLError(
            f"ImageNet weights for {name} ({chosen}) are not in the torch cache: {path} is missing",
            f"cars-tl download --weights {name}:{chosen.name}   (offline: put {Path(chosen.url).name} from {chosen.url} at {path})",
        )
    return torch.load(path, map_location="cpu", weights_only=True), _transform_from_weights(chosen), path


def _run_model_file(run_dir: Path) -> Path:
    from cars_tl.artifacts import runs

    return runs.model_file(run_dir)


def load_weights_file(path: Path) -> dict:
    """A state dict from a plain ``.pth``, a cars_tl checkpoint, or a run directory's model."""
    path = Path(path)
    if path.is_dir():
        path = _run_model_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CarsTLError(
            f"cannot load weights from {path}: {str(exc).splitlines()[0][:300]}",
            "pass a state dict saved with torch.save(model.state_dict(), path) or a cars_tl run directory",
        ) from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise CarsTLError(f"{path} is not a state dict (a mapping of names to tensors)")
    if any(k.startswith("body.") for k in obj):  # a cars_tl ClassifierModel: keep the body
        obj = {k[len("body."):]: v for k, v in obj.items() if k.startswith("body.")}
    return obj


def check_image_options(image_size: int | None, resize_mode: str) -> None:
    if resize_mode not in RESIZE_MODES:
        raise CarsTLError(f"unknown --resize {resize_mode!r}; valid: {', '.join(RESIZE_MODES)}",
                          "--resize crop (the weights' resize + center crop, the study's), squash or pad")
    if image_size is not None and not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise CarsTLError(f"--image-size must be at least {MIN_IMAGE_SIZE} and at most {MAX_IMAGE_SIZE} pixels, got {image_size}",
                          "omit it for the weights' own size (224 for most), or pass e.g. --image-size 288")


def with_image_options(spec: dict, image_size: int | None, resize_mode: str, crop_pct: float | None = None) -> dict:
    """``spec`` at final side ``image_size`` (None: the weights' own) in ``resize_mode``."""
    check_image_options(image_size, resize_mode)
    spec = dict(spec)
    if image_size:
        resize = math.floor(image_size / crop_pct) if crop_pct else int(round(image_size * spec["resize"] / spec["crop"]))
        spec.update(resize=int(resize), crop=int(image_size))
    if resize_mode != "crop":
        spec.pop("crop_mode", None)  # timm's center-crop variants belong to the crop mode
        spec["resize"] = spec["crop"]  # the whole image goes to the final side
    spec["mode"] = resize_mode
    return spec


def build_backbone(name: str = "resnet50", weights: str = "imagenet", image_size: int | None = None,
                   resize_mode: str = "crop", *, seed: int = RANDOM_SEED) -> Backbone:
    """Build ``name`` with ``weights`` and its classifier removed; see the module docstring.

    ``seed`` sets the random initialisation (what ``--weights random`` keeps; pretrained weights
    replace it). The default reproduces every artifact made before seeds varied it."""
    check_image_options(image_size, resize_mode)
    if weights not in ("imagenet", "random") and Path(weights).exists():
        weights = str(Path(weights).resolve())  # recorded in artifacts: must work from any folder
    model, spec = _create(name, seed)
    classifier = _classifier_path(model, name)
    file_sha256 = None
    if weights != "random":
        state, enum_spec, source = _load_state(name, weights)
        spec = enum_spec or spec
        file_sha256 = atomic.file_sha256(source)
        _load_into(model, state, classifier, name, weights)
    digest = state_digest(model.state_dict())
    head = model.get_submodule(classifier)
    num_features = int(head.in_features)
    if _is_timm(name):
        model.reset_classifier(0)
    else:
        _set_module(model, classifier, nn.Identity())
    crop_pct = None
    if _is_timm(name) and spec.get("pipeline") == FUSED_PIPELINE and image_size:
        from timm.data import resolve_data_config

        crop_pct = float(resolve_data_config({}, model=model)["crop_pct"])  # timm floors image_size / crop_pct
    spec = with_image_options(spec, image_size, resize_mode, crop_pct)
    stages = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    if _is_timm(name) and isinstance(getattr(model, "blocks", None), nn.Sequential):
        stages += [f"blocks.{i}" for i in range(len(model.blocks))]  # timm's stage names
    model.eval()
    return Backbone(name, str(weights), digest, model, num_features, spec, stages, classifier, file_sha256)


def _load_into(model, state: dict, classifier: str, name: str, weights: str) -> None:
    own = model.state_dict()
    # A classifier of another class count is not part of the backbone: keep ours.
    state = {k: v for k, v in state.items() if not (k.startswith(classifier + ".") and k in own and own[k].shape != v.shape)}
    missing = [k for k in own if k not in state and not k.startswith(classifier + ".")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise CarsTLError(
            f"weights {weights!r} do not fit backbone {name}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} mis-shaped keys (e.g. {(missing + unexpected + wrong)[:3]})",
            "pass --backbone matching the architecture the weights were saved from",
        )
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- models and transforms


def classifier_model(backbone: Backbone, num_classes: int, seed: int = RANDOM_SEED) -> ClassifierModel:
    """Backbone body + a fresh ``Linear(num_features, num_classes)`` head initialised from ``seed``."""
    torch.manual_seed(seed)
    return ClassifierModel(backbone.body, nn.Linear(backbone.num_features, num_classes))


class ClassifierModel(nn.Module):
    """``head(body(x))``; the head's state dict loads into the backbone's own classifier."""

    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x):
        return self.head(self.body(x))


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
        ox, oy = (
            (self.size - n) // 2 if n <= self.size else -int(round((n - self.size) / 2.0)) for n in (nw, nh)
        )
        # The part of the scaled region that lands on the canvas, and where it comes from.
        vx0, vy0 = max(0, -ox), max(0, -oy)
        vx1, vy1 = min(nw, self.size - ox), min(nh, self.size - oy)
        sx, sy = w / nw, h / nh
        visible = image.resize((vx1 - vx0, vy1 - vy0), resample,
                               box=(left + vx0 * sx, top + vy0 * sy, left + vx1 * sx, top + vy1 * sy))
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
    return SquareResize(spec["crop"], spec["interpolation"], resize_mode(spec), mean_colour(spec))


def eval_resize_crop(spec: dict):
    """The evaluation resize of ``spec``'s mode, PIL image to PIL image (``crop`` square), in one
    PIL resampling call (see the module docstring for the modes).

    Crop-mode specs made by this version carry ``pipeline`` and resize+crop in one step; specs
    recorded by older artifacts (no ``pipeline``) get the two-step transform they were made with.
    """
    from torchvision import transforms as T

    mode = resize_mode(spec)
    if mode not in RESIZE_MODES:
        raise CarsTLError(f"transform spec has an unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}",
                          "re-extract the features (or rerun the stage) with this version of cars_tl")
    if mode != "crop":
        return square_resize(spec)
    crop_mode = spec.get("crop_mode", "center")
    if crop_mode == "squash":
        return CenterSquash(spec["resize"], spec["crop"], spec["interpolation"])
    if crop_mode == "border":
        return SquareResize(spec["crop"], spec["interpolation"], "pad", mean_colour(spec), longest=spec["resize"])
    if spec.get("pipeline") == FUSED_PIPELINE:
        return ResizeCenterCrop(spec["resize"], spec["crop"], spec["interpolation"])
    return T.Compose([
        T.Resize(spec["resize"], interpolation=T.InterpolationMode(spec["interpolation"]), antialias=True),
        T.CenterCrop(spec["crop"]),
    ])


def eval_transform(spec: dict, output: str = "float"):
    """:func:`eval_resize_crop` (the spec's resize mode), to tensor, normalize: evaluation preprocessing.

    ``output="uint8"`` stops before normalizing (a uint8 CHW tensor): for loaders feeding a GPU,
    where :func:`cars_tl.data.loaders.batch_to_device` normalizes on the device."""
    from torchvision import transforms as T

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


def fold_batchnorm(body: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """An eval-mode copy of ``body`` with each BatchNorm that follows a convolution folded into it.

    One pass over the activations fewer per layer (about 7% faster for resnet50 here, features
    equal to fp32 rounding); ``body`` itself is left untouched. A body without BatchNorm, one that
    torch.fx cannot trace (data-dependent control flow), or one whose folded copy does not give
    the same output on ``example`` is returned as it is.
    """
    from torch.fx.experimental.optimization import fuse

    body.eval()
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in body.modules()):
        return body
    try:
        folded = fuse(body, inplace=False)
        if example is not None:
            with torch.inference_mode():
                want, got = body(example), folded(example)
            if not torch.linalg.vector_norm(got - want) <= 1e-4 * torch.linalg.vector_norm(want) + 1e-6:
                return body
    except Exception:  # noqa: BLE001 - tracing failures have many types; folding is only an optimization
        return body
    return folded


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
        crop = T.RandomResizedCrop(spec["crop"], scale=(0.25, 1.0), interpolation=T.InterpolationMode(spec["interpolation"]), antialias=True)
    else:
        crop = RandomRegionSquare(spec)
    return T.Compose([
        crop,
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.2, 0.2, 0.2),
        *_tensor_steps(spec, output),
    ])


def normalized_spec(spec: dict) -> dict:
    """``spec`` with the defaults of older recordings made explicit (no ``mode``: crop)."""
    return dict(spec, mode=resize_mode(spec))


def transform_key(spec: dict) -> str:
    """One string per preprocessing: equal keys, equal tensors (older specs normalized first)."""
    return json.dumps(normalized_spec(spec), sort_keys=True)


def same_transform(a: dict, b: dict) -> bool:
    return transform_key(a) == transform_key(b)


def describe_transform(spec: dict) -> str:
    """A short human description for error messages, e.g. ``squash 288 px``."""
    mode = resize_mode(spec)
    detail = f"resize {spec['resize']} + center crop {spec['crop']}" if mode == "crop" else f"{spec['crop']} px"
    return f"{mode} ({detail})"


def parse_unfreeze(value: str, backbone: Backbone) -> list[str]:
    """``none`` | ``all`` | comma-separated module names of the backbone (validated)."""
    if value == "none":
        return []
    if value == "all":
        return list(backbone.stages)
    names = [v.strip() for v in re.split(r"[,\s]+", value) if v.strip()]
    bad = [n for n in names if n not in backbone.stages]
    if bad:
        raise CarsTLError(
            f"--unfreeze {value!r}: {', '.join(bad)} is not a module of {backbone.name}",
            f"valid: none, all, or comma-separated names from: {', '.join(backbone.stages)}",
        )
    return names
