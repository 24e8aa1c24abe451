"""extract-features as a process: two extractions into one file never interleave; partial chunks of another layout are never mixed in."""

from __future__ import annotations

import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import CLI, TINY_CLI, cli_env, run_cli

from cars_tl.artifacts import features
from cars_tl.core.errors import CarsTLError


@pytest.mark.slow
def test_two_extractions_into_one_file_never_interleave(demo_dir, tmp_path):
    out = tmp_path / "f.h5"
    common = ["extract-features", "--data-dir", demo_dir, *TINY_CLI, "--out", out]
    first = subprocess.Popen(
        [*CLI, *map(str, common), "--batch-size", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
    )
    partial = features.partial_dir(out)
    deadline = time.time() + 120
    while time.time() < deadline and not list(partial.glob("train-*.npz")):
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # mid-extraction, holding the lock, for as long as the second needs
    try:
        second = run_cli(*common, "--batch-size", "16")
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stdout.read()
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"PID {first.pid}" in second.stdout and "being written by" in second.stdout
    assert "Traceback" not in second.stdout
    cache = features.verify(out)  # the survivor's file is whole and consistent
    train = cache.split("train")
    assert len(train.labels) == 144 and np.array_equal(train.ids, np.sort(train.ids))


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
