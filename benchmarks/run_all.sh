#!/usr/bin/env bash
# Run every benchmark in order; each prints its figures and writes benchmarks/results/<name>.json.
# Usage (from anywhere): benchmarks/run_all.sh [python]   (default: the repository's .venv/bin/python)
# Needs ../shared/data/stanford_cars_mini and ../shared/models/efficientnet_lite0_timm.pth next to the
# repository. BENCH_NICE=0 leaves the scheduling priority alone (default: -10, see _common.claim_cpu).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${1:-$repo/.venv/bin/python}"
mkdir -p "$here/results"
start=$(date +%s)
for name in bench_extract bench_loader bench_train_head bench_svm bench_svm_search bench_accuracy bench_finetune bench_knn; do
    echo
    echo "################ $name ################"
    t0=$(date +%s)
    "$python" "$here/$name.py" 2>&1 | tee "$here/results/$name.log"
    echo "[$name: $(( $(date +%s) - t0 ))s]"
done
echo
echo "all benchmarks done in $(( $(date +%s) - start ))s; results in $here/results/"
