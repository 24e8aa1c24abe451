"""``fit-svm``: scikit-learn SVC on cached features (the study's model C), with a fast path.

Semantics are exactly ``sklearn.svm.SVC``'s (one-vs-one, C, degree, gamma, coef0 mean what they mean
there). The fast path computes the kernel matrix with torch matrix products in float64 and fits
``SVC(kernel="precomputed")``; to predict new images it keeps the support vectors (and only them)
and the scaling. ``--method plain`` fits a plain ``SVC`` instead (the reference the fast path is
checked against).

Defaults and why: features are L2-normalized (``--scale l2``) and ``gamma="scale"``. Pooled ReLU
features have a large common positive component; on L2-normalized features every kernel sees
cosine similarities, which keeps poly and sigmoid well conditioned. Standardizing instead, with
``gamma="scale"`` (= 1/2048 for unit variance) and ``coef0=0``, makes poly's off-diagonal kernel
values vanish next to the diagonal: the SVM memorizes the training set and falls to chance on
test. That is why ``standard`` is not the default.

Models are saved with ``skops.io`` and loaded with an explicit list of trusted types: no pickle.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cars_tl.artifacts import names, run_config, runs
from cars_tl.artifacts.features import feature_run_fields, load_train_test
from cars_tl.core.errors import CarsTLError, check_number, check_seed
from cars_tl.core.progress import NULL, Progress
from cars_tl.models.svm import search as svm_search
from cars_tl.models.svm.kernels import KERNELS, check_kernel
from cars_tl.models.svm.model import (
    DEGREE_MAX,
    METHODS,
    Scaler,
    fit_model,
    load_libraries,
    load_model,
    model_file_name,
    parse_gamma,
    save_model,
)
from cars_tl.stages import presets

# --------------------------------------------------------------------------- the stage


@run_config.recorded("fit-svm", names={"features_path": "features"})
def fit_svm(
    features_path: Path,
    *,
    kernel: str = "poly",
    C: float | str | None = None,
    degree: int = 3,
    gamma: str | None = None,
    coef0: float = 0.0,
    scale: str | None = None,
    method: str = "precomputed",
    out: Path | None = None,
    artifacts: Path = Path("artifacts"),
    progress: Progress = NULL,
    preset: str = "study",
    cv_folds: int = svm_search.DEFAULT_FOLDS,
    seed: int = 0,
    force: bool = False,
) -> tuple[Path, dict]:
    """Fit one kernel (or ``all``) on a feature cache; returns the run directory and its metrics.

    ``preset`` gives C, gamma and scale unless passed (study: 1, scale, l2; tuned: see
    :data:`cars_tl.stages.presets.SVM`); ``C="auto"`` / ``gamma="cv"`` choose them by ``cv_folds``-fold
    cross-validation on train (seeded by ``seed``), recorded per kernel under ``search``.
    An existing run is replaced only with ``force`` (and only once the new one completes)."""

    chosen = presets.for_stage("fit-svm", preset, C=C, gamma=gamma, scale=scale)
    C, gamma, scale = svm_search.parse_C(chosen["C"]), chosen["gamma"], chosen["scale"]
    searching = C == "auto" or gamma == "cv"

    started = time.perf_counter()
    kernels = list(KERNELS) if check_kernel(kernel, allow_all=True) == "all" else [kernel]
    Scaler(scale)  # validates every option before any work or any file is touched
    parsed_gamma = "cv" if gamma == "cv" else parse_gamma(gamma)
    if method not in METHODS:
        raise CarsTLError(f"unknown --method {method!r}; valid: {', '.join(METHODS)}")
    check_number("--coef0", coef0)
    seed = check_seed(seed)  # validated even when no search uses it: a wrong value is never silently ignored
    if not 1 <= degree <= DEGREE_MAX:
        raise CarsTLError(
            f"--degree must be a whole number from 1 to {DEGREE_MAX}, got {degree}",
            "e.g. --degree 3 (poly's degree; the other kernels ignore it)",
        )
    cache = load_train_test(
        Path(features_path), stage="fit-svm"
    )  # also refuses NaN/Inf features and an empty test split
    if len(np.unique(cache.split("train").labels)) < 2:
        raise CarsTLError(f"{features_path}: the train split has fewer than two classes; an SVM needs two or more")
    if searching:
        svm_search.check_folds(cache.split("train").labels, cv_folds)
    tr, te = cache.split("train"), cache.split("test")
    run_dir = runs.resolve_run_dir(
        out, names.svm_run_name(cache.attrs["backbone"], cache.attrs["weights"], kernel), artifacts
    )
    config = {
        "kernel": kernel,
        "C": C,
        "degree": degree,
        "gamma": gamma,
        "coef0": coef0,
        "scale": scale,
        "method": method,
        "features": str(features_path),
        "preset": preset,
    }
    if searching:
        config.update(cv_folds=cv_folds, seed=seed)
    fields = feature_run_fields(cache)
    with runs.writing_run(run_dir, "fit-svm", force=force) as target:
        metrics = runs.new_metrics(
            "svm",
            run_dir.name,
            config,
            **fields,
            params={"total": fields["backbone"]["params"] or 0, "trainable": None},
            device="cpu",
        )
        runs.write_metrics(target, metrics)
        with runs.recording(target, metrics):
            results = {}
            metrics["startup_seconds"] = round(load_libraries(), 4)  # imports: not charged to the first kernel
            with progress.task("fit svm", total=len(kernels), unit="kernel") as task:
                for k in kernels:
                    t0 = time.perf_counter()
                    found = None
                    # With one kernel, one C and one gamma there is nothing to choose: no CV. With several
                    # kernels each one's CV score is what they are compared on.
                    if searching and (len(kernels) > 1 or svm_search.has_choice(k, C, parsed_gamma)):  # on train only
                        found = svm_search.search(
                            tr.features, tr.labels, k, C, parsed_gamma, degree, coef0, scale, cv_folds, seed
                        )
                    # --gamma cv with nothing searched (a linear kernel, which has no gamma): scale, the search's centre.
                    model = fit_model(
                        tr.features,
                        tr.labels,
                        k,
                        found["C"] if found else C,
                        degree,
                        found["gamma_value"] if found else "scale" if parsed_gamma == "cv" else parsed_gamma,
                        coef0,
                        scale,
                        method,
                    )
                    fit_s = time.perf_counter() - t0
                    t1 = time.perf_counter()
                    test_pred = model.predict(te.features)
                    predict_s = time.perf_counter() - t1
                    train_pred = model.predict(tr.features)
                    save_model(model, target / model_file_name(k))
                    results[k] = {
                        "kernel": k,
                        "gamma_value": model.gamma,
                        "train_acc": round(100.0 * float((train_pred == tr.labels).mean()), 4),
                        "test_acc": round(100.0 * float((test_pred == te.labels).mean()), 4)
                        if len(te.labels)
                        else None,
                        "fit_seconds": round(fit_s, 4),
                        "predict_seconds": round(predict_s, 4),
                        "support_vectors": int(len(model.svc.support_)),
                        "classes": [int(c) for c in model.classes],  # checked when the model is loaded
                        "model_file": model_file_name(k),
                        "C": float(model.svc.C),
                    }
                    if found:
                        results[k].update(search=found, cv_acc=found["cv_acc_chosen"], cv_std=found["cv_std_chosen"])
                    elif searching:
                        results[k]["search_skipped"] = "one C and one gamma: nothing to choose, no cross-validation"
                    task.advance(1, status=f"{k}: test {results[k]['test_acc']}%")
            # With a search, the kernels are compared on their CV accuracy (train only); else on test, as the study did.
            searched = any("search" in r for r in results.values())
            rank = (lambda k: results[k]["cv_acc"]) if searching else (lambda k: results[k]["test_acc"] or 0)
            primary = kernels[0] if len(kernels) == 1 else max(results, key=rank)
            best = results[primary]
            if primary != kernels[-1]:  # the saved predictions are the kept kernel's
                model = load_model(target / best["model_file"], cache.feature_dim, cache.num_classes)
            # ranking_scores: rank 1 is SVC.predict, ranks 2.. follow the decision scores.
            runs.write_predictions(
                target, te.ids, te.labels, model.ranking_scores(te.features), "decision score", columns=model.classes
            )
            # How the reported number was selected: the kernel (several fitted) and C / gamma (searched).
            selected_on = "train-cv" if searched else "none" if len(kernels) == 1 else "test"
            chosen = {"kernel": primary} if len(kernels) > 1 else {}
            if searched:
                chosen.update(
                    C={k: r["C"] for k, r in results.items() if "search" in r},
                    gamma_value={k: r["gamma_value"] for k, r in results.items() if "search" in r and k != "linear"},
                )
            selection = {
                "selected_on": selected_on,
                "chosen": chosen,
                "by": "cross-validation accuracy on train (mean of the folds)"
                if searched
                else "test accuracy (kernel comparison, as the study did)"
                if len(kernels) > 1
                else "nothing chosen",
            }
            metrics.update(
                kernels=results,
                model_file=best["model_file"],
                selection=selection,
                final={
                    "train_acc": best["train_acc"],
                    "test_acc": best["test_acc"],
                    "kernel": primary,
                    "train_loss": None,
                    "test_loss": None,
                    "test_top5": None,
                    "best_epoch": None,
                    "selected_by": "the only kernel fitted"
                    if len(kernels) == 1
                    else "cross-validation accuracy on train"
                    if searching
                    else "test accuracy (kernel comparison, as the study did)",
                    "selected_on": selected_on,
                },
            )
            metrics = runs.finish(target, metrics, started)
    return run_dir, metrics
