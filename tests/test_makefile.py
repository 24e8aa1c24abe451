"""The Makefile as a pipeline: make reruns nothing when nothing changed (a stand-in cars-tl logs the stages make runs; names come from the real `cars-tl paths`)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CLI, REPO, cli_env, copy_data, run_cli

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


def _make_n(tmp_path, goal: str, *variables: str, cwd=None) -> tuple[subprocess.CompletedProcess, Path]:
    """``make -n GOAL`` in an empty folder (or ``cwd``) with the real `cars-tl paths` and the artifacts in
    that folder's ``a``; the folder."""
    venv, work = tmp_path / "venv", tmp_path / "work"
    venv.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    (venv / ".installed").touch()
    cars = venv / "cars-tl"
    cars.write_text(f'#!/bin/sh\nexec {" ".join(CLI)} "$@"\n')
    cars.chmod(0o755)
    make = ["make", "--no-print-directory", "-n", "-f", str(REPO / "Makefile"), goal, f"VENV={venv}", f"CARS={cars}"]
    make += [f"DATA={work / 'd'}", f"ARTIFACTS={work / 'a'}", *variables]
    result = subprocess.run(make, cwd=cwd or work, capture_output=True, text=True, env=cli_env(), timeout=300)
    return result, work


@pytest.mark.parametrize(
    "variable, fragments",
    [
        ("BACKBONE=resnet18$$(shell touch PWNED)", ["--backbone (make: BACKBONE)", "holds '$'"]),
        ("ARTIFACTS=$$(shell touch PWNED)", ["--artifacts (make: ARTIFACTS)", "holds '$'"]),
        ("ARTIFACTS=a\nSHELL=/bin/false", ["ARTIFACTS holds a newline"]),
        ("ARTIFACTS=my runs", ["(make: ARTIFACTS) 'my runs' holds ' '", "ARTIFACTS=my_runs"]),
        ("ARTIFACTS=bob's", ['(make: ARTIFACTS) "bob\'s" holds "\'"', "ARTIFACTS=bob_s"]),
        ("SEEDS=0 $$(touch PWNED)", ["--seed"]),
        ("UNFREEZE_D=layer9", ["layer9 is not a module of resnet50"]),
        ("SVM_KERNEL=rbff", ["unknown --kernel 'rbff'"]),
        ("SVM_C=-1", ["--C must be positive"]),
        ("DATA=x$$(touch PWNED)", ["DATA='x$(touch PWNED)' holds", "nothing was run or written"]),
        ("DATA=my data", ["DATA='my data' holds", "nothing was run or written"]),
        ("TENSORBOARD=bob's", ["TENSORBOARD='bob's' holds", "nothing was run or written"]),
    ],
)
def test_make_refuses_a_value_it_cannot_carry_before_running_or_writing_anything(tmp_path, variable, fragments):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    result, work = _make_n(tmp_path, "features", variable)
    assert result.returncode == 2, result.stdout + result.stderr
    assert list(work.iterdir()) == []  # no PWNED, no folder (`my`, `a`), no paths.mk with a SHELL= line
    assert "Traceback" not in result.stderr and "cars-tl paths failed" not in result.stderr
    assert any(f in result.stderr for f in ("stopped before any stage ran", "holds a newline", "nothing was run"))
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.mark.slow  # imports torch once for the backbone's check: about 25 s on a loaded machine
def test_make_n_all_takes_every_name_from_paths_and_checks_the_backbone_once(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    variables = ("PRESET=tuned", "SEEDS=0 1", "UNFREEZE_D=layer3,layer4", "SVM_KERNEL=rbf", "SVM_C=2.5")
    first, work = _make_n(tmp_path, "all", *variables, cwd=REPO)
    assert first.returncode == 0, first.stderr
    checked = work / "a" / ".options" / "checked"
    assert [p.name for p in checked.iterdir()] == ["resnet50-layer3,layer4--"]
    names = dict(line.split("=", 1) for line in (work / "a" / ".options" / "paths.mk").read_text().splitlines())
    for key in ("FEATURES", "INIT_FEATURES", "PARTIAL_RUN_1", "SVM_RUN", "KNN_RUN", "HEAD_RUN_0"):  # tuned: no trunk
        assert names[key] in first.stdout, key
    assert f"--C {names['SVM_C']} " in first.stdout and names["SVM_RUN"].endswith("C-svm-rbf-tuned")
    # The second make skips the backbone's check (no torch) and prints the same commands.
    again, _ = _make_n(tmp_path, "all", *variables, cwd=REPO)
    assert again.returncode == 0 and again.stdout == first.stdout


class _Built(Exception):
    """Raised where a stage builds its backbone: the stage has resolved its options and stops there."""


@pytest.mark.parametrize("preset", ["study", "tuned"])
def test_every_entry_point_resolves_a_preset_to_the_same_pixels(preset, demo_dir, tmp_path, monkeypatch):
    """extract-features, build-trunk and finetune, called as Python functions, as bare CLI commands with
    --preset alone, and as `make -n` prints them (values from `cars-tl paths`), build their network
    with one image shape: the preset's."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    from typer.testing import CliRunner

    from cars_tl.cli import app
    from cars_tl.models import backbones
    from cars_tl.stages import presets
    from cars_tl.stages.extract import extract_features
    from cars_tl.stages.finetune import finetune
    from cars_tl.stages.trunk_cache import build_trunk

    built = []

    def stop(name, weights="imagenet", image_size=None, resize_mode="crop", **_):
        built.append((resize_mode, image_size))
        raise _Built

    def shape_of(call) -> tuple:
        built.clear()
        with pytest.raises(_Built):
            call()
        return built[0]

    def cli_shape(args: list[str]) -> tuple:
        built.clear()
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, _Built), (args, result.output)
        return built[0]

    monkeypatch.setattr(backbones, "build_backbone", stop)
    expected = (presets.IMAGE[preset]["resize_mode"], presets.IMAGE[preset]["image_size"])
    for stage in (extract_features, build_trunk, finetune):
        assert shape_of(lambda: stage(demo_dir, preset=preset, out=tmp_path / "x")) == expected, stage
    for stage in ("extract-features", "build-trunk", "finetune"):
        assert cli_shape([stage, "--data-dir", str(demo_dir), "--preset", preset]) == expected, stage

    # make: the names and the shape from `cars-tl paths` (its backbone check, which imports torch, skipped
    # as make skips it once passed), then each image stage's command as make would run it.
    def make_shapes(*variables: str) -> tuple[dict, set]:
        checked = tmp_path / "work" / "a" / ".options" / "checked"
        checked.mkdir(parents=True, exist_ok=True)
        resize = next((v.split("=", 1)[1] for v in variables if v.startswith("RESIZE=")), "")
        (checked / f"resnet50-layer4-{resize}-").touch()
        result, work = _make_n(
            tmp_path, "features", "A", "D", f"PRESET={preset}", "TRUNK_CACHE=on", *variables, cwd=REPO
        )
        assert result.returncode == 0, result.stderr
        paths = dict(line.split("=", 1) for line in (work / "a" / ".options" / "paths.mk").read_text().splitlines())
        commands = [shlex.split(line)[1:] for line in result.stdout.splitlines() if "cars-tl" in line]
        commands = [c for c in commands if c[0] in ("extract-features", "build-trunk", "finetune")]
        assert sorted({c[0] for c in commands}) == ["build-trunk", "extract-features", "finetune"]
        for args in commands:
            args[args.index("--data-dir") + 1] = str(demo_dir)
        return paths, {cli_shape(args) for args in commands}

    paths, shapes = make_shapes()
    assert (paths["RESIZE"], paths["IMAGE_SIZE"]) == (expected[0], str(expected[1] or ""))
    assert shapes == {expected}
    if preset == "tuned":  # RESIZE=crop is passed on, not left to the preset's squash
        assert make_shapes("RESIZE=crop")[1] == {("crop", expected[1])}
    # Explicit options win over the preset, one by one.
    explicit = ["--data-dir", str(demo_dir), "--preset", preset, "--resize", "pad"]
    for stage in ("extract-features", "build-trunk", "finetune"):
        assert cli_shape([stage, *explicit]) == ("pad", expected[1])
        assert cli_shape([stage, *explicit, "--image-size", "64"]) == ("pad", 64)
