"""fit-svm --C auto / --gamma cv: cross-validation on train only, one kernel matrix, the known-best C,
presets, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cars_tl.artifacts import features
from cars_tl.cli import app
from cars_tl.core.errors import CarsTLError
from cars_tl.models.svm import kernels
from cars_tl.models.svm import model as svm
from cars_tl.models.svm import search as svm_search
from cars_tl.stages.fit_svm import fit_svm


def test_cv_never_sees_test_rows(demo_features, tmp_path, monkeypatch):
    calls = []
    original = svm_search.cross_validate

    def spy(z, y, kernel, c_grid, gamma_values, degree, coef0, folds, **options):
        calls.append((z, y, folds))
        return original(z, y, kernel, c_grid, gamma_values, degree, coef0, folds, **options)

    monkeypatch.setattr(svm_search, "cross_validate", spy)
    fit_svm(demo_features, kernel="linear", C="auto", out=tmp_path / "run")
    cache = features.load(demo_features)
    train, test = cache.split("train"), cache.split("test")
    [(z, y, folds)] = calls
    expected = svm.Scaler.fit("l2", train.features)(train.features)
    assert np.array_equal(z, expected) and np.array_equal(y, train.labels)  # exactly the training rows
    scaled_test = svm.Scaler.fit("l2", train.features)(test.features)
    assert not any(np.isclose(z, row).all(1).any() for row in scaled_test)
    seen = np.concatenate([val for _, val in folds])
    assert sorted(seen) == list(range(len(train.labels)))  # each training row validated once
    for fit, val in folds:
        assert set(fit).isdisjoint(val) and max(fit.max(), val.max()) < len(train.labels)


def test_one_kernel_matrix_for_every_fold_and_grid_point(demo_features, tmp_path, monkeypatch):
    calls = []
    original = kernels.kernel_matrix
    monkeypatch.setattr(kernels, "kernel_matrix", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    fit_svm(demo_features, kernel="rbf", C="auto", gamma="cv", out=tmp_path / "run")
    # One Gram matrix for the whole search, then the refit's own, then scoring train and test.
    assert calls[0] == "linear" and calls.count("linear") == 1


def toy_where_c_matters(seed: int = 0, n: int = 120, dims: int = 20, flipped: float = 0.05):
    """Two classes (2:1) apart along one axis, 19 noise axes, 5% of labels flipped, all values ~0.08:
    at C <= 1 the margin term wins, w shrinks to nothing and the SVM predicts the majority class;
    a large C (about 100) separates the classes; the largest starts fitting the noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], [2 * n // 3, n - 2 * n // 3])
    x = rng.normal(0, 0.08, (n, dims))
    x[:, 0] = np.where(y == 1, 0.08, -0.08) + rng.uniform(-0.072, 0.072, n)
    return x, np.where(rng.random(n) < flipped, 1 - y, y)


def test_auto_picks_the_known_best_C_on_a_toy_set_where_C_matters():
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.svm import SVC

    x, y = toy_where_c_matters()
    found = svm_search.search(x, y, "linear", "auto", "scale", 3, 0.0, "none", folds=5, seed=0)
    grid = found["C_grid"]
    assert found["C_grid_decades"] == 1  # K(x, x) about 0.13: the grid moves up one decade
    assert grid == pytest.approx([c * 10 for c in svm_search.C_GRID])
    splitter = StratifiedKFold(5, shuffle=True, random_state=0)
    cv_acc = lambda C: 100 * cross_val_score(SVC(kernel="linear", C=C), x, y, cv=splitter).mean()  # noqa: E731
    reference = [cv_acc(C) for C in grid]
    best = max(reference)
    known_best = next(C for C, acc in zip(grid, reference) if acc >= best - 1e-9)  # smallest C among ties
    assert found["C"] == known_best and found["cv_acc_chosen"] == pytest.approx(best)
    assert found["cv_acc"][0] == pytest.approx(reference)
    assert grid[0] < found["C"] < grid[-1]  # inside the grid, not at its edge
    assert cv_acc(1.0) < best - 10  # C matters here
    x_new, y_new = toy_where_c_matters(seed=1)
    scores = {
        C: (svm.fit_model(x, y, "linear", C, 3, "scale", 0.0, "none").predict(x_new) == y_new).mean()
        for C in (1.0, found["C"])
    }
    assert scores[found["C"]] > scores[1.0] + 0.2


def test_the_grid_follows_the_kernels_scale():
    """C times K is all an SVM sees: features x10 (a linear kernel x100) give the same CV accuracies
    at C / 100; on unit kernels (linear, rbf on l2-scaled features) the grid is the listed one."""
    x, y = separable_blobs(4, 25, 30)
    x = np.abs(x) + 0.2  # not unit length, not centred: a 'none'-scaled linear kernel of scale about 9
    small = svm_search.search(x, y, "linear", "auto", "scale", 3, 0.0, "none", folds=5, seed=0)
    large = svm_search.search(10 * x, y, "linear", "auto", "scale", 3, 0.0, "none", folds=5, seed=0)
    assert large["C_grid_decades"] == small["C_grid_decades"] - 2
    assert large["cv_acc"] == small["cv_acc"]
    assert large["C"] == pytest.approx(small["C"] / 100)
    for kernel in ("linear", "rbf"):  # K(x, x) = 1 on unit vectors
        unit = svm_search.search(x, y, kernel, "auto", "scale", 3, 0.0, "l2", folds=5, seed=0)
        assert unit["C_grid_decades"] == 0 and unit["C_grid"] == list(svm_search.C_GRID)
    poly = svm_search.search(x, y, "poly", "auto", "scale", 3, 0.0, "l2", folds=5, seed=0)
    gamma = poly["gamma_value"]  # gamma "scale" on these positive unit vectors: about 7, so K(x, x) = gamma**3
    assert gamma > 4 and poly["C_grid_decades"] == -round(3 * np.log10(gamma)) < 0


def test_auto_records_the_search_and_cli_prints_it(demo_features, tmp_path):
    result = CliRunner().invoke(
        app,
        ["fit-svm", "--features", str(demo_features), "--kernel", "all", "--C", "auto", "--out", str(tmp_path / "run")],
    )
    assert result.exit_code == 0, result.output
    assert "CV acc %" in result.output and "C=auto" in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["C"] == "auto" and metrics["config"]["cv_folds"] == 5
    for _kernel, row in metrics["kernels"].items():
        search = row["search"]
        assert len(search["C_grid"]) >= 8 and search["C_grid"] == sorted(search["C_grid"])
        assert len(search["cv_acc"]) == 1 and len(search["cv_acc"][0]) == len(search["C_grid"])
        assert row["C"] == search["C"] in search["C_grid"]
        assert row["cv_acc"] == max(search["cv_acc"][0])
        assert search["gamma_grid"] is None  # gamma stays "scale" unless --gamma cv


def test_gamma_cv_searches_gamma_for_kernels_that_have_one(demo_features, tmp_path):
    _, metrics = fit_svm(demo_features, kernel="all", preset="tuned", out=tmp_path / "run")
    assert metrics["config"]["C"] == "auto" and metrics["config"]["gamma"] == "cv"
    for kernel, row in metrics["kernels"].items():
        search = row["search"]
        if kernel == "linear":
            assert search["gamma_grid"] is None
            continue
        assert len(search["gamma_grid"]) == len(svm_search.GAMMA_FACTORS) == len(search["cv_acc"])
        assert row["gamma_value"] in search["gamma_grid"]
        assert row["cv_acc"] == max(max(r) for r in search["cv_acc"])
    cv = {k: r["cv_acc"] for k, r in metrics["kernels"].items()}
    assert metrics["final"]["kernel"] == max(cv, key=cv.get)  # kernels compared on train, not on test
    assert metrics["final"]["selected_by"] == "cross-validation accuracy on train"


def test_study_preset_is_sklearns_defaults(demo_features, tmp_path):
    _, metrics = fit_svm(demo_features, kernel="rbf", out=tmp_path / "run")
    assert (metrics["config"]["C"], metrics["config"]["gamma"], metrics["config"]["scale"]) == (1.0, "scale", "l2")
    assert metrics["kernels"]["rbf"]["C"] == 1.0 and "search" not in metrics["kernels"]["rbf"]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(C=0), "--C must be positive"),
        (dict(C=-1.0), "--C must be positive"),
        (dict(C="big"), "--C 'big' is not valid"),
        (dict(gamma="often"), "valid: scale, auto, cv"),
        (dict(preset="best"), "unknown --preset"),
        (dict(C="auto", cv_folds=1), "at least 2"),
        (dict(C="auto", cv_folds=30), "cannot cross-validate with 30 folds"),
    ],
)
def test_bad_options_say_why_and_what_to_use(demo_features, tmp_path, options, message):
    with pytest.raises(CarsTLError, match=message) as info:
        fit_svm(demo_features, kernel="linear", out=tmp_path / "run", **options)
    assert info.value.hint or "valid:" in info.value.message  # what to use instead
    if "folds" in message:
        assert "--cv-folds 24" in info.value.hint  # the demo's smallest class has 24 training images
    assert not (tmp_path / "run").exists()


def test_a_class_with_one_image_cannot_be_cross_validated():
    with pytest.raises(CarsTLError, match="class 2 has 1") as info:
        svm_search.check_folds(np.array([0, 0, 0, 1, 1, 1, 2]), 3)
    assert "--C 1" in info.value.hint


def separable_blobs(classes: int = 6, per_class: int = 30, dims: int = 40, seed: int = 0):
    """L2-normalized blobs: every one-vs-one pair separable, so the hard margin is reached inside the grid."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes) * 3 + 2, per_class)  # labels neither contiguous nor from 0
    x = rng.normal(0, 1, (classes, dims))[np.searchsorted(np.unique(y), y)] + rng.normal(0, 0.9, (len(y), dims))
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_ovo_predict_is_svc_predict(classes):
    from sklearn.svm import SVC

    x, y = separable_blobs(classes, 40, 8, seed=classes)  # few dims: overlapping classes, real votes ties
    gram = x @ x.T
    fit, val = np.arange(0, len(y), 2), np.arange(1, len(y), 2)
    for C in (0.01, 1.0, 100.0):
        svc = SVC(kernel="precomputed", C=C).fit(gram[np.ix_(fit, fit)], y[fit])
        rows = gram[np.ix_(val, fit)]
        expected = svc.predict(rows)
        assert np.array_equal(svm_search.ovo_predict(svc, rows, block=7), expected)  # several blocks, a short last one
    assert len(np.unique(expected)) == classes


def brute_force_cv(x, y, kernel, folds):
    """Every (fold, C) fitted and scored by sklearn itself: the reference for the early stop."""
    from sklearn.svm import SVC

    gram = svm_search.gram_matrix(x, kernel)
    k = svm_search.kernel_from_gram(gram, kernel, svm.gamma_value("scale", x), 3, 0.0)
    per_fold = np.zeros((len(folds), len(svm_search.C_GRID)))
    for f, (fit, val) in enumerate(folds):
        for c, C in enumerate(svm_search.C_GRID):
            svc = SVC(kernel="precomputed", C=C).fit(k[np.ix_(fit, fit)], y[fit])
            per_fold[f, c] = 100.0 * (svc.predict(k[np.ix_(val, fit)]) == y[val]).sum() / len(val)
    return per_fold.mean(0)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_hard_margin_early_stop_skips_fits_without_changing_any_score(kernel):
    x, y = separable_blobs()
    folds = svm_search.stratified_folds(y, 5, seed=0)
    gamma = svm.gamma_value("scale", x)
    cv = svm_search.cross_validate(x, y, kernel, svm_search.C_GRID, [gamma], 3, 0.0, folds, n_jobs=1)
    assert cv.points == 5 * len(svm_search.C_GRID)
    assert cv.fits < cv.points - 5  # at least the top grid point skipped in every fold
    assert np.array_equal(cv.scores[0], brute_force_cv(x, y, kernel, folds))


def test_early_stop_only_where_no_alpha_is_at_the_bound():
    from sklearn.svm import SVC

    x, y = separable_blobs(2, 30)
    gram = x @ x.T
    soft = SVC(kernel="precomputed", C=0.01).fit(gram, y)
    assert svm_search.at_bound(soft, 0.01)
    hard = SVC(kernel="precomputed", C=1000.0).fit(gram, y)
    assert not svm_search.at_bound(hard, 1000.0)
    # The hard-margin solution is libsvm's answer at any larger C (within its tolerance).
    harder = SVC(kernel="precomputed", C=1e6).fit(gram, y)
    assert np.array_equal(harder.support_, hard.support_)
    assert np.allclose(harder.dual_coef_, hard.dual_coef_, atol=1e-3 * np.abs(hard.dual_coef_).max())


def test_folds_in_threads_give_the_one_thread_scores(demo_features):
    train = features.load(demo_features, ("train",)).split("train")
    z = svm.Scaler.fit("l2", train.features)(train.features)
    folds = svm_search.stratified_folds(train.labels, 5, seed=3)
    gammas = [svm.gamma_value("scale", z) * f for f in (0.5, 2.0)]
    one = svm_search.cross_validate(z, train.labels, "rbf", svm_search.C_GRID, gammas, 3, 0.0, folds, n_jobs=1)
    threaded = svm_search.cross_validate(z, train.labels, "rbf", svm_search.C_GRID, gammas, 3, 0.0, folds, n_jobs=3)
    assert np.array_equal(one.scores, threaded.scores) and one.fits == threaded.fits
    assert one.scores.shape == (2, len(svm_search.C_GRID))


def test_cv_score_is_the_mean_of_the_folds_as_cross_val_score():
    """Folds of unequal size (123 rows, 5 folds): the mean of the folds' accuracies is not all folds'
    correct over all rows; the record's cv_acc and cv_std are cross_val_score's mean and std."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.svm import SVC

    x, y = toy_where_c_matters(n=123)
    found = svm_search.search(x, y, "linear", "auto", "scale", 3, 0.0, "none", folds=5, seed=0)
    splitter = StratifiedKFold(5, shuffle=True, random_state=0)
    per_fold = {C: 100 * cross_val_score(SVC(kernel="linear", C=C), x, y, cv=splitter) for C in found["C_grid"]}
    assert found["cv_acc"][0] == pytest.approx([per_fold[C].mean() for C in found["C_grid"]], abs=1e-3)
    assert found["cv_std"][0] == pytest.approx([per_fold[C].std() for C in found["C_grid"]], abs=1e-3)
    pooled = [
        100
        * sum((SVC(kernel="linear", C=C).fit(x[f], y[f]).predict(x[v]) == y[v]).sum() for f, v in splitter.split(x, y))
        / len(y)
        for C in found["C_grid"]
    ]
    assert any(abs(p - m) > 1e-6 for p, m in zip(pooled, found["cv_acc"][0]))  # the two differ here: the test can tell
    assert found["cv_std_chosen"] == pytest.approx(per_fold[found["C"]].std(), abs=1e-3)


def test_best_C_at_the_top_end_extends_the_grid_until_it_is_inside(monkeypatch):
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.svm import SVC

    x, y = toy_where_c_matters()
    monkeypatch.setattr(svm_search, "C_GRID", svm_search.C_GRID[:3])  # 0.1 .. 2.15 here: far below the best C
    found = svm_search.search(x, y, "linear", "auto", "scale", 3, 0.0, "none", folds=5, seed=0)
    grid, ext = found["C_grid"], found["C_grid_extended"]
    assert ext["up"] >= 1 and ext["down"] == 0 and not ext["capped"]
    assert len(grid) == 3 + ext["up"] and grid[-1] == pytest.approx(grid[2] * svm_search.C_STEP ** ext["up"])
    assert grid[0] < found["C"] < grid[-1]  # the best is inside the extended grid
    splitter = StratifiedKFold(5, shuffle=True, random_state=0)
    reference = [100 * cross_val_score(SVC(kernel="linear", C=C), x, y, cv=splitter).mean() for C in grid]
    assert found["cv_acc"][0] == pytest.approx(reference, abs=1e-3)
    assert found["C"] == grid[int(np.argmax(np.round(reference, 6)))]
    assert "extended" in svm_search.extension_note(found) and "cap" not in svm_search.extension_note(found)

    monkeypatch.setattr(svm_search, "MAX_EXTENSION", 1)  # a cap that stops it: said so
    capped = svm_search.search(x, y, "linear", "auto", "scale", 3, 0.0, "none", folds=5, seed=0)
    assert capped["C_grid_extended"] == {"up": 1, "down": 0, "capped": True} and capped["C"] == capped["C_grid"][-1]
    assert "cap of 1" in svm_search.extension_note(capped)


def test_best_C_at_the_bottom_end_extends_the_grid_downwards(monkeypatch):
    x, y = toy_where_c_matters(flipped=0.15)
    found = svm_search.search(x, y, "linear", "auto", "scale", 3, 0.0, "none", folds=5, seed=0)
    inside = found["C"]
    monkeypatch.setattr(
        svm_search, "C_GRID", tuple(c for c in svm_search.C_GRID if c * 10 ** found["C_grid_decades"] > inside * 2)
    )
    low = svm_search.search(x, y, "linear", "auto", "scale", 3, 0.0, "none", folds=5, seed=0)
    assert low["C_grid_extended"]["down"] >= 1 and low["C_grid_extended"]["up"] == 0
    assert low["C_grid"][0] < low["C"] < low["C_grid"][-1]


def test_each_gamma_gets_its_own_C_grid_on_its_kernels_scale():
    x, y = separable_blobs(4, 25, 30)
    x = np.abs(x) + 0.2
    found = svm_search.search(x, y, "poly", "auto", "cv", 3, 0.0, "l2", folds=5, seed=0)
    z = svm.Scaler.fit("l2", x)(x)
    decades = [svm_search.grid_decades(z, "poly", g, 3, 0.0) for g in found["gamma_grid"]]
    assert len(set(decades)) > 1  # gamma from 1/4 to 4 times scale: the cubic kernel's scale spans 3.6 decades
    for grid, d in zip(found["C_grids"], decades):  # the listed grid, moved to the gamma's scale (plus any extension)
        base, extra = [c * 10.0**d for c in svm_search.C_GRID], len(grid) - len(svm_search.C_GRID)
        assert any(np.allclose(grid[i : i + len(base)], base) for i in range(extra + 1))
    g = found["gamma_grid"].index(found["gamma_value"])
    assert found["C_grid"] == found["C_grids"][g] and found["C_grid_decades"] == decades[g]
    assert len(found["cv_acc"]) == len(found["C_grids"]) and all(
        len(a) == len(c) for a, c in zip(found["cv_acc"], found["C_grids"])
    )


def test_no_cross_validation_when_there_is_nothing_to_choose(demo_features, tmp_path, monkeypatch):
    calls = []
    original = svm_search.cross_validate
    monkeypatch.setattr(svm_search, "cross_validate", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    # One kernel, one C, and --gamma cv means nothing for a linear kernel: no CV.
    _, metrics = fit_svm(demo_features, kernel="linear", C=1.0, gamma="cv", out=tmp_path / "one")
    assert calls == [] and "search" not in metrics["kernels"]["linear"]
    assert "nothing to choose" in metrics["kernels"]["linear"]["search_skipped"]
    assert metrics["final"]["selected_on"] == "none"
    # Something to choose: the CV runs.
    _, metrics = fit_svm(demo_features, kernel="rbf", C=1.0, gamma="cv", out=tmp_path / "gamma")
    assert calls == ["rbf"] and metrics["final"]["selected_on"] == "train-cv"
    assert metrics["selection"]["chosen"]["gamma_value"]["rbf"] == metrics["kernels"]["rbf"]["gamma_value"]
    assert not svm_search.has_choice("linear", 1.0, "cv") and svm_search.has_choice("poly", 1.0, "cv")
    assert svm_search.has_choice("linear", "auto", "scale")
