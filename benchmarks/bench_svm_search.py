"""What ``fit-svm --C auto`` costs: the cross-validated search against one plain fit, on the real
subset and on a synthetic set shaped like the full dataset.

Per kernel (l2 scaling, gamma "scale", degree 3, coef0 0, as ``--C auto``), all in this process:

* **plain fit**: scikit-learn's own ``SVC`` at C=1 (``fit_model(..., method="plain")``), the
  reference the issue's target names;
* **fast fit**: our precomputed-kernel fit at C=1 (what ``fit-svm --C 1`` runs);
* **search**: ``svm_search.search(C="auto")`` as ``fit-svm`` runs it -- 8 values of C x 5 folds on
  one kernel matrix, each fold's walk stopped at the hard margin, folds scored by the
  matrix-product votes, fits in one thread per core;
* **search, 1 thread**: the same with ``n_jobs=1`` (what the threads add);
* **exhaustive**: every (fold, C) fitted and scored by libsvm, folds sliced with ``np.ix_``, one
  thread: the search as it was before the hard-margin stop (the same grid), and the check that the
  stop changes no CV accuracy.

(a) the real subset's efficientnet_lite0 features, crop 224 and squash 288 (422 training images, 20
    classes present); every figure the best of ``--repeats`` timings, each the mean of 5 calls;
(b) a synthetic set shaped like the full dataset's resnet50 features (``bench_svm.synthetic``:
    8,144 x 2,048, 196 classes, non-negative), one timing each (a plain fit is about a minute);
    the exhaustive search only for ``--exhaustive-kernels`` (5 minutes each).

Timings wait for a quiet machine and record other processes' CPU share (``_common.best_of``).

Target (issue 9): the search over >= 8 values of C costs <= 3x one plain fit, every kernel.

Run: ``.venv/bin/python benchmarks/bench_svm_search.py [--only real|synthetic] [--n 8144]``;
writes benchmarks/results/bench_svm_search.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    LITE0,
    LITE0_WEIGHTS,
    RESULTS,
    banner,
    best_of,
    machine_info,
    real_subset,
    require_shared,
    save,
    target,
)
from bench_svm import synthetic  # noqa: E402

from cars_tl.artifacts import features
from cars_tl.core import runtime
from cars_tl.core.options import ImageOptions
from cars_tl.models.svm import model as svm
from cars_tl.models.svm import search as svm_search
from cars_tl.stages import extract  # noqa: E402

NAME = "bench_svm_search"
CELLS = (("crop", 224), ("squash", 288))


def exhaustive(x, y, kernel: str, grid) -> list[float]:
    """Every (fold, C) point of ``grid`` fitted and scored by libsvm: the search before the hard-margin
    stop; the mean of the folds' accuracies, as the search scores them (cross_val_score's mean)."""
    from sklearn.svm import SVC

    z = svm.Scaler.fit("l2", x)(x)
    k = svm_search.kernel_from_gram(svm_search.gram_matrix(z, kernel), kernel, svm.gamma_value("scale", z), 3, 0.0)
    per_fold = []
    for fit, val in svm_search.stratified_folds(y, svm_search.DEFAULT_FOLDS, 0):
        k_fit, k_val = k[np.ix_(fit, fit)], k[np.ix_(val, fit)]
        per_fold.append(
            [
                100.0
                * np.count_nonzero(SVC(kernel="precomputed", C=C).fit(k_fit, y[fit]).predict(k_val) == y[val])
                / len(val)
                for C in grid
            ]
        )
    return [round(float(v), 4) for v in np.mean(per_fold, axis=0)]


def timed(fn, calls: int = 1):
    def run():
        t0 = time.perf_counter()
        for _ in range(calls):
            result = fn()
        return {"seconds": (time.perf_counter() - t0) / calls, "result": result}

    return run


def kernel_costs(x, y, kernel: str, repeats: int, calls: int, with_exhaustive: bool, label: str) -> dict:
    for method in svm.METHODS:  # warm-up on a slice: imports, BLAS threads, libsvm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 196 classes in 200 rows: sklearn asks if it is a regression
            svm.fit_model(x[:200], y[:200], kernel, 1.0, 3, "scale", 0.0, "l2", method)
    fit = lambda method: lambda: svm.fit_model(x, y, kernel, 1.0, 3, "scale", 0.0, "l2", method)  # noqa: E731
    search = lambda jobs: lambda: svm_search.search(x, y, kernel, "auto", "scale", 3, 0.0, "l2", n_jobs=jobs)  # noqa: E731
    runs = {
        "plain_fit": best_of(timed(fit("plain"), calls), f"{label} {kernel} plain fit", runs=repeats),
        "fast_fit": best_of(timed(fit("precomputed"), calls), f"{label} {kernel} fast fit", runs=repeats),
        "search": best_of(timed(search(None), calls), f"{label} {kernel} search", runs=repeats),
        "search_1_thread": best_of(timed(search(1), calls), f"{label} {kernel} search, 1 thread", runs=repeats),
    }
    if with_exhaustive:
        grid = runs["search"]["result"]["C_grid"]  # the search's own grid, extensions included
        runs["exhaustive"] = best_of(
            timed(lambda: exhaustive(x, y, kernel, grid), calls), f"{label} {kernel} exhaustive", runs=repeats
        )
    found = runs["search"]["result"]
    row = {name: round(r["seconds"], 4) for name, r in runs.items()}
    row.update(
        foreign_cpu_share={name: r["foreign_cpu_share"] for name, r in runs.items()},
        C=found["C"],
        cv_acc=found["cv_acc"][0],
        cv_fits=found["cv_fits"],
        cv_points=found["cv_points"],
        grid=len(found["C_grid"]),
        folds=svm_search.DEFAULT_FOLDS,
        search_over_plain=round(row["search"] / row["plain_fit"], 3),
        search_over_fast=round(row["search"] / row["fast_fit"], 3),
        search_1_thread_over_plain=round(row["search_1_thread"] / row["plain_fit"], 3),
    )
    if with_exhaustive:
        row["exhaustive_over_search"] = round(row["exhaustive"] / row["search"], 3)
        row["same_cv_acc_as_exhaustive"] = runs["exhaustive"]["result"] == row["cv_acc"]
    print(
        f"  {label} {kernel:7s}: plain {row['plain_fit']:.3f}s, fast {row['fast_fit']:.3f}s, search {row['search']:.3f}s "
        f"({row['search_over_plain']:.2f}x plain, {row['search_over_fast']:.1f}x fast; 1 thread {row['search_1_thread_over_plain']:.2f}x plain), "
        f"fits {row['cv_fits']}/{row['cv_points']}, C {row['C']:.3g}"
        + (
            f", exhaustive {row['exhaustive']:.3f}s = {row['exhaustive_over_search']:.2f}x search, same CV: {row['same_cv_acc_as_exhaustive']}"
            if with_exhaustive
            else ""
        ),
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", choices=("real", "synthetic"), help="measure one part; keep the other's figures from the last run"
    )
    parser.add_argument("--n", type=int, default=8144, help="synthetic training rows")
    parser.add_argument("--repeats", type=int, default=5, help="clean timings kept per figure on the real subset")
    parser.add_argument(
        "--kernels",
        default=",".join(svm.KERNELS),
        help="comma-separated kernels to measure (with --only, merged into the last run's)",
    )
    parser.add_argument(
        "--exhaustive-kernels",
        default="linear",
        help="comma-separated kernels for the (slow) exhaustive search at full shape",
    )
    args = parser.parse_args()
    require_shared(LITE0_WEIGHTS)
    kernels = [k for k in svm.KERNELS if k in args.kernels.split(",")]
    info = machine_info()
    results = {
        "benchmark": NAME,
        "machine": info,
        "grid": {"C": svm_search.C_GRID, "folds": svm_search.DEFAULT_FOLDS},
        "cores_used_by_search": min(runtime.usable_cores(), svm_search.DEFAULT_FOLDS),
        "real": {},
        "synthetic": {},
    }
    if args.only:
        previous = RESULTS / f"{NAME}.json"
        if previous.is_file():
            kept = json.loads(previous.read_text())
            results.update({part: kept.get(part, {}) for part in ("real", "synthetic")}, reruns=kept.get("reruns", []))
        results.setdefault("reruns", []).append({"part": args.only, "kernels": kernels, "machine": info})
    if args.only != "synthetic":
        with real_subset() as (tmp, _manifest):
            for mode, size in CELLS:
                key = f"{mode}-{size}"
                banner(f"(a) real subset, lite0 {key}")
                path = tmp / f"lite0-{key}.h5"
                extract.extract_features(
                    tmp / "data",
                    backbone=LITE0,
                    weights=str(LITE0_WEIGHTS),
                    image=ImageOptions(image_size=size, resize=mode),
                    out=path,
                )
                train = features.load(path, ("train",)).split("train")
                results["real"].setdefault(key, {}).update(
                    {k: kernel_costs(train.features, train.labels, k, args.repeats, 5, True, key) for k in kernels}
                )
    if args.only != "real":
        banner(f"(b) synthetic, {args.n} x 2048, 196 classes")
        x, y = synthetic(args.n)
        slow = set(args.exhaustive_kernels.split(",")) if args.exhaustive_kernels else set()
        results["synthetic"].update({k: kernel_costs(x, y, k, 1, 1, k in slow, "synthetic") for k in kernels})
    rows = [r for cell in results["real"].values() for r in cell.values()] + list(results["synthetic"].values())
    results["targets"] = {
        "worst_search_over_one_plain_fit": target(max(r["search_over_plain"] for r in rows), 3.0, "<="),
        "worst_search_over_one_fast_fit": {"value": max(r["search_over_fast"] for r in rows), "target": "(report)"},
        "stop_changes_no_cv_accuracy": {
            "value": all(r["same_cv_acc_as_exhaustive"] for r in rows if "exhaustive" in r),
            "target": True,
        },
    }
    banner("summary")
    for name, t in results["targets"].items():
        print(f"target {name}: {t}")
    save(NAME, results)


if __name__ == "__main__":
    main()
