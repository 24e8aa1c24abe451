"""Choosing an SVM's ``C`` (and ``gamma``) by cross-validation on the training split only.

``fit-svm --C auto`` searches a log-scale grid of :data:`C_GRID` (11 values, 0.01 to 1000 in
half-decade steps); ``--gamma cv`` (for poly, rbf, sigmoid) searches :data:`GAMMA_FACTORS` times
scikit-learn's ``gamma="scale"`` value (``--gamma auto`` keeps scikit-learn's meaning,
1 / n_features, so the search has its own name). The protocol is the standard one for linear probes
and SVMs on frozen features (VISSL's SVM benchmark, Kornblith et al. 2019):

* stratified k-fold cross-validation (``folds``, default 5, seeded) over the **training rows
  only**; the test split is never passed here;
* one kernel matrix: the scaled training features' Gram matrix (dot products, or squared
  distances for rbf) is computed once; every gamma is an elementwise function of it, and every
  fold and grid point slices it (``K[fit][:, fit]`` to fit, ``K[val][:, fit]`` to score) for a
  ``SVC(kernel="precomputed")``. The scaling (``standard``: mean/std) is fitted on all of train
  before the split -- the price of one kernel matrix; it never sees test rows;
* the point with the best mean CV accuracy wins; ties go to the smallest ``C`` (the most
  regularized) and then the gamma factor closest to 1; the model is then refitted on all of train.

``--preset study`` is what the study ran (scikit-learn's defaults: C=1, gamma="scale");
``--preset tuned`` searches both, on the scaling measured best (benchmarks/bench_accuracy.py).
"""

from __future__ import annotations

import math
import time

import numpy as np

from cars_tl.errors import CarsTLError

C_GRID = tuple(float(v) for v in np.logspace(-2, 3, 11))
GAMMA_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT_FOLDS = 5
GAMMA_KERNELS = ("poly", "rbf", "sigmoid")
PRESETS = {
    "study": {"C": 1.0, "gamma": "scale", "scale": "l2"},
    "tuned": {"C": "auto", "gamma": "cv", "scale": "l2"},
}


def parse_C(value) -> float | str:
    """``auto`` or a positive number."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CarsTLError(f"--C {value!r} is not valid", "use a positive number (e.g. --C 1) or --C auto (cross-validated)") from None
    if not number > 0 or not math.isfinite(number):
        raise CarsTLError(f"--C must be positive, got {value}", "use a positive number (e.g. --C 1) or --C auto (cross-validated)")
    return number


def resolve_preset(preset: str, C=None, gamma: str | None = None, scale: str | None = None) -> dict:
    """The preset's C, gamma and scale with every explicit (non-None) option applied."""
    if preset not in PRESETS:
        raise CarsTLError(f"unknown --preset {preset!r}; valid: {', '.join(PRESETS)}",
                          "--preset study (C=1, gamma=scale: the study) or --preset tuned (--C auto --gamma cv)")
    chosen = dict(PRESETS[preset])
    chosen.update({k: v for k, v in {"C": C, "gamma": gamma, "scale": scale}.items() if v is not None})
    chosen["C"] = parse_C(chosen["C"])
    return chosen


def check_folds(labels: np.ndarray, folds: int) -> None:
    """Every class present in train needs at least ``folds`` rows for stratified k-fold."""
    if folds < 2:
        raise CarsTLError(f"--cv-folds must be at least 2, got {folds}", "use --cv-folds 5 (the default) or 3")
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < folds:
        small = [f"class {int(c)} has {int(n)}" for c, n in zip(classes, counts) if n < folds][:5]
        raise CarsTLError(
            f"cannot cross-validate with {folds} folds: stratified folds need every class in each fold, and "
            f"{', '.join(small)} training image(s)",
            f"use --cv-folds {max(2, int(counts.min()))} (at most the smallest class count, {int(counts.min())}) "
            "or a fixed value such as --C 1 --gamma scale" if counts.min() >= 2 else
            "a class with one training image cannot be cross-validated: use a fixed value such as --C 1 --gamma scale",
        )


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(fit rows, validation rows)]``: indices into ``labels`` (the training rows), stratified."""
    from sklearn.model_selection import StratifiedKFold

    check_folds(labels, folds)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(fit, val) for fit, val in splitter.split(np.zeros(len(labels)), labels)]


def _gram(z: np.ndarray, kernel: str) -> np.ndarray:
    """The one matrix every gamma is computed from: dot products, or squared distances (rbf)."""
    from cars_tl.svm import kernel_matrix

    dot = kernel_matrix(z, z, "linear", 1.0, 1, 0.0)
    if kernel != "rbf":
        return dot
    sq = np.diag(dot)
    return np.maximum(sq[:, None] + sq[None, :] - 2 * dot, 0.0)


def _kernel_from_gram(gram: np.ndarray, kernel: str, gamma: float, degree: int, coef0: float) -> np.ndarray:
    if kernel == "linear":
        return gram
    if kernel == "rbf":
        return np.exp(-gamma * gram)
    if kernel == "poly":
        return (gamma * gram + coef0) ** degree
    return np.tanh(gamma * gram + coef0)


def cross_validate(z: np.ndarray, y: np.ndarray, kernel: str, c_grid, gamma_values, degree: int, coef0: float,
                   folds: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Mean CV accuracy (%) for every (gamma, C) pair: shape (len(gamma_values), len(c_grid)).

    ``z`` are the scaled *training* features; one Gram matrix, sliced per fold and grid point."""
    from sklearn.svm import SVC

    gram = _gram(z, kernel)
    scores = np.zeros((len(gamma_values), len(c_grid)))
    for g, gamma in enumerate(gamma_values):
        k = _kernel_from_gram(gram, kernel, gamma, degree, coef0)
        for fit, val in folds:
            k_fit, k_val = k[np.ix_(fit, fit)], k[np.ix_(val, fit)]
            for c, C in enumerate(c_grid):
                svc = SVC(kernel="precomputed", C=C).fit(k_fit, y[fit])
                scores[g, c] += float((svc.predict(k_val) == y[val]).sum())
    return 100.0 * scores / len(y)


def search(x: np.ndarray, y: np.ndarray, kernel: str, C, gamma, degree: int, coef0: float, scale: str,
           folds: int = DEFAULT_FOLDS, seed: int = 0) -> dict:
    """Choose ``C`` (when ``"auto"``) and gamma (when ``"cv"``) on the training rows ``x``, ``y``.

    Returns the record kept in metrics.json: grids, CV accuracy per point, the chosen values
    (``C``; ``gamma``: a number, or the fixed option as given), folds, seed, seconds."""
    from cars_tl.svm import Scaler, gamma_value, parse_gamma

    started = time.perf_counter()
    splits = stratified_folds(y, folds, seed)
    z = Scaler.fit(scale, x)(x)
    search_gamma = gamma == "cv" and kernel in GAMMA_KERNELS
    base = gamma_value("scale" if gamma == "cv" else parse_gamma(gamma) if isinstance(gamma, str) else gamma, z)
    factors = GAMMA_FACTORS if search_gamma else (1.0,)
    gamma_values = [base * f for f in factors]
    c_grid = list(C_GRID) if C == "auto" else [float(C)]
    scores = cross_validate(z, y, kernel, c_grid, gamma_values, degree, coef0, splits)
    # Ties: smallest C first (the grid ascends), then the gamma factor closest to 1.
    order = sorted(range(len(factors)), key=lambda i: abs(math.log(factors[i])))
    best_g, best_c = max(((g, c) for g in order for c in range(len(c_grid))),
                         key=lambda gc: (round(scores[gc], 9), -gc[1], -order.index(gc[0])))
    return {
        "folds": folds, "seed": seed, "train_rows": int(len(y)), "scale": scale,
        "C_grid": c_grid if C == "auto" else None,
        "gamma_grid": gamma_values if search_gamma else None,
        "gamma_factors": list(factors) if search_gamma else None,
        "cv_acc": [[round(float(v), 4) for v in row] for row in scores],  # [gamma][C]
        "C": c_grid[best_c], "gamma": gamma_values[best_g] if search_gamma else gamma,
        "gamma_value": gamma_values[best_g], "cv_acc_chosen": round(float(scores[best_g, best_c]), 4),
        "seconds": round(time.perf_counter() - started, 4),
    }
