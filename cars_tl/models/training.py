"""What the training stages share: optimizers, stratified validation splits, divergence checks and
scoring image batches with a model (train-head, finetune; predict scores saved runs with it too)."""

from __future__ import annotations

import math

import numpy as np
import torch

from cars_tl.core import runtime
from cars_tl.core.errors import CarsTLError
from cars_tl.data import loaders
from cars_tl.data.dataset import raise_bad

LBFGS_ITERATIONS = 20


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "lbfgs":
        return torch.optim.LBFGS(
            params, lr=lr, max_iter=LBFGS_ITERATIONS, history_size=20, line_search_fn="strong_wolfe"
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``fraction`` of each class (at least one where a class has two or more)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        k = int(round(fraction * len(idx)))
        k = max(1, k) if len(idx) > 1 and fraction > 0 else k
        val.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


class DivergedError(CarsTLError):
    """Training produced a non-finite loss (train-head, finetune): the run is marked failed at that epoch."""


def check_finite_loss(loss: float, epoch: int, what: str) -> None:
    if not math.isfinite(loss):
        raise DivergedError(
            f"{what} diverged: the training loss became {loss} in epoch {epoch}",
            "lower --lr (or check the features for NaN/Inf with cars-tl inspect) and rerun with --force",
        )


@torch.no_grad()
def score_batches(
    score, loader, records, device: str = "cpu", precision: str = "fp32", spec: dict | None = None, progress=None
):
    """(ids, labels, scores) of every image a loader yields; ``score`` maps an image batch to (n, classes).

    ``records`` are the loader's dataset records (positions index them); an unreadable image raises.
    Batches reach ``device`` through :func:`loaders.batch_to_device` (``spec``: the transform, whose
    mean and std normalize the accelerator path's uint8 batches there).
    """

    ids, labels, scores = [], [], []
    for images, batch_labels, positions, bad in loader:
        raise_bad(bad)
        images = loaders.batch_to_device(images, device, spec or {})
        with runtime.autocast(device, precision):
            out = score(images)
        scores.append(out.double().cpu())
        labels.append(torch.as_tensor(batch_labels))
        ids.extend(records[int(p)].index for p in positions)
        if progress is not None:
            progress.advance(len(positions))
    n_classes = scores[0].shape[1] if scores else 0
    return (
        np.array(ids, dtype=np.int64),
        torch.cat(labels).numpy() if labels else np.zeros(0, np.int64),
        torch.cat(scores).numpy() if scores else np.zeros((0, n_classes)),
    )
