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
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cars_tl.artifacts import runs
from cars_tl.core import atomic
from cars_tl.core.errors import CarsTLError
from cars_tl.data.transforms import with_image_options
from cars_tl.models.families import family

RANDOM_SEED = 0


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
            "backbone": self.name,
            "weights": self.weights,
            "weights_digest": self.weights_digest,
            "weights_file_sha256": self.weights_file_sha256,
            "num_features": self.num_features,
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


def _create(name: str, seed: int = RANDOM_SEED):
    """The bare network (1000-class head, initialised from ``seed``) and its default transform spec."""
    torch.manual_seed(seed)
    return family(name).create(name)


def _load_state(name: str, weights: str) -> tuple[dict, dict | None, Path]:
    """The state dict for ``weights`` and, for named weights (torchvision enums), their transform spec."""
    if Path(weights).exists():
        path = Path(weights)
        return load_weights_file(path), None, path if path.is_file() else _run_model_file(path)
    return family(name).named_weights(name, weights)


def _run_model_file(run_dir: Path) -> Path:

    return runs.model_file(run_dir)


def load_weights_file(path: Path) -> dict:
    """A state dict from a plain ``.pth``, a cars_tl checkpoint, or a run directory's model."""
    path = Path(path)
    if path.is_dir():
        path = _run_model_file(path)
    obj = runs.load_weights_only(
        path, "pass a state dict saved with torch.save(model.state_dict(), path) or a cars_tl run directory"
    )
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise CarsTLError(f"{path} is not a state dict (a mapping of names to tensors)")
    if any(k.startswith("body.") for k in obj):  # a cars_tl ClassifierModel: keep the body
        obj = {k[len("body.") :]: v for k, v in obj.items() if k.startswith("body.")}
    return obj


def build_backbone(
    name: str = "resnet50",
    weights: str = "imagenet",
    image_size: int | None = None,
    resize_mode: str = "crop",
    *,
    seed: int = RANDOM_SEED,
) -> Backbone:
    """Build ``name`` with ``weights`` and its classifier removed; see the module docstring. ``image_size``
    and ``resize_mode`` as :class:`cars_tl.core.options.ImageOptions` checked them.

    ``seed`` sets the random initialisation (what ``--weights random`` keeps; pretrained weights
    replace it). The default reproduces every artifact made before seeds varied it."""
    if weights not in ("imagenet", "random") and Path(weights).exists():
        weights = str(Path(weights).resolve())  # recorded in artifacts: must work from any folder
    adapter = family(name)
    model, spec = _create(name, seed)
    classifier = adapter.classifier_path(model, name)
    file_sha256 = None
    if weights != "random":
        state, enum_spec, source = _load_state(name, weights)
        spec = enum_spec or spec
        file_sha256 = atomic.file_sha256(source)
        _load_into(model, state, classifier, name, weights)
    digest = state_digest(model.state_dict())
    head = model.get_submodule(classifier)
    num_features = int(head.in_features)
    adapter.remove_classifier(model, classifier)
    spec = with_image_options(spec, image_size, resize_mode, adapter.crop_pct(model, spec, image_size))
    stages = adapter.stage_names(model)
    model.eval()
    return Backbone(name, str(weights), digest, model, num_features, spec, stages, classifier, file_sha256)


def _load_into(model, state: dict, classifier: str, name: str, weights: str) -> None:
    own = model.state_dict()
    # A classifier of another class count is not part of the backbone: keep ours.
    state = {
        k: v for k, v in state.items() if not (k.startswith(classifier + ".") and k in own and own[k].shape != v.shape)
    }
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


def check_options(name: str, unfreeze: str) -> list[str]:
    """What the stages check of ``name`` and ``--unfreeze`` (the modules, :func:`parse_unfreeze`; the image
    options are :class:`cars_tl.core.options.ImageOptions`'), without weights or memory: the network is built on the meta device.
    For ``cars-tl paths``, so that make stops at once where a stage would stop hours later."""
    adapter = family(name)
    with torch.device("meta"):
        model, spec = adapter.create(name)
    classifier = adapter.classifier_path(model, name)
    adapter.remove_classifier(model, classifier)
    skeleton = Backbone(name, "random", "", model, 0, spec, adapter.stage_names(model), classifier)
    return parse_unfreeze(unfreeze, skeleton)


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
