"""The two batch loaders agree: the threaded CPU loader yields what the DataLoader yields."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import finetune_weights, tiny
from torch.utils.data import Subset

from cars_tl.core.errors import CarsTLError
from cars_tl.data import devkit, loaders, transforms
from cars_tl.data import manifest as manifests
from cars_tl.data.dataset import CarsDataset
from cars_tl.stages import finetune as ft

SPEC = {
    "resize": 40,
    "crop": 32,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
    "pipeline": transforms.FUSED_PIPELINE,
}


def _reference(manifest, positions, batch_size):
    dataset = CarsDataset(manifest, "test", transforms.eval_transform(SPEC), mark_bad=True)
    return list(loaders.make_loader(Subset(dataset, positions), batch_size, 0, "cpu"))


@pytest.mark.parametrize("workers", [0, 2])
def test_threaded_batches_equal_the_dataloader_batches(demo_dir, workers):
    manifest = manifests.load_manifest(demo_dir)
    positions = range(5, 72)  # an offset (a resumed split) and a short last batch
    dataset = CarsDataset(manifest, "test", transforms.eval_resize_crop(SPEC), mark_bad=True)
    threaded = loaders.ThreadedLoader(dataset, positions, 16, workers, SPEC)
    got, want = list(threaded), _reference(manifest, positions, 16)
    assert len(got) == len(want) == len(threaded) == 5
    for (images, labels, where, bad), (ref_images, ref_labels, ref_where, ref_bad) in zip(got, want):
        assert images.is_contiguous(memory_format=torch.channels_last) and images.dtype == torch.float32
        torch.testing.assert_close(images, ref_images, rtol=0, atol=1e-5)
        assert torch.equal(labels, ref_labels) and torch.equal(where, ref_where) and bad == ref_bad == []


def test_threaded_loader_marks_an_unreadable_image_and_keeps_the_others(demo_dir, tmp_path):
    shutil.copytree(demo_dir / devkit.STANFORD_DIR, tmp_path / devkit.STANFORD_DIR)
    manifest = manifests.load_manifest(tmp_path)
    (manifest.root / manifest.split("test")[6].path).write_bytes(b"not a jpeg")
    dataset = CarsDataset(manifest, "test", transforms.eval_resize_crop(SPEC), mark_bad=True)
    images, labels, where, bad = next(iter(loaders.ThreadedLoader(dataset, range(0, 8), 8, 2, SPEC)))
    assert [item.position for item in bad] == [6] and manifest.split("test")[6].path in bad[0].path
    assert where.tolist() == [0, 1, 2, 3, 4, 5, 7] and images.shape == (7, 3, 32, 32)
    ref_images, *_ = _reference(manifest, [0, 1, 2, 3, 4, 5, 7], 8)[0]
    torch.testing.assert_close(images, ref_images, rtol=0, atol=1e-5)


def test_stages_without_a_device_refuse_bad_workers(demo_dir, tmp_path):
    # predict and calibrate take --workers alone (no DeviceOptions): checked where it enters, for every kind of run.
    from cars_tl.stages.predict import predict_split

    with pytest.raises(CarsTLError, match="--workers must be >= 0, got -1"):
        predict_split([tmp_path / "no-run-read"], split="test", data_dir=demo_dir, workers=-1)


def test_pixel_normalizer_matches_to_tensor_and_normalize():
    from torchvision import transforms as T

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = np.empty((32, 32, 3), np.float32)
    transforms.PixelNormalizer(SPEC)(pixels, out)
    want = T.Normalize(SPEC["mean"], SPEC["std"])(T.ToTensor()(pixels))
    torch.testing.assert_close(torch.from_numpy(out).permute(2, 0, 1), want, rtol=0, atol=1e-5)


def test_eval_loader_picks_threads_on_the_cpu_and_the_dataloader_elsewhere(demo_dir):
    manifest = manifests.load_manifest(demo_dir)
    cpu_set = loaders.eval_dataset(manifest, "test", SPEC, "cpu")
    assert cpu_set[0][0].size == (32, 32)  # a PIL crop: the threaded loader normalizes
    cpu = loaders.eval_loader(cpu_set, [3, 1, 4], 2, 0, "cpu", SPEC)
    assert isinstance(cpu, loaders.ThreadedLoader)
    assert [p for _, _, where, _ in cpu for p in where.tolist()] == [3, 1, 4]
    cuda_set = loaders.eval_dataset(manifest, "test", SPEC, "cuda")
    assert tuple(cuda_set[0][0].shape) == (3, 32, 32)  # a normalized tensor, for worker processes
    cuda = loaders.eval_loader(cuda_set, [3, 1, 4], 2, 0, "cuda", SPEC)
    assert isinstance(cuda, torch.utils.data.DataLoader) and cuda.dataset.indices == [3, 1, 4] and cuda.pin_memory


@pytest.mark.slow
def test_augmentation_does_not_depend_on_the_worker_count(demo_dir, tmp_path):
    common = tiny(unfreeze="layer4", epochs=1, batch_size=32, augment="standard", seed=3)
    ft.finetune(demo_dir, out=tmp_path / "w0", **tiny(common, workers=0))
    ft.finetune(demo_dir, out=tmp_path / "w2", **tiny(common, workers=2))
    w0, w2 = finetune_weights(tmp_path / "w0"), finetune_weights(tmp_path / "w2")
    differing = [k for k in w0 if not torch.equal(w0[k], w2[k])]
    assert differing == []


def test_seeded_augmentation_is_a_function_of_seed_epoch_and_sample():
    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.rand(1).item()

    data = loaders.SeededAugmentation(Draw(), seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = [data[k] for k in range(10)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG stream is untouched
    assert first == [data[k] for k in range(10)] and first[:5] != first[5:]  # epochs differ, repeats agree
    sampler = loaders.EpochSampler(5, seed=7)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert sorted(k - 10 for k in keys) == list(range(5))
    again = loaders.EpochSampler(5, seed=7)
    again.set_epoch(2)
    assert list(again) == keys
    again.set_epoch(3)
    assert [k - 15 for k in again] != [k - 10 for k in keys]


def test_cuda_loaders_keep_workers_and_pin_memory(demo_dir, monkeypatch):
    from cars_tl.data import manifest as manifests
    from cars_tl.data.dataset import CarsDataset

    manifest = manifests.load_manifest(demo_dir)
    dataset = CarsDataset(manifest, "train", None)
    loader = loaders.make_loader(dataset, 8, 3, "cuda")
    assert loader.num_workers == 3 and loader.persistent_workers and loader.pin_memory and loader.prefetch_factor == 4
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda _: set(range(16)))
    assert loaders.default_workers("cuda") == 16 and loaders.default_workers("cpu") == 4
