"""The option records: each refuses each bad value with the message users see, the CLI and the Python API
refuse alike, and each option is checked in one place of the source (counted)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re

import pytest
from helpers import REPO, TINY, TINY_CLI, assert_refused, run_cli

from cars_tl.core.errors import CarsTLError
from cars_tl.core.options import DeviceOptions, ImageOptions


@pytest.mark.parametrize(
    "record, values, message",
    [
        (ImageOptions, dict(crop="middle"), "unknown --crop 'middle'; valid: full, box"),
        (ImageOptions, dict(margin=-1), "--margin must be a finite number >= 0, got -1"),
        (ImageOptions, dict(margin=-0.5), "--margin must be a finite number >= 0, got -0.5"),
        (ImageOptions, dict(margin=math.nan), "--margin must be a finite number >= 0, got nan"),
        (ImageOptions, dict(margin=math.inf), "--margin must be a finite number >= 0, got inf"),
        (ImageOptions, dict(image_size=31), "--image-size must be at least 32 and at most 1024 pixels, got 31"),
        (ImageOptions, dict(image_size=1025), "--image-size must be at least 32 and at most 1024 pixels, got 1025"),
        (ImageOptions, dict(resize="zoom"), "unknown --resize 'zoom'; valid: crop, squash, pad"),
        (DeviceOptions, dict(precision="fp8"), "unknown precision 'fp8'; valid: auto, fp32, bf16, fp16"),
        (DeviceOptions, dict(workers=-1), "--workers must be >= 0, got -1"),
        (DeviceOptions, dict(batch_size=0), "--batch-size must be positive, got 0"),
        (DeviceOptions, dict(batch_size=-3), "--batch-size must be positive, got -3"),
    ],
)
def test_each_record_refuses_each_bad_value(record, values, message):
    with pytest.raises(CarsTLError) as err:
        record(**values)
    assert err.value.message == message


def test_records_hold_checked_normalised_values_under_the_cli_names():
    image = ImageOptions(crop="box", margin=0, image_size=32, resize="pad")
    assert image.margin == 0.0 and isinstance(image.margin, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        image.margin = -1
    assert DeviceOptions(workers=0, batch_size=None).batch_size is None  # finetune: the preset's
    assert ImageOptions(image_size=32, resize="crop") == ImageOptions(image_size=32, resize="crop", margin=0)
    # Field names are the CLI's parameter names (a run's config.toml flattens the records with asdict).
    from cars_tl.cli.build_trunk import build_trunk
    from cars_tl.cli.extract import extract_features
    from cars_tl.cli.finetune import finetune

    fields = {f.name for record in (ImageOptions, DeviceOptions) for f in dataclasses.fields(record)}
    for command in (extract_features, build_trunk, finetune):
        assert fields <= set(inspect.signature(command).parameters), command.__name__


@pytest.mark.parametrize(
    "command, option, value, api",
    [
        ("extract-features", "--margin", "-1", lambda _: ImageOptions(margin=-1)),
        ("build-trunk", "--batch-size", "0", lambda _: DeviceOptions(batch_size=0)),
        ("finetune", "--crop", "middle", lambda _: ImageOptions(crop="middle")),
        # build-trunk checked no seed before the records: a negative one reached the random initialisation.
        ("build-trunk", "--seed", "-1", lambda data: _build_trunk(data, seed=-1)),
    ],
)
def test_cli_and_python_api_refuse_alike(command, option, value, api, demo_dir, tmp_path):
    with pytest.raises(CarsTLError) as err:
        api(demo_dir)
    result = run_cli(command, "--data-dir", demo_dir, *TINY_CLI, option, value, "--out", tmp_path / "out")
    assert_refused(result, err.value.message)
    assert not (tmp_path / "out").exists()


def _build_trunk(data_dir, **options):
    from cars_tl.stages.trunk_cache import build_trunk

    return build_trunk(data_dir, **TINY, **options)


def _places(pattern: str) -> dict[str, int]:
    """``{file: occurrences}`` of ``pattern`` (a regular expression) in cars_tl's source."""
    found = {}
    for path in sorted((REPO / "cars_tl").rglob("*.py")):
        count = len(re.findall(pattern, path.read_text()))
        if count:
            found[str(path.relative_to(REPO))] = count
    return found


def test_each_option_is_checked_in_one_place():
    options = {"cars_tl/core/options.py": 1}
    assert _places(r"unknown --crop") == options
    assert _places(r'check_number\("--margin"') == options
    assert _places(r"--margin must") == {}  # check_number words it
    assert _places(r"--image-size must be") == options
    assert _places(r"unknown --resize") == options
    assert _places(r"unknown precision") == options
    assert _places(r"--batch-size must be positive") == options
    # DeviceOptions' batch size, and train-head's feature rows per step (it takes no device; L-BFGS: full batch).
    assert _places(r"check_batch_size\(") == {"cars_tl/core/options.py": 2, "cars_tl/stages/train_head.py": 1}
    assert _places(r"--workers must be") == options
    # DeviceOptions', and the entry of the two stages that take --workers without a device.
    assert _places(r"check_workers\(") == {
        "cars_tl/core/options.py": 2,
        "cars_tl/stages/calibrate.py": 1,
        "cars_tl/stages/predict.py": 1,
    }
    # check_seed's definition, then one call at the entry of each command that takes --seed.
    assert _places(r"check_seed\(") == {
        "cars_tl/core/errors.py": 1,
        "cars_tl/cli/paths.py": 1,
        "cars_tl/stages/finetune.py": 1,
        "cars_tl/stages/fit_svm.py": 1,
        "cars_tl/stages/train_head.py": 1,
        "cars_tl/stages/trunk_cache.py": 1,
    }
