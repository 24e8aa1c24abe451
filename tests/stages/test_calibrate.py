"""calibrate: temperature scaling fitted on a run's validation split, written as a calibrated run that
predict and the report read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import assert_refused, run_cli, tiny

from cars_tl.artifacts import features, runs
from cars_tl.core.errors import CarsTLError
from cars_tl.data import manifest as manifests
from cars_tl.data.images import open_image
from cars_tl.models import calibration
from cars_tl.models.inference import load_run
from cars_tl.models.training import stratified_split
from cars_tl.stages.calibrate import calibrate
from cars_tl.stages.predict import predict, predict_split


@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_fitting_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 10))
    # labels drawn from softmax(logits / T): the NLL-optimal temperature is T
    probs = calibration.probabilities(logits, true_t)
    labels = (probs.cumsum(1) > rng.uniform(size=(len(probs), 1))).argmax(1)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.03)
    assert calibration.nll(logits, labels, true_t) < calibration.nll(logits, labels, 1.0)


def test_ece_and_nll_on_a_hand_checked_case():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    # bins of 1/15: 0.9 -> bin 13 (2 rows, half right), 0.6 -> one right row, 0.7 -> one right row
    assert calibration.ece(probs, labels) == pytest.approx(2 / 4 * 0.4 + 1 / 4 * 0.4 + 1 / 4 * 0.3)
    logits = np.log(probs)
    assert calibration.nll(logits, labels) == pytest.approx(-np.log([0.9, 0.1, 0.6, 0.7]).mean())
    # T = 2: softmax(log p / 2) is proportional to sqrt(p); [0.9, 0.1] -> [0.75, 0.25]
    assert calibration.probabilities(logits, 2.0)[0] == pytest.approx([0.75, 0.25])
    r = calibration.reliability(probs, labels)
    assert r.counts.sum() == 4 and r.counts[13] == 2 and r.accuracy[13] == 0.5


def test_a_run_without_a_validation_split_is_refused(demo_head_run, tmp_path):
    # the study head trains on all of train: nothing held out
    result = run_cli("calibrate", "--run", demo_head_run, "--out", tmp_path / "c")
    assert_refused(result, "no validation split", "preset 'study'", "--preset tuned")
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def tuned_head(demo_features, tmp_path_factory):
    """A tuned head whose validation rows stay held out of its final fit."""
    from cars_tl.stages.train_head import train_head

    run_dir, _ = train_head(
        demo_features, preset="tuned", epochs=2, refit=False, out=tmp_path_factory.mktemp("h") / "head"
    )
    return run_dir


def test_a_refitted_tuned_head_is_refused(demo_features, tmp_path):
    # train-head's default refits the chosen head on all of train: its validation rows were training rows
    result = run_cli(
        "train-head", "--features", demo_features, "--preset", "tuned", "--epochs", "1", "--out", tmp_path / "h"
    )
    assert result.returncode == 0, result.stdout
    result = run_cli("calibrate", "--run", tmp_path / "h", "--out", tmp_path / "c")
    assert_refused(
        result,
        str(tmp_path / "h"),
        "refitted on all of train",
        "validation rows were training rows",
        f"cars-tl train-head --features {demo_features} --preset tuned --no-refit",
    )
    assert not (tmp_path / "c").exists()


def test_the_temperature_comes_from_held_out_rows(tuned_head, demo_features, tmp_path):
    """--no-refit: the final head never trained on the validation rows T is fitted on, and T fitted there
    lowers (never raises) their NLL, as temperature scaling must on the rows it is fitted to."""
    m = runs.read_metrics(tuned_head)
    assert m["config"]["refit"] is False and m["selection"]["selected_on"] == "validation"
    train = features.load(demo_features).split("train")
    fit_idx, val_idx = stratified_split(train.labels, m["selection"]["val_fraction"], m["config"]["seed"])
    assert not set(fit_idx) & set(val_idx)
    _, c = calibrate(tuned_head, out=tmp_path / "cal")
    v = c["calibration"]["validation"]
    assert v["images"] == len(val_idx) and v["nll_after"] <= v["nll_before"]
    assert "note" not in c["calibration"]


def _head_logits(run_dir, x):
    state = torch.load(run_dir / "head.pt", weights_only=True)
    return (torch.as_tensor(x) @ state["weight"].T + state["bias"]).double().numpy()


def test_tuned_head_end_to_end(tuned_head, demo_dir, tmp_path):
    out = tmp_path / "runs" / "cal"
    result = run_cli("calibrate", "--run", tuned_head, "--out", out, "--data-dir", demo_dir)
    assert result.returncode == 0, result.stdout
    assert "T=" in result.stdout and "note:" not in result.stdout
    m = runs.read_metrics(out)
    assert m["kind"] == "calibrated" and m["status"] == "complete"
    assert {p.name for p in out.iterdir()} >= {
        "metrics.json",
        "temperature.json",
        "predictions-test.npz",
        "reliability.png",
    }
    # the numbers, recomputed from the cache and head.pt without the stage's code
    cache = features.load(json.loads((tuned_head / "metrics.json").read_text())["inputs"]["features"]["path"])
    train, test = cache.split("train"), cache.split("test")
    _, val_idx = stratified_split(train.labels, 0.1, 0)
    val_logits = _head_logits(tuned_head, train.features[val_idx])
    t = calibration.fit_temperature(val_logits, train.labels[val_idx])
    c = m["calibration"]
    assert c["temperature"] == pytest.approx(t, abs=1e-6) and c["validation"]["images"] == len(val_idx)
    test_logits = _head_logits(tuned_head, test.features)
    p_before, p_after = calibration.probabilities(test_logits), calibration.probabilities(test_logits, t)
    assert c["test"]["ece_before"] == pytest.approx(calibration.ece(p_before, test.labels), abs=1e-5)
    assert c["test"]["ece_after"] == pytest.approx(calibration.ece(p_after, test.labels), abs=1e-5)
    assert c["test"]["nll_after"] == pytest.approx(calibration.nll(test_logits, test.labels, t), abs=1e-5)
    saved, base = runs.read_predictions(out), runs.read_predictions(tuned_head)
    np.testing.assert_array_equal(saved.ids, base.ids)
    np.testing.assert_array_equal(saved.top_classes, base.top_classes)  # dividing by T keeps every ranking
    np.testing.assert_allclose(saved.top_scores, np.sort(p_after, 1)[:, ::-1][:, :5], atol=1e-6)
    # predict --split rewrites the same file
    before = dict(np.load(runs.predictions_path(out)))
    predict_split([out], split="test", data_dir=demo_dir, workers=0)
    for key, value in np.load(runs.predictions_path(out)).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    # predict on image files: the base run's logits / T, softmaxed
    manifest = manifests.load_manifest(demo_dir)
    paths = [manifest.root / r.path for r in manifest.split("test")[:3]]
    top = [r["predictions"]["cal"]["top"] for r in predict(paths, run_dirs=[out], top_k=3)]
    base_run = load_run(tuned_head)
    rows = base_run.embed(torch.stack([base_run.tensor(open_image(p)) for p in paths])).numpy()
    expected = calibration.probabilities(_head_logits(tuned_head, rows), c["temperature"])
    for got, want in zip(top, expected):
        assert [e["label"] for e in got] == list(np.argsort(-want)[:3])
        np.testing.assert_allclose([e["score"] for e in got], np.sort(want)[::-1][:3], atol=2e-6)
    # a calibrated run is not calibrated again; a damaged temperature file is a message
    with pytest.raises(CarsTLError, match="already calibrated"):
        calibrate(out, out=tmp_path / "again")
    (out / "temperature.json").write_text('{"temperature": -1, "base_run": "x"}')
    with pytest.raises(CarsTLError, match="positive finite temperature"):
        load_run(out)


def test_a_retrained_base_run_is_noticed(tuned_head, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tuned_head, base)
    run_dir, _ = calibrate(base, out=tmp_path / "cal")
    state = torch.load(base / "head.pt", weights_only=True)
    state["bias"] = state["bias"] + 1
    torch.save(state, base / "head.pt")
    with pytest.raises(CarsTLError, match="another model"):
        load_run(run_dir)


@pytest.mark.slow  # a fine-tune epoch, then its validation and test images scored again
def test_tuned_finetune_end_to_end(demo_dir, tmp_path):
    from cars_tl.stages.finetune import finetune

    base, _ = finetune(
        demo_dir,
        unfreeze="layer4",
        preset="tuned",
        epochs=1,
        out=tmp_path / "runs" / "ft",
        **tiny(batch_size=32, image_size=32),
    )
    run_dir, m = calibrate(base, data_dir=demo_dir, artifacts=tmp_path, workers=0)
    assert run_dir == tmp_path / "runs" / "ft-calibrated" and "note" not in m["calibration"]
    labels = np.array([r.label for r in manifests.load_manifest(demo_dir).split("train")])
    assert m["calibration"]["validation"]["images"] == len(stratified_split(labels, 0.1, 0)[1])
    saved, before = runs.read_predictions(run_dir), runs.read_predictions(base)
    np.testing.assert_array_equal(saved.top_classes, before.top_classes)
    # predict: the base run's probabilities p over all 6 classes, rescaled as softmax(log p / T)
    manifest = manifests.load_manifest(demo_dir)
    paths = [manifest.root / r.path for r in manifest.split("test")[:4]]
    results = predict(paths, run_dirs=[base, run_dir], top_k=6)
    t = m["calibration"]["temperature"]
    for r in results:
        p = {e["label"]: e["score"] for e in r["predictions"]["ft"]["top"]}
        want = calibration.probabilities(np.log([[p[j] for j in range(6)]]), t)[0]
        got = {e["label"]: e["score"] for e in r["predictions"]["ft-calibrated"]["top"]}
        np.testing.assert_allclose([got[j] for j in range(6)], want, atol=5e-5)
    # the report shows the calibration section with its diagram
    from cars_tl.report.build import build_report

    build_report(tmp_path, data_dir=None)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Calibration" in text and "reliability.png" in text and f"{t:.4f}" in text
    assert "Calibration</h2>" in (tmp_path / "report" / "report.html").read_text()
