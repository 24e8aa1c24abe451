"""Trunk cache (issue 21): the whole `make all` (study preset) with the trunk cache and without it.

The real 20-class subset, ResNet50 with random weights at a small image size (64 px by default),
study preset (15 epochs), one seed. Both runs share the imported data folder and nothing else (an
artifacts folder each). Every cars-tl command make runs goes through a timing shim, so the
result has each stage's seconds: D's with the cache (and build-trunk's) against D's on the images;
everything else is the same work both times and shows how much of `make all` D is.

    nice -n 10 .venv/bin/python benchmarks/bench_make_all.py [--image-size 64] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, banner, machine_info, real_subset, require_shared, save  # noqa: E402

SHIM = """#!{python}
import os, subprocess, sys, time
args = sys.argv[1:]
start = time.perf_counter()
code = subprocess.call([{cars!r}, *args])
if args and args[0] != "paths":  # make asks for its names at every start: not a stage
    with open({log!r}, "a") as f:
        f.write(f"{{args[0]}}\\t{{'--out' in args and args[args.index('--out') + 1] or ''}}\\t{{time.perf_counter() - start:.3f}}\\n")
sys.exit(code)
"""


def make_all(data_dir: Path, artifacts: Path, trunk: str, image_size: int, epochs: int | None) -> dict:
    log = artifacts.parent / f"{artifacts.name}.stages.tsv"
    shim = artifacts.parent / f"{artifacts.name}-cars-tl"
    shim.write_text(SHIM.format(python=sys.executable, cars=str(Path(sys.executable).parent / "cars-tl"), log=str(log)))
    shim.chmod(0o755)
    command = [
        "make",
        "--no-print-directory",
        "-C",
        str(REPO),
        "all",
        f"CARS={shim}",
        f"DATA={data_dir}",
        f"ARTIFACTS={artifacts}",
        f"SOURCE={data_dir}",  # already imported: download finds it up to date
        "BACKBONE=resnet50",
        "WEIGHTS=random",
        f"IMAGE_SIZE={image_size}",
        "WORKERS=2",
        f"TRUNK_CACHE={trunk}",
        *([f"EPOCHS={epochs}"] if epochs else []),
    ]
    banner(f"make all TRUNK_CACHE={trunk}")
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        print(result.stdout[-4000:], result.stderr[-4000:])
        raise SystemExit(f"make all TRUNK_CACHE={trunk} failed")
    stages = []
    for line in log.read_text().splitlines():
        stage, out, seconds = line.split("\t")
        stages.append({"stage": stage, "out": Path(out).name if out else "", "seconds": float(seconds)})
    d_run = next(p for p in (artifacts / "runs").iterdir() if p.name.startswith("D-"))
    d_metrics = json.loads((d_run / "metrics.json").read_text())
    out = {
        "wall_s": round(wall, 1),
        "stages": stages,
        "d_stage_s": sum(s["seconds"] for s in stages if s["stage"] == "finetune" and s["out"].startswith("D-")),
        "build_trunk_s": sum(s["seconds"] for s in stages if s["stage"] == "build-trunk"),
        "d_test_acc": d_metrics["final"]["test_acc"],
        "d_trunk_cache": d_metrics.get("trunk_cache"),
    }
    print(
        f"make all: {out['wall_s']:.0f} s; D {out['d_stage_s']:.0f} s, build-trunk {out['build_trunk_s']:.0f} s, "
        f"D test acc {out['d_test_acc']:.2f}%",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=None, help="default: the study preset's 15")
    args = parser.parse_args()
    require_shared()
    with real_subset() as (tmp, _manifest):
        data_dir = tmp / "data"
        with_cache = make_all(data_dir, tmp / "with-cache", "on", args.image_size, args.epochs)
        without = make_all(data_dir, tmp / "without-cache", "off", args.image_size, args.epochs)
    d_with = with_cache["d_stage_s"] + with_cache["build_trunk_s"]
    results = {
        "setting": f"make all, study preset, resnet50 random weights, {args.image_size} px, "
        f"{args.epochs or 15} epochs, real subset, WORKERS=2",
        "with_cache": with_cache,
        "without_cache": without,
        "make_all_ratio": round(without["wall_s"] / with_cache["wall_s"], 3),
        "d_ratio_including_build": round(without["d_stage_s"] / d_with, 3),
        "d_ratio_training_only": round(without["d_stage_s"] / with_cache["d_stage_s"], 3),
        "machine": machine_info(),
    }
    print(
        f"\nmake all: {without['wall_s']:.0f} s without the cache, {with_cache['wall_s']:.0f} s with it "
        f"({results['make_all_ratio']:.2f}x); D: {without['d_stage_s']:.0f} s vs {with_cache['d_stage_s']:.0f} s "
        f"+ {with_cache['build_trunk_s']:.0f} s build ({results['d_ratio_including_build']:.2f}x including the build)"
    )
    save("bench_make_all", results)


if __name__ == "__main__":
    main()
