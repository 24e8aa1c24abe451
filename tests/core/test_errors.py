"""User mistakes are messages (exit 2): numbers out of range or not finite, outputs of the wrong kind."""

from __future__ import annotations

import pytest
from helpers import TINY_CLI, assert_refused, run_cli

from cars_tl.artifacts import features
from cars_tl.core.errors import CarsTLError, check_number, check_seed


@pytest.mark.parametrize(
    "stage, option, value",
    [
        ("train-head", "--lr", "nan"),
        ("train-head", "--lr", "inf"),
        ("train-head", "--weight-decay", "nan"),
        ("train-head", "--seed", "-1"),
        ("train-head", "--seed", "4294967296"),  # was "got 4.29497e+09"
        ("fit-svm", "--C", "nan"),
        ("fit-svm", "--gamma", "inf"),
        ("fit-svm", "--coef0", "nan"),
        ("finetune", "--lr", "inf"),
        ("finetune", "--margin", "nan"),
        ("finetune", "--seed", "-1"),
        ("extract-features", "--margin", "inf"),
    ],
)
def test_non_finite_or_out_of_range_numbers_exit_2(stage, option, value, demo_dir, demo_features, tmp_path):
    source = (
        ["--features", demo_features] if stage in ("train-head", "fit-svm") else ["--data-dir", demo_dir, *TINY_CLI]
    )
    result = run_cli(stage, *source, option, value, "--out", tmp_path / "out")
    assert result.returncode == 2, result.stdout
    assert option in result.stdout and value.lstrip("-") in result.stdout and "Traceback" not in result.stdout
    assert not (tmp_path / "out").exists()


def test_whole_numbers_out_of_range_are_shown_as_given():
    with pytest.raises(CarsTLError) as err:
        check_seed(2**32)
    assert err.value.message == "--seed must be a finite number >= 0 and <= 4294967295, got 4294967296"
    with pytest.raises(CarsTLError, match=r"<= 1000, got 123456789012345678901234567890$"):
        check_number("--epochs", 123456789012345678901234567890, minimum=1, maximum=1000)
    with pytest.raises(CarsTLError, match=r"> 0, got -1e-07$"):
        check_number("--lr", -1e-7, minimum=0, exclusive_minimum=True)


def test_out_of_the_wrong_kind(demo_dir, demo_features, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert_refused(
        run_cli("train-head", "--features", demo_features, "--out", a_file), f"--out {a_file} is an existing file"
    )
    assert_refused(
        run_cli("knn", "--features", demo_features, "--out", a_file / "run"), f"below {a_file}, which is a file"
    )
    assert a_file.read_text() == "keep me"
    folder = tmp_path / "folder"
    folder.mkdir()
    result = run_cli(
        "extract-features",
        "--data-dir",
        demo_dir,
        "--backbone",
        "resnet18",
        "--weights",
        "random",
        "--image-size",
        "64",
        "--workers",
        "0",
        "--out",
        folder,
    )
    assert_refused(result, f"--out {folder} is a folder; a file is expected", f"--out {folder / 'features.h5'}")
    assert list(folder.iterdir()) == [] and not features.partial_dir(folder).exists()
