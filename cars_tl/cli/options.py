"""Every option that several commands take, declared once: its type (a ``Literal`` where the values are a
fixed set, so ``--help`` lists them and Typer checks them) and its one help text. Defaults stay at the
command, where they differ.

No torch here, nor anything that imports it: ``--help`` reads this module. The choice sets repeat the
library's tuples (tests/test_cli.py checks that they agree).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

PresetName = Literal["study", "tuned"]
CropMode = Literal["full", "box"]
ResizeMode = Literal["crop", "squash", "pad"]  # data.transforms.RESIZE_MODES
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]  # core.runtime.PRECISIONS
TrunkDtype = Literal["auto", "fp32", "fp16", "bf16"]  # "auto" + artifacts.trunks.STORAGES
TtaMode = Literal["none", "flip"]  # models.feature_views.TTA_MODES
KernelName = Literal["linear", "poly", "rbf", "sigmoid", "all"]  # models.svm.kernels.KERNELS + "all"
ScaleName = Literal["none", "standard", "l2"]  # models.svm.model.SCALES

DataDir = Annotated[Path, typer.Option("--data-dir", help="Folder holding stanford_cars/ and its manifest.")]
Artifacts = Annotated[Path, typer.Option(help="Root of generated files (features/, runs/, report/).")]
Backbone = Annotated[str, typer.Option(help="torchvision model name (resnet50) or timm/<name> (needs the timm extra).")]
Weights = Annotated[
    str,
    typer.Option(
        help="imagenet (torch cache) | random (seeded) | a torchvision weights name | PATH (state dict or run dir)."
    ),
]
Preset = Annotated[
    PresetName | None,
    typer.Option(
        help="study (the paper's setting) | tuned (the validated improvements: the stage's README section); explicit options win."
    ),
]
Crop = Annotated[CropMode, typer.Option(help="full image, or the annotated box.")]
Margin = Annotated[float, typer.Option(help="With --crop box: widen the box by this fraction per side.")]
ImageSize = Annotated[
    int | None,
    typer.Option(
        help="Final side S in pixels, 32 to 1024 (default: the preset's; study: the weights' crop, e.g. 224; tuned: 288)."
    ),
]
Resize = Annotated[
    ResizeMode | None,
    typer.Option(
        "--resize",
        help=(
            "crop (the weights' resize + center crop: the study's) | squash (whole image or box to SxS) | pad "
            "(letterboxed to SxS on the mean colour). Unset: the preset's (study: crop; tuned: squash)."
        ),
    ),
]
Tta = Annotated[
    TtaMode | None,
    typer.Option(
        help="none | flip: average each image with its mirror (extract-features: the features; finetune: the "
        "logits of evaluation and saved predictions). Default: the preset's; tuned: flip for extract-features, "
        "none for finetune (not better on validation: benchmarks/README.md)."
    ),
]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
Precision = Annotated[
    PrecisionName, typer.Option(help="auto (bf16 where the hardware has it, else fp32) | fp32 | bf16 | fp16")
]
Workers = Annotated[
    int | None,
    typer.Option(
        help="Image loading: decode threads on the CPU, DataLoader worker processes on CUDA (finetune trains with "
        "processes everywhere); 0 decodes in the main thread. Default: min(4, cores); finetune on CUDA: every core."
    ),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        help="Images per batch (a forward pass; training: the preset's when unset, study: 32, tuned train-head: "
        "the full set)."
    ),
]
Epochs = Annotated[
    int | None, typer.Option(help="Epochs (study: 15; tuned: 15 L-BFGS epochs in train-head, 30 in finetune).")
]
LearningRate = Annotated[
    float | None,
    typer.Option(
        help="Learning rate (study: 1e-3; tuned: 1 for train-head's L-BFGS, 1e-3 for finetune's head with 0.1x "
        "for its backbone)."
    ),
]
Seed = Annotated[
    int,
    typer.Option(
        help="Seed of everything random in the command: initialisation (of the head, of a random backbone), "
        "shuffling, augmentation, the validation split, CV folds, PCA and t-SNE."
    ),
]
Unfreeze = Annotated[
    str,
    typer.Option(
        help="The fine-tune's trained backbone modules: none | all | comma-separated (resnet: layer4 or "
        "layer3,layer4); its frozen part (a trunk cache's maps) lies below the first."
    ),
]
TrunkStorage = Annotated[
    TrunkDtype,
    typer.Option(
        help="Trunk cache storage: auto (the precision's own: exact) | fp32 | fp16 | bf16 (half the size of fp32, "
        "rounded)."
    ),
]
Kernel = Annotated[KernelName, typer.Option(help="SVM kernel; all fits each and compares them.")]
SvmC = Annotated[
    str | None,
    typer.Option(
        "--C",
        help="SVC regularization C: a positive number, or auto (chosen by stratified k-fold CV on train) "
        "[study: 1; tuned: auto].",
    ),
]
Gamma = Annotated[
    str | None,
    typer.Option(
        help="scale | auto (1/n_features) | a number (sklearn's meaning) | cv (chosen by CV around scale) "
        "[study: scale; tuned: cv]."
    ),
]
Scale = Annotated[
    ScaleName | None, typer.Option(help="SVM feature scaling: l2 (see README) | standard | none [both presets: l2].")
]
Force = Annotated[
    bool,
    typer.Option(
        help="Replace an existing run; the old one stays until the new one completes (finetune --resume: resume "
        "with changed options)."
    ),
]
OutFile = Annotated[
    Path | None,
    typer.Option(
        "--out",
        metavar="FILE",
        help="Output .h5 file (default: ARTIFACTS/features/ or ARTIFACTS/trunks/, named after its options: "
        "cars-tl paths prints the names).",
    ),
]
RunOut = Annotated[
    Path | None,
    typer.Option(
        "--out", metavar="RUN_DIR", help="Run directory (default: ARTIFACTS/runs/<stage>-<backbone>-<weights>-...)."
    ),
]
FeaturesFile = Annotated[Path, typer.Option("--features", help="HDF5 feature cache from extract-features.")]
Models = Annotated[
    list[Path],
    typer.Option("--model", metavar="RUN_DIR", help="Run directory (repeatable)."),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
TensorBoard = Annotated[
    Path | None,
    typer.Option(
        "--tensorboard",
        metavar="DIR",
        help="Also log every epoch to TensorBoard event files in DIR/<run name> (needs cars_tl[tensorboard]; "
        "view: tensorboard --logdir DIR).",
    ),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="Read options from this TOML file (a run's config.toml, or --print-config's output); options given on "
        "the command line win.",
        show_default=False,
    ),
]
PrintConfig = Annotated[
    bool,
    typer.Option(
        "--print-config", help="Print the effective options (command line, --config, defaults) as TOML and exit."
    ),
]
