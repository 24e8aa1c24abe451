"""Artifacts that cannot lie (issue 13): locks, verified caches, protected runs, clean failures.

Each test reproduces a fault that produced a wrong-but-complete-looking artifact, or a traceback,
before these changes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import TINY

from cars_tl.artifacts import features, runs
from cars_tl.core import atomic, locks
from cars_tl.core.errors import CarsTLError
from cars_tl.models import training
from cars_tl.models.svm import model as svm
from cars_tl.stages import finetune as ft
from cars_tl.stages import train_head as heads
from cars_tl.stages.extract import extract_features
from cars_tl.stages.fit_svm import fit_svm

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cars_tl"]
TINY_CLI = ["--backbone", "resnet18", "--weights", "random", "--image-size", "64", "--precision", "fp32"]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")


def _cli(*args) -> subprocess.CompletedProcess:
    """Run the CLI; stdout holds everything it printed (messages go to stderr), stderr stays empty."""
    return subprocess.run(
        [*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), timeout=300
    )


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another real process holding the writer lock of ``path`` until killed."""
    code = (
        "import sys, time; from pathlib import Path; from cars_tl.core import locks\n"
        f"with locks.writer_lock(Path({str(path)!r}), 'holder-test'):\n"
        "    print('held', flush=True); time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


# --------------------------------------------------------------------------- 1. concurrent writers


def test_two_extractions_into_one_file_never_interleave(demo_dir, tmp_path):
    out = tmp_path / "f.h5"
    common = ["extract-features", "--data-dir", demo_dir, *TINY_CLI, "--workers", "0", "--out", out]
    first = subprocess.Popen(
        [*CLI, *map(str, common), "--batch-size", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    partial = features.partial_dir(out)
    deadline = time.time() + 120
    while time.time() < deadline and not list(partial.glob("train-*.npz")):
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # mid-extraction, holding the lock, for as long as the second needs
    try:
        second = _cli(*common, "--batch-size", "16")
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stdout.read()
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"PID {first.pid}" in second.stdout and "being written by" in second.stdout
    assert "Traceback" not in second.stdout
    cache = features.verify(out)  # the survivor's file is whole and consistent
    train = cache.split("train")
    assert len(train.labels) == 144 and np.array_equal(train.ids, np.sort(train.ids))


def test_a_second_writer_of_a_run_fails_at_once_naming_the_holder(demo_features, tmp_path):
    run_dir = tmp_path / "runs" / "B"
    holder = _hold_lock(run_dir)
    try:
        started = time.time()
        result = _cli("train-head", "--features", demo_features, "--out", run_dir)
        assert time.time() - started < 60
        assert result.returncode == 2
        assert f"PID {holder.pid}" in result.stdout and "holder-test" in result.stdout
        assert not run_dir.exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_dead_writer_is_free_and_its_temporaries_are_removed(demo_features, tmp_path):
    run_dir = tmp_path / "runs" / "B"
    holder = _hold_lock(run_dir)
    holder.kill()
    holder.wait()
    stale_file = run_dir.with_name(f".{run_dir.name}.tmp-{holder.pid}")
    stale_dir = run_dir.with_name(f".{run_dir.name}.next")
    stale_file.write_bytes(b"x" * 100)
    stale_dir.mkdir()
    heads.train_head(demo_features, out=run_dir)
    assert not stale_file.exists() and not stale_dir.exists()
    assert runs.read_metrics(run_dir)["status"] == "complete"


def test_partial_chunks_of_another_layout_are_never_mixed(tmp_path):
    meta = {"feature_dim": 4}
    partial = features.PartialCache(tmp_path / "f.h5", meta, {"train": 20}, 8)
    partial.write_chunk("train", 0, np.ones((8, 4), np.float32), np.ones(8, bool), {})
    assert (
        partial.done_rows("train") == 8
        and (features.partial_dir(tmp_path / "f.h5") / "train-r8-000000000.npz").is_file()
    )
    with pytest.raises(ValueError, match="layout"):
        partial.write_chunk("train", 4, np.ones((8, 4), np.float32), np.ones(8, bool), {})
    other = features.PartialCache(tmp_path / "f.h5", meta, {"train": 20}, 16)  # another layout: starts over
    assert other.done_rows("train") == 0 and not list(other.dir.glob("*-r8-*"))
    # A chunk whose contents disagree with its name (written under another layout) is refused.
    other.write_chunk("train", 0, np.ones((16, 4), np.float32), np.ones(16, bool), {})
    np.savez(
        other.dir / "train-r16-000000016.npz",
        features=np.ones((8, 4), np.float32),
        valid=np.ones(8, bool),
        start=8,
        chunk_rows=8,
        bad="{}",
    )
    with pytest.raises(CarsTLError, match="does not fit the layout"):
        other._gather("train")


# --------------------------------------------------------------------------- 2. "up to date" without looking


def _extract(demo_dir, out, **kw):
    return extract_features(demo_dir, splits=("train", "test"), batch_size=32, out=out, **TINY, **kw)


@pytest.fixture()
def cache_copy(demo_features, tmp_path):
    out = tmp_path / "f.h5"
    shutil.copy(demo_features, out)
    return out


def _flip_bytes_in_features(path: Path, count: int = 16) -> None:
    with h5py.File(path) as f:
        info = f["train/features"].id.get_chunk_info(0)
    blob = bytearray(path.read_bytes())
    for i in range(count):
        blob[info.byte_offset + info.size // 3 + i] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_flipped_feature_bytes_are_re_extracted_not_up_to_date(demo_dir, demo_features, cache_copy):
    assert _extract(demo_dir, cache_copy).action == "up to date"
    _flip_bytes_in_features(cache_copy)
    with pytest.raises(CarsTLError, match="corrupt"):
        features.verify(cache_copy)
    result = _extract(demo_dir, cache_copy)
    assert result.action == "extracted" and "corrupt" in result.replaced_corrupt
    np.testing.assert_array_equal(
        features.verify(cache_copy).split("train").features, features.load(demo_features).split("train").features
    )


def test_a_renamed_dataset_is_a_clear_error_and_re_extracted(demo_dir, demo_features, cache_copy, tmp_path):
    with h5py.File(cache_copy, "a") as f:
        f.move("train/features", "train/feats")
    with pytest.raises(CarsTLError, match="lacks the dataset") as err:
        heads.train_head(cache_copy, out=tmp_path / "run")
    assert str(cache_copy) in err.value.message
    result = _cli("fit-svm", "--features", cache_copy, "--out", tmp_path / "svm")
    assert result.returncode == 2 and "lacks the dataset" in result.stdout and "Traceback" not in result.stdout
    assert _extract(demo_dir, cache_copy).replaced_corrupt


def test_a_flipped_label_is_detected(cache_copy):
    with h5py.File(cache_copy, "a") as f:
        labels = f["train/labels"]
        labels[3] = (labels[3] + 1) % 6  # rewritten through HDF5: the chunk's own fletcher32 is updated
    with pytest.raises(CarsTLError, match="labels does not match its recorded SHA-256"):
        features.load(cache_copy)


def test_a_cache_that_does_not_verify_leaves_no_file(tmp_path):
    bad = features.SplitArrays(np.zeros((4, 4), np.float32), np.array([0, 1, 2, 7]), np.arange(4), list("abcd"), [])
    attrs = {
        "backbone": "x",
        "weights": "random",
        "weights_digest": "0",
        "transform": {},
        "crop": "full",
        "margin": 0.0,
        "precision": "fp32",
        "class_names": ["a", "b", "c"],
        "num_classes": 3,
        "feature_dim": 4,
        "dataset_fingerprint": "f",
        "versions": {},
        "options": {},
        "skip_bad": False,
    }
    with pytest.raises(CarsTLError, match="labels outside"):
        features.write(tmp_path / "f.h5", attrs, {"train": bad})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- 4. run directories


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


# --------------------------------------------------------------------------- 6. full disks, size limits, read-only outputs


def _limited(args, limit_bytes: int) -> subprocess.CompletedProcess:
    code = (
        "import resource, sys; from cars_tl.cli import app\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, resource.RLIM_INFINITY))\n"
        f"sys.argv = ['cars-tl', *{[str(a) for a in args]!r}]\n"
        "app()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        timeout=300,
    )


def test_a_file_size_limit_is_a_message_and_leaves_no_temporary(demo_dir, tmp_path):
    out = tmp_path / "feats" / "f.h5"
    result = _limited(["extract-features", "--data-dir", demo_dir, *TINY_CLI, "--workers", "0", "--out", out], 200_000)
    assert result.returncode == 2, result.stdout
    assert "ulimit -f" in result.stdout and str(out) in result.stdout and "Traceback" not in result.stdout
    assert not out.exists() and not list(out.parent.glob(".*tmp*"))


def test_finetune_that_cannot_write_its_checkpoint_is_marked_failed(demo_dir, tmp_path):
    run_dir = tmp_path / "ft"
    args = [
        "finetune",
        "--data-dir",
        demo_dir,
        *TINY_CLI,
        "--workers",
        "0",
        "--unfreeze",
        "none",
        "--epochs",
        "1",
        "--out",
        run_dir,
    ]
    result = _limited(args, 2_000_000)  # metrics fit, a resnet18 checkpoint (45 MB) does not
    assert result.returncode == 2, result.stdout
    assert "checkpoint" in result.stdout and "ulimit -f" in result.stdout and "Traceback" not in result.stdout
    assert runs.read_metrics(run_dir)["status"] == "failed"
    assert not [p for p in run_dir.rglob("*tmp*")]


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


def test_read_only_output_is_a_message(demo_features, tmp_path, monkeypatch):
    real_replace = os.replace

    def read_only(src, dst):
        if str(dst).endswith(".pt"):
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", read_only)
    with pytest.raises(CarsTLError, match="Read-only file system") as err:
        heads.train_head(demo_features, out=tmp_path / "run")
    assert "writable" in err.value.hint


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: chmod cannot bite")
def test_read_only_folder_through_the_cli(demo_features, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = _cli("train-head", "--features", demo_features, "--out", folder / "run")
    finally:
        folder.chmod(0o755)
    assert result.returncode == 2 and "Traceback" not in result.stdout


# --------------------------------------------------------------------------- 7. options


@pytest.mark.parametrize(
    "stage, option, value",
    [
        ("train-head", "--lr", "nan"),
        ("train-head", "--lr", "inf"),
        ("train-head", "--weight-decay", "nan"),
        ("train-head", "--seed", "-1"),
        ("fit-svm", "--C", "nan"),
        ("fit-svm", "--gamma", "inf"),
        ("fit-svm", "--coef0", "nan"),
        ("finetune", "--lr", "inf"),
        ("finetune", "--margin", "nan"),
        ("finetune", "--seed", "-1"),
        ("extract-features", "--margin", "inf"),
    ],
)
def test_non_finite_or_out_of_range_numbers_exit_2(stage, option, value, demo_dir, demo_features, tmp_path):
    source = (
        ["--features", demo_features] if stage in ("train-head", "fit-svm") else ["--data-dir", demo_dir, *TINY_CLI]
    )
    result = _cli(stage, *source, option, value, "--out", tmp_path / "out")
    assert result.returncode == 2, result.stdout
    assert option in result.stdout and value.lstrip("-") in result.stdout and "Traceback" not in result.stdout
    assert not (tmp_path / "out").exists()


def test_a_head_whose_loss_diverges_fails_at_that_epoch(tmp_path, demo_features):
    cache = features.load(demo_features)
    train = cache.split("train")
    train.features[5, :] = 3e38  # finite (NaN/Inf features are refused before training), but the logits overflow
    path = features.write(tmp_path / "inf.h5", cache.attrs, cache.splits)
    with pytest.raises(training.DivergedError, match="epoch 1"):
        heads.train_head(path, out=tmp_path / "run")
    m = runs.read_metrics(tmp_path / "run")
    assert m["status"] == "failed" and "diverged" in m["error"]


def test_a_finetune_that_diverges_keeps_the_last_good_checkpoint(demo_dir, tmp_path, monkeypatch):
    real = ft.train_epoch

    def diverging(*args, **kwargs):
        row = real(*args, **kwargs)
        return dict(row, train_loss=float("nan")) if row["epoch"] == 2 else row

    monkeypatch.setattr(ft, "train_epoch", diverging)
    with pytest.raises(training.DivergedError, match="epoch 2"):
        ft.finetune(demo_dir, unfreeze="none", epochs=3, batch_size=32, out=tmp_path / "r", **TINY)
    m = runs.read_metrics(tmp_path / "r")
    assert m["status"] == "failed" and "epoch 2" in m["error"]
    assert runs.load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "r" / ft.MODEL_FILE).exists()


# --------------------------------------------------------------------------- 9. tracebacks that should be messages


@pytest.mark.parametrize("content", ["wrong shape", "wrong type"])
def test_a_bad_init_head_is_a_message(content, demo_dir, demo_head_run, tmp_path):
    head_copy = tmp_path / "head"
    shutil.copytree(demo_head_run, head_copy)
    state = {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)} if content == "wrong shape" else [1, 2, 3]
    torch.save(state, head_copy / heads.HEAD_FILE)
    with pytest.raises(CarsTLError, match="is not a head for this model") as err:
        ft.finetune(demo_dir, unfreeze="none", init_head=head_copy, epochs=1, out=tmp_path / "ft", **TINY)
    assert str(head_copy / heads.HEAD_FILE) in err.value.message


def test_a_skops_file_of_trusted_types_that_is_no_svm_model_is_a_message(demo_svm_run, tmp_path):
    import skops.io as sio
    from PIL import Image

    from cars_tl.stages.predict import predict

    run_copy = tmp_path / "svm"
    shutil.copytree(demo_svm_run, run_copy)
    model_file = run_copy / runs.read_metrics(run_copy)["model_file"]
    state = sio.load(model_file, trusted=sio.get_untrusted_types(file=model_file))
    del state["support_vectors"]
    sio.dump(state, model_file)
    image = tmp_path / "car.png"
    Image.new("RGB", (80, 60), (120, 30, 30)).save(image)
    with pytest.raises(CarsTLError, match="not a cars_tl fit-svm model: it lacks support_vectors"):
        predict([image], run_dirs=[run_copy])
    sio.dump({"just": "a dict"}, model_file)
    with pytest.raises(CarsTLError, match="not a cars_tl fit-svm model"):
        svm.load_model(model_file)


# --------------------------------------------------------------------------- should fix: help and metadata


def test_help_shows_defaults_and_version():
    result = _cli("train-head", "--help")
    assert "(study: 15" in result.stdout and "(study: 1e-3" in result.stdout
    assert "Epochs ." not in result.stdout
    result = _cli("report", "--help")
    assert "ARTIFACTS/report" in result.stdout
    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("cars-tl ")
