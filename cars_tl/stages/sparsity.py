"""``sparsity``: the fraction of exactly-zero outputs of every ReLU call, per model.

Each *call* of a ReLU module is its own layer: torchvision's ResNet bottleneck calls its one
``relu`` three times, named ``layer3.2.relu``, ``layer3.2.relu_1``, ``layer3.2.relu_2``, so ResNet50
has 49 points (the stem plus 16 blocks x 3). ``nn.ReLU`` and ``nn.ReLU6`` are counted, in eval
mode, pooled over all the images given (every image has the same size after preprocessing, so
this equals the mean of per-image fractions). Head and SVM runs measure their frozen backbone.
Each run sees the images preprocessed as it was trained (see :mod:`cars_tl.models.inference`): images
from ``--split`` carry their boxes for ``--crop box`` runs; ``--image`` files have none, so a box
run refuses them.
"""

from __future__ import annotations

import csv
import io
import json
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch

from cars_tl.artifacts import names
from cars_tl.core import locks, runtime
from cars_tl.core.atomic import atomic_path, atomic_write_text
from cars_tl.core.errors import CarsTLError, check_output_path
from cars_tl.core.progress import NULL, Progress
from cars_tl.data import devkit, loaders
from cars_tl.data import manifest as manifests
from cars_tl.data.dataset import raise_bad
from cars_tl.data.images import open_image
from cars_tl.models.inference import load_run

RELU_TYPES = (torch.nn.ReLU, torch.nn.ReLU6)


class ZeroCounter:
    """Forward hooks that count exact zeros per ReLU call site, in forward order."""

    def __init__(self, model: torch.nn.Module):
        self.zeros: OrderedDict[str, int] = OrderedDict()
        self.totals: OrderedDict[str, int] = OrderedDict()
        self._calls: dict[str, int] = {}
        self._handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if isinstance(module, RELU_TYPES)
        ]
        if not self._handles:
            raise CarsTLError(f"{type(model).__name__} has no ReLU modules to measure")

    def _hook(self, name: str):
        def hook(module, inputs, output):
            n = self._calls.get(name, 0)
            self._calls[name] = n + 1
            site = name if n == 0 else f"{name}_{n}"
            self.zeros[site] = self.zeros.get(site, 0) + int((output == 0).sum())
            self.totals[site] = self.totals.get(site, 0) + output.numel()

        return hook

    def new_forward(self) -> None:
        self._calls.clear()

    def fractions(self) -> OrderedDict[str, float]:
        return OrderedDict((k, self.zeros[k] / self.totals[k]) for k in self.zeros)

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@torch.inference_mode()
def zero_fractions(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> OrderedDict[str, float]:
    """Fraction of exact zeros at every ReLU call site of ``model`` over ``batches`` (eval mode)."""
    model.eval()
    counter = ZeroCounter(model)
    try:
        for batch in batches:
            counter.new_forward()
            model(batch)
    finally:
        counter.close()
    return counter.fractions()


def _image_source(
    images: list[Path] | None, split: str | None, limit: int | None, data_dir: Path
) -> tuple[list, object, int, str]:
    """``([full image], None, 0, description)`` for image files, ``([], manifest, count, description)``
    for the first ``count`` images of ``split`` (loaded per run, with its preprocessing)."""
    if images:
        missing = [str(p) for p in images if not Path(p).is_file()]
        if missing:
            raise CarsTLError(f"image(s) not found: {', '.join(missing)}")
        return [open_image(Path(p)) for p in images], None, 0, f"{len(images)} image(s)"
    if not split:
        raise CarsTLError("give images with --image, or --split test --limit N")
    if limit is not None and limit < 1:
        raise CarsTLError(f"--limit must be positive, got {limit}")
    manifest = manifests.load_manifest(data_dir)
    total = len(manifest.split(split))
    count = total if not limit else min(limit, total)
    return [], manifest, count, f"the first {count} {split} images"


def _split_batches(run, manifest, split: str, count: int, batch_size: int):
    """The first ``count`` images of ``split`` as ``run`` sees them (its transform, crop and margin),
    through the data path's loader and :func:`loaders.batch_to_device`, as every stage moves them."""
    dataset = loaders.eval_dataset(manifest, split, run.spec, "cpu", run.crop, run.margin)
    for images, _, _, bad in loaders.eval_loader(dataset, range(count), batch_size, 0, "cpu", run.spec):
        raise_bad(bad)
        yield loaders.batch_to_device(images, "cpu", run.spec)


@locks.reads(
    "sparsity",
    lambda a: (
        manifests.dataset_roots(a["images"])
        if a["images"]
        else [devkit.stanford_root(a["data_dir"])]
        if a["split"]
        else []
    ),
)
def measure(
    run_dirs: list[Path],
    *,
    images: list[Path] | None = None,
    split: str | None = None,
    limit: int | None = 32,
    data_dir: Path = Path("data"),
    out: Path = names.DEFAULT_SPARSITY_FOLDER,
    batch_size: int = 16,
    progress: Progress = NULL,
) -> dict:
    """Measure every run, write ``sparsity.csv``, ``sparsity.json`` and ``sparsity.png`` under ``out``."""
    if not run_dirs:
        raise CarsTLError("no --model given", "pass --model artifacts/runs/<name> (repeatable)")
    pictures, manifest, count, described = _image_source(images, split, limit, data_dir)
    cache: dict = {}
    results: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()
    with progress.task("sparsity", total=len(run_dirs), unit="model") as task:
        for run_dir in run_dirs:
            run = load_run(Path(run_dir), cache)
            if manifest is not None:
                batches = _split_batches(run, manifest, split, count, batch_size)
            else:
                batches = (
                    torch.stack([run.tensor(image) for image in pictures[i : i + batch_size]])
                    for i in range(0, len(pictures), batch_size)
                )
            with runtime.autocast("cpu", run.precision_used):
                results[run.name] = zero_fractions(run.body, batches)
            task.advance(1)
    out = check_output_path(Path(out), "folder")
    summary = {
        "images": described,
        "models": {name: dict(v) for name, v in results.items()},
        "layers": list(next(iter(results.values()))),
    }
    with locks.writer_lock(out, "sparsity"):
        out.mkdir(parents=True, exist_ok=True)
        _write(out, summary, results, described)
    summary["files"] = {k: str(out / f"sparsity.{k}") for k in ("csv", "json", "png")}
    return summary


def _write(out: Path, summary: dict, results, described: str) -> None:
    """sparsity.json, .csv and .png, each atomically (the caller holds the folder's writer lock)."""
    atomic_write_text(out / "sparsity.json", json.dumps(summary, indent=2))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["position", "layer", *results])
    all_layers = list(OrderedDict.fromkeys(layer for v in results.values() for layer in v))
    for i, layer in enumerate(all_layers):
        writer.writerow([i, layer, *(f"{v[layer]:.6f}" if layer in v else "" for v in results.values())])
    atomic_write_text(out / "sparsity.csv", buffer.getvalue())
    plot(results, out / "sparsity.png", described)


PER_ROW = 25


def plot(results: OrderedDict[str, OrderedDict[str, float]], path: Path, described: str) -> None:
    """Grouped bars: x = ReLU call in forward order, one colour per model; long nets wrap onto rows."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = list(OrderedDict.fromkeys(layer for v in results.values() for layer in v))
    rows = max(1, math.ceil(len(layers) / PER_ROW))
    per_row = math.ceil(len(layers) / rows)
    width = 0.8 / len(results)
    fig, axes = plt.subplots(rows, 1, figsize=(16, 3.9 * rows + 0.9), dpi=110, squeeze=False)
    for r, ax in enumerate(axes[:, 0]):
        chunk = layers[r * per_row : (r + 1) * per_row]
        x = np.arange(len(chunk))
        for i, (name, values) in enumerate(results.items()):
            ax.bar(
                x - 0.4 + width * (i + 0.5),
                [values.get(layer, np.nan) for layer in chunk],
                width,
                label=name,
                color=f"C{i}",
            )
        ax.set_xticks(x)
        ax.set_xticklabels(chunk, rotation=60, ha="right", fontsize=8)
        ax.set_xlim(-0.6, per_row - 0.4)
        ax.set_ylim(0, 1)
        ax.set_ylabel("fraction of zeros")
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("ReLU call, in forward order")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=min(4, len(labels)), fontsize=9, frameon=False)
    fig.suptitle(f"Fraction of exactly-zero ReLU outputs per call ({described})", x=0.01, ha="left", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
