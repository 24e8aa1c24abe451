"""The weighted kNN vote (see :mod:`cars_tl.stages.knn`), shared by ``knn`` and ``predict --split``,
which scores a knn run again from its feature cache."""

from __future__ import annotations

import numpy as np
import torch

from cars_tl.core.errors import CarsTLError, check_number
from cars_tl.core.progress import NULL, Progress

DEFAULT_K = (20,)
DEFAULT_TEMPERATURE = 0.07
CHUNK = 1024


def _unit_rows(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def knn_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    ks: tuple[int, ...],
    temperature: float,
    num_classes: int,
    chunk: int = CHUNK,
    progress: Progress = NULL,
) -> dict[int, np.ndarray]:
    """Per k, the (n_test, num_classes) summed vote weights of the k nearest training images.

    Each row is scaled by ``exp(-top similarity / T)`` (the nearest neighbour weighs 1): the vote,
    its ranking and its shares are those of ``exp(similarity / T)``, without overflow for any T > 0.
    """
    if len(train_x) == 0:
        raise CarsTLError("the train split is empty: kNN needs training images to vote")
    largest = max(ks)
    if largest > len(train_x):
        raise CarsTLError(
            f"--k {largest} is larger than the train split ({len(train_x)} images)",
            f"use --k {min(DEFAULT_K[0], len(train_x))} or any value up to {len(train_x)}",
        )
    check_number(
        "--temperature",
        temperature,
        minimum=0,
        exclusive_minimum=True,
        hint=f"e.g. --temperature {DEFAULT_TEMPERATURE}",
    )
    train = _unit_rows(train_x)
    labels = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    out = {k: np.zeros((len(test_x), num_classes), dtype=np.float32) for k in ks}
    with torch.inference_mode(), progress.task("knn", total=len(test_x), unit="img") as task:
        for start in range(0, len(test_x), chunk):
            query = _unit_rows(test_x[start : start + chunk])
            similarity, index = (query @ train.T).topk(largest, dim=1)  # sorted, most similar first
            # Shift by each row's largest similarity (the first: sorted) before the exponent, as a
            # log-sum-exp does: exp(cos / T) overflows float32 for T below about 0.0113.
            # In float64: a T below float32's smallest number (~1.4e-45) would round to 0 there.
            weight = (similarity - similarity[:, :1]).double().div_(temperature).exp_()
            neighbour_labels = labels[index]
            for k in ks:
                votes = torch.zeros(len(query), num_classes, dtype=torch.float64)
                votes.scatter_add_(1, neighbour_labels[:, :k], weight[:, :k])
                out[k][start : start + len(query)] = votes.numpy()
            task.advance(len(query))
    return out


def vote_shares(votes: np.ndarray) -> np.ndarray:
    """Each class's share of an image's summed vote weight (0 where nothing voted): the saved scores."""
    total = votes.sum(axis=1, keepdims=True)
    return np.divide(votes, total, out=np.zeros_like(votes), where=total > 0)
