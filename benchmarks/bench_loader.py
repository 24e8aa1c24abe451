"""Loader batches for a GPU: uint8 (normalized on the device) against float32 (normalized in workers).

On CUDA, finetune and extract-features now send uint8 batches to the device and normalize them there
(:func:`cars_tl.data.loaders.batch_to_device`); before, DataLoader workers built normalized float32
batches. What that changes on the host side is measured here on the CPU, on the real 20-class subset:

* the DataLoader alone (``--workers`` worker processes, collate, the batches handed to the main
  process through shared memory), img/s, for the evaluation transform and for the standard training
  augmentation, each as float32 and as uint8 batches, at the resnet50 weights' preprocessing (224 px);
* the bytes each batch carries to the device (a quarter with uint8).

No GPU here: the device side (normalizing a uint8 batch on the GPU is a few microseconds of a
bandwidth-bound kernel) is not measured; ``benchmarks/gpu_check.sh`` runs the CUDA path where a GPU
exists. Run: ``.venv/bin/python benchmarks/bench_loader.py``; writes benchmarks/results/bench_loader.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import banner, best_of, isolated, machine_info, measured, real_subset, save  # noqa: E402

NAME = "bench_loader"
WORKERS = 2
BATCH = 32
SPEC = {
    "resize": 232,
    "crop": 224,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
    "pipeline": "resize-crop-in-one-v1",
}  # resnet50 IMAGENET1K_V2


def _pass(data_dir: str, augment: str, output: str, epochs: int = 2) -> dict:
    from cars_tl.data import loaders, transforms
    from cars_tl.data import manifest as manifests
    from cars_tl.data.dataset import CarsDataset

    manifest = manifests.load_manifest(Path(data_dir))
    dataset = CarsDataset(manifest, "train", transforms.train_transform(SPEC, augment, output), mark_bad=True)
    loader = loaders.make_loader(
        loaders.SeededAugmentation(dataset, 0), BATCH, WORKERS, "cpu", sampler=loaders.EpochSampler(len(dataset), 0)
    )
    next(iter(loader))  # workers started (persistent): the timed epochs measure steady state

    def epochs_of_batches():
        images, batch_bytes = 0, 0
        for epoch in range(1, epochs + 1):
            loader.sampler.set_epoch(epoch)
            for batch, *_ in loader:
                images += len(batch)
                batch_bytes = max(batch_bytes, batch.numel() * batch.element_size())
        return {"images": images, "batch_bytes": batch_bytes, "dtype": str(batch.dtype)}

    result = measured(epochs_of_batches)
    return dict(result, images_per_second=result["images"] / result["seconds"])


def main() -> None:
    info = machine_info()
    results = {}
    with real_subset() as (tmp, manifest):
        for augment in ("none", "standard"):
            for output in ("float", "uint8"):
                label = f"{augment} augmentation, {output} batches"
                banner(label)
                r = best_of(lambda: isolated(_pass, str(tmp / "data"), augment, output), label, runs=2, max_tries=3)
                print(
                    f"  {r['images_per_second']:.1f} img/s, {r['batch_bytes'] / 2**20:.1f} MiB per batch of {BATCH} ({r['dtype']})"
                )
                results[f"{augment}-{output}"] = r
    summary = {
        augment: {
            "uint8_over_float_throughput": round(
                results[f"{augment}-uint8"]["images_per_second"] / results[f"{augment}-float"]["images_per_second"], 3
            ),
            "float_over_uint8_bytes": round(
                results[f"{augment}-float"]["batch_bytes"] / results[f"{augment}-uint8"]["batch_bytes"], 2
            ),
        }
        for augment in ("none", "standard")
    }
    banner("summary (same machine, same run)")
    for augment, s in summary.items():
        print(
            f"  {augment:8s} augmentation: uint8 / float32 loader throughput {s['uint8_over_float_throughput']:.2f}x, "
            f"{s['float_over_uint8_bytes']:.0f}x fewer bytes to the device per batch"
        )
    save(NAME, {"machine": info, "workers": WORKERS, "batch_size": BATCH, "results": results, "summary": summary})


if __name__ == "__main__":
    main()
