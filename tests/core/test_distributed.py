"""Several processes under torchrun (gloo on the CPU): real processes launched with
``python -m torch.distributed.run``, compared with one process doing the same work."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import (
    ENV,
    REPO,
    assert_same_run,
    extract_args,
    kill_tree,
    tiny,
    torchrun_command,
    tuned_finetune_args,
)

from cars_tl.artifacts import features, runs
from cars_tl.core import distributed
from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import Progress, Task
from cars_tl.data import loaders
from cars_tl.data import manifest as manifests
from cars_tl.data.loaders import EpochSampler
from cars_tl.models import backbones
from cars_tl.stages import finetune as ft
from cars_tl.stages.extract import extract_features


def _run(command, timeout=200):
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize("size,batch,world", [(144, 16, 2), (37, 8, 4), (10, 8, 4), (5, 4, 2), (33, 32, 8)])
def test_ranks_together_hold_exactly_the_global_batches(size, batch, world):
    single = EpochSampler(size, seed=3)
    single.set_epoch(2)
    keys = list(single)
    global_batches = [keys[i : i + batch] for i in range(0, size, batch)]
    per_rank = []
    for rank in range(world):
        sampler = loaders.ShardedEpochSampler(size, 3, batch, distributed.Context(world, rank))
        sampler.set_epoch(2)
        mine, local = list(sampler), batch // world
        assert len(mine) == len(sampler)
        # The loader cuts the rank's stream into per-rank batches of batch/world: one per global batch.
        steps, at = [], 0
        for step in range(sampler.steps()):
            held, count = sampler.share(step)
            take = max(held, 1)
            assert take <= local
            steps.append((mine[at : at + take], held, count))
            at += take
        assert at == len(mine)
        per_rank.append(steps)
    for step, batch_keys in enumerate(global_batches):
        real = [k for r in range(world) for k in (per_rank[r][step][0] if per_rank[r][step][1] else [])]
        assert real == batch_keys, "the ranks' slices are not the global batch, in order"
        assert {per_rank[r][step][2] for r in range(world)} == {len(batch_keys)}


def test_shards_cover_each_row_once_and_align_to_chunks():
    for size, world, align in [(144, 2, 64), (72, 2, 64), (10, 4, 1), (3, 8, 1), (0, 2, 4), (1000, 3, 64)]:
        shards = [distributed.shard_range(size, distributed.Context(world, r), align) for r in range(world)]
        assert [i for s in shards for i in s] == list(range(size))
        assert all(s.start % align == 0 for s in shards if len(s))


def test_global_batch_must_divide_over_the_processes():
    ctx = distributed.Context(world_size=4, rank=1)
    assert distributed.local_batch(32, ctx) == 8
    with pytest.raises(CarsTLError, match="--batch-size 30 is the global batch.*4 processes") as info:
        distributed.local_batch(30, ctx)
    assert "28 or 32" in info.value.hint


def test_one_process_needs_no_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.init("cpu")
    assert not ctx.active and ctx.is_main and not torch.distributed.is_initialized()


def test_sync_batchnorm_is_refused_on_the_cpu():
    with pytest.raises(CarsTLError, match="--sync-bn needs CUDA"):
        distributed.sync_batchnorm(torch.nn.BatchNorm2d(3), "cpu")


def test_each_rank_takes_the_gpu_of_its_local_rank_only():
    with pytest.raises(CarsTLError, match="cuda:LOCAL_RANK"):
        distributed.rank_device("cuda:1", 0)
    assert distributed.rank_device("cpu", 3) == "cpu"


# --------------------------------------------------------------------------- extract-features


class _StopAfter(Progress):
    """Interrupts an extraction (as Ctrl-C would) once ``rows`` images went through."""

    def __init__(self, rows: int):
        self.rows, self.seen = rows, 0

    def task(self, description, total=None, unit="it"):
        import contextlib

        outer = self

        class _Task(Task):
            def advance(self, amount=1, **fields):
                outer.seen += amount
                if outer.seen > outer.rows:
                    raise KeyboardInterrupt

        return contextlib.nullcontext(_Task())


@pytest.mark.slow
def test_two_process_extraction_equals_one_process_and_resumes_with_another_count(demo_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = extract_features(demo_dir, out=tmp_path / "one.h5", **tiny(batch_size=16))
        out = tmp_path / "two.h5"
        # One process interrupted after its first chunk (64 rows), then two processes finish it.
        with pytest.raises(KeyboardInterrupt):
            extract_features(demo_dir, out=out, progress=_StopAfter(70), **tiny(batch_size=16))
    finally:
        torch.set_num_threads(threads)
    assert not out.exists() and len(list(features.partial_dir(out).glob("train-*.npz"))) == 1
    done = _run(torchrun_command(2, *extract_args(demo_dir, out)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "resumed:" in done.stderr + done.stdout and done.stderr.count("resumed:") + done.stdout.count("resumed:") == 1
    )
    one, two = features.load(reference.path), features.load(out)
    for split in ("train", "test"):
        a, b = one.split(split), two.split(split)
        assert np.array_equal(a.features, b.features), f"{split} features differ"
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.ids, b.ids) and a.paths == b.paths
    differing = {k for k in one.attrs if one.attrs[k] != two.attrs.get(k)}
    assert differing <= {"created", "options"}
    assert {k: v for k, v in one.attrs["options"].items() if k != "world_size"} == {
        k: v for k, v in two.attrs["options"].items() if k != "world_size"
    }
    assert (one.attrs["options"]["world_size"], two.attrs["options"]["world_size"]) == (1, 2)
    assert not features.partial_dir(out).exists()


@pytest.mark.slow
def test_a_rank_that_fails_stops_the_job_and_leaves_no_file(demo_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(demo_dir, bad)
    last = sorted((bad / "stanford_cars" / "cars_train").iterdir())[-1]  # in rank 1's shard
    last.write_bytes(last.read_bytes()[:-600])  # the header reads, the pixels do not
    manifests.build_manifest(
        bad
    )  # the manifest accepts it (a changed file is refused at load): only decoding finds the damage
    out = tmp_path / "f.h5"
    started = time.monotonic()
    result = _run(torchrun_command(2, *extract_args(bad, out)), timeout=240)
    assert result.returncode != 0
    assert time.monotonic() - started < 240
    assert "rank 1: error: cannot read image" in result.stderr and last.name in result.stderr
    assert "rank 0: stopped: another process of this torchrun job failed" in result.stderr
    assert not out.exists(), "a failed job must not leave a feature file"


# --------------------------------------------------------------------------- finetune


@pytest.mark.slow
def test_two_process_finetune_equals_one_process_and_resumes_on_one(demo_dir, tmp_path):
    weights = tmp_path / "pretrained.pth"
    torch.save(backbones.build_backbone("resnet18", "random").body.state_dict(), weights)
    one = _run([sys.executable, "-m", "cars_tl", *tuned_finetune_args(demo_dir, weights, tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(torchrun_command(2, *tuned_finetune_args(demo_dir, weights, tmp_path / "two")))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("finetune run") == 1, "only rank 0 reports"
    metrics = runs.read_metrics(tmp_path / "two")
    assert metrics["status"] == "complete" and metrics["distributed"]["world_size"] == 2
    assert metrics["distributed"]["per_rank_batch"] == 8 and metrics["config"]["batch_size"] == 16
    assert_same_run(tmp_path / "one", tmp_path / "two")

    # Two processes killed outright in epoch 2; one process resumes and finishes the same run.
    killed = tmp_path / "killed"
    job = subprocess.Popen(
        torchrun_command(2, *tuned_finetune_args(demo_dir, weights, killed)),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and not last.exists() and job.poll() is None:
        time.sleep(0.02)
    kill_tree(job)
    job.wait()
    time.sleep(0.5)
    assert job.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    assert runs.load_checkpoint(last)["epoch"] == 1
    assert not (killed / ft.MODEL_FILE).exists() and runs.read_metrics(killed)["status"] == "running"
    resumed = _run([sys.executable, "-m", "cars_tl", *tuned_finetune_args(demo_dir, weights, killed, "--resume")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = runs.read_metrics(killed)
    assert metrics["resumed_from_epoch"] == 1 and "distributed" not in metrics
    assert_same_run(tmp_path / "one", killed)


@pytest.mark.slow
def test_a_failing_rank_fails_the_finetune_job(demo_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(demo_dir, bad)
    image = sorted((bad / "stanford_cars" / "cars_train").iterdir())[5]
    image.write_bytes(image.read_bytes()[:-600])  # the header reads, the pixels do not
    manifests.build_manifest(bad)  # so that only decoding, on one rank, finds the damage
    out = tmp_path / "run"
    args = [
        "finetune",
        "--data-dir",
        str(bad),
        "--backbone",
        "resnet18",
        "--weights",
        "random",
        "--unfreeze",
        "none",
        "--image-size",
        "32",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
        str(out),
    ]
    started = time.monotonic()
    result = _run(torchrun_command(2, *args), timeout=240)
    assert result.returncode != 0 and time.monotonic() - started < 240
    assert "error: cannot read image" in result.stderr and image.name in result.stderr
    assert not (out / ft.MODEL_FILE).exists() and not (out / "checkpoints" / "last.pt").exists()
    assert runs.read_metrics(out)["status"] != "complete"


@pytest.mark.slow
def test_a_batch_that_does_not_divide_is_refused(demo_dir, tmp_path):
    result = _run(
        torchrun_command(
            2,
            "finetune",
            "--data-dir",
            str(demo_dir),
            "--backbone",
            "resnet18",
            "--weights",
            "random",
            "--image-size",
            "32",
            "--batch-size",
            "15",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "r"),
        ),
        timeout=240,
    )
    assert result.returncode != 0
    assert "--batch-size 15 is the global batch and must divide evenly over the 2 processes" in result.stderr.replace(
        "\n", " "
    )
    assert not (tmp_path / "r").exists()
