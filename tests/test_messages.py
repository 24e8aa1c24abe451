"""No traceback left, no misleading hint (issue 19, items 6 and 7 except the data/download bullets).

Cases (each a clean refusal: exit 2, what was wrong, the value, the valid choices, a next command; or a
correct result), for the next adversarial run to start from:

markup
  * a path holding ``[/]`` (or ``[red]``) in an error message, and in the output of a successful run
    (``knn --out 'r[/]un'``): printed verbatim, no rich MarkupError;
  * a hint holding brackets (``pip install 'cars_tl[parquet]'``) keeps them.
train-only / empty test split
  * ``train-head`` on a cache of a train-only dataset: a complete run, "no test split" printed (was KeyError
    'test_loss'); on a cache whose test split is empty: the same (was "acc 0.00%" as if measured);
  * ``fit-svm`` and ``knn`` on a cache whose test split is empty: refused, no run directory.
non-finite features
  * NaN / Inf rows in train or test: ``train-head`` (study and tuned), ``fit-svm`` and ``knn`` refuse with the
    same message (one check, :func:`cars_tl.artifacts.features.check_finite_features`), no run directory.
arguments
  * ``predict --model R`` with neither images nor ``--split``; a folder given as an image;
  * ``--image-size 100000`` (and 31): refused before any allocation, valid range 32..1024;
  * ``--out`` naming an existing file where a run folder is expected, a folder where a cache file is
    expected (before extracting anything), or a path below a file;
  * a folder passed as ``--features``; ``inspect`` on a run whose ``metrics.json`` is a list;
  * ``fit-svm --seed -1`` without ``--C auto`` (was exit 0, seed ignored); ``--degree 0``.
tampered SVM files (only trusted types, wrong contents): each refused on load (predict and
  :func:`cars_tl.stages.fit_svm.load_model`): degree -5, C <= 0, gamma NaN, NaN dual coefficients, intercepts of the wrong
  shape, classes outside the run's, an empty class list, support indices beyond the training rows, support
  vectors of the wrong width (n_features of another cache), per-class support counts that do not add up,
  standard scaling with a zero scale.
finetune
  * Ctrl-C of a ``finetune --force`` rerun: the hint names the staged rerun (``--force`` again), never
    ``--resume`` of the old run; ``--resume`` with options other than the run's is refused naming them, and
    the run's config is not rewritten;
  * ``--init-head`` whose weights hold NaN: refused naming the head file (was blamed on ``--lr`` later).
hints by stage and input
  * a bad image of the user's own (predict IMAGE): the hint is about that file, not re-downloading the dataset;
  * a failed or interrupted fit-svm / train-head run is never told to ``finetune --resume``;
  * ``download --verify`` says how often to run it (the cheap check trusts sizes and mtimes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from cars_tl.artifacts import features, runs
from cars_tl.core.errors import CarsTLError
from cars_tl.models.svm import model as svm
from cars_tl.stages import train_head as heads

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cars_tl"]


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    return subprocess.run(
        [*CLI, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=300,
        cwd=cwd,
    )


def _refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout, result.stdout
    assert "error:" in result.stdout and "next:" in result.stdout, result.stdout
    for fragment in fragments:
        assert fragment in result.stdout, (fragment, result.stdout)


def _rewrite(src: Path, dst: Path, *, test=None, train=None, dataset_splits=None) -> Path:
    """A copy of the cache ``src`` with split arrays replaced (``test=False``: no test split), written as
    cars_tl writes caches (checksums and all), so only the content differs."""
    cache = features.load(src)
    splits = dict(cache.splits)
    for name, value in (("train", train), ("test", test)):
        if value is False:
            splits.pop(name)
        elif value is not None:
            splits[name] = value(splits[name])
    attrs = dict(cache.attrs)
    if dataset_splits is not None:
        attrs["options"] = dict(attrs.get("options") or {}, dataset_splits=list(dataset_splits))
    return features.write(dst, attrs, splits)


def _rows(s: features.SplitArrays, keep) -> features.SplitArrays:
    return features.SplitArrays(
        s.features[keep], s.labels[keep], s.ids[keep], [s.paths[i] for i in np.arange(len(s.labels))[keep]], []
    )


def _poisoned(s: features.SplitArrays, value=np.nan) -> features.SplitArrays:
    x = s.features.copy()
    x[3, 7] = value
    return features.SplitArrays(x, s.labels, s.ids, s.paths, s.skipped)


# --------------------------------------------------------------------------- markup


def test_paths_and_hints_with_brackets_print_verbatim(demo_features, tmp_path):
    missing = tmp_path / "a[/]b" / "x[red].h5"
    result = _cli("train-head", "--features", missing)
    _refused(result, f"feature file {missing} does not exist")
    out = tmp_path / "r[/]un[bold]"
    result = _cli("knn", "--features", demo_features, "--k", "5", "--out", out)
    assert result.returncode == 0, result.stdout
    assert f"knn run {out}:" in result.stdout and runs.read_metrics(out)["status"] == "complete"


def test_a_hint_keeps_its_brackets(capsys):
    from cars_tl import cli

    cli._error(CarsTLError("cannot read x[/]y", "pip install 'cars_tl[parquet]'"))
    err = capsys.readouterr().err
    assert "error: cannot read x[/]y" in err and "next: pip install 'cars_tl[parquet]'" in err


# --------------------------------------------------------------------------- train-only and empty test splits


def test_train_head_on_a_train_only_cache_reports_no_test(demo_features, tmp_path):
    cache = _rewrite(demo_features, tmp_path / "train-only.h5", test=False, dataset_splits=["train"])
    result = _cli("train-head", "--features", cache, "--epochs", "2", "--out", tmp_path / "head")
    assert result.returncode == 0 and "Traceback" not in result.stdout, result.stdout
    assert "no test split" in result.stdout and "acc 0.00%" not in result.stdout
    m = runs.read_metrics(tmp_path / "head")
    assert m["status"] == "complete" and "test_acc" not in m["final"]


def test_an_empty_test_split_is_refused_by_svm_and_knn_and_not_measured_by_train_head(demo_features, tmp_path):
    cache = _rewrite(demo_features, tmp_path / "empty-test.h5", test=lambda s: _rows(s, np.zeros(len(s.labels), bool)))
    for stage in ("fit-svm", "knn"):
        result = _cli(stage, "--features", cache, "--out", tmp_path / stage)
        _refused(result, "the test split is empty", stage)
        assert not (tmp_path / stage).exists()
    run_dir, metrics = heads.train_head(cache, epochs=1, out=tmp_path / "head")
    assert metrics["status"] == "complete" and metrics["final"].get("test_acc") is None
    assert not (run_dir / "predictions-test.npz").exists()


# --------------------------------------------------------------------------- non-finite features


@pytest.mark.parametrize("split,value", [("train", np.nan), ("test", np.inf)])
def test_non_finite_features_are_refused_by_every_stage(split, value, demo_features, tmp_path):
    cache = _rewrite(demo_features, tmp_path / "bad.h5", **{split: lambda s: _poisoned(s, value)})
    for stage, extra in (("fit-svm", ()), ("knn", ()), ("train-head", ("--preset", "tuned", "--epochs", "1"))):
        result = _cli(stage, "--features", cache, *extra, "--out", tmp_path / stage)
        _refused(result, f"1 {split} feature vectors contain NaN or Inf (of", f"cars-tl inspect {cache}")
        assert not (tmp_path / stage).exists()
    with pytest.raises(CarsTLError, match="contain NaN or Inf"):
        heads.train_head(cache, epochs=1, out=tmp_path / "study")


# --------------------------------------------------------------------------- arguments


def test_predict_without_images_or_split_and_with_a_folder(demo_head_run, tmp_path):
    _refused(
        _cli("predict", "--model", demo_head_run),
        "needs image files or --split",
        f"--model {demo_head_run} --split test",
    )
    _refused(_cli("predict", "--model", demo_head_run, tmp_path), f"image {tmp_path} is a folder")


@pytest.mark.parametrize("size", [100000, 31])
def test_image_size_is_bounded(size, demo_dir, tmp_path):
    result = _cli(
        "extract-features",
        "--data-dir",
        demo_dir,
        "--backbone",
        "resnet18",
        "--weights",
        "random",
        "--image-size",
        size,
        "--out",
        tmp_path / "f.h5",
    )
    _refused(result, f"--image-size must be at least 32 and at most 1024 pixels, got {size}")
    assert not list(tmp_path.iterdir())
    with pytest.raises(CarsTLError, match="at least 32 and at most 1024"):
        from cars_tl.stages import finetune as ft

        ft.finetune(demo_dir, epochs=1, out=tmp_path / "ft", **dict(TINY, image_size=size))


def test_out_of_the_wrong_kind(demo_dir, demo_features, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    _refused(_cli("train-head", "--features", demo_features, "--out", a_file), f"--out {a_file} is an existing file")
    _refused(_cli("knn", "--features", demo_features, "--out", a_file / "run"), f"below {a_file}, which is a file")
    assert a_file.read_text() == "keep me"
    folder = tmp_path / "folder"
    folder.mkdir()
    result = _cli(
        "extract-features",
        "--data-dir",
        demo_dir,
        "--backbone",
        "resnet18",
        "--weights",
        "random",
        "--image-size",
        "64",
        "--workers",
        "0",
        "--out",
        folder,
    )
    _refused(result, f"--out {folder} is a folder; a file is expected", f"--out {folder / 'features.h5'}")
    assert list(folder.iterdir()) == [] and not features.partial_dir(folder).exists()


def test_a_folder_as_features_and_a_list_as_metrics(demo_features, demo_head_run, tmp_path):
    _refused(
        _cli("train-head", "--features", demo_features.parent),
        f"{demo_features.parent} is a folder",
        demo_features.name,
    )
    run_copy = tmp_path / "run"
    shutil.copytree(demo_head_run, run_copy)
    (run_copy / runs.METRICS).write_text("[1, 2]")
    _refused(_cli("inspect", run_copy), "holds a JSON list, not the object a cars_tl run writes")


def test_svm_seed_and_degree_are_validated_even_without_a_search(demo_features, tmp_path):
    _refused(_cli("fit-svm", "--features", demo_features, "--seed", "-1", "--out", tmp_path / "a"), "--seed", "got -1")
    _refused(
        _cli("fit-svm", "--features", demo_features, "--degree", "0", "--out", tmp_path / "b"), "--degree", "got 0"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- tampered SVM files


def _state(model_file: Path) -> dict:
    import skops.io as sio

    return sio.load(model_file, trusted=sio.get_untrusted_types(file=model_file))


def _set(attr, value):
    def edit(state):
        setattr(state["svc"], attr, value(getattr(state["svc"], attr)) if callable(value) else value)

    return edit


def _key(key, value):
    def edit(state):
        state[key] = value(state[key]) if callable(value) else value

    return edit


def _nan_first(a):
    a = a.copy()
    a.flat[0] = np.nan
    return a


TAMPERED = {
    "degree -5": (_key("degree", -5), "degree"),
    "C negative": (_set("C", -1.0), "must both be > 0"),
    "gamma NaN": (_key("gamma", float("nan")), "gamma"),
    "NaN dual coefficients": (_set("_dual_coef_", _nan_first), "_dual_coef_ holds NaN"),
    "intercepts of the wrong shape": (_set("_intercept_", lambda a: a[:-1]), "_intercept_ has shape"),
    "classes outside the run's": (_set("classes_", lambda a: a + 1000), "outside the run's"),
    "no classes": (_set("classes_", lambda a: a[:0]), "not two or more"),
    "support beyond the training rows": (_set("support_", lambda a: a + 10_000), "training rows"),
    "support vectors of another width": (_key("support_vectors", lambda a: a[:, :-1]), "support vectors have shape"),
    "support counts that do not add up": (_set("_n_support", lambda a: a + 1), "do not add up"),
    "standard scaling with a zero scale": (
        lambda s: s.update(
            scale="standard",
            scale_mean=np.zeros(s["support_vectors"].shape[1]),
            scale_std=np.zeros(s["support_vectors"].shape[1]),
        ),
        "scale_std",
    ),
}


@pytest.mark.parametrize("variant", list(TAMPERED))
def test_a_tampered_svm_file_of_trusted_types_is_refused(variant, demo_svm_run, tmp_path):
    import skops.io as sio

    run_copy = tmp_path / "svm"
    shutil.copytree(demo_svm_run, run_copy)
    model_file = run_copy / runs.read_metrics(run_copy)["model_file"]
    edit, expected = TAMPERED[variant]
    state = _state(model_file)
    edit(state)
    sio.dump(state, model_file)
    cache = features.load(runs.read_metrics(run_copy)["config"]["features"])
    with pytest.raises(CarsTLError, match="not a cars_tl fit-svm model") as err:
        svm.load_model(model_file, cache.feature_dim, cache.num_classes)
    assert expected in err.value.message and "refit it" in err.value.hint


def test_a_tampered_svm_file_through_predict(demo_svm_run, tmp_path):
    import skops.io as sio
    from PIL import Image

    run_copy = tmp_path / "svm"
    shutil.copytree(demo_svm_run, run_copy)
    model_file = run_copy / runs.read_metrics(run_copy)["model_file"]
    state = _state(model_file)
    state["degree"] = -5
    sio.dump(state, model_file)
    image = tmp_path / "car.png"
    Image.new("RGB", (80, 60), (120, 30, 30)).save(image)
    _refused(_cli("predict", "--model", run_copy, image), "degree is -5", "refit it with cars-tl fit-svm")


def test_an_untampered_svm_file_loads(demo_svm_run):
    m = runs.read_metrics(demo_svm_run)
    cache = features.load(m["config"]["features"])
    model = svm.load_model(demo_svm_run / m["model_file"], cache.feature_dim, cache.num_classes)
    assert (model.predict(cache.split("test").features) == cache.split("test").labels).mean() * 100 == pytest.approx(
        m["final"]["test_acc"]
    )


# --------------------------------------------------------------------------- finetune: forced reruns, resume, init-head


def test_ctrl_c_of_a_forced_rerun_hints_force_and_resume_never_rewrites_the_run(
    demo_dir, demo_head_run, demo_finetune_run, tmp_path
):
    import signal
    import time

    run = tmp_path / "ft"
    shutil.copytree(demo_finetune_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    args = [
        "finetune",
        "--data-dir",
        demo_dir,
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
        "--unfreeze",
        "layer4",
        "--init-head",
        demo_head_run,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
        run,
        "--lr",
        "0.01",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    proc = subprocess.Popen(
        [*CLI, *map(str, args), "--force"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    staging = run.with_name(f".{run.name}.next")
    deadline = time.time() + 120
    while time.time() < deadline and not staging.is_dir() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "finetune interrupted" in output and "with --force" in output and "not --resume" in output, output
    assert not staging.exists()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # the old run, untouched
    # Following the old, wrong hint: --resume (with or without --force) of the complete run with a new --lr.
    result = _cli(*args, "--resume", "--force")
    _refused(result, "has trained all 1 of its epochs", "lr: 0.001 -> 0.01", "--force and without --resume")
    result = _cli(*args, "--resume")
    _refused(result, "lr: 0.001 -> 0.01")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert runs.read_metrics(run)["config"]["lr"] == 0.001


def test_an_init_head_with_nan_is_refused_naming_the_file(demo_dir, demo_head_run, tmp_path):
    from cars_tl.stages import finetune as ft

    head_copy = tmp_path / "head"
    shutil.copytree(demo_head_run, head_copy)
    state = torch.load(head_copy / heads.HEAD_FILE, weights_only=True)
    state["weight"][0, 0] = float("nan")
    torch.save(state, head_copy / heads.HEAD_FILE)
    with pytest.raises(CarsTLError, match="holds NaN or Inf in its weight") as err:
        ft.finetune(demo_dir, unfreeze="none", init_head=head_copy, epochs=1, out=tmp_path / "ft", **TINY)
    assert str(head_copy / heads.HEAD_FILE) in err.value.message and "--lr" not in err.value.message
    assert "cars-tl train-head" in err.value.hint and not (tmp_path / "ft").exists()


# --------------------------------------------------------------------------- hints by stage and input


def test_a_bad_image_of_ones_own_is_not_told_to_download(demo_head_run, tmp_path):
    image = tmp_path / "mine.jpg"
    image.write_bytes(b"not a jpeg at all")
    result = _cli("predict", "--model", demo_head_run, image)
    _refused(result, f"cannot read image {image}", "intact image file")
    assert "download" not in result.stdout


@pytest.mark.parametrize("fixture,stage", [("demo_svm_run", "fit-svm"), ("demo_head_run", "train-head")])
def test_an_incomplete_svm_or_head_run_is_never_told_to_resume(fixture, stage, request, tmp_path):
    import json

    run = tmp_path / "run"
    shutil.copytree(request.getfixturevalue(fixture), run)
    metrics = json.loads((run / runs.METRICS).read_text())
    metrics["status"] = "failed"
    (run / runs.METRICS).write_text(json.dumps(metrics))
    image = tmp_path / "car.png"
    from PIL import Image

    Image.new("RGB", (80, 60), (120, 30, 30)).save(image)
    result = _cli("predict", "--model", run, image)
    _refused(
        result,
        f"run {run} is not complete",
        f"cars-tl {stage} --features {metrics['config']['features']} --out {run} --force",
    )
    assert "--resume" not in result.stdout


def test_download_verify_says_how_often_to_run_it(demo_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(demo_dir, copy)
    result = _cli("download", "--data-dir", copy, "--source", "demo", "--verify")
    assert result.returncode == 0, result.stdout
    assert "size and mtime" in result.stdout and "Run --verify after copying" in result.stdout
