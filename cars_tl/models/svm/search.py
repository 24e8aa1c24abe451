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
* the score is the mean of the folds' accuracies, as scikit-learn's ``cross_val_score(...).mean()``
  (``cv_std``: their std); the point with the best mean wins; ties go to the smallest ``C`` (the most
  regularized) and then the gamma factor closest to 1; the model is then refitted on all of train;
* each gamma has its own C grid, on its own kernel's scale (a cubic kernel's scale is gamma cubed);
  a best C at an end of its grid with the score still rising that way extends the grid by its step
  until the best is inside (:data:`MAX_EXTENSION` values at most; recorded as ``C_grid_extended``);
* with one kernel, one C and one gamma there is nothing to choose, and no CV runs (``fit-svm``).

``--preset study`` is what the study ran (scikit-learn's defaults: C=1, gamma="scale");
``--preset tuned`` searches both, on the scaling measured best (benchmarks/bench_accuracy.py).
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np

from cars_tl.core import runtime
from cars_tl.core.errors import CarsTLError
from cars_tl.models.svm import kernels
from cars_tl.models.svm.model import Scaler, gamma_value, parse_gamma

C_GRID = tuple(10.0 ** (e / 3) for e in range(-6, 9, 2))  # 0.01, 0.0464, 0.215, 1, 4.64, 21.5, 100, 464
C_STEP = 10.0 ** (2 / 3)  # the grid's step: two thirds of a decade
MAX_EXTENSION = 6  # values added past an end of the C grid at most (see search)
GAMMA_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT_FOLDS = 5
GAMMA_KERNELS = ("poly", "rbf", "sigmoid")


def parse_C(value) -> float | str:
    """``auto`` or a positive number."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CarsTLError(
            f"--C {value!r} is not valid", "use a positive number (e.g. --C 1) or --C auto (cross-validated)"
        ) from None
    if not number > 0 or not math.isfinite(number):
        raise CarsTLError(
            f"--C must be positive, got {value}", "use a positive number (e.g. --C 1) or --C auto (cross-validated)"
        )
    return number


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
            "or a fixed value such as --C 1 --gamma scale"
            if counts.min() >= 2
            else "a class with one training image cannot be cross-validated: use a fixed value such as --C 1 --gamma scale",
        )


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(fit rows, validation rows)]``: indices into ``labels`` (the training rows), stratified."""
    from sklearn.model_selection import StratifiedKFold

    check_folds(labels, folds)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(fit, val) for fit, val in splitter.split(np.zeros(len(labels)), labels)]


def gram_matrix(z: np.ndarray, kernel: str) -> np.ndarray:
    """The one matrix every gamma is computed from: dot products, or squared distances (rbf)."""
    dot = kernels.kernel_matrix(z, z, "linear", 1.0, 1, 0.0)
    if kernel != "rbf":
        return dot
    sq = np.diag(dot)
    return np.maximum(sq[:, None] + sq[None, :] - 2 * dot, 0.0)


def kernel_from_gram(gram: np.ndarray, kernel: str, gamma: float, degree: int, coef0: float) -> np.ndarray:
    """The kernel matrix at ``gamma`` from :func:`gram_matrix`'s matrix, without recomputing dot products."""
    return kernels.kernel_values(gram, kernel, gamma, degree, coef0)


class CVResult(NamedTuple):
    """CV accuracy (%) per (gamma, C), shape (len(gamma_values), len(c_grid)): ``scores`` the mean of
    the folds' accuracies (scikit-learn's ``cross_val_score(...).mean()``), ``std`` their standard
    deviation (``.std()``, over the folds); fits run of all points."""

    scores: np.ndarray
    std: np.ndarray
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
    blocks = [np.ascontiguousarray(coef[:, starts[i] : starts[i + 1]]) for i in range(k)]
    out = np.empty(len(kernel_rows), dtype=classes.dtype)
    for lo in range(0, len(kernel_rows), block):
        rows = np.ascontiguousarray(kernel_rows[lo : lo + block][:, svc.support_].T)  # (support vectors, n)
        n = rows.shape[1]
        # share[i, slot]: class i's support vectors' part of pair (i, other), slot = other - (other > i)
        share = np.empty((k, k - 1, n))
        for i in range(k):
            np.matmul(blocks[i], rows[starts[i] : starts[i + 1]], out=share[i])
        votes = np.zeros((k, n), dtype=np.int64)
        pair = 0
        for i in range(k - 1):  # pairs (i, i+1), ..., (i, k-1): consecutive in libsvm's order
            decision = share[i, i:] + share[i + 1 :, i] + intercept[pair : pair + k - 1 - i, None]
            wins = decision > 0
            votes[i] += wins.sum(0)
            votes[i + 1 :] += ~wins
            pair += k - 1 - i
        out[lo : lo + n] = classes[votes.argmax(0)]
    return out


class _FoldWalk:
    """One fold's walk up the C grid, for each gamma in turn: one SVC fit per :meth:`step`, and the
    rest of a gamma's grid filled in at the hard margin (see the module docstring)."""

    def __init__(self, gram, y, fit, val, kernel, c_grids, gamma_values, degree, coef0):
        self.gram, self.y_fit, self.y_val, self.fit_rows, self.val_rows = gram, y[fit], y[val], fit, val
        self.kernel, self.c_grids, self.gamma_values, self.degree, self.coef0 = (
            kernel,
            c_grids,
            gamma_values,
            degree,
            coef0,
        )
        self.correct = np.zeros((len(gamma_values), len(c_grids[0])))
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
            self.slices = cols[: len(self.fit_rows)], cols[len(self.fit_rows) :]
        if self.kernels is None:
            gamma = self.gamma_values[self.g]
            self.kernels = tuple(
                kernel_from_gram(part, self.kernel, gamma, self.degree, self.coef0) for part in self.slices
            )
            if self.g + 1 == len(self.gamma_values):
                self.slices = ()  # the last gamma: its kernel is all this fold still needs
        k_fit, k_val = self.kernels
        c_grid = self.c_grids[self.g]
        C = c_grid[self.c]
        svc = SVC(kernel="precomputed", C=C).fit(k_fit, self.y_fit)
        self.fits += 1
        self.correct[self.g, self.c] = np.count_nonzero(ovo_predict(svc, k_val) == self.y_val)
        if at_bound(svc, C) and self.c + 1 < len(c_grid):
            self.c += 1
            return
        self.correct[self.g, self.c + 1 :] = self.correct[
            self.g, self.c
        ]  # the hard margin: the same for every larger C
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


def cross_validate(
    z: np.ndarray,
    y: np.ndarray,
    kernel: str,
    c_grid,
    gamma_values,
    degree: int,
    coef0: float,
    folds: list[tuple[np.ndarray, np.ndarray]],
    n_jobs: int | None = None,
    gram: np.ndarray | None = None,
) -> CVResult:
    """CV accuracy (%) for every (gamma, C) pair: the mean of the folds' accuracies and their std.

    ``c_grid`` ascending: one grid for every gamma, or one per gamma (a list of equally long grids).
    ``z`` are the scaled *training* features; one Gram matrix (``gram``, computed when not given),
    sliced once per fold; fits in ``n_jobs`` threads (default: one per usable core, at most one per
    fold). Memory: the Gram matrix (n x n float64: 0.53 GB for 8,144 rows) plus, per fold, its
    columns of the fold's fit rows (0.8x that) and, while gammas remain to search, one gamma's
    kernel of them (0.8x again): about 5x the Gram matrix in all for 5 folds searching C, 9x
    searching gamma too."""
    c_grids = [list(g) for g in c_grid] if len(c_grid) and np.ndim(c_grid[0]) else [list(c_grid)] * len(gamma_values)
    if len(c_grids) != len(gamma_values) or len({len(g) for g in c_grids}) != 1:
        raise ValueError("one C grid for every gamma, or one per gamma, all of one length")
    if any(g != sorted(g) for g in c_grids):
        raise ValueError("c_grid must ascend: the early stop at the hard margin walks C upwards")
    gram = gram_matrix(z, kernel) if gram is None else gram
    walks = [_FoldWalk(gram, y, fit, val, kernel, c_grids, list(gamma_values), degree, coef0) for fit, val in folds]
    _walk_all(walks, max(1, min(len(folds), n_jobs or runtime.usable_cores())))
    # Each fold's accuracy, then their mean: cross_val_score's mean (not all folds' correct over all rows).
    per_fold = np.stack([100.0 * walk.correct / len(walk.val_rows) for walk in walks])
    return CVResult(
        per_fold.mean(0),
        per_fold.std(0),
        sum(walk.fits for walk in walks),
        len(folds) * len(gamma_values) * len(c_grids[0]),
    )


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
    diag = np.ones_like(sq) if kernel == "rbf" else kernel_from_gram(sq, kernel, gamma, degree, coef0)
    size = float(np.mean(np.abs(diag)))
    return -int(round(math.log10(size))) if size > 0 and math.isfinite(size) else 0


def has_choice(kernel: str, C, gamma) -> bool:
    """Whether a search has anything to choose for one kernel: several C values or several gammas."""
    return C == "auto" or (gamma == "cv" and kernel in GAMMA_KERNELS)


def _best(scores: list[list[float]], order: list[int]) -> tuple[int, int]:
    """The best (gamma, C) index: ties to the smallest C, then the gamma factor closest to 1 (``order``)."""
    return max(
        ((g, c) for g in order for c in range(len(scores[g]))),
        key=lambda gc: (round(scores[gc[0]][gc[1]], 9), -gc[1], -order.index(gc[0])),
    )


def search(
    x: np.ndarray,
    y: np.ndarray,
    kernel: str,
    C,
    gamma,
    degree: int,
    coef0: float,
    scale: str,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    n_jobs: int | None = None,
) -> dict:
    """Choose ``C`` (when ``"auto"``) and gamma (when ``"cv"``) on the training rows ``x``, ``y``.

    Each gamma gets its own C grid, placed on that gamma's kernel scale (:func:`grid_decades`). When
    the best C is at an end of its grid with the score still rising towards it, the grid is extended
    that way by its own step (x4.64), one value at a time, until the best is inside it -- at most
    :data:`MAX_EXTENSION` values; ``C_grid_extended`` says how far and whether that cap stopped it.

    Returns the record kept in metrics.json: grids, CV accuracy per point (the mean of the folds'
    accuracies, as scikit-learn's ``cross_val_score(...).mean()``; ``cv_std``: their std), the
    chosen values (``C``; ``gamma``: a number, or the fixed option as given), folds, seed, seconds."""
    started = time.perf_counter()
    splits = stratified_folds(y, folds, seed)
    z = Scaler.fit(scale, x)(x)
    search_gamma = gamma == "cv" and kernel in GAMMA_KERNELS
    base = gamma_value("scale" if gamma == "cv" else parse_gamma(gamma) if isinstance(gamma, str) else gamma, z)
    factors = GAMMA_FACTORS if search_gamma else (1.0,)
    gamma_values = [base * f for f in factors]
    auto = C == "auto"
    decades = [grid_decades(z, kernel, g, degree, coef0) if auto else 0 for g in gamma_values]
    c_grids = [[c * 10.0**d for c in C_GRID] if auto else [float(C)] for d in decades]
    gram = gram_matrix(z, kernel)
    cv = cross_validate(z, y, kernel, c_grids, gamma_values, degree, coef0, splits, n_jobs=n_jobs, gram=gram)
    scores, stds = cv.scores.tolist(), cv.std.tolist()
    fits, points = cv.fits, cv.points
    # Ties: smallest C first (the grid ascends), then the gamma factor closest to 1.
    order = sorted(range(len(factors)), key=lambda i: abs(math.log(factors[i])))
    best_g, best_c = _best(scores, order)
    extended = {"up": 0, "down": 0, "capped": False}
    while auto:
        row = scores[best_g]
        up = best_c == len(row) - 1 and len(row) > 1 and row[best_c] > row[best_c - 1]
        down = best_c == 0 and len(row) > 1 and row[0] > row[1]
        if not (up or down):
            break
        if extended["up"] + extended["down"] >= MAX_EXTENSION:
            extended["capped"] = True
            break
        grid = c_grids[best_g]
        new_c = grid[-1] * C_STEP if up else grid[0] / C_STEP
        more = cross_validate(
            z, y, kernel, [new_c], [gamma_values[best_g]], degree, coef0, splits, n_jobs=n_jobs, gram=gram
        )
        fits, points = fits + more.fits, points + more.points
        at = len(grid) if up else 0
        grid.insert(at, new_c)
        scores[best_g].insert(at, float(more.scores[0, 0]))
        stds[best_g].insert(at, float(more.std[0, 0]))
        extended["up" if up else "down"] += 1
        best_g, best_c = _best(scores, order)
    return {
        "folds": folds,
        "seed": seed,
        "train_rows": int(len(y)),
        "scale": scale,
        "cv_score": "mean of the folds' accuracies (scikit-learn's cross_val_score(...).mean()); cv_std: their std",
        "C_grid": c_grids[best_g] if auto else None,  # the chosen gamma's grid
        "C_grid_decades": decades[best_g] if auto else None,  # C_GRID x 10**decades: the kernel's scale
        "C_grids": c_grids if auto else None,  # [gamma][C], each on its gamma's scale, as cv_acc
        "C_grid_extended": (extended if extended["up"] or extended["down"] or extended["capped"] else None)
        if auto
        else None,
        "gamma_grid": gamma_values if search_gamma else None,
        "gamma_factors": list(factors) if search_gamma else None,
        "cv_acc": [[round(float(v), 4) for v in row] for row in scores],  # [gamma][C]
        "cv_std": [[round(float(v), 4) for v in row] for row in stds],  # [gamma][C]
        "C": c_grids[best_g][best_c],
        "gamma": gamma_values[best_g] if search_gamma else gamma,
        "gamma_value": gamma_values[best_g],
        "cv_acc_chosen": round(float(scores[best_g][best_c]), 4),
        "cv_std_chosen": round(float(stds[best_g][best_c]), 4),
        "cv_fits": fits,
        "cv_points": points,  # fits run / (gamma, C, fold) points: the rest were hard-margin repeats
        "seconds": round(time.perf_counter() - started, 4),
    }


def extension_note(found: dict) -> str | None:
    """One line on a grid extended past its end (None when it was not)."""
    ext = (found or {}).get("C_grid_extended")
    if not ext:
        return None
    moves = [f"{ext[d]} step(s) {d}" for d in ("up", "down") if ext[d]]
    note = f"C grid extended {' and '.join(moves) or 'by 0 steps'} (x{C_STEP:.2f} each): the best C was at its end with the CV score still rising"
    if ext["capped"]:
        note += (
            f"; stopped at the cap of {MAX_EXTENSION} extra values with the best C ({found['C']:.4g}) still at the end"
        )
    return note
