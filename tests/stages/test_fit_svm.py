"""fit-svm's options are checked before any work, search or not."""

from __future__ import annotations

from pathlib import Path

from helpers import assert_refused, run_cli


def test_svm_seed_and_degree_are_validated_even_without_a_search(demo_features, tmp_path):
    assert_refused(
        run_cli("fit-svm", "--features", demo_features, "--seed", "-1", "--out", tmp_path / "a"), "--seed", "got -1"
    )
    assert_refused(
        run_cli("fit-svm", "--features", demo_features, "--degree", "0", "--out", tmp_path / "b"), "--degree", "got 0"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_one_off_start_up_is_timed_apart_from_the_first_kernel(demo_features, tmp_path, monkeypatch):
    """fit-svm --kernel all used to charge the process's imports to the first kernel (linear 24 s, the
    others 0.3 s): the start-up is measured before any kernel's timer starts, recorded and shown apart."""
    import time

    from cars_tl.report import build
    from cars_tl.stages import fit_svm as stage

    real = stage.load_libraries

    def slow_start_up():
        time.sleep(0.6)  # a start-up far longer than fitting a kernel on the demo's features
        return real() + 0.6

    monkeypatch.setattr(stage, "load_libraries", slow_start_up)
    artifacts = tmp_path / "artifacts"
    run_dir, metrics = stage.fit_svm(demo_features, kernel="all", out=artifacts / "runs" / "svm")
    assert metrics["startup_seconds"] >= 0.6
    first = next(iter(metrics["kernels"].values()))
    assert first["kernel"] == "linear" and first["fit_seconds"] < 0.6
    md = Path(build.build_report(artifacts, data_dir=None)["files"]["md"]).read_text()
    assert f"shown apart: svm {metrics['startup_seconds']:.2f} s" in md
    from cars_tl.cli.tables import svm_table

    assert "not in any kernel's fit s" in str(svm_table(demo_features, metrics).caption)
