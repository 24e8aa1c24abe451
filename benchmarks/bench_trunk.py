"""Trunk cache (issue 21): a study-preset model-D epoch with the cache vs on the images, real subset.

For ResNet50 (random weights; ``--unfreeze layer4``, 224 px) and timm/efficientnet_lite0 (the real
shared weights; ``--unfreeze blocks.6``): one epoch each way (training + the test evaluation that
follows it), the build time of the cache separately, and the break-even epoch count
(build / time saved per epoch). Then the cost in accuracy of 16-bit storage for fp32 compute:
whole study-preset runs (15 epochs) of Lite0 on the cache with fp32, fp16 and bf16 storage (the
fp32-storage run equals the image path: tests/stages/test_trunk_cache.py).

    nice -n 10 .venv/bin/python benchmarks/bench_trunk.py [--skip-accuracy] [--epochs-accuracy N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LITE0, LITE0_WEIGHTS, banner, machine_info, real_subset, require_shared, save, target  # noqa: E402


def _run(data_dir: Path, tmp: Path, name: str, **options) -> dict:
    from cars_tl.core.options import DeviceOptions
    from cars_tl.stages import finetune as ft

    device = {k: options.pop(k) for k in ("precision", "workers") if k in options}  # DeviceOptions' fields
    options["compute"] = DeviceOptions(batch_size=None, **device)

    evals: list[float] = []
    original = ft.evaluate

    def timed_evaluate(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        evals.append(time.perf_counter() - t0)
        return out

    ft.evaluate = timed_evaluate
    try:
        t0 = time.perf_counter()
        _, metrics = ft.finetune(data_dir, out=tmp / name, artifacts=tmp, force=True, **options)
        wall = time.perf_counter() - t0
    finally:
        ft.evaluate = original
    cache = metrics.get("trunk_cache") or {}
    train = [r["seconds"] for r in metrics["history"] if r["epoch"] >= 1]
    epoch = train[-1] + evals[-1]
    return {
        "wall_s": round(wall, 2),
        "epoch_s": round(epoch, 2),
        "train_s": train[-1],
        "eval_s": round(evals[-1], 2),
        "build_s": cache.get("seconds") if cache.get("action") in ("built", "resumed") else 0.0,
        "trunk_cache": cache,
        "final": metrics["final"],
        "history": metrics["history"],
    }


def speed(data_dir: Path, tmp: Path, backbone: str, weights: str, unfreeze: str) -> dict:
    common = dict(backbone=backbone, weights=weights, unfreeze=unfreeze, preset="study", epochs=1, workers=2)
    banner(f"{backbone} --unfreeze {unfreeze}: images")
    images = _run(data_dir, tmp, f"img-{unfreeze}", trunk_cache="off", **common)
    print(images["epoch_s"], "s/epoch")
    banner(f"{backbone} --unfreeze {unfreeze}: trunk cache")
    cached = _run(data_dir, tmp, f"cache-{unfreeze}", trunk_cache="auto", **common)
    print(cached["epoch_s"], "s/epoch; build", cached["build_s"], "s", cached["trunk_cache"])
    ratio = images["epoch_s"] / cached["epoch_s"]
    saved = images["epoch_s"] - cached["epoch_s"]
    return {
        "images": images,
        "cached": cached,
        "speedup": round(ratio, 2),
        "break_even_epochs": round(cached["build_s"] / saved, 2) if saved > 0 else None,
        "bytes_per_image": cached["trunk_cache"].get("bytes_per_image"),
    }


def accuracy(data_dir: Path, tmp: Path, epochs: int) -> dict:
    out = {}
    for storage in ("fp32", "fp16", "bf16"):
        banner(f"lite0 blocks.6 study preset, fp32 compute, {storage} storage, {epochs} epochs")
        r = _run(
            data_dir,
            tmp,
            f"acc-{storage}",
            backbone=LITE0,
            weights=str(LITE0_WEIGHTS),
            unfreeze="blocks.6",
            preset="study",
            epochs=epochs,
            precision="fp32",
            trunk_cache="auto",
            trunk_dtype=storage,
            workers=2,
        )
        out[storage] = {
            "test_acc": r["final"]["test_acc"],
            "best_epoch": r["final"]["best_epoch"],
            "last_test_acc": r["history"][-1]["test_acc"],
            "wall_s": r["wall_s"],
        }
        print(out[storage])
    for s in ("fp16", "bf16"):
        out[f"{s}_minus_fp32_points"] = round(out[s]["test_acc"] - out["fp32"]["test_acc"], 4)
        out[f"{s}_last_epoch_minus_fp32_points"] = round(out[s]["last_test_acc"] - out["fp32"]["last_test_acc"], 4)
    return out


def reading(tmp: Path, rows: int = 1000, batch: int = 32) -> dict:
    """Random 32-row batches of ResNet50 ``layer3`` maps (1024x14x14, fp16: 392 KiB a row) in an
    epoch's random order: from memory, from a memory map of the contiguous rows (page cache warm, as
    after the verification pass), and what the top (``layer4`` + head, forward and backward) costs
    per batch, for scale."""
    import numpy as np
    import torch
    import torchvision

    from cars_tl.artifacts import trunks

    banner("reading: memory vs memory map, 392 KiB rows")
    data = np.random.default_rng(0).standard_normal((rows, 1024, 14, 14), dtype=np.float32).astype(np.float16)
    path = tmp / "maps.npy"
    np.save(path, data)
    mapped = np.load(path, mmap_mode="r")
    np.asarray(mapped).sum(dtype=np.float64)  # warm, as the verification pass leaves it
    order = np.random.default_rng(1).permutation(rows)
    out = {}
    for name, store in (("memory", data), ("mmap", mapped)):
        t0 = time.perf_counter()
        for start in range(0, rows, batch):
            trunks.to_float(np.ascontiguousarray(store[order[start : start + batch]]), "fp16")
        out[f"{name}_ms_per_batch"] = round((time.perf_counter() - t0) * 1000 / -(-rows // batch), 2)
    net = torchvision.models.resnet50()
    top = torch.nn.Sequential(net.layer4, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2048, 196))
    x = torch.randn(batch, 1024, 14, 14)
    top(x).sum().backward()
    t0 = time.perf_counter()
    for _ in range(3):
        top(x).sum().backward()
    out["top_fwd_bwd_ms_per_batch_fp32"] = round((time.perf_counter() - t0) * 1000 / 3, 2)
    path.unlink()
    print(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--reading", action="store_true", help="only the memory vs memory-map read measurement")
    parser.add_argument("--epochs-accuracy", type=int, default=15)
    parser.add_argument("--name", default="bench_trunk", help="results/<name>.json (to run the two parts side by side)")
    parser.add_argument("--only", choices=("lite0", "resnet50"), help="the speed part for one backbone only")
    args = parser.parse_args()
    require_shared(LITE0_WEIGHTS)
    result = {"machine": machine_info()}
    if args.reading:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            result["reading"] = reading(Path(tmp))
        save(args.name, result)
        return
    with real_subset() as (tmp, _):
        data_dir = tmp / "data"
        if not args.skip_speed and args.only in (None, "lite0"):
            result["lite0_blocks6"] = lite = speed(data_dir, tmp, LITE0, str(LITE0_WEIGHTS), "blocks.6")
            lite["target"] = target(lite["speedup"], 5.0)
        if not args.skip_speed and args.only in (None, "resnet50"):
            result["resnet50_layer4"] = r50 = speed(data_dir, tmp, "resnet50", "random", "layer4")
            r50["target"] = target(r50["speedup"], 3.0)
        if not args.skip_accuracy:
            result["storage_accuracy"] = accuracy(data_dir, tmp, args.epochs_accuracy)
    save(args.name, result)


if __name__ == "__main__":
    main()
