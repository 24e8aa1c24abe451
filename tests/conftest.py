"""Shared fixtures: generated demo data, the real 20-class subset and the real pretrained backbone.

Real files come from ``../shared`` beside the checkout; tests that need them skip with a reason
when they are absent. Nothing is ever written into ``../shared``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from helpers import SHARED_MINI, tiny

os.environ.setdefault("TORCH_HOME", str(Path(__file__).resolve().parent / ".torch-home-unused"))

# SIGINT's handler as pytest started: default_int_handler from a terminal, SIG_IGN when pytest runs as a
# background job of a non-interactive shell (`make test &`, `bash -c "pytest ... &"`): such a shell ignores
# SIGINT for its background jobs, and every child a test starts inherits that (the Ctrl-C test gives its
# child the default action itself).
SIGINT_AT_START = signal.getsignal(signal.SIGINT)


@pytest.fixture(autouse=True)
def _sigint_handler_kept():
    """Fails the test that changes SIGINT's handler in the pytest process (its children would inherit an
    ignored SIGINT), and puts it back so the tests after it are unaffected."""
    yield
    now = signal.getsignal(signal.SIGINT)
    if now is not SIGINT_AT_START:
        signal.signal(signal.SIGINT, SIGINT_AT_START)
        pytest.fail(f"this test left SIGINT's handler at {now!r} (it was {SIGINT_AT_START!r}); restore it")


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
    extract_features(demo_dir, splits=("train", "test"), out=out, **tiny(batch_size=32))
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
        out=tmp_path_factory.mktemp("runs") / "ft",
        **tiny(batch_size=16),
    )
    return run_dir


@pytest.fixture(scope="session")
def demo_svm_run(demo_features, tmp_path_factory) -> Path:
    from cars_tl.stages.fit_svm import fit_svm

    run_dir, _ = fit_svm(demo_features, kernel="poly", out=tmp_path_factory.mktemp("runs") / "svm")
    return run_dir
