"""The CLI end to end: fast help, the chain on the real subset, refusals that say what to do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, SHARED_EFFNET, SHARED_MINI, assert_refused, needs_effnet, needs_mini, run_cli
from typer.testing import CliRunner

from cars_tl.artifacts import runs
from cars_tl.cli import app
from cars_tl.core.errors import CarsTLError

COMMANDS = (
    "download",
    "extract-features",
    "build-trunk",
    "train-head",
    "fit-svm",
    "knn",
    "finetune",
    "calibrate",
    "predict",
    "sparsity",
    "report",
    "inspect",
    "track",
    "paths",
)


@pytest.mark.parametrize("argv", [["--help"], ["download", "--help"], ["finetune", "--help"], ["paths", "--help"]])
def test_help_does_not_import_torch(argv):
    code = (
        "import sys\nfrom cars_tl.cli import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_help_lists_every_command_and_every_command_is_listed_here():
    output = CliRunner().invoke(app, ["--help"]).output
    for name in COMMANDS:
        assert f"│ {name} " in output, name
    # A command added to the CLI must be added to COMMANDS too (and so to this test).
    assert {c.name for c in app.registered_commands} == set(COMMANDS)


def test_user_mistakes_exit_2_without_a_traceback(tmp_path):
    runner = CliRunner()
    for argv, expected in (
        (["extract-features", "--data-dir", str(tmp_path)], "cars-tl download"),
        (["train-head", "--features", str(tmp_path / "none.h5")], "does not exist"),
        (["fit-svm", "--features", str(tmp_path / "none.h5"), "--kernel", "cubic"], "valid: linear"),
    ):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert expected in result.output.replace("\n", " ") and "Traceback" not in result.output


def _chain(tmp_path: Path, backbone: str, weights: str, *extra: str) -> dict:
    runner = CliRunner()
    data_dir, artifacts = tmp_path / "data", tmp_path / "artifacts"
    steps = [
        [
            "download",
            "--source",
            str(SHARED_MINI),
            "--data-dir",
            str(data_dir),
        ],
        [
            "extract-features",
            "--data-dir",
            str(data_dir),
            "--backbone",
            backbone,
            "--weights",
            weights,
            "--out",
            str(artifacts / "f.h5"),
            "--workers",
            "2",
            *extra,
        ],
        ["train-head", "--features", str(artifacts / "f.h5"), "--out", str(artifacts / "runs/head")],
        ["fit-svm", "--features", str(artifacts / "f.h5"), "--kernel", "all", "--out", str(artifacts / "runs/svm")],
    ]
    for argv in steps:
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, (argv, result.output)
    head = json.loads((artifacts / "runs/head/metrics.json").read_text())
    svm = json.loads((artifacts / "runs/svm/metrics.json").read_text())
    assert head["backbone"]["backbone"] == backbone and len(head["class_names"]) == 196
    from cars_tl.artifacts.features import read_attrs

    return {"head": head, "svm": svm, "features": read_attrs(artifacts / "f.h5")}


@needs_mini
@pytest.mark.slow
def test_chain_on_the_real_subset_with_random_weights(tmp_path):
    runs = _chain(tmp_path, "resnet18", "random", "--image-size", "112")
    assert runs["head"]["final"]["test_acc"] > 100 / 20  # above chance over the 20 classes present


@needs_mini
@needs_effnet
@pytest.mark.slow
def test_chain_on_the_real_subset_with_the_pretrained_backbone(tmp_path):
    runs = _chain(tmp_path, "timm/efficientnet_lite0", str(SHARED_EFFNET))
    # Real pretrained features: far above chance (5%) for both models.
    assert runs["head"]["final"]["test_acc"] > 45
    assert runs["svm"]["kernels"]["poly"]["test_acc"] > 45
    assert runs["head"]["params"]["trainable"] == 1280 * 196 + 196
    # The weights file is recorded by its SHA-256 (the one ../shared/models/README.md gives).
    assert runs["features"]["weights_sha256"] == "aa49b98b024ba8f46b73ba7d7cc10a636f7eae2a94bccfe5a8f81f47bf305527"
    assert runs["head"]["backbone"]["weights_sha256"] == runs["features"]["weights_sha256"]


def test_init_head_from_another_dataset_is_refused(demo_head_run, mini_dir):
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            "--data-dir",
            str(mini_dir),
            "--backbone",
            "resnet18",
            "--weights",
            "random",
            "--image-size",
            "64",
            "--init-head",
            str(demo_head_run),
            "--epochs",
            "1",
        ],
    )
    assert result.exit_code == 2
    text = result.output.replace("\n", " ")
    assert str(demo_head_run) in text.replace(" ", "") or demo_head_run.name in text
    assert "another dataset" in text and "classes" in text


def test_help_shows_defaults_and_version():
    result = run_cli("train-head", "--help")
    assert "(study: 15" in result.stdout and "(study: 1e-3" in result.stdout
    assert "Epochs ." not in result.stdout
    result = run_cli("report", "--help")
    assert "ARTIFACTS/report" in result.stdout
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("cars-tl ")


def test_paths_and_hints_with_brackets_print_verbatim(demo_features, tmp_path):
    missing = tmp_path / "a[/]b" / "x[red].h5"
    result = run_cli("train-head", "--features", missing)
    assert_refused(result, f"feature file {missing} does not exist")
    out = tmp_path / "r[/]un[bold]"
    result = run_cli("knn", "--features", demo_features, "--k", "5", "--out", out)
    assert result.returncode == 0, result.stdout
    assert f"knn run {out}:" in result.stdout and runs.read_metrics(out)["status"] == "complete"


def test_a_hint_keeps_its_brackets(capsys):
    from cars_tl import cli

    cli._error(CarsTLError("cannot read x[/]y", "pip install 'cars_tl[parquet]'"))
    err = capsys.readouterr().err
    assert "error: cannot read x[/]y" in err and "next: pip install 'cars_tl[parquet]'" in err


def test_help_lists_choices_keeps_bracketed_words_and_shows_no_bool():
    finetune = run_cli("finetune", "--help").stdout
    assert "needs cars_tl[tensorboard]" in finetune  # was "needs cars_tl;": Rich took [tensorboard] for markup
    assert "<adam|adamw|sgd>" in finetune and "<full|box>" in finetune and "<auto|fp32|bf16|fp16>" in finetune
    fit_svm = run_cli("fit-svm", "--help").stdout
    assert "[study: 1; tuned: auto]" in fit_svm and "<linear|poly|rbf|sigmoid|all>" in fit_svm
    for text in (finetune, fit_svm, run_cli("knn", "--help").stdout, run_cli("--help").stdout):
        assert "<bool>" not in text and " ." not in text.replace("  ", " ")
    assert "[default: 20]" in run_cli("knn", "--help").stdout
    assert "[default: ARTIFACTS/runs]" in run_cli("track", "--help").stdout


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["extract-features", "--crop", "boxx"], ["unknown --crop 'boxx'; valid: full, box", "next: e.g. --crop full"]),
        (["finetune", "--optimizer", "lbfgs"], ["unknown --optimizer 'lbfgs'; valid: adam, adamw, sgd"]),
        (["build-trunk", "--trunk-dtype", "int8"], ["unknown --trunk-dtype 'int8'; valid: auto, fp32, fp16, bf16"]),
        (["paths", "--scale=unit"], ["unknown --scale 'unit'", "(make: SVM_SCALE=none)"]),
    ],
)
def test_a_value_outside_the_choices_is_refused_before_anything_runs(tmp_path, argv, fragments):
    result = run_cli(*argv, "--data-dir" if argv[0] != "paths" else "--artifacts", tmp_path / "absent")
    assert_refused(result, *fragments)


def test_the_cli_choices_are_the_librarys():
    """The choice sets in cars_tl/cli (written out there: --help imports no torch) are the ones the library checks."""
    import typer

    from cars_tl.artifacts import trunks
    from cars_tl.core import runtime
    from cars_tl.data import transforms
    from cars_tl.data.label_conflicts import POLICIES as LABEL_CONFLICT_POLICIES
    from cars_tl.models import feature_views
    from cars_tl.models.svm import kernels, model
    from cars_tl.stages import presets
    from cars_tl.stages.train_head import OPTIMIZERS

    commands = typer.main.get_command(app).commands

    def choices(command: str, option: str) -> set:
        [param] = [p for p in commands[command].params if p.name == option]
        return set(param.type_descriptor.choices)

    for command in ("extract-features", "finetune", "build-trunk", "paths"):
        assert choices(command, "resize") == set(transforms.RESIZE_MODES)
    for command in ("extract-features", "finetune", "build-trunk"):
        assert choices(command, "precision") == set(runtime.PRECISIONS)
        assert choices(command, "crop") == {"full", "box"}
    for command in ("finetune", "build-trunk"):
        assert choices(command, "trunk_dtype") == {"auto", *trunks.STORAGES}
    for command in ("extract-features", "finetune"):
        assert choices(command, "tta") == set(feature_views.TTA_MODES)
    for command, table in (
        ("extract-features", presets.EXTRACT),
        ("train-head", presets.HEAD),
        ("finetune", presets.FINETUNE),
        ("fit-svm", presets.SVM),
        ("paths", presets.SVM),
    ):
        assert choices(command, "preset") == set(table)
    for command in ("fit-svm", "paths"):
        assert choices(command, "kernel") == {*kernels.KERNELS, "all"}
        assert choices(command, "scale") == set(model.SCALES)
    assert choices("fit-svm", "method") == set(model.METHODS)
    assert choices("train-head", "optimizer") == set(OPTIMIZERS)
    assert choices("finetune", "optimizer") == set(OPTIMIZERS) - {"lbfgs"}
    assert choices("extract-features", "combine") == set(feature_views.COMBINES)
    assert choices("download", "label_conflicts") == set(LABEL_CONFLICT_POLICIES)


def test_progress_bars_of_counted_work_show_the_time_remaining():
    import io

    from rich.console import Console

    from cars_tl import console as console_module

    buffer = io.StringIO()
    original = console_module.console
    console_module.console = Console(file=buffer, force_terminal=True, width=160)
    try:
        with console_module.RichProgressReporter().task("extract", total=10, unit="img") as task:
            task.advance(5)
    finally:
        console_module.console = original
    assert "eta" in buffer.getvalue() and "5/10" in buffer.getvalue()


def test_the_tensorboard_extra_installs_the_viewer_the_help_names():
    import re

    from cars_tl.artifacts.run_config import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    packages = {re.split(r"[<>=!~;\[ ]", p)[0].lower() for p in extras["tensorboard"]}
    assert {"tensorboardx", "tensorboard"} <= packages
