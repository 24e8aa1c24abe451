"""The Makefile as a pipeline: make reruns nothing when nothing changed (a stand-in cars-tl logs the stages make runs; names come from the real `cars-tl paths`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, copy_data, run_cli

from cars_tl.data import devkit
from cars_tl.data import manifest as manifests

FAKE_CARS = """#!{python}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
if args[0] == "paths":  # make reads every name from the real CLI
    os.execv({python!r}, [{python!r}, "-m", "cars_tl", *args])
with open({log!r}, "a") as f:
    f.write(" ".join(args[:1]) + "\\n")
opt = lambda name: args[args.index(name) + 1] if name in args else None
out = opt("--out")
if args[0] in ("extract-features", "build-trunk"):
    Path(out).parent.mkdir(parents=True, exist_ok=True); Path(out).write_text("cache")
elif args[0] in ("train-head", "fit-svm", "knn", "finetune"):
    Path(out).mkdir(parents=True, exist_ok=True); (Path(out) / "metrics.json").write_text("{{}}")
elif args[0] == "sparsity":
    Path(out).mkdir(parents=True, exist_ok=True); (Path(out) / "sparsity.json").write_text("{{}}")
elif args[0] == "report":
    (Path(opt("--artifacts")) / "report").mkdir(parents=True, exist_ok=True)
    (Path(opt("--artifacts")) / "report" / "report.html").write_text("report")
elif args[0] == "predict":
    print("{{}}")
"""


def test_make_reruns_nothing_after_the_manifest_is_rewritten_with_the_same_content(demo_dir, tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    data_dir = copy_data(demo_dir, tmp_path)
    log = tmp_path / "calls.log"
    fake = tmp_path / "cars-tl"
    fake.write_text(FAKE_CARS.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()
    make = [
        "make",
        "--no-print-directory",
        "-C",
        str(REPO),
        "all",
        f"VENV={venv}",
        f"CARS={fake}",
        f"DATA={data_dir}",
        f"ARTIFACTS={tmp_path / 'artifacts'}",
        "SOURCE=demo",
    ]

    def stages() -> list[str]:
        log.write_text("")
        result = subprocess.run(make, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return log.read_text().split()

    first = stages()
    assert {"download", "extract-features", "train-head", "finetune", "fit-svm", "knn", "report"} <= set(first)
    assert stages() == []
    # download --verify re-hashes every image and rewrites the manifest: same content, a new file.
    manifest = devkit.stanford_root(data_dir) / manifests.MANIFEST_JSON
    before = manifest.stat().st_mtime_ns
    verified = run_cli("download", "--data-dir", data_dir, "--source", "demo", "--verify")
    assert verified.returncode == 0, verified.stdout
    assert manifest.stat().st_mtime_ns > before
    assert stages() == []
    # Another dataset (another fingerprint) reruns the image stages and what depends on them.
    meta = json.loads(manifest.read_text())
    meta["fingerprint"] = "0" * 64
    manifest.write_text(json.dumps(meta, indent=1))
    changed = stages()
    assert "extract-features" in changed and changed.count("finetune") >= 2
