"""The ``cars-tl`` command line: one thin function per stage, each one call into the library.

Imports of torch and of the stage modules happen inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from cars_tl.errors import CarsTLError

app = typer.Typer(
    name="cars-tl",
    help="Transfer-learning experiments on Stanford Cars: download, cache features, train heads, SVMs and fine-tunes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root():
    """Transfer-learning experiments on Stanford Cars. Stages exchange files: manifest -> HDF5 features -> run directories -> report."""


def command(name: str):
    """Register a stage; a :class:`CarsTLError` becomes a red message and exit status 2."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except CarsTLError as exc:
                from cars_tl.console import console

                console.print(f"[bold red]error:[/] {exc.message}", markup=True, highlight=False)
                if exc.hint:
                    console.print(f"[bold]next:[/] {exc.hint}", markup=True, highlight=False)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                from cars_tl.console import console

                console.print("[yellow]interrupted[/]: rerun the same command to resume where it can")
                raise typer.Exit(130) from None

        return app.command(name)(wrapper)

    return decorate


DataDir = Annotated[Path, typer.Option("--data-dir", help="Folder holding stanford_cars/ and its manifest.")]


@command("download")
def download(
    data_dir: DataDir = Path("data"),
    source: Annotated[str, typer.Option(help="auto | demo | an http(s) URL of a mirror | a local folder or archive.")] = "auto",
    mirror: Annotated[Optional[List[str]], typer.Option(help="Extra mirror base URL, tried first (repeatable).")] = None,
    mirror_list: Annotated[Optional[Path], typer.Option(help="JSON mirror list replacing the built-in one.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Instead of the dataset, fetch torchvision ImageNet weights of this model (e.g. resnet50) into the torch cache.")] = None,
):
    """Put Stanford Cars into DATA_DIR/stanford_cars (torchvision's layout) and write its manifest.

    Rerunning on a verified dataset is a fast no-op. Stanford Cars is for non-commercial research only.
    """
    from cars_tl import download as dl
    from cars_tl.console import console, progress

    if weights:
        path = dl.download_weights(weights, mirrors=mirror or [], progress=progress())
        console.print(f"weights for {weights}: {path}")
        return
    manifest, action = dl.prepare_dataset(data_dir, source, mirrors=mirror or [], mirror_list=mirror_list, progress=progress())
    counts = manifest.counts()
    console.print(
        f"{action}: {manifest.root} — train {counts['train']}, test {counts['test']} images, "
        f"{manifest.classes_present()} of {manifest.num_classes} classes, fingerprint {manifest.fingerprint[:12]}"
        + (f", {manifest.clipped_boxes} boxes clipped to the image" if manifest.clipped_boxes else "")
    )
