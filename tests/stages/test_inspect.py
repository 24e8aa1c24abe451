"""inspect: provenance and statistics of a cache, NaN reported, two caches compared, a run's metrics."""

from __future__ import annotations

import json

import numpy as np
from helpers import assert_refused, run_cli
from typer.testing import CliRunner

from cars_tl.artifacts import features
from cars_tl.cli import app
from cars_tl.stages.inspect import feature_stats, inspect_paths


def _attrs(**extra):
    return {
        "backbone": "resnet18",
        "weights": "random",
        "weights_digest": "ab" * 32,
        "weights_sha256": "",
        "transform": {"crop": 8},
        "crop": "full",
        "margin": 0.0,
        "precision": "fp32",
        "class_names": ["A x", "B y"],
        "num_classes": 2,
        "feature_dim": 3,
        "dataset_fingerprint": "cd" * 32,
        "versions": {"torch": "x"},
        "options": {"batch_size": 8},
        "skip_bad": False,
        **extra,
    }


def _cache(path, train_x, test_x, attrs=None, skipped=()):
    def split(x, offset):
        x = np.asarray(x, np.float32)
        return features.SplitArrays(
            x,
            np.arange(len(x)) % 2,
            np.arange(offset, offset + len(x)),
            [f"i/{offset + i}.jpg" for i in range(len(x))],
            list(skipped),
        )

    return features.write(path, attrs or _attrs(), {"train": split(train_x, 0), "test": split(test_x, 100)})


def test_feature_statistics_by_hand():
    s = feature_stats(np.array([[3, 4, 0], [0, 0, 0], [np.nan, 1, 1], [np.inf, 0, 0]], np.float32))
    assert s["dim"] == 3 and s["count"] == 4
    assert s["mean_l2_norm"] == 2.5 and s["min_l2_norm"] == 0.0  # over the finite vectors (5 and 0)
    assert s["zero_fraction"] == 6 / 12
    assert s["nan_values"] == 1 and s["inf_values"] == 1 and s["non_finite_vectors"] == 2 and s["zero_vectors"] == 1


def test_inspect_a_cache_with_a_nan_feature_reports_it(tmp_path):
    train = [[1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1]]
    test = [[1, 0, 0], [float("nan"), 1, 0]]
    path = _cache(tmp_path / "f.h5", train, test, skipped=[{"path": "cars_test/x.jpg", "reason": "truncated"}])
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["provenance"]["backbone"] == "resnet18" and info["provenance"]["dataset_fingerprint"] == "cd" * 32
    assert info["splits"]["test"]["features"]["nan_values"] == 1
    assert info["splits"]["train"]["features"]["nan_values"] == 0 and info["splits"]["train"]["count"] == 4
    assert info["splits"]["test"]["skipped"][0]["path"] == "cars_test/x.jpg"
    text = CliRunner().invoke(app, ["inspect", str(path)]).output
    assert "WARNING: 1 NaN values" in text and "truncated" in text


def test_compare_two_caches_of_the_same_images(tmp_path):
    rng = np.random.default_rng(0)
    train, test = rng.random((6, 3)) + 0.1, rng.random((4, 3)) + 0.1
    a = _cache(tmp_path / "a.h5", train, test)
    other = test.copy()
    other[2] = -other[2]  # one image's vector flipped: cosine -1 there
    b = _cache(tmp_path / "b.h5", train * 2.0, other, attrs=_attrs(precision="bf16", options={"batch_size": 16}))
    info = inspect_paths([a, b])
    assert info["attrs_differ"]["precision"] == {"a": "fp32", "b": "bf16"}
    assert info["options_differ"] == {"batch_size": {"a": 8, "b": 16}}
    assert abs(info["splits"]["train"]["cosine"]["min"] - 1.0) < 1e-6  # scaled: same direction
    test_cos = info["splits"]["test"]["cosine"]
    assert abs(test_cos["min"] + 1.0) < 1e-6 and test_cos["least_similar_id"] == 102
    assert abs(test_cos["mean"] - 0.5) < 1e-6 and info["splits"]["test"]["common_images"] == 4


def test_inspect_a_run_shows_its_final_metrics(demo_head_run):
    info = inspect_paths([demo_head_run])
    assert info["kind"] == "head" and info["status"] == "complete"
    assert info["final"]["test_acc"] is not None and info["predictions"]["agrees_with_final"] is True
    result = CliRunner().invoke(app, ["inspect", str(demo_head_run.parent)])
    assert result.exit_code == 2 and "not a cars_tl run" in result.output


def test_a_missing_path_names_every_kind_inspect_reads(tmp_path):
    assert_refused(
        run_cli("inspect", tmp_path / "nothing"),
        "nothing does not exist",
        "a feature cache",
        "a run directory",
        "a data folder",
    )
