"""Device and precision choices: a CUDA index checked against the device count, bf16 judged on the requested device, fp32 meaning fp32 on CUDA."""

from __future__ import annotations

import pytest
import torch

from cars_tl.core import runtime
from cars_tl.core.errors import CarsTLError


def test_cuda_index_is_checked_against_the_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(CarsTLError, match="has 2 CUDA device") as err:
        runtime.resolve_device("cuda:2")
    assert "cuda:0, cuda:1" in err.value.message


def test_bf16_is_judged_on_the_requested_device(monkeypatch):
    capability = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability[torch.device(d).index or 0])
    assert runtime.resolve_precision("auto", "cuda:0") == "bf16"
    assert runtime.resolve_precision("auto", "cuda:1") == "fp16"
    with pytest.raises(CarsTLError, match="no native bf16"):
        runtime.resolve_precision("bf16", "cuda:1")


def test_fp32_means_fp32_on_cuda():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        runtime.prepare_device("cuda", "fp32")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
        runtime.prepare_device("cuda", "bf16")
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved
