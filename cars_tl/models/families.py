"""Backbone families: one adapter per source of networks (torchvision, timm), picked by name prefix.

An adapter knows, for its networks: how to create one (1000-class head; the caller seeds torch), its
default preprocessing spec, where named weights come from, which module is the classifier and how to
remove it, the crop fraction that sizes the resize at another image size, and the stage names
``--unfreeze`` accepts. :func:`family` picks the adapter of a backbone name;
:mod:`cars_tl.models.backbones` builds every network through it. A new family is one class here and
one entry in :data:`FAMILIES`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from cars_tl.core.errors import CarsTLError
from cars_tl.data.transforms import FUSED_PIPELINE


def _trainable_children(model) -> list[str]:
    return [n for n, m in model.named_children() if any(True for _ in m.parameters())]


def set_module(model, path: str, module) -> None:
    """Replace the submodule at dotted ``path`` with ``module``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


class Family:
    """The adapter interface; ``prefix``: the start of the backbone names this family owns."""

    prefix = ""

    def owns(self, name: str) -> bool:
        return name.startswith(self.prefix)

    def create(self, name: str) -> tuple[nn.Module, dict]:
        """The bare network (1000-class head; the caller seeds torch first) and its default transform spec."""
        raise NotImplementedError

    def named_weights(self, name: str, weights: str) -> tuple[dict, dict | None, Path]:
        """The state dict of named ``weights`` (not a path), their transform spec (or None), their file."""
        raise NotImplementedError

    def classifier_path(self, model, name: str) -> str:
        """The dotted name of the classifier module ``model`` ends with."""
        raise NotImplementedError

    def remove_classifier(self, model, classifier: str) -> None:
        """Leave ``model`` returning its pooled features."""
        raise NotImplementedError

    def crop_pct(self, model, spec: dict, image_size: int | None) -> float | None:
        """The crop fraction that sizes the resize at ``image_size`` (None: the spec's own ratio)."""
        return None

    def stage_names(self, model) -> list[str]:
        """The module names ``--unfreeze`` accepts (after :meth:`remove_classifier`)."""
        return _trainable_children(model)


class Torchvision(Family):
    """``torchvision.models`` by name (``resnet50``); weights: the torchvision enums, from the torch cache."""

    prefix = ""

    @staticmethod
    def names() -> list[str]:
        import torchvision

        return torchvision.models.list_models(module=torchvision.models)

    @staticmethod
    def spec(weights) -> dict:
        """A torchvision weights enum's evaluation preprocessing, as a spec."""
        t = weights.transforms()
        return {
            "resize": int(t.resize_size[0]),
            "side": int(t.crop_size[0]),
            "mean": [float(v) for v in t.mean],
            "std": [float(v) for v in t.std],
            "interpolation": t.interpolation.value,
            "pipeline": FUSED_PIPELINE,
            "mode": "crop",
        }

    @staticmethod
    def cache_file(weights) -> Path:
        """Where torchvision keeps the file of a weights enum: the torch hub cache."""
        return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name

    def create(self, name: str) -> tuple[nn.Module, dict]:
        import torchvision

        names = self.names()
        if name not in names:
            close = [n for n in names if name.split("_")[0][:4] in n][:8] or names[:8]
            raise CarsTLError(
                f"unknown backbone {name!r}", f"use a torchvision model name such as {', '.join(close)}, or timm/<name>"
            )
        model = torchvision.models.get_model(name, weights=None)
        return model, self.spec(torchvision.models.get_model_weights(name).DEFAULT)

    def named_weights(self, name: str, weights: str) -> tuple[dict, dict | None, Path]:
        import torchvision

        enum = torchvision.models.get_model_weights(name)
        key = "DEFAULT" if weights == "imagenet" else weights
        try:
            chosen = enum[key] if key != "DEFAULT" else enum.DEFAULT
        except KeyError:
            valid = ["imagenet", "random", *[w.name for w in enum], "PATH"]
            raise CarsTLError(
                f"unknown weights {weights!r} for {name} (and no such file)", f"valid: {', '.join(valid)}"
            ) from None
        path = self.cache_file(chosen)
        if not path.is_file():
            raise CarsTLError(
                f"ImageNet weights for {name} ({chosen}) are not in the torch cache: {path} is missing",
                f"cars-tl download --weights {name}:{chosen.name}   (offline: put {Path(chosen.url).name} from {chosen.url} at {path})",
            )
        return torch.load(path, map_location="cpu", weights_only=True), self.spec(chosen), path

    def classifier_path(self, model, name: str) -> str:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise CarsTLError(f"backbone {name!r} has no Linear classifier to replace")
        return linears[-1]

    def remove_classifier(self, model, classifier: str) -> None:
        set_module(model, classifier, nn.Identity())


class Timm(Family):
    """``timm/<arch>`` (optional dependency); weights: a state dict file only (no hub access offline)."""

    prefix = "timm/"

    @staticmethod
    def spec(model) -> dict:
        """timm's own evaluation preprocessing for ``model`` (``resolve_data_config``), as a spec:
        resize ``floor(crop / crop_pct)`` as ``create_transform`` computes it, and its ``crop_mode``."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        crop, crop_pct = int(cfg["input_size"][-1]), float(cfg["crop_pct"])
        spec = {
            "resize": int(math.floor(crop / crop_pct)),
            "side": crop,
            "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]],
            "interpolation": cfg["interpolation"],
            "pipeline": FUSED_PIPELINE,
            "mode": "crop",
        }
        if cfg.get("crop_mode", "center") != "center":
            spec["crop_mode"] = cfg["crop_mode"]  # squash | border: timm's variants of resize + center crop
        return spec

    def create(self, name: str) -> tuple[nn.Module, dict]:
        try:
            import timm
        except ImportError:
            raise CarsTLError(
                f"backbone {name!r} needs timm, which is not installed", "pip install 'cars_tl[timm]'"
            ) from None
        arch = name[len(self.prefix) :]
        if arch not in timm.list_models():
            raise CarsTLError(
                f"unknown timm model {arch!r}", "see timm.list_models() for valid names, e.g. timm/efficientnet_lite0"
            )
        model = timm.create_model(arch, pretrained=False)
        return model, self.spec(model)

    def named_weights(self, name: str, weights: str) -> tuple[dict, dict | None, Path]:
        raise CarsTLError(
            f"--weights {weights!r} for {name}: timm weights come from the Hugging Face hub, which is not used offline",
            "download the state dict once and pass --weights PATH (a .pth state dict)",
        )

    def classifier_path(self, model, name: str) -> str:
        return model.pretrained_cfg.get("classifier", "classifier")

    def remove_classifier(self, model, classifier: str) -> None:
        model.reset_classifier(0)

    def crop_pct(self, model, spec: dict, image_size: int | None) -> float | None:
        if spec.get("pipeline") == FUSED_PIPELINE and image_size:
            from timm.data import resolve_data_config

            return float(resolve_data_config({}, model=model)["crop_pct"])  # timm floors image_size / crop_pct
        return None

    def stage_names(self, model) -> list[str]:
        stages = _trainable_children(model)
        if isinstance(getattr(model, "blocks", None), nn.Sequential):
            stages += [f"blocks.{i}" for i in range(len(model.blocks))]  # timm's stage names
        return stages


FAMILIES: tuple[Family, ...] = (Timm(), Torchvision())  # the first that owns a name; torchvision (no prefix) last


def family(name: str) -> Family:
    """The adapter for backbone ``name``."""
    return next(f for f in FAMILIES if f.owns(name))
