"""``train-head``: a Linear classifier on cached features (the study's model B), in seconds.

Presets (explicit options override them):

``study``  exactly the study: Adam, lr 1e-3, batch 32, 15 epochs, plain cross-entropy, no schedule,
           raw features; the reported model is the last epoch's.
``tuned``  the standard linear probe: features standardized (folded back into the saved weights),
           full-batch L-BFGS on cross-entropy plus an L2 penalty (``weight_decay/2 * |W|^2``),
           15 epochs of 20 L-BFGS iterations each. The penalty is chosen from a grid by the
           cross-entropy on a validation split carved from train (10%, stratified, seeded) --
           never on test -- then the head is refitted on all of train (the chosen value is recorded
           under ``selection`` in metrics.json; ``config`` keeps ``None``). With ``refit=False``
           (``--no-refit``) the final head is the chosen value's head trained on the fit rows only,
           so the validation rows stay held out (``config["refit"]`` is then ``False``; absent means
           refitted): ``calibrate`` fits its temperature on those rows. Full-batch optimization
           converges whatever the dataset size, unlike a fixed number of minibatch epochs;
           validation loss is a steadier criterion than validation accuracy on small splits.
           (Label smoothing was tried and dropped: it lowered accuracy and calibration here.)

The saved ``head.pt`` is a plain ``{"weight", "bias"}`` state dict acting on raw pooled features,
so ``model.fc.load_state_dict(torch.load("head.pt", weights_only=True))`` puts it on the backbone,
and ``finetune --init-head`` starts from it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cars_tl.artifacts import names, run_config, runs
from cars_tl.artifacts.features import feature_run_fields, load_train_test
from cars_tl.core import runtime
from cars_tl.core.errors import CarsTLError, check_number, check_seed
from cars_tl.core.options import check_batch_size
from cars_tl.core.progress import NULL, Progress
from cars_tl.core.tensorboard import EpochLog, check_available
from cars_tl.models.scoring import Meter, evaluate_logits
from cars_tl.models.training import check_finite_loss, make_optimizer, stratified_split
from cars_tl.stages import presets

HEAD_FILE = "head.pt"
OPTIMIZERS = ("adam", "adamw", "sgd", "lbfgs")
WEIGHT_DECAY_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
# A head's training is a chain of small dependent operations. Split over threads they gain nothing alone
# (a tuned head on 216 rows: 5.1 s on 2 threads, 5.3 s on 1) and wait at every barrier for a thread the
# scheduler gave to another process when the cores are shared (47.9 s against 13.4 s beside two busy
# processes). So a step of fewer multiply-adds than this runs on one thread; larger steps use them all.
ONE_THREAD_STEP_MACS = 100_000_000


def resolve_preset(preset: str, **overrides) -> dict:
    """The preset's settings with every non-None override applied."""
    config = dict(presets.for_stage("train-head", preset, **overrides), preset=preset)
    if config["optimizer"] not in OPTIMIZERS:
        raise CarsTLError(f"unknown --optimizer {config['optimizer']!r}; valid: {', '.join(OPTIMIZERS)}")
    check_number("--lr", config["lr"], minimum=0, exclusive_minimum=True)
    check_number("--weight-decay", config["weight_decay"], minimum=0)
    if config["optimizer"] == "lbfgs":
        config["batch_size"] = 0  # full batch
    if config["epochs"] < 1:
        raise CarsTLError(f"--epochs must be positive, got {config['epochs']}")
    if config["optimizer"] != "lbfgs":
        check_batch_size(config["batch_size"])
    return config


@dataclasses.dataclass
class HeadData:
    """Feature rows ``x`` (n, width) and their labels ``y`` (n,)."""

    x: torch.Tensor
    y: torch.Tensor


def fit_head(
    train: HeadData,
    evals: dict[str, HeadData],
    config: dict,
    weight_decay: float,
    num_classes: int,
    seed: int,
    progress: Progress,
    label: str,
    on_epoch=None,
) -> tuple[torch.nn.Linear, list[dict]]:
    """Train one head on ``train`` with ``config`` (a resolved preset) and ``weight_decay``,
    scoring every split of ``evals`` each epoch; returns the head and the per-epoch history.
    ``on_epoch(row)`` is called after each epoch (the live TensorBoard log)."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(train.x.shape[1], num_classes)
    full_batch = config["optimizer"] == "lbfgs"
    # L-BFGS has no decoupled decay: the L2 penalty goes into its objective instead.
    optimizer = make_optimizer(
        config["optimizer"], head.parameters(), config["lr"], 0.0 if full_batch else weight_decay
    )
    steps_per_epoch = 1 if full_batch else -(-len(train.y) // config["batch_size"])
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["epochs"] * steps_per_epoch)
        if config["schedule"] == "cosine"
        else None
    )
    generator = torch.Generator().manual_seed(seed)
    history = []
    with progress.task(label, total=config["epochs"], unit="epoch") as task:
        for epoch in range(1, config["epochs"] + 1):
            start = time.perf_counter()
            head.train()
            meter = Meter()
            if full_batch:

                def closure():
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(head(train.x), train.y, label_smoothing=config["label_smoothing"])
                    loss = loss + 0.5 * weight_decay * head.weight.square().sum()
                    loss.backward()
                    return loss

                optimizer.step(closure)
                with torch.no_grad():
                    meter.add(head(train.x), train.y)
            batches = (
                [] if full_batch else torch.randperm(len(train.y), generator=generator).split(config["batch_size"])
            )
            for idx in batches:
                logits = head(train.x[idx])
                loss = F.cross_entropy(logits, train.y[idx], label_smoothing=config["label_smoothing"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler:
                    scheduler.step()
                meter.add(logits.detach(), train.y[idx])
            row = {"epoch": epoch, **meter.result("train")}
            check_finite_loss(row["train_loss"], epoch, label)
            head.eval()
            with torch.no_grad():
                for name, d in evals.items():
                    row.update(evaluate_logits(head(d.x), d.y, name))
            row["seconds"] = round(time.perf_counter() - start, 4)
            row["images_per_second"] = round(len(train.y) / max(row["seconds"], 1e-9), 1)
            history.append(row)
            if on_epoch is not None:
                on_epoch({**row, "lr": [g["lr"] for g in optimizer.param_groups]})
            task.advance(1, status=f"loss {row['train_loss']:.3f} acc {row['train_acc']:.1f}%")
    return head, history


def standardization(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and scale of each feature over the rows given, as scikit-learn's StandardScaler has them:
    a feature constant on those rows (a dead ReLU unit) gets scale 1, never a huge gain."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x.double().numpy())
    return torch.from_numpy(scaler.mean_).float(), torch.from_numpy(scaler.scale_).float()


def _fold_standardization(head: torch.nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> dict:
    """Weights acting on raw features: W (x - m) / s + b = (W / s) x + (b - W m / s)."""
    weight = head.weight.detach() / std
    bias = head.bias.detach() - weight @ mean
    return {"weight": weight.contiguous(), "bias": bias.contiguous()}


@run_config.recorded("train-head", names={"features_path": "features"})
def train_head(
    features_path: Path,
    *,
    preset: str = "study",
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    optimizer: str | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
    out: Path | None = None,
    artifacts: Path = Path("artifacts"),
    progress: Progress = NULL,
    force: bool = False,
    tensorboard: Path | None = None,
    refit: bool = True,
) -> tuple[Path, dict]:
    """Train a Linear head on a feature cache; returns the run directory and its metrics.

    An existing run is replaced only with ``force`` (and only once the new one completes).
    ``tensorboard``: also log each epoch of the final fit there, live (:mod:`cars_tl.core.tensorboard`).
    ``refit=False``: the tuned head is not refitted on all of train after its weight-decay search (the
    validation rows stay held out, for ``calibrate``)."""
    started = time.perf_counter()
    check_available(tensorboard)
    config = resolve_preset(
        preset, epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay
    )
    if not refit:
        if config["weight_decay"] is not None:
            why = "--weight-decay was given" if preset == "tuned" else f"preset {preset!r} trains on all of train"
            raise CarsTLError(
                f"--no-refit keeps the validation split held out of the final head, but this run holds none out ({why})",
                f"drop --no-refit, or hold one out: cars-tl train-head --features {features_path} --preset tuned "
                "--no-refit (without --weight-decay)",
            )
        # Recorded only when set, so the configs (and artifacts) of refitted runs stay as they were.
        config["refit"] = False
    config["seed"] = check_seed(seed)
    config["features"] = str(features_path)
    cache = load_train_test(Path(features_path), require_test=False)
    run_dir = runs.resolve_run_dir(
        out, names.head_run_name(cache.attrs["backbone"], cache.attrs["weights"], preset), artifacts
    )
    tr = cache.split("train")
    # A train-only dataset (or an empty test split): no test metrics, rather than "acc 0.00%" measured on nothing.
    te = cache.split("test") if "test" in cache.splits and len(cache.split("test").labels) else None
    x_train, y_train = torch.from_numpy(tr.features), torch.from_numpy(tr.labels)
    x_test, y_test = (torch.from_numpy(te.features), torch.from_numpy(te.labels)) if te else (None, None)

    def scaling(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Statistics of the rows the head trains on, never of validation or test rows.
        return (
            standardization(rows) if config["standardize"] else (torch.zeros(rows.shape[1]), torch.ones(rows.shape[1]))
        )

    fields = feature_run_fields(cache)
    head_params = cache.feature_dim * cache.num_classes + cache.num_classes
    backbone_params = fields["backbone"]["params"] or 0
    with runs.writing_run(run_dir, "train-head", force=force) as target:
        metrics = runs.new_metrics(
            "head",
            run_dir.name,
            config,
            **fields,
            params={"total": backbone_params + head_params, "trainable": head_params},
            device="cpu",
            device_name=runtime.device_name("cpu"),
            model_file=HEAD_FILE,
        )
        runs.write_metrics(target, metrics)
        step_rows = len(y_train) if config["batch_size"] == 0 else min(config["batch_size"], len(y_train))
        threads = 1 if step_rows * cache.feature_dim * cache.num_classes < ONE_THREAD_STEP_MACS else None
        metrics["intra_op_threads"] = threads or torch.get_num_threads()
        with runs.recording(target, metrics), runtime.intra_op_threads(threads):
            if config["weight_decay"] is None:  # tuned: choose on a validation split carved from train
                fit_idx, val_idx = stratified_split(tr.labels, config["val_fraction"], seed)
                mean, std = scaling(x_train[fit_idx])
                fit = HeadData((x_train[fit_idx] - mean) / std, y_train[fit_idx])
                val = HeadData((x_train[val_idx] - mean) / std, y_train[val_idx])
                search = []
                for wd in WEIGHT_DECAY_GRID:
                    _, hist = fit_head(
                        fit, {"val": val}, config, wd, cache.num_classes, seed, progress, f"head wd={wd:g} (validation)"
                    )
                    search.append(
                        {"weight_decay": wd, "val_acc": hist[-1]["val_acc"], "val_loss": hist[-1]["val_loss"]}
                    )
                best = min(search, key=lambda r: (r["val_loss"], -r["val_acc"]))
                # The chosen value is a result, not an option: config keeps weight_decay None ("chosen"),
                # so seeds that chose differently are still one configuration.
                metrics["selection"] = {
                    "selected_on": "validation",
                    "by": "cross-entropy on a validation split of train",
                    "chosen": {"weight_decay": best["weight_decay"]},
                    "val_fraction": config["val_fraction"],
                    "grid": search,
                }
            weight_decay_used = (
                metrics["selection"]["chosen"]["weight_decay"] if "selection" in metrics else config["weight_decay"]
            )
            # refit: the final head trains on all of train; --no-refit: on the fit rows only (the search's
            # split), validation rows held out and scored each epoch.
            x_fit, y_fit = (x_train, y_train) if refit else (x_train[fit_idx], y_train[fit_idx])
            mean, std = scaling(x_fit)
            held_out = {} if refit else {"val": HeadData((x_train[val_idx] - mean) / std, y_train[val_idx])}
            live = EpochLog(tensorboard, run_dir.name)
            head, history = fit_head(
                HeadData((x_fit - mean) / std, y_fit),
                {**held_out, **({"test": HeadData((x_test - mean) / std, y_test)} if te else {})},
                config,
                weight_decay_used,
                cache.num_classes,
                seed,
                progress,
                f"train head ({preset})",
                on_epoch=live.on_epoch,
            )
            state = _fold_standardization(head, mean, std)
            runs.save_checkpoint(target / HEAD_FILE, state)
            with torch.no_grad():
                raw = torch.nn.Linear(cache.feature_dim, cache.num_classes)
                raw.load_state_dict(state)
                final = evaluate_logits(raw(x_fit), y_fit, "train")
                if not refit:
                    final.update(evaluate_logits(raw(x_train[val_idx]), y_train[val_idx], "val"))
                if te:
                    final.update(evaluate_logits(raw(x_test), y_test, "test"))
                    runs.write_predictions(target, te.ids, te.labels, raw(x_test).softmax(1).numpy(), "probability")
            metrics.update(
                history=history,
                final={
                    **final,
                    "best_epoch": config["epochs"],
                    "selected_by": "last epoch",
                    "selected_on": "validation" if "selection" in metrics else "none",
                },
            )
            metrics = runs.finish(target, metrics, started)
            live.on_end(config, metrics["final"])
    return run_dir, metrics
