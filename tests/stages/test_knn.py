"""knn: the DINO weighted vote on a toy set with a known answer, many k in one pass, clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cars_tl.artifacts import features, runs
from cars_tl.cli import app
from cars_tl.core.errors import CarsTLError
from cars_tl.stages.knn import knn_scores, run_knn


def _attrs(num_classes=3, dim=2):
    return {
        "backbone": "resnet18",
        "weights": "random",
        "weights_digest": "ab" * 32,
        "transform": {"crop": 8},
        "crop": "full",
        "margin": 0.0,
        "precision": "fp32",
        "class_names": [f"Make{i} Model" for i in range(num_classes)],
        "num_classes": num_classes,
        "feature_dim": dim,
        "dataset_fingerprint": "cd" * 32,
        "versions": {},
        "options": {},
        "skip_bad": False,
    }


def _toy_cache(path, train_x, train_y, test_x, test_y):
    def split(x, y, offset):
        x = np.asarray(x, np.float32)
        return features.SplitArrays(
            x, np.asarray(y), np.arange(offset, offset + len(x)), [f"i/{offset + i}.jpg" for i in range(len(x))], []
        )

    num_classes = int(max(max(train_y), max(test_y))) + 1
    return features.write(
        path,
        _attrs(num_classes, len(train_x[0])),
        {"train": split(train_x, train_y, 0), "test": split(test_x, test_y, len(train_x))},
    )


# Three classes on three directions of the plane (lengths vary: only the direction counts).
TRAIN_X = [[1, 0], [2, 0.1], [3, -0.1], [0, 1], [0.1, 2], [-0.1, 5], [-1, 0], [-2, 0.2]]
TRAIN_Y = [0, 0, 0, 1, 1, 1, 2, 2]
TEST_X = [[5, 0.2], [0.2, 1], [-3, 0], [0.7, 0.75]]
TEST_Y = [0, 1, 2, 0]


def test_knn_votes_by_exp_cosine_over_temperature():
    x = np.asarray(TRAIN_X, np.float32)
    q = np.asarray(TEST_X, np.float32)
    votes = knn_scores(x, np.asarray(TRAIN_Y), q, (3, 8), 0.1, 3)
    # The answer computed by hand, the slow way: every neighbour's exp(cos / T) into its class.
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sim = unit(q) @ unit(x).T
    for k in (3, 8):
        expected = np.zeros((len(q), 3))
        for i in range(len(q)):
            for j in np.argsort(-sim[i])[:k]:
                expected[i, TRAIN_Y[j]] += np.exp(sim[i, j] / 0.1)
        # The same vote up to one factor per test image (the stable form scales by exp(-top cos / T)).
        share = lambda v: v / v.sum(axis=1, keepdims=True)  # noqa: E731
        np.testing.assert_allclose(share(votes[k]), share(expected), rtol=1e-5)
    assert list(votes[3].argmax(1)[:3]) == [0, 1, 2]


def test_a_close_neighbour_outweighs_two_far_ones_at_low_temperature():
    # One class-1 neighbour at cosine 1, two class-0 neighbours at cosine 0.6: with T = 0.07 the
    # close one wins (e^(1/0.07) > 2 e^(0.6/0.07)); with T = 10 the vote is nearly a plain count.
    x = np.array([[1, 0], [0.6, 0.8], [0.6, -0.8]], np.float32)
    y = np.array([1, 0, 0])
    query = np.array([[1, 0]], np.float32)
    assert knn_scores(x, y, query, (3,), 0.07, 2)[3].argmax() == 1
    assert knn_scores(x, y, query, (3,), 10.0, 2)[3].argmax() == 0
    assert knn_scores(x, y, query, (1,), 10.0, 2)[1].argmax() == 1


def test_chunking_does_not_change_the_answer():
    rng = np.random.default_rng(0)
    x, y, q = rng.normal(size=(50, 8)), rng.integers(0, 4, 50), rng.normal(size=(23, 8))
    whole = knn_scores(x, y, q, (5,), 0.07, 4, chunk=1000)[5]
    pieces = knn_scores(x, y, q, (5,), 0.07, 4, chunk=4)[5]
    np.testing.assert_allclose(whole, pieces, rtol=1e-5)  # float32 products, blocked differently


def test_knn_run_saves_metrics_and_predictions(tmp_path):
    cache = _toy_cache(tmp_path / "toy.h5", TRAIN_X, TRAIN_Y, TEST_X, TEST_Y)
    run_dir, metrics = run_knn(cache, ks=("3,8",), temperature=0.1, out=tmp_path / "knn")
    assert metrics["kind"] == "knn" and metrics["status"] == "complete"
    assert set(metrics["k_results"]) == {"3", "8"} and metrics["final"]["k"] == 3
    saved = runs.read_metrics(run_dir)
    predictions = runs.read_predictions(run_dir)
    assert predictions.score_kind == "vote share"
    assert list(predictions.ids) == [8, 9, 10, 11] and list(predictions.labels) == TEST_Y
    assert predictions.accuracy() == pytest.approx(saved["final"]["test_acc"])
    assert list(predictions.top_classes[:3, 0]) == [0, 1, 2]
    np.testing.assert_allclose(predictions.top_scores.sum(1), 1.0, rtol=1e-5)  # 3 classes: the whole vote


def test_k_larger_than_the_train_split_is_refused(tmp_path):
    cache = _toy_cache(tmp_path / "toy.h5", TRAIN_X, TRAIN_Y, TEST_X, TEST_Y)
    result = CliRunner().invoke(app, ["knn", "--features", str(cache), "--k", "5,9", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "--k 9 is larger than the train split" in result.output and "8 images" in result.output
    assert not (tmp_path / "r").exists()
    with pytest.raises(CarsTLError, match="at least 1"):
        run_knn(cache, ks=("0",), out=tmp_path / "r")
    with pytest.raises(CarsTLError, match="temperature"):
        run_knn(cache, temperature=float("nan"), out=tmp_path / "r")


def test_an_existing_run_needs_force_and_nan_features_are_refused(tmp_path):
    cache = _toy_cache(tmp_path / "toy.h5", TRAIN_X, TRAIN_Y, TEST_X, TEST_Y)
    out = tmp_path / "knn"
    run_knn(cache, ks=(3,), out=out)
    with pytest.raises(CarsTLError, match="already exists"):
        run_knn(cache, ks=(3,), out=out)
    run_knn(cache, ks=(4,), out=out, force=True)
    assert json.loads((out / runs.METRICS).read_text())["final"]["k"] == 4
    bad_x = [list(r) for r in TRAIN_X]
    bad_x[2][0] = float("nan")
    bad = _toy_cache(tmp_path / "bad.h5", bad_x, TRAIN_Y, TEST_X, TEST_Y)
    with pytest.raises(CarsTLError, match="1 train feature vectors contain NaN"):
        run_knn(bad, ks=(3,), out=tmp_path / "bad")


def test_predict_refuses_a_knn_run(tmp_path, demo_dir):
    cache = _toy_cache(tmp_path / "toy.h5", TRAIN_X, TRAIN_Y, TEST_X, TEST_Y)
    run_dir, _ = run_knn(cache, ks=(3,), out=tmp_path / "knn")
    image = next((demo_dir / "stanford_cars" / "cars_test").iterdir())
    result = CliRunner().invoke(app, ["predict", str(image), "--model", str(run_dir)])
    assert result.exit_code == 2 and "is a knn run" in result.output


def _reference_votes(train_x, train_y, test_x, k, temperature, num_classes):
    """The DINO vote in float64 with log-sum-exp per class: exact for any T, slow."""
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sim = unit(np.asarray(test_x, np.float64)) @ unit(np.asarray(train_x, np.float64)).T
    logits = np.full((len(sim), num_classes), -np.inf)
    for i in range(len(sim)):
        near = np.argsort(-sim[i], kind="stable")[:k]
        for c in np.unique(train_y[near]):
            logits[i, c] = np.logaddexp.reduce(sim[i, near[train_y[near] == c]] / temperature)
    return logits


@pytest.mark.parametrize("temperature", [0.01, 1e-4])
def test_small_temperatures_vote_like_a_float64_reference(demo_features, temperature):
    # T = 0.01 overflowed exp(cos / T) in float32 (inf everywhere: predictions at chance); 1e-4 is far below.
    cache = features.load(demo_features)
    tr, te = cache.split("train"), cache.split("test")
    votes = knn_scores(tr.features, tr.labels, te.features, (20,), temperature, cache.num_classes)[20]
    assert np.isfinite(votes).all() and (votes.max(axis=1) >= 1 - 1e-6).all()  # the nearest weighs 1
    reference = _reference_votes(tr.features, tr.labels, te.features, 20, temperature, cache.num_classes)
    np.testing.assert_array_equal(votes.argmax(axis=1), reference.argmax(axis=1))
    accuracy = float((votes.argmax(axis=1) == te.labels).mean())
    chance = 1 / cache.num_classes
    assert accuracy > 2 * chance, f"{accuracy:.1%} at T={temperature} (chance {chance:.1%})"


def test_knn_run_at_a_small_temperature_is_not_at_chance(demo_features, tmp_path):
    _, small = run_knn(demo_features, ks=(20,), temperature=0.01, out=tmp_path / "t001")
    _, usual = run_knn(demo_features, ks=(20,), temperature=0.07, out=tmp_path / "t007")
    chance = 100 / features.load(demo_features).num_classes
    assert small["final"]["test_acc"] > 2 * chance and usual["final"]["test_acc"] > 2 * chance


@pytest.mark.parametrize("temperature", [1e-46, 5e-324])
def test_a_temperature_below_float32_range_votes_for_the_nearest(tmp_path, temperature):
    # float32 rounds these T to 0: the top neighbour's 0 / 0 = NaN outvoted everything and the run was
    # saved as complete below chance. Any positive T is a limit of the vote: the nearest neighbour decides.
    cache = _toy_cache(tmp_path / "toy.h5", TRAIN_X, TRAIN_Y, TEST_X, TEST_Y)
    votes = knn_scores(np.asarray(TRAIN_X), np.asarray(TRAIN_Y), np.asarray(TEST_X), (3,), temperature, 3)[3]
    assert np.isfinite(votes).all()
    np.testing.assert_array_equal(votes.argmax(axis=1), [0, 1, 2, 1])  # TEST_X[3] is nearest to [0, 1]
    run_dir, metrics = run_knn(cache, ks=(3,), temperature=temperature, out=tmp_path / "knn")
    _, usual = run_knn(cache, ks=(3,), temperature=1e-3, out=tmp_path / "usual")
    assert metrics["final"]["test_acc"] == usual["final"]["test_acc"] == 75.0
    assert np.isfinite(runs.read_predictions(run_dir).top_scores).all()
