"""fit-svm: the precomputed fast path agrees with plain SVC; skops loading trusts nothing else."""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tomllib
from helpers import REPO, assert_refused, relu_features_with_a_dead_unit, run_cli, toy_cache
from sklearn.metrics.pairwise import polynomial_kernel, rbf_kernel, sigmoid_kernel
from sklearn.svm import SVC

from cars_tl.artifacts import features, runs
from cars_tl.core.errors import CarsTLError
from cars_tl.models.svm import kernels
from cars_tl.models.svm import model as svm
from cars_tl.stages import train_head as heads
from cars_tl.stages.fit_svm import fit_svm


def _blobs(n_per_class=30, classes=8, dim=64, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.random((classes, dim)) * 2
    y = np.repeat(np.arange(classes), n_per_class)
    x = np.clip(centres[y] + rng.normal(0, 0.6, (len(y), dim)), 0, None).astype(np.float32)
    return x, y


@pytest.mark.parametrize("kernel", svm.KERNELS)
def test_kernel_matrix_matches_sklearn(kernel):
    a, _ = _blobs(5, 4, 16, seed=1)
    b, _ = _blobs(3, 4, 16, seed=2)
    gamma, degree, coef0 = 0.05, 3, 0.5
    ours = kernels.kernel_matrix(a, b, kernel, gamma, degree, coef0)
    reference = {
        "linear": lambda: a.astype(np.float64) @ b.T.astype(np.float64),
        "poly": lambda: polynomial_kernel(
            a.astype(np.float64), b.astype(np.float64), degree=degree, gamma=gamma, coef0=coef0
        ),
        "rbf": lambda: rbf_kernel(a.astype(np.float64), b.astype(np.float64), gamma=gamma),
        "sigmoid": lambda: sigmoid_kernel(a.astype(np.float64), b.astype(np.float64), gamma=gamma, coef0=coef0),
    }[kernel]()
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", svm.KERNELS)
@pytest.mark.parametrize("scale", svm.SCALES)
def test_fast_path_agrees_with_plain_svc(kernel, scale):
    x, y = _blobs()
    xt, _ = _blobs(seed=5)
    fast = svm.fit_model(x, y, kernel, 1.0, 3, "scale", 0.0, scale, "precomputed")
    plain = svm.fit_model(x, y, kernel, 1.0, 3, "scale", 0.0, scale, "plain")
    assert (fast.predict(xt) == plain.predict(xt)).mean() >= 0.999
    # Same problem, same solver tolerance (1e-3): scores agree to that order.
    np.testing.assert_allclose(fast.decision_function(xt), plain.decision_function(xt), rtol=1e-2, atol=1e-2)
    assert fast.support_vectors.shape[0] == len(fast.svc.support_) < len(x) + 1


def test_gamma_scale_means_what_sklearn_means():
    x, y = _blobs()
    ours = svm.fit_model(x, y, "rbf", 1.0, 3, "scale", 0.0, "none", "plain")
    reference = SVC(kernel="rbf", gamma="scale").fit(x.astype(np.float64), y)
    assert ours.gamma == pytest.approx(reference._gamma)


def test_save_and_load_round_trip(tmp_path):
    x, y = _blobs()
    model = svm.fit_model(x, y, "poly", 1.0, 3, "scale", 0.0, "l2")
    svm.save_model(model, tmp_path / "m.skops")
    loaded = svm.load_model(tmp_path / "m.skops")
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_skops_file_with_an_untrusted_type_is_refused(tmp_path):
    import skops.io as sio
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    x, y = _blobs()
    state = svm.fit_model(x, y, "linear", 1.0, 3, "scale", 0.0, "none").to_state()
    state["extra"] = Pipeline([("f", FunctionTransformer(func=print))])
    sio.dump(state, tmp_path / "evil.skops")
    with pytest.raises(CarsTLError, match="trusted list") as err:
        svm.load_model(tmp_path / "evil.skops")
    assert "builtins.print" in err.value.message or "Pipeline" in err.value.message


def test_fit_svm_all_kernels_writes_a_comparison_run(demo_features, tmp_path):
    run_dir, metrics = fit_svm(demo_features, kernel="all", out=tmp_path / "svm")
    assert set(metrics["kernels"]) == set(svm.KERNELS)
    cache = features.load(demo_features)
    test = cache.split("test")
    for _kernel, result in metrics["kernels"].items():
        # Each kernel's saved model reproduces its reported test accuracy; its fit took part of the run's time.
        model = svm.load_model(run_dir / result["model_file"], test.features.shape[1], cache.num_classes)
        accuracy = 100.0 * float((model.predict(test.features) == test.labels).mean())
        assert result["test_acc"] == pytest.approx(accuracy, abs=1e-3)
        assert 0 < result["fit_seconds"] <= metrics["wall_time_s"]
    assert runs.model_file(run_dir).name == metrics["model_file"]


def test_bad_options_name_the_valid_choices(demo_features, tmp_path):
    with pytest.raises(CarsTLError, match="linear, poly, rbf, sigmoid, all"):
        fit_svm(demo_features, kernel="cubic", out=tmp_path / "a")
    with pytest.raises(CarsTLError, match="none, standard, l2"):
        fit_svm(demo_features, scale="minmax", out=tmp_path / "b")
    with pytest.raises(CarsTLError, match="scale, auto"):
        fit_svm(demo_features, gamma="big", out=tmp_path / "c")
    # A degree its model could not be loaded with (the kernel overflowed into a sklearn traceback).
    with pytest.raises(CarsTLError, match="--degree must be a whole number from 1 to 20, got 1000000000"):
        fit_svm(demo_features, degree=10**9, out=tmp_path / "d")


def test_a_feature_constant_on_train_gets_scale_one(tmp_path):
    data = relu_features_with_a_dead_unit()
    path = toy_cache(tmp_path, *data)
    _, m = heads.train_head(path, preset="tuned", out=tmp_path / "head")
    assert m["final"]["test_acc"] >= 90, m["final"]
    model = svm.fit_model(data[0], data[1], "rbf", 1.0, 3, "scale", 0.0, "standard")
    assert model.scaler.std[0] == 1.0
    assert (model.predict(data[2]) == data[3]).mean() >= 0.9


def _loaded_svm_scores(model: svm.SVMModel, x: np.ndarray, classes: int) -> np.ndarray:
    raw = model.ranking_scores(x)
    out = np.full((len(x), classes), -np.inf)
    out[:, model.classes] = raw
    return out


def test_rank_one_is_what_the_svm_predicts_even_when_votes_tie():
    rng = np.random.default_rng(0)
    classes = 20
    x = rng.normal(size=(200, 8))
    y = np.arange(200) % classes
    model = svm.fit_model(x, y, "rbf", 1.0, 3, "scale", 0.0, "l2")
    queries = rng.normal(size=(400, 8))
    predicted = model.predict(queries)
    raw_argmax = model.classes[model.decision_function(queries).argmax(1)]
    assert (raw_argmax != predicted).any(), "the data must contain vote ties for this test to mean anything"
    np.testing.assert_array_equal(model.classes[_loaded_svm_scores(model, queries, classes).argmax(1)], predicted)


def test_skops_with_the_cve_fix_is_required():
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())
    skops = next(d for d in spec["project"]["dependencies"] if d.startswith("skops"))
    assert re.fullmatch(r"skops>=0\.(1[2-9]|[2-9]\d)(\.\d+)?", skops.split("#")[0].strip())
    installed = tuple(int(v) for v in md.version("skops").split(".")[:2])
    assert installed >= (0, 12)


def test_a_skops_file_of_trusted_types_that_is_no_svm_model_is_a_message(demo_svm_run, tmp_path):
    import skops.io as sio
    from PIL import Image

    from cars_tl.stages.predict import predict

    run_copy = tmp_path / "svm"
    shutil.copytree(demo_svm_run, run_copy)
    model_file = run_copy / runs.read_metrics(run_copy)["model_file"]
    state = sio.load(model_file, trusted=sio.get_untrusted_types(file=model_file))
    del state["support_vectors"]
    sio.dump(state, model_file)
    image = tmp_path / "car.png"
    Image.new("RGB", (80, 60), (120, 30, 30)).save(image)
    with pytest.raises(CarsTLError, match="not a cars_tl fit-svm model: it lacks support_vectors"):
        predict([image], run_dirs=[run_copy])
    sio.dump({"just": "a dict"}, model_file)
    with pytest.raises(CarsTLError, match="not a cars_tl fit-svm model"):
        svm.load_model(model_file)


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
    "a huge degree": (_key("degree", 10**9), "degree is 1000000000, not a whole number from 1 to 20"),
    "another input width": (_set("n_features_in_", 100), "n_features_in_ is 100, expected"),
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
    assert_refused(run_cli("predict", "--model", run_copy, image), "degree is -5", "refit it with cars-tl fit-svm")


RECORDED = {  # edits that leave a valid model, just not the run's: (edit, field, value, recorded)
    "kernel": (_key("kernel", "linear"), "kernel", "'linear'", "'poly'"),
    "gamma": (_key("gamma", lambda g: 3 * g), "gamma", "", ""),
    "C": (_set("C", 5.0), "C", "5.0", "1.0"),
    "degree": (_key("degree", 2), "degree", "2", "3"),
    "coef0": (_key("coef0", 1.0), "coef0", "1.0", "0.0"),
    "scale": (_key("scale", "none"), "scale", "'none'", "'l2'"),
}


@pytest.mark.parametrize("variant", list(RECORDED))
def test_an_svm_file_that_differs_from_its_run_record_is_refused(variant, demo_svm_run, tmp_path):
    # A kernel switched from rbf to linear used to load and score 52.78% while metrics.json said rbf, 65.28%.
    import skops.io as sio

    run_copy = tmp_path / "svm"
    shutil.copytree(demo_svm_run, run_copy)
    metrics = runs.read_metrics(run_copy)
    model_file = run_copy / metrics["model_file"]
    edit, field, value, recorded = RECORDED[variant]
    state = _state(model_file)
    edit(state)
    sio.dump(state, model_file)
    cache = features.load(metrics["config"]["features"])
    with pytest.raises(CarsTLError, match="does not hold the model its run recorded") as err:
        svm.load_model(
            model_file, cache.feature_dim, cache.num_classes, svm.recorded_settings(metrics, model_file.name)
        )
    assert f"{field} is {value}" in err.value.message and f"metrics.json records {recorded}" in err.value.message
    assert str(model_file) in err.value.message and "refit it" in err.value.hint


def test_a_kernel_switched_in_the_file_is_refused_by_predict(demo_svm_run, tmp_path):
    import skops.io as sio
    from PIL import Image

    from cars_tl.stages.predict import predict

    run_copy = tmp_path / "svm"
    shutil.copytree(demo_svm_run, run_copy)
    model_file = run_copy / runs.read_metrics(run_copy)["model_file"]
    state = _state(model_file)
    state["kernel"] = "linear"
    sio.dump(state, model_file)
    image = tmp_path / "car.png"
    Image.new("RGB", (80, 60), (120, 30, 30)).save(image)
    with pytest.raises(CarsTLError, match="kernel is 'linear', but metrics.json records 'poly'") as err:
        predict([image], run_dirs=[run_copy])
    assert str(model_file) in err.value.message


def test_an_untampered_svm_file_loads(demo_svm_run):
    m = runs.read_metrics(demo_svm_run)
    cache = features.load(m["config"]["features"])
    recorded = svm.recorded_settings(m, m["model_file"])
    assert set(recorded) == {"kernel", "C", "gamma", "support vectors", "classes", "degree", "coef0", "scale", "method"}
    model = svm.load_model(demo_svm_run / m["model_file"], cache.feature_dim, cache.num_classes, recorded)
    assert (model.predict(cache.split("test").features) == cache.split("test").labels).mean() * 100 == pytest.approx(
        m["final"]["test_acc"]
    )
