"""The accelerator's data path on the CPU: worker processes, uint8 batches normalized after the
transfer, non_blocking copies. ``CARS_TL_DATA_PATH=accelerator`` selects it whatever the device, so
every stage that feeds images to a network runs through it here and must give what the CPU's
path gives. A test double around ``Tensor.to`` counts the copies cars_tl asks for."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
import torch
from helpers import tiny

from cars_tl.artifacts import features, runs
from cars_tl.core import runtime
from cars_tl.core.errors import CarsTLError
from cars_tl.data import loaders, transforms
from cars_tl.models import backbones
from cars_tl.stages import finetune as ft


class CopyRecorder:
    """Wraps ``Tensor.to``: every copy that cars_tl code asks for, with its caller and whether it
    is non_blocking (a blocking copy to a GPU waits for the device: a host sync)."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        original = torch.Tensor.to
        marker = os.sep + "cars_tl" + os.sep

        def to(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if marker in caller.co_filename:
                self.calls.append(
                    {
                        "caller": caller.co_name,
                        "dtype": tensor.dtype,
                        "shape": tuple(tensor.shape),
                        "non_blocking": bool(kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True)),
                    }
                )
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(loaders, "_NORMALIZERS", {})  # a fresh cache: count its copies

    def blocking(self) -> list[dict]:
        return [c for c in self.calls if not c["non_blocking"]]

    def assert_no_per_batch_sync(self, min_batches: int) -> None:
        images = [c for c in self.calls if c["caller"] == "batch_to_device"]
        assert len(images) >= min_batches and all(c["dtype"] == torch.uint8 for c in images)
        # The only blocking copies: the mean and the std, once for the device (not per batch).
        assert [(c["caller"], c["shape"]) for c in self.blocking()] == [("_normalizer", (1, 3, 1, 1))] * 2


@pytest.fixture(scope="module")
def accel_features(demo_dir, tmp_path_factory):
    """The demo's features extracted through the accelerator's path (one worker process)."""
    from cars_tl.stages.extract import extract_features

    out = tmp_path_factory.mktemp("accel") / "accel.h5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(loaders.DATA_PATH_ENV, "accelerator")
        extract_features(demo_dir, splits=("train", "test"), out=out, **tiny(batch_size=32, workers=1))
    return out


def test_the_data_path_is_decided_in_one_place(monkeypatch):
    monkeypatch.delenv(loaders.DATA_PATH_ENV, raising=False)
    assert (
        loaders.data_path("cpu") == loaders.DataPath(False, False) and loaders.data_path("cpu").batch_dtype == "float"
    )
    assert (
        loaders.data_path("cuda:1") == loaders.DataPath(True, True) and loaders.data_path("cuda").batch_dtype == "uint8"
    )
    monkeypatch.setenv(loaders.DATA_PATH_ENV, "accelerator")
    assert loaders.data_path("cpu") == loaders.DataPath(True, False)  # no pinned memory without CUDA
    assert loaders.default_workers("cpu") == runtime.usable_cores()  # the accelerator's worker rule
    monkeypatch.setenv(loaders.DATA_PATH_ENV, "cpu")
    assert loaders.data_path("cuda") == loaders.DataPath(False, False)
    monkeypatch.setenv(loaders.DATA_PATH_ENV, "gpu")
    with pytest.raises(CarsTLError, match="valid: accelerator, cpu"):
        loaders.data_path("cpu")


def test_batch_to_device_normalizes_uint8_like_the_cpu_path(monkeypatch):
    recorder = CopyRecorder(monkeypatch)
    spec = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        out = loaders.batch_to_device(pixels, "cpu", spec)
    want = (pixels.float() / 255 - torch.tensor(spec["mean"]).view(1, 3, 1, 1)) / torch.tensor(spec["std"]).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    recorder.assert_no_per_batch_sync(min_batches=3)


def test_extract_features_through_the_accelerator_path_equals_the_cpu_path(
    demo_dir, demo_features, tmp_path, monkeypatch
):
    """What crashed on CUDA: uint8 batches reached the network unnormalized."""
    from cars_tl.stages import extract

    prepared = []
    monkeypatch.setattr(runtime, "prepare_device", lambda device, precision: prepared.append((device, precision)))
    monkeypatch.setenv(loaders.DATA_PATH_ENV, "accelerator")
    recorder = CopyRecorder(monkeypatch)
    extract.extract_features(demo_dir, splits=("test",), out=tmp_path / "f.h5", **tiny(batch_size=16))
    assert prepared == [("cpu", "fp32")]  # backend settings as finetune makes them
    recorder.assert_no_per_batch_sync(min_batches=5)  # 72 test images in batches of 16
    got, want = features.load(tmp_path / "f.h5", ("test",)).split("test"), features.load(demo_features).split("test")
    assert (got.ids == want.ids).all() and (got.labels == want.labels).all()
    np.testing.assert_allclose(got.features, want.features, rtol=1e-4, atol=1e-4)


def test_extraction_asks_the_device_s_worker_default(demo_dir, tmp_path, monkeypatch):
    from cars_tl.stages import extract

    asked = []
    monkeypatch.setattr(loaders, "default_workers", lambda device="cpu": asked.append(device) or 0)
    extract.extract_features(demo_dir, splits=("test",), out=tmp_path / "f.h5", **tiny(batch_size=72, workers=None))
    assert asked == ["cpu"]


def test_worker_processes_uint8_batches_equal_the_cpu_path_for_both_splits(accel_features, demo_features):
    got, want = features.load(accel_features), features.load(demo_features)
    for split in ("train", "test"):
        assert (got.split(split).ids == want.split(split).ids).all()
        np.testing.assert_allclose(got.split(split).features, want.split(split).features, rtol=1e-4, atol=1e-4)


def test_knn_on_accelerator_path_features_equals_the_cpu_path(accel_features, demo_features, tmp_path):
    """knn never touches images and has no device branch (it runs on the CPU): it sees only the
    features, which the accelerator's path must make equal."""
    from cars_tl.stages.knn import run_knn

    _, got = run_knn(accel_features, ks=(1, 5), out=tmp_path / "a")
    _, want = run_knn(demo_features, ks=(1, 5), out=tmp_path / "c")
    assert got["k_results"] == want["k_results"]
    assert (
        runs.read_predictions(tmp_path / "a").top_classes == runs.read_predictions(tmp_path / "c").top_classes
    ).all()


def _finetune(demo_dir, out, **options):
    from cars_tl.stages.finetune import finetune

    return finetune(demo_dir, epochs=1, out=out, **tiny(batch_size=16, **{"unfreeze": "layer4", **options}))


def test_finetune_through_the_accelerator_path_equals_the_cpu_path(demo_dir, tmp_path, monkeypatch):
    # The head alone trains: inputs equal to 1e-7 stay close through an epoch (a training body's
    # BatchNorm statistics and Adam's normalized steps would amplify them to a few 1e-3).
    _, cpu = _finetune(demo_dir, tmp_path / "cpu", unfreeze="none")
    monkeypatch.setenv(loaders.DATA_PATH_ENV, "accelerator")
    recorder = CopyRecorder(monkeypatch)
    _, accel = _finetune(demo_dir, tmp_path / "accel", unfreeze="none")
    # train (9 steps of 16) + two evaluations and the final scoring of 72 test images in batches of 32
    recorder.assert_no_per_batch_sync(min_batches=9 + 3 * 3)
    labels = [c for c in recorder.calls if c["dtype"] == torch.int64]
    assert labels and all(c["non_blocking"] for c in labels)  # train and evaluation labels
    assert {c["caller"] for c in labels} >= {"train_epoch", "evaluate"}
    for a, c in zip(accel["history"], cpu["history"]):
        for key in ("train_loss", "test_loss"):
            if key in c:
                assert a[key] == pytest.approx(c[key], rel=1e-3, abs=1e-4), key
    a_state = torch.load(tmp_path / "accel" / "model.pt", weights_only=True)
    c_state = torch.load(tmp_path / "cpu" / "model.pt", weights_only=True)
    for name in c_state:
        torch.testing.assert_close(a_state[name].float(), c_state[name].float(), rtol=1e-3, atol=1e-3)
    p_a, p_c = runs.read_predictions(tmp_path / "accel"), runs.read_predictions(tmp_path / "cpu")
    np.testing.assert_allclose(p_a.top_scores, p_c.top_scores, atol=1e-3)


def test_finetune_evaluation_loaders_do_not_persist(demo_dir, tmp_path, monkeypatch):
    """Only the training loader keeps its workers across epochs; evaluation loaders live for one pass."""
    made = []
    original = loaders.make_loader

    def spy(*args, **kwargs):
        loader = original(*args, **kwargs)
        made.append(loader)
        return loader

    monkeypatch.setattr(loaders, "make_loader", spy)
    monkeypatch.setenv(loaders.DATA_PATH_ENV, "accelerator")
    _finetune(demo_dir, tmp_path / "r", workers=1, unfreeze="none")
    persistent = [loader.persistent_workers for loader in made]
    assert persistent.count(True) == 1 and len(persistent) == 2  # train; test (study: no validation split)
    assert made[persistent.index(True)].sampler.__class__ is loaders.EpochSampler


def test_predict_and_sparsity_through_the_accelerator_path(
    demo_dir, demo_finetune_run, demo_head_run, tmp_path, monkeypatch
):
    from cars_tl.stages.predict import predict_split
    from cars_tl.stages.sparsity import measure

    run = tmp_path / "ft"
    shutil.copytree(demo_finetune_run, run)
    saved = runs.read_predictions(run)
    cpu_sparsity = measure([run, demo_head_run], split="test", limit=20, data_dir=demo_dir, out=tmp_path / "s-cpu")
    monkeypatch.setenv(loaders.DATA_PATH_ENV, "accelerator")
    recorder = CopyRecorder(monkeypatch)
    predict_split([run], split="test", data_dir=demo_dir, workers=0)
    recorder.assert_no_per_batch_sync(min_batches=3)
    again = runs.read_predictions(run)
    assert (again.ids == saved.ids).all() and (again.top_classes[:, 0] == saved.top_classes[:, 0]).all()
    np.testing.assert_allclose(again.top_scores, saved.top_scores, atol=1e-4)
    accel_sparsity = measure([run, demo_head_run], split="test", limit=20, data_dir=demo_dir, out=tmp_path / "s-accel")
    for name, layers in cpu_sparsity["models"].items():
        assert list(accel_sparsity["models"][name]) == list(layers)
        np.testing.assert_allclose(list(accel_sparsity["models"][name].values()), list(layers.values()), atol=2e-3)


def test_a_single_process_cuda_n_selects_its_gpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(str(device)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:  # torch's backend flags are properties: saved and restored by hand
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = (
            False,
            True,
            True,
        )
        assert runtime.resolve_device("cuda:1") == "cuda:1"
        runtime.prepare_device("cuda:1", "fp32")
        assert chosen == ["cuda:1"]
        assert (
            torch.backends.cudnn.benchmark
            and not torch.backends.cudnn.allow_tf32
            and not torch.backends.cuda.matmul.allow_tf32
        )
        runtime.prepare_device("cuda", "bf16")  # the current device stays as it is; TF32 allowed
        assert chosen == ["cuda:1"] and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_resume_compares_the_device_type_not_its_index(demo_dir, tmp_path):
    """A run recorded on 'cuda:0' (one process) resumes with '--device cuda' (another process count)."""

    run = tmp_path / "r"
    ft.finetune(demo_dir, unfreeze="none", epochs=1, out=run, **tiny(batch_size=32))
    last = run / "checkpoints" / "last.pt"
    state = runs.load_checkpoint(last)
    config = dict(state["config"])
    recorded = dict(config, device="cuda:0")
    assert ft._resume_changes(recorded, dict(config, device="cuda"), False, last) == []
    assert ft._resume_changes(recorded, dict(config, device="cuda:1"), False, last) == []
    # The end to end check, on the CPU: the recorded config says cuda:0; resuming on the CPU is
    # another device type, and refused as such.
    state["config"] = recorded
    runs.save_checkpoint(last, state)
    with pytest.raises(CarsTLError, match="device: 'cuda:0' -> 'cpu'"):
        ft.finetune(demo_dir, unfreeze="none", epochs=2, resume=True, out=run, **tiny(batch_size=32))


def test_uint8_batches_normalized_on_the_device_equal_the_float_transform(demo_dir):
    from cars_tl.data import manifest as manifests
    from cars_tl.data.images import open_image

    manifest = manifests.load_manifest(demo_dir)
    spec = backbones.build_backbone("resnet18", "random", 64).transform
    image = open_image(manifest.root / manifest.split("test")[0].path)
    as_uint8 = transforms.eval_transform(spec, output="uint8")(image)
    assert as_uint8.dtype == torch.uint8
    on_device = loaders.batch_to_device(as_uint8[None], "cpu", spec)
    torch.testing.assert_close(on_device, transforms.eval_transform(spec)(image)[None], atol=1e-5, rtol=0)
    assert on_device.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_trunk_cache_through_the_accelerator_path_equals_its_image_path(demo_dir, tmp_path, monkeypatch):
    """The trunk cache is built through the data path's pipeline (uint8 batches normalized after the
    transfer here), not one chosen by the device's name: bit-equal to the images on that path."""
    monkeypatch.setenv(loaders.DATA_PATH_ENV, "accelerator")
    _, images = _finetune(demo_dir, tmp_path / "images")
    _, cached = _finetune(demo_dir, tmp_path / "cached", trunk_cache=str(tmp_path / "t.h5"))
    assert cached["trunk_cache"]["used"] and not images["trunk_cache"]["used"]
    a = torch.load(tmp_path / "images" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cached" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r.get("test_loss") for r in images["history"]] == [r.get("test_loss") for r in cached["history"]]
