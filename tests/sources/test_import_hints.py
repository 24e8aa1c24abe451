"""Imports that went wrong quietly or said the wrong thing (issue 19 §7, data and download):

- a class-folder CSV row whose class disagrees with its folder, without names.csv: an error;
- class folders are recognised past empty ones, and all-empty class folders say so;
- a full disk during download names the data folder, the space needed and free, never ``--out``;
- a second download into a busy data folder suggests another --data-dir, not ``--out``.
"""

from __future__ import annotations

import csv
import errno
import os
import re

import pytest
from helpers import FullDisk, class_folders
from typer.testing import CliRunner

from cars_tl.cli import app
from cars_tl.core import locks
from cars_tl.core.errors import CarsTLError
from cars_tl.data import devkit
from cars_tl.sources import prepare
from cars_tl.sources.layouts import base as layouts_base
from cars_tl.sources.prepare import prepare_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    manifest, _ = prepare_dataset(tmp_path_factory.mktemp("demo"), "demo")
    return manifest


def test_a_csv_class_disagreeing_with_its_folder_is_an_error_without_names_csv(demo, tmp_path):
    source = class_folders(demo, tmp_path / "folders", with_csv=True)
    (source / "names.csv").unlink()
    manifest, _ = prepare_dataset(tmp_path / "ok", str(source))  # the rows agree with the folders: imported, with boxes
    assert manifest.has_boxes and manifest.counts() == {"train": 144, "test": 72}
    with open(source / "anno_train.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows[0][5] = str(int(rows[0][5]) % 196 + 1)  # another class than its folder's
    with open(source / "anno_train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(CarsTLError, match=f"line 1 gives {rows[0][0]} class {rows[0][5]}") as info:
        prepare_dataset(tmp_path / "bad", str(source))
    assert "lies in the folder" in info.value.message and "no names.csv" in info.value.message
    rows[0][5] = "197"
    with open(source / "anno_train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(CarsTLError, match="class 197 is outside 1..196"):
        prepare_dataset(tmp_path / "bad", str(source))


def test_class_folders_are_recognised_past_empty_ones(demo, tmp_path):
    source = class_folders(demo, tmp_path / "folders")
    for i in range(6):  # sorted before every class: the first five looked at used to be these
        (source / "car_data" / "car_data" / "train" / f"0 empty {i}").mkdir()
    manifest, _ = prepare_dataset(tmp_path / "data", str(source))
    assert manifest.origin["layout"] == "class folders" and manifest.counts() == {"train": 144, "test": 72}


def test_all_empty_class_folders_say_so(tmp_path):
    for split in ("train", "test"):
        for name in ("Acura RL Sedan 2012", "Audi TTS Coupe 2012", "Bentley Continental GT Coupe 2007"):
            (tmp_path / "src" / split / name).mkdir(parents=True)
    with pytest.raises(CarsTLError, match="no Stanford Cars layout recognised") as info:
        prepare_dataset(tmp_path / "data", str(tmp_path / "src"))
    assert f"{tmp_path / 'src' / 'train'} holds 3 class folders, but all 3 are empty" in info.value.message


def test_a_full_disk_during_download_names_the_data_folder_and_the_space(demo, tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # no filename, as a write() reports it

    monkeypatch.setattr(layouts_base, "link_or_copy", full)
    data_dir = tmp_path / "data"
    result = CliRunner().invoke(app, ["download", "--data-dir", str(data_dir), "--source", str(demo.root)])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert f"cannot write the dataset into {data_dir.resolve()}: No space left on device" in output
    assert re.search(r"about \d+\.\d (KB|MB) needed, [\d,.]+ [KMG]?B free there", output), (
        output
    )  # not "0.00 GB needed"
    assert "--out" not in output and "cannot write ." not in output and "--data-dir" in output
    assert sorted(n for n in os.listdir(data_dir) if not n.endswith(".lock")) == []  # nothing half-written left


def test_a_full_disk_while_generating_the_demo_invents_no_size(tmp_path, monkeypatch):
    # The 3 MB demo was said to need "about 2 GB (4 GB while its archives are kept)".
    def full(*_, **__):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prepare, "generate_demo", full)
    with pytest.raises(CarsTLError, match="No space left on device") as info:
        prepare_dataset(tmp_path / "data", "demo")
    message = info.value.message
    assert re.search(r"\(([\d,.]+ [KMG]?B|free space unknown)( free there)?\)$", message), message
    assert "needed" not in message and "GB needed" not in message


def test_a_busy_data_folder_suggests_another_data_dir_not_out(tmp_path):
    with locks.writer_lock(devkit.stanford_root(tmp_path), "download"):
        with pytest.raises(locks.LockedError) as info:
            prepare_dataset(tmp_path, "demo")
    assert "--data-dir" in info.value.hint and "--out" not in info.value.hint


def test_a_full_disk_while_streaming_is_not_retried_as_a_network_error(tmp_path, monkeypatch):
    from cars_tl.sources import http

    try:
        from tests.http_server import FileServer
    except ImportError:
        from http_server import FileServer

    monkeypatch.setattr(http, "open", FullDisk, raising=False)
    with FileServer({"/f.bin": b"x" * 5000}) as server:
        with pytest.raises(OSError) as info:
            http.download_file(server.url("/f.bin"), tmp_path / "f.bin", retries=5)
    assert info.value.errno == errno.ENOSPC and len(server.requests) == 1  # one try: the disk, not the network
