"""Backbones: exact parameter counts, unfreeze names, weights loading, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import HAS_TIMM, SHARED_EFFNET, needs_effnet

from cars_tl.artifacts.runs import count_params
from cars_tl.core.errors import CarsTLError
from cars_tl.data import transforms
from cars_tl.models import backbones, families
from cars_tl.stages.finetune import set_trainable


@pytest.fixture(scope="module")
def resnet50():
    return backbones.build_backbone("resnet50", "random")


@pytest.mark.parametrize("unfreeze, trainable", [("none", 401_604), ("layer4", 15_366_340), ("all", 23_909_636)])
def test_resnet50_parameter_counts_match_the_study(resnet50, unfreeze, trainable):
    model = backbones.classifier_model(resnet50, 196)
    set_trainable(model, backbones.parse_unfreeze(unfreeze, resnet50))
    assert count_params(model) == {"total": 23_909_636, "trainable": trainable}


def test_unfreeze_names_are_validated_with_the_valid_list(resnet50):
    assert backbones.parse_unfreeze("layer3,layer4", resnet50) == ["layer3", "layer4"]
    with pytest.raises(CarsTLError) as err:
        backbones.parse_unfreeze("layer5", resnet50)
    assert "layer5" in err.value.message and "layer4" in err.value.hint


def test_resnet50_features_and_transform(resnet50):
    assert resnet50.num_features == 2048
    assert resnet50.transform["side"] == 224 and resnet50.transform["mean"] == [0.485, 0.456, 0.406]
    with torch.inference_mode():
        assert resnet50.body(torch.randn(2, 3, 64, 64)).shape == (2, 2048)


def test_image_size_override_keeps_the_resize_ratio():
    default = backbones.build_backbone("resnet18", "random").transform
    bb = backbones.build_backbone("resnet18", "random", image_size=112)
    assert bb.transform["side"] == 112
    assert bb.transform["resize"] == round(112 * default["resize"] / default["side"])


def test_random_weights_are_reproducible():
    a = backbones.build_backbone("resnet18", "random")
    b = backbones.build_backbone("resnet18", "random")
    assert a.weights_digest == b.weights_digest
    assert all(torch.equal(x, y) for x, y in zip(a.body.state_dict().values(), b.body.state_dict().values()))


def test_weights_from_a_state_dict_file(tmp_path):
    source = backbones.build_backbone("resnet18", "random")
    state = {k: v + 1 if v.is_floating_point() else v for k, v in source.body.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)  # a 1000-class head: not part of the backbone
    state["fc.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "w.pth")
    loaded = backbones.build_backbone("resnet18", str(tmp_path / "w.pth"))
    assert torch.equal(loaded.body.conv1.weight, source.body.conv1.weight + 1)
    assert loaded.weights_digest != source.weights_digest


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(backbones.build_backbone("resnet18", "random").body.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CarsTLError, match="do not fit backbone resnet50"):
        backbones.build_backbone("resnet50", str(tmp_path / "r18.pth"))


def test_missing_imagenet_weights_give_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CarsTLError) as err:
        backbones.build_backbone("resnet50", "imagenet")
    assert "cars-tl download --weights resnet50" in err.value.hint
    assert str(tmp_path) in err.value.hint


def test_unknown_backbone_and_weights_names():
    with pytest.raises(CarsTLError, match="unknown backbone"):
        backbones.build_backbone("resnet51", "random")
    with pytest.raises(CarsTLError) as err:
        backbones.build_backbone("resnet18", "IMAGENET9K")
    assert "IMAGENET1K_V1" in err.value.hint


@needs_effnet
def test_timm_backbone_with_the_shared_pretrained_weights():
    bb = backbones.build_backbone("timm/efficientnet_lite0", str(SHARED_EFFNET))
    assert bb.num_features == 1280
    assert bb.transform["resize"] == 256 and bb.transform["side"] == 224
    assert "blocks.6" in bb.stages and backbones.parse_unfreeze("blocks.6", bb) == ["blocks.6"]
    with torch.inference_mode():
        assert bb.body(torch.randn(1, 3, 224, 224)).shape == (1, 1280)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 299), (4000, 900), (225, 1000)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_one_step_resize_crop_matches_the_two_step_transform(size, interpolation):
    from PIL import Image

    rng = np.random.default_rng(sum(size))
    base = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize(size, Image.BILINEAR)  # smooth, photo-like content
    spec = {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": interpolation}
    two_step = transforms.eval_transform(spec)(image)
    one_step = transforms.eval_transform(dict(spec, pipeline=transforms.FUSED_PIPELINE))(image)
    assert one_step.shape == two_step.shape == (3, 224, 224)
    assert float((one_step - two_step).abs().max()) <= 2.5 / 255 / 0.25  # within ~2 grey levels


def test_specs_from_weights_use_the_one_step_pipeline():
    assert backbones.build_backbone("resnet18", "random").transform["pipeline"] == transforms.FUSED_PIPELINE


@pytest.mark.parametrize("name", ["resnet18", "timm/efficientnet_lite0"])
def test_folded_batchnorm_gives_the_same_features_and_leaves_the_body_alone(name):
    if name.startswith("timm/") and not HAS_TIMM:
        pytest.skip("needs the timm extra")
    bb = backbones.build_backbone(name, "random")
    for m in bb.body.modules():  # non-trivial statistics, so that folding has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in bb.body.state_dict().items()}
    folded = backbones.fold_batchnorm(bb.body)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), bb.body(x), rtol=1e-4, atol=1e-4)
    if name == "resnet18":  # torchvision's BatchNorms follow their convolutions: all of them fold
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.body.modules())
    assert all(torch.equal(v, before[k]) for k, v in bb.body.state_dict().items())


def test_a_fold_that_changes_the_output_is_not_used(monkeypatch):
    import torch.fx.experimental.optimization as fx_optimization

    body = backbones.build_backbone("resnet18", "random").body
    example = torch.randn(1, 3, 64, 64)
    assert backbones.fold_batchnorm(body, example) is not body  # the real fold passes its check

    def broken_fuse(model, inplace=False):
        folded = original(model, inplace)
        with torch.no_grad():
            folded.conv1.weight.mul_(1.01)
        return folded

    original = fx_optimization.fuse
    monkeypatch.setattr(fx_optimization, "fuse", broken_fuse)
    assert backbones.fold_batchnorm(body, example) is body
    no_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    assert backbones.fold_batchnorm(no_bn, torch.randn(1, 3, 8, 8)) is no_bn


def test_backbone_family_is_picked_by_name_prefix():
    assert isinstance(families.family("timm/efficientnet_lite0"), families.Timm)
    assert isinstance(families.family("resnet50"), families.Torchvision)
    assert isinstance(families.family("timmy"), families.Torchvision)  # the prefix is "timm/", not "timm"


def test_a_new_family_is_one_adapter_in_the_registry(monkeypatch):
    """build_backbone knows no family by name: an adapter registered in FAMILIES is built, its
    classifier removed, its stages offered to --unfreeze, its weights refused as it says."""

    class Toy(families.Family):
        prefix = "toy/"

        def create(self, name):
            model = torch.nn.Sequential()
            model.add_module("stem", torch.nn.Conv2d(3, 8, 3))
            model.add_module("pool", torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()))
            model.add_module("fc", torch.nn.Linear(8, 1000))
            spec = dict(resize=40, crop=32, mean=[0.5] * 3, std=[0.25] * 3, interpolation="bilinear", mode="crop")
            return model, spec

        def named_weights(self, name, weights):
            raise CarsTLError(f"toy networks have no weights named {weights!r}")

        def classifier_path(self, model, name):
            return "fc"

        def remove_classifier(self, model, classifier):
            families.set_module(model, classifier, torch.nn.Identity())

    monkeypatch.setattr(families, "FAMILIES", (Toy(), *families.FAMILIES))
    bb = backbones.build_backbone("toy/tiny", "random")
    assert (bb.num_features, bb.classifier_name, bb.stages) == (8, "fc", ["stem"])
    assert bb.body(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    assert backbones.build_backbone("toy/tiny", "random", 48).transform["side"] == 48
    with pytest.raises(CarsTLError, match="toy networks have no weights named 'imagenet'"):
        backbones.build_backbone("toy/tiny", "imagenet")


def test_seed_changes_the_random_initialisation_and_zero_keeps_the_old_one():
    default = backbones.build_backbone("resnet18", "random", 64)
    zero = backbones.build_backbone("resnet18", "random", 64, seed=0)
    one = backbones.build_backbone("resnet18", "random", 64, seed=1)
    assert default.weights_digest == zero.weights_digest != one.weights_digest
    head0 = backbones.classifier_model(zero, 6).head.weight
    head1 = backbones.classifier_model(zero, 6, seed=1).head.weight
    assert not torch.equal(head0, head1)
