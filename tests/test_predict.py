"""predict: all three kinds of run side by side, JSON output, clear errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cars_tl.cli import app
from cars_tl.predict import predict
from conftest import SHARED_MINI, needs_mini

REAL_IMAGE = SHARED_MINI / "stanford_cars" / "cars_test" / "00001.jpg"


@needs_mini
def test_predict_with_every_kind_of_run_on_a_real_image(demo_finetune_run, demo_head_run, demo_svm_run):
    [result] = predict([REAL_IMAGE], [demo_finetune_run, demo_head_run, demo_svm_run], top_k=3)
    assert result["image"] == str(REAL_IMAGE)
    kinds = {p["kind"]: p for p in result["predictions"].values()}
    assert set(kinds) == {"finetune", "head", "svm"}
    for kind in ("finetune", "head"):
        scores = [t["score"] for t in kinds[kind]["top"]]
        assert kinds[kind]["score_kind"] == "probability"
        assert scores == sorted(scores, reverse=True) and 0 <= sum(scores) <= 1 + 1e-6
    assert kinds["svm"]["score_kind"] == "decision score"
    for p in kinds.values():
        assert len(p["top"]) == 3 and all(t["class"] for t in p["top"])


@needs_mini
def test_cli_table_and_json(demo_head_run, demo_svm_run):
    runner = CliRunner()
    table = runner.invoke(app, ["predict", str(REAL_IMAGE), "--model", str(demo_head_run), "--model", str(demo_svm_run)])
    assert table.exit_code == 0, table.output
    assert "probability" in table.output and "decision score" in table.output
    as_json = runner.invoke(app, ["predict", str(REAL_IMAGE), "--model", str(demo_head_run), "--json", "--top-k", "2"])
    parsed = json.loads(as_json.stdout)
    assert len(next(iter(parsed[0]["predictions"].values()))["top"]) == 2


def test_head_prediction_matches_the_cached_features(demo_dir, demo_head_run, demo_features):
    """The head's backbone is rebuilt from the run: same features, same prediction as the cache."""
    import numpy as np
    import torch

    from cars_tl import data, features

    cache = features.load(demo_features).split("test")
    image = data.load_manifest(demo_dir).root / cache.paths[0]
    [result] = predict([image], [demo_head_run], top_k=1)
    state = torch.load(demo_head_run / "head.pt", weights_only=True)
    expected = int(np.argmax(cache.features[0] @ state["weight"].numpy().T + state["bias"].numpy()))
    assert next(iter(result["predictions"].values()))["top"][0]["label"] == expected


@pytest.mark.parametrize("case", ["missing image", "not an image", "not a run", "missing model file"])
def test_errors_name_the_offender_and_exit_non_zero(case, demo_head_run, tmp_path):
    import shutil

    image, run = tmp_path / "img.jpg", demo_head_run
    if case == "missing image":
        offender = str(image)
    elif case == "not an image":
        image.write_text("plain text")
        offender = "img.jpg"
    elif case == "not a run":
        image.write_text("x")
        run = tmp_path / "empty-run"
        run.mkdir()
        offender = "empty-run"
    else:
        image.write_text("x")
        run = tmp_path / "copy"
        shutil.copytree(demo_head_run, run)
        (run / "head.pt").unlink()
        offender = "head.pt"
    result = CliRunner().invoke(app, ["predict", str(image), "--model", str(run)])
    assert result.exit_code == 2
    assert offender in result.output and "Traceback" not in result.output
