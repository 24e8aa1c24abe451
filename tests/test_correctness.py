"""Correctness review (issue 14): standardization, SVM ranking, seeds, resume, checkpoints, CUDA path.

CUDA items run their code paths with test doubles here (no GPU on this machine): the arguments the
loaders get, the host syncs per epoch, the backend flags, the device checks.
"""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from conftest import TINY

from cars_tl.artifacts import features, names, runs
from cars_tl.core import runtime
from cars_tl.core.errors import CarsTLError
from cars_tl.data import loaders, transforms
from cars_tl.models import backbones, training
from cars_tl.models.scoring import Meter
from cars_tl.models.svm import model as svm
from cars_tl.stages import finetune as ft
from cars_tl.stages import train_head as heads

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- 1. standardization


def _relu_features_with_a_dead_unit(seed=0, n_per_class=40, classes=4, dim=16):
    """Separable ReLU features; unit 0 is dead (exactly 0) on train but fires on test."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (classes, dim))

    def draw(n):
        y = np.repeat(np.arange(classes), n)
        x = np.maximum(centers[y] + rng.normal(0, 1, (len(y), dim)), 0).astype(np.float32)
        return x, y

    x_train, y_train = draw(n_per_class)
    x_test, y_test = draw(n_per_class // 2)
    x_train[:, 0] = 0.0
    x_test[:, 0] = rng.uniform(0.5, 2.0, len(x_test))  # a unit that woke up: must not get a 1e6 gain
    return x_train, y_train, x_test, y_test


def _cache(tmp_path, x_train, y_train, x_test, y_test):
    classes = int(y_train.max()) + 1
    attrs = {
        "backbone": "toy",
        "weights": "random",
        "weights_digest": "0",
        "transform": {"crop": 8},
        "crop": "full",
        "margin": 0.0,
        "precision": "fp32",
        "class_names": [f"c{i}" for i in range(classes)],
        "num_classes": classes,
        "feature_dim": x_train.shape[1],
        "dataset_fingerprint": "f",
        "versions": {},
        "options": {},
        "skip_bad": False,
    }
    split = lambda x, y: features.SplitArrays(x, y, np.arange(len(y)), [f"{i}.jpg" for i in range(len(y))], [])  # noqa: E731
    return features.write(tmp_path / "toy.h5", attrs, {"train": split(x_train, y_train), "test": split(x_test, y_test)})


def test_a_feature_constant_on_train_gets_scale_one(tmp_path):
    data = _relu_features_with_a_dead_unit()
    path = _cache(tmp_path, *data)
    _, m = heads.train_head(path, preset="tuned", out=tmp_path / "head")
    assert m["final"]["test_acc"] >= 90, m["final"]
    model = svm.fit_model(data[0], data[1], "rbf", 1.0, 3, "scale", 0.0, "standard")
    assert model.scaler.std[0] == 1.0
    assert (model.predict(data[2]) == data[3]).mean() >= 0.9


def test_the_probe_standardizes_with_the_rows_it_trains_on(tmp_path, monkeypatch):
    data = _relu_features_with_a_dead_unit()
    path = _cache(tmp_path, *data)
    seen = []
    real = heads.standardization
    monkeypatch.setattr(heads, "standardization", lambda x: seen.append(len(x)) or real(x))
    heads.train_head(path, preset="tuned", out=tmp_path / "head")
    fit_idx, val_idx = training.stratified_split(data[1], 0.1, 0)
    assert seen == [len(fit_idx), len(data[1])]  # the selection fits without the validation rows


# --------------------------------------------------------------------------- 2. SVM ranking = SVC.predict


def _loaded_svm_scores(model: svm.SVMModel, x: np.ndarray, classes: int) -> np.ndarray:
    raw = model.ranking_scores(x)
    out = np.full((len(x), classes), -np.inf)
    out[:, model.classes] = raw
    return out


def test_rank_one_is_what_the_svm_predicts_even_when_votes_tie():
    rng = np.random.default_rng(0)
    classes = 20
    x = rng.normal(size=(200, 8))
    y = np.arange(200) % classes
    model = svm.fit_model(x, y, "rbf", 1.0, 3, "scale", 0.0, "l2")
    queries = rng.normal(size=(400, 8))
    predicted = model.predict(queries)
    raw_argmax = model.classes[model.decision_function(queries).argmax(1)]
    assert (raw_argmax != predicted).any(), "the data must contain vote ties for this test to mean anything"
    np.testing.assert_array_equal(model.classes[_loaded_svm_scores(model, queries, classes).argmax(1)], predicted)


def test_predict_top1_equals_the_svm_on_real_images(demo_svm_run, demo_dir):
    from cars_tl.data import manifest as manifests
    from cars_tl.data.images import open_image
    from cars_tl.stages.predict import predict

    manifest = manifests.load_manifest(demo_dir)
    images = [manifest.root / r.path for r in manifest.split("test")[:24]]
    result = predict(images, run_dirs=[demo_svm_run], top_k=3)
    model = svm.load_model(runs.model_file(demo_svm_run))
    loaded = __import__("cars_tl.models.inference", fromlist=["load_run"]).load_run(demo_svm_run)
    with torch.inference_mode():
        feats = loaded.body(torch.stack([loaded.transform(open_image(p)) for p in images])).double().numpy()
    want = model.predict(feats)
    got = [r["predictions"][loaded.name]["top"][0]["label"] for r in result]
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- 6. seeds


def test_seed_changes_the_random_initialisation_and_zero_keeps_the_old_one():
    default = backbones.build_backbone("resnet18", "random", 64)
    zero = backbones.build_backbone("resnet18", "random", 64, seed=0)
    one = backbones.build_backbone("resnet18", "random", 64, seed=1)
    assert default.weights_digest == zero.weights_digest != one.weights_digest
    head0 = backbones.classifier_model(zero, 6).head.weight
    head1 = backbones.classifier_model(zero, 6, seed=1).head.weight
    assert not torch.equal(head0, head1)


def test_finetune_seeds_reach_the_model(demo_dir, tmp_path):
    _, a = ft.finetune(demo_dir, unfreeze="all", epochs=1, batch_size=32, seed=0, out=tmp_path / "a", **TINY)
    _, b = ft.finetune(demo_dir, unfreeze="all", epochs=1, batch_size=32, seed=1, out=tmp_path / "b", **TINY)
    assert a["backbone"]["weights_digest"] != b["backbone"]["weights_digest"]
    assert a["history"][0]["test_loss"] != b["history"][0]["test_loss"]  # before any step: the initialisation differs


# --------------------------------------------------------------------------- 7. resume holes


def _weights(run_dir: Path) -> dict:
    return runs.load_checkpoint(run_dir / ft.MODEL_FILE)


@pytest.mark.slow
def test_augmentation_does_not_depend_on_the_worker_count(demo_dir, tmp_path):
    common = dict(TINY, unfreeze="layer4", epochs=1, batch_size=32, augment="standard", seed=3)
    ft.finetune(demo_dir, out=tmp_path / "w0", **dict(common, workers=0))
    ft.finetune(demo_dir, out=tmp_path / "w2", **dict(common, workers=2))
    w0, w2 = _weights(tmp_path / "w0"), _weights(tmp_path / "w2")
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


def test_more_epochs_on_resume_continue_a_constant_schedule(demo_dir, tmp_path):
    common = dict(TINY, unfreeze="none", batch_size=32, seed=0)
    ft.finetune(demo_dir, epochs=2, out=tmp_path / "straight", **common)
    ft.finetune(demo_dir, epochs=1, out=tmp_path / "extended", **common)
    _, m = ft.finetune(demo_dir, epochs=2, resume=True, out=tmp_path / "extended", **common)
    assert m["resumed_with_changes"] == {"epochs": [1, 2]} and "optimizer_restarted" not in m
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "extended")
    last_a = runs.load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    last_b = runs.load_checkpoint(tmp_path / "extended" / "checkpoints" / "last.pt")
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])  # same as never stopping
    assert set(a) == set(b)


def test_more_epochs_on_resume_are_refused_for_a_cosine_schedule(demo_dir, tmp_path):
    common = dict(TINY, unfreeze="none", batch_size=32, preset="tuned", augment="none")
    ft.finetune(demo_dir, epochs=1, out=tmp_path / "r", **common)
    for force in (False, True):
        with pytest.raises(CarsTLError, match="laid out over 1 epochs") as err:
            ft.finetune(demo_dir, epochs=3, resume=True, force=force, out=tmp_path / "r", **common)
        assert "--epochs 1" in err.value.hint


# --------------------------------------------------------------------------- 8. CUDA devices (doubles)


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


# --------------------------------------------------------------------------- 9. best/last checkpoints


def test_a_kill_between_last_and_best_is_mended_on_resume(demo_dir, tmp_path):
    common = dict(TINY, unfreeze="none", batch_size=32)
    run_dir = tmp_path / "r"
    ft.finetune(demo_dir, epochs=1, out=run_dir, **common)
    last = runs.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["best"]["epoch"] == 1
    # As if killed after last.pt was written but before best.pt: best.pt still holds an older epoch.
    stale = {k: torch.zeros_like(v) for k, v in last["model"].items()}
    runs.save_checkpoint(run_dir / "checkpoints" / "best.pt", {"model": stale, "epoch": 0, "config": last["config"]})
    _, m = ft.finetune(demo_dir, epochs=1, resume=True, out=run_dir, **common)
    kept = _weights(run_dir)
    assert all(torch.equal(kept[k], last["model"][k]) for k in kept)
    assert m["final"]["best_epoch"] == 1


def test_the_kept_model_must_be_of_the_best_epoch(tmp_path):
    model = torch.nn.Linear(2, 2)
    runs.save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), "epoch": 1})
    runs.save_checkpoint(tmp_path / "last.pt", {"model": model.state_dict(), "epoch": 3})
    with pytest.raises(CarsTLError, match="checkpoints disagree"):
        ft._best_weights({"epoch": 2}, tmp_path / "last.pt", tmp_path / "best.pt", model)


# --------------------------------------------------------------------------- 10. throughput on a fast GPU (doubles)


def test_cuda_loaders_keep_workers_and_pin_memory(demo_dir, monkeypatch):
    from cars_tl.data import manifest as manifests
    from cars_tl.data.dataset import CarsDataset

    manifest = manifests.load_manifest(demo_dir)
    dataset = CarsDataset(manifest, "train", None)
    loader = loaders.make_loader(dataset, 8, 3, "cuda")
    assert loader.num_workers == 3 and loader.persistent_workers and loader.pin_memory and loader.prefetch_factor == 4
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda _: set(range(16)))
    assert loaders.default_workers("cuda") == 16 and loaders.default_workers("cpu") == 4


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


def test_an_epoch_reads_the_running_figures_once_per_log_interval(demo_dir, tmp_path, monkeypatch):
    calls = []
    real = Meter.running
    monkeypatch.setattr(Meter, "running", lambda self: calls.append(1) or real(self))
    monkeypatch.setattr(ft, "LOG_EVERY", 2)
    ft.finetune(demo_dir, unfreeze="none", epochs=1, batch_size=16, out=tmp_path / "r", **TINY)
    assert len(calls) == (144 // 16) // 2
    assert "scaler" in runs.load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")


# --------------------------------------------------------------------------- 11. skops, 12. cache names


def test_skops_with_the_cve_fix_is_required():
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())
    skops = next(d for d in spec["project"]["dependencies"] if d.startswith("skops"))
    assert re.fullmatch(r"skops>=0\.(1[2-9]|[2-9]\d)(\.\d+)?", skops.split("#")[0].strip())
    installed = tuple(int(v) for v in md.version("skops").split(".")[:2])
    assert installed >= (0, 12)


def test_default_cache_names_differ_for_every_array_changing_option(tmp_path):
    spec = backbones.build_backbone("resnet18", "random", 64).transform
    bigger = backbones.build_backbone("resnet18", "random", 96).transform
    paths = {
        names.features_path(tmp_path, "resnet18", "random", "full", spec, 0.0, "fp32"),
        names.features_path(tmp_path, "resnet18", "random", "full", spec, 0.0, "bf16"),
        names.features_path(tmp_path, "resnet18", "random", "full", bigger, 0.0, "fp32"),
        names.features_path(tmp_path, "resnet18", "random", "box", spec, 0.0, "fp32"),
        names.features_path(tmp_path, "resnet18", "random", "box", spec, 0.1, "fp32"),
    }
    assert len(paths) == 5
    assert names.features_path(tmp_path, "resnet18", "random", "full", spec, 0.0, "fp32").name.startswith(
        "resnet18-random-full-64px-fp32-"
    )


def test_a_seeded_fine_tune_from_a_head_keeps_the_backbone_of_its_features(demo_dir, demo_head_run, tmp_path):
    # Model D on random weights (the demo): seed 1 must not rebuild another random backbone than the
    # one the head's features came from; the head's own accuracy is epoch 0's.
    _, m = ft.finetune(
        demo_dir,
        unfreeze="layer4",
        init_head=demo_head_run,
        epochs=1,
        batch_size=32,
        seed=1,
        out=tmp_path / "d",
        **TINY,
    )
    assert m["backbone"]["weights_digest"] == runs.read_metrics(demo_head_run)["backbone"]["weights_digest"]
    assert m["history"][0]["test_acc"] == pytest.approx(runs.read_metrics(demo_head_run)["final"]["test_acc"], abs=1e-6)
