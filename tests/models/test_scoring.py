"""Loss and accuracy bookkeeping stays on the device and is read back once per result."""

from __future__ import annotations

import pytest
import torch

from cars_tl.models.scoring import Meter


def test_meters_read_the_device_once_per_result(monkeypatch):
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or real(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("Meter.add must not sync with .item()"))
    meter = Meter()
    for _ in range(50):
        meter.add(torch.randn(8, 10), torch.randint(0, 10, (8,)))
    assert reads == []
    meter.result("train")
    assert reads == [1]
