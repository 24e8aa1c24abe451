"""Hostile feature caches, trunk caches and run files: each variant of a real tiny cache is refused
with the project's message naming the file (no traceback, nothing executed, nothing huge allocated),
and extract-features treats an unreadable cache as stale and extracts it again."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import TINY_CLI, assert_refused, run_cli, tiny

from cars_tl import load_features
from cars_tl.artifacts import features, runs, trunks
from cars_tl.core.errors import CarsTLError
from cars_tl.stages.extract import extract_features

DEEP = "[" * 100_000 + "]" * 100_000


def _replace(group, name: str, data, **kw) -> None:
    """``group[name]`` rewritten with ``data``; its SHA-256 recomputed, as a careful forger would."""
    del group[name]
    ds = group.create_dataset(name, data=data, **kw)
    ds.attrs["sha256"] = features.content_digest(data)


def _edit(fn):
    def variant(path: Path) -> None:
        with h5py.File(path, "a") as f:
            fn(f, path)

    return variant


def _link(target):
    def fn(f, path):
        del f["train/labels"]
        f["train/labels"] = target(path)

    return fn


def _attr(key, value):
    def fn(f, path):
        f.attrs[key] = value(f) if callable(value) else value

    return fn


def _huge(f, path):
    del f["train/features"]
    f["train"].create_dataset("features", shape=(10**9, 512), dtype=np.float32, chunks=(256, 512), compression="gzip")
    f.attrs["feature_dim"] = 512


def _external_storage_of(name):
    # The dataset's bytes come from another file (HDF5 reads any file it is pointed at).
    def fn(f, path):
        x = f["train"][name][:]
        raw = path.with_name(path.name + ".raw")
        raw.write_bytes(x.tobytes())
        del f["train"][name]
        ds = f["train"].create_dataset(name, shape=x.shape, dtype=x.dtype, external=[(str(raw), 0, x.nbytes)])
        ds.attrs["sha256"] = features.content_digest(x)

    return fn


def _virtual(f, path):
    x = f["train/features"][:]
    src = path.with_name(path.name + ".src.h5")
    with h5py.File(src, "w") as s:
        s["x"] = x
    layout = h5py.VirtualLayout(shape=x.shape, dtype=x.dtype)
    layout[:] = h5py.VirtualSource(src.name, "x", shape=x.shape)
    del f["train/features"]
    f["train"].create_virtual_dataset("features", layout)
    f["train/features"].attrs["sha256"] = features.content_digest(x)


def _rewrite(name, change):
    def fn(f, path):
        _replace(f["train"], name, change(f["train"][name][:]))

    return fn


def _bad_paths(f, path):
    n = len(f["train/labels"])
    data = np.array([b"\xff\xfe" + bytes([65 + i % 20]) for i in range(n)], dtype=object)
    del f["train/paths"]
    ds = f["train"].create_dataset("paths", data=data, dtype=h5py.string_dtype("utf-8"))
    ds.attrs["sha256"] = "0" * 64  # the reader refuses the text before any checksum


def _split_is_dataset(f, path):
    del f["train"]
    f["train"] = np.zeros(3)


def _nested_skipped(f, path):
    f["train"].attrs["skipped"] = DEEP


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_hdf5(path):
    path.write_text("features,labels\n1,2\n")


def _directory(path):
    path.unlink()
    path.mkdir()


# name -> (mutation of a copy, what the message says besides the path)
VARIANTS = {
    "pickled bytes in an attribute": (_edit(_attr("backbone", np.bytes_(pickle.dumps({1: 2})))), "UTF-8"),
    "object reference attribute": (_edit(_attr("class_names", lambda f: f["train"].ref)), "class_names"),
    "deeply nested JSON attribute": (_edit(_attr("class_names", DEEP)), "nested"),
    "deeply nested skipped list": (_edit(_nested_skipped), "nested"),
    "missing external link": (_edit(_link(lambda p: h5py.ExternalLink("missing.h5", "/x"))), "link"),
    "looping external link": (_edit(_link(lambda p: h5py.ExternalLink(p.name, "/train/labels"))), "link"),
    "soft-link loop": (_edit(_link(lambda p: h5py.SoftLink("/train/labels"))), "link"),
    "soft link to a good dataset": (_edit(_link(lambda p: h5py.SoftLink("/test/labels"))), "link"),
    "declares (1e9, 512) rows": (_edit(_huge), "declares"),
    "external storage": (_edit(_external_storage_of("features")), "external"),
    "virtual dataset": (_edit(_virtual), "virtual"),
    "class names as a dict": (_edit(_attr("class_names", json.dumps({"a": 1}))), "class_names"),
    "num_classes 1e12": (_edit(_attr("num_classes", 10**12)), "num_classes"),
    "num_classes as an array": (_edit(_attr("num_classes", np.arange(3))), "num_classes"),
    "feature_dim as text": (_edit(_attr("feature_dim", "512")), "feature_dim"),
    "margin as a list": (_edit(_attr("margin", json.dumps([1]))), "margin"),
    "float64 features": (_edit(_rewrite("features", lambda x: x.astype(np.float64))), "dtype"),
    "float labels": (_edit(_rewrite("labels", lambda y: y.astype(np.float32))), "dtype"),
    "3-d features": (_edit(_rewrite("features", lambda x: x[:, :, None])), "shape"),
    "1-d features": (_edit(_rewrite("features", lambda x: x.ravel())), "shape"),
    "one label short": (_edit(_rewrite("labels", lambda y: y[:-1])), "shape"),
    "labels out of range": (_edit(_rewrite("labels", lambda y: y + 1000)), "labels outside"),
    "negative labels": (_edit(_rewrite("labels", lambda y: y - 1000)), "labels outside"),
    "paths not UTF-8": (_edit(_bad_paths), "UTF-8"),
    "a split that is a dataset": (_edit(_split_is_dataset), "train"),
    "truncated file": (_truncate, "readable"),
    "not an HDF5 file": (_not_hdf5, "readable"),
    "a directory": (_directory, "folder"),
}


def _variant(demo_features: Path, tmp_path: Path, name: str) -> Path:
    path = tmp_path / "hostile.h5"
    shutil.copy(demo_features, path)
    VARIANTS[name][0](path)
    return path


@pytest.mark.parametrize("name", VARIANTS)
def test_every_hostile_variant_is_the_projects_error_naming_the_file(name, demo_features, tmp_path):
    path = _variant(demo_features, tmp_path, name)
    with pytest.raises(CarsTLError) as err:
        load_features(path)
    assert str(path) in err.value.message, err.value.message
    assert VARIANTS[name][1] in err.value.message, err.value.message
    assert err.value.hint


@pytest.mark.parametrize(
    "name", ["soft-link loop", "declares (1e9, 512) rows", "object reference attribute", "truncated file"]
)
def test_inspect_and_train_head_refuse_a_hostile_cache_in_one_message(name, demo_features, tmp_path):
    path = _variant(demo_features, tmp_path, name)
    assert_refused(run_cli("inspect", path), str(path))
    assert_refused(run_cli("train-head", "--features", path, "--out", tmp_path / "run"), str(path))
    assert not (tmp_path / "run" / runs.METRICS).exists()


def test_nan_features_are_a_valid_file_that_every_stage_refuses(demo_features, tmp_path):
    # The format holds what the network produced (an fp16 overflow is NaN): it loads, inspect
    # counts the values, and the stages that fit a model refuse them before creating a run.
    path = _variant(demo_features, tmp_path, "float64 features")
    shutil.copy(demo_features, path)
    with h5py.File(path, "a") as f:
        _replace(f["train"], "features", np.full_like(f["train/features"][:], np.nan))
    assert np.isnan(load_features(path).split("train").features).all()
    result = run_cli("inspect", path)
    assert result.returncode == 0 and "Traceback" not in result.stdout
    assert_refused(run_cli("train-head", "--features", path, "--out", tmp_path / "run"), "NaN")


@pytest.mark.parametrize(
    "name",
    ["pickled bytes in an attribute", "missing external link", "declares (1e9, 512) rows", "not an HDF5 file"],
)
def test_extract_features_over_a_hostile_cache_extracts_again(name, demo_dir, demo_features, tmp_path):
    path = _variant(demo_features, tmp_path, name)
    result = extract_features(demo_dir, splits=("train", "test"), out=path, **tiny(batch_size=32))
    assert result.action == "extracted" and str(path) in result.replaced_corrupt
    np.testing.assert_array_equal(
        features.verify(path).split("train").features, features.load(demo_features).split("train").features
    )


def test_the_cli_says_a_hostile_cache_is_extracted_again(demo_dir, demo_features, tmp_path):
    path = _variant(demo_features, tmp_path, "soft-link loop")
    result = run_cli(
        "extract-features", "--data-dir", demo_dir, "--split", "train", "--batch-size", "32", *TINY_CLI, "--out", path
    )
    assert result.returncode == 0 and "Traceback" not in result.stdout, result.stdout
    assert "extracted again" in result.stdout, result.stdout


# --------------------------------------------------------------------------- trunk caches


@pytest.fixture(scope="module")
def trunk_cache(demo_dir, tmp_path_factory) -> Path:
    from cars_tl.stages.trunk_cache import build_trunk

    out = tmp_path_factory.mktemp("trunk") / "trunk.h5"
    build_trunk(demo_dir, unfreeze="layer4", out=out, **tiny(batch_size=16, image_size=32))
    return out


def _trunk_maps(name):
    def fn(f, path):
        if name == "declares":
            del f["train/maps"]
            f["train"].create_dataset("maps", shape=(10**9, 256, 2, 2), dtype=np.float32)
        elif name == "float64":
            _replace(f["train"], "maps", f["train/maps"][:].astype(np.float64))
        elif name == "labels 2-d":
            _replace(f["train"], "labels", f["train/labels"][:][:, None])

    return fn


TRUNK_VARIANTS = {
    "soft-link loop": (_edit(_link(lambda p: h5py.SoftLink("/train/labels"))), "link"),
    "missing external link": (_edit(_link(lambda p: h5py.ExternalLink("missing.h5", "/x"))), "link"),
    "object reference attribute": (_edit(_attr("map_shape", lambda f: f["train"].ref)), "map_shape"),
    "deeply nested map_shape": (_edit(_attr("map_shape", DEEP)), "nested"),
    "map_shape as a dict": (_edit(_attr("map_shape", json.dumps({"c": 1}))), "map_shape"),
    "num_classes 1e12": (_edit(_attr("num_classes", 10**12)), "num_classes"),
    "declares 1e9 maps": (_edit(_trunk_maps("declares")), "declares"),
    "float64 maps": (_edit(_trunk_maps("float64")), "dtype"),
    "2-d labels": (_edit(_trunk_maps("labels 2-d")), "shape"),
    "external storage": (_edit(_external_storage_of("maps")), "external"),
    "truncated file": (_truncate, "readable"),
}


@pytest.mark.parametrize("name", TRUNK_VARIANTS)
def test_every_hostile_trunk_cache_is_the_projects_error_naming_the_file(name, trunk_cache, tmp_path):
    path = tmp_path / "hostile.h5"
    shutil.copy(trunk_cache, path)
    TRUNK_VARIANTS[name][0](path)
    with pytest.raises(CarsTLError) as err:
        trunks.verify(path)
    assert str(path) in err.value.message and TRUNK_VARIANTS[name][1] in err.value.message, err.value.message
    identity = {k: trunks.read_attrs(trunk_cache).get(k) for k in trunks.IDENTITY_KEYS}
    fresh, why = trunks.check_existing(path, identity)
    assert not fresh and str(path) in why


# --------------------------------------------------------------------------- run files


def test_a_deeply_nested_metrics_file_is_a_message(demo_head_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(demo_head_run, run_dir)
    metrics = json.loads((run_dir / runs.METRICS).read_text())
    (run_dir / runs.METRICS).write_text(json.dumps(metrics)[:-1] + ', "junk": ' + DEEP + "}")
    with pytest.raises(CarsTLError, match="nested") as err:
        runs.read_metrics(run_dir)
    assert str(run_dir / runs.METRICS) in err.value.message
    assert_refused(run_cli("inspect", run_dir), str(run_dir / runs.METRICS))


def test_a_deeply_nested_status_file_is_ignored_like_an_unreadable_one(demo_head_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(demo_head_run, run_dir)
    metrics = json.loads((run_dir / runs.METRICS).read_text())
    runs.write_metrics(run_dir, dict(metrics, status="running"))
    (run_dir / runs.STATUS).write_text(DEEP)
    assert runs.read_metrics(run_dir)["status"] == "running"
