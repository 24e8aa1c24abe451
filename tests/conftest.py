"""Shared fixtures: generated demo data, the real 20-class subset and the real pretrained backbone.

Real files come from ``../shared`` beside the checkout; tests that need them skip with a reason
when they are absent. Nothing is ever written into ``../shared``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_HOME", str(Path(__file__).resolve().parent / ".torch-home-unused"))

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_MINI = SHARED / "data" / "stanford_cars_mini"
SHARED_DEVKIT = SHARED / "data" / "stanford_cars_devkit"
SHARED_EFFNET = SHARED / "models" / "efficientnet_lite0_timm.pth"
HAS_TIMM = importlib.util.find_spec("timm") is not None

needs_mini = pytest.mark.skipif(not SHARED_MINI.is_dir(), reason=f"real Stanford Cars subset absent ({SHARED_MINI})")
needs_devkit = pytest.mark.skipif(not SHARED_DEVKIT.is_dir(), reason=f"real devkit absent ({SHARED_DEVKIT})")
needs_effnet = pytest.mark.skipif(
    not (HAS_TIMM and SHARED_EFFNET.is_file()),
    reason="needs the timm extra (pip install 'cars_tl[timm]') and ../shared/models/efficientnet_lite0_timm.pth",
)

# Small, fast settings shared by the tests that run a real network.
TINY = dict(backbone="resnet18", weights="random", image_size=64, precision="fp32", workers=0)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from cars_tl.data import devkit
    from cars_tl.data import manifest as manifests
    from cars_tl.sources.demo import generate_demo

    root = tmp_path_factory.mktemp("demo")
    generate_demo(root / devkit.STANFORD_DIR)
    manifests.build_manifest(root)
    return root


@pytest.fixture(scope="session")
def demo_features(demo_dir, tmp_path_factory) -> Path:
    from cars_tl.stages.extract import extract_features

    out = tmp_path_factory.mktemp("features") / "tiny.h5"
    extract_features(demo_dir, splits=("train", "test"), batch_size=32, out=out, **TINY)
    return out


@pytest.fixture(scope="session")
def demo_head_run(demo_features, tmp_path_factory) -> Path:
    from cars_tl.stages.train_head import train_head

    run_dir, _ = train_head(demo_features, out=tmp_path_factory.mktemp("runs") / "head")
    return run_dir


@pytest.fixture(scope="session")
def mini_dir(tmp_path_factory) -> Path:
    if not SHARED_MINI.is_dir():
        pytest.skip(f"real Stanford Cars subset absent ({SHARED_MINI})")
    from cars_tl.sources.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("mini")
    prepare_dataset(root, str(SHARED_MINI))
    return root


@pytest.fixture(scope="session")
def demo_finetune_run(demo_dir, demo_head_run, tmp_path_factory) -> Path:
    from cars_tl.stages.finetune import finetune

    run_dir, _ = finetune(
        demo_dir,
        unfreeze="layer4",
        init_head=demo_head_run,
        epochs=1,
        batch_size=16,
        out=tmp_path_factory.mktemp("runs") / "ft",
        **TINY,
    )
    return run_dir


@pytest.fixture(scope="session")
def demo_svm_run(demo_features, tmp_path_factory) -> Path:
    from cars_tl.stages.fit_svm import fit_svm

    run_dir, _ = fit_svm(demo_features, kernel="poly", out=tmp_path_factory.mktemp("runs") / "svm")
    return run_dir
