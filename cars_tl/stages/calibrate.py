"""``calibrate``: temperature scaling of a train-head or finetune run (:mod:`cars_tl.models.calibration`).

The base run's model scores its own validation split -- the rows it held out of train (finetune, and a
tuned head's weight-decay search: ``stratified_split`` of train with the run's ``val_fraction`` and seed)
-- and one temperature T is fitted there by minimising the negative log-likelihood. A run without a
validation split is refused: fitting T on test would make the test numbers optimistic.

The new run (kind ``calibrated``) holds ``metrics.json`` (``calibration``: T, and NLL and ECE before and
after on validation and test), ``temperature.json`` (its model file: T, the base run and its model's
SHA-256), ``predictions-test.npz`` (softmax(logits / T) of every test image, the base run's own test
rows) and ``reliability.png``. ``predict --model CALIBRATED_RUN`` loads the base run's model and
divides its logits by T. Rows come as the base run's: a head's from its feature cache (checked
against its checksums), a finetune's from the images, with its model, precision and evaluation batch.

A tuned head refitted on all of train once its weight decay was chosen (train-head's default) is
refused: its validation rows were training rows of the final head, and T fitted on rows the model has
seen sharpens instead of softening (measured on the real subset, Lite0: test ECE 4.0% -> 30.2%). A head
made with ``train-head --preset tuned --no-refit`` keeps them held out. A finetune's validation images
are never trained on; one that started from an ``--init-head`` run (which saw all of train) is
calibrated with a note: only its starting point saw them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from cars_tl.artifacts import run_config, runs
from cars_tl.core import locks, runtime
from cars_tl.core.atomic import atomic_path, atomic_write_text, file_sha256
from cars_tl.core.errors import CarsTLError
from cars_tl.core.options import check_workers
from cars_tl.core.progress import NULL, Progress
from cars_tl.data import loaders
from cars_tl.data import manifest as manifests
from cars_tl.models import calibration
from cars_tl.models.inference import TEMPERATURE_FILE, cached_split, load_run
from cars_tl.models.scoring import evaluate_logits
from cars_tl.models.training import score_batches, stratified_split

DIAGRAM_FILE = "reliability.png"
BASE_KINDS = ("head", "finetune")
INIT_HEAD_NOTE = "the --init-head run was trained on all of train, validation images included"


def _validation(base_dir: Path, metrics: dict) -> float:
    """The base run's validation fraction of train; a run that held nothing out is refused."""
    kind, config = metrics.get("kind"), metrics.get("config") or {}
    if kind not in BASE_KINDS:
        what = "it is already calibrated" if kind == "calibrated" else "it has no logits to scale"
        raise CarsTLError(
            f"{base_dir} is a {kind} run: calibrate scales the logits of a train-head or finetune run ({what})",
            "pass --run with a train-head or finetune run made with --preset tuned (they hold out a validation split)",
        )
    if kind == "head":
        selection = metrics.get("selection") or {}
        fraction = selection.get("val_fraction") if selection.get("selected_on") == "validation" else None
        why = (
            f"preset {config.get('preset')!r}"
            + (", --weight-decay given" if config.get("preset") == "tuned" else "")
            + ": it trained on all of train and held out no validation split"
        )
        hint = (
            f"train a head that holds one out (10% of train, to choose its weight decay): cars-tl train-head "
            f"--features {config.get('features') or 'F.h5'} --preset tuned (without --weight-decay), then cars-tl calibrate --run THAT_RUN"
        )
    else:
        fraction = config.get("val_fraction")
        why = f"preset {config.get('preset')!r}: it trained on all of train and held out no validation split"
        hint = "fine-tune with --preset tuned (it holds out 10% of train), then cars-tl calibrate --run THAT_RUN"
    if not fraction:
        raise CarsTLError(
            f"{base_dir} has no validation split to fit a temperature on ({why}); fitting it on test would "
            "make the test numbers optimistic",
            hint,
        )
    if kind == "head" and config.get("refit", True) is not False:  # absent: refitted (runs before --no-refit)
        features = ((metrics.get("inputs") or {}).get("features") or {}).get("path") or config.get("features")
        raise CarsTLError(
            f"{base_dir}'s final head was refitted on all of train after its weight-decay search, so its "
            "validation rows were training rows: a temperature fitted on them sharpens the head instead of "
            "calibrating it",
            f"train a head that keeps them held out: cars-tl train-head --features {features} --preset tuned "
            "--no-refit, then cars-tl calibrate --run THAT_RUN",
        )
    return float(fraction)


def _head_logits(m, base_dir: Path, metrics: dict, fraction: float, data_dir: Path):
    """(validation, test) as (ids, labels, logits): rows of the feature cache the head was trained on."""
    train = cached_split(base_dir, metrics, "train", data_dir)
    test = cached_split(base_dir, metrics, "test", data_dir)
    _, val_idx = stratified_split(train.labels, fraction, int(metrics["config"]["seed"]))
    with torch.inference_mode():
        return tuple(
            (ids, labels, m.logits(torch.from_numpy(x)).double().numpy())
            for ids, labels, x in (
                (train.ids[val_idx], train.labels[val_idx], train.features[val_idx]),
                (test.ids, test.labels, test.features),
            )
        )


def _finetune_logits(m, metrics: dict, fraction: float, data_dir: Path, batch: int, workers: int, progress):
    """(validation, test) as (ids, labels, logits): images scored by the whole model as finetune did."""
    manifest = manifests.load_manifest(data_dir)
    recorded = (metrics.get("inputs") or {}).get("dataset_fingerprint")
    if recorded != manifest.fingerprint:
        raise CarsTLError(
            f"{m.run_dir} was trained on another dataset than {manifest.root} (fingerprint {str(recorded)[:12]} != {manifest.fingerprint[:12]})",
            "pass the --data-dir the run was made from",
        )
    labels = np.array([r.label for r in manifest.split("train")])
    _, val_idx = stratified_split(labels, fraction, int(metrics["config"]["seed"]))
    out = []
    for split, positions in (("train", val_idx.tolist()), ("test", None)):
        dataset = loaders.eval_dataset(manifest, split, m.spec, "cpu", m.crop, m.margin)
        positions = range(len(dataset)) if positions is None else positions
        loader = loaders.eval_loader(dataset, positions, batch, workers, "cpu", m.spec)
        name = "validation" if split == "train" else split
        with progress.task(f"score {name}", total=len(positions), unit="img") as task:
            out.append(score_batches(m.forward_logits, loader, dataset.records, "cpu", m.precision_used, m.spec, task))
    return tuple(out)


def _numbers(logits, labels, temperature: float) -> dict:
    before, after = calibration.probabilities(logits), calibration.probabilities(logits, temperature)
    return {
        "images": len(labels),
        "nll_before": round(calibration.nll(logits, labels), 6),
        "nll_after": round(calibration.nll(logits, labels, temperature), 6),
        "ece_before": round(calibration.ece(before, labels), 6),
        "ece_after": round(calibration.ece(after, labels), 6),
    }


def _diagram(path: Path, logits, labels, temperature: float, title: str) -> None:
    """Accuracy against top-1 confidence per bin, before and after, the diagonal for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=100, sharey=True)
    for ax, t, label in ((axes[0], 1.0, "before"), (axes[1], temperature, f"after (T = {temperature:.3f})")):
        r = calibration.reliability(calibration.probabilities(logits, t), labels)
        width = 1.0 / len(r.counts)
        ax.bar(r.edges[:-1], np.nan_to_num(r.accuracy), width=width, align="edge", edgecolor="black", label="accuracy")
        ax.bar(
            r.edges[:-1],
            np.nan_to_num(r.confidence - r.accuracy),
            bottom=np.nan_to_num(r.accuracy),
            width=width,
            align="edge",
            color="#C44E52",
            alpha=0.35,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_title(f"{label}: ECE {100 * r.ece:.2f}%", fontsize=10)
        ax.set_xlabel("top-1 confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


@run_config.recorded("calibrate")
def calibrate(
    run: Path,
    *,
    data_dir: Path = Path("data"),
    out: Path | None = None,
    artifacts: Path = Path("artifacts"),
    workers: int | None = None,
    force: bool = False,
    progress: Progress = NULL,
) -> tuple[Path, dict]:
    """Fit a temperature for the train-head or finetune run ``run`` on its validation split and write the
    calibrated run; returns its directory and metrics."""
    started = time.perf_counter()
    base_dir = Path(run)
    base = runs.read_metrics(base_dir)
    fraction = _validation(base_dir, base)
    model_path = runs.model_file(base_dir)  # refuses an incomplete run
    run_dir = runs.resolve_run_dir(out, f"{base_dir.name}-calibrated", artifacts)
    if run_dir.resolve() == base_dir.resolve():
        raise CarsTLError(
            f"--out {out} is the base run itself", f"pick another folder, e.g. --out {run_dir}-calibrated"
        )
    workers = loaders.default_workers() if workers is None else check_workers(workers)  # no DeviceOptions: no device
    m = load_run(base_dir)
    per_rank = (base.get("distributed") or {}).get("per_rank_batch") or (base["config"].get("batch_size") or 32)
    config = {"run": str(base_dir), "bins": calibration.ECE_BINS}
    with locks.writer_lock(base_dir, "calibrate"):  # no retrain of the base run while it is scored
        if base["kind"] == "head":
            val, test = _head_logits(m, base_dir, base, fraction, data_dir)
        else:
            config["batch_size"] = per_rank  # scored at finetune's evaluation batch (per_rank * 2), as predict does
            val, test = _finetune_logits(m, base, fraction, data_dir, per_rank * 2, workers, progress)
        base_sha = file_sha256(model_path)
    for name, (_, _, logits) in (("validation", val), ("test", test)):
        if not np.isfinite(logits).all():
            raise CarsTLError(
                f"{base_dir}'s {name} logits hold NaN or Inf", f"check the run: cars-tl inspect {base_dir}"
            )
    if not len(val[1]):
        raise CarsTLError(f"{base_dir}'s validation split is empty", "calibrate a run trained on more images")
    temperature = calibration.fit_temperature(val[2], val[1])
    note = INIT_HEAD_NOTE if base["kind"] == "finetune" and base["config"].get("init_head") else None
    numbers = {
        "temperature": round(temperature, 6),
        "bins": calibration.ECE_BINS,
        "fitted_on": "validation",
        "validation": _numbers(val[2], val[1], temperature),
        "test": _numbers(test[2], test[1], temperature) if len(test[1]) else None,
        **({"note": note} if note else {}),
    }
    with runs.writing_run(run_dir, "calibrate", force=force) as target:
        metrics = runs.new_metrics(
            "calibrated",
            run_dir.name,
            config,
            backbone=base["backbone"],
            inputs={
                **(base.get("inputs") or {}),
                "base_run": {"path": str(base_dir), "kind": base["kind"], "model_sha256": base_sha},
            },
            class_names=base["class_names"],
            params={"total": (base.get("params") or {}).get("total"), "trainable": 1},
            device="cpu",
            device_name=runtime.device_name("cpu"),
            model_file=TEMPERATURE_FILE,
            calibration=numbers,
            selection={
                "selected_on": "validation",
                "by": "NLL on the base run's validation split",
                "chosen": {"temperature": numbers["temperature"]},
            },
        )
        runs.write_metrics(target, metrics)
        with runs.recording(target, metrics):
            record = {"temperature": temperature, "base_run": str(base_dir.resolve()), "base_model_sha256": base_sha}
            atomic_write_text(target / TEMPERATURE_FILE, json.dumps(record, indent=2) + "\n")
            final = {"selected_on": "validation", "selected_by": "temperature fitted on validation"}
            if len(test[1]):
                # float32 logits / T, as the calibrated run's loader scores (predict --split rewrites the same file)
                scaled = torch.from_numpy(test[2]).float() / temperature
                final.update(evaluate_logits(scaled, torch.from_numpy(test[1]), "test"))
                runs.write_predictions(target, test[0], test[1], scaled.softmax(1).double().numpy(), "probability")
                _diagram(target / DIAGRAM_FILE, test[2], test[1], temperature, f"{run_dir.name}: test split")
            metrics["final"] = final
            metrics = runs.finish(target, metrics, started)
    return run_dir, metrics
