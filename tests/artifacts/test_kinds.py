"""Run kinds: one record per kind, its loader and report view registered onto it by the modules that define them."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import toy_run

from cars_tl.artifacts import kinds, runs
from cars_tl.core.errors import CarsTLError
from cars_tl.models import inference
from cars_tl.report import catalog


@pytest.fixture
def toy_kind():
    """A kind defined as a new stage would: one record, a loader, a view (removed afterwards)."""
    kind = kinds.define(
        kinds.RunKind(
            "toy",
            "toy-stage",
            "probability",
            on_features=False,
            keeps_model=True,
            resumes=False,
            rerun="fit it again: cars-tl {stage} --run {run} --out {run_dir} --force",
        )
    )
    try:
        kinds.loader("toy")(lambda run_dir, metrics, model_path, recorded, cache: ("toy loaded", model_path.name))
        kinds.register("toy", view=catalog.KindView(group=lambda m: "T", setting=lambda m: "s", label=lambda m: "toy!"))
        yield kind
    finally:
        del kinds.RUN_KINDS["toy"]


def test_a_new_kind_is_one_record_plus_its_loader_and_its_view(toy_kind, tmp_path):
    artifacts = tmp_path / "artifacts"
    run_dir = toy_run(artifacts, "t1", kind="toy", run="runs/base")
    (run_dir / "head.pt").write_bytes(b"")
    metrics = runs.read_metrics(run_dir)
    metrics["backbone"]["transform"] = {"resize": 8, "crop": 8, "interpolation": "bilinear"}
    runs.write_metrics(run_dir, metrics)

    assert runs.read_metrics(run_dir)["kind"] == "toy"  # the artifacts layer knows it
    assert runs.stages_of() == "train-head, fit-svm, finetune, knn, calibrate or toy-stage"
    assert inference.load_run(run_dir) == ("toy loaded", "head.pt")  # dispatched to its registered loader
    complete, _ = catalog.gather(artifacts)
    assert [catalog.model_group(m) for m in complete] == ["T"]
    assert catalog.row_for(complete[0])["backbone / weights / preset"] == "resnet18 / random / toy!"

    metrics = runs.read_metrics(run_dir)
    metrics["status"] = "failed"
    runs.write_metrics(run_dir, metrics)
    with pytest.raises(CarsTLError) as err:
        runs.model_file(run_dir)
    assert err.value.hint == f"fit it again: cars-tl toy-stage --run runs/base --out {run_dir} --force"
    assert (
        toy_kind.interrupted_hint
        == "rerun the same cars-tl toy-stage command with --force: the interrupted run is replaced"
    )


def test_a_kind_is_defined_once_and_each_part_registered_once():
    with pytest.raises(ValueError, match="clashes"):
        kinds.define(kinds.RunKind("knn", "knn2", "vote share", on_features=True, keeps_model=False, resumes=False))
    with pytest.raises(ValueError, match="clashes"):  # two kinds cannot come from one command
        kinds.define(kinds.RunKind("head2", "train-head", "probability", True, True, False))
    with pytest.raises(ValueError, match="already has a view"):
        kinds.register("head", view=catalog.KindView(group=str, setting=str, label=str))
    with pytest.raises(ValueError, match="no run kind 'nope'"):
        kinds.register("nope", loader=print)
    assert set(kinds.RUN_KINDS) == {"head", "svm", "finetune", "knn", "calibrated"}


def test_every_kind_carries_its_parts_and_hints():
    from cars_tl import cli
    from cars_tl.cli.app import RESUME_HINTS

    commands = {c.name for c in cli.app.registered_commands}
    for kind in kinds.RUN_KINDS.values():
        assert kind.stage in commands, kind.name
        assert kind.view is catalog.KIND_VIEWS[kind.name]
        assert (kind.loader is not None) == kind.keeps_model, kind.name
        assert RESUME_HINTS[kind.stage] == kind.interrupted_hint
    # the texts users saw before the kinds were records
    assert RESUME_HINTS["finetune"] == (
        "rerun the same cars-tl finetune command with --resume to continue from the last complete epoch"
    )
    assert runs.rerun_hint(Path("D"), {"kind": "svm", "config": {"features": "f.h5"}}) == (
        "fit it again: cars-tl fit-svm --features f.h5 --out D --force"
    )
    assert runs.rerun_hint(Path("D"), {"kind": "head", "config": {}}).startswith(
        "fit it again: cars-tl train-head --features F.h5"
    )
