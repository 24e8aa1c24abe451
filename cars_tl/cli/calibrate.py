"""``cars-tl calibrate``: temperature scaling of a head or finetune run on its validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cars_tl.cli.app import command
from cars_tl.cli.options import Artifacts, DataDir, Force, RunOut, Workers


@command("calibrate")
def calibrate(
    run: Annotated[
        Path, typer.Option("--run", metavar="RUN_DIR", help="A train-head or finetune run with a validation split.")
    ],
    data_dir: DataDir = Path("data"),
    workers: Workers = None,
    force: Force = False,
    out: RunOut = None,
    artifacts: Artifacts = Path("artifacts"),
):
    """Temperature scaling: fit T on the run's validation logits; ECE and NLL before and after, a reliability
    diagram (default run directory: RUN_DIR's name + -calibrated)."""
    from cars_tl.console import out as stdout
    from cars_tl.console import progress
    from cars_tl.stages.calibrate import calibrate as run_calibrate

    run_dir, metrics = run_calibrate(
        run, data_dir=data_dir, out=out, artifacts=artifacts, workers=workers, force=force, progress=progress()
    )
    c = metrics["calibration"]
    for split in ("validation", "test"):
        if c[split]:
            n = c[split]
            stdout.print(
                f"{split} ({n['images']} images): NLL {n['nll_before']:.4f} -> {n['nll_after']:.4f}, "
                f"ECE {100 * n['ece_before']:.2f}% -> {100 * n['ece_after']:.2f}%"
            )
    stdout.print(f"calibrated run {run_dir}: T={c['temperature']:.4f}")
    if c.get("note"):
        stdout.print(f"note: {c['note']}")
