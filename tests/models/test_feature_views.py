"""Flip-averaged and multi-stage feature rows (--tta, --layers): what the cache holds, what it
records, and that every stage rebuilding a run from images gives the same rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TINY, TINY_CLI, assert_images_reproduce_saved, tiny

from cars_tl.artifacts import features, names
from cars_tl.core.errors import CarsTLError
from cars_tl.data import manifest as manifests
from cars_tl.data import transforms
from cars_tl.data.images import open_image
from cars_tl.models import backbones, feature_views, inference
from cars_tl.stages import extract, presets

BUILD = dict(image_size=TINY["image"].image_size)


def _extract(demo_dir, out, **options):
    extract.extract_features(demo_dir, splits=("test",), out=out, **tiny(batch_size=16, **options))
    return features.load(out, ("test",))


def _tensors(demo_dir, cache, spec, rows):
    manifest = manifests.load_manifest(demo_dir)
    transform = transforms.eval_transform(spec)
    return torch.stack([transform(open_image(manifest.root / cache.split("test").paths[i])) for i in rows])


@pytest.fixture(scope="module")
def plain_cache(demo_dir, tmp_path_factory):
    return _extract(demo_dir, tmp_path_factory.mktemp("fv") / "plain.h5")


@pytest.fixture(scope="module")
def both_cache(demo_dir, tmp_path_factory):
    return _extract(demo_dir, tmp_path_factory.mktemp("fv") / "both.h5", tta="flip", layers="layer3,layer2,final")


def test_flip_rows_are_the_mean_of_the_two_single_view_extractions(demo_dir, plain_cache, tmp_path):
    flipped = _extract(demo_dir, tmp_path / "flip.h5", tta="flip")
    assert feature_views.options(flipped.attrs["transform"])["tta"] == "flip"
    rows = list(range(min(6, len(plain_cache.split("test").labels))))
    bb = backbones.build_backbone(TINY["backbone"], TINY["weights"], **BUILD)
    images = _tensors(demo_dir, plain_cache, bb.transform, rows)
    body = extract.prepare_body(bb.body, "cpu", TINY["image"].image_size)  # the single-view extraction's body
    with torch.inference_mode():
        mirrored = body(images.flip(-1)).numpy()
    single = plain_cache.split("test").features[rows]
    np.testing.assert_allclose(single, body(images).numpy(), rtol=1e-4, atol=1e-5)  # the plain cache is that body's
    expected = (single + mirrored) / 2
    np.testing.assert_allclose(flipped.split("test").features[rows], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(flipped.split("test").features[rows], single, atol=1e-4)  # the mirror did change them


def test_stage_columns_are_the_hooked_pooled_outputs_in_the_recorded_order(demo_dir, tmp_path):
    cache = _extract(demo_dir, tmp_path / "raw.h5", layers="layer3,layer2,final", combine="raw")
    recorded = cache.attrs["transform"]["features"]
    assert recorded["layers"] == ["layer3", "layer2", "final"] and recorded["combine"] == "raw"
    columns = recorded["columns"]
    assert list(columns) == ["layer3", "layer2", "final"]
    assert [columns[n][0] for n in recorded["layers"]] == [0, columns["layer3"][1], columns["layer2"][1]]
    assert cache.feature_dim == columns["final"][1] == 256 + 128 + 512
    bb = backbones.build_backbone(TINY["backbone"], TINY["weights"], **BUILD)
    rows = [0, 1, 2]
    images = _tensors(demo_dir, cache, bb.transform, rows)
    pooled = {}
    handles = [
        bb.body.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: pooled.__setitem__(n, o.mean((2, 3))))
        for n in ("layer2", "layer3")
    ]
    with torch.inference_mode():
        pooled["final"] = bb.body.eval()(images)
    for h in handles:
        h.remove()
    got = cache.split("test").features[rows]
    for name, (start, stop) in columns.items():
        np.testing.assert_allclose(got[:, start:stop], pooled[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_l2_combination_normalises_each_block(both_cache):
    columns = both_cache.attrs["transform"]["features"]["columns"]
    rows = both_cache.split("test").features
    for name, (start, stop) in columns.items():
        # flip averages two unit vectors: norms at most 1, and near it
        norms = np.linalg.norm(rows[:, start:stop], axis=1)
        assert np.all(norms <= 1 + 1e-5) and np.all(norms > 0.5), name


def test_folding_keeps_the_tapped_stages_and_still_folds(tmp_path):
    bb = backbones.build_backbone(TINY["backbone"], TINY["weights"], **BUILD)
    spec = feature_views.with_options(bb.transform, "none", ["layer3", "final"])
    example = torch.randn(2, 3, 64, 64)
    prepared = feature_views.prepare(bb.body, spec, example)
    assert isinstance(prepared, feature_views.FeatureBody)
    count = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    assert count(prepared.body) < count(bb.body)  # folded (not the unfolded fallback)
    reference = feature_views.FeatureBody(bb.body, ["layer3", "final"])
    with torch.inference_mode():
        torch.testing.assert_close(prepared(example), reference(example), rtol=1e-4, atol=1e-5)
    reference.close()


def test_prediction_reproduces_the_cached_row_of_a_flip_multi_stage_cache(demo_dir, both_cache, tmp_path):
    from cars_tl.stages.fit_svm import fit_svm
    from cars_tl.stages.predict import predict
    from cars_tl.stages.train_head import train_head

    extract.extract_features(
        demo_dir,
        splits=("train",),
        out=both_cache.path,
        tta="flip",
        layers="layer3,layer2,final",
        **tiny(batch_size=16),
    )  # add train to the same file
    head_dir, _ = train_head(both_cache.path, out=tmp_path / "head")
    svm_dir, _ = fit_svm(both_cache.path, kernel="linear", out=tmp_path / "svm")
    cache = features.load(both_cache.path, ("test",)).split("test")
    manifest = manifests.load_manifest(demo_dir)
    for run_dir in (head_dir, svm_dir):
        run = inference.load_run(run_dir)
        assert run.spec["features"]["tta"] == "flip"
        images = [open_image(manifest.root / cache.paths[i]) for i in (0, 1)]
        rows = run.embed(torch.stack([run.tensor(im) for im in images])).numpy()
        np.testing.assert_array_equal(rows, cache.features[:2])  # extraction's own code: folded taps and all
    [result] = predict([manifest.root / cache.paths[0]], run_dirs=[head_dir], top_k=1)
    state = torch.load(head_dir / "head.pt", weights_only=True)
    expected = int(np.argmax(cache.features[0] @ state["weight"].numpy().T + state["bias"].numpy()))
    assert next(iter(result["predictions"].values()))["top"][0]["label"] == expected
    # predict on the image files of every test image gives what each run saved from the cache's rows
    # (predict --split would read the cache itself: tests/stages/test_predict.py)
    for run_dir in (head_dir, svm_dir):
        assert_images_reproduce_saved(run_dir, demo_dir)
    from cars_tl.stages.finetune import finetune

    with pytest.raises(CarsTLError, match="several stages"):  # a fine-tuned head reads the final output alone
        finetune(demo_dir, unfreeze="none", init_head=head_dir, epochs=1, out=tmp_path / "ft", **TINY)


def test_the_cache_name_changes_with_each_option(demo_dir, tmp_path):
    bb = backbones.build_backbone(TINY["backbone"], TINY["weights"], **BUILD)
    file_names = set()
    for tta in ("none", "flip"):
        for layers, combine in (
            (["final"], "l2"),
            (["layer3", "layer4"], "l2"),
            (["layer3", "layer4"], "raw"),
            (["layer4", "layer3"], "l2"),
        ):
            spec = feature_views.with_options(bb.transform, tta, layers, combine)
            file_names.add(
                names.features_path(
                    tmp_path, "resnet18", "random", "full", spec, 0.0, "fp32", feature_views.name_tag(spec)
                ).name
            )
    assert len(file_names) == 8
    plain = feature_views.with_options(bb.transform)
    assert plain == bb.transform  # the study's spec is untouched: its cache keeps its name
    # the wiring (extract-features names its default file after the options): the CLI test below


def test_presets_and_bad_options(demo_dir, tmp_path):
    assert presets.for_stage("extract-features", "study") == dict(
        resize_mode="crop", image_size=None, tta="none", layers="final"
    )
    bb = backbones.build_backbone(TINY["backbone"], TINY["weights"], **BUILD)
    assert feature_views.parse_layers("default", bb) == ["layer3", "layer4"]
    assert feature_views.parse_layers(None, bb) == ["final"]
    for bad, message in (
        ({"tta": "mirror"}, "--tta"),
        ({"layers": "layer9"}, "layer9"),
        ({"layers": "layer3,layer3"}, "once"),
        ({"preset": "best"}, "--preset"),
        ({"combine": "max", "layers": "layer3,final"}, "--combine"),
    ):
        with pytest.raises(CarsTLError, match=message):
            extract.extract_features(demo_dir, splits=("test",), out=tmp_path / "x.h5", **tiny(**bad))


@pytest.mark.parametrize(
    "value, problem",
    [
        ("", "the list of stages is empty"),  # was "each stage at most once"
        (" , ", "the list of stages is empty"),
        ("layer3,final,layer3", "layer3 is given more than once"),
    ],
)
def test_a_layer_list_that_is_empty_or_repeats_says_which(value, problem):
    bb = backbones.build_backbone(TINY["backbone"], TINY["weights"], **BUILD)
    with pytest.raises(CarsTLError) as err:
        feature_views.parse_layers(value, bb)
    assert err.value.message.startswith(f"--layers {value!r}: {problem}"), err.value.message
    assert "final, conv1, bn1, layer1, layer2, layer3, layer4" in err.value.hint


def test_view_mean_averages_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    x = torch.randn(3, 3, 8, 8)
    model(x)
    with torch.no_grad():
        torch.testing.assert_close(feature_views.view_mean(model, x, "flip"), (model(x) + model(x.flip(-1))) / 2)
        torch.testing.assert_close(feature_views.view_mean(model, x, "none"), model(x))


def test_finetune_tta_flip_is_recorded_and_predict_averages_alike(demo_dir, demo_finetune_run, tmp_path):
    from cars_tl.models.inference import load_run
    from cars_tl.stages.finetune import finetune

    run_dir, metrics = finetune(demo_dir, unfreeze="none", epochs=1, tta="flip", out=tmp_path / "ft", **TINY)
    assert metrics["config"]["tta"] == "flip"
    assert metrics["backbone"]["transform"]["features"] == {"tta": "flip"}
    run = load_run(run_dir)
    manifest = manifests.load_manifest(demo_dir)
    record = manifest.split("test")[0]
    x = run.tensor(open_image(manifest.root / record.path))[None]
    with torch.inference_mode():
        body = run.body.eval()
        logits = lambda t: torch.nn.functional.linear(body(t), *_head(run_dir))
        expected = ((logits(x) + logits(x.flip(-1))) / 2).softmax(1)
        torch.testing.assert_close(run.score(run.embed(x)), expected, rtol=1e-4, atol=1e-6)
    # a study run (the shared fixture) records neither
    plain = json.loads((demo_finetune_run / "metrics.json").read_text())
    assert "tta" not in plain["config"] and "features" not in plain["backbone"]["transform"]


def _head(run_dir):
    from cars_tl.artifacts import runs

    state = runs.load_checkpoint(runs.model_file(run_dir))
    return state["head.weight"], state["head.bias"]


def test_cli_options_reach_the_cache_and_mistakes_are_messages(demo_dir, tmp_path):
    from typer.testing import CliRunner

    from cars_tl.cli import app

    common = [
        "extract-features",
        "--data-dir",
        str(demo_dir),
        *TINY_CLI,
        "--split",
        "test",
        "--artifacts",
        str(tmp_path),
    ]
    bad = CliRunner().invoke(app, [*common, "--layers", "layer3,head"])
    assert bad.exit_code != 0 and "head" in bad.output and "Traceback" not in bad.output
    good = CliRunner().invoke(app, [*common, "--tta", "flip", "--layers", "default"])
    assert good.exit_code == 0, good.output
    [path] = (tmp_path / "features").glob("*.h5")
    assert "-flip-layer3+layer4-" in path.name
    assert features.read_attrs(path)["transform"]["features"]["layers"] == ["layer3", "layer4"]
