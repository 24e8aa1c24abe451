"""fit-svm: the precomputed fast path agrees with plain SVC; skops loading trusts nothing else."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics.pairwise import polynomial_kernel, rbf_kernel, sigmoid_kernel
from sklearn.svm import SVC

from cars_tl.artifacts import runs
from cars_tl.core.errors import CarsTLError
from cars_tl.models.svm import kernels
from cars_tl.models.svm import model as svm
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
    for _kernel, result in metrics["kernels"].items():
        assert (run_dir / result["model_file"]).is_file()
        assert result["fit_seconds"] >= 0 and 0 <= result["test_acc"] <= 100
    assert runs.model_file(run_dir).name == metrics["model_file"]


def test_bad_options_name_the_valid_choices(demo_features, tmp_path):
    with pytest.raises(CarsTLError, match="linear, poly, rbf, sigmoid, all"):
        fit_svm(demo_features, kernel="cubic", out=tmp_path / "a")
    with pytest.raises(CarsTLError, match="none, standard, l2"):
        fit_svm(demo_features, scale="minmax", out=tmp_path / "b")
    with pytest.raises(CarsTLError, match="scale, auto"):
        fit_svm(demo_features, gamma="big", out=tmp_path / "c")
