"""Locks: one writer per output (the holder named), dead writers' locks free, readers of a data folder and download exclude each other, lock files never followed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import CLI, TINY_CLI, cli_env, copy_data, hold_lock, run_cli

from cars_tl.artifacts import features, runs
from cars_tl.core import locks
from cars_tl.data import devkit
from cars_tl.data import manifest as manifests
from cars_tl.stages import train_head as heads
from cars_tl.stages.predict import predict


def test_a_second_writer_of_a_run_fails_at_once_naming_the_holder(demo_features, tmp_path):
    run_dir = tmp_path / "runs" / "B"
    holder = hold_lock(run_dir)
    try:
        started = time.time()
        result = run_cli("train-head", "--features", demo_features, "--out", run_dir)
        assert time.time() - started < 60
        assert result.returncode == 2
        assert f"PID {holder.pid}" in result.stdout and "holder-test" in result.stdout
        assert not run_dir.exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_dead_writer_is_free_and_its_temporaries_are_removed(demo_features, tmp_path):
    run_dir = tmp_path / "runs" / "B"
    holder = hold_lock(run_dir)
    holder.kill()
    holder.wait()
    stale_file = run_dir.with_name(f".{run_dir.name}.tmp-{holder.pid}")
    stale_dir = run_dir.with_name(f".{run_dir.name}.next")
    stale_file.write_bytes(b"x" * 100)
    stale_dir.mkdir()
    heads.train_head(demo_features, out=run_dir)
    assert not stale_file.exists() and not stale_dir.exists()
    assert runs.read_metrics(run_dir)["status"] == "complete"


@pytest.mark.slow
def test_download_is_refused_while_an_extraction_reads_the_folder(demo_dir, tmp_path):
    data_dir = copy_data(demo_dir, tmp_path)
    root = devkit.stanford_root(data_dir)
    manifest_before = (root / manifests.MANIFEST_JSON).read_bytes()
    out = tmp_path / "f.h5"
    reader = subprocess.Popen(
        [*CLI, "extract-features", "--data-dir", str(data_dir), *TINY_CLI, "--batch-size", "8", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(features.partial_dir(out).glob("train-*.npz")):
        assert reader.poll() is None, reader.stdout.read()
        time.sleep(0.02)
    reader.send_signal(signal.SIGSTOP)  # mid-extraction, reading the folder
    try:
        records = list(locks.readers_dir(root).glob("*.json"))
        assert len(records) == 1 and json.loads(records[0].read_text())["pid"] == reader.pid
        refused = run_cli("download", "--data-dir", data_dir, "--source", "demo")
    finally:
        reader.send_signal(signal.SIGCONT)
    assert reader.wait(timeout=300) == 0, reader.stdout.read()
    assert refused.returncode == 2, refused.stdout
    assert (
        "being read by" in refused.stdout
        and f"PID {reader.pid}" in refused.stdout
        and "extract-features" in refused.stdout
    )
    assert "Traceback" not in refused.stdout
    # The folder was not replaced, and the cache describes the folder it read.
    assert (root / manifests.MANIFEST_JSON).read_bytes() == manifest_before
    assert sorted(p.name for p in data_dir.iterdir() if p.name.startswith(".stanford_cars.tmp")) == []
    cache = features.verify(out)
    assert cache.attrs["dataset_fingerprint"] == manifests.load_manifest(data_dir).fingerprint
    assert not list(locks.readers_dir(root).glob("*.json"))  # the reader's record left with it
    assert run_cli("download", "--data-dir", data_dir, "--source", "demo").returncode == 0  # no reader now


SLOW_DOWNLOAD = """
import pathlib, sys, time
import cars_tl.sources.demo as demo
original = demo.generate_demo
def slow(root):
    original(root)
    pathlib.Path(sys.argv[2]).write_text("ready")
    time.sleep(120)
demo.generate_demo = slow
from cars_tl.sources.prepare import prepare_dataset
prepare_dataset(pathlib.Path(sys.argv[1]), "demo")
"""


def test_an_extraction_is_refused_while_a_download_replaces_the_folder(demo_dir, tmp_path):
    data_dir, ready = copy_data(demo_dir, tmp_path), tmp_path / "ready"
    # Make the demo download rebuild (a different origin), so it stages a new folder and sleeps.
    (devkit.stanford_root(data_dir) / manifests.ORIGIN_FILE).write_text(json.dumps({"source": "elsewhere"}))
    writer = subprocess.Popen([sys.executable, "-c", SLOW_DOWNLOAD, str(data_dir), str(ready)], env=cli_env())
    out = tmp_path / "f.h5"
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the download died or hung"
            time.sleep(0.1)
        refused = run_cli("extract-features", "--data-dir", data_dir, *TINY_CLI, "--out", out)
        image = next((devkit.stanford_root(data_dir) / "cars_test").iterdir())
        with pytest.raises(locks.LockedError, match=f"PID {writer.pid}"):
            predict([image], run_dirs=[])  # an image of that folder: the same refusal, before anything else
    finally:
        writer.kill()
        writer.wait()
    assert refused.returncode == 2, refused.stdout
    assert (
        "being replaced by" in refused.stdout and f"PID {writer.pid}" in refused.stdout and "download" in refused.stdout
    )
    assert "Traceback" not in refused.stdout
    assert not out.exists() and not features.partial_dir(out).exists()


def test_a_symlink_or_hard_link_at_a_lock_name_is_refused_and_its_target_kept(demo_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "feats" / "f.h5"
    out.parent.mkdir()
    locks.lock_path(out).symlink_to(victim)
    result = run_cli("extract-features", "--data-dir", demo_dir, *TINY_CLI, "--out", out)
    assert result.returncode == 2, result.stdout
    assert (
        "symbolic link" in result.stdout
        and str(locks.lock_path(out)) in result.stdout
        and "Traceback" not in result.stdout
    )
    assert victim.read_text() == "precious" and not out.exists()
    locks.lock_path(out).unlink()
    os.link(victim, locks.lock_path(out))
    with pytest.raises(locks.LockFileError, match="other hard links"), locks.writer_lock(out, "test"):
        pass
    assert victim.read_text() == "precious"


def test_a_refused_writer_leaves_the_holders_record(demo_features, tmp_path):
    run_dir = tmp_path / "run"
    code = (
        "import sys, time; from pathlib import Path; from cars_tl.core import locks\n"
        f"with locks.writer_lock(Path({str(run_dir)!r}), 'holder-test'):\n"
        "    print('held', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        second = run_cli("train-head", "--features", demo_features, "--epochs", "1", "--out", run_dir)
        third = run_cli("train-head", "--features", demo_features, "--epochs", "1", "--out", run_dir)
        recorded = json.loads(locks.lock_path(run_dir).read_text())
    finally:
        holder.kill()
        holder.wait()
    for result in (second, third):
        assert result.returncode == 2, result.stdout
        assert f"PID {holder.pid}" in result.stdout and "holder-test" in result.stdout
    assert recorded["pid"] == holder.pid


def _shared_flock(path):
    """A reader's shared lock of ``path``'s lock file held from another open file (as a live reader holds it)."""
    import fcntl

    fd = os.open(locks.lock_path(path), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


@pytest.mark.parametrize("planted", ["symlink", "file", "fifo"])
def test_an_odd_readers_folder_is_refused_by_readers_and_download_and_nothing_is_deleted(demo_dir, tmp_path, planted):
    data_dir = copy_data(demo_dir, tmp_path)
    root = devkit.stanford_root(data_dir)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text("{}")
    readers = locks.readers_dir(root)
    if planted == "symlink":
        readers.symlink_to(victim)
    elif planted == "file":
        readers.write_text("{}")
    else:
        os.mkfifo(readers)
    what = {"symlink": "a symbolic link", "file": "a file", "fifo": "a FIFO"}[planted]
    with pytest.raises(locks.LockFileError, match=f"readers folder {readers} is {what}"), locks.reader_lock(root, "t"):
        pass
    fd = _shared_flock(root)  # a reader holds the folder: download looks at the readers folder
    try:
        refused = run_cli("download", "--data-dir", data_dir, "--source", "demo", "--verify")
    finally:
        os.close(fd)
    idle = run_cli("download", "--data-dir", data_dir, "--source", "demo", "--verify")  # nobody holds it
    for result in (refused, idle):
        assert result.returncode == 2, result.stdout
        assert f"readers folder {readers} is {what}" in result.stdout and "Traceback" not in result.stdout
    assert (victim / "config.json").read_text() == "{}"
    assert os.path.lexists(readers)


def test_a_readers_record_of_an_exited_process_is_reported_as_being_released(demo_dir, tmp_path):
    import fcntl

    root = devkit.stanford_root(copy_data(demo_dir, tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    record = locks.readers_dir(root) / f"{gone.pid}-abcd.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename, "stage": "finetune"}))
    held = os.open(record, os.O_RDONLY)  # what an orphaned worker of that process would hold
    fcntl.flock(held, fcntl.LOCK_EX)
    fd = _shared_flock(root)
    try:
        with pytest.raises(locks.LockedError) as refused, locks.writer_lock(root, "download"):
            pass
    finally:
        os.close(fd)
        os.close(held)
    message = str(refused.value)
    assert f"PID {gone.pid}" in message and "has exited" in message and "rerun in a few seconds" in message
    assert "is being read by" not in message


FORKING_READER = """
import os, sys, time
from pathlib import Path
from cars_tl.core import locks
with locks.reader_lock(Path(sys.argv[1]), "finetune"), locks.writer_lock(Path(sys.argv[2]), "finetune"):
    if os.fork() == 0:  # a DataLoader worker, still busy when its parent is killed
        print(os.getpid(), flush=True)  # said by the child: its fork handlers have run
        time.sleep(60)
        os._exit(0)
    time.sleep(60)
"""


def test_children_of_a_killed_reader_do_not_keep_its_locks(demo_dir, tmp_path):
    root, run_dir = devkit.stanford_root(copy_data(demo_dir, tmp_path)), tmp_path / "run"
    parent = subprocess.Popen(
        [sys.executable, "-c", FORKING_READER, str(root), str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    try:
        os.kill(child, 0)  # the orphan still runs
        with locks.writer_lock(root, "download"), locks.writer_lock(run_dir, "finetune"):
            pass  # yet both locks are free at once
    finally:
        os.kill(child, signal.SIGKILL)
