"""What live TensorBoard logging costs per epoch (train-head, finetune), and what a feature map costs.

1. train-head: the study preset's minibatch loop (Adam, batch 32) on synthetic features of the full
   train shape (8,144 x 2,048, 196 classes), with and without the on_epoch hook, alternating, 3 epochs each.
2. finetune: a demo fine-tune (generated images, resnet18 at 64 px) with --tensorboard; the hook's
   cost is timed directly (the same rows logged again) against the epochs' own seconds.
3. The feature map (PCA 50 -> t-SNE -> make-level kNN in both spaces) of 8,041 x 2,048 synthetic
   features (the test split's shape, 196 classes in 49 makes).

Run: nice -n 10 .venv/bin/python benchmarks/bench_tracking.py   (writes results/bench_tracking.json)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def bench_train_head(tmp: Path, reps: int = 3) -> dict:
    import torch

    from cars_tl.core.progress import NULL
    from cars_tl.core.tensorboard import EpochLog
    from cars_tl.stages.train_head import HeadData, fit_head, resolve_preset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8144, 2048, generator=g), torch.randint(0, 196, (8144,), generator=g)
    xt, yt = torch.randn(8041, 2048, generator=g), torch.randint(0, 196, (8041,), generator=g)
    config = resolve_preset("study", epochs=1)
    plain, logged = [], []
    for rep in range(reps):
        for with_tb in (False, True):
            live = EpochLog(tmp / "tb" if with_tb else None, f"head-{rep}")
            start = time.perf_counter()
            fit_head(
                HeadData(x, y), {"test": HeadData(xt, yt)}, config, 0.0, 196, 0, NULL, "bench", on_epoch=live.on_epoch
            )
            live.on_end(config, {"test_acc": 1.0})
            (logged if with_tb else plain).append(time.perf_counter() - start)
    return {
        "epoch_s_plain": plain,
        "epoch_s_tensorboard": logged,
        "overhead_pct_median": round(100 * (np.median(logged) / np.median(plain) - 1), 2),
    }


def bench_hook(tmp: Path, rows: list[dict], repeats: int = 20) -> float:
    """Seconds one on_epoch call takes (mean over ``repeats`` calls with real rows)."""
    from cars_tl.core.tensorboard import EpochLog

    live = EpochLog(tmp / "hook", "run")
    start = time.perf_counter()
    for i in range(repeats):
        live.on_epoch({**rows[i % len(rows)], "epoch": 1000 + i, "lr": [1e-3, 1e-4]})
    live.close()  # flush included
    return (time.perf_counter() - start) / repeats


def bench_finetune(tmp: Path) -> dict:
    from cars_tl.core.options import DeviceOptions, ImageOptions
    from cars_tl.data import devkit
    from cars_tl.data import manifest as manifests
    from cars_tl.sources.demo import generate_demo
    from cars_tl.stages.finetune import finetune

    root = tmp / "demo"
    generate_demo(root / devkit.STANFORD_DIR)
    manifests.build_manifest(root)
    _, metrics = finetune(
        root,
        backbone="resnet18",
        weights="random",
        image=ImageOptions(image_size=64),
        compute=DeviceOptions(precision="fp32", workers=0, batch_size=16),
        unfreeze="layer4",
        epochs=2,
        out=tmp / "ft",
        tensorboard=tmp / "tb",
    )
    epochs = [r for r in metrics["history"] if r["epoch"] > 0]
    hook = bench_hook(tmp, epochs)
    epoch_s = float(np.median([r["seconds"] for r in epochs]))
    return {
        "epoch_s": epoch_s,
        "on_epoch_s": hook,
        "overhead_pct": round(100 * hook / epoch_s, 3),
        "demo_train_images": len(manifests.load_manifest(root).split("train")),
    }


def bench_feature_map() -> dict:
    from cars_tl.models.feature_map import compute

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 196, 8041)
    makes = labels // 4  # 49 makes of 4 classes
    centres = rng.normal(size=(196, 2048)).astype(np.float32)
    x = centres[labels] * 0.5 + rng.normal(size=(8041, 2048)).astype(np.float32)
    start = time.perf_counter()
    result = compute(x, makes, seed=0)
    return {
        "rows": 8041,
        "dims": 2048,
        "seconds": round(time.perf_counter() - start, 1),
        "knn_map": round(result["knn_map"], 2),
        "knn_full": round(result["knn_full"], 2),
        "cores": os.cpu_count(),
    }


def main() -> None:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out["train_head"] = bench_train_head(tmp)
        print("train-head", out["train_head"], flush=True)
        out["train_head"]["on_epoch_s"] = bench_hook(
            tmp,
            [
                {
                    "epoch": 1,
                    "train_loss": 1.0,
                    "train_acc": 2.0,
                    "test_loss": 1.0,
                    "test_acc": 2.0,
                    "test_top5": 3.0,
                    "images_per_second": 9.0,
                }
            ],
        )
        out["finetune"] = bench_finetune(tmp)
        print("finetune", out["finetune"], flush=True)
    out["feature_map"] = bench_feature_map()
    print("feature map", out["feature_map"], flush=True)
    (REPO / "benchmarks" / "results" / "bench_tracking.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
