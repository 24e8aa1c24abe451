"""Rebuild any run for inference: a finetune run, a train-head run or a fit-svm run.

Head and SVM runs have no network of their own: their backbone is rebuilt from what the run
recorded about its feature cache (backbone, weights, preprocessing) and checked against the
recorded weights digest, so predictions see exactly the features the model was trained on.

Every run is rebuilt with the preprocessing it recorded -- the transform spec (resize mode, size,
interpolation, mean/std), the crop (``full`` or ``box``) and margin -- and its precision:

* a ``--crop box`` run needs each image's box. Images from the manifest have it
  (:meth:`LoadedRun.tensor` with ``box``); an image file given on the command line has none, so a
  box run refuses it unless the caller says the image already *is* the box crop (``boxed``:
  predict's ``--boxed``), cut with the run's recorded margin.
* ``bf16`` runs are evaluated under CPU bf16 autocast, as extracted; ``fp16`` exists only on CUDA:
  on the CPU such a run is evaluated in fp32 (more precise, not bit-equal) and says so
  (``precision_used``).

Rows and scores are computed by the code that made the run's own: images are normalized as the
evaluation loaders normalize their batches (``eval_transform(spec, output="batch")``); a head or
SVM run's rows come from extraction's own body and embedding (:func:`feature_views.prepare_body`:
BatchNorm folded, channels_last; :func:`feature_views.embed`), so on the CPU they equal a CPU-made
cache's rows bit for bit in fp32 and bf16; a finetune run's model is laid out channels_last, as
finetune trains and scores it, and scores whole (its head too) under the run's autocast.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch

from cars_tl.artifacts import features, kinds, runs
from cars_tl.core import runtime
from cars_tl.core.atomic import file_sha256
from cars_tl.core.errors import CarsTLError, parse_json
from cars_tl.data import loaders, transforms
from cars_tl.data.images import crop_box
from cars_tl.models import backbones, feature_views
from cars_tl.models.svm.model import load_model as load_svm
from cars_tl.models.svm.model import recorded_settings as recorded_svm_settings


@dataclasses.dataclass
class LoadedRun:
    run_dir: Path
    name: str
    kind: str
    class_names: list[str]
    body: torch.nn.Module  # image batch -> pooled features
    transform: Callable
    score: Callable[[torch.Tensor], torch.Tensor]  # features -> (n, classes) scores
    score_kind: str  # "probability" (softmax) or "decision score" (SVM)
    spec: dict  # the recorded transform spec
    crop: str = "full"  # "full" | "box", as recorded
    margin: float = 0.0
    precision: str = "fp32"  # as recorded
    precision_used: str = "fp32"  # what the CPU runs it in (fp16 exists only on CUDA)
    forward: Callable[[torch.Tensor], torch.Tensor] | None = (
        None  # finetune runs: image batch -> scores, as its evaluation ran
    )
    # image batch -> feature rows as recorded (views, stages); None: extraction's body, prepared on first use
    feature_body: torch.nn.Module | None = None
    # The logits ``score`` and ``forward`` softmax (head, finetune; None for an SVM): what calibrate divides by T.
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None  # features -> logits
    forward_logits: Callable[[torch.Tensor], torch.Tensor] | None = None  # finetune: image batch -> logits

    def tensor(self, image, box: tuple[int, int, int, int] | None = None, boxed: bool = False) -> torch.Tensor:
        """``image`` (PIL, the full picture) preprocessed as the run was trained: its box cut with
        the recorded margin first for a box run (``boxed``: the image already is that cut)."""
        if self.crop == "box" and not boxed:
            if box is None:
                raise CarsTLError(
                    f"run {self.run_dir} was trained on box crops (--crop box, margin {self.margin}) and this image has no box",
                    "predict: crop the image to the car's box (widened by the margin) and add --boxed; "
                    "sparsity: take images from the manifest, which carry their boxes (--split test)",
                )
            image = crop_box(image, box, self.margin)
        return self.transform(image)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Feature rows in the recorded precision (see the module docstring), as float32: the pooled
        output, or the recorded views and stages (:mod:`cars_tl.models.feature_views`)."""
        if self.feature_body is None:  # folding traces the network: only for runs that embed images
            self.feature_body = feature_views.prepare_body(self.body, "cpu", transforms.side(self.spec), self.spec)
        self.feature_body.eval()
        return feature_views.embed(self.feature_body, batch, "cpu", self.precision_used, self.spec)

    @torch.inference_mode()
    def scores(self, batch: torch.Tensor) -> torch.Tensor:
        """(n, classes) scores of an image batch as the run's own evaluation computed them: a
        finetune run's whole model under its autocast (the head included), else ``score(embed)``."""
        if self.forward is None:
            return self.score(self.embed(batch))
        batch = loaders.batch_to_device(batch, "cpu", self.spec)
        with runtime.autocast("cpu", self.precision_used):
            return self.forward(batch)

    def preprocessing_key(self) -> tuple:
        """Equal keys: the same body and the same tensors and features for the same image."""
        return (id(self.body), transforms.transform_key(self.spec), self.crop, float(self.margin), self.precision_used)


def _backbone_for(metrics: dict, run_dir: Path, cache: dict) -> backbones.Backbone:
    b = metrics["backbone"]
    key = (b["backbone"], b["weights_digest"], str(b["transform"]))
    if key in cache:
        return cache[key]
    bb = backbones.build_backbone(b["backbone"], b["weights"])  # the body does not depend on the image size
    if bb.weights_digest != b["weights_digest"]:
        raise CarsTLError(
            f"run {run_dir}: its backbone weights {b['weights']!r} are not the ones it was trained on "
            f"(digest {bb.weights_digest[:12]} != {b['weights_digest'][:12]})",
            "restore the original weights file, or re-run extract-features and this stage",
        )
    bb.transform = transforms.normalized_spec(b["transform"])  # exactly the recorded preprocessing
    cache[key] = bb
    return bb


def load_run(run_dir: Path, cache: dict | None = None) -> LoadedRun:
    """Load a run of any kind that keeps a model (its registered loader); ``cache`` shares rebuilt backbones between runs."""
    cache = {} if cache is None else cache
    run_dir = Path(run_dir)
    metrics = runs.read_metrics(run_dir)
    kind = kinds.RUN_KINDS[metrics["kind"]]
    if not kind.keeps_model:
        raise CarsTLError(
            f"{run_dir} is a {kind.name} run: it keeps no model to apply to new images (its test predictions are saved in it)",
            f"predict with a {kinds.stages_of(k for k in kinds.RUN_KINDS.values() if k.keeps_model)} run; "
            f"look inside it with: cars-tl inspect {run_dir}",
        )
    model_path = runs.model_file(run_dir)
    b = metrics["backbone"]
    spec = transforms.normalized_spec(b["transform"])
    transforms.eval_resize_crop(spec)  # refuses a spec this version cannot reproduce
    precision = b.get("precision", "fp32")
    recorded = dict(
        spec=spec,
        crop=b.get("crop", "full"),
        margin=float(b.get("margin") or 0.0),
        precision=precision,
        precision_used="fp32" if precision == "fp16" else precision,
    )
    return kind.loader(run_dir, metrics, model_path, recorded, cache)


@kinds.loader("finetune")
def _load_finetune(run_dir: Path, metrics: dict, model_path: Path, recorded: dict, cache: dict) -> LoadedRun:
    b, names, spec = metrics["backbone"], metrics["class_names"], recorded["spec"]
    bb = backbones.build_backbone(b["backbone"], "random")
    model = backbones.classifier_model(bb, len(names))
    state = runs.load_checkpoint(model_path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CarsTLError(
            f"{model_path} does not fit {b['backbone']} with {len(names)} classes: {str(exc)[:200]}"
        ) from None
    model.eval()
    model.to(memory_format=torch.channels_last)  # finetune's layout: contiguous weights score otherwise in bf16
    tta = feature_views.options(spec)["tta"]
    return LoadedRun(
        run_dir,
        metrics["name"],
        "finetune",
        names,
        model.body,
        transforms.eval_transform(spec, output="batch"),
        lambda f: model.head(f).softmax(1),
        kinds.RUN_KINDS["finetune"].score_kind,
        **recorded,
        forward=lambda x: feature_views.view_mean(model, x, tta).float().softmax(1),
        feature_body=feature_views.for_spec(model.body, spec),  # unfolded, as finetune evaluates
        logits=model.head,
        forward_logits=lambda x: feature_views.view_mean(model, x, tta).float(),
    )


@kinds.loader("head")
def _load_head(run_dir: Path, metrics: dict, model_path: Path, recorded: dict, cache: dict) -> LoadedRun:
    names, spec = metrics["class_names"], recorded["spec"]
    bb = _backbone_for(metrics, run_dir, cache)
    width = feature_views.width(spec, bb.num_features)
    head = torch.nn.Linear(width, len(names))
    state = runs.load_checkpoint(model_path)
    shape = tuple(getattr(state.get("weight"), "shape", ())) if isinstance(state, dict) else ()
    if shape != (len(names), width):
        raise CarsTLError(
            f"{model_path} holds a head of shape {shape}, but {bb.name} gives {width} features "
            f"and the run has {len(names)} classes",
            "retrain it: cars-tl train-head --features ...",
        )
    head.load_state_dict(state)
    head.eval()
    return LoadedRun(
        run_dir,
        metrics["name"],
        "head",
        names,
        bb.body,
        transforms.eval_transform(bb.transform, output="batch"),
        lambda f: head(f).softmax(1),
        kinds.RUN_KINDS["head"].score_kind,
        **recorded,
        logits=head,
    )


@kinds.loader("svm")
def _load_svm(run_dir: Path, metrics: dict, model_path: Path, recorded: dict, cache: dict) -> LoadedRun:
    names, spec = metrics["class_names"], recorded["spec"]
    bb = _backbone_for(metrics, run_dir, cache)
    # checked against the cache and against what the run recorded of this model
    settings = recorded_svm_settings(metrics, model_path.name)
    model = load_svm(model_path, feature_views.width(spec, bb.num_features), len(names), settings)
    classes = torch.as_tensor(model.classes)

    def svm_scores(f: torch.Tensor) -> torch.Tensor:
        # SVC scores only the classes it saw; place them at their label positions. Rank 1 is SVC.predict.
        raw = torch.as_tensor(model.ranking_scores(f.double().numpy()))
        out = torch.full((len(f), len(names)), float("-inf"), dtype=torch.float64)
        out[:, classes] = raw
        return out

    return LoadedRun(
        run_dir,
        metrics["name"],
        "svm",
        names,
        bb.body,
        transforms.eval_transform(bb.transform, output="batch"),
        svm_scores,
        kinds.RUN_KINDS["svm"].score_kind,
        **recorded,
    )


TEMPERATURE_FILE = "temperature.json"  # a calibrated run's model file: {"temperature", "base_run", "base_model_sha256"}


def read_temperature(run_dir: Path) -> dict:
    """A calibrated run's temperature file, checked: a finite T > 0 and the base run it scales."""
    path = Path(run_dir) / TEMPERATURE_FILE
    hint = f"calibrate the base run again: cars-tl calibrate --run BASE_RUN --out {run_dir} --force"
    try:
        text = path.read_text()
    except (OSError, ValueError) as exc:
        raise CarsTLError(f"{path} cannot be read: {exc}", hint) from None
    record = parse_json(text, str(path), hint)
    t = record.get("temperature") if isinstance(record, dict) else None
    if (
        not isinstance(t, (int, float))
        or isinstance(t, bool)
        or not math.isfinite(t)
        or t <= 0
        or not isinstance(record.get("base_run"), str)
    ):
        raise CarsTLError(f"{path} holds no positive finite temperature and base run path: {text[:200]!r}", hint)
    return record


@kinds.loader("calibrated")
def _load_calibrated(run_dir: Path, metrics: dict, model_path: Path, recorded: dict, cache: dict) -> LoadedRun:
    record = read_temperature(run_dir)
    base_dir = Path(record["base_run"])
    base = load_run(base_dir, cache)
    if base.logits is None or base.kind == "calibrated":
        raise CarsTLError(f"{run_dir} scales {base_dir}, a {base.kind} run: only head and finetune runs have logits")
    if file_sha256(runs.model_file(base_dir)) != record.get("base_model_sha256"):
        raise CarsTLError(
            f"{run_dir} was calibrated on another model than the one now in {base_dir} (its model file changed)",
            f"calibrate it again: cars-tl calibrate --run {base_dir} --out {run_dir} --force",
        )
    t, logits, forward_logits = float(record["temperature"]), base.logits, base.forward_logits
    return dataclasses.replace(
        base,
        run_dir=run_dir,
        name=metrics["name"],
        kind="calibrated",
        score=lambda f: (logits(f) / t).softmax(1),
        logits=lambda f: logits(f) / t,
        forward=None if forward_logits is None else lambda x: (forward_logits(x) / t).softmax(1),
        forward_logits=None if forward_logits is None else lambda x: forward_logits(x) / t,
    )


# The loaders by kind, as registered above (the old table's name; the kind records hold them).
LOADERS = {k.name: k.loader for k in kinds.RUN_KINDS.values() if k.loader is not None}


def cached_split(run_dir: Path, metrics: dict, split: str, data_dir: Path = Path("data")):
    """The ``split`` arrays of the feature cache a head or SVM run was trained on, checked against
    what the run recorded: its per-split checksums, or the file's SHA-256 for runs that predate them."""

    recorded = (metrics.get("inputs") or {}).get("features") or {}
    path = Path(recorded.get("path") or "?")
    b = metrics["backbone"]
    extract = (
        f"cars-tl extract-features --data-dir {data_dir} --backbone {b['backbone']} --weights {b['weights']} "
        f"--crop {b.get('crop', 'full')} --margin {b.get('margin') or 0} --resize {transforms.resize_mode(b['transform'])} "
        f"--image-size {transforms.side(b['transform'])} --precision {b.get('precision', 'fp32')} --out {path}"
    )
    if not path.is_file():
        raise CarsTLError(
            f"{run_dir} is scored from the feature cache it was trained on, {path}, and that file is gone",
            f"put the cache back at {path}, or re-extract it (the same features on the same hardware): {extract}",
        )
    arrays = features.load(path, (split,)).split(split)
    digests = (recorded.get("splits") or {}).get(split)
    if digests:
        same = digests.get("features_sha256") == features.content_digest(arrays.features) and digests.get(
            "ids_sha256"
        ) == features.content_digest(arrays.ids)
        what = f"its {split} features differ from the ones the run recorded (SHA-256)"
    else:
        same = file_sha256(path) == recorded.get("sha256")
        what = "the file's SHA-256 differs from the one the run recorded"
    if not same:
        stage = runs.RUN_KINDS[metrics["kind"]].stage
        raise CarsTLError(
            f"{path} is not the feature cache {run_dir} was trained on: {what}",
            f"put the original cache back at {path} (or re-extract it: {extract}), "
            f"or retrain the run on this one: cars-tl {stage} --features {path} --out {run_dir} --force (with the run's options)",
        )
    return arrays
