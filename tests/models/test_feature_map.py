"""Feature maps: seeded and reproducible, stored beside the source and reused until it changes; the
fine-tune's penultimate features; inspect --embedding; the report section in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest


def _synthetic(tmp_path, seed: int, n: int = 120):
    """A run-like folder: metrics.json with class names and a penultimate-test.npz of clustered features."""
    from cars_tl.artifacts import embeddings

    names = [f"{make} Model{i} 2012" for make in ("Audi", "BMW", "Ford") for i in range(2)]
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(names), n)
    centres = rng.normal(size=(len(names), 32)) * 3
    x = centres[labels] + rng.normal(size=(n, 32))
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "metrics.json").write_text(json.dumps({"class_names": names}))
    return embeddings.save_penultimate(tmp_path, x, labels, np.arange(n))


def test_map_is_seeded_and_reused_until_the_source_changes(tmp_path):
    from cars_tl.models import feature_map

    source = _synthetic(tmp_path / "run", seed=1)
    first = feature_map.load_map(source, seed=0)
    assert first["reused"] is False and first["coords"].shape == (120, 2)
    assert first["knn_full"] > 90  # three well-separated makes
    again = feature_map.load_map(source, seed=0)
    assert again["reused"] is True
    np.testing.assert_array_equal(again["coords"], first["coords"])

    other = _synthetic(tmp_path / "copy", seed=1)  # the same features elsewhere: computed afresh, same map
    np.testing.assert_allclose(feature_map.load_map(other, seed=0)["coords"], first["coords"], atol=1e-5)
    assert feature_map.load_map(other, seed=3)["reused"] is False  # another seed is another map

    _synthetic(tmp_path / "run", seed=2)  # the source changes: its checksum too
    changed = feature_map.load_map(source, seed=0)
    assert changed["reused"] is False
    assert not np.allclose(changed["coords"], first["coords"])


def test_knn_accuracy_leaves_the_point_out():
    from cars_tl.models.feature_map import knn_accuracy

    x = np.array([[0.0], [0.1], [10.0], [10.1]])
    assert knn_accuracy(x, np.array([0, 0, 1, 1]), k=1) == 100.0
    assert knn_accuracy(x, np.array([0, 1, 0, 1]), k=1) == 0.0  # with itself counted it would be 100


def test_finetune_saves_its_penultimate_test_features(demo_finetune_run):
    from cars_tl.artifacts import embeddings, runs

    z = embeddings.load_penultimate(embeddings.penultimate_path(demo_finetune_run))
    p = runs.read_predictions(demo_finetune_run)
    assert z["features"].dtype == np.float16 and z["features"].shape == (len(p.labels), 512)  # resnet18's pooled width
    np.testing.assert_array_equal(z["ids"], p.ids)
    np.testing.assert_array_equal(z["labels"], p.labels)


def test_inspect_embedding_cli(demo_features, demo_dir, tmp_path):
    from typer.testing import CliRunner

    from cars_tl.cli import app

    cache = tmp_path / "tiny.h5"
    shutil.copy(demo_features, cache)
    argv = ["inspect", str(cache), "--embedding", str(tmp_path / "map.png"), "--data-dir", str(demo_dir)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "computed" in result.output and (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "tiny.h5.map-test.npz").is_file()
    assert "reused" in CliRunner().invoke(app, argv).output


def _broken_images(html_path, tmp_path) -> tuple[int, int]:
    """(images, broken images) of a page as headless Chromium renders it."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("headless Chromium absent (apt-get install -y chromium)")
    probe = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        "document.body.setAttribute('data-probe', imgs.length + ':' + imgs.filter(i => !i.complete || i.naturalWidth === 0).length); });"
        "</script>"
    )
    page = tmp_path / "probe.html"
    page.write_text(html_path.read_text().replace("</body>", probe + "</body>"))
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.search(r'data-probe="(\d+):(\d+)"', dom)
    assert found, dom[-500:]
    return int(found.group(1)), int(found.group(2))


def test_report_section_renders_in_chromium(demo_head_run, demo_finetune_run, demo_dir, tmp_path):
    from cars_tl.report.build import build_report

    artifacts = tmp_path / "artifacts"
    shutil.copytree(demo_head_run, artifacts / "runs" / "B")
    shutil.copytree(demo_finetune_run, artifacts / "runs" / "D", ignore=shutil.ignore_patterns("checkpoints"))
    result = build_report(artifacts, data_dir=demo_dir)
    html_path = artifacts / "report" / "report.html"
    text = html_path.read_text()
    assert "Feature space by make" in text and "feature map B" in text and "feature map D" in text
    assert (artifacts / "report" / "feature-map-D.png").is_file()
    assert "make-level 10-NN accuracy" in (artifacts / "report" / "report.md").read_text()
    images, broken = _broken_images(html_path, tmp_path)
    assert images >= 2 and broken == 0
    assert result["files"]["html"] == str(html_path)


def test_knn_accuracy_leaves_the_exact_duplicates_out():
    from cars_tl.models.feature_map import knn_accuracy

    rng = np.random.default_rng(0)
    x, groups = rng.normal(size=(40, 8)), rng.integers(0, 4, 40)
    tripled, tripled_groups = np.repeat(x, 3, axis=0), np.repeat(groups, 3)
    # Each image three times: its two copies must not vote. Its 3 nearest others are then the three
    # copies of its nearest distinct neighbour, so 3-NN on the tripled set is 1-NN on the distinct rows.
    assert knn_accuracy(tripled, tripled_groups, k=3) == knn_accuracy(x, groups, k=1)
    assert knn_accuracy(tripled, tripled_groups, k=3) < 90  # counting its copies, every row would be right
    assert np.isnan(knn_accuracy(np.zeros((6, 2)), np.arange(6) % 2))  # nothing but copies: nothing to vote


@pytest.mark.slow  # one t-SNE of 120 points
def test_map_figures_leave_each_image_s_copies_out():
    from cars_tl.models.feature_map import compute, knn_accuracy

    rng = np.random.default_rng(1)
    makes = rng.integers(0, 3, 40)
    x = np.repeat(rng.normal(size=(3, 16))[makes] + rng.normal(size=(40, 16)) * 2, 3, axis=0)
    result = compute(x, np.repeat(makes, 3))
    copies = np.repeat(np.arange(40), 3)  # t-SNE need not put the copies on one point: they still go
    assert result["knn_map"] == knn_accuracy(result["coords"], np.repeat(makes, 3), same=copies)
    assert result["knn_full"] == knn_accuracy(
        x / np.linalg.norm(x, axis=1, keepdims=True), np.repeat(makes, 3), same=copies
    )


def test_inspect_embedding_refuses_non_finite_features_and_a_folder_as_output(demo_features, tmp_path):
    from helpers import assert_refused, poisoned, rewrite_cache, run_cli

    cache = rewrite_cache(demo_features, tmp_path / "nan.h5", test=poisoned)
    result = run_cli("inspect", cache, "--embedding", tmp_path / "map.png", "--data-dir", tmp_path / "none")
    assert_refused(result, str(cache), "1 of", "not finite")
    assert not (tmp_path / "map.png").exists()

    good = shutil.copy(demo_features, tmp_path / "tiny.h5")
    (tmp_path / "folder").mkdir()
    result = run_cli("inspect", good, "--embedding", tmp_path / "folder", "--data-dir", tmp_path / "none")
    assert_refused(result, "--embedding", "is a folder")
    assert not list(tmp_path.glob("*.map-*.npz"))  # refused before the map was computed
