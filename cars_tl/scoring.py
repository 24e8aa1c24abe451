"""Loss and accuracy bookkeeping shared by every stage: mean cross-entropy per image, % accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Meter:
    """Accumulates mean cross-entropy, top-1 and top-5 accuracy over batches of logits."""

    def __init__(self):
        self.loss_sum = 0.0
        self.correct = 0
        self.correct5 = 0
        self.count = 0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        self.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        self.correct += int((top[:, 0] == labels).sum())
        self.correct5 += int((top == labels[:, None]).any(dim=1).sum())
        self.count += len(labels)

    def result(self, prefix: str) -> dict[str, float]:
        n = max(self.count, 1)
        return {
            f"{prefix}_loss": round(self.loss_sum / n, 6),
            f"{prefix}_acc": round(100.0 * self.correct / n, 4),
            f"{prefix}_top5": round(100.0 * self.correct5 / n, 4),
        }


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
    meter = Meter()
    meter.add(logits, labels)
    return meter.result(prefix)
