"""Choosing an SVM's ``C`` (and ``gamma``) by cross-validation on the training split only.

``fit-svm --C auto`` searches a log-scale grid of :data:`C_GRID`: 8 values from 0.01 to 464 in
steps of two thirds of a decade (x4.64, about libsvm's guide's x4), C=1 (scikit-learn's default,
the study's) among them, moved by whole decades onto the kernel's scale (:func:`grid_decades`; as
listed for linear and rbf on l2-scaled features). The top of the range costs nothing (the
hard-margin stop below); each value under the hard-margin point costs one fit per fold, which is
why the step is no finer. ``--gamma cv`` (for poly, rbf, sigmoid) searches :data:`GAMMA_FACTORS`
times scikit-learn's ``gamma="scale"`` value (``--gamma auto`` keeps scikit-learn's meaning,
1 / n_features, so the search has its own name). The protocol is the standard one for linear
probes and SVMs on frozen features (VISSL's SVM benchmark, Kornblith et al. 2019):

* stratified k-fold cross-validation (``folds``, default 5, seeded) over the **training rows
  only**; the test split is never passed here;
* one kernel matrix: the scaled training features' Gram matrix (dot products, or squared
  distances for rbf) is computed once; each fold slices it once (its fit rows x fit rows to fit,
  its validation rows x fit rows to score) and every gamma is an elementwise function of that
  slice, fitted with ``SVC(kernel="precomputed")``. The scaling (``standard``: mean/std) is fitted
  on all of train before the split -- the price of one kernel matrix; it never sees test rows;
* the grid is walked upwards in C, fold by fold, and a fold stops early once its fitted SVM has no
  dual coefficient at the bound C. That solution then passes libsvm's own stopping test for every
  larger C as well (the test, its index sets and the intercept involve only alphas strictly inside
  (0, C), and those stay inside for a larger C): it is the hard-margin solution, a valid answer of
  the solver at every larger C, so the larger C values get its validation predictions without
  being fitted again (a refit could only differ within libsvm's tolerance, 1e-3). With
  2,048 features and a few dozen images per class every one-vs-one pair is separable, so this
  hard-margin point is usually reached inside the grid and the largest (slowest) C values cost
  nothing. ``cv_fits`` in the record says how many fits ran out of how many grid points;
* validation rows are scored with the one-vs-one votes computed by matrix products from the
  support vectors' kernel columns (:func:`ovo_predict`: libsvm's votes and its tie rule, the
  lowest class index), not one row at a time in libsvm;
* the fits run in parallel threads (libsvm and the matrix products release the GIL), one per
  core up to the number of folds (``n_jobs``), taking the folds' next fits round robin;
* the point with the best mean CV accuracy wins; ties go to the smallest ``C`` (the most
  regularized) and then the gamma factor closest to 1; the model is then refitted on all of train.

``--preset study`` is what the study ran (scikit-learn's defaults: C=1, gamma="scale");
``--preset tuned`` searches both, on the scaling measured best (benchmarks/bench_accuracy.py).
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np

from cars_tl import runtime
from cars_tl.errors import CarsTLError

C_GRID = tuple(10.0 ** (e / 3) for e in range(-6, 9, 2))  # 0.01, 0.0464, 0.215, 1, 4.64, 21.5, 100, 464
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


class CVResult(NamedTuple):
    """Mean CV accuracy (%) per (gamma, C): shape (len(gamma_values), len(c_grid)); fits run of all points."""

    scores: np.ndarray
    fits: int
    points: int


def at_bound(svc, C: float) -> bool:
    """Whether any dual coefficient of the fitted SVC sits at the bound C (libsvm sets it to C exactly)."""
    return bool(svc.dual_coef_.size and np.abs(svc.dual_coef_).max() >= C * (1 - 1e-9))


def ovo_predict(svc, kernel_rows: np.ndarray, block: int = 256) -> np.ndarray:
    """``svc.predict`` for a fitted ``SVC(kernel="precomputed")`` from ``kernel_rows`` (n, n_fit_rows),
    by matrix products instead of libsvm's row-by-row loop.

    One-vs-one exactly as libsvm: pair (i, j), i < j, decides ``sum(coef * K) - rho > 0`` -> a vote
    for i, else for j; the most votes wins, ties to the lowest class index. Class i's support vectors
    carry one coefficient row per other class (row j - 1 for j > i, row j for j < i), so one product
    per class gives every pair's share of the decision value."""
    classes = svc.classes_
    k = len(classes)
    starts = np.concatenate([[0], np.cumsum(svc.n_support_)])
    coef, intercept = svc.dual_coef_, svc.intercept_
    if k == 2:  # sklearn negates both for two classes (positive means classes_[1]); libsvm's own sign
        coef, intercept = -coef, -intercept
    # Class i's coefficients as one contiguous (k - 1, its support vectors) block: strided slices
    # of dual_coef_ made the products 4x slower.
    blocks = [np.ascontiguousarray(coef[:, starts[i]:starts[i + 1]]) for i in range(k)]
    out = np.empty(len(kernel_rows), dtype=classes.dtype)
    for lo in range(0, len(kernel_rows), block):
        rows = np.ascontiguousarray(kernel_rows[lo:lo + block][:, svc.support_].T)  # (support vectors, n)
        n = rows.shape[1]
        # share[i, slot]: class i's support vectors' part of pair (i, other), slot = other - (other > i)
        share = np.empty((k, k - 1, n))
        for i in range(k):
            np.matmul(blocks[i], rows[starts[i]:starts[i + 1]], out=share[i])
        votes = np.zeros((k, n), dtype=np.int64)
        pair = 0
        for i in range(k - 1):  # pairs (i, i+1), ..., (i, k-1): consecutive in libsvm's order
            decision = share[i, i:] + share[i + 1:, i] + intercept[pair:pair + k - 1 - i, None]
            wins = decision > 0
            votes[i] += wins.sum(0)
            votes[i + 1:] += ~wins
            pair += k - 1 - i
        out[lo:lo + n] = classes[votes.argmax(0)]
    return out


class _FoldWalk:
    """One fold's walk up the C grid, for each gamma in turn: one SVC fit per :meth:`step`, and the
    rest of a gamma's grid filled in at the hard margin (see the module docstring)."""

    def __init__(self, gram, y, fit, val, kernel, c_grid, gamma_values, degree, coef0):
        self.gram, self.y_fit, self.y_val, self.fit_rows, self.val_rows = gram, y[fit], y[val], fit, val
        self.kernel, self.c_grid, self.gamma_values, self.degree, self.coef0 = kernel, c_grid, gamma_values, degree, coef0
        self.correct = np.zeros((len(gamma_values), len(c_grid)))
        self.fits = self.g = self.c = 0
        self.slices = self.kernels = None

    @property
    def done(self) -> bool:
        return self.g == len(self.gamma_values)

    def step(self) -> None:
        from sklearn.svm import SVC

        if self.slices is None:  # np.take: about 8x faster than np.ix_ on an 8,144-row matrix
            rows = np.take(self.gram, np.concatenate([self.fit_rows, self.val_rows]), 0)
            cols = np.take(rows, self.fit_rows, 1)
            self.slices = cols[:len(self.fit_rows)], cols[len(self.fit_rows):]
        if self.kernels is None:
            gamma = self.gamma_values[self.g]
            self.kernels = tuple(_kernel_from_gram(part, self.kernel, gamma, self.degree, self.coef0) for part in self.slices)
            if self.g + 1 == len(self.gamma_values):
                self.slices = ()  # the last gamma: its kernel is all this fold still needs
        k_fit, k_val = self.kernels
        C = self.c_grid[self.c]
        svc = SVC(kernel="precomputed", C=C).fit(k_fit, self.y_fit)
        self.fits += 1
        self.correct[self.g, self.c] = np.count_nonzero(ovo_predict(svc, k_val) == self.y_val)
        if at_bound(svc, C) and self.c + 1 < len(self.c_grid):
            self.c += 1
            return
        self.correct[self.g, self.c + 1:] = self.correct[self.g, self.c]  # the hard margin: the same for every larger C
        self.g, self.c, self.kernels = self.g + 1, 0, None


def _walk_all(walks: list[_FoldWalk], workers: int) -> None:
    """Every fold's walk to its end, in ``workers`` threads."""
    from threadpoolctl import threadpool_limits

    # One BLAS thread: the fits fill the cores, and the vote products are small (a BLAS thread pool
    # spinning on them made them 5x slower next to another busy process).
    with threadpool_limits(1):
        if workers == 1:
            for walk in walks:
                while not walk.done:
                    walk.step()
        else:
            _round_robin(walks, workers)


def _round_robin(walks: list[_FoldWalk], workers: int) -> None:
    """One fit at a time per walk, in turn: with fewer cores than folds no core idles while another
    fold still has fits (whole folds per thread would leave 5 folds on 2 cores 3 rounds long, not 2.5)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(workers) as pool:
        running = {pool.submit(walk.step): walk for walk in walks}
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    walk = running.pop(future)
                    future.result()
                    if not walk.done:
                        running[pool.submit(walk.step)] = walk
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def cross_validate(z: np.ndarray, y: np.ndarray, kernel: str, c_grid, gamma_values, degree: int, coef0: float,
                   folds: list[tuple[np.ndarray, np.ndarray]], n_jobs: int | None = None) -> CVResult:
    """Mean CV accuracy (%) for every (gamma, C) pair, ``c_grid`` ascending.

    ``z`` are the scaled *training* features; one Gram matrix, sliced once per fold; fits in
    ``n_jobs`` threads (default: one per usable core, at most one per fold). Memory: the Gram
    matrix (n x n float64: 0.53 GB for 8,144 rows) plus, per fold, its columns of the fold's fit
    rows (0.8x that) and, while gammas remain to search, one gamma's kernel of them (0.8x again):
    about 5x the Gram matrix in all for 5 folds searching C, 9x searching gamma too."""
    if list(c_grid) != sorted(c_grid):
        raise ValueError("c_grid must ascend: the early stop at the hard margin walks C upwards")
    gram = _gram(z, kernel)
    walks = [_FoldWalk(gram, y, fit, val, kernel, list(c_grid), list(gamma_values), degree, coef0) for fit, val in folds]
    _walk_all(walks, max(1, min(len(folds), n_jobs or runtime.usable_cores())))
    correct = sum(walk.correct for walk in walks)
    return CVResult(100.0 * correct / len(y), sum(walk.fits for walk in walks), len(folds) * len(gamma_values) * len(c_grid))


def grid_decades(z: np.ndarray, kernel: str, gamma: float, degree: int, coef0: float) -> int:
    """Whole decades to move :data:`C_GRID` by so that it sits on the kernel's scale.

    An SVM sees only C times the kernel: scaling K by s is exactly scaling C by s (the dual's
    alphas scale by 1/s, the decisions keep their sign). :data:`C_GRID` is made for kernels of
    unit scale -- rbf always, linear on l2-scaled features -- where it is used as listed. A linear
    kernel on standardized 2,048-d features has K(x, x) near 2,048, though, and a cubic one with a
    gamma of 5 has 125: there the listed grid would be all hard-margin. So the grid is divided by
    the mean K(x, x) over the training rows, rounded to a power of ten (0 for any mean between
    0.32 and 3.2)."""
    sq = np.einsum("ij,ij->i", z, z)
    diag = np.ones_like(sq) if kernel == "rbf" else _kernel_from_gram(sq, kernel, gamma, degree, coef0)
    size = float(np.mean(np.abs(diag)))
    return -int(round(math.log10(size))) if size > 0 and math.isfinite(size) else 0


def search(x: np.ndarray, y: np.ndarray, kernel: str, C, gamma, degree: int, coef0: float, scale: str,
           folds: int = DEFAULT_FOLDS, seed: int = 0, n_jobs: int | None = None) -> dict:
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
    decades = grid_decades(z, kernel, base, degree, coef0) if C == "auto" else 0
    c_grid = [c * 10.0 ** decades for c in C_GRID] if C == "auto" else [float(C)]
    cv = cross_validate(z, y, kernel, c_grid, gamma_values, degree, coef0, splits, n_jobs=n_jobs)
    scores = cv.scores
    # Ties: smallest C first (the grid ascends), then the gamma factor closest to 1.
    order = sorted(range(len(factors)), key=lambda i: abs(math.log(factors[i])))
    best_g, best_c = max(((g, c) for g in order for c in range(len(c_grid))),
                         key=lambda gc: (round(scores[gc], 9), -gc[1], -order.index(gc[0])))
    return {
        "folds": folds, "seed": seed, "train_rows": int(len(y)), "scale": scale,
        "C_grid": c_grid if C == "auto" else None,
        "C_grid_decades": decades if C == "auto" else None,  # C_GRID x 10**decades: the kernel's scale
        "gamma_grid": gamma_values if search_gamma else None,
        "gamma_factors": list(factors) if search_gamma else None,
        "cv_acc": [[round(float(v), 4) for v in row] for row in scores],  # [gamma][C]
        "C": c_grid[best_c], "gamma": gamma_values[best_g] if search_gamma else gamma,
        "gamma_value": gamma_values[best_g], "cv_acc_chosen": round(float(scores[best_g, best_c]), 4),
        "cv_fits": cv.fits, "cv_points": cv.points,  # fits run / (gamma, C, fold) points: the rest were hard-margin repeats
        "seconds": round(time.perf_counter() - started, 4),
    }
