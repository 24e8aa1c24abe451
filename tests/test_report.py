"""report: every run in the table, curves, kernels, sparsity chart, incomplete runs listed."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from cars_tl import runs
from cars_tl.cli import app
from cars_tl.sparsity import measure


def test_report_mentions_every_run(demo_dir, demo_finetune_run, demo_head_run, demo_svm_run, tmp_path):
    artifacts = tmp_path / "artifacts"
    for run in (demo_finetune_run, demo_head_run, demo_svm_run):
        shutil.copytree(run, artifacts / "runs" / run.name)
    broken = artifacts / "runs" / "half-done"
    shutil.copytree(demo_finetune_run, broken)
    metrics = json.loads((broken / runs.METRICS).read_text())
    metrics.update(status="running", name="half-done")
    (broken / runs.METRICS).write_text(json.dumps(metrics))
    measure([demo_head_run], split="test", limit=2, data_dir=demo_dir, out=artifacts / "sparsity")

    result = CliRunner().invoke(app, ["report", "--artifacts", str(artifacts)])
    assert result.exit_code == 0, result.output
    md = (artifacts / "report" / "report.md").read_text()
    html = (artifacts / "report" / "report.html").read_text()
    for run in (demo_finetune_run, demo_head_run, demo_svm_run):
        assert run.name in md and run.name in html
    assert "half-done" in md and "Incomplete runs" in md and "half-done" in result.output.replace("\n", "")
    assert "SVM kernels" in md and "poly" in md
    assert "sparsity.png" in md and html.count("data:image/png;base64,") >= 3  # curves x2 + sparsity
    assert (artifacts / "report" / f"curves-{demo_finetune_run.name}.png").is_file()
    assert "23,909,636" not in md  # resnet18 here: the table shows the runs' own counts
    assert f"{runs.read_metrics(demo_head_run)['params']['trainable']:,}" in md


def test_report_without_runs_says_what_to_do(tmp_path):
    result = CliRunner().invoke(app, ["report", "--artifacts", str(tmp_path)])
    assert result.exit_code == 2 and "train-head" in result.output
