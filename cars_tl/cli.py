"""The ``cars-tl`` command line: one thin function per stage, each one call into the library.

Imports of torch and of the stage modules happen inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from cars_tl.artifacts import names
from cars_tl.core.errors import CarsTLError
from cars_tl.sources import layouts  # the --source help lists the registered layouts (numpy, no torch)

app = typer.Typer(
    name="cars-tl",
    help="Transfer-learning experiments on Stanford Cars: download, cache features, train heads, SVMs and fine-tunes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        import importlib.metadata as md

        print(f"cars-tl {md.version('cars_tl')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
):
    """Transfer-learning experiments on Stanford Cars. Stages exchange files: manifest -> HDF5 features -> run directories -> report."""
    import signal

    from cars_tl.core.runtime import tune_malloc

    # Past `ulimit -f`, a write then fails with EFBIG (reported with the path) instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    tune_malloc()


def command(name: str):
    """Register a stage; a :class:`CarsTLError` becomes a red message and exit status 2."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except CarsTLError as exc:
                _error(exc)
                raise typer.Exit(2) from None
            except OSError as exc:
                from cars_tl.core.atomic import STORAGE_ERRNOS, storage_error

                if exc.errno not in STORAGE_ERRNOS:
                    raise
                _error(storage_error(exc, Path(exc.filename or ".")))
                raise typer.Exit(2) from None
            except RuntimeError as exc:
                from cars_tl.core.distributed import peer_failure

                if not peer_failure(exc):
                    raise
                from cars_tl.console import console, labelled, rank_prefix

                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                console.print(
                    labelled(
                        rank_prefix(),
                        ("stopped:", "bold red"),
                        " another process of this torchrun job failed or was lost "
                        f"(its own message says why) — {first}",
                    ),
                    highlight=False,
                    soft_wrap=True,
                )
                console.print(
                    labelled(("next:", "bold"), " ", RESUME_HINTS.get(name, f"fix that and rerun cars-tl {name}")),
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(1) from None
            except KeyboardInterrupt as exc:
                from cars_tl.console import console, labelled

                hint = getattr(exc, "hint", None) or RESUME_HINTS.get(
                    name, f"rerun cars-tl {name} to start it again"
                )  # runs.RerunInterrupted
                console.print(labelled((f"{name} interrupted", "yellow"), ": ", hint), highlight=False, soft_wrap=True)
                raise typer.Exit(130) from None

        return app.command(name)(wrapper)

    return decorate


def _error(exc: CarsTLError) -> None:
    """``error: MESSAGE`` and ``next: HINT`` on stderr, both verbatim (paths and hints may hold brackets)."""
    from cars_tl.console import console, labelled, rank_prefix

    console.print(labelled(rank_prefix(), ("error:", "bold red"), " ", exc.message), highlight=False, soft_wrap=True)
    if exc.hint:
        console.print(labelled(("next:", "bold"), " ", exc.hint), highlight=False, soft_wrap=True)


RESUME_HINTS = {
    "extract-features": "rerun the same cars-tl extract-features command to resume from the last complete chunk",
    "finetune": "rerun the same cars-tl finetune command with --resume to continue from the last complete epoch",
    "download": "rerun the same cars-tl download command: verified archives and partial downloads are kept",
    # These stages start over: their interrupted run directory (kept to show what happened) is replaced with --force.
    **{
        stage: f"rerun the same cars-tl {stage} command with --force: the interrupted run is replaced"
        for stage in ("train-head", "fit-svm", "knn", "calibrate")
    },
}

DataDir = Annotated[Path, typer.Option("--data-dir", help="Folder holding stanford_cars/ and its manifest.")]
TensorBoard = Annotated[
    Path | None,
    typer.Option(
        "--tensorboard",
        metavar="DIR",
        help="Also log every epoch to TensorBoard event files in DIR/<run name> (needs cars_tl[tensorboard]; view: tensorboard --logdir DIR).",
    ),
]


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
        str,
        typer.Option(
            "--label-conflicts",
            help=(
                "keep | drop: identical images carrying different labels (the official training split has 11 such pairs). "
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


VERIFY_NOTE = (
    "--verify re-hashed every image. The everyday check (every stage, and download without --verify) compares only "
    "each image's size and mtime, so it misses an image replaced by one of the same size whose mtime was restored "
    "(cp -p, rsync -t, tar and zip extraction keep mtimes). Run --verify after copying, restoring or editing images "
    "with such tools, and once before the runs you report."
)


Backbone = Annotated[str, typer.Option(help="torchvision model name (resnet50) or timm/<name> (needs the timm extra).")]
Weights = Annotated[
    str,
    typer.Option(
        help="imagenet (torch cache) | random (seeded) | a torchvision weights name | PATH (state dict or run dir)."
    ),
]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
Precision = Annotated[str, typer.Option(help="auto (bf16 where the hardware has it, else fp32) | fp32 | bf16 | fp16")]
Artifacts = Annotated[Path, typer.Option(help="Root of generated files (features/, runs/, report/).")]
Out = Annotated[
    Path | None,
    typer.Option(
        "--out", metavar="FILE", help="Output .h5 file (default: ARTIFACTS/features/<backbone>-<weights>-<options>.h5)."
    ),
]
RunOut = Annotated[
    Path | None,
    typer.Option(
        "--out", metavar="RUN_DIR", help="Run directory (default: ARTIFACTS/runs/<stage>-<backbone>-<weights>-...)."
    ),
]
Force = Annotated[bool, typer.Option(help="Replace an existing run; the old one stays until the new one completes.")]
Resize = Annotated[
    str,
    typer.Option(
        "--resize",
        help=(
            "crop (the weights' resize + center crop: the study's) | squash (whole image or box to SxS) | pad (letterboxed to SxS on the mean colour)."
        ),
    ),
]
FeaturesFile = Annotated[Path, typer.Option("--features", help="HDF5 feature cache from extract-features.")]


@command("extract-features")
def extract_features(
    data_dir: DataDir = Path("data"),
    backbone: Backbone = "resnet50",
    weights: Weights = "imagenet",
    split: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SPLIT", help="Split to extract (repeatable): train, test (default: every split the dataset has)."
        ),
    ] = None,
    crop: Annotated[str, typer.Option(help="full image, or the annotated box.")] = "full",
    margin: Annotated[float, typer.Option(help="With --crop box: widen the box by this fraction per side.")] = 0.0,
    image_size: Annotated[
        int | None, typer.Option(help="Final side S in pixels (default: the weights' crop, e.g. 224; 32 to 1024).")
    ] = None,
    resize: Annotated[
        str | None,
        typer.Option(
            "--resize",
            help=(
                "crop (the weights' resize + center crop: the study's) | squash (whole image or box to SxS) | pad (letterboxed to SxS "
                "on the mean colour). Default: the preset's (study: crop; tuned: squash)."
            ),
        ),
    ] = None,
    tta: Annotated[
        str | None,
        typer.Option(
            help="none | flip: each row the mean of the image's and its mirror's features (study: none; tuned: flip)."
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help=(
                "final (the pooled output) | default (the family's two stages: ResNet layer3,layer4; timm blocks.N,final) | "
                "comma-separated stage names as --unfreeze knows them, pooled and concatenated in order (study: final; tuned: default)."
            )
        ),
    ] = None,
    combine: Annotated[
        str, typer.Option(help="With several --layers: l2 (each stage's block L2-normalised per image) | raw.")
    ] = "l2",
    preset: Annotated[
        str | None,
        typer.Option(
            help="study (the paper's setting) | tuned (squash 288 px, flip, two stages); explicit options win."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Decode threads on the CPU, DataLoader worker processes on CUDA; 0 decodes in the main thread (default: min(4, cores))."
        ),
    ] = None,
    device: Device = "auto",
    precision: Precision = "auto",
    skip_bad: Annotated[
        bool, typer.Option(help="Leave out unreadable images (listed in the file) instead of stopping.")
    ] = False,
    out: Out = None,
    artifacts: Artifacts = Path("artifacts"),
):
    """Run the frozen backbone over the images once and cache pooled features in HDF5.

    Resumes an interrupted run; a no-op when an identical complete file exists.
    """
    from cars_tl.console import console, labelled, progress
    from cars_tl.stages.extract import extract_features as run

    result = run(
        data_dir,
        backbone=backbone,
        weights=weights,
        splits=tuple(split) if split else None,
        crop=crop,
        margin=margin,
        image_size=image_size,
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        skip_bad=skip_bad,
        out=out,
        artifacts=artifacts,
        progress=progress(),
        resize_mode=resize,
        tta=tta,
        layers=layers,
        combine=combine,
        preset=preset,
    )
    from cars_tl.core.distributed import is_main_process

    if not is_main_process():  # torchrun: rank 0 reports
        return
    if result.replaced_corrupt:
        console.print(
            labelled(
                ("the existing file could not be trusted and was extracted again", "yellow"),
                f": {result.replaced_corrupt}",
            ),
            highlight=False,
            soft_wrap=True,
        )
    if result.action == "up to date":
        console.print(f"up to date: {result.path} (same backbone, weights, transform and dataset)")
        return
    skipped = sum(result.skipped.values())
    console.print(
        labelled(
            f"{result.action}: {result.path} — "
            + ", ".join(f"{s} {n}" for s, n in result.counts.items())
            + f" images, {result.images_per_second:,.1f} img/s ({result.precision} on {result.device})",
            *([", ", (f"{skipped} unreadable images skipped", "yellow"), " (listed in the file)"] if skipped else []),
        )
    )


@command("train-head")
def train_head(
    features: FeaturesFile,
    preset: Annotated[
        str, typer.Option(help="study (the paper's exact setting) | tuned (validated linear probe).")
    ] = "study",
    epochs: Annotated[int | None, typer.Option(help="Epochs (study: 15; tuned: 15 L-BFGS epochs).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (study: 1e-3; tuned: 1 for L-BFGS).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (study: 32; tuned: full batch).")] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="adam | adamw | sgd | lbfgs (study: adam; tuned: lbfgs).")
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="Weight decay (study: 0; tuned: chosen on a validation split).")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed for the head's initialisation, shuffling and the validation split.")
    ] = 0,
    force: Force = False,
    out: RunOut = None,
    artifacts: Artifacts = Path("artifacts"),
    tensorboard: TensorBoard = None,
):
    """Train a Linear head (model B) on cached features; saves head.pt and metrics.json."""
    from cars_tl.console import progress
    from cars_tl.stages.train_head import train_head as run

    run_dir, metrics = run(
        features,
        preset=preset,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        optimizer=optimizer,
        weight_decay=weight_decay,
        seed=seed,
        out=out,
        artifacts=artifacts,
        progress=progress(),
        force=force,
        tensorboard=tensorboard,
    )
    _print_final(run_dir, metrics)


@command("fit-svm")
def fit_svm(
    features: FeaturesFile,
    kernel: Annotated[str, typer.Option(help="linear | poly | rbf | sigmoid | all (fit each, compare).")] = "poly",
    c: Annotated[
        str | None,
        typer.Option(
            "--C",
            help="SVC regularization C: a positive number, or auto (chosen by stratified k-fold CV on train) [study: 1; tuned: auto].",
        ),
    ] = None,
    degree: Annotated[int, typer.Option(help="poly degree.")] = 3,
    gamma: Annotated[
        str | None,
        typer.Option(
            help="scale | auto (1/n_features) | a number (sklearn's meaning) | cv (chosen by CV around scale) [study: scale; tuned: cv]."
        ),
    ] = None,
    coef0: Annotated[float, typer.Option(help="poly/sigmoid coef0.")] = 0.0,
    scale: Annotated[
        str | None, typer.Option(help="Feature scaling: l2 (see README) | standard | none [both presets: l2].")
    ] = None,
    method: Annotated[str, typer.Option(help="precomputed (fast torch kernel) | plain (sklearn SVC).")] = "precomputed",
    preset: Annotated[
        str, typer.Option(help="study (sklearn defaults C=1, gamma=scale: the study) | tuned (--C auto --gamma cv).")
    ] = "study",
    cv_folds: Annotated[
        int, typer.Option(help="Folds of the stratified cross-validation for --C auto / --gamma cv.")
    ] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the cross-validation folds.")] = 0,
    force: Force = False,
    out: RunOut = None,
    artifacts: Artifacts = Path("artifacts"),
):
    """Fit an SVM (model C) on cached features; --kernel all compares every kernel from one cache."""
    from rich.table import Table

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
    config = metrics["config"]
    searched = any("search" in r for r in metrics["kernels"].values())
    table = Table(title=f"SVM on {features.name} ({config['scale']} scaling, C={config['C']}, gamma={config['gamma']})")
    columns = (
        ["kernel"]
        + (["C", "gamma", "CV acc %"] if searched else [])
        + ["train acc %", "test acc %", "fit s", "predict s", "support vectors"]
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "kernel" else "right")
    for r in metrics["kernels"].values():
        chosen = (
            [
                f"{r['C']:g}",
                f"{r['gamma_value']:.4g}" if r["kernel"] != "linear" else "-",
                f"{r['cv_acc']:.2f} ± {r['cv_std']:.2f}",
            ]
            if searched
            else []
        )
        table.add_row(
            r["kernel"],
            *chosen,
            f"{r['train_acc']:.2f}",
            f"{r['test_acc']:.2f}",
            f"{r['fit_seconds']:.2f}",
            f"{r['predict_seconds']:.2f}",
            str(r["support_vectors"]),
        )
    stdout.print(table)
    if searched:
        from cars_tl.models.svm.search import extension_note

        stdout.print("CV acc %: the mean ± std of the folds' accuracies (as scikit-learn's cross_val_score)")
        for r in metrics["kernels"].values():
            note = extension_note(r.get("search"))
            if note:
                stdout.print(f"{r['kernel']}: {note}")
    stdout.print(f"run: {run_dir}")


def _print_final(run_dir: Path, metrics: dict) -> None:
    from cars_tl.console import out as stdout

    f = metrics["final"]
    measured = all(f.get(k) is not None for k in ("test_loss", "test_acc", "test_top5"))
    test = (
        f"test loss {f['test_loss']:.4f} acc {f['test_acc']:.2f}% top-5 {f['test_top5']:.2f}%"
        if measured
        else "no test split (train-only dataset): nothing measured on test"
    )
    stdout.print(
        f"{metrics['kind']} run {run_dir}: train loss {f['train_loss']:.4f} acc {f['train_acc']:.2f}% | {test} | "
        f"trainable {metrics['params']['trainable']:,} of {metrics['params']['total']:,} params | {metrics['wall_time_s']:.1f} s"
    )


@command("finetune")
def finetune(
    data_dir: DataDir = Path("data"),
    backbone: Backbone = "resnet50",
    weights: Weights = "imagenet",
    unfreeze: Annotated[
        str, typer.Option(help="none | all | comma-separated backbone modules (resnet: layer4 or layer3,layer4).")
    ] = "layer4",
    init_head: Annotated[
        Path | None, typer.Option(help="Start the head from this train-head run (model D from model B).")
    ] = None,
    preset: Annotated[
        str, typer.Option(help="study (the paper's setting) | tuned (augmentation, AdamW, cosine, smoothing).")
    ] = "study",
    epochs: Annotated[int | None, typer.Option(help="Epochs (study: 15; tuned: 30).")] = None,
    lr: Annotated[
        float | None, typer.Option(help="Head learning rate (1e-3); tuned uses 0.1x for the backbone.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (32).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam | adamw | sgd (study: adam; tuned: adamw).")] = None,
    augment: Annotated[str | None, typer.Option(help="none | standard (study: none; tuned: standard).")] = None,
    crop: Annotated[str, typer.Option(help="full | box")] = "full",
    margin: Annotated[float, typer.Option(help="With --crop box: widen the box by this fraction per side.")] = 0.0,
    image_size: Annotated[
        int | None, typer.Option(help="Final side S in pixels (default: the weights' crop; 32 to 1024).")
    ] = None,
    resize: Resize = "crop",
    device: Device = "auto",
    precision: Precision = "auto",
    workers: Annotated[
        int | None,
        typer.Option(
            help="Loader workers: decode threads for evaluation on the CPU, DataLoader processes otherwise (default: min(4, cores) on the CPU, every core on CUDA)."
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed: the head's and a random backbone's initialisation, shuffling, augmentation, validation split."
        ),
    ] = 0,
    resume: Annotated[bool, typer.Option(help="Continue a killed run from its last checkpoint.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            help="Replace an existing run (kept until the new one completes), or resume with changed options."
        ),
    ] = False,
    out: RunOut = None,
    artifacts: Artifacts = Path("artifacts"),
    tta: Annotated[
        str | None,
        typer.Option(
            help="none | flip: evaluation and saved predictions average the logits of each image and its mirror (default: the preset's; study: none, tuned: none: not better on validation, benchmarks/README.md)."
        ),
    ] = None,
    sync_bn: Annotated[
        bool | None,
        typer.Option(
            "--sync-bn/--no-sync-bn",
            help="Under torchrun: SyncBatchNorm where BatchNorm statistics train (CUDA only). Default: on for CUDA jobs of several processes, so BN sees the global batch.",
            show_default=False,
        ),
    ] = None,
    trunk_cache: Annotated[
        str,
        typer.Option(
            help="auto | off | PATH: run the frozen part below the first unfrozen module once into a trunk cache (built if missing) and train on its maps, when that is exact (no augmentation, frozen part in eval mode, same transform and precision); otherwise the images, saying why."
        ),
    ] = "auto",
    trunk_dtype: Annotated[
        str,
        typer.Option(
            help="Trunk cache storage: auto (the precision's own: exact) | fp32 | fp16 | bf16 (half the size of fp32, rounded)."
        ),
    ] = "auto",
    tensorboard: TensorBoard = None,
):
    """Fine-tune a backbone + head on the images (model A: --weights random --unfreeze all; model D: --unfreeze layer4 --init-head B)."""
    from cars_tl.console import console, labelled, progress
    from cars_tl.core.distributed import is_main_process
    from cars_tl.stages.finetune import finetune as run

    run_dir, metrics = run(
        data_dir,
        backbone=backbone,
        weights=weights,
        unfreeze=unfreeze,
        init_head=init_head,
        preset=preset,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        optimizer=optimizer,
        augment=augment,
        crop=crop,
        margin=margin,
        image_size=image_size,
        device=device,
        precision=precision,
        workers=workers,
        seed=seed,
        resume=resume,
        force=force,
        out=out,
        artifacts=artifacts,
        progress=progress(),
        resize_mode=resize,
        sync_bn=sync_bn,
        tta=tta,
        trunk_cache=trunk_cache,
        trunk_dtype=trunk_dtype,
        tensorboard=tensorboard,
    )
    if not is_main_process():  # torchrun: rank 0 reports
        return
    p = metrics["params"]
    console.print(f"parameters: total {p['total']:,}, trainable {p['trainable']:,}")
    if metrics.get("resumed_with_changes"):
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in metrics["resumed_with_changes"].items())
        restarted = (
            "; the optimizer and learning-rate schedule started afresh" if metrics.get("optimizer_restarted") else ""
        )
        console.print(
            labelled(("resumed with changed options", "yellow"), f" ({changes}){restarted}"),
            highlight=False,
            soft_wrap=True,
        )
    _print_final(run_dir, metrics)


@command("build-trunk")
def build_trunk(
    data_dir: DataDir = Path("data"),
    backbone: Backbone = "resnet50",
    weights: Weights = "imagenet",
    unfreeze: Annotated[
        str, typer.Option(help="The fine-tune's --unfreeze: the cache holds the maps below its first module.")
    ] = "layer4",
    crop: Annotated[str, typer.Option(help="full | box")] = "full",
    margin: Annotated[float, typer.Option(help="With --crop box: widen the box by this fraction per side.")] = 0.0,
    image_size: Annotated[int | None, typer.Option(help="Final side S in pixels (default: the weights' crop).")] = None,
    resize: Resize = "crop",
    device: Device = "auto",
    precision: Precision = "auto",
    trunk_dtype: Annotated[
        str, typer.Option(help="Storage: auto (the precision's own: exact) | fp32 | fp16 | bf16.")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[
        int | None, typer.Option(help="Decode threads on the CPU, DataLoader processes on CUDA.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of a random backbone (0: the one finetune --init-head uses).")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="FILE",
            help="Output .h5 (default: ARTIFACTS/trunks/<backbone>-<weights>-<cut>-<precision>-<storage>-<digest>.h5).",
        ),
    ] = None,
    artifacts: Artifacts = Path("artifacts"),
):
    """Run a fine-tune's frozen part over the images once, into a trunk cache (what finetune --trunk-cache reads)."""
    from cars_tl.console import console, progress
    from cars_tl.core.distributed import is_main_process
    from cars_tl.stages.trunk_cache import build_trunk as run

    path, result = run(
        data_dir=data_dir,
        backbone=backbone,
        weights=weights,
        unfreeze=unfreeze,
        crop=crop,
        margin=margin,
        image_size=image_size,
        resize_mode=resize,
        device=device,
        precision=precision,
        storage=trunk_dtype,
        batch_size=batch_size,
        workers=workers,
        seed=seed,
        out=out,
        artifacts=artifacts,
        progress=progress(),
    )
    if not is_main_process():
        return
    if result.get("replaced"):
        console.print(
            f"[yellow]the existing file was not used[/]: {result['replaced']}", highlight=False, soft_wrap=True
        )
    console.print(
        f"{result['action']}: {path} (maps below {result['cut']}, {result['storage']} storage, "
        f"{result['precision']} compute) in {result['seconds']:.1f} s",
        highlight=False,
    )


@command("predict")
def predict(
    model: Annotated[
        list[Path],
        typer.Option("--model", metavar="RUN_DIR", help="Run directory (finetune, train-head or fit-svm); repeatable."),
    ],
    images: Annotated[
        list[Path] | None, typer.Argument(metavar="IMAGE", help="Image files.", show_default=False)
    ] = None,
    top_k: Annotated[int, typer.Option(help="Classes shown per model.")] = 5,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    split: Annotated[
        str | None,
        typer.Option(
            help="Instead of images: score this whole split of the manifest and save each run's predictions-<split>.npz."
        ),
    ] = None,
    data_dir: DataDir = Path("data"),
    boxed: Annotated[
        bool,
        typer.Option(
            "--boxed", help="The images already are box crops (for --crop box runs, cut with the run's margin)."
        ),
    ] = False,
):
    """Top-k classes per image, the given models side by side (softmax probability, or SVM decision score)."""
    import json

    from rich.table import Table

    from cars_tl.console import labelled
    from cars_tl.console import out as stdout
    from cars_tl.stages.predict import predict as run

    if split:
        from cars_tl.console import progress
        from cars_tl.stages.predict import predict_split

        for saved in predict_split(model, split=split, data_dir=data_dir, progress=progress(), images=images or []):
            stdout.print(
                f"{saved['run']}: {saved['count']} {split} images, top-1 {saved['accuracy']:.2f}% -> {saved['file']}"
            )
        return
    results = run(images or [], run_dirs=model, top_k=top_k, boxed=boxed)
    if json_output:
        print(json.dumps(results, indent=2))
        return
    for result in results:
        table = Table(title=result["image"], show_lines=False)
        table.add_column("#", justify="right")
        for name, p in result["predictions"].items():
            table.add_column(labelled(f"{name}\n", (f"{p['kind']} · {p['score_kind']}", "dim")))
        rows = max(len(p["top"]) for p in result["predictions"].values())
        for i in range(rows):
            cells = []
            for p in result["predictions"].values():
                t = p["top"][i] if i < len(p["top"]) else None
                value = (
                    f"{100 * t['score']:.1f}%"
                    if t and p["score_kind"] == "probability"
                    else (f"{t['score']:.3f}" if t else "")
                )
                cells.append(labelled(f"{t['class']} ", (value, "bold")) if t else "")
            table.add_row(str(i + 1), *cells)
        stdout.print(table)


@command("sparsity")
def sparsity(
    model: Annotated[list[Path], typer.Option("--model", metavar="RUN_DIR", help="Run directory (repeatable).")],
    image: Annotated[
        list[Path] | None, typer.Option("--image", metavar="IMAGE", help="Image file (repeatable).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Or take images from this split of the manifest.")] = None,
    limit: Annotated[int, typer.Option(help="With --split: how many images.")] = 32,
    data_dir: DataDir = Path("data"),
    out: Annotated[Path, typer.Option(help="Folder for sparsity.csv/.json/.png.")] = names.DEFAULT_SPARSITY_FOLDER,
):
    """Fraction of exactly-zero outputs of every ReLU call, per model; CSV, JSON and a bar chart."""
    from cars_tl.console import console, progress
    from cars_tl.stages.sparsity import measure

    summary = measure(model, images=image, split=split, limit=limit, data_dir=data_dir, out=out, progress=progress())
    for name, values in summary["models"].items():
        mean = sum(values.values()) / len(values)
        console.print(f"{name}: {len(values)} ReLU calls, mean zero fraction {mean:.3f}")
    console.print("wrote " + ", ".join(summary["files"].values()))


@command("report")
def report(
    artifacts: Artifacts = Path("artifacts"),
    out: Annotated[Path | None, typer.Option(help="Report folder (default: ARTIFACTS/report).")] = None,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Dataset the runs used: thumbnails in the report come from its images.")
    ] = Path("data"),
):
    """Gather every run: headline chart, comparison, seeds, curves, per-class and make-level accuracy, confusions, gallery (report.md, report.html)."""
    from rich.table import Table

    from cars_tl.console import console, labelled
    from cars_tl.console import out as stdout
    from cars_tl.report.build import build_report

    result = build_report(artifacts, out=out, data_dir=data_dir)
    table = Table(title="cars_tl runs")
    shown = [c for c in result["columns"] if c not in ("kind", "total params", "best epoch")]
    for column in shown:
        table.add_column(
            column, justify="left" if column in ("model", "kind", "backbone / weights / preset") else "right"
        )
    for row in result["rows"]:
        table.add_row(*(row[c] for c in shown))
    stdout.print(table)
    for problem in result["problems"]:
        console.print(labelled((problem["status"], "yellow"), f": {problem['run']} ({problem['detail']})"))
    if result["thumbnails"]:
        console.print(labelled(("note", "yellow"), f": {result['thumbnails']}"))
    console.print("wrote " + ", ".join(result["files"].values()))


@command("knn")
def knn(
    features: FeaturesFile,
    k: Annotated[
        list[str] | None,
        typer.Option(
            "--k",
            help="Neighbours that vote; repeatable or comma-separated (10,20,50), each reported; the first is the run's result. [20]",
        ),
    ] = None,
    temperature: Annotated[float, typer.Option(help="Vote weight exp(cosine / T).")] = 0.07,
    force: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default under --artifacts/runs).")] = None,
    artifacts: Artifacts = Path("artifacts"),
):
    """Weighted k-nearest-neighbour classification on cosine similarity of cached features (DINO protocol)."""
    from cars_tl.console import out as stdout
    from cars_tl.console import progress
    from cars_tl.stages.knn import run_knn

    run_dir, metrics = run_knn(
        features,
        ks=tuple(k or ()),
        temperature=temperature,
        force=force,
        out=out,
        artifacts=artifacts,
        progress=progress(),
    )
    for r in metrics["k_results"].values():
        stdout.print(f"k={r['k']:<4} test acc {r['test_acc']:.2f}%  top-5 {r['test_top5']:.2f}%")
    stdout.print(f"knn run {run_dir}: T={temperature}, {metrics['wall_time_s']:.1f} s")


@command("calibrate")
def calibrate(
    run: Annotated[
        Path, typer.Option("--run", metavar="RUN_DIR", help="A train-head or finetune run with a validation split.")
    ],
    data_dir: DataDir = Path("data"),
    workers: Annotated[int | None, typer.Option(help="Image decoding threads (finetune runs).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory (default: RUN_DIR's name + -calibrated).")
    ] = None,
    artifacts: Artifacts = Path("artifacts"),
):
    """Temperature scaling: fit T on the run's validation logits; ECE and NLL before and after, a reliability diagram."""
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


@command("paths")
def paths(
    key: Annotated[
        str | None,
        typer.Argument(
            metavar="KEY", help="Print only this value (e.g. FEATURES, HEAD_RUN_0, SVM_RUN).", show_default=False
        ),
    ] = None,
    artifacts: Artifacts = Path("artifacts"),
    backbone: Backbone = "resnet50",
    weights: Weights = "imagenet",
    preset: Annotated[str, typer.Option(help="study | tuned: extraction and SVM settings, and run names.")] = "study",
    resize: Annotated[str | None, typer.Option("--resize", help="crop | squash | pad (default: the preset's).")] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Final side in pixels (default: the preset's; study: the weights' own).")
    ] = None,
    kernel: Annotated[str, typer.Option(help="fit-svm's kernel, for SVM_RUN.")] = "poly",
    c: Annotated[str | None, typer.Option("--C", help="fit-svm's C (default: the preset's).")] = None,
    gamma: Annotated[str | None, typer.Option(help="fit-svm's gamma (default: the preset's).")] = None,
    scale: Annotated[str | None, typer.Option(help="fit-svm's feature scaling (default: the preset's).")] = None,
    unfreeze: Annotated[
        str, typer.Option(help="Model D's unfrozen modules, for TRUNK and PARTIAL_RUN_<seed>.")
    ] = "layer4",
    seed: Annotated[
        list[int] | None,
        typer.Option("--seed", help="Seed of B, A and D (repeatable; several: run names gain -s<seed>)."),
    ] = None,
    check_backbone: Annotated[
        bool,
        typer.Option(
            help="Also check --backbone, --unfreeze, --resize and --image-size as the stages do (imports torch; "
            "make skips it for a combination that passed once)."
        ),
    ] = True,
):
    """Print the pipeline's names and preset settings as KEY=value lines: what `make` reads.

    These are the names `make` passes with --out; a stage run without --out names its output itself
    (e.g. runs/head-<backbone>-<weights>-<preset>). Every option is checked as its stage checks it, and
    must be a name make can carry (letters, digits and . _ - + , / @): nothing is printed otherwise."""
    from cars_tl.core.errors import check_seed
    from cars_tl.models.svm.kernels import KERNELS
    from cars_tl.models.svm.model import Scaler, parse_gamma
    from cars_tl.models.svm.search import parse_C
    from cars_tl.stages.presets import pipeline_values

    texts = dict(artifacts=str(artifacts), backbone=backbone, weights=weights, preset=preset, resize=resize)
    texts.update(kernel=kernel, C=c, gamma=gamma, scale=scale, unfreeze=unfreeze)
    for option, value in texts.items():
        if value is not None:
            names.check_pipeline_value(f"--{option.replace('_', '-')}", value)
    for s in seed or ():
        check_seed(s)
    if kernel != "all" and kernel not in KERNELS:
        raise CarsTLError(
            f"unknown --kernel {kernel!r}; valid: {', '.join(KERNELS)}, all",
            "e.g. --kernel poly (make: SVM_KERNEL=poly)",
        )
    values = pipeline_values(
        artifacts=artifacts,
        backbone=backbone,
        weights=weights,
        preset=preset,
        resize=resize,
        image_size=image_size,
        kernel=kernel,
        C=c,
        gamma=gamma,
        scale=scale,
        unfreeze=unfreeze,
        seeds=seed,
    )
    # The preset's values are checked too: an explicit one may have replaced only some of them.
    parse_C(values["SVM_C"])
    Scaler(values["SVM_SCALE"])
    if values["SVM_GAMMA"] != "cv":
        parse_gamma(values["SVM_GAMMA"])
    if check_backbone:
        from cars_tl.models.backbones import check_options

        check_options(backbone, unfreeze, image_size, values["RESIZE"])
    if key is not None:
        if key not in values:
            raise CarsTLError(f"unknown KEY {key!r}; valid: {', '.join(values)}", "cars-tl paths (every KEY=value)")
        print(values[key])
        return
    for name, value in values.items():
        print(f"{name}={value}")


@command("inspect")
def inspect(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="A feature cache (.h5), a run directory or a data folder (its manifest); two caches (or two runs) are compared."
        ),
    ],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    embedding: Annotated[
        Path | None,
        typer.Option(
            metavar="OUT.png",
            help="Instead: draw the 2-D feature map (PCA 50 -> t-SNE, by make) of the cache's split, or of a fine-tuned run's test features.",
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="With --embedding: the split to map.")] = "test",
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="With --embedding: the dataset, for thumbnails on the map.")
    ] = Path("data"),
    seed: Annotated[int, typer.Option(help="With --embedding: seed of PCA and t-SNE.")] = 0,
):
    """Look inside a feature cache, a run or a data folder: provenance, splits, skipped images, feature statistics, final metrics, label conflicts."""
    import json

    from cars_tl.console import out as stdout

    if embedding is not None:
        from cars_tl.stages.embedding import embedding_picture

        r = embedding_picture(paths[0], out=embedding, split=split, data_dir=data_dir, seed=seed)
        stdout.print(
            f"{r['png']}: {r['images']} images, {r['makes']} makes; make-level 10-NN accuracy {r['knn_map']:.1f}% "
            f"in the 2-D map, {r['knn_full']:.1f}% in the full space; map {'reused' if r['reused'] else 'computed'} "
            f"({r['map_file']}, {r['seconds']:.1f} s)",
            highlight=False,
            soft_wrap=True,
        )
        return
    from cars_tl.stages.inspect import inspect_paths, render_text

    result = inspect_paths(paths)
    if json_output:
        print(json.dumps(result, indent=2))
        return
    stdout.print(render_text(result), markup=False, highlight=False, soft_wrap=True)


@command("track")
def track(
    to: Annotated[
        tuple[str, str],
        typer.Option(
            "--to",
            metavar="KIND TARGET",
            help="tensorboard DIR (event files, one folder per run) | mlflow URI (sqlite:///mlflow.db or a tracking server's URL).",
        ),
    ],
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="RUN_DIR", help="Run directories, or folders of runs [default: ARTIFACTS/runs].", show_default=False
        ),
    ] = None,
    artifacts: Artifacts = Path("artifacts"),
    experiment: Annotated[str, typer.Option(help="MLflow experiment the runs go into.")] = "cars_tl",
):
    """Mirror finished runs into TensorBoard or MLflow (params, per-epoch metrics, tags, small files); rerunning adds nothing new."""
    from cars_tl.console import console
    from cars_tl.console import out as stdout
    from cars_tl.report.track import track as run

    results = run(paths or [names.runs_folder(artifacts)], to=to[0], target=to[1], experiment=experiment)
    for r in results:
        line = (
            f"{r['action']:<9} {r['run']} -> {r['detail']}"
            if r["action"] != "skipped"
            else f"skipped   {r['run']}: {r['detail']}"
        )
        (console if r["action"] == "skipped" else stdout).print(line, markup=False, highlight=False, soft_wrap=True)
    counts = {a: sum(r["action"] == a for r in results) for a in ("created", "replaced", "unchanged", "skipped")}
    console.print(", ".join(f"{n} {a}" for a, n in counts.items()) + f" ({to[0]} {to[1]})", highlight=False)
