"""``cars-tl download``: the dataset (or torchvision weights) into place."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from cars_tl.cli.app import command
from cars_tl.cli.options import DataDir
from cars_tl.sources import layouts  # the --source help lists the registered layouts (numpy, no torch)

VERIFY_NOTE = (
    "--verify re-hashed every image. The everyday check (every stage, and download without --verify) compares only "
    "each image's size and mtime, so it misses an image replaced by one of the same size whose mtime was restored "
    "(cp -p, rsync -t, tar and zip extraction keep mtimes). Run --verify after copying, restoring or editing images "
    "with such tools, and once before the runs you report."
)


@command("download")
def download(
    data_dir: DataDir = Path("data"),
    source: Annotated[
        str,
        typer.Option(
            help=(
                "auto (mirror list) | demo (generated) | an http(s) mirror URL | a local folder or archive in any layout: "
                f"{layouts.cli_help()}."
            )
        ),
    ] = "auto",
    splits: Annotated[
        str, typer.Option("--splits", help="train,test or train (a local copy without test labels: train only).")
    ] = "train,test",
    test_labels: Annotated[
        Path | None, typer.Option(help="cars_test_annos_withlabels.mat for a copy without it (the Kaggle copy).")
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Re-hash every image (SHA-256) instead of trusting sizes and mtimes; rebuild the manifest."
        ),
    ] = False,
    label_conflicts: Annotated[
        Literal["keep", "drop"],  # data.label_conflicts.POLICIES
        typer.Option(
            "--label-conflicts",
            help=(
                "Identical images carrying different labels (the official training split has 11 such pairs): "
                "keep lists them in manifest.json (as published results include them); drop leaves every member out."
            ),
        ),
    ] = "keep",
    mirror: Annotated[
        list[str] | None, typer.Option(metavar="URL", help="Extra mirror base URL, tried first (repeatable).")
    ] = None,
    mirror_list: Annotated[Path | None, typer.Option(help="JSON mirror list replacing the built-in one.")] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Instead of the dataset, fetch torchvision ImageNet weights into the torch cache: MODEL (its default) or MODEL:ENUM, e.g. resnet50:IMAGENET1K_V1."
        ),
    ] = None,
    variant: Annotated[
        str | None, typer.Option(help="With --weights MODEL: the torchvision weights enum (e.g. IMAGENET1K_V1).")
    ] = None,
):
    """Put Stanford Cars into DATA_DIR/stanford_cars (torchvision's layout) and write its manifest.

    Rerunning on a verified dataset is a fast no-op. Stanford Cars is for non-commercial research only.
    """
    from cars_tl.console import console, labelled, progress
    from cars_tl.data import manifest as manifests
    from cars_tl.sources.prepare import prepare_dataset
    from cars_tl.sources.weights import download_weights

    if weights:
        path = download_weights(weights, variant=variant, mirrors=mirror or [], progress=progress())
        console.print(f"weights for {weights}{':' + variant if variant else ''}: {path}")
        return
    manifest, action = prepare_dataset(
        data_dir,
        source,
        mirrors=mirror or [],
        mirror_list=mirror_list,
        splits=[s.strip() for s in splits.split(",") if s.strip()],
        test_labels=test_labels,
        verify=verify,
        label_conflicts=label_conflicts,
        progress=progress(),
    )
    console.print(f"{action}: {manifests.summary(manifest)}", highlight=False, soft_wrap=True)
    if verify:
        console.print(labelled(("note", "yellow"), ": " + VERIFY_NOTE), highlight=False, soft_wrap=True)
