"""Resize modes (crop | squash | pad), their training crops, timm's own preprocessing, and the
recorded preprocessing travelling from a feature cache through a run into predict and sparsity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import HAS_TIMM, TINY, assert_refused, run_cli, tiny
from PIL import Image, ImageOps

from cars_tl.artifacts import features
from cars_tl.core.errors import CarsTLError
from cars_tl.core.options import ImageOptions
from cars_tl.data import manifest as manifests
from cars_tl.data import transforms
from cars_tl.data.images import crop_box, open_image
from cars_tl.models import backbones
from cars_tl.models.inference import load_run
from cars_tl.stages.extract import extract_features
from cars_tl.stages.predict import predict
from cars_tl.stages.train_head import train_head

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def wide_image(width: int = 300, height: int = 100) -> Image.Image:
    """Blue, with a red band at the left end and a green band at the right end (30 px each)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:] = BLUE
    pixels[:, :30] = RED
    pixels[:, -30:] = GREEN
    return Image.fromarray(pixels)


def spec_for(mode: str, size: int = 64) -> dict:
    return backbones.build_backbone("resnet18", "random", size, mode).transform


@pytest.mark.parametrize("mode", transforms.RESIZE_MODES)
def test_every_mode_gives_the_final_side_and_is_recorded(mode):
    spec = spec_for(mode, 96)
    assert spec["mode"] == mode and spec["side"] == 96
    out = transforms.eval_resize_crop(spec)(wide_image())
    assert out.size == (96, 96) and out.mode == "RGB"
    assert transforms.eval_transform(spec)(wide_image()).shape == (3, 96, 96)


def test_squash_keeps_both_ends_of_a_wide_image_and_crop_does_not():
    squashed = np.asarray(transforms.eval_resize_crop(spec_for("squash"))(wide_image()))
    cropped = np.asarray(transforms.eval_resize_crop(spec_for("crop"))(wide_image()))
    assert tuple(squashed[32, 0]) == RED and tuple(squashed[32, -1]) == GREEN
    assert tuple(cropped[32, 0]) == BLUE and tuple(cropped[32, -1]) == BLUE  # the ends are cut away
    assert (cropped == BLUE).all()


def test_pad_letterboxes_on_the_mean_colour():
    spec = spec_for("pad")
    out = np.asarray(transforms.eval_resize_crop(spec)(wide_image()))
    mean = transforms.mean_colour(spec)
    assert mean == (124, 116, 104)  # ImageNet's mean: zero after normalization
    # A 3:1 image in a 64 px square: 21 rows of picture in the middle, the mean colour above and below.
    rows_of_picture = [r for r in range(64) if tuple(out[r, 32]) == BLUE]
    assert 20 <= len(rows_of_picture) <= 22
    assert (out[:20] == mean).all() and (out[-20:] == mean).all()
    middle = rows_of_picture[len(rows_of_picture) // 2]
    assert tuple(out[middle, 0]) == RED and tuple(out[middle, -1]) == GREEN  # both ends kept
    normalized = transforms.eval_transform(spec)(wide_image())
    assert normalized[:, :20].abs().max() < 0.01


def test_pad_matches_pillow_letterboxing():
    spec = spec_for("pad", 80)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 300, 3), np.uint8))
    ours = np.asarray(transforms.eval_resize_crop(spec)(image)).astype(int)
    reference = np.asarray(
        ImageOps.pad(image, (80, 80), Image.Resampling.BILINEAR, color=transforms.mean_colour(spec))
    ).astype(int)
    assert ours.shape == reference.shape
    assert np.mean(np.abs(ours - reference) > 2) < 0.03  # same placement; edge rows may round differently


def test_squash_of_a_box_crop_is_the_box_resized():
    image = wide_image()
    box = (40, 10, 200, 90)  # 1-based inclusive, as the devkit gives it
    spec = spec_for("squash")
    ours = np.asarray(transforms.eval_resize_crop(spec)(crop_box(image, box)))
    reference = np.asarray(image.crop((39, 9, 200, 90)).resize((64, 64), Image.Resampling.BILINEAR))
    assert np.array_equal(ours, reference)


def test_older_specs_without_a_mode_mean_crop():
    spec = spec_for("crop")
    old = {k: v for k, v in spec.items() if k != "mode"}
    assert transforms.resize_mode(old) == "crop" and transforms.same_transform(old, spec)
    assert not transforms.same_transform(old, spec_for("squash"))
    image = wide_image()
    assert np.array_equal(
        np.asarray(transforms.eval_resize_crop(old)(image)), np.asarray(transforms.eval_resize_crop(spec)(image))
    )


@pytest.mark.parametrize(
    "mode, size, message", [("zoom", None, "unknown --resize 'zoom'"), ("squash", 16, "at least 32")]
)
def test_bad_resize_options_are_refused(mode, size, message, demo_dir, tmp_path):
    with pytest.raises(CarsTLError, match=message):
        ImageOptions(image_size=size, resize=mode)
    with pytest.raises(CarsTLError, match=message):
        extract_features(demo_dir, **tiny(image_size=size, resize=mode), out=tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("mode", ["squash", "pad"])
def test_training_crops_keep_the_image_aspect(mode):
    spec = spec_for(mode)
    crop = transforms.RandomRegionSquare(spec)
    torch.manual_seed(0)
    for _ in range(200):
        left, top, right, bottom = crop.region(300, 100)
        assert 0 <= left and right <= 300 + 1e-9 and 0 <= top and bottom <= 100 + 1e-9
        w, h = right - left, bottom - top
        assert (w * h) / (300 * 100) >= transforms.TRAIN_CROP_SCALE[0] * 0.75 - 1e-9  # clipping can only shave a side
        relative = (w / h) / 3.0
        assert 0.74 <= relative <= 1.34 or w == 300 or h == 100
    out = transforms.train_transform(spec, "standard")(wide_image())
    assert out.shape == (3, 64, 64)


def test_training_crop_mode_is_todays_random_resized_crop():
    from torchvision import transforms as T

    steps = transforms.train_transform(spec_for("crop"), "standard").transforms
    assert isinstance(steps[0], T.RandomResizedCrop) and steps[0].scale == (0.25, 1.0)
    assert isinstance(
        transforms.train_transform(spec_for("squash"), "standard").transforms[0], transforms.RandomRegionSquare
    )


@pytest.mark.parametrize("mode", transforms.RESIZE_MODES)
def test_evaluation_is_deterministic(mode):
    t = transforms.eval_transform(spec_for(mode))
    assert torch.equal(t(wide_image()), t(wide_image()))
    assert torch.equal(transforms.train_transform(spec_for(mode), "none")(wide_image()), t(wide_image()))


# --------------------------------------------------------------------------- timm's own preprocessing


needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="needs the timm extra")


@needs_timm
@pytest.mark.parametrize("arch", ["resnet50", "convnext_tiny", "deit_small_patch16_224", "tf_efficientnetv2_b3"])
def test_timm_specs_equal_timms_own_values(arch):
    import timm
    from timm.data import resolve_data_config

    spec = backbones.build_backbone(f"timm/{arch}", "random").transform
    cfg = resolve_data_config({}, model=timm.create_model(arch, pretrained=False))
    expected_resize = int(np.floor(cfg["input_size"][-1] / cfg["crop_pct"]))
    assert (spec["resize"], spec["side"]) == (expected_resize, cfg["input_size"][-1])
    assert spec["interpolation"] == cfg["interpolation"]
    assert spec["mean"] == list(cfg["mean"]) and spec["std"] == list(cfg["std"])
    assert spec.get("crop_mode", "center") == cfg["crop_mode"]
    known = {"resnet50": 235, "convnext_tiny": 235, "deit_small_patch16_224": 248}  # round() gave 236, 236, 249
    if arch in known:
        assert spec["resize"] == known[arch]


@needs_timm
@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_timm_crop_modes_match_timms_transform(crop_mode):
    from timm.data import create_transform

    spec = {
        "resize": 248,
        "crop": 224,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bicubic",
        "pipeline": transforms.FUSED_PIPELINE,
        "mode": "crop",
    }
    if crop_mode != "center":
        spec["crop_mode"] = crop_mode
    reference = create_transform(
        224, crop_pct=224 / 248.5, interpolation="bicubic", crop_mode=crop_mode, mean=spec["mean"], std=spec["std"]
    )
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 500, 3), np.uint8)).filter(
        __import__("PIL.ImageFilter", fromlist=["GaussianBlur"]).GaussianBlur(2)
    )
    ours = transforms.eval_transform(spec)(image)
    theirs = reference(image)
    assert ours.shape == theirs.shape == (3, 224, 224)
    # Same sample positions and filter; one resampling call instead of two: within 2 grey levels.
    assert float((ours - theirs).abs().mul(torch.tensor(spec["std"]).view(3, 1, 1) * 255).quantile(0.99)) <= 2.0


# --------------------------------------------------------------------------- recorded preprocessing round trip


@pytest.fixture(scope="module")
def squash_cache(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("squash") / "squash.h5"
    extract_features(demo_dir, **tiny(resize="squash"), out=out)
    return out


def test_the_mode_travels_from_the_cache_through_a_run_into_predict(demo_dir, squash_cache, tmp_path):
    cache = features.load(squash_cache)
    assert cache.attrs["transform"]["mode"] == "squash"
    run_dir, metrics = train_head(squash_cache, out=tmp_path / "head")
    assert metrics["backbone"]["transform"]["mode"] == "squash"
    loaded = load_run(run_dir)
    assert transforms.resize_mode(loaded.spec) == "squash"
    test = cache.split("test")
    image = manifests.load_manifest(demo_dir).root / test.paths[0]
    with torch.inference_mode():
        feats = loaded.embed(loaded.tensor(open_image(image))[None])
    assert torch.allclose(feats[0], torch.from_numpy(test.features[0]), rtol=1e-3, atol=1e-4)
    [result] = predict([image], run_dirs=[run_dir], top_k=1)
    state = torch.load(run_dir / "head.pt", weights_only=True)
    expected = int(np.argmax(test.features[0] @ state["weight"].numpy().T + state["bias"].numpy()))
    assert next(iter(result["predictions"].values()))["top"][0]["label"] == expected


def test_finetune_init_head_with_another_resize_mode_is_refused(demo_dir, squash_cache, tmp_path):
    from cars_tl.stages.finetune import finetune

    run_dir, _ = train_head(squash_cache, out=tmp_path / "head")
    with pytest.raises(CarsTLError, match="--resize squash") as info:
        finetune(demo_dir, unfreeze="layer4", init_head=run_dir, epochs=1, out=tmp_path / "ft", **TINY)
    assert "--resize" in info.value.hint
    assert not (tmp_path / "ft").exists()


@pytest.fixture(scope="module")
def box_head_run(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("box")
    extract_features(demo_dir, **tiny(crop="box", margin=0.1, resize="pad"), out=root / "box.h5")
    run_dir, _ = train_head(root / "box.h5", out=root / "head")
    return run_dir, root / "box.h5"


def test_a_box_run_refuses_an_image_without_a_box_and_scores_a_boxed_one(demo_dir, box_head_run):
    run_dir, cache_path = box_head_run
    test = features.load(cache_path).split("test")
    manifest = manifests.load_manifest(demo_dir)
    record = next(r for r in manifest.split("test") if r.path == test.paths[0])
    full = manifest.root / record.path
    with pytest.raises(CarsTLError, match="box crops") as info:
        predict([full], run_dirs=[run_dir])
    assert "--boxed" in info.value.hint
    boxed = crop_box(open_image(full), record.box, 0.1)
    path = full.parent.parent / "boxed-test.png"
    try:
        boxed.save(path)
        [result] = predict([path], run_dirs=[run_dir], top_k=1, boxed=True)
    finally:
        path.unlink(missing_ok=True)
    state = torch.load(run_dir / "head.pt", weights_only=True)
    expected = int(np.argmax(test.features[0] @ state["weight"].numpy().T + state["bias"].numpy()))
    assert next(iter(result["predictions"].values()))["top"][0]["label"] == expected
    loaded = load_run(run_dir)
    assert (loaded.crop, loaded.margin) == ("box", 0.1)
    with torch.inference_mode():
        feats = loaded.embed(loaded.tensor(open_image(full), record.box)[None])
    assert torch.allclose(feats[0], torch.from_numpy(test.features[0]), rtol=1e-3, atol=1e-4)


def test_sparsity_gives_box_runs_their_boxes_and_refuses_loose_images(demo_dir, box_head_run, tmp_path, monkeypatch):
    from cars_tl.stages import sparsity

    run_dir, _ = box_head_run
    seen = []
    original = sparsity.zero_fractions

    def spy(model, batches):
        batches = list(batches)
        seen.extend(batches)
        return original(model, batches)

    monkeypatch.setattr(sparsity, "zero_fractions", spy)
    sparsity.measure([run_dir], split="test", limit=2, data_dir=demo_dir, out=tmp_path / "s")
    manifest = manifests.load_manifest(demo_dir)
    loaded = load_run(run_dir)
    records = manifest.split("test")[:2]
    expected = torch.stack(
        [loaded.transform(crop_box(open_image(manifest.root / r.path), r.box, 0.1)) for r in records]
    )
    # --split images come through the data path's loader, which normalizes as the transform does (to 1e-5)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-5)
    with pytest.raises(CarsTLError, match="box crops"):
        sparsity.measure([run_dir], images=[manifest.root / records[0].path], out=tmp_path / "s2")


@pytest.mark.parametrize("recorded, used", [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp32")])
def test_runs_are_evaluated_in_their_recorded_precision(demo_head_run, tmp_path, recorded, used):

    run_dir = tmp_path / "run"
    shutil.copytree(demo_head_run, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["backbone"]["precision"] = recorded
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    loaded = load_run(run_dir)
    assert (loaded.precision, loaded.precision_used) == (recorded, used)
    seen = {}
    original = torch.autocast

    class Spy(original):
        def __init__(self, *args, **kwargs):
            seen["dtype"] = kwargs.get("dtype")
            super().__init__(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "autocast", Spy)
        loaded.embed(torch.zeros(1, 3, 64, 64))
    assert seen.get("dtype") == (torch.bfloat16 if used == "bf16" else None)


def test_cli_resize_option_names_the_cache_and_records_the_mode(demo_dir, tmp_path):
    from typer.testing import CliRunner

    from cars_tl.cli import app

    result = CliRunner().invoke(
        app,
        [
            "extract-features",
            "--data-dir",
            str(demo_dir),
            "--backbone",
            "resnet18",
            "--weights",
            "random",
            "--image-size",
            "64",
            "--resize",
            "pad",
            "--precision",
            "fp32",
            "--workers",
            "0",
            "--split",
            "test",
            "--artifacts",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    [path] = (tmp_path / "features").glob("*.h5")
    assert path.name.startswith("resnet18-random-full-pad64px-fp32-")  # beside, not over, the crop-mode cache
    assert features.load(path, ("test",)).attrs["transform"]["mode"] == "pad"
    refused = CliRunner().invoke(app, ["extract-features", "--data-dir", str(demo_dir), "--resize", "stretch"])
    assert refused.exit_code == 2 and "valid: crop, squash, pad" in refused.output


def test_finetune_trains_and_records_a_resize_mode_with_its_augmentation(demo_dir, tmp_path):
    from cars_tl.stages.finetune import finetune

    run_dir, metrics = finetune(
        demo_dir,
        unfreeze="none",
        preset="tuned",
        epochs=1,
        out=tmp_path / "ft",
        **tiny(batch_size=16, resize="pad"),
    )
    assert metrics["config"]["resize"] == "pad" and metrics["backbone"]["transform"]["mode"] == "pad"
    loaded = load_run(run_dir)
    assert transforms.resize_mode(loaded.spec) == "pad" and loaded.spec["side"] == TINY["image"].image_size


@pytest.mark.parametrize("size", [100000, 31])
def test_image_size_is_bounded(size, demo_dir, tmp_path):
    result = run_cli(
        "extract-features",
        "--data-dir",
        demo_dir,
        "--backbone",
        "resnet18",
        "--weights",
        "random",
        "--image-size",
        size,
        "--out",
        tmp_path / "f.h5",
    )
    assert_refused(result, f"--image-size must be at least 32 and at most 1024 pixels, got {size}")
    assert not list(tmp_path.iterdir())
    with pytest.raises(CarsTLError, match="at least 32 and at most 1024"):
        from cars_tl.stages import finetune as ft

        ft.finetune(demo_dir, epochs=1, out=tmp_path / "ft", **tiny(image_size=size))
