"""Atomic writes: a file-size limit or a read-only folder is a message and leaves no temporary behind."""

from __future__ import annotations

import errno
import os

import pytest
from helpers import TINY_CLI, run_cli, run_cli_with_file_size_limit

from cars_tl.core import atomic
from cars_tl.core.errors import CarsTLError
from cars_tl.stages import train_head as heads


def test_a_file_size_limit_is_a_message_and_leaves_no_temporary(demo_dir, tmp_path):
    out = tmp_path / "feats" / "f.h5"
    result = run_cli_with_file_size_limit(
        ["extract-features", "--data-dir", demo_dir, *TINY_CLI, "--out", out], 200_000
    )
    assert result.returncode == 2, result.stdout
    assert "ulimit -f" in result.stdout and str(out) in result.stdout and "Traceback" not in result.stdout
    assert not out.exists() and not list(out.parent.glob(".*tmp*"))


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
        result = run_cli("train-head", "--features", demo_features, "--out", folder / "run")
    finally:
        folder.chmod(0o755)
    assert result.returncode == 2 and "Traceback" not in result.stdout


@pytest.mark.parametrize(
    "n,shown", [(0, "0 B"), (100, "100 B"), (14_053, "14.1 KB"), (3_200_000, "3.2 MB"), (2_000_000_000, "2.0 GB")]
)
def test_sizes_are_shown_in_a_unit_that_fits(n, shown):
    assert atomic.format_size(n) == shown


def test_a_tiny_file_size_limit_is_stated_in_bytes(tmp_path, monkeypatch):
    # A 100-byte limit used to read "ulimit -f: 0.0 MB".
    monkeypatch.setattr(atomic.resource, "getrlimit", lambda _: (100, atomic.resource.RLIM_INFINITY))
    with pytest.raises(CarsTLError) as err:
        atomic.ensure_room(tmp_path / "f.h5", 14_053, "feature cache")
    assert "needs about 14.1 KB" in err.value.message and "(ulimit -f: 100 B)" in err.value.message
    with pytest.raises(CarsTLError) as err:
        atomic.ensure_room(tmp_path / "f.h5", 101, "feature cache")
    assert "needs about 101 B" in err.value.message and "(ulimit -f: 100 B)" in err.value.message
