"""What a frozen backbone's feature row is made of: views (``--tta``) and stages (``--layers``).

The one place that turns a backbone body into the function ``images -> feature rows`` that a
cache stores and that every stage rebuilding a run from images applies again (``predict``,
``inspect`` via the recorded spec, :mod:`cars_tl.models.inference`), so a head or an SVM sees at
prediction time exactly what it saw in training.

``--tta none|flip``
    ``flip``: every batch goes through the body together with its horizontal mirror (one batch of
    twice the images: one more forward, no second pass over the files); the row is the mean of
    the two views' rows. For a fine-tuned model the same averaging of the pooled features before
    its linear head is the mean of the two views' logits (:func:`view_mean`).
``--layers A,B,...``
    the global-average-pooled outputs of the named stages (names as ``--unfreeze`` knows them:
    :attr:`cars_tl.models.backbones.Backbone.stages`; ``final`` is the backbone's own pooled
    output), concatenated in the given order, from forward hooks in the same forward pass.
``combine`` (with several layers)
    ``l2`` (default): each stage's block is L2-normalised per image before concatenation, so the
    wider or larger-valued block does not dominate a kernel or a distance; ``raw``: as pooled.
    Chosen by measurement (benchmarks/bench_accuracy.py, README "Flip and two-stage features").

Recorded: the options live in the transform spec under ``"features"`` (absent: one view, the
final pooled output -- every cache and run made before this existed), so the cache's identity,
its default file name and every run trained on it carry them. With several layers the spec also
says which columns come from which stage (``columns``: ``{layer: [start, stop]}``).

BatchNorm folding (:func:`cars_tl.models.backbones.fold_batchnorm`) traces a network into one
graph in which container modules are never called, so hooks on a stage would never fire: with
layers, each tapped stage is folded as a unit (and everything outside the stages' ancestors as
units too), which keeps the stages' names and their forward calls (:func:`prepare`).
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from cars_tl.core import runtime
from cars_tl.core.errors import CarsTLError
from cars_tl.data import loaders
from cars_tl.models import backbones

TTA_MODES = ("none", "flip")
COMBINES = ("l2", "raw")
FINAL = "final"
DEFAULT_COMBINE = "l2"
SPEC_KEY = "features"


def default_layers(backbone: backbones.Backbone) -> list[str]:
    """The family's two-stage default: ResNet ``layer3,layer4``; timm EfficientNet-style models
    (``blocks.N``) the last block stage and the final pooled output; otherwise ``final``."""
    if "layer3" in backbone.stages and "layer4" in backbone.stages:
        return ["layer3", "layer4"]
    blocks = [s for s in backbone.stages if re.fullmatch(r"blocks\.\d+", s)]
    if blocks:
        return [blocks[-1], FINAL]
    return [FINAL]


def parse_layers(value: str | None, backbone: backbones.Backbone) -> list[str]:
    """``final`` | ``default`` (:func:`default_layers`) | comma-separated stage names (validated)."""
    if value is None or value.strip() == FINAL:
        return [FINAL]
    if value.strip() == "default":
        return default_layers(backbone)
    names = [v.strip() for v in re.split(r"[,\s]+", value) if v.strip()]
    bad = [n for n in names if n != FINAL and n not in backbone.stages]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if bad or not names or repeated:
        if not names:
            problem = "the list of stages is empty"
        elif bad:
            problem = f"{', '.join(bad)} is not a stage of {backbone.name}"
        else:
            problem = f"{', '.join(repeated)} is given more than once (each stage at most once)"
        raise CarsTLError(
            f"--layers {value!r}: {problem}",
            f"valid: final, default ({','.join(default_layers(backbone))}), or comma-separated names from: "
            f"final, {', '.join(backbone.stages)}",
        )
    return names


def check_tta(tta: str) -> str:
    if tta not in TTA_MODES:
        raise CarsTLError(
            f"unknown --tta {tta!r}; valid: {', '.join(TTA_MODES)}",
            "--tta flip averages each image with its mirror; --tta none (the study's) uses the image alone",
        )
    return tta


def options(spec: dict) -> dict:
    """The spec's feature options with defaults made explicit: tta, layers, combine."""
    f = spec.get(SPEC_KEY) or {}
    return {
        "tta": f.get("tta", "none"),
        "layers": list(f.get("layers", [FINAL])),
        "combine": f.get("combine", DEFAULT_COMBINE),
    }


def is_default(spec: dict) -> bool:
    o = options(spec)
    return o["tta"] == "none" and o["layers"] == [FINAL]


def with_options(
    spec: dict,
    tta: str = "none",
    layers: list[str] | None = None,
    combine: str = DEFAULT_COMBINE,
    columns: dict[str, list[int]] | None = None,
) -> dict:
    """``spec`` with the feature options recorded (nothing added for the defaults: the study's spec
    stays byte-identical, and so does its cache's name)."""
    check_tta(tta)
    if combine not in COMBINES:
        raise CarsTLError(f"unknown --combine {combine!r}; valid: {', '.join(COMBINES)}")
    layers = list(layers or [FINAL])
    spec = {k: v for k, v in spec.items() if k != SPEC_KEY}
    f: dict = {}
    if tta != "none":
        f["tta"] = tta
    if layers != [FINAL]:
        f.update(layers=layers, combine=combine)
        if columns is not None:
            f["columns"] = columns
    if f:
        spec[SPEC_KEY] = f
    return spec


def width(spec: dict, final_width: int) -> int:
    """A row's width under ``spec``: ``final_width`` for the final pooled output alone."""
    columns = (spec.get(SPEC_KEY) or {}).get("columns")
    if options(spec)["layers"] == [FINAL] or not columns:
        return final_width
    return max(stop for _, stop in columns.values())


def describe(spec: dict) -> str:
    """e.g. ``flip, blocks.6+final (l2)``; ``one view, final`` for the default."""
    o = options(spec)
    views = "flip" if o["tta"] == "flip" else "one view"
    layers = "+".join(o["layers"]) + (f" ({o['combine']})" if o["layers"] != [FINAL] else "")
    return f"{views}, {layers}"


def name_tag(spec: dict) -> str:
    """The part of a default cache name that says what differs from one view of ``final``."""
    o = options(spec)
    parts = ["flip"] if o["tta"] == "flip" else []
    if o["layers"] != [FINAL]:
        parts.append("+".join(o["layers"]) + ("-raw" if o["combine"] == "raw" else ""))
    return "-".join(parts)


def _pool(output: torch.Tensor) -> torch.Tensor:
    output = output.float()
    if output.dim() == 4:
        return output.mean((2, 3))
    if output.dim() == 3:  # tokens (N, L, C)
        return output.mean(1)
    return output.flatten(1)


def view_mean(fn, images: torch.Tensor, tta: str) -> torch.Tensor:
    """``fn(images)``, or with ``flip`` the mean of ``fn`` on the images and on their mirrors,
    computed as one batch of both."""
    if tta == "none":
        return fn(images)
    n = len(images)
    out = fn(torch.cat([images, images.flip(-1)]))
    return (out[:n].float() + out[n:].float()) / 2


class FeatureBody(nn.Module):
    """``images -> feature rows`` per the spec's options: views averaged, stages concatenated."""

    def __init__(self, body: nn.Module, layers: list[str], tta: str = "none", combine: str = DEFAULT_COMBINE):
        super().__init__()
        self.body, self.layers, self.tta, self.combine = body, list(layers), check_tta(tta), combine
        self._taps: dict[str, torch.Tensor] = {}
        self._handles = [
            body.get_submodule(name).register_forward_hook(self._hook(name)) for name in self.layers if name != FINAL
        ]

    def close(self) -> None:
        """Remove the hooks from the body."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self._taps[name] = _pool(output)

        return hook

    def _rows(self, images: torch.Tensor) -> torch.Tensor:
        self._taps = {}
        final = self.body(images)
        blocks = [final.float().flatten(1) if name == FINAL else self._taps[name] for name in self.layers]
        self._taps = {}
        if len(blocks) == 1:
            return blocks[0]
        if self.combine == "l2":
            blocks = [nn.functional.normalize(b, dim=1) for b in blocks]
        return torch.cat(blocks, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return view_mean(self._rows, images, self.tta)

    def columns(self, image_size: int) -> dict[str, list[int]]:
        """Which columns each layer fills, from one forward of a blank image of side ``image_size``."""
        was = self.training
        self.eval()
        with torch.inference_mode():
            self._taps = {}
            final = self.body(torch.zeros(1, 3, image_size, image_size))
            widths = [final.flatten(1).shape[1] if n == FINAL else self._taps[n].shape[1] for n in self.layers]
            self._taps = {}
        self.train(was)
        out, start = {}, 0
        for name, width in zip(self.layers, widths):
            out[name] = [start, start + width]
            start += width
        return out


def for_spec(body: nn.Module, spec: dict) -> nn.Module:
    """``body`` as the spec's feature rows need it (``body`` itself for the default options)."""
    if is_default(spec):
        return body
    o = options(spec)
    return FeatureBody(body, o["layers"], o["tta"], o["combine"])


def fold_keeping(body: nn.Module, keep: list[str]) -> nn.Module:
    """A copy of ``body`` with BatchNorm folded (see the module docstring) in which every module
    named in ``keep`` still exists under its name and is still called by its parent."""
    keep = [k for k in keep if k != FINAL]
    if not keep:
        return backbones.fold_batchnorm(body)
    body.eval()
    out = copy.deepcopy(body)

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            full = prefix + name
            if any(k.startswith(full + ".") for k in keep) and full not in keep:
                visit(child, full + ".")  # an ancestor of a kept stage: its own forward must run
            else:
                setattr(module, name, backbones.fold_batchnorm(child))

    visit(out, "")
    return out.eval()


def prepare(body: nn.Module, spec: dict, example: torch.Tensor) -> nn.Module:
    """Extraction's feature body for ``spec``: BatchNorm folded where the taps allow, checked on
    ``example`` against the unfolded network (falling back to it if the rows differ)."""
    o = options(spec)
    if o["layers"] == [FINAL]:
        return for_spec(backbones.fold_batchnorm(body, example), spec)
    folded = for_spec(fold_keeping(body, o["layers"]), spec)
    reference = for_spec(body, spec)
    with torch.inference_mode():
        want, got = reference.eval()(example), folded.eval()(example)
    if torch.linalg.vector_norm(got - want) <= 1e-4 * torch.linalg.vector_norm(want) + 1e-6:
        reference.close()
        return folded
    folded.close()
    return reference


def prepare_body(
    body: torch.nn.Module, device: str, image_size: int = 224, spec: dict | None = None
) -> torch.nn.Module:
    """The frozen body as extraction runs it, and :mod:`cars_tl.models.inference` again for a head
    or SVM run (so both give the same rows): eval mode, BatchNorm folded into the convolutions
    (a copy, checked on one random image of ``image_size``: ``body`` keeps its layers),
    channels_last on ``device``, no gradients; with ``spec``, wrapped to give the spec's feature
    rows (views and stages)."""
    example = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    body = prepare(body, spec or {}, example)  # puts body in eval mode
    body = body.to(device, memory_format=torch.channels_last)
    body.eval()
    for p in body.parameters():
        p.requires_grad_(False)
    return body


@torch.inference_mode()
def embed(body, images: torch.Tensor, device: str, precision: str, spec: dict | None = None) -> torch.Tensor:
    """Feature rows of a batch (:func:`prepare_body`'s), as float32 on the CPU. The batch reaches the device through
    :func:`loaders.batch_to_device` (uint8 batches of the accelerator's data path are normalized
    there with ``spec``'s mean and std)."""
    if images.dtype == torch.uint8 and spec is None:
        raise ValueError("a uint8 batch needs the transform spec to be normalized")
    images = loaders.batch_to_device(images, device, spec or {})
    with runtime.autocast(device, precision):
        out = body(images)
    return out.float().flatten(1).cpu()
