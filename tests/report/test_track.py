"""``cars-tl track``: run directories mirrored into MLflow (read back with its client) and TensorBoard."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys

import numpy as np
import pytest


@pytest.fixture(scope="module")
def run_set(demo_features, demo_head_run, demo_finetune_run, tmp_path_factory):
    """An artifacts folder holding one run of every kind (copies: the tests rerun and break them)."""
    from cars_tl.stages.fit_svm import fit_svm
    from cars_tl.stages.knn import run_knn

    root = tmp_path_factory.mktemp("tracked")
    fit_svm(demo_features, kernel="linear", C="auto", cv_folds=2, out=root / "runs" / "svm")
    run_knn(demo_features, ks=("3", "5"), out=root / "runs" / "knn")
    shutil.copytree(demo_head_run, root / "runs" / "head")
    shutil.copytree(demo_finetune_run, root / "runs" / "ft", ignore=shutil.ignore_patterns("checkpoints"))
    return root


def fresh_copy(run_set, tmp_path):
    shutil.copytree(run_set, tmp_path / "a")
    return tmp_path / "a"


def _actions(results):
    return {r["run"].rsplit("/", 1)[-1]: r["action"] for r in results}


def test_mlflow_params_histories_tags_artifacts_and_idempotence(run_set, demo_features, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from cars_tl.report.track import track
    from cars_tl.stages.train_head import train_head

    artifacts = fresh_copy(run_set, tmp_path)
    uri = f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}"
    first = track([artifacts], to="mlflow", target=uri)
    assert _actions(first) == {"ft": "created", "head": "created", "knn": "created", "svm": "created"}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cars_tl")
    by_name = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(by_name) == {"ft", "head", "knn", "svm"}

    head_metrics = json.loads((artifacts / "runs" / "head" / "metrics.json").read_text())
    head = by_name["head"]
    assert head.data.params["config.lr"] == str(head_metrics["config"]["lr"])
    assert head.data.params["backbone.backbone"] == "resnet18"
    assert head.data.params["dataset_fingerprint"] == head_metrics["inputs"]["dataset_fingerprint"]
    assert head.data.params["seed"] == "0"
    history = sorted(client.get_metric_history(head.info.run_id, "train_loss"), key=lambda h: h.step)
    assert [h.step for h in history] == [r["epoch"] for r in head_metrics["history"]]
    assert [h.value for h in history] == pytest.approx([r["train_loss"] for r in head_metrics["history"]])
    assert head.data.metrics["final.test_acc"] == pytest.approx(head_metrics["final"]["test_acc"])
    assert {r: by_name[r].data.tags["cars_tl.model_group"] for r in by_name} == {
        "ft": "D",
        "head": "B",
        "knn": "kNN",
        "svm": "C",
    }
    assert (
        by_name["head"].data.tags["cars_tl.kind"] == "head" and by_name["head"].data.tags["cars_tl.preset"] == "study"
    )
    assert sorted(h.step for h in client.get_metric_history(by_name["knn"].info.run_id, "knn.test_acc")) == [3, 5]
    ft_steps = sorted(h.step for h in client.get_metric_history(by_name["ft"].info.run_id, "test_acc"))
    assert ft_steps == [0, 1]
    files = {f.path for f in client.list_artifacts(by_name["svm"].info.run_id)}
    assert {"metrics.json", "predictions-test.npz", "cv-linear.csv"} <= files
    assert "cv_acc_chosen" not in files and "kernel.linear.cv_acc" in by_name["svm"].data.metrics
    assert "checkpoints" not in {f.path for f in client.list_artifacts(by_name["ft"].info.run_id)}

    again = track([artifacts], to="mlflow", target=uri)
    assert set(_actions(again).values()) == {"unchanged"}
    assert len(client.search_runs([exp.experiment_id])) == 4

    train_head(demo_features, epochs=2, force=True, out=artifacts / "runs" / "head")  # a --force rerun
    third = track([artifacts], to="mlflow", target=uri)
    assert _actions(third) == {"ft": "unchanged", "head": "replaced", "knn": "unchanged", "svm": "unchanged"}
    active = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert len(active) == 4
    assert sorted(h.step for h in client.get_metric_history(active["head"].info.run_id, "train_loss")) == [1, 2]


def test_tensorboard_mirror_is_idempotent(run_set, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from cars_tl.report.track import track

    artifacts = fresh_copy(run_set, tmp_path)
    tb = tmp_path / "tb"
    assert set(_actions(track([artifacts / "runs"], to="tensorboard", target=str(tb))).values()) == {"created"}
    files = sorted(p.name for p in tb.rglob("*"))
    acc = event_accumulator.EventAccumulator(str(tb / "head"), size_guidance={"scalars": 0})
    acc.Reload()
    metrics = json.loads((artifacts / "runs" / "head" / "metrics.json").read_text())
    assert [e.step for e in acc.Scalars("loss/train")] == [r["epoch"] for r in metrics["history"]]
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    knn = event_accumulator.EventAccumulator(str(tb / "knn"), size_guidance={"scalars": 0})
    knn.Reload()
    assert [e.step for e in knn.Scalars("knn/test_acc")] == [3, 5]
    assert set(_actions(track([artifacts / "runs"], to="tensorboard", target=str(tb))).values()) == {"unchanged"}
    assert sorted(p.name for p in tb.rglob("*")) == files  # nothing new written


def test_failed_and_running_runs_are_skipped(run_set, tmp_path):
    pytest.importorskip("tensorboardX")
    from cars_tl.report.track import track

    artifacts = fresh_copy(run_set, tmp_path)
    for name, status in (("knn", "failed"), ("svm", "running")):
        path = artifacts / "runs" / name / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "status": status}))
        (artifacts / "runs" / name / "status.json").unlink()
    results = {
        r["run"].rsplit("/", 1)[-1]: r for r in track([artifacts], to="tensorboard", target=str(tmp_path / "tb"))
    }
    assert results["knn"]["action"] == "skipped" and "failed" in results["knn"]["detail"]
    assert results["svm"]["action"] == "skipped" and "running" in results["svm"]["detail"]
    assert not (tmp_path / "tb" / "knn").exists()


def test_missing_extras_name_them(run_set, tmp_path, monkeypatch):
    from cars_tl.core.errors import CarsTLError
    from cars_tl.report.track import track

    for module in ("mlflow", "mlflow.tracking"):  # import mlflow... -> ImportError, even after other tests imported it
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(CarsTLError) as err:
        track([run_set], to="mlflow", target=f"sqlite:///{tmp_path / 'x.db'}")
    assert "cars_tl[mlflow]" in err.value.hint
    with pytest.raises(CarsTLError) as err:
        track([run_set], to="tensorboard", target=str(tmp_path / "tb"))
    assert "cars_tl[tensorboard]" in err.value.hint


def test_cli_track_prints_a_line_per_run(run_set, tmp_path):
    pytest.importorskip("tensorboardX")
    from typer.testing import CliRunner

    from cars_tl.cli import app

    result = CliRunner().invoke(
        app, ["track", "--to", "tensorboard", str(tmp_path / "tb"), str(run_set / "runs" / "head")]
    )
    assert result.exit_code == 0, result.output
    assert "created" in result.output and "1 created" in result.output
    bad = CliRunner().invoke(app, ["track", "--to", "wandb", "x", str(run_set / "runs" / "head")])
    assert bad.exit_code == 2 and "valid: tensorboard, mlflow" in bad.output


def test_cv_table_labels_each_gamma_with_its_own_c_grid():
    from cars_tl.models.svm import search as svm_search
    from cars_tl.report.track import cv_tables

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(3, 8))[y] * 2 + rng.normal(size=(60, 8))
    found = svm_search.search(x, y, "poly", "auto", "cv", 3, 0.0, "l2", folds=3, seed=0)
    assert len({tuple(g) for g in found["C_grids"]}) > 1  # the gammas' grids differ: the case that matters
    rows = list(csv.DictReader(io.StringIO(cv_tables({"kernels": {"poly": {"search": found}}})["cv-poly.csv"])))
    expected = [
        (gamma, c, acc)
        for gamma, grid, accs in zip(found["gamma_grid"], found["C_grids"], found["cv_acc"])
        for c, acc in zip(grid, accs)
    ]
    assert len(rows) == len(expected)
    for row, (gamma, c, acc) in zip(rows, expected):
        assert float(row["gamma"]) == pytest.approx(gamma, rel=1e-5)
        assert float(row["C"]) == pytest.approx(c, rel=1e-5)
        assert float(row["cv_acc"]) == pytest.approx(acc)


def test_cv_table_labels_a_given_c_on_every_gamma():
    """--C given, --gamma cv: no C grid was searched, each gamma's one column is that C."""
    from cars_tl.report.track import cv_tables

    search = {"gamma_grid": [0.1, 1.0], "C_grid": None, "C_grids": None, "C": 2.5, "cv_acc": [[50.0], [60.0]]}
    rows = list(csv.DictReader(io.StringIO(cv_tables({"kernels": {"rbf": {"search": search}}})["cv-rbf.csv"])))
    assert [(float(r["gamma"]), float(r["C"]), float(r["cv_acc"])) for r in rows] == [
        (0.1, 2.5, 50.0),
        (1.0, 2.5, 60.0),
    ]


def _hostile_runs(artifacts):
    """Two good toy runs around three bad ones: nested past the JSON parser's depth, the wrong shape, huge."""
    from helpers import toy_run

    from cars_tl.artifacts import runs

    epochs = [{"epoch": e, "train_loss": 1.0 / e, "test_acc": 40.0 + e} for e in (1, 2)]
    toy_run(artifacts, "a-good", history=epochs)
    good = json.loads((artifacts / "runs" / "a-good" / runs.METRICS).read_text())
    for name, change in (
        ("b-nested", None),
        ("c-shape", {"history": [["epoch", 1]]}),
        ("d-huge", {"history": [{"epoch": e, "test_acc": 1.0} for e in range(10_001)]}),
    ):
        (artifacts / "runs" / name).mkdir(parents=True)
        text = '{"a": ' * 100_000 + "1" + "}" * 100_000 if change is None else json.dumps({**good, **change})
        (artifacts / "runs" / name / runs.METRICS).write_text(text)
    toy_run(artifacts, "e-good", history=epochs)


def test_a_bad_run_is_skipped_and_the_others_mirrored(tmp_path):
    pytest.importorskip("tensorboardX")
    from cars_tl.report.track import track

    _hostile_runs(tmp_path / "artifacts")
    results = {
        r["run"].rsplit("/", 1)[-1]: r
        for r in track([tmp_path / "artifacts"], to="tensorboard", target=str(tmp_path / "tb"))
    }
    assert {n: r["action"] for n, r in results.items()} == {
        "a-good": "created",
        "b-nested": "skipped",
        "c-shape": "skipped",
        "d-huge": "skipped",
        "e-good": "created",
    }
    assert "shape" in results["c-shape"]["detail"] and "10001 history" in results["d-huge"]["detail"]
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["a-good", "e-good"]


def test_tracking_stores_that_cannot_work_are_refused(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboardX")
    from helpers import toy_run

    from cars_tl.core.errors import CarsTLError
    from cars_tl.report.track import track

    toy_run(tmp_path / "artifacts", "r")
    (tmp_path / "afile.txt").write_text("x")
    cases = [
        ("mlflow", "gopher://x", "valid schemes: sqlite, http, https"),
        ("mlflow", f"file:{tmp_path / 'mlruns'}", "valid schemes"),
        ("mlflow", "sqlite://", "in-memory"),  # "1 created" into a store gone at exit
        ("mlflow", "sqlite:///:memory:", "in-memory"),
        ("mlflow", f"sqlite:///{tmp_path / 'afile.txt' / 'x.db'}", "which is a file"),
        ("tensorboard", str(tmp_path / "afile.txt"), "is an existing file"),
    ]
    for to, target, fragment in cases:
        with pytest.raises(CarsTLError) as err:
            track([tmp_path / "artifacts"], to=to, target=target)
        assert fragment in err.value.message and err.value.hint, (target, err.value.message)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()


def test_an_unreachable_mlflow_server_is_refused_at_once(tmp_path):
    pytest.importorskip("mlflow")
    import socket

    from helpers import assert_refused, run_cli, toy_run

    toy_run(tmp_path / "artifacts", "r")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli("track", "--to", "mlflow", f"http://127.0.0.1:{port}", tmp_path / "artifacts", timeout=90)
    assert_refused(result, f"cannot reach the MLflow tracking store at 127.0.0.1:{port}")
