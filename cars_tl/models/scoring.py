"""Loss and accuracy bookkeeping shared by every stage: mean cross-entropy per image, % accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Meter:
    """Accumulates mean cross-entropy, top-1 and top-5 accuracy over batches of logits.

    Sums stay on the logits' device: adding a batch never waits for the device (a GPU runs
    ahead of the host); :meth:`result` and :meth:`running` read them back, once per call.
    """

    def __init__(self):
        self.sums: torch.Tensor | None = None  # loss sum, top-1 correct, top-5 correct
        self.count = 0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        labels = labels.to(logits.device, non_blocking=True)  # already there on a device: a no-op, never a wait
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        batch = torch.stack(
            [
                F.cross_entropy(logits, labels, reduction="sum").double(),
                (top[:, 0] == labels).sum().double(),
                (top == labels[:, None]).any(dim=1).sum().double(),
            ]
        )
        self.sums = batch if self.sums is None else self.sums + batch
        self.count += len(labels)

    def _values(self) -> tuple[float, int, int]:
        if self.sums is None:
            return 0.0, 0, 0
        loss, correct, correct5 = self.sums.tolist()  # the one host sync
        return loss, int(correct), int(correct5)

    def running(self) -> tuple[float, float]:
        """(mean loss, accuracy %) so far, for progress displays."""
        loss, correct, _ = self._values()
        n = max(self.count, 1)
        return loss / n, 100.0 * correct / n

    def result(self, prefix: str) -> dict[str, float]:
        loss, correct, correct5 = self._values()
        n = max(self.count, 1)
        return {
            f"{prefix}_loss": round(loss / n, 6),
            f"{prefix}_acc": round(100.0 * correct / n, 4),
            f"{prefix}_top5": round(100.0 * correct5 / n, 4),
        }


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
    meter = Meter()
    meter.add(logits, labels)
    return meter.result(prefix)
