"""What the training stages share: optimizers, stratified validation splits, divergence checks and
scoring image batches with a model (train-head, finetune; predict scores saved runs with it too);
and fine-tuning's primitives: which parameters and modules train, the optimizer, schedule and loss
scaler, one epoch, one evaluation, the checkpoint state and the kept epoch's weights
(:mod:`cars_tl.stages.finetune` orchestrates them)."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cars_tl.artifacts import runs
from cars_tl.core import distributed, runtime
from cars_tl.core.errors import CarsTLError
from cars_tl.data import loaders
from cars_tl.data.dataset import raise_bad
from cars_tl.models import feature_views
from cars_tl.models.scoring import Meter

LBFGS_ITERATIONS = 20
LOG_EVERY = 20  # training steps between progress updates (each reads the running loss back from the device)


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "lbfgs":
        return torch.optim.LBFGS(
            params, lr=lr, max_iter=LBFGS_ITERATIONS, history_size=20, line_search_fn="strong_wolfe"
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``fraction`` of each class (at least one where a class has two or more)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        k = int(round(fraction * len(idx)))
        k = max(1, k) if len(idx) > 1 and fraction > 0 else k
        val.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


class DivergedError(CarsTLError):
    """Training produced a non-finite loss (train-head, finetune): the run is marked failed at that epoch."""


def check_finite_loss(loss: float, epoch: int, what: str) -> None:
    if not math.isfinite(loss):
        raise DivergedError(
            f"{what} diverged: the training loss became {loss} in epoch {epoch}",
            "lower --lr (or check the features for NaN/Inf with cars-tl inspect) and rerun with --force",
        )


@torch.no_grad()
def score_batches(
    score, loader, records, device: str = "cpu", precision: str = "fp32", spec: dict | None = None, progress=None
):
    """(ids, labels, scores) of every image a loader yields; ``score`` maps an image batch to (n, classes).

    ``records`` are the loader's dataset records (positions index them); an unreadable image raises.
    Batches reach ``device`` through :func:`loaders.batch_to_device` (``spec``: the transform, whose
    mean and std normalize the accelerator path's uint8 batches there).
    """

    ids, labels, scores = [], [], []
    for images, batch_labels, positions, bad in loader:
        raise_bad(bad)
        images = loaders.batch_to_device(images, device, spec or {})
        with runtime.autocast(device, precision):
            out = score(images)
        scores.append(out.double().cpu())
        labels.append(torch.as_tensor(batch_labels))
        ids.extend(records[int(p)].index for p in positions)
        if progress is not None:
            progress.advance(len(positions))
    n_classes = scores[0].shape[1] if scores else 0
    return (
        np.array(ids, dtype=np.int64),
        torch.cat(labels).numpy() if labels else np.zeros(0, np.int64),
        torch.cat(scores).numpy() if scores else np.zeros((0, n_classes)),
    )


# --------------------------------------------------------------------------- fine-tuning


def set_trainable(model, unfrozen: list[str], everything: bool = False) -> None:
    """Only the head and the named backbone modules train (``everything``: the whole body too)."""
    for p in model.body.parameters():
        p.requires_grad_(everything)
    for name in unfrozen:
        for p in model.body.get_submodule(name).parameters():
            p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)


def train_mode(model, freeze_bn_stats: bool = False) -> None:
    """``model.train()``, then every module without trainable parameters back to eval mode.

    With ``freeze_bn_stats`` every BatchNorm keeps its pretrained running statistics too (its
    affine weights still train): small batches of a small dataset re-estimate them badly.
    """
    model.train()
    modules = dict(model.body.named_modules())
    for name, module in modules.items():
        params = list(module.parameters())
        # Parameter-free modules (dropout, drop-path) follow the part they sit in.
        frozen = not any(p.requires_grad for p in params) if params else bool(name) and _ancestor_frozen(modules, name)
        if frozen or (freeze_bn_stats and isinstance(module, torch.nn.modules.batchnorm._BatchNorm)):
            module.eval()


def build_optimizer(model, config: dict):
    """Only trainable parameters: the head at ``lr``, the unfrozen backbone at ``lr * backbone_lr_scale``."""
    groups = [{"params": list(model.head.parameters()), "lr": config["lr"]}]
    body_params = [p for p in model.body.parameters() if p.requires_grad]
    if body_params:
        groups.append({"params": body_params, "lr": config["lr"] * config["backbone_lr_scale"]})
    return make_optimizer(config["optimizer"], groups, config["lr"], config["weight_decay"])


def _ancestor_frozen(modules: dict, name: str) -> bool:
    """True when the closest ancestor of module ``name`` that has parameters has none trainable."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        params = list(modules[".".join(parts[:depth])].parameters())
        if params:
            return not any(p.requires_grad for p in params)
    return False


def seed_epoch(seed: int, epoch: int) -> None:
    """Global RNGs (dropout, drop-path) from (seed, epoch) alone: a resumed epoch repeats exactly."""
    value = seed * 100_003 + epoch
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": [int(v) for v in np.random.get_state()[1]],
        "python": list(random.getstate()[1]),
    }


def lr_lambda(config: dict, steps_per_epoch: int):
    total = config["epochs"] * steps_per_epoch
    warmup = config["warmup_epochs"] * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config["schedule"] == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


@torch.no_grad()
def evaluate(model, loader, device: str, precision: str, prefix: str, spec: dict, ctx=distributed.SINGLE) -> dict:
    """Metrics over the loader's images; with ``ctx`` active, over every rank's shard together.
    With ``tta`` flip in ``spec``'s feature options, the logits of each image and its mirror averaged."""
    tta = feature_views.options(spec)["tta"]
    model.eval()
    meter = Meter()
    for images, labels, _, bad in loader:
        raise_bad(bad)
        images = loaders.batch_to_device(images, device, spec)
        labels = labels.to(device, non_blocking=True)
        with runtime.autocast(device, precision):
            logits = feature_views.view_mean(model, images, tta)
        meter.add(logits, labels)
    return distributed.reduce_meter(meter, ctx).result(prefix)


def repair_best(last: dict, best_path: Path) -> None:
    """After a kill between writing last.pt and best.pt, best.pt lags: when last.pt's epoch is the
    best one, its weights are the best weights."""
    best = last.get("best") or {}
    if best.get("epoch") != last["epoch"]:
        return
    current = runs.load_checkpoint(best_path) if best_path.is_file() else {}
    if current.get("epoch") != best["epoch"]:
        runs.save_checkpoint(best_path, {"model": last["model"], "epoch": last["epoch"], "config": last["config"]})


def best_weights(best: dict | None, last_path: Path, best_path: Path, model) -> dict:
    """The kept model's weights, checked to be of the epoch the run reports as best."""
    if best is None:  # no epoch ran (e.g. --epochs reached already): the weights as they are
        return model.state_dict()
    state = runs.load_checkpoint(best_path) if best_path.is_file() else {}
    if state.get("epoch") == best["epoch"]:
        return state["model"]
    last = runs.load_checkpoint(last_path)
    if last.get("epoch") == best["epoch"]:
        return last["model"]
    raise CarsTLError(
        f"{best_path} holds epoch {state.get('epoch')}, but the run's best epoch is {best['epoch']}: the checkpoints disagree",
        "start the run again with --force",
    )


def train_epoch(
    model,
    loader,
    opt,
    scheduler,
    scaler,
    config,
    device,
    precision,
    epoch,
    total,
    spec,
    progress,
    *,
    forward=None,
    sampler=None,
    ctx=distributed.SINGLE,
) -> dict:
    """One epoch. Several processes: ``forward`` is the DDP-wrapped model and ``sampler`` the
    :class:`~cars_tl.core.loaders.ShardedEpochSampler`; each rank's loss is its share's summed loss
    times world size / global batch size, so DDP's gradient average is the global batch's mean."""
    forward = forward or model
    train_mode(model, config["freeze_bn_stats"])
    meter = Meter()
    start = time.perf_counter()
    with progress.task(f"epoch {epoch}/{config['epochs']}", total=total, unit="img") as task:
        for step, (images, labels, _, bad) in enumerate(loader, 1):
            raise_bad(bad)
            images = loaders.batch_to_device(images, device, spec)
            labels = labels.to(device, non_blocking=True)
            with runtime.autocast(device, precision):
                logits = forward(images)
            held, global_count = sampler.share(step - 1) if sampler is not None else (len(labels), len(labels))
            if sampler is None:
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config["label_smoothing"])
            else:  # a stand-in image (held == 0) runs the step with weight 0
                loss = F.cross_entropy(
                    logits.float(), labels, label_smoothing=config["label_smoothing"], reduction="sum"
                )
                loss = loss * (ctx.world_size * min(held, 1) / global_count)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # loss scaling only for fp16; a no-op otherwise
            scaler.step(opt)
            scaler.update()
            scheduler.step()
            if held:
                meter.add(logits.detach(), labels)
            # Reading the running figures waits for the device: only every LOG_EVERY steps.
            status = {}
            if step % LOG_EVERY == 0:
                running_loss, running_acc = meter.running()
                status = {"status": f"loss {running_loss:.3f} acc {running_acc:.1f}%"}
            task.advance(global_count, **status)
    seconds = time.perf_counter() - start
    meter = distributed.reduce_meter(meter, ctx)
    return {
        "epoch": epoch,
        **meter.result("train"),
        "seconds": round(seconds, 3),
        "images_per_second": round(total / seconds, 2),
    }


def make_scheduler(opt, config: dict, steps_per_epoch: int):
    """Stepped once per training step: ``warmup_epochs`` of linear warmup, then ``schedule`` (cosine | none)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config, steps_per_epoch))


def make_scaler(device: str, precision: str):
    """Loss scaling for fp16 autocast; a no-op otherwise."""
    return torch.amp.GradScaler("cuda" if device.startswith("cuda") else "cpu", enabled=precision == "fp16")


def checkpoint_state(model, opt, scheduler, scaler, *, epoch: int, config: dict, best, history: list) -> dict:
    """What ``last.pt`` holds: everything a resumed run continues from (the RNG states as a record)."""
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "rng": rng_state(),
        "config": config,
        "best": best,
        "history": history,
    }


def restore_optimizer(state: dict, opt, scheduler, scaler) -> None:
    """The optimizer, schedule and loss scaler of a :func:`checkpoint_state`, to continue as they were."""
    opt.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def sync_batchnorm_wanted(model, config: dict, sync_bn: bool | None, ctx) -> bool:
    """SyncBatchNorm where it changes something: several processes, and BatchNorm layers whose
    statistics train (not frozen, not kept from pretraining). Auto (``None``) turns it on for CUDA
    jobs, so that the global batch means for BatchNorm what it means for the gradient: the same
    statistics as one process with that batch. On the CPU torch has no SyncBatchNorm, so auto
    leaves each process its own share's statistics (recorded in metrics.json)."""
    if not ctx.active or sync_bn is False:
        return False
    trains = not config["freeze_bn_stats"] and any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters())
        for m in model.modules()
    )
    if sync_bn is None:
        return trains and ctx.device.startswith("cuda")
    return trains or sync_bn


def load_init_head(model, head_file: Path) -> None:
    state = runs.load_checkpoint(head_file)
    want = tuple(model.head.weight.shape)
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()} if isinstance(state, dict) else {}
    if set(shapes) != {"weight", "bias"} or shapes["weight"] != want or shapes["bias"] != want[:1]:
        found = ", ".join(f"{k} {s}" for k, s in shapes.items()) if shapes else f"a {type(state).__name__}"
        raise CarsTLError(
            f"--init-head: {head_file} is not a head for this model: it holds {found}, "
            f"this model's head is weight {want} and bias {want[:1]}",
            "retrain the head on this backbone's features: cars-tl train-head --features F.h5 --force",
        )
    bad = [k for k in ("weight", "bias") if not torch.isfinite(state[k]).all()]
    if bad:
        raise CarsTLError(
            f"--init-head: {head_file} holds NaN or Inf in its {' and '.join(bad)}; fine-tuning from it would diverge at once",
            f"retrain the head: cars-tl train-head --features F.h5 --out {head_file.parent} --force",
        )
    model.head.load_state_dict(state)
