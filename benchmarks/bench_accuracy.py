"""Accuracy on the real subset with the shared ImageNet-pretrained efficientnet_lite0.

20 classes present (422 train / 415 test real images; the label space stays the 196 classes of the
devkit). Features extracted once with ``extract_features`` (defaults), then, on that cache:

* ``train_head --preset study`` vs ``--preset tuned``: test accuracy, test loss, wall time;
* ``fit_svm`` with each kernel (linear, poly, rbf, sigmoid) at the default l2 scaling, plus poly
  with ``--scale standard``, to show the collapse the svm module documents (the kernel's
  off-diagonal values vanish next to its diagonal, so the SVM memorizes train).

These are measurements, not timings under a target: each stage runs once (deterministic seeds).

Run: ``.venv/bin/python benchmarks/bench_accuracy.py``; writes benchmarks/results/bench_accuracy.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LITE0, LITE0_WEIGHTS, banner, machine_info, real_subset, require_shared, save  # noqa: E402
from cars_tl import extract, heads, svm  # noqa: E402

NAME = "bench_accuracy"
SVM_RUNS = [(k, "l2") for k in svm.KERNELS] + [("poly", "standard")]


def main() -> None:
    require_shared(LITE0_WEIGHTS)
    results = {"benchmark": NAME, "machine": machine_info(), "backbone": LITE0, "weights": LITE0_WEIGHTS.name}
    started = time.perf_counter()
    with real_subset() as (tmp, manifest):
        results["dataset"] = {"counts": manifest.counts(), "classes_present": manifest.classes_present(),
                              "label_space": manifest.num_classes, "chance_pct": round(100 / manifest.classes_present(), 2)}
        banner("features")
        path = tmp / "lite0.h5"
        r = extract.extract_features(tmp / "data", LITE0, str(LITE0_WEIGHTS), out=path)
        results["features"] = {"counts": r.counts, "precision": r.precision, "seconds": round(r.seconds, 2),
                               "images_per_second": round(r.images_per_second, 1)}
        print(f"  {r.counts} in {r.seconds:.1f}s ({r.precision})", flush=True)

        banner("train-head: study vs tuned")
        results["train_head"] = {}
        for preset in ("study", "tuned"):
            t0 = time.perf_counter()
            _, m = heads.train_head(path, preset=preset, out=tmp / "runs" / f"head-{preset}", artifacts=tmp / "runs")
            seconds = time.perf_counter() - t0
            f = m["final"]
            row = {"test_acc": f["test_acc"], "test_loss": round(f["test_loss"], 4), "train_acc": f["train_acc"],
                   "train_loss": round(f["train_loss"], 4), "test_top5": f.get("test_top5"), "seconds": round(seconds, 3),
                   "config": {k: m["config"].get(k) for k in ("epochs", "optimizer", "lr", "batch_size", "weight_decay", "standardize")}}
            if "selection" in m:
                row["weight_decay_selection"] = m["selection"]
            results["train_head"][preset] = row
            print(f"  {preset:5s}: test acc {row['test_acc']:.2f}%, test loss {row['test_loss']:.3f}, {seconds:.2f}s", flush=True)

        banner("fit-svm: kernels")
        results["svm"] = {}
        for kernel, scale in SVM_RUNS:
            t0 = time.perf_counter()
            _, m = svm.fit_svm(path, kernel=kernel, scale=scale, out=tmp / "runs" / f"svm-{kernel}-{scale}", artifacts=tmp / "runs")
            seconds = time.perf_counter() - t0
            k = m["kernels"][kernel]
            row = {"kernel": kernel, "scale": scale, "test_acc": k["test_acc"], "train_acc": k["train_acc"],
                   "support_vectors": k["support_vectors"], "gamma_value": k["gamma_value"],
                   "fit_seconds": k["fit_seconds"], "predict_seconds": k["predict_seconds"], "seconds": round(seconds, 3)}
            results["svm"][f"{kernel}/{scale}"] = row
            print(f"  {kernel:7s} scale {scale:8s}: test acc {row['test_acc']:.2f}% (train {row['train_acc']:.1f}%), "
                  f"{row['support_vectors']} support vectors, {seconds:.2f}s", flush=True)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    banner("summary")
    for preset, row in results["train_head"].items():
        print(f"train-head {preset:5s}: test acc {row['test_acc']:.2f}%  test loss {row['test_loss']:.3f}  {row['seconds']:.2f}s")
    for key, row in results["svm"].items():
        print(f"fit-svm {key:16s}: test acc {row['test_acc']:.2f}%")
    save(NAME, results)


if __name__ == "__main__":
    main()
