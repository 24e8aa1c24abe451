"""fit-svm: the fast path (``method="precomputed"``) vs a plain ``sklearn.svm.SVC`` (``method="plain"``).

Same kernel and settings on both sides (``cars_tl.stages.fit_svm.fit_model``: l2 scaling, C=1, gamma
"scale", degree 3, coef0 0), kernels poly (the default) and rbf. Timed: fit + predict of the
test set; checked: the two predict the same class on >= 99.9% of the test rows.

(a) the real subset's efficientnet_lite0 features (shared ImageNet weights; extracted once);
(b) a synthetic set shaped like the full dataset's resnet50 features: 8,144 x 2,048 float32,
    196 classes, non-negative (ReLU-like: a shared positive component plus class means plus
    noise, clipped at 0), with a 2,000-row synthetic test set from the same classes.

Every fit runs in a fresh process after a warm-up fit on a small slice (imports, BLAS threads);
a timing is kept only when other processes used < 8% of the CPU meanwhile.

Run: ``.venv/bin/python benchmarks/bench_svm.py [--n 8144] [--n-test 2000]``;
writes benchmarks/results/bench_svm.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    LITE0,
    LITE0_WEIGHTS,
    banner,
    best_of,
    isolated,
    machine_info,
    measured,
    real_subset,
    require_shared,
    save,
    target,
)

from cars_tl.artifacts import features
from cars_tl.models.svm import model as svm
from cars_tl.stages import extract  # noqa: E402

NAME = "bench_svm"
KERNELS = ("poly", "rbf")
SETTINGS = dict(C=1.0, degree=3, gamma="scale", coef0=0.0, scale="l2")


def synthetic(n: int, d: int = 2048, classes: int = 196, seed: int = 0, tau: float = 0.15, sigma: float = 1.0):
    """ReLU-like features: a shared positive component + class means (spread ``tau``) + noise, clipped at 0."""
    rng = np.random.default_rng(1234)  # the classes: the same for train and test
    common = np.abs(rng.normal(0, 1, d)).astype(np.float32)
    means = (common + tau * rng.normal(0, 1, (classes, d))).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % classes)
    x = np.maximum(means[y] + sigma * rng.normal(0, 1, (n, d)).astype(np.float32), 0)
    return x.astype(np.float32), y.astype(np.int64)


def _fit_predict(x, y, xt, kernel, method, repeats: int = 1):
    """Fit + predict, ``repeats`` times in a row (small sets: a steadier figure); times per repeat."""
    times = {"fit_seconds": 0.0, "predict_seconds": 0.0, "repeats": repeats}

    def run():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model = svm.fit_model(
                x,
                y,
                kernel,
                SETTINGS["C"],
                SETTINGS["degree"],
                svm.parse_gamma(SETTINGS["gamma"]),
                SETTINGS["coef0"],
                SETTINGS["scale"],
                method,
            )
            times["fit_seconds"] += (time.perf_counter() - t0) / repeats
            t1 = time.perf_counter()
            times["pred"] = model.predict(xt)
            times["predict_seconds"] += (time.perf_counter() - t1) / repeats
            times["support_vectors"] = int(len(model.svc.support_))

    # warm-up on a slice: imports, BLAS/OpenMP threads, libsvm
    k = min(len(x), 400)
    svm.fit_model(x[:k], y[:k], kernel, 1.0, 3, "scale", 0.0, "l2", method).predict(xt[:50])
    out = measured(run)
    out["seconds"] /= repeats
    return dict(out, **times)


def child_real(features_path: str, kernel: str, method: str) -> dict:
    cache = features.load(Path(features_path), ("train", "test"))
    tr, te = cache.split("train"), cache.split("test")
    out = _fit_predict(tr.features, tr.labels, te.features, kernel, method, repeats=10)
    out["test_acc"] = round(100 * float((out["pred"] == te.labels).mean()), 3)
    return dict(out, train_shape=list(tr.features.shape), test_rows=int(len(te.labels)))


def child_synthetic(n: int, n_test: int, kernel: str, method: str) -> dict:
    x, y = synthetic(n, seed=0)
    xt, yt = synthetic(n_test, seed=1)
    out = _fit_predict(x, y, xt, kernel, method)
    out["test_acc"] = round(100 * float((out["pred"] == yt).mean()), 3)
    return dict(out, train_shape=list(x.shape), test_rows=int(n_test))


def compare(label: str, call, runs_fast: int, runs_plain: int) -> dict:
    rows = {}
    for method, runs in (("precomputed", runs_fast), ("plain", runs_plain)):
        r = best_of(lambda: call(method), f"{label} {method}", runs=runs, max_tries=runs + 1)
        rows[method] = r
    fast, plain = rows["precomputed"], rows["plain"]
    agreement = float((fast.pop("pred") == plain.pop("pred")).mean())
    speedup = plain["seconds"] / fast["seconds"]
    out = {
        "precomputed": fast,
        "plain": plain,
        "speedup_fit_plus_predict": target(speedup, 3.0),
        "speedup_fit": round(plain["fit_seconds"] / fast["fit_seconds"], 2),
        "speedup_predict": round(plain["predict_seconds"] / fast["predict_seconds"], 2),
        "prediction_agreement_pct": target(100 * agreement, 99.9),
    }
    print(
        f"{label}: plain {plain['seconds']:.2f}s (fit {plain['fit_seconds']:.2f} + predict {plain['predict_seconds']:.2f}), "
        f"fast {fast['seconds']:.2f}s (fit {fast['fit_seconds']:.2f} + predict {fast['predict_seconds']:.2f}) -> {speedup:.2f}x "
        f"(target >= 3); agreement {100 * agreement:.2f}% (target >= 99.9); test acc {fast['test_acc']}% / {plain['test_acc']}%",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8144, help="synthetic training rows (the full dataset: 8144)")
    parser.add_argument("--n-test", type=int, default=2000)
    args = parser.parse_args()
    require_shared(LITE0_WEIGHTS)
    results = {"benchmark": NAME, "machine": machine_info(), "settings": SETTINGS, "kernels": list(KERNELS)}
    started = time.perf_counter()
    with real_subset() as (tmp, manifest):
        banner("(a) real subset: efficientnet_lite0 features")
        path = tmp / "lite0.h5"
        r = extract.extract_features(tmp / "data", backbone=LITE0, weights=str(LITE0_WEIGHTS), out=path)
        print(f"  features extracted: {r.counts}", flush=True)
        results["real"] = {
            k: compare(f"real {k}", lambda m, k=k: isolated(child_real, str(path), k, m), 3, 3) for k in KERNELS
        }

    banner(f"(b) synthetic: {args.n} x 2048 float32, 196 classes, {args.n_test} test rows")
    results["synthetic"] = {
        "train_rows": args.n,
        "test_rows": args.n_test,
        "features": 2048,
        "classes": 196,
        "reduced_from_8144": args.n != 8144,
        "generator": "relu(|N(0,1)| shared + 0.15 N(0,1) class mean + N(0,1) noise), seeded",
    }
    for k in KERNELS:
        results["synthetic"][k] = compare(
            f"synthetic {k}", lambda m, k=k: isolated(child_synthetic, args.n, args.n_test, k, m), 2, 1
        )
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    banner("summary")
    for part in ("real", "synthetic"):
        for k in KERNELS:
            c = results[part][k]
            print(
                f"{part:9s} {k:4s}: speedup {c['speedup_fit_plus_predict']['value']:.2f}x (>= 3: {c['speedup_fit_plus_predict']['met']}), "
                f"agreement {c['prediction_agreement_pct']['value']:.2f}% (>= 99.9: {c['prediction_agreement_pct']['met']})"
            )
    save(NAME, results)


if __name__ == "__main__":
    main()
