"""Run directories: never overwritten without --force, a failed forced rerun keeps the old run, swaps undone after a kill, failures recorded when files cannot be written, hints that fit the run kind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import CLI, TINY_CLI, assert_refused, cli_env, run_cli, run_cli_with_file_size_limit

from cars_tl.artifacts import runs
from cars_tl.core import locks
from cars_tl.core.errors import CarsTLError
from cars_tl.stages import train_head as heads
from cars_tl.stages.fit_svm import fit_svm


def test_every_stage_refuses_to_overwrite_a_run_without_force(demo_features, demo_head_run, demo_svm_run):
    with pytest.raises(CarsTLError, match="already exists") as err:
        heads.train_head(demo_features, out=demo_head_run)
    assert "--force" in err.value.hint
    with pytest.raises(CarsTLError, match="already exists"):
        fit_svm(demo_features, out=demo_svm_run)


@pytest.mark.parametrize("stage", ["head", "svm"])
def test_a_failing_forced_rerun_keeps_the_completed_run(stage, demo_features, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    fit = (
        (lambda **kw: heads.train_head(demo_features, out=run_dir, **kw))
        if stage == "head"
        else (lambda **kw: fit_svm(demo_features, out=run_dir, **kw))
    )
    fit()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    target = "cars_tl.stages.train_head.fit_head" if stage == "head" else "cars_tl.stages.fit_svm.fit_model"
    monkeypatch.setattr(target, lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        fit(force=True)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert runs.read_metrics(run_dir)["status"] == "complete"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.") and not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    _, metrics = fit(force=True)
    assert metrics["status"] == "complete" and runs.read_metrics(run_dir)["created"] == metrics["created"]


def test_a_swap_killed_between_its_renames_is_undone(tmp_path):
    target, staged = tmp_path / "run", tmp_path / ".run.next"
    target.mkdir()
    (target / "metrics.json").write_text("old")
    os.replace(target, tmp_path / ".run.old-123")  # the first rename happened, then a kill
    staged.mkdir()
    with locks.writer_lock(target, "test"):
        pass
    assert (target / "metrics.json").read_text() == "old" and not staged.exists()


def test_finetune_that_cannot_write_its_checkpoint_is_marked_failed(demo_dir, tmp_path):
    run_dir = tmp_path / "ft"
    args = [
        "finetune",
        "--data-dir",
        demo_dir,
        *TINY_CLI,
        "--unfreeze",
        "none",
        "--epochs",
        "1",
        "--out",
        run_dir,
    ]
    result = run_cli_with_file_size_limit(args, 2_000_000)  # metrics fit, a resnet18 checkpoint (45 MB) does not
    assert result.returncode == 2, result.stdout
    assert "checkpoint" in result.stdout and "ulimit -f" in result.stdout and "Traceback" not in result.stdout
    assert runs.read_metrics(run_dir)["status"] == "failed"
    assert not [p for p in run_dir.rglob("*tmp*")]


def test_a_head_checkpoint_needs_no_more_room_than_its_size(demo_features, demo_head_run, tmp_path):
    # The pre-check used to add 1 MiB to an estimate: a 14 KB head.pt was refused under ulimit -f 100.
    size = (demo_head_run / heads.HEAD_FILE).stat().st_size
    assert size < 100 * 1024
    args = ["train-head", "--features", demo_features, "--out"]
    exact = run_cli_with_file_size_limit([*args, tmp_path / "exact"], size)
    assert exact.returncode == 0, exact.stdout
    assert (tmp_path / "exact" / heads.HEAD_FILE).stat().st_size == size
    tight = run_cli_with_file_size_limit([*args, tmp_path / "tight"], size - 1)
    assert_refused(tight, "the checkpoint", f"needs about {size:,} B", f"(ulimit -f: {size - 1:,} B)")
    assert runs.read_metrics(tmp_path / "tight")["status"] == "failed"
    assert not (tmp_path / "tight" / heads.HEAD_FILE).exists() and not list((tmp_path / "tight").glob(".*tmp*"))


def test_when_metrics_cannot_be_written_status_json_still_says_failed(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    metrics = runs.new_metrics("head", "run", {})
    runs.write_metrics(run_dir, metrics)

    def full_disk(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "atomic_write_text", full_disk)
    with pytest.raises(RuntimeError):
        with runs.recording(run_dir, metrics):
            raise RuntimeError("disk full during the epoch")
    monkeypatch.undo()
    assert json.loads((run_dir / runs.METRICS).read_text())["status"] == "running"  # could not be rewritten
    got = runs.read_metrics(run_dir)
    assert got["status"] == "failed" and "disk full" in got["error"]


def test_a_folder_as_features_and_a_list_as_metrics(demo_features, demo_head_run, tmp_path):
    assert_refused(
        run_cli("train-head", "--features", demo_features.parent),
        f"{demo_features.parent} is a folder",
        demo_features.name,
    )
    run_copy = tmp_path / "run"
    shutil.copytree(demo_head_run, run_copy)
    (run_copy / runs.METRICS).write_text("[1, 2]")
    assert_refused(run_cli("inspect", run_copy), "holds a JSON list, not the object a cars_tl run writes")


@pytest.mark.slow
def test_ctrl_c_of_a_forced_rerun_hints_force_and_resume_never_rewrites_the_run(
    demo_dir, demo_head_run, demo_finetune_run, tmp_path
):

    run = tmp_path / "ft"
    shutil.copytree(demo_finetune_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    args = [
        "finetune",
        "--data-dir",
        demo_dir,
        *TINY_CLI,
        "--unfreeze",
        "layer4",
        "--init-head",
        demo_head_run,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
        run,
        "--lr",
        "0.01",
        "--trunk-cache",  # the images: no cache written into the working folder, one phase to interrupt
        "off",
    ]
    proc = subprocess.Popen(
        [*CLI, *map(str, args), "--force"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
        # Ctrl-C as a terminal sends it: a child inherits an ignored SIGINT (something earlier in the suite
        # ignores it in this process), and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    staging = run.with_name(f".{run.name}.next")
    deadline = time.time() + 600  # a loaded machine can take minutes to import torch
    while time.time() < deadline and not staging.is_dir() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "finetune interrupted" in output and "with --force" in output and "not --resume" in output, output
    assert not staging.exists()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # the old run, untouched
    # Following the old, wrong hint: --resume (with or without --force) of the complete run with a new --lr.
    result = run_cli(*args, "--resume", "--force")
    assert_refused(result, "has trained all 1 of its epochs", "lr: 0.001 -> 0.01", "--force and without --resume")
    result = run_cli(*args, "--resume")
    assert_refused(result, "lr: 0.001 -> 0.01")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert runs.read_metrics(run)["config"]["lr"] == 0.001


@pytest.mark.parametrize("fixture,stage", [("demo_svm_run", "fit-svm"), ("demo_head_run", "train-head")])
def test_an_incomplete_svm_or_head_run_is_never_told_to_resume(fixture, stage, request, tmp_path):
    import json

    run = tmp_path / "run"
    shutil.copytree(request.getfixturevalue(fixture), run)
    metrics = json.loads((run / runs.METRICS).read_text())
    metrics["status"] = "failed"
    (run / runs.METRICS).write_text(json.dumps(metrics))
    image = tmp_path / "car.png"
    from PIL import Image

    Image.new("RGB", (80, 60), (120, 30, 30)).save(image)
    result = run_cli("predict", "--model", run, image)
    assert_refused(
        result,
        f"run {run} is not complete",
        f"cars-tl {stage} --features {metrics['config']['features']} --out {run} --force",
    )
    assert "--resume" not in result.stdout


def test_a_refused_checkpoint_says_what_the_file_is_and_never_advises_unsafe_loading(tmp_path):
    import pickle
    import warnings

    import torch

    from cars_tl.models import backbones

    module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module)  # a whole pickled module, not a state dict
    full = tmp_path / "full.pt"
    torch.save({"weight": torch.zeros(500)}, full)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("true",))

    exploit = tmp_path / "exploit.pt"
    torch.save({"model": Exploit()}, exploit)
    files = {
        module: "holds a pickled Python object (torch.nn.modules.linear.Linear), not only tensors",
        exploit: f"refused to load {exploit}: it holds a pickled Python object ({os.system.__module__}.system)",
        tmp_path / "pickle.pt": "not a file saved by torch.save",
        tmp_path / "empty.pt": "empty, cut short or not a PyTorch file",
        tmp_path / "cut.pt": "damaged or not a PyTorch file (PytorchStreamReader failed reading zip archive",
    }
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=4))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(full.read_bytes()[:1000])
    for path, what in files.items():
        for load in (runs.load_checkpoint, backbones.load_weights_file):
            with warnings.catch_warnings(record=True) as caught, pytest.raises(CarsTLError) as err:
                warnings.simplefilter("always")
                load(path)
            message = err.value.message
            assert str(path) in message and what in message, message
            # torch's text advised weights_only=False and was cut after 300 characters, mid-sentence
            assert "weights_only" not in str(err.value) and "add_safe_globals" not in message, message
            assert "state_dict()" in err.value.hint and not caught, [str(w.message) for w in caught]


def test_predictions_read_only_their_own_arrays_within_bounds(tmp_path):
    """A member a predictions file never holds is not read (nor its header); more columns than the
    top-k a run saves are refused from the header."""
    import zipfile

    scores = np.random.default_rng(0).random((6, 4)).astype(np.float32)
    path = runs.write_predictions(tmp_path, np.arange(6), np.arange(6) % 4, scores, runs.SCORE_KINDS[0])
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("extra.npy", b"not even a header")
    assert np.array_equal(runs.read_predictions(tmp_path).ids, np.arange(6))
    wide = dict(np.load(path))
    wide["top_classes"] = np.zeros((6, runs.PREDICTIONS_MAX_COLUMNS + 1), dtype=np.int64)
    np.savez_compressed(path, **wide)
    with pytest.raises(CarsTLError, match=f"{runs.PREDICTIONS_MAX_COLUMNS} columns"):
        runs.read_predictions(tmp_path)
