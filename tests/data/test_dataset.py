"""The Dataset over a manifest split: tensors, labels and positions, box crops, unreadable images marked for the caller."""

from __future__ import annotations

import pytest
from helpers import copy_demo_without_manifest

from cars_tl.core.errors import BadImageError
from cars_tl.data import manifest as manifests
from cars_tl.data.dataset import BadItem, CarsDataset, collate_marking_bad, raise_bad


def test_dataset_yields_tensor_label_position(demo_dir):
    from cars_tl.data.transforms import eval_transform

    manifest = manifests.load_manifest(demo_dir)
    spec = {"resize": 40, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    dataset = CarsDataset(manifest, "test", eval_transform(spec))
    image, label, position = dataset[3]
    assert tuple(image.shape) == (3, 32, 32)
    assert label == manifest.split("test")[3].label and position == 3


def test_box_crop_with_margin(demo_dir):
    manifest = manifests.load_manifest(demo_dir)
    record = manifest.split("train")[0]
    x1, y1, x2, y2 = record.box
    tight = CarsDataset(manifest, "train", crop="box").load(0)
    assert tight.size == (x2 - x1 + 1, y2 - y1 + 1)
    wide = CarsDataset(manifest, "train", crop="box", margin=0.1).load(0)
    assert wide.size[0] > tight.size[0] and wide.size[0] <= record.width


def test_mark_bad_hands_unreadable_images_to_the_caller(demo_dir, tmp_path):
    import torch

    root = copy_demo_without_manifest(demo_dir, tmp_path)
    manifest = manifests.build_manifest(root)
    victim = manifest.root / manifest.split("train")[1].path
    victim.write_bytes(victim.read_bytes()[:200])
    transform = lambda im: torch.zeros(3, 8, 8)  # noqa: E731
    strict = CarsDataset(manifest, "train", transform)
    with pytest.raises(BadImageError, match="00002.jpg|cars_train"):
        strict[1]
    marking = CarsDataset(manifest, "train", transform, mark_bad=True)
    assert isinstance(marking[1], BadItem) and marking[1].path.endswith(manifest.split("train")[1].path)
    images, labels, positions, bad = collate_marking_bad([marking[i] for i in range(4)])
    assert positions.tolist() == [0, 2, 3] and images.shape[0] == 3 and [b.position for b in bad] == [1]
    with pytest.raises(BadImageError):
        raise_bad(bad)
