"""Run kinds: what a run of each kind is, as one record per kind (``metrics.json`` ``"kind"``).

A record holds the facts every module that acts on runs reads (the command that makes it, what its
saved scores are, whether it reads a feature cache, keeps a model, resumes) and the hints users see
about it. Parts that live in higher layers are attached to the same record by the module that
defines them, when that module is imported: the inference loader (:mod:`cars_tl.models.inference`,
``@kinds.loader(NAME)``) and the report's view (:mod:`cars_tl.report.catalog`,
``kinds.register(NAME, view=...)``); this module imports neither (artifacts sit below both).

A new run kind is: one :func:`define` line below, its loader (if it keeps a model), its view. Stdlib
only, so the CLI can read the hints without numpy or torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

# The rerun hint of an incomplete run (:func:`rerun_hint`), by how the kind is made again; filled
# from ``stage``, ``run_dir`` and the run's recorded config (``features``: F.h5 when unrecorded).
CONTINUE = "continue it: rerun the cars-tl {stage} command that made it, with --resume (--out {run_dir})"
FIT_AGAIN = "fit it again: cars-tl {stage} --features {features} --out {run_dir} --force"
# What to do after a run of the kind was interrupted (Ctrl-C, a lost torchrun peer): the CLI's "next:".
RESUME = "rerun the same cars-tl {stage} command with --resume to continue from the last complete epoch"
REPLACE = "rerun the same cars-tl {stage} command with --force: the interrupted run is replaced"


@dataclasses.dataclass(eq=False)
class RunKind:
    """One run kind. ``loader`` and ``view`` are registered by the modules that define them."""

    name: str  # metrics.json "kind"
    stage: str  # the command that makes it
    score_kind: str  # what its saved prediction scores are (predictions-<split>.npz)
    on_features: bool  # trained on a feature cache (--features), not on images
    keeps_model: bool  # has a model file to apply to new images
    resumes: bool  # an incomplete run continues with --resume (the others are fitted again)
    rerun: str = ""  # rerun hint template; "" = CONTINUE if it resumes, else FIT_AGAIN
    on_interrupt: str = ""  # interrupted-run hint template; "" = RESUME if it resumes, else REPLACE
    # models.inference: (run_dir, metrics, model_path, recorded, cache) -> LoadedRun, for kinds that keep a model
    loader: Callable | None = None
    view: object | None = None  # report.catalog.KindView: its model group, setting and label

    def rerun_hint(self, run_dir: Path, config: dict | None = None) -> str:
        template = self.rerun or (CONTINUE if self.resumes else FIT_AGAIN)
        config = config if isinstance(config, dict) else {}
        fields = {"features": "F.h5", **{k: v for k, v in config.items() if v not in (None, "")}}
        return template.format_map({**fields, "stage": self.stage, "run_dir": run_dir})

    @property
    def interrupted_hint(self) -> str:
        return (self.on_interrupt or (RESUME if self.resumes else REPLACE)).format(stage=self.stage)


RUN_KINDS: dict[str, RunKind] = {}


def define(kind: RunKind) -> RunKind:
    """Add a run kind (refused if its name or its command is taken)."""
    clash = next((k for k in RUN_KINDS.values() if kind.name == k.name or kind.stage == k.stage), None)
    if clash is not None:
        raise ValueError(f"run kind {kind.name!r} ({kind.stage}) clashes with the defined kind {clash.name!r}")
    RUN_KINDS[kind.name] = kind
    return kind


define(RunKind("head", "train-head", "probability", on_features=True, keeps_model=True, resumes=False))
define(RunKind("svm", "fit-svm", "decision score", on_features=True, keeps_model=True, resumes=False))
define(RunKind("finetune", "finetune", "probability", on_features=False, keeps_model=True, resumes=True))
define(RunKind("knn", "knn", "vote share", on_features=True, keeps_model=False, resumes=False))
define(
    RunKind(
        "calibrated",
        "calibrate",
        "probability",
        on_features=False,
        keeps_model=True,
        resumes=False,
        rerun="calibrate it again: cars-tl calibrate --run {run} --out {run_dir} --force",
    )
)

# The kinds built in (a snapshot: checks read RUN_KINDS, which a later define() extends).
KINDS = tuple(RUN_KINDS)
SCORE_KINDS = tuple(dict.fromkeys(k.score_kind for k in RUN_KINDS.values()))


def register(name: str, **parts) -> None:
    """Attach parts defined in a higher layer (``loader=``, ``view=``) to kind ``name``, once each."""
    kind = RUN_KINDS.get(name)
    if kind is None:
        raise ValueError(f"no run kind {name!r} to register {', '.join(parts)} for; defined: {', '.join(RUN_KINDS)}")
    for part, value in parts.items():
        if part not in ("loader", "view"):
            raise ValueError(f"unknown part {part!r} of a run kind; registrable: loader, view")
        if getattr(kind, part) is not None:
            raise ValueError(f"run kind {name!r} already has a {part}")
        setattr(kind, part, value)


def loader(name: str):
    """Decorator: register the function as kind ``name``'s inference loader."""

    def decorate(fn):
        register(name, loader=fn)
        return fn

    return decorate


def score_kinds() -> tuple[str, ...]:
    return tuple(dict.fromkeys(k.score_kind for k in RUN_KINDS.values()))


def stages_of(kinds: Iterable[RunKind] | None = None) -> str:
    """``train-head, fit-svm, finetune or knn``: the commands that make ``kinds`` (default: every kind)."""
    stages = [k.stage for k in (RUN_KINDS.values() if kinds is None else kinds)]
    return ", ".join(stages[:-1]) + " or " + stages[-1] if len(stages) > 1 else "".join(stages)


def of_stage(stage: str) -> RunKind | None:
    """The kind the command ``stage`` makes (None: the command makes no run)."""
    return next((k for k in RUN_KINDS.values() if k.stage == stage), None)


def rerun_hint(run_dir: Path, metrics: dict) -> str:
    """How to finish or redo an incomplete run, by its kind (a fine-tune resumes; the others are fitted again)."""
    unknown = RunKind("unknown", "STAGE", "", on_features=True, keeps_model=False, resumes=False)
    return RUN_KINDS.get(metrics.get("kind"), unknown).rerun_hint(run_dir, metrics.get("config"))
