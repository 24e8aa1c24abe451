"""finetune --tta none vs flip (issue 23): does averaging the logits of each image and its mirror help a
fine-tuned model on the validation split? Real subset, shared efficientnet_lite0, tuned preset, squash 288.

Both runs train identically (same seed; --tta changes evaluation only): the difference in each
epoch's validation and test accuracy is the flip averaging's alone. No --init-head (a head trained
on all of train would have seen the validation images). CPU, short schedule (EPOCHS, default 3).
The tuned finetune preset turns flip on only if the validation accuracy says so
(cars_tl/stages/finetune.py PRESET_TTA). Saves benchmarks/results/bench_finetune_tta.json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    LITE0,
    LITE0_WEIGHTS,
    banner,
    machine_info,
    real_subset,
    require_shared,
    save,
)

NAME = "bench_finetune_tta"
EPOCHS = int(os.environ.get("EPOCHS", "3"))
UNFREEZE = "blocks.6,conv_head,bn2"


def main() -> None:
    import torch

    from cars_tl.core.options import DeviceOptions, ImageOptions
    from cars_tl.stages.finetune import finetune

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    require_shared(LITE0_WEIGHTS)
    results = {
        "benchmark": NAME,
        "machine": machine_info(),
        "backbone": LITE0,
        "unfreeze": UNFREEZE,
        "epochs": EPOCHS,
        "runs": {},
    }
    with real_subset() as (tmp, _):
        for tta in ("none", "flip"):
            banner(f"finetune --preset tuned --tta {tta}")
            started = time.perf_counter()
            _, m = finetune(
                tmp / "data",
                backbone=LITE0,
                weights=str(LITE0_WEIGHTS),
                unfreeze=UNFREEZE,
                init_head=None,
                preset="tuned",
                epochs=EPOCHS,
                image=ImageOptions(image_size=288, resize="squash"),
                compute=DeviceOptions(precision="fp32", workers=1, batch_size=None),
                tta=tta,
                out=tmp / "runs" / tta,
            )
            history = [{k: h.get(k) for k in ("epoch", "val_acc", "test_acc", "val_loss")} for h in m["history"]]
            results["runs"][tta] = {
                "seconds": round(time.perf_counter() - started, 1),
                "final": m["final"],
                "history": history,
            }
            print(tta, results["runs"][tta]["seconds"], "s", history, flush=True)
    none, flip = (results["runs"][t]["final"] for t in ("none", "flip"))
    results["summary"] = {
        "val_none": none["val_acc"],
        "val_flip": flip["val_acc"],
        "test_none": none["test_acc"],
        "test_flip": flip["test_acc"],
        "flip_better_on_val": (flip["val_acc"] or 0) > (none["val_acc"] or 0),
    }
    print(results["summary"])
    save(NAME, results)


if __name__ == "__main__":
    main()
