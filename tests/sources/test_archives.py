"""cars_tl.sources.archives (issue 19 §5 and §7): zips written by ``zipfile.writestr``, archive bombs refused before
anything is written (limits through CARS_TL_MAX_ARCHIVE_BYTES / CARS_TL_MAX_ARCHIVE_RATIO /
CARS_TL_MAX_ARCHIVE_MEMBERS), errors naming
the user's archive and member (never a deleted temporary folder), links inside an archive.

Cases:
- zip members without file-type bits are regular files (a whole dataset zipped with writestr imports);
- zip over the byte cap, zip member over the ratio cap, tgz over the byte cap, tgz of zeros at the
  default ratio: refused before writing, nothing left behind, the message names the variable;
- a central directory that lies: the streaming counter stops at the cap;
- a bad limit value is an error naming the variable;
- an unsafe member of an archive inside the user's archive: named by the user's archive and member;
- a symlink to an image inside the archive (tar and zip) imports as that image; a dangling one is a
  missing image named by the archive member.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import tar_folder

from cars_tl.core.errors import CarsTLError
from cars_tl.sources import archives
from cars_tl.sources.archives import safe_extract
from cars_tl.sources.prepare import prepare_dataset

ZEROS = 3 << 20  # 3 MiB of zeros: compresses about 1000:1


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    manifest, _ = prepare_dataset(tmp_path_factory.mktemp("demo"), "demo")
    return manifest


def zeros_zip(path: Path, size: int = ZEROS) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/ok.txt", b"hello")
        zf.writestr("a/zeros.bin", bytes(size))
    return path


def zeros_tgz(path: Path, size: int = ZEROS) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("a/zeros.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    return path


def refused_leaving_nothing(archive: Path, dest: Path, match: str) -> CarsTLError:
    with pytest.raises(CarsTLError, match=match) as info:
        safe_extract(archive, dest)
    assert not dest.exists()
    assert not [p for p in dest.parent.iterdir() if ".extract-" in p.name]
    return info.value


def test_writestr_members_are_regular_files(demo, tmp_path):
    zipped = tmp_path / "sc.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for path in sorted(demo.root.rglob("*")):
            if path.is_file():
                zf.writestr(str(Path("stanford_cars") / path.relative_to(demo.root)), path.read_bytes())
    assert all(stat.S_IFMT(i.external_attr >> 16) == 0 for i in zipfile.ZipFile(zipped).infolist())  # no type bits
    manifest, action = prepare_dataset(tmp_path / "data", str(zipped))
    assert action == "imported" and manifest.fingerprint == demo.fingerprint


def test_a_zip_past_the_byte_cap_is_refused_before_writing(tmp_path, monkeypatch):
    archive = zeros_zip(tmp_path / "bomb.zip")
    monkeypatch.setenv(archives.MAX_BYTES_ENV, "1000000")
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("a member was read"))
    error = refused_leaving_nothing(archive, tmp_path / "out", "expands to more than 1.0 MB")
    assert str(archive) in error.message and "a/zeros.bin" in error.message
    assert f"{archives.MAX_BYTES_ENV}=2000000" in error.hint


def test_a_tiny_byte_cap_is_stated_in_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv(archives.MAX_BYTES_ENV, "100")
    error = refused_leaving_nothing(zeros_zip(tmp_path / "bomb.zip"), tmp_path / "out", "more than 100 B")
    assert "0.0 MB" not in error.message


def test_a_zip_member_past_the_ratio_is_refused(tmp_path, monkeypatch):
    archive = zeros_zip(tmp_path / "bomb.zip")
    monkeypatch.setenv(archives.MAX_RATIO_ENV, "10")
    error = refused_leaving_nothing(archive, tmp_path / "out", "member 'a/zeros.bin' expands")
    assert "the limit is 10" in error.message and archives.MAX_RATIO_ENV in error.hint
    monkeypatch.setenv(archives.MAX_RATIO_ENV, "5000")
    safe_extract(archive, tmp_path / "out")  # raised: extracted
    assert (tmp_path / "out" / "a" / "zeros.bin").stat().st_size == ZEROS


def test_a_tar_past_the_caps_is_refused_before_writing(tmp_path, monkeypatch):
    archive = zeros_tgz(tmp_path / "bomb.tgz")
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda *a, **k: pytest.fail("extraction started"))
    error = refused_leaving_nothing(archive, tmp_path / "out", "expands")  # the default ratio (200) already
    assert archives.MAX_RATIO_ENV in error.hint
    monkeypatch.setenv(archives.MAX_RATIO_ENV, "100000")
    monkeypatch.setenv(archives.MAX_BYTES_ENV, "1000000")
    error = refused_leaving_nothing(archive, tmp_path / "out", "expands to more than 1.0 MB")
    assert archives.MAX_BYTES_ENV in error.hint


def test_a_lying_central_directory_stops_at_the_cap_while_writing(tmp_path, monkeypatch):
    archive = zeros_zip(tmp_path / "bomb.zip")
    monkeypatch.setenv(archives.MAX_BYTES_ENV, "1000000")
    monkeypatch.setattr(archives, "_check_sizes", lambda *a, **k: 0)  # as if the sizes said nothing was big
    refused_leaving_nothing(archive, tmp_path / "out", "expands to more than 1.0 MB")


@pytest.mark.parametrize("value", ["lots", "0", "-5"])
def test_a_bad_limit_names_the_variable(value, tmp_path, monkeypatch):
    monkeypatch.setenv(archives.MAX_BYTES_ENV, value)
    refused_leaving_nothing(
        zeros_zip(tmp_path / "a.zip", 10), tmp_path / "out", f"{archives.MAX_BYTES_ENV}=.* is not a positive number"
    )


def test_errors_inside_an_inner_archive_name_the_users_archive(demo, tmp_path):
    split = tmp_path / "cars"
    split.mkdir()
    with tarfile.open(split / "cars_train.tgz", "w:gz") as tar:
        tar.add(demo.root / "cars_train", arcname="cars_train")
        evil = tarfile.TarInfo("cars_train/../../evil.txt")
        tar.addfile(evil, io.BytesIO(b""))
    tar_folder(split / "cars_test.tgz", {"cars_test": demo.root / "cars_test"})
    tar_folder(split / "car_devkit.tgz", {"devkit": demo.root / "devkit"})
    shutil.copyfile(demo.root / "cars_test_annos_withlabels.mat", split / "cars_test_annos_withlabels.mat")
    outer = tar_folder(tmp_path / "split.tgz", {"cars": split})
    with pytest.raises(CarsTLError, match="contains '..'") as info:
        prepare_dataset(tmp_path / "data", str(outer))
    message = info.value.message
    assert f"{outer} (member cars/cars_train.tgz)" in message and ".tmp-" not in message and ".extract-" not in message


def _linked_tree(demo, out: Path, target: str) -> Path:
    """A copy of the demo whose cars_train/00001.jpg is a symlink to ``target`` (relative to cars_train/)."""
    root = out / "stanford_cars"
    shutil.copytree(demo.root, root, ignore=shutil.ignore_patterns("manifest.*", ".cars_tl_source.json"))
    (root / "originals").mkdir()
    os.replace(root / "cars_train" / "00001.jpg", root / "originals" / "00001.jpg")
    os.symlink(target, root / "cars_train" / "00001.jpg")
    return root


def _zip_keeping_links(root: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*")):
            name = str(Path("stanford_cars") / path.relative_to(root))
            if path.is_symlink():
                info = zipfile.ZipInfo(name)
                info.create_system = 3
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, os.readlink(path))
            elif path.is_file():
                zf.write(path, name)
    return archive


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_a_symlink_inside_the_archive_is_the_image_it_points_to(kind, demo, tmp_path):
    root = _linked_tree(demo, tmp_path / "src", "../originals/00001.jpg")
    archive = (
        tar_folder(tmp_path / "sc.tgz", {"stanford_cars": root})
        if kind == "tgz"
        else _zip_keeping_links(root, tmp_path / "sc.zip")
    )
    manifest, _ = prepare_dataset(tmp_path / "data", str(archive))
    assert manifest.fingerprint == demo.fingerprint
    image = manifest.root / "cars_train" / "00001.jpg"
    assert not image.is_symlink() and image.read_bytes() == (demo.root / "cars_train" / "00001.jpg").read_bytes()


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_a_dangling_symlink_is_a_missing_image_named_by_its_member(kind, demo, tmp_path):
    root = _linked_tree(demo, tmp_path / "src", "../originals/nothing.jpg")
    archive = (
        tar_folder(tmp_path / "sc.tgz", {"stanford_cars": root})
        if kind == "tgz"
        else _zip_keeping_links(root, tmp_path / "sc.zip")
    )
    with pytest.raises(CarsTLError, match="1 missing images") as info:
        prepare_dataset(tmp_path / "data", str(archive))
    assert f"cars_train/00001.jpg (not in {archive} (member stanford_cars/cars_train))" in info.value.message
    assert ".tmp-" not in info.value.message


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_an_archive_with_more_members_than_the_cap_is_refused_naming_count_and_cap(kind, tmp_path, monkeypatch):
    archive = tmp_path / f"junk.{kind}"
    names = [f"junk/{i:05d}.txt" for i in range(30)]
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for name in names:
                zf.writestr(name, "x")
    else:
        with tarfile.open(archive, "w:gz") as tar:
            for name in names:
                tar.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
    assert archives.DEFAULT_MAX_MEMBERS >= 2 * 16_185  # the whole dataset fits, even doubled by __MACOSX entries
    monkeypatch.setenv(archives.MAX_MEMBERS_ENV, "29")
    count = "30" if kind == "zip" else "over 29"
    error = refused_leaving_nothing(archive, tmp_path / "out", f"holds {count} members; the limit is 29")
    assert str(archive) in error.message and f"{archives.MAX_MEMBERS_ENV}=58" in error.hint
    monkeypatch.setenv(archives.MAX_MEMBERS_ENV, "30")
    safe_extract(archive, tmp_path / "out")
    assert len(list((tmp_path / "out" / "junk").iterdir())) == 30
