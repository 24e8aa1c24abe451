"""fit-svm's options are checked before any work, search or not."""

from __future__ import annotations

from helpers import assert_refused, run_cli


def test_svm_seed_and_degree_are_validated_even_without_a_search(demo_features, tmp_path):
    assert_refused(
        run_cli("fit-svm", "--features", demo_features, "--seed", "-1", "--out", tmp_path / "a"), "--seed", "got -1"
    )
    assert_refused(
        run_cli("fit-svm", "--features", demo_features, "--degree", "0", "--out", tmp_path / "b"), "--degree", "got 0"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
