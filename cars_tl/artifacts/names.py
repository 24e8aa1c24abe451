"""Every default file and run name, one function each: the stages' own defaults (used without
``--out``) and the pipeline's layout (the names ``make`` passes with ``--out``, printed by
``cars-tl paths``). A name is spelled here and nowhere else: the Makefile reads them from
``cars-tl paths``.

Standard library (and the project's error type) only: ``cars-tl paths`` (and so every ``make``) reads these without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from cars_tl.core.errors import CarsTLError
from cars_tl.core.options import legacy_spec, side


def weights_tag(weights: str) -> str:
    """A short name for weights in default file names: ``imagenet``, ``random``, or ``file-<stem>``."""
    return f"file-{Path(weights).stem}" if "/" in weights or "\\" in weights or Path(weights).exists() else weights


def backbone_tag(backbone: str) -> str:
    """A backbone in a file name: ``timm/efficientnet_lite0`` -> ``timm-efficientnet_lite0``."""
    return backbone.replace("/", "-")


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


# --------------------------------------------------------------------------- the stages' defaults


def features_folder(artifacts: Path) -> Path:
    """Where feature caches go: ``<artifacts>/features``."""
    return Path(artifacts) / "features"


def trunks_folder(artifacts: Path) -> Path:
    """Where trunk caches go: ``<artifacts>/trunks``."""
    return Path(artifacts) / "trunks"


def features_path(
    artifacts: Path,
    backbone: str,
    weights: str,
    crop: str,
    transform: dict,
    margin: float,
    precision: str,
    tag: str = "",
) -> Path:
    """extract-features: ``features/<backbone>-<weights>-<crop>-[<resize mode>]<size>px[-<tag>]-<precision>-<digest>.h5``.
    Every option that changes the arrays is in the name (the digest covers the whole transform spec,
    feature views and stages included, and the margin), so extracting with other options never
    overwrites a cache that runs point to. ``tag``: a readable name for the spec's feature options
    (e.g. ``flip-blocks.6+final``)."""
    legacy = legacy_spec(transform)  # names stay those earlier versions gave
    digest = _digest({"transform": legacy, "crop": crop, "margin": float(margin), "precision": precision})
    crop_part = crop if crop == "full" else f"box{float(margin):g}"
    mode = transform.get("mode", "crop")
    size = f"{side(transform)}px" if mode == "crop" else f"{mode}{side(transform)}px"
    name = f"{backbone_tag(backbone)}-{weights_tag(weights)}-{crop_part}-{size}{'-' + tag if tag else ''}-{precision}-{digest}"
    return features_folder(artifacts) / f"{name}.h5"


def _legacy_key(transform_key: str) -> str:
    """A trunk identity's transform key as versions before ``side`` wrote it (names stay theirs)."""
    return json.dumps(legacy_spec(json.loads(transform_key)), sort_keys=True)


def trunk_path(artifacts: Path, backbone: str, weights: str, identity: dict) -> Path:
    """build-trunk (and finetune --trunk-cache auto):
    ``trunks/<backbone>-<weights>-<cut>-<precision>-<storage>-<digest>.h5``; the digest covers the
    whole ``identity`` (weights digest, transform, crop, margin, dataset: see
    :data:`cars_tl.artifacts.trunks.IDENTITY_KEYS`), so other inputs never overwrite a cache that a
    run points to."""
    name = (
        f"{backbone_tag(backbone)}-{weights_tag(weights)}-{identity['cut']}-{identity['precision']}-"
        f"{identity['storage']}-{_digest(dict(identity, transform=_legacy_key(identity['transform'])))}"
    )
    return trunks_folder(artifacts) / f"{name}.h5"


def head_run_name(backbone: str, weights: str, preset: str) -> str:
    """train-head's run folder: ``head-<backbone>-<weights>-<preset>``."""
    return f"head-{backbone_tag(backbone)}-{weights_tag(weights)}-{preset}"


def svm_run_name(backbone: str, weights: str, kernel: str) -> str:
    """fit-svm's run folder: ``svm-<backbone>-<weights>-<kernel>`` (kernel may be ``all``)."""
    return f"svm-{backbone_tag(backbone)}-{weights_tag(weights)}-{kernel}"


def knn_run_name(backbone: str, weights: str) -> str:
    """knn's run folder: ``knn-<backbone>-<weights>``."""
    return f"knn-{backbone_tag(backbone)}-{weights_tag(weights)}"


def finetune_run_name(backbone: str, weights: str, unfreeze: str, preset: str) -> str:
    """finetune's run folder: ``finetune-<backbone>-<weights>-<unfrozen modules joined by +>-<preset>``."""
    return f"finetune-{backbone_tag(backbone)}-{weights_tag(str(weights))}-{unfreeze.replace(',', '+')}-{preset}"


def runs_folder(artifacts: Path) -> Path:
    """Where every stage puts its run folder by default: ``<artifacts>/runs``."""
    return Path(artifacts) / "runs"


def sparsity_folder(artifacts: Path) -> Path:
    """sparsity's output folder: ``<artifacts>/sparsity``."""
    return Path(artifacts) / "sparsity"


def report_folder(artifacts: Path) -> Path:
    """report's output folder: ``<artifacts>/report``."""
    return Path(artifacts) / "report"


# sparsity takes its folder (not the artifacts root) as its option: this is its default.
DEFAULT_SPARSITY_FOLDER = sparsity_folder(Path("artifacts"))


# --------------------------------------------------------------------------- the pipeline's layout (make)

# What a value that becomes a pipeline name may hold besides letters and digits. make reads the
# names `cars-tl paths` prints as variables, uses them as targets and hands them to bash unquoted:
# anything else is make or shell syntax there (`$(shell ...)` would run even under make -n).
NAME_PUNCTUATION = "._-+,/@"
_SYNTAX = {
    "$": "starts a make and shell expansion",
    "#": "starts a make comment",
    "\n": "ends a make line",
    "\r": "ends a make line",
    " ": "splits make and shell words",
    "\t": "splits make and shell words",
    "'": "ends a shell quote",
    '"': "ends a shell quote",
    "`": "runs a shell command",
}
# The make variable behind each option `make` passes to `cars-tl paths`.
MAKE_VARIABLES = {
    "--artifacts": "ARTIFACTS",
    "--backbone": "BACKBONE",
    "--weights": "WEIGHTS",
    "--preset": "PRESET",
    "--resize": "RESIZE",
    "--kernel": "SVM_KERNEL",
    "--C": "SVM_C",
    "--gamma": "SVM_GAMMA",
    "--scale": "SVM_SCALE",
    "--unfreeze": "UNFREEZE_D",
}


def check_pipeline_value(option: str, value: str) -> str:
    """``value`` if make can carry it as a name (see :data:`NAME_PUNCTUATION`); else a
    :class:`CarsTLError` naming the option, its make variable, the value and the first character
    that make or the shell would read as syntax."""
    bad = next((c for c in value if not (c.isalnum() or c in NAME_PUNCTUATION)), None)
    if bad is None:
        return value
    variable = MAKE_VARIABLES.get(option)
    where = f"{option} (make: {variable})" if variable else option
    fixed = "_".join(filter(None, re.split(rf"[^\w{re.escape(NAME_PUNCTUATION)}]+", value))) or "name"
    example = f"{option} {fixed}" + (f" (make: {variable}={fixed})" if variable else "")
    raise CarsTLError(
        f"{where} {value!r} holds {bad!r}, which {_SYNTAX.get(bad, 'is make or shell syntax')} where make uses "
        f"the value; a pipeline name holds letters, digits and {' '.join(NAME_PUNCTUATION)} only",
        f"choose a value without it, e.g. {example}",
    )


def pipeline_tag(backbone: str, weights: str, preset: str, resize: str = "crop", image_size: int | None = None) -> str:
    """The pipeline's name for its inputs: ``<backbone>-<weights' file stem>[-<resize>][-<size>][-tuned]``
    (crop and the study preset are left out)."""
    tag = f"{backbone_tag(backbone)}-{Path(weights).stem}"
    tag += f"-{resize}" if resize != "crop" else ""
    tag += f"-{image_size}" if image_size else ""
    return tag + ("-tuned" if preset == "tuned" else "")


def seed_suffix(seed: int | None) -> str:
    """``-s<seed>`` for runs made once per seed (several seeds), else nothing."""
    return "" if seed is None else f"-s{seed}"


def pipeline_head_run(preset: str, seed: int | None = None) -> str:
    """Model B: ``B-head-<preset>[-s<seed>]``."""
    return f"B-head-{preset}{seed_suffix(seed)}"


def pipeline_init_head_run(preset: str, seed: int | None = None) -> str:
    """The head D starts from: B's, except under ``tuned``, where B reads flip-averaged two-stage rows
    that a fine-tuned model's head (it reads the final pooled output alone) cannot start from:
    ``B-head-final-tuned[-s<seed>]``, trained on the final rows."""
    return pipeline_head_run(preset, seed) if preset != "tuned" else f"B-head-final-{preset}{seed_suffix(seed)}"


def pipeline_scratch_run(preset: str, seed: int | None = None) -> str:
    """Model A: ``A-scratch-<preset>[-s<seed>]``."""
    return f"A-scratch-{preset}{seed_suffix(seed)}"


def pipeline_partial_run(unfreeze: str, preset: str, seed: int | None = None) -> str:
    """Model D: ``D-<unfrozen modules>-<preset>[-s<seed>]``."""
    return f"D-{unfreeze}-{preset}{seed_suffix(seed)}"


def pipeline_svm_run(kernel: str, preset: str) -> str:
    """Model C: ``C-svm-<kernel>[-tuned]``, or ``C-svm-all-kernels[-tuned]`` for every kernel."""
    return f"C-svm-{'all-kernels' if kernel == 'all' else kernel}{'-tuned' if preset == 'tuned' else ''}"


def pipeline_knn_run() -> str:
    """The kNN run: ``kNN``."""
    return "kNN"


def pipeline(
    *,
    artifacts: Path,
    backbone: str,
    weights: str,
    preset: str,
    resize: str,
    image_size: int | None,
    kernel: str,
    unfreeze: str,
    seeds: list[int] | None = None,
) -> dict[str, str]:
    """Every name of the pipeline, for ``cars-tl paths``: ``{KEY: value}``. Files: FEATURES,
    INIT_FEATURES (the cache D's starting head reads), TRUNK, PREDICT, SPARSITY, REPORT. Run folders:
    ``HEAD_RUN_<seed>``, ``INIT_HEAD_RUN_<seed>``, ``SCRATCH_RUN_<seed>``, ``PARTIAL_RUN_<seed>`` (one per
    seed; with several seeds the names gain ``-s<seed>``), SVM_RUN, SVM_ALL_RUN, KNN_RUN."""
    seeds = list(seeds or [0])
    several = len(seeds) > 1
    artifacts = Path(artifacts)
    runs = runs_folder(artifacts)
    tag = pipeline_tag(backbone, weights, preset, resize, image_size)
    values = {
        "FEATURES_TAG": tag,
        "FEATURES": str(features_folder(artifacts) / f"{tag}.h5"),
        "INIT_FEATURES": str(features_folder(artifacts) / (f"{tag}-final.h5" if preset == "tuned" else f"{tag}.h5")),
        "TRUNK": str(trunks_folder(artifacts) / f"{tag}-{unfreeze}.h5"),
    }
    for seed in seeds:
        suffix = seed if several else None
        values[f"HEAD_RUN_{seed}"] = str(runs / pipeline_head_run(preset, suffix))
        values[f"INIT_HEAD_RUN_{seed}"] = str(runs / pipeline_init_head_run(preset, suffix))
        values[f"SCRATCH_RUN_{seed}"] = str(runs / pipeline_scratch_run(preset, suffix))
        values[f"PARTIAL_RUN_{seed}"] = str(runs / pipeline_partial_run(unfreeze, preset, suffix))
    values.update(
        SVM_RUN=str(runs / pipeline_svm_run(kernel, preset)),
        SVM_ALL_RUN=str(runs / pipeline_svm_run("all", preset)),
        KNN_RUN=str(runs / pipeline_knn_run()),
        PREDICT=str(artifacts / "predict" / "predictions.json"),
        SPARSITY=str(sparsity_folder(artifacts) / "sparsity.json"),
        REPORT=str(report_folder(artifacts) / "report.html"),
    )
    return values
