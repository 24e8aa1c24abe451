"""sparsity: hand-checked fractions, ResNet50's 49 named call sites, CSV/JSON/PNG outputs."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from cars_tl.models import backbones
from cars_tl.stages.sparsity import measure, zero_fractions


class TwoCalls(torch.nn.Module):
    """One ReLU module called twice, like torchvision's bottleneck calls its relu three times."""

    def __init__(self):
        super().__init__()
        self.relu = torch.nn.ReLU()
        self.act = torch.nn.ReLU6()

    def forward(self, x):
        y = self.relu(x)
        z = self.relu(x - 1.0)
        return self.act(y + z)


def test_fractions_match_a_hand_computation():
    x = torch.tensor([[-1.0, 0.5, 2.0, -3.0], [0.0, 1.5, -0.5, 3.0]])
    fractions = zero_fractions(TwoCalls(), [x[:1], x[1:]])
    assert list(fractions) == ["relu", "relu_1", "act"]
    # relu(x): zeros at -1, -3, 0, -0.5 -> 4 of 8; relu(x - 1): zeros wherever x <= 1 -> 5 of 8
    assert fractions["relu"] == pytest.approx(4 / 8)
    assert fractions["relu_1"] == pytest.approx(5 / 8)
    y = torch.relu(x) + torch.relu(x - 1)
    assert fractions["act"] == pytest.approx(float((y.clamp(0, 6) == 0).float().mean()))


def test_resnet50_has_49_named_call_sites():
    body = backbones.build_backbone("resnet50", "random").body
    names = list(zero_fractions(body, [torch.randn(1, 3, 64, 64)]))
    assert len(names) == 49
    assert names[0] == "relu" and names[1:4] == ["layer1.0.relu", "layer1.0.relu_1", "layer1.0.relu_2"]
    assert "layer3.2.relu_2" in names and names[-1] == "layer4.2.relu_2"


def test_measure_writes_csv_json_and_chart(demo_dir, demo_finetune_run, demo_head_run, demo_svm_run, tmp_path):
    runs = [demo_finetune_run, demo_head_run, demo_svm_run]
    summary = measure(runs, split="test", limit=4, data_dir=demo_dir, out=tmp_path)
    assert len(summary["models"]) == 3 and len(summary["layers"]) == 17  # resnet18: stem + 8 blocks x 2
    rows = list(csv.DictReader((tmp_path / "sparsity.csv").open()))
    assert len(rows) == 17 and rows[0]["layer"] == "relu"
    saved = json.loads((tmp_path / "sparsity.json").read_text())
    for name, values in saved["models"].items():
        assert name in rows[0] and all(0 <= v <= 1 for v in values.values())
    # head and SVM runs measure the same frozen backbone
    head, svm = saved["models"][demo_head_run.name], saved["models"][demo_svm_run.name]
    assert head == svm
    png = (tmp_path / "sparsity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_images_or_split_required(demo_head_run, tmp_path):
    from cars_tl.core.errors import CarsTLError

    with pytest.raises(CarsTLError, match="--split test --limit N"):
        measure([demo_head_run], out=tmp_path)
