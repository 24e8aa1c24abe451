"""The HDF5 feature cache: schema round trip, resume after a kill, corruption, no-op reruns."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TINY

from cars_tl.artifacts import features
from cars_tl.core.errors import CarsTLError
from cars_tl.data import transforms
from cars_tl.stages.extract import extract_features

REPO = Path(__file__).resolve().parents[1]


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
    result = extract_features(demo_dir, batch_size=32, out=demo_features, **TINY)
    assert result.action == "up to date" and demo_features.stat().st_mtime_ns == before


def _extract_command(data_dir: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cars_tl",
        "extract-features",
        "--data-dir",
        str(data_dir),
        "--backbone",
        "resnet18",
        "--weights",
        "random",
        "--image-size",
        "64",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]


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

    from cars_tl.data import devkit
    from cars_tl.data import manifest as manifests

    shutil.copytree(demo_dir / devkit.STANFORD_DIR, tmp_path / devkit.STANFORD_DIR)
    manifest = manifests.load_manifest(tmp_path)
    victim = manifest.root / manifest.split("test")[4].path
    victim.write_bytes(victim.read_bytes()[:-600])  # the header reads, the pixels do not
    manifest = manifests.build_manifest(tmp_path)  # download accepts it: only decoding finds the damage
    for workers in (0, 2):  # the error names the file, also when a worker process hit it
        with pytest.raises(CarsTLError, match="truncated") as err:
            extract_features(
                tmp_path, splits=("test",), batch_size=8, out=tmp_path / "strict.h5", **dict(TINY, workers=workers)
            )
        assert manifest.split("test")[4].path in err.value.message and "--skip-bad" in err.value.hint
    result = extract_features(tmp_path, splits=("test",), batch_size=8, out=tmp_path / "f.h5", skip_bad=True, **TINY)
    test = features.load(tmp_path / "f.h5").split("test")
    assert result.skipped == {"test": 1} and len(test.labels) == 71
    assert test.skipped[0]["path"] == manifest.split("test")[4].path and "truncated" in test.skipped[0]["reason"]
    assert manifest.split("test")[4].path not in test.paths


def test_extracting_another_split_adds_to_the_file(demo_dir, demo_features, tmp_path):
    out = tmp_path / "f.h5"
    extract_features(demo_dir, splits=("train",), batch_size=32, out=out, **TINY)
    assert set(features.load(out).splits) == {"train"}
    result = extract_features(demo_dir, splits=("test",), batch_size=32, out=out, **TINY)
    assert result.counts == {"test": 72}
    both, reference = features.load(out), features.load(demo_features)
    for split in ("train", "test"):
        np.testing.assert_array_equal(both.split(split).features, reference.split(split).features)
    assert extract_features(demo_dir, batch_size=32, out=out, **TINY).action == "up to date"


def test_extracted_features_are_the_body_on_the_weights_preprocessing(demo_dir, demo_features):
    """Folded BatchNorm, threaded loading and channels_last change nothing but fp32 rounding."""
    import torch

    from cars_tl.data import manifest as manifests
    from cars_tl.data.dataset import CarsDataset
    from cars_tl.models import backbones

    bb = backbones.build_backbone(TINY["backbone"], TINY["weights"], TINY["image_size"])
    manifest = manifests.load_manifest(demo_dir)
    dataset = CarsDataset(manifest, "test", transforms.eval_transform(bb.transform))
    positions = [0, 17, 71]
    with torch.inference_mode():
        want = bb.body(torch.stack([dataset[p][0] for p in positions])).numpy()
    got = features.load(demo_features).split("test").features[positions]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
