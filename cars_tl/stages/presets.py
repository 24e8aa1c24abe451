"""Every stage's named presets in one place: ``study`` (the paper's settings) and ``tuned`` (our best
measured), for the head (train-head), the SVM (fit-svm), the fine-tune (finetune) and the feature
extraction (extract-features, build-trunk). An option given explicitly wins over its preset's value.

Each stage resolves its preset once, through :func:`for_stage`; the stages that read images
(extract-features, build-trunk, finetune) and ``cars-tl paths`` (hence ``make``) take the image shape
from the one :data:`IMAGE` table, so a preset extracts, caches and trains on the same pixels.

Standard library only (no torch): ``cars-tl paths`` (and so ``make``) reads it as cheaply as the stages.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cars_tl.artifacts import names
from cars_tl.core.errors import CarsTLError
from cars_tl.core.options import ImageOptions

NAMES = ("study", "tuned")

HEAD = {
    "study": dict(
        epochs=15,
        lr=1e-3,
        batch_size=32,
        optimizer="adam",
        weight_decay=0.0,
        label_smoothing=0.0,
        standardize=False,
        schedule="none",
        val_fraction=0.0,
    ),
    # weight_decay None: chosen on the validation split from train_head.WEIGHT_DECAY_GRID.
    "tuned": dict(
        epochs=15,
        lr=1.0,
        batch_size=0,
        optimizer="lbfgs",
        weight_decay=None,
        label_smoothing=0.0,
        standardize=True,
        schedule="none",
        val_fraction=0.1,
    ),
}

FINETUNE = {
    "study": dict(
        epochs=15,
        lr=1e-3,
        batch_size=32,
        optimizer="adam",
        weight_decay=0.0,
        label_smoothing=0.0,
        augment="none",
        schedule="none",
        warmup_epochs=0,
        backbone_lr_scale=1.0,
        val_fraction=0.0,
        freeze_bn_stats=False,
    ),
    "tuned": dict(
        epochs=30,
        lr=1e-3,
        batch_size=32,
        optimizer="adamw",
        weight_decay=0.05,
        label_smoothing=0.1,
        augment="standard",
        schedule="cosine",
        warmup_epochs=1,
        backbone_lr_scale=0.1,
        val_fraction=0.1,
        freeze_bn_stats=True,
    ),
}
# finetune --tta per preset (evaluation and saved predictions average the logits of each image and its
# mirror). Kept out of FINETUNE so that configs of earlier runs stay comparable on --resume (absent
# means none). tuned: off -- it did not measure better on the validation split
# (benchmarks/bench_finetune_tta.py: 3 epochs on the real subset, kept epoch val 35.0% with flip vs
# 40.0% without, 40 images); study: never.
FINETUNE_TTA = {"study": "none", "tuned": "none"}

# study: scikit-learn's defaults (C=1, gamma=scale); tuned: both chosen by 5-fold CV on train.
SVM = {
    "study": {"C": 1.0, "gamma": "scale", "scale": "l2"},
    "tuned": {"C": "auto", "gamma": "cv", "scale": "l2"},
}
SVM_HINT = "--preset study (C=1, gamma=scale: the study) or --preset tuned (--C auto --gamma cv)"

# The image shape (``--resize``, ``--image-size``; ``--crop`` full|box is no preset's) of every stage
# that reads images. study: the paper's exact setting (resize + center crop at the weights' size).
# tuned: what measured best on the real subset (benchmarks/bench_accuracy.py, README "Flip and
# two-stage features"): squash 288 px.
IMAGE = {
    "study": dict(resize_mode="crop", image_size=None),
    "tuned": dict(resize_mode="squash", image_size=288),
}

# What a feature row is made of. study: one view, the final pooled output; tuned: flip-averaged, the
# family's two stages.
EXTRACT = {
    "study": dict(tta="none", layers="final"),
    "tuned": dict(tta="flip", layers="default"),
}
EXTRACT_HINT = "study (the paper's setting) or tuned (squash 288 px, flip-averaged, two stages)"
IMAGE_HINT = "study (the paper's setting: the weights' resize + center crop) or tuned (squash 288 px)"

# Each stage's tables, merged in this order: the image shape is part of every image stage's preset.
STAGES = {
    "train-head": (HEAD,),
    "fit-svm": (SVM,),
    "extract-features": (IMAGE, EXTRACT),
    "build-trunk": (IMAGE,),
    "finetune": (IMAGE, FINETUNE),
}
HINTS = {"fit-svm": SVM_HINT, "extract-features": EXTRACT_HINT, "build-trunk": IMAGE_HINT}


def resolve(table: dict, preset: str, hint: str | None = None, **overrides) -> dict:
    """``table[preset]`` (a copy) with every explicit (non-None) override applied; an unknown preset is
    refused naming the valid ones."""
    if preset not in table:
        raise CarsTLError(f"unknown --preset {preset!r}; valid: {', '.join(table)}", hint)
    config = dict(table[preset])
    config.update({k: v for k, v in overrides.items() if v is not None})
    return config


def for_stage(stage: str, preset: str | None, **overrides) -> dict:
    """The preset options of ``stage`` (a key of :data:`STAGES`) under ``preset`` (None: study), every
    explicit (non-None) override applied: for an image stage, ``resize_mode`` and ``image_size``
    (None: the weights' own size) among them."""
    merged = {name: {k: v for table in STAGES[stage] for k, v in table[name].items()} for name in NAMES}
    return resolve(merged, "study" if preset is None else preset, HINTS.get(stage), **overrides)


def image_options(stage: str, preset: str | None, image: ImageOptions) -> ImageOptions:
    """``image`` with the image shape of ``stage``'s ``preset`` (None: study) where it leaves it unset:
    ``resize`` always set, ``image_size`` None only for the weights' own size."""
    shape = for_stage(stage, preset, resize_mode=image.resize, image_size=image.image_size)
    return dataclasses.replace(image, resize=shape["resize_mode"], image_size=shape["image_size"])


def pipeline_values(
    *,
    artifacts: Path,
    backbone: str,
    weights: str,
    preset: str,
    resize: str | None,
    image_size: int | None,
    kernel: str,
    C: str | None,
    gamma: str | None,
    scale: str | None,
    unfreeze: str,
    seeds: list[int] | None,
) -> dict[str, str]:
    """What ``cars-tl paths`` prints (and ``make`` reads): the preset's extraction and SVM settings
    (RESIZE, IMAGE_SIZE, SVM_C, SVM_GAMMA, SVM_SCALE; explicit values win) and every name of the
    pipeline (:func:`cars_tl.artifacts.names.pipeline`)."""
    # Every image stage's shape (build-trunk's: the image table alone); the record checks both values.
    shape = image_options("build-trunk", preset, ImageOptions(image_size=image_size, resize=resize))
    svm = resolve(SVM, preset, SVM_HINT, C=C, gamma=gamma, scale=scale)
    values = {
        "RESIZE": shape.resize,
        "IMAGE_SIZE": "" if shape.image_size is None else str(shape.image_size),
        "SVM_C": str(svm["C"]),
        "SVM_GAMMA": svm["gamma"],
        "SVM_SCALE": svm["scale"],
    }
    values.update(
        names.pipeline(
            artifacts=artifacts,
            backbone=backbone,
            weights=weights,
            preset=preset,
            resize=shape.resize,
            image_size=shape.image_size,
            kernel=kernel,
            unfreeze=unfreeze,
            seeds=seeds,
        )
    )
    return values
