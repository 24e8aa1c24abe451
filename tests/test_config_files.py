"""Config files: ``--config FILE`` (flags win), ``--print-config``, and the ``config.toml`` every run keeps,
which reruns the run exactly (checked for every stage that writes a run)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TINY_CLI, assert_refused, run_cli
from typer.testing import CliRunner

from cars_tl.artifacts import run_config, runs
from cars_tl.cli import app

tomllib = run_config.tomllib  # tomli on Python 3.10


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


def assert_same_run(first, second):
    """Same options recorded, same saved predictions, same test accuracy."""
    a, b = runs.read_metrics(first), runs.read_metrics(second)
    assert a["status"] == b["status"] == "complete"
    assert a["config"] == b["config"]
    pa, pb = runs.read_predictions(first), runs.read_predictions(second)
    assert np.array_equal(pa.ids, pb.ids) and np.array_equal(pa.top_classes, pb.top_classes)
    assert np.array_equal(pa.top_scores, pb.top_scores)
    assert a.get("test_acc") == b.get("test_acc")


def rerun_from_config(command, first, tmp_path):
    """The run's config.toml: a TOML file of the command's options (not --force/--resume), naming the
    command; ``--config`` with it and another ``--out`` makes the same run."""
    config = tomllib.loads((first / run_config.FILE).read_text())
    assert config.pop("cars-tl") == {"command": command, "schema": run_config.SCHEMA}
    assert "force" not in config and "resume" not in config and "progress" not in config
    second = tmp_path / "again"
    invoke(command, "--config", first / run_config.FILE, "--out", second)
    assert_same_run(first, second)
    return config


def test_train_head_reruns_from_its_config(demo_features, tmp_path):
    first = tmp_path / "head"
    invoke("train-head", "--features", demo_features, "--epochs", 3, "--lr", 0.01, "--seed", 5, "--out", first)
    config = rerun_from_config("train-head", first, tmp_path)
    assert config["epochs"] == 3 and config["lr"] == 0.01 and config["seed"] == 5
    assert config["features"] == str(demo_features) and config["out"] == str(first)


def test_fit_svm_reruns_from_its_config(demo_features, tmp_path):
    first = tmp_path / "svm"
    invoke("fit-svm", "--features", demo_features, "--kernel", "linear", "--C", 0.5, "--out", first)
    config = rerun_from_config("fit-svm", first, tmp_path)
    assert config["kernel"] == "linear" and str(config["C"]) == "0.5"


def test_knn_reruns_from_its_config(demo_features, tmp_path):
    first = tmp_path / "knn"
    invoke("knn", "--features", demo_features, "--k", "3,5", "--temperature", 0.2, "--out", first)
    config = rerun_from_config("knn", first, tmp_path)
    assert config["k"] == ["3,5"]  # as given; the stage parses it
    assert runs.read_metrics(tmp_path / "again")["config"]["k"] == [3, 5]


def test_finetune_reruns_from_its_config(demo_dir, tmp_path):
    first = tmp_path / "ft"
    invoke(
        "finetune", "--data-dir", demo_dir, *TINY_CLI, "--unfreeze", "layer4", "--epochs", 1, "--batch-size", 16,
        "--seed", 2, "--out", first,
    )  # fmt: skip
    config = rerun_from_config("finetune", first, tmp_path)
    assert config["seed"] == 2 and config["image_size"] == 64 and config["unfreeze"] == "layer4"
    assert "lr" not in config  # unset: the preset's, resolved again the same way on the rerun


def test_calibrate_reruns_from_its_config(demo_features, demo_dir, tmp_path):
    from cars_tl.stages.train_head import train_head

    base, _ = train_head(demo_features, preset="tuned", epochs=2, refit=False, out=tmp_path / "tuned-head")
    first = tmp_path / "cal"
    invoke("calibrate", "--run", base, "--data-dir", demo_dir, "--out", first)
    config = rerun_from_config("calibrate", first, tmp_path)
    assert config["run"] == str(base)


def test_the_python_api_writes_the_config_too(demo_features, tmp_path):
    from cars_tl.stages.knn import run_knn

    run_dir, _ = run_knn(demo_features, ks=(4,), out=tmp_path / "knn")
    config = tomllib.loads((run_dir / run_config.FILE).read_text())
    assert config["k"] == [4] and config["features"] == str(demo_features)
    second = tmp_path / "again"
    invoke("knn", "--config", run_dir / run_config.FILE, "--out", second)
    assert_same_run(run_dir, second)


def test_flags_win_over_the_file_and_print_config_round_trips(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('epochs = 7\nimage-size = 128\nresize = "pad"\nlr = 1\n')
    printed = invoke("finetune", "--config", path, "--epochs", 2, "--print-config").output
    options = tomllib.loads(printed)
    assert options["epochs"] == 2  # the flag
    assert options["image_size"] == 128 and options["resize"] == "pad" and options["lr"] == 1.0  # the file
    assert options["backbone"] == "resnet50"  # the default
    assert options["cars-tl"]["command"] == "finetune"
    again = tmp_path / "printed.toml"
    again.write_text(printed)
    assert tomllib.loads(invoke("finetune", "--config", again, "--print-config").output) == options


def test_every_command_takes_config_and_print_config():
    for command in app.registered_commands:
        names = {o for p in command.callback.__signature__.parameters.values() for o in [p.name]}
        assert {"config", "print_config"} <= names, command.name


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("epoch = 3\n", ["unknown option 'epoch'", "valid:", "epochs", "--print-config"]),
        ('optimizer = "adamx"\n', ["optimizer = 'adamx'", "unknown --optimizer 'adamx'; valid: adam, adamw, sgd"]),
        ('epochs = "ten"\n', ["epochs = 'ten'", "--epochs"]),
        ("epochs = \n", ["is not valid TOML", "line 1"]),
        ("[image]\nsize = 3\n", ["table [image] is not an option"]),
        ('[cars-tl]\ncommand = "knn"\n', ["holds options of cars-tl knn, not of cars-tl finetune", "knn --config"]),
        ("[cars-tl]\nschema = 9\n", ["schema 9", "upgrade cars_tl"]),
        ("epochs = 2\nepochs-x = 1\n", ["unknown option 'epochs-x'"]),
        ("image_size = 64\nimage-size = 64\n", ["sets 'image-size' twice"]),
    ],
)
def test_a_bad_config_file_is_refused_naming_the_file(tmp_path, text, fragments):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert_refused(run_cli("finetune", "--config", path), str(path), *fragments)


def test_a_missing_config_file_is_refused(tmp_path):
    assert_refused(run_cli("finetune", "--config", tmp_path / "none.toml"), "none.toml does not exist")


def test_dumps_writes_toml_that_reads_back():
    options = {"a": 'x "q" \\ é', "b": 1e-5, "c": [1, 2], "d": True, "e": None, "f": float("inf"), "image-size": 3}
    text = run_config.dumps("knn", options)
    back = tomllib.loads(text)
    assert back.pop("cars-tl") == {"command": "knn", "schema": 1}
    assert back == {k: v for k, v in options.items() if v is not None}
