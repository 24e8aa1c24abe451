"""The HDF5 feature cache: schema round trip, resume after a kill, corruption, no-op reruns."""

from __future__ import annotations

import os
import re
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
from helpers import (
    REPO,
    TINY,
    TINY_CLI,
    FullDisk,
    assert_refused,
    cache_rows,
    poisoned,
    rewrite_cache,
    run_cli,
    run_python,
    tiny,
    toy_cache,
)

from cars_tl.artifacts import features
from cars_tl.core.errors import CarsTLError
from cars_tl.data import devkit, transforms
from cars_tl.data import manifest as manifests
from cars_tl.stages import train_head as heads
from cars_tl.stages.extract import extract_features


def _attrs(**extra):
    return {
        "backbone": "resnet18",
        "weights": "random",
        "weights_digest": "ab" * 32,
        "transform": {"crop": 8},
        "crop": "full",
        "margin": 0.0,
        "precision": "fp32",
        "class_names": ["a", "b", "c"],
        "num_classes": 3,
        "feature_dim": 4,
        "dataset_fingerprint": "cd" * 32,
        "versions": {"torch": "x"},
        "options": {},
        "skip_bad": False,
        **extra,
    }


def _split(n, seed=0):
    rng = np.random.default_rng(seed)
    return features.SplitArrays(
        rng.random((n, 4), dtype=np.float32),
        rng.integers(0, 3, n),
        np.arange(n),
        [f"img/{i}.jpg" for i in range(n)],
        [],
    )


def test_schema_round_trip(tmp_path):
    path = features.write(tmp_path / "f.h5", _attrs(), {"train": _split(10), "test": _split(5, 1)})
    cache = features.load(path)
    assert cache.feature_dim == 4 and cache.num_classes == 3 and cache.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(cache.split("train").features, _split(10).features)
    assert cache.split("test").paths[2] == "img/2.jpg"
    with h5py.File(path) as f:  # plain h5py reads it, with the documented layout
        assert f.attrs["schema_version"] == features.SCHEMA_VERSION
        assert f["train/features"].fletcher32 and f["train/features"].compression == "gzip"
        assert f["train/labels"].dtype == np.int64


def test_wrong_schema_version_is_refused(tmp_path):
    path = features.write(tmp_path / "f.h5", _attrs(), {"train": _split(3)})
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(CarsTLError, match="schema 99") as err:
        features.load(path)
    assert "extract-features" in err.value.hint


def test_a_flipped_byte_in_a_chunk_is_detected(tmp_path):
    path = features.write(
        tmp_path / "f.h5",
        _attrs(feature_dim=64),
        {
            "train": features.SplitArrays(
                np.random.default_rng(0).random((300, 64), dtype=np.float32),
                np.zeros(300, int),
                np.arange(300),
                ["x"] * 300,
                [],
            )
        },
    )
    with h5py.File(path) as f:
        info = f["train/features"].id.get_chunk_info(0)
    blob = bytearray(path.read_bytes())
    blob[info.byte_offset + info.size // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CarsTLError, match="corrupt") as err:
        features.load(path)
    assert str(path) in err.value.message


def test_missing_file_and_missing_split(tmp_path):
    with pytest.raises(CarsTLError, match="does not exist"):
        features.load(tmp_path / "nope.h5")
    cache = features.load(features.write(tmp_path / "f.h5", _attrs(), {"train": _split(3)}))
    with pytest.raises(CarsTLError, match="no 'test' split") as err:
        cache.split("test")
    assert "--split test" in err.value.hint


def test_extraction_writes_the_documented_attributes(demo_features):
    attrs = features.read_attrs(demo_features)
    for key in (
        "backbone",
        "weights",
        "weights_digest",
        "transform",
        "crop",
        "precision",
        "class_names",
        "dataset_fingerprint",
        "versions",
        "created",
        "options",
    ):
        assert key in attrs
    cache = features.load(demo_features)
    assert cache.split("train").features.shape == (144, 512)
    assert not features.partial_dir(demo_features).exists()


def test_rerun_with_identical_inputs_is_a_no_op(demo_dir, demo_features):
    before = demo_features.stat().st_mtime_ns
    result = extract_features(demo_dir, out=demo_features, **tiny(batch_size=32))
    assert result.action == "up to date" and demo_features.stat().st_mtime_ns == before


def _extract_command(data_dir: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cars_tl",
        "extract-features",
        "--data-dir",
        str(data_dir),
        *TINY_CLI,
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]


@pytest.mark.slow
def test_killed_extraction_resumes_to_identical_arrays(demo_dir, demo_features, tmp_path):
    out = tmp_path / "resumed.h5"
    partial = features.partial_dir(out)
    process = subprocess.Popen(
        _extract_command(demo_dir, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("train-*.npz"))) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "extraction finished before it could be killed"
    assert not out.exists() and partial.is_dir()
    done_chunks = len(list(partial.glob("*.npz")))
    result = subprocess.run(_extract_command(demo_dir, out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resumed" in result.stderr and done_chunks >= 3
    resumed, reference = features.load(out), features.load(demo_features)
    for split in ("train", "test"):
        np.testing.assert_array_equal(resumed.split(split).features, reference.split(split).features)
        np.testing.assert_array_equal(resumed.split(split).labels, reference.split(split).labels)
    assert not partial.exists()


def test_skip_bad_lists_the_skipped_images(demo_dir, tmp_path):
    import shutil

    shutil.copytree(demo_dir / devkit.STANFORD_DIR, tmp_path / devkit.STANFORD_DIR)
    manifest = manifests.load_manifest(tmp_path)
    victim = manifest.root / manifest.split("test")[4].path
    victim.write_bytes(victim.read_bytes()[:-600])  # the header reads, the pixels do not
    manifest = manifests.build_manifest(tmp_path)  # download accepts it: only decoding finds the damage
    for workers in (0, 2):  # the error names the file, also when a worker process hit it
        with pytest.raises(CarsTLError, match="truncated") as err:
            extract_features(
                tmp_path, splits=("test",), out=tmp_path / "strict.h5", **tiny(batch_size=8, workers=workers)
            )
        assert manifest.split("test")[4].path in err.value.message and "--skip-bad" in err.value.hint
    result = extract_features(tmp_path, splits=("test",), out=tmp_path / "f.h5", skip_bad=True, **tiny(batch_size=8))
    test = features.load(tmp_path / "f.h5").split("test")
    assert result.skipped == {"test": 1} and len(test.labels) == 71
    assert test.skipped[0]["path"] == manifest.split("test")[4].path and "truncated" in test.skipped[0]["reason"]
    assert manifest.split("test")[4].path not in test.paths


def test_extracting_another_split_adds_to_the_file(demo_dir, demo_features, tmp_path):
    out = tmp_path / "f.h5"
    extract_features(demo_dir, splits=("train",), out=out, **tiny(batch_size=32))
    assert set(features.load(out).splits) == {"train"}
    result = extract_features(demo_dir, splits=("test",), out=out, **tiny(batch_size=32))
    assert result.counts == {"test": 72}
    both, reference = features.load(out), features.load(demo_features)
    for split in ("train", "test"):
        np.testing.assert_array_equal(both.split(split).features, reference.split(split).features)
    assert extract_features(demo_dir, out=out, **tiny(batch_size=32)).action == "up to date"


def test_extracted_features_are_the_body_on_the_weights_preprocessing(demo_dir, demo_features):
    """Folded BatchNorm, threaded loading and channels_last change nothing but fp32 rounding."""

    from cars_tl.data.dataset import CarsDataset
    from cars_tl.models import backbones

    bb = backbones.build_backbone(TINY["backbone"], TINY["weights"], TINY["image"].image_size)
    manifest = manifests.load_manifest(demo_dir)
    dataset = CarsDataset(manifest, "test", transforms.eval_transform(bb.transform))
    positions = [0, 17, 71]
    with torch.inference_mode():
        want = bb.body(torch.stack([dataset[p][0] for p in positions])).numpy()
    got = features.load(demo_features).split("test").features[positions]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _extract(demo_dir, out, **kw):
    return extract_features(demo_dir, splits=("train", "test"), out=out, **tiny(batch_size=32, **kw))


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
    result = run_cli("fit-svm", "--features", cache_copy, "--out", tmp_path / "svm")
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


FILL_AFTER_CHECK = """
import os, sys
from pathlib import Path
from cars_tl.artifacts import features
from cars_tl.cli import app
real = features.ensure_room
def check_then_fill(path, needed, what="output"):
    real(path, needed, what)  # the check passes: then another process takes the space
    st = os.statvfs(Path(path).parent)
    with open(Path(path).parent.parent / "filler", "wb") as f:
        f.write(b"x" * max(0, st.f_bavail * st.f_frsize - 64 * 1024))
features.ensure_room = check_then_fill
sys.argv = ["cars-tl", *sys.argv[1:]]
app()
"""


LIMIT_WITHOUT_CHECK = """
import resource, sys
from cars_tl.artifacts import features
from cars_tl.cli import app
limit = int(sys.argv[1])
def passed_then_limited(*args, **kwargs):  # the check passed; then the limit shrank (the chunks were written)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
features.ensure_room = passed_then_limited
sys.argv = ["cars-tl", *sys.argv[2:]]
app()
"""


LIMITED = """
import resource, sys
from cars_tl.cli import app
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = ["cars-tl", *sys.argv[2:]]
app()
"""


def _assert_clean_refusal(result, out: Path):
    assert result.returncode == 2, result.stdout
    assert "not enough room for the feature cache" in result.stdout and str(out) in result.stdout
    assert "Traceback" not in result.stdout and "h5py" not in result.stdout and "HDF5" not in result.stdout
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.slow
def test_a_disk_that_fills_during_the_write_is_a_message_and_the_rerun_succeeds(demo_dir, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = mount / "feats" / "f.h5"
        result = run_python(FILL_AFTER_CHECK, "extract-features", "--data-dir", demo_dir, *TINY_CLI, "--out", out)
        _assert_clean_refusal(result, out)
        assert "No space left" in result.stdout
        assert features.partial_dir(out).exists()  # the extracted chunks are kept for the rerun
        (mount / "filler").unlink()
        again = run_cli("extract-features", "--data-dir", demo_dir, *TINY_CLI, "--out", out)
        assert again.returncode == 0, again.stdout
        assert len(features.verify(out).split("train").labels) == 144
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_file_size_limit_hit_during_the_write_is_the_same_message(demo_dir, tmp_path):
    out = tmp_path / "f.h5"
    result = run_python(
        LIMIT_WITHOUT_CHECK, 100_000, "extract-features", "--data-dir", demo_dir, *TINY_CLI, "--out", out
    )
    _assert_clean_refusal(result, out)


def test_a_small_cache_that_cannot_be_written_states_its_size_in_a_unit_that_fits(tmp_path, monkeypatch):
    x = np.ones((4, 3), np.float32)
    y = np.arange(4)
    monkeypatch.setattr(features, "open", FullDisk, raising=False)  # the module's open(): the disk is full
    with pytest.raises(CarsTLError) as err:
        toy_cache(tmp_path, x, y, x, y)
    # a cache of a few KB read "writing its 0.0 MB failed"
    assert re.search(r"writing its \d+(\.\d)? KB failed \(No space left on device\)", err.value.message), err.value
    assert not list(tmp_path.iterdir())


def test_a_cache_that_fits_under_the_file_size_limit_is_written(demo_dir, tmp_path):
    out = tmp_path / "f.h5"
    result = run_python(LIMITED, 1 << 20, "extract-features", "--data-dir", demo_dir, *TINY_CLI, "--out", out)
    assert result.returncode == 0, result.stdout
    size = out.stat().st_size
    assert 100_000 < size < 1 << 20  # the demo cache (about 0.4 MB) fits: it used to be refused
    assert features.verify(out).num_classes > 1


def test_an_empty_test_split_is_refused_by_svm_and_knn_and_not_measured_by_train_head(demo_features, tmp_path):
    cache = rewrite_cache(
        demo_features, tmp_path / "empty-test.h5", test=lambda s: cache_rows(s, np.zeros(len(s.labels), bool))
    )
    for stage in ("fit-svm", "knn"):
        result = run_cli(stage, "--features", cache, "--out", tmp_path / stage)
        assert_refused(result, "the test split is empty", stage)
        assert not (tmp_path / stage).exists()
    run_dir, metrics = heads.train_head(cache, epochs=1, out=tmp_path / "head")
    assert metrics["status"] == "complete" and metrics["final"].get("test_acc") is None
    assert not (run_dir / "predictions-test.npz").exists()


@pytest.mark.parametrize("split,value", [("train", np.nan), ("test", np.inf)])
def test_non_finite_features_are_refused_by_every_stage(split, value, demo_features, tmp_path):
    cache = rewrite_cache(demo_features, tmp_path / "bad.h5", **{split: lambda s: poisoned(s, value)})
    for stage, extra in (("fit-svm", ()), ("knn", ()), ("train-head", ("--preset", "tuned", "--epochs", "1"))):
        result = run_cli(stage, "--features", cache, *extra, "--out", tmp_path / stage)
        assert_refused(result, f"1 {split} feature vectors contain NaN or Inf (of", f"cars-tl inspect {cache}")
        assert not (tmp_path / stage).exists()
    with pytest.raises(CarsTLError, match="contain NaN or Inf"):
        heads.train_head(cache, epochs=1, out=tmp_path / "study")


def test_the_format_name_is_the_one_caches_always_carried(demo_features, tmp_path):
    # The package split renamed the module; the file format keeps its name. Files written meanwhile
    # under the module's path are still read; any other name is refused.
    import h5py

    assert features.read_attrs(demo_features)["kind"] == "cars_tl.features"
    for kind, accepted in (("cars_tl.artifacts.features", True), ("cars_tl.trunks", False)):
        copy = tmp_path / f"{kind}.h5"
        shutil.copy(demo_features, copy)
        with h5py.File(copy, "r+") as f:
            f.attrs["kind"] = kind
        if accepted:
            assert features.verify(copy).num_classes == features.verify(demo_features).num_classes
        else:
            with pytest.raises(CarsTLError, match=f"is not a cars_tl feature cache \\(kind='{kind}'\\)"):
                features.verify(copy)


def test_a_cache_whose_spec_names_the_side_crop_is_still_up_to_date(demo_dir, tmp_path):
    """The transform spec names the final side ``side`` (``--crop`` means full | box); a cache written by
    an earlier version, whose spec said ``crop``, keeps its default name and is found up to date, not
    extracted again; predict/train-head read its side alike."""
    import json

    from cars_tl.core.options import legacy_spec

    artifacts = tmp_path / "artifacts"
    first = extract_features(demo_dir, artifacts=artifacts, **tiny(batch_size=32))
    spec = features.load(first.path).attrs["transform"]
    assert spec["side"] == TINY["image"].image_size and "crop" not in spec
    with h5py.File(first.path, "r+") as f:  # as the earlier version wrote it
        f.attrs["transform"] = json.dumps(legacy_spec(json.loads(f.attrs["transform"])))
    old = features.load(first.path)
    assert "crop" in old.attrs["transform"] and transforms.side(old.attrs["transform"]) == spec["side"]
    again = extract_features(demo_dir, artifacts=artifacts, **tiny(batch_size=32))
    assert again.path == first.path and again.action == "up to date"
    run_dir, metrics = heads.train_head(first.path, epochs=1, out=tmp_path / "head")
    assert metrics["status"] == "complete"
