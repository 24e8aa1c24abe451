"""finetune --preset study vs --preset tuned, short schedule, real pretrained backbone, real subset (CPU).

Model D's recipe on a backbone available offline: timm/efficientnet_lite0 with the shared ImageNet
weights, its last stages unfrozen (the analogue of resnet50's layer4), the head initialised from a
train-head run on features of the preset's image shape (tuned: squash 288 px, as finetune --preset
tuned trains since issue 28; earlier results were at the weights' 224 px crop for both). Saves benchmarks/results/bench_finetune_presets.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MINI = SHARED / "data" / "stanford_cars_mini"
WEIGHTS = SHARED / "models" / "efficientnet_lite0_timm.pth"
EPOCHS = int(os.environ.get("EPOCHS", "3"))
UNFREEZE = "blocks.5,blocks.6,conv_head,bn2"


def main() -> None:
    from cars_tl.core import runtime
    from cars_tl.core.options import ImageOptions
    from cars_tl.sources.prepare import prepare_dataset
    from cars_tl.stages import presets
    from cars_tl.stages.extract import extract_features
    from cars_tl.stages.finetune import finetune
    from cars_tl.stages.train_head import train_head

    if not (MINI.is_dir() and WEIGHTS.is_file()):
        sys.exit(f"needs {MINI} and {WEIGHTS}")
    work = Path(tempfile.mkdtemp(prefix="bench-ft-"))
    prepare_dataset(work / "data", str(MINI))
    backbone, weights = "timm/efficientnet_lite0", str(WEIGHTS)
    results = {
        "backbone": backbone,
        "unfreeze": UNFREEZE,
        "epochs": EPOCHS,
        "machine": {"cpu": runtime.device_name("cpu"), "cores": os.cpu_count(), "versions": runtime.versions()},
        "date": time.strftime("%Y-%m-%d"),
        "presets": {},
    }
    for preset in ("study", "tuned"):
        # The head must see the pixels the fine-tune trains on.
        image = presets.image_options("finetune", preset, ImageOptions())
        feats = extract_features(
            work / "data", backbone=backbone, weights=weights, out=work / f"f-{preset}.h5", image=image
        ).path
        head_dir, head = train_head(feats, preset="study", out=work / "runs" / f"B-{preset}")
        start = time.perf_counter()
        _, m = finetune(
            work / "data",
            backbone=backbone,
            weights=weights,
            unfreeze=UNFREEZE,
            init_head=head_dir,
            preset=preset,
            epochs=EPOCHS,
            out=work / "runs" / preset,
        )
        results["presets"][preset] = {
            "seconds": round(time.perf_counter() - start, 1),
            "head_test_acc": head["final"]["test_acc"],
            "final": m["final"],
            "params": m["params"],
            "history": [
                {k: h.get(k) for k in ("epoch", "train_acc", "test_acc", "val_acc", "test_loss", "images_per_second")}
                for h in m["history"]
            ],
        }
        print(preset, results["presets"][preset]["seconds"], "s", m["final"], flush=True)
    out = REPO / "benchmarks" / "results" / "bench_finetune_presets.json"
    out.write_text(json.dumps(results, indent=2))
    print(
        json.dumps({k: (v["head_test_acc"], v["final"]["test_acc"]) for k, v in results["presets"].items()}),
        "(head, finetune)",
    )


if __name__ == "__main__":
    main()
