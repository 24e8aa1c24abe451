#!/usr/bin/env bash
# One-command check of the CUDA path, for a machine with a GPU (under 5 minutes on one modern GPU).
#   benchmarks/gpu_check.sh [python]      (default: the repository's .venv/bin/python)
# 1. the demo chain on CUDA (generated data, resnet50 with random weights, 64 px, 2 epochs);
# 2. extract-features and finetune on CUDA at 224 px over the real 20-class subset (../shared) when
#    present, else over the demo images, printing img/s: bf16 (auto) and fp32 (TF32 off);
# 3. the resume-with-other-worker-counts check on CUDA, on the images (--trunk-cache off: DataLoader
#    workers only decode images; same weights after a kill is not asserted on a GPU: cuDNN kernels need
#    not be bitwise deterministic; the metrics must be close).
# Everything, trunk caches included, goes to a temporary folder (under $OUT when set, kept there
# without its trunk caches; else removed at the end), which is also the working folder, so that
# defaults such as --artifacts artifacts land there: nothing in the repository changes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${1:-$repo/.venv/bin/python}"
case "$python" in */*) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;; esac
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
if [ -n "${OUT:-}" ]; then
    work="$(mktemp -d "$OUT/gpu_check.XXXXXX")"
    trap 'rm -rf "$work/artifacts/trunks" "$work/trunk.h5"' EXIT
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
cd "$work"
cars() { "$python" -m cars_tl "$@"; }
start=$(date +%s)
echo "== 1. demo chain on CUDA"
cars download --data-dir "$work/demo" --source demo
cars extract-features --data-dir "$work/demo" --backbone resnet50 --weights random --image-size 64 --device cuda --out "$work/demo.h5"
cars train-head --features "$work/demo.h5" --epochs 2 --out "$work/runs/B"
cars fit-svm --features "$work/demo.h5" --out "$work/runs/C"
cars finetune --data-dir "$work/demo" --backbone resnet50 --weights random --unfreeze all --epochs 2 --image-size 64 --device cuda --out "$work/runs/A"
cars finetune --data-dir "$work/demo" --backbone resnet50 --weights random --unfreeze layer4 --init-head "$work/runs/B" --epochs 2 --image-size 64 --device cuda --out "$work/runs/D"
cars predict "$work/demo/stanford_cars/cars_test/00001.jpg" --model "$work/runs/A" --model "$work/runs/B" --model "$work/runs/D" --top-k 3
cars report --artifacts "$work" --data-dir "$work/demo" --out "$work/report"
data="$work/demo"
if [ -d "$repo/../shared/data/stanford_cars_mini" ]; then
    data="$work/mini"
    cars download --data-dir "$data" --source "$repo/../shared/data/stanford_cars_mini"
fi
echo "== 2. throughput at 224 px on $data"
for precision in auto fp32; do
    cars extract-features --data-dir "$data" --backbone resnet50 --weights random --precision "$precision" --device cuda --batch-size 128 --out "$work/x-$precision.h5"
    cars finetune --data-dir "$data" --backbone resnet50 --weights random --unfreeze all --precision "$precision" --device cuda --epochs 2 --batch-size 64 --out "$work/runs/ft-$precision"
    "$python" - "$work/runs/ft-$precision/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"finetune {m['config']['precision']}: " + ", ".join(f"epoch {h['epoch']} {h['images_per_second']:.0f} img/s" for h in m["history"] if h["epoch"]))
PY
done
echo "== 3. resume with another worker count on CUDA, on the images"
cars finetune --data-dir "$data" --backbone resnet50 --weights random --unfreeze layer4 --device cuda --epochs 1 --workers 2 --trunk-cache off --out "$work/runs/resume"
cars finetune --data-dir "$data" --backbone resnet50 --weights random --unfreeze layer4 --device cuda --epochs 2 --workers 8 --trunk-cache off --resume --out "$work/runs/resume"
"$python" - "$work/runs/resume/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
assert not m["trunk_cache"]["used"] and m["resumed_from_epoch"] == 1 and m["status"] == "complete", m.get("trunk_cache")
print(f"resumed on the images from epoch 1 (workers 2, then 8): test acc {m['final']['test_acc']}")
PY
echo "== 4. model D on the trunk cache (built once, held in GPU memory) vs on the images, 224 px"
for cache in off "$work/trunk.h5"; do
    cars finetune --data-dir "$data" --backbone resnet50 --weights random --unfreeze layer4 --device cuda --epochs 2 --batch-size 64 \
        --trunk-cache "$cache" --out "$work/runs/D-cache-$(basename "$cache" .h5)"
done
"$python" - "$work/runs/D-cache-off/metrics.json" "$work/runs/D-cache-trunk/metrics.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
t = b["trunk_cache"]
assert t["used"] and t["read"] == "device", t
ea, eb = a["history"][-1], b["history"][-1]
print(f"D epoch: images {ea['seconds']:.2f} s, cache {eb['seconds']:.2f} s ({ea['seconds'] / eb['seconds']:.1f}x), build {t['seconds']:.1f} s; "
      f"test acc {ea['test_acc']} vs {eb['test_acc']}")
PY
echo "gpu_check done in $(( $(date +%s) - start ))s"
