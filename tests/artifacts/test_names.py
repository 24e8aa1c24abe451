"""One function per default name (cars_tl/artifacts/names.py), one presets module
(cars_tl/stages/presets.py), and `cars-tl paths`, which prints both for make."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from typer.testing import CliRunner

from cars_tl.artifacts import features, names
from cars_tl.cli import app
from cars_tl.core.errors import CarsTLError
from cars_tl.models import backbones
from cars_tl.stages import presets
from cars_tl.stages.knn import run_knn


def _paths(*argv: str) -> dict[str, str]:
    result = CliRunner().invoke(app, ["paths", *argv])
    assert result.exit_code == 0, result.output
    return dict(line.split("=", 1) for line in result.output.splitlines())


def test_paths_prints_the_names_functions_give_and_imports_no_torch():
    code = (
        "import sys\nfrom cars_tl.cli import app\n"
        "try:\n    app(['paths', '--artifacts', 'A', '--preset', 'tuned', '--seed', '0', '--seed', '1', '--no-check-backbone'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    values = dict(line.split("=", 1) for line in result.stdout.splitlines())
    runs = Path("A") / "runs"
    assert values["FEATURES"] == str(Path("A/features/resnet50-imagenet-squash-288-tuned.h5"))
    assert values["INIT_FEATURES"] == str(Path("A/features/resnet50-imagenet-squash-288-tuned-final.h5"))
    assert values["TRUNK"] == str(Path("A/trunks/resnet50-imagenet-squash-288-tuned-layer4.h5"))
    for seed in (0, 1):
        assert (
            values[f"HEAD_RUN_{seed}"]
            == str(runs / names.pipeline_head_run("tuned", seed))
            == str(runs / f"B-head-tuned-s{seed}")
        )
        assert values[f"INIT_HEAD_RUN_{seed}"] == str(runs / f"B-head-final-tuned-s{seed}")
        assert values[f"SCRATCH_RUN_{seed}"] == str(runs / f"A-scratch-tuned-s{seed}")
        assert values[f"PARTIAL_RUN_{seed}"] == str(runs / f"D-layer4-tuned-s{seed}")
    assert values["SVM_RUN"] == str(runs / "C-svm-poly-tuned")
    assert values["SVM_ALL_RUN"] == str(runs / "C-svm-all-kernels-tuned")
    # The tuned preset's settings come from the presets module, not from make.
    assert (values["RESIZE"], values["IMAGE_SIZE"]) == (
        presets.IMAGE["tuned"]["resize_mode"],
        str(presets.IMAGE["tuned"]["image_size"]),
    )
    assert (values["SVM_C"], values["SVM_GAMMA"], values["SVM_SCALE"]) == ("auto", "cv", "l2")


def test_paths_study_defaults_one_seed_and_explicit_values_win():
    study = _paths("--artifacts", "A")
    assert study["HEAD_RUN_0"] == str(Path("A/runs/B-head-study"))  # one seed: no -s suffix
    assert study["INIT_HEAD_RUN_0"] == study["HEAD_RUN_0"]  # study: D starts from B itself
    assert study["INIT_FEATURES"] == study["FEATURES"] == str(Path("A/features/resnet50-imagenet.h5"))
    assert (study["RESIZE"], study["IMAGE_SIZE"], study["SVM_C"], study["SVM_GAMMA"]) == ("crop", "", "1.0", "scale")
    custom = _paths(
        "--artifacts",
        "A",
        "--backbone",
        "timm/efficientnet_lite0",
        "--weights",
        "/w/my.weights.pt",
        "--resize",
        "pad",
        "--image-size",
        "96",
        "--C",
        "3",
        "--unfreeze",
        "blocks.6",
        "--kernel",
        "rbf",
    )
    assert custom["FEATURES"] == str(Path("A/features/timm-efficientnet_lite0-my.weights-pad-96.h5"))
    assert custom["TRUNK"] == str(Path("A/trunks/timm-efficientnet_lite0-my.weights-pad-96-blocks.6.h5"))
    assert (custom["RESIZE"], custom["IMAGE_SIZE"], custom["SVM_C"]) == ("pad", "96", "3")
    assert custom["SVM_RUN"] == str(Path("A/runs/C-svm-rbf"))
    assert custom["PARTIAL_RUN_0"] == str(Path("A/runs/D-blocks.6-study"))


def test_paths_prints_one_key_and_refuses_unknown_ones():
    runner = CliRunner()
    one = runner.invoke(app, ["paths", "SVM_RUN", "--artifacts", "A"])
    assert one.exit_code == 0 and one.output.strip() == str(Path("A/runs/C-svm-poly"))
    bad = runner.invoke(app, ["paths", "NOPE"])
    assert bad.exit_code == 2 and "unknown KEY 'NOPE'" in bad.output and "FEATURES" in bad.output
    preset = runner.invoke(app, ["paths", "--preset", "fast"])
    assert preset.exit_code == 2 and "unknown --preset 'fast'; valid: study, tuned" in preset.output


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (
            ["--backbone", "resnet18$(shell touch PWNED)"],
            ["--backbone (make: BACKBONE)", "holds '$'", "BACKBONE=resnet18_"],
        ),
        (["--artifacts", "a\nSHELL=/bin/false"], ["--artifacts (make: ARTIFACTS)", "holds '\\n'", "ends a make line"]),
        (["--artifacts", "my runs"], ["'my runs' holds ' '", "ARTIFACTS=my_runs"]),
        (["--artifacts", "bob's"], ['holds "\'"', "ends a shell quote", "--artifacts bob_s"]),
        (["--weights", "/w/a#b.pt"], ["--weights (make: WEIGHTS)", "holds '#'", "make comment"]),
        (["--unfreeze", "layer4;rm"], ["--unfreeze (make: UNFREEZE_D)", "holds ';'"]),
        (["--C", '1"'], ["--C (make: SVM_C)", "holds '\"'"]),
        (["--kernel", "rbff"], ["unknown --kernel 'rbff'; valid: linear, poly, rbf, sigmoid, all"]),
        (["--C", "-1"], ["--C must be positive, got -1"]),
        (["--gamma", "0"], ["--gamma must be a finite number > 0"]),
        (["--preset", "tuned", "--scale", "unit"], ["unknown --scale 'unit'"]),
        (["--seed", "-1"], ["--seed must be"]),
        (["--backbone", "resnet5O"], ["unknown backbone 'resnet5O'", "resnet50"]),
        (["--unfreeze", "layer9"], ["'layer9': layer9 is not a module of resnet50", "layer4"]),
        (["--resize", "stretch"], ["unknown --resize 'stretch'"]),
        (["--image-size", "8"], ["--image-size must be at least"]),
    ],
)
def test_paths_checks_its_options_as_the_stages_do_and_refuses_what_make_cannot_carry(argv, fragments):
    result = CliRunner().invoke(app, ["paths", *argv])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    assert "FEATURES=" not in result.output, result.output  # nothing for make to read
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def test_paths_accepts_every_punctuation_a_name_may_hold_and_skips_the_backbone_check_on_request():
    values = _paths("--artifacts", "runs/a_b-1.2+c@d", "--unfreeze", "layer3,layer4", "--weights", "/w/x.pt")
    assert values["PARTIAL_RUN_0"] == str(Path("runs/a_b-1.2+c@d/runs/D-layer3,layer4-study"))
    # make passes --no-check-backbone once a combination passed: the torch-free checks still run.
    assert _paths("--unfreeze", "layer9", "--no-check-backbone")["PARTIAL_RUN_0"].endswith("D-layer9-study")
    refused = CliRunner().invoke(app, ["paths", "--artifacts", "a b", "--no-check-backbone"])
    assert refused.exit_code == 2 and "holds ' '" in refused.output


def test_presets_resolve_copies_and_overrides():
    config = presets.resolve(presets.HEAD, "study", epochs=3, lr=None)
    assert config["epochs"] == 3 and config["lr"] == presets.HEAD["study"]["lr"]
    config["epochs"] = 99
    assert presets.HEAD["study"]["epochs"] == 15  # a copy: the table is untouched
    with pytest.raises(CarsTLError, match="unknown --preset 'x'; valid: study, tuned"):
        presets.resolve(presets.FINETUNE, "x")
    # Every table has both presets with the same keys (a preset never silently lacks an option).
    for table in (presets.HEAD, presets.FINETUNE, presets.SVM, presets.EXTRACT, presets.IMAGE):
        assert set(table) == set(presets.NAMES)
        assert set(table["study"]) == set(table["tuned"])


def test_a_stage_without_out_writes_under_its_default_name(demo_features, tmp_path):
    run_dir, _ = run_knn(demo_features, ks=(3,), artifacts=tmp_path)
    attrs = features.read_attrs(demo_features)
    assert run_dir == tmp_path / "runs" / names.knn_run_name(attrs["backbone"], attrs["weights"])
    assert run_dir.name == f"knn-{attrs['backbone']}-{attrs['weights']}"
    assert (run_dir / "metrics.json").is_file()


def test_weights_and_backbone_tags():
    assert names.weights_tag("imagenet") == "imagenet"
    assert names.weights_tag("/some/dir/w.pt") == "file-w"
    assert names.backbone_tag("timm/efficientnet_lite0") == "timm-efficientnet_lite0"
    assert names.finetune_run_name("resnet50", "random", "layer3,layer4", "tuned") == (
        "finetune-resnet50-random-layer3+layer4-tuned"
    )


def test_default_cache_names_differ_for_every_array_changing_option(tmp_path):
    spec = backbones.build_backbone("resnet18", "random", 64).transform
    bigger = backbones.build_backbone("resnet18", "random", 96).transform
    paths = {
        names.features_path(tmp_path, "resnet18", "random", "full", spec, 0.0, "fp32"),
        names.features_path(tmp_path, "resnet18", "random", "full", spec, 0.0, "bf16"),
        names.features_path(tmp_path, "resnet18", "random", "full", bigger, 0.0, "fp32"),
        names.features_path(tmp_path, "resnet18", "random", "box", spec, 0.0, "fp32"),
        names.features_path(tmp_path, "resnet18", "random", "box", spec, 0.1, "fp32"),
    }
    assert len(paths) == 5
    assert names.features_path(tmp_path, "resnet18", "random", "full", spec, 0.0, "fp32").name.startswith(
        "resnet18-random-full-64px-fp32-"
    )


def test_default_names_are_those_earlier_versions_gave_before_the_spec_said_side():
    import json

    from cars_tl.core.options import legacy_spec, transform_key

    spec = {
        "resize": 256,
        "side": 224,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "interpolation": "bilinear",
        "mode": "crop",
    }
    old = legacy_spec(spec)
    assert old["crop"] == 224 and "side" not in old
    artifacts = Path("artifacts")
    assert names.features_path(artifacts, "resnet50", "imagenet", "full", spec, 0.0, "fp32") == names.features_path(
        artifacts, "resnet50", "imagenet", "full", old, 0.0, "fp32"
    )
    identity = {"cut": "layer3", "precision": "fp32", "storage": "fp32", "transform": transform_key(spec)}
    earlier = dict(identity, transform=json.dumps(old, sort_keys=True))  # what transform_key wrote before
    assert names.trunk_path(artifacts, "resnet50", "imagenet", identity) == names.trunk_path(
        artifacts, "resnet50", "imagenet", earlier
    )
