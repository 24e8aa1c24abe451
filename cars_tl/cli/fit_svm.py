"""``cars-tl fit-svm``: an SVM (model C) on cached features, one kernel or all of them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from cars_tl.cli.app import command
from cars_tl.cli.options import Artifacts, FeaturesFile, Force, Gamma, Kernel, Preset, RunOut, Scale, Seed, SvmC


@command("fit-svm")
def fit_svm(
    features: FeaturesFile,
    kernel: Kernel = "poly",
    c: SvmC = None,
    degree: Annotated[int, typer.Option(help="poly degree.")] = 3,
    gamma: Gamma = None,
    coef0: Annotated[float, typer.Option(help="poly/sigmoid coef0.")] = 0.0,
    scale: Scale = None,
    method: Annotated[
        Literal["precomputed", "plain"],  # models.svm.model.METHODS
        typer.Option(help="precomputed (fast torch kernel) | plain (sklearn SVC)."),
    ] = "precomputed",
    preset: Preset = "study",
    cv_folds: Annotated[
        int, typer.Option(help="Folds of the stratified cross-validation for --C auto / --gamma cv.")
    ] = 5,
    seed: Seed = 0,
    force: Force = False,
    out: RunOut = None,
    artifacts: Artifacts = Path("artifacts"),
):
    """Fit an SVM (model C) on cached features; --kernel all compares every kernel from one cache."""
    from cars_tl.cli.tables import svm_table
    from cars_tl.console import out as stdout
    from cars_tl.console import progress
    from cars_tl.stages.fit_svm import fit_svm as run

    run_dir, metrics = run(
        features,
        kernel=kernel,
        C=c,
        degree=degree,
        gamma=gamma,
        coef0=coef0,
        scale=scale,
        method=method,
        out=out,
        artifacts=artifacts,
        progress=progress(),
        preset=preset,
        cv_folds=cv_folds,
        seed=seed,
        force=force,
    )
    stdout.print(svm_table(features, metrics))
    if any("search" in r for r in metrics["kernels"].values()):
        from cars_tl.models.svm.search import extension_note

        stdout.print("CV acc %: the mean ± std of the folds' accuracies (as scikit-learn's cross_val_score)")
        for r in metrics["kernels"].values():
            note = extension_note(r.get("search"))
            if note:
                stdout.print(f"{r['kernel']}: {note}")
    stdout.print(f"run: {run_dir}")
