"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar T > 0
divides a model's logits, softmax(z / T); T is fitted by minimising the negative log-likelihood on held-out
logits. Dividing by T never changes a row's ranking, so accuracy and top-k stay as they were.

Expected calibration error (ECE): top-1 confidences put into ``bins`` equal-width bins over (0, 1]
(bin m holds ((m-1)/M, m/M]); ECE = sum over bins of |bin| / n * |accuracy(bin) - mean confidence(bin)|.
Everything is computed in float64.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15
LBFGS_MAX_ITER = 100


def _as_tensors(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(np.asarray(logits), dtype=torch.float64), torch.as_tensor(np.asarray(labels)).long()


def probabilities(logits, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T), float64."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return (z / temperature).softmax(1).numpy()


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / T)."""
    z, y = _as_tensors(logits, labels)
    return float(F.cross_entropy(z / temperature, y))


@dataclasses.dataclass(frozen=True)
class Reliability:
    """Per-bin counts, accuracy (fraction) and mean top-1 confidence; empty bins hold NaN."""

    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray

    @property
    def ece(self) -> float:
        n = self.counts.sum()
        full = self.counts > 0
        gaps = np.abs(self.accuracy[full] - self.confidence[full])
        return float((self.counts[full] / n * gaps).sum()) if n else float("nan")


def reliability(probs, labels, bins: int = ECE_BINS) -> Reliability:
    """Top-1 confidence and correctness of each row of ``probs`` (n, classes), binned as the module says."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
    return Reliability(np.linspace(0.0, 1.0, bins + 1), counts, accuracy, mean_confidence)


def ece(probs, labels, bins: int = ECE_BINS) -> float:
    """Expected calibration error of ``probs`` (n, classes) against ``labels`` (a fraction, 0..1)."""
    return reliability(probs, labels, bins).ece


def fit_temperature(logits, labels) -> float:
    """The T minimising :func:`nll` on (``logits``, ``labels``): L-BFGS on log T (so T stays positive),
    starting at T = 1, strong-Wolfe line search; deterministic."""
    z, y = _as_tensors(logits, labels)
    if not len(y):
        raise ValueError("no rows to fit a temperature on")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t],
        lr=1.0,
        max_iter=LBFGS_MAX_ITER,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"the fitted temperature is {temperature}")
    return temperature
