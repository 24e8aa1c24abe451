"""finetune: frozen means frozen, exact resume after a kill, safe checkpoints, init from a head run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, finetune_weights, tiny

from cars_tl.artifacts import runs
from cars_tl.core.errors import CarsTLError
from cars_tl.models import backbones, training
from cars_tl.models.scoring import Meter
from cars_tl.stages import finetune as ft
from cars_tl.stages import train_head as heads


def test_study_preset_is_exactly_the_study():
    c = ft.resolve_config("study")
    assert (c["epochs"], c["lr"], c["batch_size"], c["optimizer"], c["schedule"], c["augment"]) == (
        15,
        1e-3,
        32,
        "adam",
        "none",
        "none",
    )
    assert c["weight_decay"] == 0 and c["label_smoothing"] == 0 and c["backbone_lr_scale"] == 1.0
    assert (c["resize_mode"], c["image_size"]) == ("crop", None)  # the weights' resize + center crop


def test_frozen_batchnorm_statistics_never_move(demo_finetune_run):
    fresh = backbones.build_backbone("resnet18", "random", 64).body.state_dict()
    trained = runs.load_checkpoint(demo_finetune_run / ft.MODEL_FILE)
    frozen = [k for k in fresh if not k.startswith("layer4.")]
    moved = [k for k in frozen if not torch.equal(fresh[k], trained["body." + k])]
    assert moved == [], f"frozen tensors changed: {moved[:5]}"
    assert not torch.equal(fresh["layer4.0.bn1.running_mean"], trained["body.layer4.0.bn1.running_mean"])
    assert not torch.equal(fresh["layer4.0.conv1.weight"], trained["body.layer4.0.conv1.weight"])


def test_frozen_prefix_builds_no_graph_and_stays_in_eval_mode():
    bb = backbones.build_backbone("resnet18", "random", 64)
    model = backbones.classifier_model(bb, 6)
    ft.set_trainable(model, ["layer4"])
    ft.train_mode(model)
    assert not model.body.layer3.training and not model.body.bn1.training
    assert model.body.layer4.training and model.head.training
    seen = {}
    model.body.layer3.register_forward_hook(lambda m, i, o: seen.update(layer3=o.requires_grad))
    model.body.layer4.register_forward_hook(lambda m, i, o: seen.update(layer4=o.requires_grad))
    model(torch.randn(2, 3, 64, 64))
    assert seen == {"layer3": False, "layer4": True}


def test_only_trainable_parameters_reach_the_optimizer(demo_dir, tmp_path, monkeypatch):
    captured = {}
    real = training.make_optimizer

    def spy(name, groups, lr, wd):
        captured["params"] = [p for g in groups for p in g["params"]]
        return real(name, groups, lr, wd)

    monkeypatch.setattr(training, "make_optimizer", spy)
    ft.finetune(demo_dir, unfreeze="layer4", epochs=1, out=tmp_path / "r", **tiny(batch_size=32))
    assert captured["params"] and all(p.requires_grad for p in captured["params"])
    assert sum(p.numel() for p in captured["params"]) == runs.read_metrics(tmp_path / "r")["params"]["trainable"]


def test_first_evaluation_matches_the_init_head(demo_finetune_run, demo_head_run):
    head_acc = runs.read_metrics(demo_head_run)["final"]["test_acc"]
    history = runs.read_metrics(demo_finetune_run)["history"]
    assert history[0]["epoch"] == 0
    assert history[0]["test_acc"] == pytest.approx(head_acc, abs=1e-6)


def test_metrics_and_checkpoints(demo_finetune_run):
    m = runs.read_metrics(demo_finetune_run)
    assert m["status"] == "complete" and m["final"]["selected_by"].startswith("test accuracy")
    assert m["final"]["selected_on"] == "test" and m["selection"]["chosen"] == {"best_epoch": m["final"]["best_epoch"]}
    assert m["final"]["last_epoch"] == {k: m["history"][-1][k] for k in ("epoch", "test_loss", "test_acc", "test_top5")}
    row = m["history"][1]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "images_per_second", "seconds"):
        assert key in row
    last = runs.load_checkpoint(demo_finetune_run / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "config"} <= set(last)
    assert (demo_finetune_run / "checkpoints" / "best.pt").is_file()


def test_existing_run_needs_resume_or_force(demo_dir, demo_finetune_run):
    with pytest.raises(CarsTLError) as err:
        ft.finetune(demo_dir, unfreeze="layer4", epochs=1, out=demo_finetune_run, **TINY)
    assert "--resume" in err.value.hint and "--force" in err.value.hint


def test_resume_with_other_options_is_refused(demo_dir, tmp_path):
    ft.finetune(demo_dir, unfreeze="none", epochs=1, out=tmp_path / "r", **tiny(batch_size=32))
    with pytest.raises(CarsTLError, match="lr: 0.001 -> 0.01"):
        ft.finetune(
            demo_dir, unfreeze="none", epochs=1, lr=0.01, resume=True, out=tmp_path / "r", **tiny(batch_size=32)
        )


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, demo_finetune_run):
    import shutil

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Exploit(marker)}, evil)
    with pytest.raises(CarsTLError, match="refused"):
        runs.load_checkpoint(evil)
    run_copy = tmp_path / "run"
    shutil.copytree(demo_finetune_run, run_copy)
    shutil.copy(evil, run_copy / ft.MODEL_FILE)
    from cars_tl.stages.predict import predict

    image = next((run_copy.parent).glob("*.pt"))  # any existing file: the model fails first
    with pytest.raises(CarsTLError, match="refused"):
        predict([image], run_dirs=[run_copy])
    assert not marker.exists()


def _finetune_command(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cars_tl",
        "finetune",
        "--data-dir",
        str(data_dir),
        "--backbone",
        "resnet18",
        "--weights",
        "random",
        "--unfreeze",
        "layer4",
        "--image-size",
        "32",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--preset",
        "tuned",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(demo_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reference = subprocess.run(
        _finetune_command(demo_dir, tmp_path / "whole"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    process = subprocess.Popen(
        _finetune_command(demo_dir, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = out / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not last.exists():
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert runs.load_checkpoint(last)["epoch"] < 4
    resumed = subprocess.run(
        _finetune_command(demo_dir, out, "--resume"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    a = runs.load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    b = runs.load_checkpoint(last)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert runs.read_metrics(out)["resumed_from_epoch"] >= 1


@pytest.mark.slow
def test_tuned_keeps_pretrained_batchnorm_statistics(demo_dir, tmp_path):
    weights = tmp_path / "pretrained.pth"
    torch.save(backbones.build_backbone("resnet18", "random").body.state_dict(), weights)
    settings = tiny(weights=str(weights))
    run_dir, metrics = ft.finetune(
        demo_dir, unfreeze="layer4", preset="tuned", epochs=1, out=tmp_path / "r", **tiny(settings, batch_size=32)
    )
    assert metrics["config"]["freeze_bn_stats"] is True
    fresh = torch.load(weights, weights_only=True)
    trained = runs.load_checkpoint(run_dir / ft.MODEL_FILE)
    assert torch.equal(fresh["layer4.0.bn1.running_mean"], trained["body.layer4.0.bn1.running_mean"])
    assert not torch.equal(fresh["layer4.0.bn1.weight"], trained["body.layer4.0.bn1.weight"])  # affine still trains
    # From random weights there are no statistics worth keeping.
    _, scratch = ft.finetune(
        demo_dir, unfreeze="all", preset="tuned", epochs=1, out=tmp_path / "s", **tiny(batch_size=32)
    )
    assert scratch["config"]["freeze_bn_stats"] is False


def test_dropout_follows_the_part_it_sits_in():
    from torch import nn

    body = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    )
    model = backbones.ClassifierModel(body, nn.Linear(4, 2))
    ft.set_trainable(model, ["1"])
    ft.train_mode(model)
    assert not body[0][1].training and body[1][1].training
    ft.set_trainable(model, [], everything=True)
    assert all(p.requires_grad for p in body.parameters())


@pytest.mark.slow
def test_finetune_seeds_reach_the_model(demo_dir, tmp_path):
    _, a = ft.finetune(demo_dir, unfreeze="all", epochs=1, seed=0, out=tmp_path / "a", **tiny(batch_size=32))
    _, b = ft.finetune(demo_dir, unfreeze="all", epochs=1, seed=1, out=tmp_path / "b", **tiny(batch_size=32))
    assert a["backbone"]["weights_digest"] != b["backbone"]["weights_digest"]
    assert a["history"][0]["test_loss"] != b["history"][0]["test_loss"]  # before any step: the initialisation differs


def test_more_epochs_on_resume_continue_a_constant_schedule(demo_dir, tmp_path):
    common = tiny(unfreeze="none", batch_size=32, seed=0)
    ft.finetune(demo_dir, epochs=2, out=tmp_path / "straight", **common)
    ft.finetune(demo_dir, epochs=1, out=tmp_path / "extended", **common)
    _, m = ft.finetune(demo_dir, epochs=2, resume=True, out=tmp_path / "extended", **common)
    assert m["resumed_with_changes"] == {"epochs": [1, 2]} and "optimizer_restarted" not in m
    a, b = finetune_weights(tmp_path / "straight"), finetune_weights(tmp_path / "extended")
    last_a = runs.load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    last_b = runs.load_checkpoint(tmp_path / "extended" / "checkpoints" / "last.pt")
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])  # same as never stopping
    assert set(a) == set(b)


def test_more_epochs_on_resume_are_refused_for_a_cosine_schedule(demo_dir, tmp_path):
    common = tiny(unfreeze="none", batch_size=32, preset="tuned", augment="none")
    ft.finetune(demo_dir, epochs=1, out=tmp_path / "r", **common)
    for force in (False, True):
        with pytest.raises(CarsTLError, match="laid out over 1 epochs") as err:
            ft.finetune(demo_dir, epochs=3, resume=True, force=force, out=tmp_path / "r", **common)
        assert "--epochs 1" in err.value.hint


def test_a_kill_between_last_and_best_is_mended_on_resume(demo_dir, tmp_path):
    common = tiny(unfreeze="none", batch_size=32)
    run_dir = tmp_path / "r"
    ft.finetune(demo_dir, epochs=1, out=run_dir, **common)
    last = runs.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["best"]["epoch"] == 1
    # As if killed after last.pt was written but before best.pt: best.pt still holds an older epoch.
    stale = {k: torch.zeros_like(v) for k, v in last["model"].items()}
    runs.save_checkpoint(run_dir / "checkpoints" / "best.pt", {"model": stale, "epoch": 0, "config": last["config"]})
    _, m = ft.finetune(demo_dir, epochs=1, resume=True, out=run_dir, **common)
    kept = finetune_weights(run_dir)
    assert all(torch.equal(kept[k], last["model"][k]) for k in kept)
    assert m["final"]["best_epoch"] == 1


def test_the_kept_model_must_be_of_the_best_epoch(tmp_path):
    model = torch.nn.Linear(2, 2)
    runs.save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), "epoch": 1})
    runs.save_checkpoint(tmp_path / "last.pt", {"model": model.state_dict(), "epoch": 3})
    with pytest.raises(CarsTLError, match="checkpoints disagree"):
        training.best_weights({"epoch": 2}, tmp_path / "last.pt", tmp_path / "best.pt", model)


def test_an_epoch_reads_the_running_figures_once_per_log_interval(demo_dir, tmp_path, monkeypatch):
    calls = []
    real = Meter.running
    monkeypatch.setattr(Meter, "running", lambda self: calls.append(1) or real(self))
    monkeypatch.setattr(training, "LOG_EVERY", 2)
    ft.finetune(demo_dir, unfreeze="none", epochs=1, out=tmp_path / "r", **tiny(batch_size=16))
    assert len(calls) == (144 // 16) // 2
    assert "scaler" in runs.load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")


def test_a_seeded_fine_tune_from_a_head_keeps_the_backbone_of_its_features(demo_dir, demo_head_run, tmp_path):
    # Model D on random weights (the demo): seed 1 must not rebuild another random backbone than the
    # one the head's features came from; the head's own accuracy is epoch 0's.
    _, m = ft.finetune(
        demo_dir,
        unfreeze="layer4",
        init_head=demo_head_run,
        epochs=1,
        seed=1,
        out=tmp_path / "d",
        **tiny(batch_size=32),
    )
    assert m["backbone"]["weights_digest"] == runs.read_metrics(demo_head_run)["backbone"]["weights_digest"]
    assert m["history"][0]["test_acc"] == pytest.approx(runs.read_metrics(demo_head_run)["final"]["test_acc"], abs=1e-6)


def test_a_finetune_that_diverges_keeps_the_last_good_checkpoint(demo_dir, tmp_path, monkeypatch):
    real = training.train_epoch

    def diverging(*args, **kwargs):
        row = real(*args, **kwargs)
        return dict(row, train_loss=float("nan")) if row["epoch"] == 2 else row

    monkeypatch.setattr(training, "train_epoch", diverging)
    with pytest.raises(training.DivergedError, match="epoch 2"):
        ft.finetune(demo_dir, unfreeze="none", epochs=3, out=tmp_path / "r", **tiny(batch_size=32))
    m = runs.read_metrics(tmp_path / "r")
    assert m["status"] == "failed" and "epoch 2" in m["error"]
    assert runs.load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "r" / ft.MODEL_FILE).exists()


@pytest.mark.parametrize("content", ["wrong shape", "wrong type"])
def test_a_bad_init_head_is_a_message(content, demo_dir, demo_head_run, tmp_path):
    head_copy = tmp_path / "head"
    shutil.copytree(demo_head_run, head_copy)
    state = {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)} if content == "wrong shape" else [1, 2, 3]
    torch.save(state, head_copy / heads.HEAD_FILE)
    with pytest.raises(CarsTLError, match="is not a head for this model") as err:
        ft.finetune(demo_dir, unfreeze="none", init_head=head_copy, epochs=1, out=tmp_path / "ft", **TINY)
    assert str(head_copy / heads.HEAD_FILE) in err.value.message


def test_an_init_head_with_nan_is_refused_naming_the_file(demo_dir, demo_head_run, tmp_path):
    from cars_tl.stages import finetune as ft

    head_copy = tmp_path / "head"
    shutil.copytree(demo_head_run, head_copy)
    state = torch.load(head_copy / heads.HEAD_FILE, weights_only=True)
    state["weight"][0, 0] = float("nan")
    torch.save(state, head_copy / heads.HEAD_FILE)
    with pytest.raises(CarsTLError, match="holds NaN or Inf in its weight") as err:
        ft.finetune(demo_dir, unfreeze="none", init_head=head_copy, epochs=1, out=tmp_path / "ft", **TINY)
    assert str(head_copy / heads.HEAD_FILE) in err.value.message and "--lr" not in err.value.message
    assert "cars-tl train-head" in err.value.hint and not (tmp_path / "ft").exists()
