"""Two "nodes" on this machine: ``torchrun --nnodes 2`` with a c10d rendezvous on 127.0.0.1, one gloo
process per node, each node launched from its own working folder, the data and outputs in a folder both
see (the shared filesystem of a real cluster). Compared with one process; a node killed mid-run.

What "only rank 0 writes" is observed as: every worker runs under an audit hook (``sys.addaudithook``)
that logs each file it opens for writing, renames, removes or creates inside the shared folder. h5py
writes in C, unseen by the hook, but every cars_tl artifact reaches its name by a rename, which is seen.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ENV, assert_same_run, extract_args, kill_tree, tiny, tuned_finetune_args

from cars_tl.artifacts import features, runs
from cars_tl.core import locks
from cars_tl.models import backbones
from cars_tl.stages import finetune as ft
from cars_tl.stages.extract import extract_features

pytestmark = pytest.mark.slow

# Runs cars_tl as torchrun's worker, after recording its global rank and installing the audit hook.
WORKER = r"""
import os, runpy, sys
audit, root = os.environ["MULTINODE_AUDIT"], os.environ["MULTINODE_ROOT"]
with open(audit + ".rank", "w") as f:
    f.write(os.environ["RANK"])
log = open(audit + ".log", "a", buffering=1)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATHS = {"os.rename": 2, "os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.truncate": 1, "os.link": 2,
         "os.symlink": 2, "os.chmod": 1, "shutil.rmtree": 1, "shutil.move": 2, "shutil.copyfile": 2}

def hook(event, args):
    if event == "open":
        if not args[2] & WRITE and not (isinstance(args[1], str) and set(args[1]) & set("wax+")):
            return
        paths = args[:1]
    elif event in PATHS:
        paths = args[: PATHS[event]]
    else:
        return
    for p in paths:
        if isinstance(p, (str, bytes, os.PathLike)):
            p = os.path.abspath(os.fsdecode(p))
            if p.startswith(root + os.sep) and not (event == "os.mkdir" and os.path.isdir(p)):
                log.write(event + " " + os.path.relpath(p, root) + "\n")

sys.addaudithook(hook)
sys.argv[0] = "cars_tl"
runpy.run_module("cars_tl", run_name="__main__", alter_sys=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Two torchrun agents (nodes 0 and 1) started from ``root``, the folder both see."""

    def __init__(self, tmp_path: Path, root: Path):
        self.tmp, self.root = tmp_path, root
        self.worker = tmp_path / "worker.py"
        self.worker.write_text(WORKER)
        self.count = 0

    def start(self, *args: str, timeout_s: int = 60, node1_cwd=None, node1_extra=()) -> list[subprocess.Popen]:
        """Both nodes run ``args`` from ``root`` (node 1 from ``node1_cwd`` with ``node1_extra`` appended, if given)."""
        self.count += 1
        port, self.jobs, self.nodes = _free_port(), [], []
        for node in range(2):
            home = self.tmp / f"job{self.count}-node{node}"  # its log files
            env = dict(
                ENV,
                MULTINODE_AUDIT=str(home.with_suffix(".audit")),
                MULTINODE_ROOT=str(self.root),
                # a backstop only: the survivor of a lost node must not wait torch's 30 minutes
                CARS_TL_DIST_TIMEOUT_S=str(timeout_s),
            )
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                f"{self.tmp.name}-{self.count}",
                "--max-restarts",
                "0",
                str(self.worker),
                *args,
                *(node1_extra if node else ()),
            ]
            cwd = node1_cwd if node and node1_cwd else self.root
            log = open(home.with_suffix(".out"), "w")
            self.jobs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT))
            self.nodes.append(home)
        return self.jobs

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = [job.wait(timeout=max(1.0, deadline - time.monotonic())) for job in self.jobs]
        return codes

    def output(self, node: int) -> str:
        return self.nodes[node].with_suffix(".out").read_text()

    def rank(self, node: int) -> int | None:
        marker = self.nodes[node].with_suffix(".audit.rank")
        return int(marker.read_text()) if marker.is_file() and marker.read_text() else None

    def node_of_rank(self, rank: int) -> int:
        # c10d assigns the ranks itself (--node-rank is for the static rendezvous only): ask the workers.
        return next(node for node in range(2) if self.rank(node) == rank)

    def writes(self, node: int) -> list[tuple[str, str]]:
        log = self.nodes[node].with_suffix(".audit.log")
        return [tuple(line.split(" ", 1)) for line in log.read_text().splitlines()] if log.is_file() else []


def _unexpected(writes, allowed: str = "") -> list[tuple[str, str]]:
    """The writes that are neither a data folder's reader record or lock nor matched by the regex ``allowed``."""
    return [
        (event, path)
        for event, path in writes
        if not any(part.startswith(".") and part.endswith((".readers", ".lock")) for part in Path(path).parts)
        # a reader record, written relative to the readers folder's descriptor (core.locks opens it without
        # following links): the hook sees the bare name, .<pid>-<token>.tmp renamed to <pid>-<token>.json
        and not re.fullmatch(r"\.?\d+-[0-9a-f]+\.(tmp|json)", path)
        and not (allowed and re.fullmatch(allowed, path))
    ]


def _leftovers(folder: Path) -> list[str]:
    """Temporaries and other half-written things anywhere below ``folder``."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith((".next", ".old"))
    )


@pytest.fixture
def shared(demo_dir, tmp_path) -> Path:
    """The folder every node sees: a copy of the demo data (readers leave their records in it) and outputs."""
    root = tmp_path / "shared"
    shutil.copytree(demo_dir, root / "data", ignore=shutil.ignore_patterns(".*.lock", ".*.readers"))
    (root / "out").mkdir()
    return root


def _assert_same_cache(a_path: Path, b_path: Path) -> None:
    a, b = features.load(a_path), features.load(b_path)
    for split in ("train", "test"):
        x, y = a.split(split), b.split(split)
        assert np.array_equal(x.features, y.features), f"{split} features differ"
        assert np.array_equal(x.ids, y.ids) and x.paths == y.paths


def _one_process_extraction(data_dir: Path, out: Path) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1)
    try:
        return extract_features(data_dir, out=out, **tiny(batch_size=16)).path
    finally:
        torch.set_num_threads(threads)


def _wait_for(condition, jobs, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not condition() and all(job.poll() is None for job in jobs):
        time.sleep(0.02)


def test_two_node_extraction_equals_one_process_and_only_rank0_writes_the_cache(shared, tmp_path):
    data, out = shared / "data", shared / "out" / "f.h5"
    reference = _one_process_extraction(data, tmp_path / "one.h5")
    cluster = Cluster(tmp_path, shared)
    cluster.start(*extract_args(data, out))
    assert cluster.wait() == [0, 0], cluster.output(0)[-3000:] + cluster.output(1)[-3000:]
    _assert_same_cache(reference, out)
    assert features.load(out).attrs["options"]["world_size"] == 2
    main, other = cluster.node_of_rank(0), cluster.node_of_rank(1)
    assert "extracted:" in cluster.output(main) and "extracted:" not in cluster.output(other)
    # Rank 1 writes its own chunks into the shared partial folder, and nothing else but its reader record.
    other_writes = cluster.writes(other)
    assert any(p.startswith("out/f.h5.partial/train-") for _, p in other_writes), other_writes
    assert _unexpected(other_writes, r"out/f\.h5\.partial/\.?(train|test)-r64-\d+\.npz(\.tmp-\d+)?") == []
    assert ("os.rename", "out/f.h5") in cluster.writes(main)
    assert not any(p.startswith("out/.f.h5.lock") for _, p in other_writes), "only rank 0 takes the writer lock"
    assert not features.partial_dir(out).exists() and _leftovers(shared) == []


def test_a_node_lost_mid_extraction_fails_the_job_and_one_process_resumes(shared, tmp_path):
    data, out = shared / "data", shared / "out" / "f.h5"
    cluster = Cluster(tmp_path, shared)
    jobs = cluster.start(*extract_args(data, out), timeout_s=60)
    partial = features.partial_dir(out)
    _wait_for(lambda: any(partial.glob("*.npz")), jobs)
    lost = cluster.node_of_rank(0)  # the writer, and the host of the workers' store
    started = time.monotonic()
    kill_tree(jobs[lost])
    survivor = jobs[1 - lost]
    code = survivor.wait(timeout=180)
    assert jobs[lost].wait() == -signal.SIGKILL, "the job ended before it could be killed"
    assert code != 0 and time.monotonic() - started < 120, cluster.output(1 - lost)[-3000:]
    assert not out.exists(), "a job that lost a node must not leave a feature file"
    # Left: the finished chunks (resumable state); nothing half-written but what the killed writer held.
    chunks = sorted(p.name for p in partial.glob("*.npz"))
    assert chunks
    assert [n for n in _leftovers(shared) if not n.startswith("out/f.h5.partial/.")] == []
    resumed = subprocess.run(
        [sys.executable, "-m", "cars_tl", *extract_args(data, out)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed:" in resumed.stdout + resumed.stderr
    _assert_same_cache(_one_process_extraction(data, tmp_path / "one.h5"), out)
    assert not partial.exists() and _leftovers(shared) == []


def test_two_node_finetune_equals_one_process_a_lost_node_fails_it_and_one_process_resumes(shared, tmp_path):
    data = shared / "data"
    weights = shared / "pretrained.pth"
    torch.save(backbones.build_backbone("resnet18", "random").body.state_dict(), weights)
    one = subprocess.run(
        [sys.executable, "-m", "cars_tl", *tuned_finetune_args(data, weights, tmp_path / "one")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    cluster = Cluster(tmp_path, shared)
    two = shared / "out" / "two"
    cluster.start(*tuned_finetune_args(data, weights, two))
    assert cluster.wait() == [0, 0], cluster.output(0)[-3000:] + cluster.output(1)[-3000:]
    metrics = runs.read_metrics(two)
    assert metrics["status"] == "complete" and metrics["distributed"]["world_size"] == 2
    assert_same_run(tmp_path / "one", two)
    main, other = cluster.node_of_rank(0), cluster.node_of_rank(1)
    assert cluster.output(main).count("finetune run") == 1 and "finetune run" not in cluster.output(other)
    assert _unexpected(cluster.writes(other)) == [], "rank 1 wrote into the shared folder"
    assert ("os.rename", f"out/two/{ft.MODEL_FILE}") in cluster.writes(main)
    assert _leftovers(shared) == []

    # Rank 1's node lost in epoch 2: rank 0 stops with a message, cleans up, leaves the resumable run.
    killed = shared / "out" / "killed"
    jobs = cluster.start(*tuned_finetune_args(data, weights, killed), timeout_s=60)
    last = killed / "checkpoints" / "last.pt"
    _wait_for(last.exists, jobs)
    lost = cluster.node_of_rank(1)
    started = time.monotonic()
    kill_tree(jobs[lost])
    code = jobs[1 - lost].wait(timeout=180)
    assert jobs[lost].wait() == -signal.SIGKILL, "the job ended before it could be killed"
    assert code != 0 and time.monotonic() - started < 120, cluster.output(1 - lost)[-3000:]
    assert "rank 0: stopped: another process of this torchrun job failed or was lost" in cluster.output(1 - lost)
    assert runs.load_checkpoint(last)["epoch"] == 1
    assert not (killed / ft.MODEL_FILE).exists() and runs.read_metrics(killed)["status"] != "complete"
    assert _leftovers(shared) == [], "rank 0 left half-written files"
    with locks.writer_lock(killed, "test"):  # nobody holds the run any more
        pass

    resumed = subprocess.run(
        [sys.executable, "-m", "cars_tl", *tuned_finetune_args(data, weights, killed, "--resume")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = runs.read_metrics(killed)
    assert metrics["resumed_from_epoch"] == 1 and "distributed" not in metrics
    assert_same_run(tmp_path / "one", killed)
    assert _leftovers(shared) == []


def test_nodes_running_another_command_or_from_another_folder_are_refused(shared, tmp_path):
    # On one node torchrun starts the same command N times; on several, each node's is typed apart.
    # Another --lr would train apart silently (DDP averages gradients, it compares nothing else).
    data, out = shared / "data", shared / "out" / "run"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = [
        "finetune",
        "--data-dir",
        str(data),
        *("--backbone", "resnet18", "--weights", "random", "--unfreeze", "none", "--image-size", "32"),
        *("--precision", "fp32", "--workers", "0", "--epochs", "1", "--batch-size", "16", "--out", str(out)),
    ]
    cluster = Cluster(tmp_path, shared)
    started = time.monotonic()
    cluster.start(*args, node1_cwd=elsewhere, node1_extra=("--lr", "0.5"))
    codes = cluster.wait(timeout=240)
    text = (cluster.output(0) + cluster.output(1)).replace("\n", " ")
    assert all(code != 0 for code in codes) and time.monotonic() - started < 240, text[-3000:]
    assert "is not running the job of rank 0: " in text, text[-3000:]
    assert "'--lr 0.5' here, '(nothing)' on rank 0" in text or "'(nothing)' here, '--lr 0.5' on rank 0" in text
    assert f"working folder: '{elsewhere}'" in text or f"'{elsewhere}' on rank 0" in text
    assert "other rank(s) are not running the job of rank 0" in text and "next: run the same command" in text
    assert "cars_tl/" not in text.replace(str(elsewhere), ""), "a traceback through cars_tl"
    assert not out.exists(), "a refused job must not start its run"
