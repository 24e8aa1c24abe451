"""train-head: the study preset, the tuned preset's folding, run directories, mismatched inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_refused, relu_features_with_a_dead_unit, rewrite_cache, run_cli, toy_cache

from cars_tl.artifacts import features, runs
from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import NULL
from cars_tl.models import training
from cars_tl.stages import train_head as heads


def test_study_preset_is_exactly_the_study():
    config = heads.resolve_preset("study")
    assert (config["epochs"], config["lr"], config["batch_size"], config["optimizer"]) == (15, 1e-3, 32, "adam")
    assert config["weight_decay"] == 0 and config["label_smoothing"] == 0 and config["schedule"] == "none"
    assert heads.resolve_preset("study", epochs=3)["epochs"] == 3
    with pytest.raises(CarsTLError, match="valid: study, tuned"):
        heads.resolve_preset("fast")


def test_head_run_directory_and_metrics(demo_head_run):
    metrics = json.loads((demo_head_run / runs.METRICS).read_text())
    assert metrics["kind"] == "head" and metrics["status"] == "complete"
    assert len(metrics["history"]) == 15
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "seconds"):
        assert key in metrics["history"][-1]
    assert metrics["params"]["trainable"] == 512 * 6 + 6
    assert metrics["params"]["total"] == 11_176_512 + 512 * 6 + 6  # resnet18 body + head
    assert metrics["inputs"]["dataset_fingerprint"] and len(metrics["inputs"]["features"]["sha256"]) == 64
    assert metrics["final"]["test_acc"] > 100 / 6  # better than chance on the demo classes


def test_saved_head_loads_straight_into_the_backbone_classifier(demo_head_run, demo_features):
    import torchvision

    model = torchvision.models.resnet18(num_classes=6)
    model.fc.load_state_dict(torch.load(demo_head_run / heads.HEAD_FILE, weights_only=True))
    cache = features.load(demo_features)
    test = cache.split("test")
    with torch.no_grad():
        accuracy = (model.fc(torch.from_numpy(test.features)).argmax(1).numpy() == test.labels).mean() * 100
    recorded = runs.read_metrics(demo_head_run)["final"]["test_acc"]
    assert accuracy == pytest.approx(recorded, abs=1e-3)


def test_tuned_preset_folds_standardization_into_the_saved_weights(demo_features, tmp_path):
    run_dir, metrics = heads.train_head(demo_features, preset="tuned", out=tmp_path / "tuned")
    assert metrics["selection"]["by"].startswith("cross-entropy on a validation split")
    assert metrics["selection"]["chosen"]["weight_decay"] in heads.WEIGHT_DECAY_GRID
    assert metrics["config"]["weight_decay"] is None  # chosen, not an option: kept out of the configuration
    assert metrics["final"]["selected_on"] == "validation"
    state = torch.load(run_dir / heads.HEAD_FILE, weights_only=True)
    test = features.load(demo_features).split("test")
    logits = torch.from_numpy(test.features) @ state["weight"].T + state["bias"]
    acc = (logits.argmax(1).numpy() == test.labels).mean() * 100
    assert acc == pytest.approx(metrics["final"]["test_acc"], abs=1e-3)


def test_no_refit_keeps_the_chosen_head_trained_on_the_fit_rows(demo_features, tmp_path):
    """--no-refit: the final head is the chosen weight decay's head on the fit rows alone (the validation
    rows held out), not the default's refit on all of train; the default's config is unchanged."""
    refit_dir, refit = heads.train_head(demo_features, preset="tuned", epochs=2, out=tmp_path / "refit")
    run_dir, m = heads.train_head(demo_features, preset="tuned", epochs=2, refit=False, out=tmp_path / "held")
    assert "refit" not in refit["config"] and m["config"]["refit"] is False
    assert m["selection"]["chosen"] == refit["selection"]["chosen"]
    assert "val_acc" in m["final"] and "val_loss" in m["history"][-1] and "val_acc" not in refit["final"]
    saved = torch.load(run_dir / heads.HEAD_FILE, weights_only=True)
    assert not torch.equal(saved["weight"], torch.load(refit_dir / heads.HEAD_FILE, weights_only=True)["weight"])
    # the same head, trained here on the fit rows alone
    cache = features.load(demo_features)
    train = cache.split("train")
    fit_idx, _ = training.stratified_split(train.labels, m["selection"]["val_fraction"], 0)
    x, y = torch.from_numpy(train.features[fit_idx]), torch.from_numpy(train.labels[fit_idx])
    mean, std = heads.standardization(x)
    from cars_tl.core import runtime

    with runtime.intra_op_threads(m["intra_op_threads"]):  # float sums split over threads differ in their last bits
        head, _ = heads.fit_head(
            heads.HeadData((x - mean) / std, y),
            {},
            heads.resolve_preset("tuned", epochs=2),
            m["selection"]["chosen"]["weight_decay"],
            cache.num_classes,
            0,
            NULL,
            "fit rows",
        )
    expected = heads._fold_standardization(head, mean, std)
    for key in ("weight", "bias"):
        torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("args", [["--preset", "study"], ["--preset", "tuned", "--weight-decay", "0.01"]])
def test_no_refit_without_a_validation_split_is_refused(demo_features, tmp_path, args):
    result = run_cli("train-head", "--features", demo_features, *args, "--no-refit", "--out", tmp_path / "h")
    assert_refused(result, "--no-refit", "holds none out", "--preset tuned --no-refit")
    assert not (tmp_path / "h").exists()


def test_stratified_split_takes_from_every_class():

    labels = np.repeat(np.arange(5), 10)
    train, val = training.stratified_split(labels, 0.2, seed=0)
    assert len(val) == 10 and set(labels[val]) == set(range(5)) and not set(train) & set(val)


def test_feature_file_without_a_test_split_is_refused(demo_features, tmp_path):
    cache = features.load(demo_features)
    path = features.write(tmp_path / "train-only.h5", cache.attrs, {"train": cache.split("train")})
    with pytest.raises(CarsTLError) as err:
        heads.train_head(path, out=tmp_path / "run")
    assert "train-only.h5" in err.value.message and "--split test" in err.value.hint


def test_not_a_feature_file_is_refused(tmp_path):
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(CarsTLError, match="not a readable HDF5"):
        heads.train_head(tmp_path / "x.h5", out=tmp_path / "run")


def test_tuned_seeds_are_one_configuration_in_the_report(demo_features, tmp_path, monkeypatch):
    """The weight decay each seed chose lives under selection, never in config: four tuned seeds, whose
    validation splits pick different values, make one report group with n=4."""
    from cars_tl.report import catalog

    picks = iter([1e-4, 1e-1, 1e-2, 1e-4])  # a different choice per seed, as small validation splits give
    original = heads.fit_head

    def fit(train, evals, config, weight_decay, *args, **kwargs):
        head, history = original(train, evals, config, weight_decay, *args, **kwargs)
        if "val" in evals:  # make the seed's pick the lowest validation loss
            history[-1]["val_loss"] = 0.0 if weight_decay == wanted[0] else 1.0 + weight_decay
        return head, history

    monkeypatch.setattr(heads, "fit_head", fit)
    artifacts = tmp_path / "artifacts"
    chosen = []
    for seed in range(4):
        wanted = [next(picks)]
        _, metrics = heads.train_head(
            demo_features, preset="tuned", seed=seed, epochs=2, out=artifacts / "runs" / f"B-tuned-seed{seed}"
        )
        chosen.append(metrics["selection"]["chosen"]["weight_decay"])
        assert metrics["config"]["weight_decay"] is None
    assert len(set(chosen)) == 3  # the seeds chose differently
    complete, problems = catalog.gather(artifacts)
    groups = catalog.seed_groups(complete)
    assert not problems and len(groups) == 1
    assert groups[0]["n"] == 4 and sorted(groups[0]["seeds"]) == [0, 1, 2, 3]
    assert groups[0]["selected_on"] == ["validation"] and not groups[0]["on_test"]


def test_the_probe_standardizes_with_the_rows_it_trains_on(tmp_path, monkeypatch):
    data = relu_features_with_a_dead_unit()
    path = toy_cache(tmp_path, *data)
    seen = []
    real = heads.standardization
    monkeypatch.setattr(heads, "standardization", lambda x: seen.append(len(x)) or real(x))
    heads.train_head(path, preset="tuned", out=tmp_path / "head")
    fit_idx, val_idx = training.stratified_split(data[1], 0.1, 0)
    assert seen == [len(fit_idx), len(data[1])]  # the selection fits without the validation rows


def test_a_head_whose_loss_diverges_fails_at_that_epoch(tmp_path, demo_features):
    cache = features.load(demo_features)
    train = cache.split("train")
    train.features[5, :] = 3e38  # finite (NaN/Inf features are refused before training), but the logits overflow
    path = features.write(tmp_path / "inf.h5", cache.attrs, cache.splits)
    with pytest.raises(training.DivergedError, match="epoch 1"):
        heads.train_head(path, out=tmp_path / "run")
    m = runs.read_metrics(tmp_path / "run")
    assert m["status"] == "failed" and "diverged" in m["error"]


def test_train_head_on_a_train_only_cache_reports_no_test(demo_features, tmp_path):
    cache = rewrite_cache(demo_features, tmp_path / "train-only.h5", test=False, dataset_splits=["train"])
    result = run_cli("train-head", "--features", cache, "--epochs", "2", "--out", tmp_path / "head")
    assert result.returncode == 0 and "Traceback" not in result.stdout, result.stdout
    assert "no test split" in result.stdout and "acc 0.00%" not in result.stdout
    m = runs.read_metrics(tmp_path / "head")
    assert m["status"] == "complete" and "test_acc" not in m["final"]


@pytest.mark.parametrize("small", [True, False])
def test_a_small_head_trains_on_one_thread_and_the_count_is_restored(demo_features, tmp_path, monkeypatch, small):
    """A head's steps are small dependent operations: on one thread they lose nothing alone and do not
    wait at barriers when other processes share the cores (README, performance). Steps with real work
    keep every thread; either way the process's thread count is what it was afterwards."""
    from cars_tl.stages import train_head as stage

    if not small:
        monkeypatch.setattr(stage, "ONE_THREAD_STEP_MACS", 0)
    before = torch.get_num_threads()
    seen = []
    real = stage.fit_head

    def recording_fit_head(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "fit_head", recording_fit_head)
    _, metrics = stage.train_head(demo_features, preset="tuned", epochs=1, out=tmp_path / "head")
    expected = 1 if small else before
    assert seen == [expected] * (len(stage.WEIGHT_DECAY_GRID) + 1)
    assert metrics["intra_op_threads"] == expected and torch.get_num_threads() == before
