"""finetune training throughput on this CPU: resnet50 (random weights, 196 classes), 224 px, batch 32.

Four combinations, ``--unfreeze layer4`` vs ``all`` and bf16 autocast vs fp32, each timed on
in-memory random tensors and through the real data loader (the real subset's train images):
warm-up steps, then a fixed number of timed training steps, all through finetune's own code:
``parse_unfreeze``, ``classifier_model``, ``set_trainable``, the model in channels_last, the
optimizer over the trainable parameters only (head + unfrozen body, as ``finetune`` groups them),
and ``cars_tl.stages.finetune.train_epoch`` itself (``train_mode``, autocast, channels_last inputs,
cross-entropy, backward, step) fed with those batches. Reported: img/s per combination, and the
ratios layer4/all and bf16/fp32. Also the in-memory figures again with glibc malloc tuned
(``cars_tl.core.runtime.tune_malloc``, as the CLI does), which the bench_extract figures showed to matter.

Every combination runs in a fresh process (``_common.isolated``); a timing is kept only when other
processes used < 8% of the CPU meanwhile.

Run: ``.venv/bin/python benchmarks/bench_finetune.py [--steps N] [--warmup N]``;
writes benchmarks/results/bench_finetune.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    banner,
    best_of,
    isolated,
    machine_info,
    measured,
    page_faults,
    real_subset,
    save,
)

from cars_tl.core import runtime
from cars_tl.data import manifest as manifests
from cars_tl.data import transforms
from cars_tl.data.dataset import CarsDataset
from cars_tl.data.loaders import default_workers, make_loader  # noqa: E402
from cars_tl.models import backbones  # noqa: E402
from cars_tl.stages import finetune, presets

NAME = "bench_finetune"
BACKBONE, WEIGHTS, CLASSES, BATCH = "resnet50", "random", 196, 32
COMBOS = [("layer4", "bf16"), ("layer4", "fp32"), ("all", "bf16"), ("all", "fp32")]


def child_train(data_dir: str | None, unfreeze: str, precision: str, warmup: int, steps: int) -> dict:
    """Build the fine-tune model as ``finetune`` does, then warm-up + timed steps of ``train_epoch``."""
    import inspect

    bb = backbones.build_backbone(BACKBONE, WEIGHTS)
    unfrozen = backbones.parse_unfreeze(unfreeze, bb)
    model = backbones.classifier_model(bb, CLASSES)
    if "everything" in inspect.signature(finetune.set_trainable).parameters:
        finetune.set_trainable(model, unfrozen, everything=unfreeze == "all")
    else:
        finetune.set_trainable(model, unfrozen)
    model.to("cpu", memory_format=torch.channels_last)
    config = dict(presets.FINETUNE["study"], epochs=1, freeze_bn_stats=False)
    opt = finetune.build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # finetune's scaler: a no-op except fp16

    if data_dir is None:
        g = torch.Generator().manual_seed(0)
        batch = (
            torch.randn(BATCH, 3, 224, 224, generator=g),
            torch.randint(0, CLASSES, (BATCH,), generator=g),
            torch.arange(BATCH),
            [],
        )
        warm_batches, timed_batches = [batch] * warmup, [batch] * steps
        source = "in-memory random tensors"
    else:
        manifest = manifests.load_manifest(Path(data_dir))
        train_set = CarsDataset(manifest, "train", transforms.train_transform(bb.transform, "none"), mark_bad=True)
        loader = make_loader(
            train_set, BATCH, default_workers(), "cpu", shuffle=True, generator=torch.Generator().manual_seed(0)
        )
        it = iter(loader)
        warm_batches, timed_batches = itertools.islice(it, warmup), itertools.islice(it, steps)
        source = f"real data loader (make_loader, workers {default_workers()}, train images, augment none)"

    def epoch(batches, n):
        return finetune.train_epoch(
            model, batches, opt, scheduler, scaler, config, "cpu", precision, 1, n, finetune.NULL
        )

    epoch(warm_batches, BATCH * warmup)
    faults = page_faults()
    out = measured(lambda: {"row": epoch(timed_batches, BATCH * steps)})
    out.pop("row")
    images = BATCH * steps
    trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return dict(
        out,
        images=images,
        images_per_second=images / out["seconds"],
        source=source,
        unfreeze=unfreeze,
        precision=precision,
        warmup_steps=warmup,
        timed_steps=steps,
        trainable_params=trainable,
        total_params=sum(p.numel() for p in model.parameters()),
        page_faults_per_image=round((page_faults() - faults) / images),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loader-warmup", type=int, default=1)
    parser.add_argument("--loader-steps", type=int, default=3)
    parser.add_argument("--no-malloc", action="store_true", help="skip the malloc-tuned runs")
    args = parser.parse_args()
    results = {
        "benchmark": NAME,
        "machine": machine_info(),
        "backbone": BACKBONE,
        "weights": WEIGHTS,
        "classes": CLASSES,
        "batch_size": BATCH,
        "image_size": 224,
        "auto_precision_here": runtime.resolve_precision("auto", "cpu"),
    }
    started = time.perf_counter()
    with real_subset() as (tmp, manifest):
        d = str(tmp / "data")
        for key, source_dir, warm, steps, malloc in (
            ("in_memory", None, args.warmup, args.steps, False),
            ("real_loader", d, args.loader_warmup, args.loader_steps, False),
            ("in_memory_malloc_tuned", None, 2, 3, True),
        ):
            if malloc and args.no_malloc:
                continue
            banner(key)
            rows = {}
            for unfreeze, precision in COMBOS:
                r = best_of(
                    lambda: isolated(child_train, source_dir, unfreeze, precision, warm, steps, malloc=malloc),
                    f"{key} unfreeze={unfreeze} {precision}",
                    runs=1,
                    max_tries=3,
                )
                rows[f"{unfreeze}/{precision}"] = r
                print(
                    f"  unfreeze {unfreeze:6s} {precision}: {r['images_per_second']:.2f} img/s "
                    f"({r['trainable_params'] / 1e6:.1f}M trainable)",
                    flush=True,
                )
            ips = {k: v["images_per_second"] for k, v in rows.items()}
            results[key] = {
                "combinations": rows,
                "images_per_second": {k: round(v, 3) for k, v in ips.items()},
                "ratio_layer4_over_all": {p: round(ips[f"layer4/{p}"] / ips[f"all/{p}"], 3) for p in ("bf16", "fp32")},
                "ratio_bf16_over_fp32": {u: round(ips[f"{u}/bf16"] / ips[f"{u}/fp32"], 3) for u in ("layer4", "all")},
            }
    if "in_memory_malloc_tuned" in results:
        a, b = results["in_memory"]["images_per_second"], results["in_memory_malloc_tuned"]["images_per_second"]
        results["malloc_tuning_speedup"] = {k: round(b[k] / a[k], 3) for k in a}
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    banner("summary (img/s, training steps of resnet50 at 224 px, batch 32)")
    for key in ("in_memory", "real_loader", "in_memory_malloc_tuned"):
        if key in results:
            r = results[key]
            print(
                f"{key:24s} "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["images_per_second"].items())
                + f" | layer4/all {r['ratio_layer4_over_all']} | bf16/fp32 {r['ratio_bf16_over_fp32']}"
            )
    save(NAME, results)


if __name__ == "__main__":
    main()
