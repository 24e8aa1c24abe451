"""cars_tl.sources (prepare, http, mirrors, weights): every source layout, mirrors over loopback HTTP, resume, safe extraction, weights.

Nothing here touches the network: servers run on 127.0.0.1 and "unreachable" is a closed local port.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from helpers import REPO, SHARED_MINI, all_in_one_copy, link_tree, run_cli, tar_folder
from typer.testing import CliRunner

from cars_tl.cli import app
from cars_tl.core.errors import CarsTLError
from cars_tl.data import devkit
from cars_tl.data import manifest as manifests
from cars_tl.data.dataset import CarsDataset
from cars_tl.sources import http, prepare
from cars_tl.sources.archives import safe_extract
from cars_tl.sources.demo import DEMO_CLASSES
from cars_tl.sources.http import DownloadError, download_file
from cars_tl.sources.layouts import SPLIT_FILES
from cars_tl.sources.mirrors import load_mirror_list
from cars_tl.sources.prepare import prepare_dataset
from cars_tl.sources.weights import download_weights

try:
    from tests.http_server import FileServer, closed_port_url
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from http_server import FileServer, closed_port_url

COUNTS = {"train": 144, "test": 72}


def md5(path_or_bytes) -> str:
    blob = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return hashlib.md5(blob).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- source data


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo dataset prepared once: its stanford_cars folder and reference fingerprint."""
    data_dir = tmp_path_factory.mktemp("demo-data")
    manifest, action = prepare_dataset(data_dir, "demo")
    assert action == "generated"
    return types.SimpleNamespace(data_dir=data_dir, root=manifest.root, fingerprint=manifest.fingerprint)


@pytest.fixture(scope="session")
def sources(demo, tmp_path_factory):
    """The demo dataset in every accepted layout, keyed by a short name."""
    base = tmp_path_factory.mktemp("sources")
    root = demo.root
    split = base / "split"
    split.mkdir()
    tar_folder(split / "cars_train.tgz", {"cars_train": root / "cars_train"})
    tar_folder(split / "cars_test.tgz", {"cars_test": root / "cars_test"})
    tar_folder(split / "car_devkit.tgz", {"devkit": root / "devkit"})
    shutil.copyfile(root / "cars_test_annos_withlabels.mat", split / "cars_test_annos_withlabels.mat")

    labels_in_devkit = base / "labels-in-devkit" / "stanford_cars"
    shutil.copytree(root, labels_in_devkit)
    os.replace(
        labels_in_devkit / "cars_test_annos_withlabels.mat",
        labels_in_devkit / "devkit" / "cars_test_annos_withlabels.mat",
    )

    zipped = base / "torchvision.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for path in sorted(root.rglob("*")):
            zf.write(path, Path("download") / "stanford_cars" / path.relative_to(root))
    return {
        "torchvision-parent": demo.data_dir,
        "torchvision-folder": root,
        "torchvision-labels-in-devkit": labels_in_devkit,
        "torchvision-tgz": tar_folder(base / "stanford_cars.tar.gz", {"stanford_cars": root}),
        "torchvision-zip": zipped,
        "split-folder": split,
        "split-tgz": tar_folder(base / "split.tgz", {"cars": split}),
        "all-in-one": all_in_one_copy(root, base / "all-in-one", pack=True),
        "all-in-one-extracted": all_in_one_copy(root, base / "all-in-one-extracted", pack=False),
    }


def assert_demo_dataset(manifest: manifests.Manifest, demo) -> None:
    assert manifest.counts() == COUNTS
    assert manifest.class_names == list(DEMO_CLASSES)
    # Same images, boxes and labels in the same order: the very same manifest as the generated one.
    assert manifest.fingerprint == demo.fingerprint


def entries(folder: Path) -> list[str]:
    """What a folder holds, less the writer-lock files (they stay by design, see cars_tl.core.locks)."""
    return sorted(n for n in os.listdir(folder) if not n.endswith(".lock"))


def assert_only_dataset(data_dir: Path) -> None:
    """No temporary folders, downloads or stray files beside stanford_cars/."""
    assert entries(data_dir) == ["stanford_cars"]


# --------------------------------------------------------------------------- local layouts


@pytest.mark.parametrize(
    "layout",
    [
        "torchvision-parent",
        "torchvision-folder",
        "torchvision-labels-in-devkit",
        "torchvision-tgz",
        "torchvision-zip",
        "split-folder",
        "split-tgz",
        "all-in-one",
        "all-in-one-extracted",
    ],
)
def test_every_layout_imports_to_the_same_dataset(layout, sources, demo, tmp_path):
    source = sources[layout]
    before = listing(source) if source.is_dir() else md5(source)
    manifest, action = prepare_dataset(tmp_path / "data", str(source))
    assert action == "imported"
    assert_demo_dataset(manifest, demo)
    assert_only_dataset(tmp_path / "data")
    assert (listing(source) if source.is_dir() else md5(source)) == before  # the user's files are copied, not moved


@pytest.mark.parametrize("layout", ["torchvision-folder", "torchvision-tgz", "split-folder", "all-in-one"])
def test_cli_imports_a_path(layout, sources, demo, tmp_path):
    result = CliRunner().invoke(app, ["download", "--source", str(sources[layout]), "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "imported" in result.output and "train 144, test 72" in result.output
    assert_demo_dataset(manifests.load_manifest(tmp_path), demo)


def test_unrecognised_layout_lists_what_was_found(tmp_path):
    source = tmp_path / "junk"
    source.mkdir()
    (source / "cars_train.tgz").write_bytes(b"x")
    (source / "notes.txt").write_text("hi")
    with pytest.raises(CarsTLError) as info:
        prepare_dataset(tmp_path / "data", str(source))
    message = info.value.message
    assert "cars_train.tgz, notes.txt" in message
    assert "lacks cars_test.tgz, car_devkit.tgz" in message
    assert "all-in-one" in message and "split archives" in message
    assert entries(tmp_path / "data") == []


def test_datasets_in_sibling_folders_are_refused_naming_both_and_one_alone_is_recorded(demo, tmp_path):
    source = tmp_path / "src"
    for sub in ("a", "b"):
        link_tree(demo.root, source / sub / "stanford_cars")
    with pytest.raises(CarsTLError) as info:
        prepare_dataset(tmp_path / "data", str(source))
    message = str(info.value)
    assert f"{source / 'a' / 'stanford_cars'} (torchvision layout)" in message
    assert f"{source / 'b' / 'stanford_cars'} (torchvision layout)" in message
    assert (
        f"point --source at the one you mean, e.g. cars-tl download --data-dir {tmp_path / 'data'} --source {source / 'a' / 'stanford_cars'}"
        in message
    )
    assert entries(tmp_path / "data") == []
    packed = tar_folder(tmp_path / "both.tgz", {"a": source / "a", "b": source / "b"})
    with pytest.raises(
        CarsTLError,
        match=r"both\.tgz \(member a/stanford_cars\) \(torchvision layout\); .*both\.tgz \(member b/stanford_cars\)",
    ):
        prepare_dataset(tmp_path / "data", str(packed))
    shutil.rmtree(source / "b")
    manifest, _ = prepare_dataset(tmp_path / "data", str(source))
    assert manifest.origin["subfolder"] == "a/stanford_cars" and manifest.origin["path"] == str(source)
    assert_demo_dataset(manifest, demo)


def test_layout_errors_inside_an_archive_name_the_archive_and_member_not_a_temporary_folder(tmp_path):
    inner = tmp_path / "x" / "inner"
    (inner / "train").mkdir(parents=True)
    (inner / "cars_train").mkdir()
    archive = tar_folder(tmp_path / "bad.tgz", {"inner": inner})
    with pytest.raises(CarsTLError) as info:
        prepare_dataset(tmp_path / "data", str(archive))
    message = info.value.message
    assert f"no Stanford Cars layout recognised in {archive} (found: inner/)" in message
    assert f"{archive} (member inner) looks like the torchvision layout but lacks cars_test/" in message
    assert f"{archive} (member inner) looks like the class folders layout" in message
    assert ".tmp-" not in message and ".extract-" not in message


def test_all_in_one_paths_outside_car_ims_are_refused(tmp_path):
    source = tmp_path / "src"
    (source / "car_ims").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"not yours")
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    annotations = np.zeros((1, 1), dtype=[(f, "O") for f in fields])
    annotations[0, 0] = (np.array(["car_ims/../../secret.jpg"]), *[np.array([[1]], dtype=np.uint8)] * 6)
    scipy.io.savemat(
        source / "cars_annos.mat", {"annotations": annotations, "class_names": np.array(["A"], dtype=object)}
    )
    with pytest.raises(CarsTLError, match="outside its folder"):
        prepare_dataset(tmp_path / "data", str(source))
    assert (tmp_path / "secret.jpg").read_bytes() == b"not yours"
    assert entries(tmp_path / "data") == []


def test_unknown_source_names_the_choices(tmp_path):
    with pytest.raises(CarsTLError) as info:
        prepare_dataset(tmp_path, "kaggle")
    assert "'kaggle'" in info.value.message and "auto, demo" in info.value.message


def test_demo_rerun_is_a_fast_no_op(tmp_path):
    runner = CliRunner()
    first = runner.invoke(app, ["download", "--source", "demo", "--data-dir", str(tmp_path)])
    assert first.exit_code == 0, first.output
    assert "generated" in first.output
    started = time.perf_counter()
    second = runner.invoke(app, ["download", "--source", "demo", "--data-dir", str(tmp_path)])
    assert second.exit_code == 0, second.output
    assert "already verified" in second.output
    assert time.perf_counter() - started < 2
    assert_only_dataset(tmp_path)


def test_an_incomplete_dataset_is_replaced_whole(tmp_path, demo):
    stale = tmp_path / "stanford_cars" / "cars_train"
    stale.mkdir(parents=True)
    (stale / "00001.jpg").write_bytes(b"truncated")
    manifest, action = prepare_dataset(tmp_path, "demo")
    assert action == "generated"
    assert_demo_dataset(manifest, demo)
    assert_only_dataset(tmp_path)


def test_a_dataset_placed_by_hand_is_verified_in_place(tmp_path, demo):
    shutil.copytree(demo.root, tmp_path / "stanford_cars", ignore=shutil.ignore_patterns("manifest.*", ".cars_tl_*"))
    manifest, action = prepare_dataset(tmp_path, "auto", mirror_list=None)
    assert action == "verified"
    assert_demo_dataset(manifest, demo)


@pytest.mark.skipif(not SHARED_MINI.is_dir(), reason=f"real Stanford Cars subset not available at {SHARED_MINI}")
def test_real_mini_dataset_through_the_cli(tmp_path):
    before = listing(SHARED_MINI)
    result = CliRunner().invoke(app, ["download", "--source", str(SHARED_MINI), "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    manifest = manifests.load_manifest(tmp_path)
    assert manifest.counts() == {"train": 422, "test": 415}
    assert manifest.classes_present() == 20 and manifest.num_classes == 196
    for split in devkit.SPLITS:
        dataset = CarsDataset(manifest, split)
        for i in range(len(dataset)):
            image = dataset.load(i)
            assert image.mode == "RGB" and image.size == (
                manifest.split(split)[i].width,
                manifest.split(split)[i].height,
            )
    assert listing(SHARED_MINI) == before


# --------------------------------------------------------------------------- mirrors


def mirror_list(path: Path, split_folder: Path, mirrors: list[str]) -> Path:
    spec = {
        "files": {
            name: {"size": (split_folder / name).stat().st_size, "md5": md5(split_folder / name)}
            for name in SPLIT_FILES
        },
        "mirrors": [{"name": f"mirror{i}", "base_url": url, "note": "test"} for i, url in enumerate(mirrors)],
    }
    path.write_text(json.dumps(spec))
    return path


def test_url_source_end_to_end_through_the_cli(sources, demo, tmp_path):
    with FileServer(sources["split-folder"].parent) as server:
        listed = mirror_list(tmp_path / "mirrors.json", sources["split-folder"], [])
        result = CliRunner().invoke(
            app,
            [
                "download",
                "--source",
                server.url("/split"),
                "--mirror-list",
                str(listed),
                "--data-dir",
                str(tmp_path / "data"),
            ],
        )
    assert result.exit_code == 0, result.output
    assert "downloaded" in result.output
    assert_demo_dataset(manifests.load_manifest(tmp_path / "data"), demo)
    assert_only_dataset(tmp_path / "data")  # the archives are gone once the dataset is in place


def test_auto_falls_back_to_the_next_mirror_after_a_404(sources, demo, tmp_path):
    with FileServer({}) as empty, FileServer(sources["split-folder"]) as good:
        listed = mirror_list(tmp_path / "mirrors.json", sources["split-folder"], [empty.url("/cars"), good.url("/")])
        manifest, action = prepare_dataset(tmp_path / "data", "auto", mirror_list=listed)
    assert action == "downloaded"
    assert_demo_dataset(manifest, demo)
    assert empty.paths() == [f"/cars/{name}" for name in SPLIT_FILES]
    assert len(good.requests) == 4


def test_every_mirror_failing_names_each_and_leaves_nothing(sources, tmp_path):
    with FileServer({}) as empty:
        dead = closed_port_url("/gone")
        listed = mirror_list(tmp_path / "mirrors.json", sources["split-folder"], [dead])
        with pytest.raises(CarsTLError) as info:
            prepare_dataset(tmp_path / "data", "auto", mirrors=[empty.url("/x")], mirror_list=listed)
    message = str(info.value)
    assert "could not download cars_train.tgz" in message
    assert "--mirror" in message and "HTTP 404" in message
    assert "mirror0 (test)" in message and dead in message and "cannot connect" in message
    assert "--source" in info.value.hint
    assert entries(tmp_path / "data") == []


def test_verified_archives_survive_a_failed_run_and_are_reused(sources, demo, tmp_path):
    split = sources["split-folder"]
    listed = mirror_list(tmp_path / "mirrors.json", split, [])
    partial = {f"/{n}": (split / n).read_bytes() for n in SPLIT_FILES if n != "cars_test_annos_withlabels.mat"}
    data_dir = tmp_path / "data"
    with FileServer(partial) as server:
        with pytest.raises(CarsTLError, match="cars_test_annos_withlabels.mat"):
            prepare_dataset(data_dir, server.url(), mirror_list=listed)
    kept = data_dir / prepare.DOWNLOADS_DIR
    assert entries(data_dir) == [prepare.DOWNLOADS_DIR]
    assert sorted(os.listdir(kept)) == sorted(partial_name[1:] for partial_name in partial)  # verified, no .part
    with FileServer(split) as server:
        manifest, action = prepare_dataset(data_dir, server.url(), mirror_list=listed)
    assert action == "downloaded" and server.paths() == ["/cars_test_annos_withlabels.mat"]
    assert_demo_dataset(manifest, demo)
    assert_only_dataset(data_dir)


def test_a_broken_hand_placed_copy_is_reported_when_no_fresh_copy_comes(sources, demo, tmp_path):
    shutil.copytree(demo.root, tmp_path / "stanford_cars", ignore=shutil.ignore_patterns("manifest.*", ".cars_tl_*"))
    (tmp_path / "stanford_cars" / "cars_test" / "00007.jpg").unlink()
    listed = mirror_list(tmp_path / "mirrors.json", sources["split-folder"], [closed_port_url()])
    with pytest.raises(CarsTLError) as info:
        prepare_dataset(tmp_path, "auto", mirror_list=listed)
    assert "missing images: cars_test/00007.jpg" in info.value.message
    assert "fetching a fresh copy failed too" in info.value.message
    assert entries(tmp_path) == ["mirrors.json", "stanford_cars"]


def test_builtin_mirror_list_is_well_formed():
    spec = load_mirror_list()
    assert spec["files"]["cars_train.tgz"]["md5"] == "065e5b463ae28d29e77c1b4b166cfe61"
    assert any("dead" in m["note"].lower() for m in spec["mirrors"])


# --------------------------------------------------------------------------- download_file

BLOB = np.random.default_rng(0).bytes(300_000)


def test_a_dropped_connection_resumes_with_range(tmp_path):
    with FileServer({"/f.bin": BLOB}) as server:
        server.drop_after = 100_000
        path = download_file(server.url("/f.bin"), tmp_path / "f.bin", size=len(BLOB), md5=md5(BLOB))
    assert path.read_bytes() == BLOB
    assert [r.range for r in server.requests] == [None, "bytes=100000-"]
    assert os.listdir(tmp_path) == ["f.bin"]


def test_a_part_file_left_by_a_killed_run_is_resumed(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(BLOB[:1000])
    with FileServer({"/f.bin": BLOB}) as server:
        download_file(server.url("/f.bin"), tmp_path / "f.bin", md5=md5(BLOB))
    assert [r.range for r in server.requests] == ["bytes=1000-"]
    assert os.listdir(tmp_path) == ["f.bin"]


def test_a_refused_connection_mid_transfer_keeps_the_part_and_the_next_run_resumes(tmp_path, monkeypatch):
    slept = []
    monkeypatch.setattr(http.time, "sleep", slept.append)
    dest = tmp_path / "f.bin"
    with FileServer({"/f.bin": BLOB}) as server:
        server.drop_after, server.refuse_after_drop = 100_000, True
        with pytest.raises(DownloadError, match="refused") as info:
            download_file(server.url("/f.bin"), dest, size=len(BLOB), md5=md5(BLOB))
    part = tmp_path / "f.bin.part"
    assert part.read_bytes() == BLOB[:100_000] and "kept" in info.value.message
    assert slept == sorted(slept) and len(slept) == http.RECONNECT_TRIES  # backoff between the tries
    with FileServer({"/f.bin": BLOB}) as server:
        assert download_file(server.url("/f.bin"), dest, size=len(BLOB), md5=md5(BLOB)).read_bytes() == BLOB
    assert [r.range for r in server.requests] == ["bytes=100000-"]
    assert os.listdir(tmp_path) == ["f.bin"]


def test_a_checksum_mismatch_discards_the_part(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)  # not a prefix of the file: the digest will not match
    with FileServer({"/f.bin": BLOB}) as server:
        with pytest.raises(DownloadError, match="MD5"):
            download_file(server.url("/f.bin"), tmp_path / "f.bin", md5=md5(BLOB))
    assert os.listdir(tmp_path) == []


def test_a_server_ignoring_range_restarts_from_zero(tmp_path):
    with FileServer({"/f.bin": BLOB}) as server:
        server.drop_after, server.ignore_range = 100_000, True
        path = download_file(server.url("/f.bin"), tmp_path / "f.bin", md5=md5(BLOB))
    assert path.read_bytes() == BLOB
    assert [r.range for r in server.requests] == [None, "bytes=100000-"]


def test_a_wrong_checksum_names_the_url_and_leaves_nothing(tmp_path):
    with FileServer({"/f.bin": BLOB}) as server:
        with pytest.raises(DownloadError) as info:
            download_file(server.url("/f.bin"), tmp_path / "f.bin", md5="0" * 32)
    assert server.url("/f.bin") in info.value.message and "MD5" in info.value.message
    assert os.listdir(tmp_path) == []


def test_a_wrong_size_is_refused(tmp_path):
    with FileServer({"/f.bin": BLOB}) as server:
        with pytest.raises(DownloadError, match="expected 12"):
            download_file(server.url("/f.bin"), tmp_path / "f.bin", size=12)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("how", ["content-type", "body"])
def test_an_html_page_instead_of_the_file_is_refused(how, tmp_path):
    page = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
    with FileServer({"/f.tgz": page if how == "body" else BLOB}) as server:
        server.html = how == "content-type"
        with pytest.raises(DownloadError) as info:
            download_file(server.url("/f.tgz"), tmp_path / "f.tgz")
    assert "HTML page" in info.value.message and server.url("/f.tgz") in info.value.message
    assert os.listdir(tmp_path) == []


def test_a_verified_file_is_reused_without_network(tmp_path):
    (tmp_path / "f.bin").write_bytes(BLOB)
    assert download_file(closed_port_url("/f.bin"), tmp_path / "f.bin", md5=md5(BLOB)) == tmp_path / "f.bin"


def test_sha256_prefix_that_matches_is_accepted(tmp_path):
    prefix = hashlib.sha256(BLOB).hexdigest()[:8]
    with FileServer({"/w.pth": BLOB}) as server:
        path = download_file(server.url("/w.pth"), tmp_path / f"w-{prefix}.pth", sha256_prefix=prefix)
    assert path.read_bytes() == BLOB


# --------------------------------------------------------------------------- safe_extract


def _evil_tar(path: Path, member: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("cars_train/00001.jpg")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"jpg"))
        tar.addfile(member, io.BytesIO(b"bad") if member.isfile() else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 3
    return info


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize(
    "member, why",
    [
        (_file("../escaped.txt"), "'..'"),
        (_file("cars_train/../../escaped.txt"), "'..'"),
        (_file("/tmp/escaped.txt"), "absolute"),
        (_symlink("cars_train/link", "../../outside"), "outside"),
        (_symlink("link", "/etc/passwd"), "outside"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-relative", "symlink-absolute"],
)
def test_unsafe_tar_members_are_refused(member, why, tmp_path):
    archive = _evil_tar(tmp_path / "evil.tgz", member)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(CarsTLError) as info:
        safe_extract(archive, work / "out")
    assert str(archive) in info.value.message and repr(member.name) in info.value.message and why in info.value.message
    assert os.listdir(work) == []
    assert not (tmp_path / "escaped.txt").exists()


def test_a_member_below_a_symlink_is_refused(tmp_path):
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        tar.addfile(_symlink("here", "."))
        tar.addfile(_symlink("here/here/up", "../.."))
    with pytest.raises(CarsTLError, match="below a link"):
        safe_extract(tmp_path / "evil.tar", tmp_path / "out")
    assert entries(tmp_path) == ["evil.tar"]


def test_device_files_are_refused(tmp_path):
    device = tarfile.TarInfo("dev/null")
    device.type = tarfile.CHRTYPE
    with pytest.raises(CarsTLError, match="device"):
        safe_extract(_evil_tar(tmp_path / "evil.tgz", device), tmp_path / "out")
    assert entries(tmp_path) == ["evil.tgz"]


def test_unsafe_zip_members_are_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../escaped.txt", b"bad")
    with pytest.raises(CarsTLError, match="'..'"):
        safe_extract(tmp_path / "evil.zip", tmp_path / "out")
    assert entries(tmp_path) == ["evil.zip"]


def test_safe_extract_keeps_links_inside(tmp_path):
    with tarfile.open(tmp_path / "ok.tar", "w") as tar:
        tar.addfile(_file("a/real.txt"), io.BytesIO(b"yes"))
        tar.addfile(_symlink("a/alias.txt", "real.txt"))
    safe_extract(tmp_path / "ok.tar", tmp_path / "out")
    assert (tmp_path / "out" / "a" / "alias.txt").read_bytes() == b"yes"


def test_a_corrupt_archive_is_a_clear_error(tmp_path):
    good = tar_folder(tmp_path / "good.tgz", {"x": Path(__file__)})
    (tmp_path / "cut.tgz").write_bytes(good.read_bytes()[:200])
    with pytest.raises(CarsTLError, match="cut.tgz"):
        safe_extract(tmp_path / "cut.tgz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- weights


@pytest.fixture
def resnet18(monkeypatch, tmp_path):
    """TORCH_HOME in tmp and resnet18's official URL on a closed loopback port (never the internet)."""
    import torchvision.models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    filename = weights.url.rsplit("/", 1)[1]
    monkeypatch.setattr(weights.value, "url", closed_port_url(f"/models/{filename}"))
    return types.SimpleNamespace(
        weights=weights, filename=filename, dest=tmp_path / "torch" / "hub" / "checkpoints" / filename
    )


def test_weights_already_in_place_are_returned(resnet18):
    resnet18.dest.parent.mkdir(parents=True)
    resnet18.dest.write_bytes(b"weights")
    assert download_weights("resnet18") == resnet18.dest


def test_weights_not_matching_their_hash_prefix_are_refused(resnet18):
    with FileServer({f"/m/{resnet18.filename}": BLOB}) as server:
        with pytest.raises(CarsTLError) as info:
            download_weights("resnet18", mirrors=[server.url("/m")])
    assert "SHA-256" in info.value.message and server.url(f"/m/{resnet18.filename}") in info.value.message
    assert not resnet18.dest.parent.exists() or os.listdir(resnet18.dest.parent) == []


def test_weights_offline_say_what_to_place_where(resnet18):
    with pytest.raises(CarsTLError) as info:
        download_weights("resnet18", mirrors=[closed_port_url("/mirror")])
    assert resnet18.filename in info.value.message
    assert resnet18.weights.url in info.value.hint and str(resnet18.dest) in info.value.hint
    assert not resnet18.dest.exists()


def test_weights_from_a_mirror_with_the_right_hash(resnet18, monkeypatch):
    filename = f"resnet18-{hashlib.sha256(BLOB).hexdigest()[:8]}.pth"
    monkeypatch.setattr(resnet18.weights.value, "url", closed_port_url(f"/models/{filename}"))
    with FileServer({f"/m/{filename}": BLOB}) as server:
        path = download_weights("resnet18", mirrors=[server.url("/m/")])
    assert path == resnet18.dest.with_name(filename) and path.read_bytes() == BLOB


def test_unknown_model_lists_valid_names():
    with pytest.raises(CarsTLError) as info:
        download_weights("resnet51")
    assert "resnet50" in info.value.message and "'resnet51'" in info.value.message


def test_importing_download_does_not_import_torch():

    code = "import sys, cars_tl.sources.prepare, cars_tl.sources.weights; assert 'torch' not in sys.modules and 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- one writer, interrupted swaps


SLOW_DEMO = """
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


def test_a_second_download_fails_at_once_and_a_killed_ones_leftovers_go(tmp_path):

    from cars_tl.core.locks import LockedError

    data_dir, ready = tmp_path / "data", tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writer = subprocess.Popen([sys.executable, "-c", SLOW_DEMO, str(data_dir), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the writer process died or hung"
            time.sleep(0.1)
        assert len(list(data_dir.glob(".stanford_cars.tmp-*"))) == 1
        with pytest.raises(LockedError) as info:
            prepare_dataset(data_dir, "demo")
        assert f"PID {writer.pid}" in info.value.message
    finally:
        writer.kill()
        writer.wait()
    assert list(data_dir.glob(".stanford_cars.tmp-*"))  # SIGKILL cleans nothing up itself
    manifest, action = prepare_dataset(data_dir, "demo")
    assert action == "generated" and manifest.counts() == COUNTS
    assert entries(data_dir) == ["stanford_cars"]  # the dead writer's staging folder is gone


def test_an_interrupted_swap_keeps_the_previous_dataset(sources, tmp_path, monkeypatch):
    import cars_tl.core.atomic

    previous, _ = prepare_dataset(tmp_path, "demo")
    real_replace = os.replace

    def interrupted(src, dst):
        if Path(dst) == previous.root and Path(src).parent.name.startswith(".stanford_cars.tmp-"):
            raise KeyboardInterrupt  # between the two renames
        return real_replace(src, dst)

    monkeypatch.setattr(cars_tl.core.atomic.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(tmp_path, str(sources["torchvision-folder"]))
    monkeypatch.undo()
    assert not previous.root.exists() and len(list(tmp_path.glob(".stanford_cars.old-*"))) == 1
    manifest, action = prepare_dataset(tmp_path, "demo")  # the lock's cleanup puts the previous one back
    assert action == "already verified" and manifest.fingerprint == previous.fingerprint
    assert entries(tmp_path) == ["stanford_cars"]


# --------------------------------------------------------------------------- a named weights enum


def test_weights_enum_is_fetched_exactly_and_the_missing_weights_hint_names_it(monkeypatch, tmp_path):
    import torchvision.models

    from cars_tl.models import backbones

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    enum = torchvision.models.get_model_weights("resnet50")
    v1, v2 = enum.IMAGENET1K_V1, enum.IMAGENET1K_V2
    assert enum.DEFAULT == v2
    with pytest.raises(CarsTLError) as info:
        backbones.build_backbone("resnet50", "IMAGENET1K_V1")
    assert "cars-tl download --weights resnet50:IMAGENET1K_V1" in info.value.hint
    v1_name = f"resnet50-{hashlib.sha256(BLOB).hexdigest()[:8]}.pth"
    monkeypatch.setattr(v1.value, "url", closed_port_url(f"/models/{v1_name}"))
    monkeypatch.setattr(v2.value, "url", closed_port_url("/models/resnet50-v2-never.pth"))
    with FileServer({f"/m/{v1_name}": BLOB}) as server:
        path = download_weights("resnet50:IMAGENET1K_V1", mirrors=[server.url("/m")])
        assert download_weights("resnet50", variant="IMAGENET1K_V1", mirrors=[server.url("/m")]) == path
    assert path.name == v1_name and path.read_bytes() == BLOB
    assert server.paths() == [f"/m/{v1_name}"]  # fetched once, reused after
    with pytest.raises(CarsTLError, match="IMAGENET1K_V3") as info:
        download_weights("resnet50:IMAGENET1K_V3")
    assert "IMAGENET1K_V1" in info.value.message


def test_a_plain_download_on_a_read_only_data_folder_that_verifies_says_so(tmp_path, monkeypatch):
    import errno

    data_dir = tmp_path / "data"
    prepare_dataset(data_dir, "demo")
    lock = str(devkit.stanford_root(data_dir).with_name(".stanford_cars.lock"))
    os.unlink(lock)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # what a read-only mount answers (chmod does not stop root)
        if str(path) == lock and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), lock)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    manifest, action = prepare_dataset(data_dir, "demo")
    assert action == "already verified" and manifest.counts() == COUNTS
    with pytest.raises(CarsTLError, match="Read-only file system") as refused:  # --verify rewrites the manifest
        prepare_dataset(data_dir, "demo", verify=True)
    assert f"make {data_dir} writable" in refused.value.hint


def test_download_verify_says_how_often_to_run_it(demo_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(demo_dir, copy)
    result = run_cli("download", "--data-dir", copy, "--source", "demo", "--verify")
    assert result.returncode == 0, result.stdout
    assert "size and mtime" in result.stdout and "Run --verify after copying" in result.stdout
