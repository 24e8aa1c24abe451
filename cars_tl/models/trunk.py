"""A network cut in two at the first module that trains: a frozen *trunk* run once over the images
into a trunk cache (:mod:`cars_tl.artifacts.trunks`), and a trainable *top* that fine-tuning runs
on the cached maps.

Families with a known execution order (both forward passes are written out here and checked
against the network's own ``forward`` in the tests):

torchvision ResNets (resnet18 ... resnext, wide_resnet)
    ``conv1 bn1 relu maxpool layer1 layer2 layer3 layer4`` then ``avgpool``, flatten, ``fc``.
timm EfficientNet-style models (``conv_stem``, ``blocks``, ``forward_head``)
    ``conv_stem bn1 blocks.0 ... blocks.N conv_head bn2`` then ``forward_head`` (pool, dropout, classifier).

The cut is before the first unit with a trainable parameter: ``--unfreeze layer4`` caches the maps
after ``layer3``, ``--unfreeze blocks.6`` those after ``blocks.5``. :func:`plan` says whether the
cache is exact for a fine-tune (and why not, in one line, when it is not). The cached data (building
it, reading it back, finetune's touch point) is :mod:`cars_tl.models.trunk_store`'s.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from cars_tl.artifacts import names, trunks
from cars_tl.core.errors import CarsTLError
from cars_tl.data import transforms
from cars_tl.models import backbones

# Parameter-free modules whose output does not depend on train/eval mode: the only ones the frozen
# part may leave in train mode (a dropout or drop-path there would change its maps per batch).
MODE_FREE = (nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid)
MODE_FREE += (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Sequential, nn.ModuleList)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


# --------------------------------------------------------------------------- splitting a network


def units(body: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The body's modules in execution order up to the pooling, or None for an unknown family."""
    if all(hasattr(body, n) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer4", "avgpool", "fc")):
        names = ["conv1", "bn1", "relu", "maxpool"] + [
            n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(body, n)
        ]
        return [(n, getattr(body, n)) for n in names]
    if all(hasattr(body, n) for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")) and isinstance(
        body.blocks, nn.Sequential
    ):
        return (
            [("conv_stem", body.conv_stem), ("bn1", body.bn1)]
            + [(f"blocks.{i}", b) for i, b in enumerate(body.blocks)]
            + [("conv_head", body.conv_head), ("bn2", body.bn2)]
        )
    return None


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def cut_index(body: nn.Module) -> int | None:
    """Index of the first unit with a trainable parameter (None: unknown family or nothing trains)."""
    seq = units(body)
    if seq is None:
        return None
    return next((i for i, (_, m) in enumerate(seq) if _trains(m)), None)


def finish(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooling and what follows the last unit (the body's classifier is an identity)."""
    if hasattr(body, "forward_head"):
        return body.forward_head(x)
    return body.fc(torch.flatten(body.avgpool(x), 1))


class Trunk(nn.Module):
    """Units ``[0, cut)`` of a body (shared, not copied)."""

    def __init__(self, body: nn.Module, cut: int):
        super().__init__()
        self.parts = nn.ModuleList(m for _, m in units(body)[:cut])

    def forward(self, x):
        for m in self.parts:
            x = m(x)
        return x


class Top(nn.Module):
    """``head(body-from-unit-cut(maps))`` of a :class:`~cars_tl.models.backbones.ClassifierModel`:
    what fine-tuning runs on cached maps. ``model`` is the whole network (a submodule, so
    ``.train()``/``.eval()`` and DDP see its parameters); its state dict stays the run's."""

    def __init__(self, model: nn.Module, cut: int):
        super().__init__()
        self.model = model
        self.cut = cut

    def forward(self, maps):
        body = self.model.body
        x = maps
        for _, m in units(body)[self.cut :]:
            x = m(x)
        return self.model.head(finish(body, x))


# --------------------------------------------------------------------------- when the cache is exact


@dataclasses.dataclass
class Plan:
    """The decision for one fine-tune: ``path`` is None when the image path runs (``reason`` says why)."""

    path: Path | None
    reason: str | None
    identity: dict | None = None
    cut: int | None = None

    def record(self) -> dict:
        return {
            "used": self.path is not None,
            "path": str(self.path) if self.path else None,
            "reason": self.reason,
            **(
                {
                    "cut": self.identity["cut"],
                    "top": self.identity["top"],
                    "storage": self.identity["storage"],
                    "precision": self.identity["precision"],
                }
                if self.identity
                else {}
            ),
        }


def storage_for(precision: str, storage: str = "auto") -> str:
    """``auto``: the dtype the trunk's output already has under ``precision`` (bf16/fp16 autocast:
    16-bit, exact; fp32: fp32, exact). fp16 or bf16 storage of fp32 maps halves the size and rounds
    them (measured cost: README, "Trunk cache")."""
    if storage == "auto":
        return precision
    if storage not in trunks.STORAGES:
        raise CarsTLError(f"unknown --trunk-dtype {storage!r}; valid: auto, {', '.join(trunks.STORAGES)}")
    return storage


def identity_for(bb, model, cut: int, crop: str, margin: float, precision: str, storage: str, manifest) -> dict:
    seq = units(model.body)
    return {
        "backbone": bb.name,
        "weights": bb.weights,
        "weights_digest": bb.weights_digest,
        # The frozen part as it is now, not as the weights file made it: a resumed run may have
        # trained these layers in earlier epochs (e.g. --unfreeze all, then --resume --force --unfreeze layer4).
        "trunk_digest": backbones.state_digest(Trunk(model.body, cut).state_dict()),
        "transform": transforms.transform_key(bb.transform),
        "crop": crop,
        "margin": float(margin),
        "precision": precision,
        "storage": storage,
        "cut": seq[cut - 1][0],
        "top": seq[cut][0],
        "dataset_fingerprint": manifest.fingerprint,
    }


def plan(choice: str, model, bb, config: dict, manifest, artifacts: Path, storage: str = "auto") -> Plan:
    """Whether the trunk cache is exact for this fine-tune (``model`` already in train mode, as its
    epochs run it): ``choice`` is auto | off | PATH. Returns the cache's path (maybe not built yet)
    or the one-line reason the image path runs."""
    if choice == "off":
        return Plan(None, "--trunk-cache off: trunk cache not used")
    if config.get("tta", "none") not in (None, "none"):
        return Plan(
            None,
            f"--tta {config['tta']} evaluates mirrored images, and a mirrored image's maps are not the mirrored maps: trunk cache not used",
        )
    if config.get("augment", "none") != "none":
        return Plan(
            None, f"{config.get('preset')} preset augments images (--augment {config['augment']}): trunk cache not used"
        )
    body = model.body
    seq = units(body)
    if seq is None:
        return Plan(
            None,
            f"no known cut point for backbone {bb.name} (torchvision ResNets and timm EfficientNets have one): trunk cache not used",
        )
    cut = cut_index(body)
    if cut is None:
        return Plan(
            None,
            "nothing in the backbone trains: trunk cache not used (extract-features + train-head is the cached path)",
        )
    if cut == 0:
        return Plan(
            None,
            f"{seq[0][0]}, the network's first module, trains (--unfreeze {config.get('unfreeze')}): no frozen part to cache: trunk cache not used",
        )
    moving = [
        f"{name}.{n}" if n else name
        for name, unit in seq[:cut]
        for n, m in unit.named_modules()
        if m.training and not isinstance(m, MODE_FREE)
    ]
    if moving:
        return Plan(
            None,
            f"the frozen part would run in train mode ({moving[0]}): its output changes per batch: trunk cache not used",
        )
    storage = storage_for(config["precision"], storage)
    identity = identity_for(bb, model, cut, config["crop"], config["margin"], config["precision"], storage, manifest)
    if choice == "auto":
        key = {k: identity[k] for k in trunks.IDENTITY_KEYS}
        return Plan(names.trunk_path(artifacts, bb.name, bb.weights, key), None, identity, cut)
    path = Path(choice)
    if path.exists():
        try:
            attrs = trunks.read_attrs(path)
        except CarsTLError as exc:
            if _damaged_hdf5(path):  # a truncated or overwritten cache: ensure() rebuilds it and says why
                return Plan(path, None, identity, cut)
            return Plan(None, f"{exc.message}: trunk cache not used")
        why = mismatch(attrs, identity, seq)
        if why:
            return Plan(None, f"{path} {why}: trunk cache not used")
    return Plan(path, None, identity, cut)


def _damaged_hdf5(path: Path) -> bool:
    """An empty file, an HDF5 file that does not open, or a trunk cache of an older schema: a cache to
    rebuild. Any other file named by mistake (a feature cache, a newer cars_tl's cache) is left alone."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(HDF5_SIGNATURE))
    except OSError:
        return False
    if head == b"":
        return True
    if head != HDF5_SIGNATURE:
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            kind, schema = f.attrs.get("kind"), f.attrs.get("schema_version")
    except Exception:  # cut short or overwritten: h5py's errors are many; none of them makes it another file
        return True
    if isinstance(kind, bytes):
        kind = kind.decode("utf-8", "replace")
    try:
        older = int(schema) < trunks.SCHEMA_VERSION
    except (TypeError, ValueError):
        older = False
    return kind == trunks.KIND and older


def mismatch(attrs: dict, identity: dict, seq) -> str | None:
    """Why a cache made with ``attrs`` is not exact for ``identity`` (None when it is)."""
    names = [n for n, _ in seq]
    if attrs.get("dataset_fingerprint") != identity["dataset_fingerprint"]:
        return "was built from another dataset (fingerprint differs)"
    if attrs.get("backbone") != identity["backbone"] or attrs.get("weights_digest") != identity["weights_digest"]:
        return f"was built from other weights ({attrs.get('backbone')} {attrs.get('weights')})"
    if attrs.get("cut") != identity["cut"]:
        if attrs.get("cut") in names and names.index(attrs["cut"]) >= names.index(identity["cut"]):
            return f"cuts after {attrs['cut']}, but {identity['top']} below that cut trains in this run"
        return f"cuts after {attrs.get('cut')}, this run's frozen part ends at {identity['cut']}"
    if attrs.get("trunk_digest") != identity["trunk_digest"]:
        return "was built from other weights of the frozen part (e.g. before a resumed run had trained them)"
    if (
        not transforms.same_transform(
            json.loads(attrs["transform"]) if isinstance(attrs.get("transform"), str) else attrs.get("transform", {}),
            json.loads(identity["transform"]),
        )
        or attrs.get("crop") != identity["crop"]
        or float(attrs.get("margin", 0.0)) != identity["margin"]
    ):
        return "was built with other preprocessing (transform, crop or margin differ)"
    if attrs.get("precision") != identity["precision"]:
        return (
            f"was built in {attrs.get('precision')}, this run computes in {identity['precision']} (precision mismatch)"
        )
    if attrs.get("storage") != identity["storage"]:
        return f"stores {attrs.get('storage')} maps, this run asks for {identity['storage']}"
    return None
