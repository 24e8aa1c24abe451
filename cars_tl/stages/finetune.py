"""``finetune``: train a backbone (or part of it) with a Linear head on the images.

The study's model A is ``--weights random --unfreeze all``; model D is ``--weights imagenet
--unfreeze layer4 --init-head <model B's train-head run>``.

Frozen means frozen: frozen parameters have ``requires_grad=False`` and never reach the optimizer,
every module without trainable parameters is put back in eval mode after ``model.train()`` (its
BatchNorm statistics never move), and since no input of the frozen prefix needs a gradient,
autograd builds no graph for it.

Presets (explicit options override them):

``study``  Adam, lr 1e-3, batch 32, 15 epochs, no augmentation, no schedule; the kept model is the
           best epoch by *test* accuracy, as the study did (recorded as such in metrics.json).
``tuned``  AdamW (weight decay 0.05), head lr 1e-3 and backbone lr 1e-4, one warmup epoch then a
           cosine schedule, label smoothing 0.1, standard augmentation (a random crop fitting ``--resize``, flip,
           colour jitter), 30 epochs, and BatchNorm running statistics kept from pretraining (BN
           layers in eval mode; their affine weights train) unless the weights are random; the kept
           model is the best epoch on a validation split carved from train (10%, stratified).
           Re-estimating BN statistics from batches of 32 moved the pretrained features so far that,
           with the learning rate at zero, test accuracy fell from 62% to 25% on the real subset.

Every epoch is reproducible from (seed, epoch) alone: the global RNGs are re-seeded at each epoch
start, the order is a permutation seeded by (seed, epoch), and each sample's augmentation by
(seed, epoch, sample), whatever the number of loader workers; so ``--resume`` after a kill, with
any ``--workers``, ends with the same weights (on the CPU). ``last.pt`` is written before ``best.pt``
and names the best epoch, so the kept model is always that epoch's (see
:func:`cars_tl.models.training.best_weights`).
A loss that becomes NaN or infinite stops the run as ``failed`` at that epoch; ``last.pt`` keeps the
last good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from cars_tl.artifacts import embeddings, names, run_config, runs
from cars_tl.core import distributed, runtime
from cars_tl.core.errors import CarsTLError, check_number, check_seed
from cars_tl.core.locks import reads
from cars_tl.core.options import DeviceOptions, ImageOptions
from cars_tl.core.progress import NULL, Progress
from cars_tl.core.tensorboard import EpochLog, check_available
from cars_tl.data import devkit, loaders, transforms
from cars_tl.data import manifest as manifests
from cars_tl.data.dataset import CarsDataset
from cars_tl.models import backbones, feature_views, training, trunk_store
from cars_tl.models.training import DivergedError, score_batches, set_trainable, stratified_split, train_mode
from cars_tl.stages import presets

MODEL_FILE = "model.pt"
# Options that may differ on --resume without changing what is computed (augmentation depends on
# (seed, epoch, sample) only, so the worker count is free; so is the process count, and SyncBatchNorm
# computes the global batch's statistics, as one process does).
RESUME_FREE = ("workers", "resume", "force", "out", "artifacts", "data_dir", "sync_bn")
# Compared by what they compute on, not by which one: the device by its type (a single process
# records cuda:0 where torchrun's rank 0 records cuda:0 and a single --device cuda records cuda).
RESUME_BY_TYPE = ("device",)


def resolve_config(preset: str, **options) -> dict:
    """The finetune preset's options (the image shape's ``resize_mode`` and ``image_size`` among them,
    as every image stage resolves them) with every explicit (non-None) option applied, checked."""
    config = dict(presets.for_stage("finetune", preset, **options), preset=preset)
    if config["optimizer"] not in ("adam", "adamw", "sgd"):
        raise CarsTLError(f"unknown --optimizer {config['optimizer']!r}; valid: adam, adamw, sgd")
    if config["augment"] not in ("none", "standard"):
        raise CarsTLError(f"unknown --augment {config['augment']!r}; valid: none, standard")
    if config["epochs"] < 1:  # the batch size: DeviceOptions' (the presets' are valid)
        raise CarsTLError(f"--epochs must be positive, got {config['epochs']}")
    check_number("--lr", config["lr"], minimum=0, exclusive_minimum=True)
    check_number("--weight-decay", config["weight_decay"], minimum=0)
    return config


def _check_head_run(head_dir: Path, bb, manifest, crop: str, margin: float) -> Path:
    m = runs.read_metrics(head_dir)
    if m["kind"] != "head":
        raise CarsTLError(
            f"--init-head {head_dir} is a {m['kind']} run, not a train-head run",
            "pass the run directory that cars-tl train-head wrote",
        )
    b = m["backbone"]
    problems = []
    if b["backbone"] != bb.name:
        problems.append(f"backbone {b['backbone']} != {bb.name}")
    if b["weights_digest"] != bb.weights_digest:
        problems.append(
            f"its features came from other weights ({b['weights']}, digest {b['weights_digest'][:12]} != {bb.weights_digest[:12]})"
        )
    if feature_views.options(b["transform"])["layers"] != [feature_views.FINAL]:
        problems.append(
            f"its features concatenate several stages ({feature_views.describe(b['transform'])}): "
            "a fine-tuned model's head reads the final pooled output alone"
        )
    # Views (--tta) do not change what a head reads: a head trained on flip-averaged rows starts a fine-tune as well.
    plain = {k: v for k, v in b["transform"].items() if k != feature_views.SPEC_KEY}
    if (
        not transforms.same_transform(plain, {k: v for k, v in bb.transform.items() if k != feature_views.SPEC_KEY})
        or b["crop"] != crop
        or float(b.get("margin", 0.0)) != float(margin)
    ):
        problems.append(
            f"preprocessing differs: the head's features were made with --crop {b['crop']} --margin {b.get('margin')} "
            f"--resize {transforms.resize_mode(b['transform'])} --image-size {transforms.side(b['transform'])} "
            f"({transforms.describe_transform(b['transform'])}), this fine-tune asks for --crop {crop} --margin {margin} "
            f"--resize {transforms.resize_mode(bb.transform)} --image-size {transforms.side(bb.transform)}"
        )
    if len(m["class_names"]) != manifest.num_classes:
        problems.append(f"{len(m['class_names'])} classes != {manifest.num_classes}")
    if m["inputs"]["dataset_fingerprint"] != manifest.fingerprint:
        problems.append("it was trained on another dataset (fingerprint differs)")
    if problems:
        raise CarsTLError(
            f"--init-head {head_dir} does not fit this fine-tune: " + "; ".join(problems),
            "use the same --backbone/--weights/--crop/--margin/--resize/--image-size as the features the head was trained on",
        )
    return runs.model_file(head_dir)


@reads("finetune", lambda a: [devkit.stanford_root(a["data_dir"])])  # download cannot swap the data folder meanwhile
@run_config.recorded("finetune")
def finetune(
    data_dir: Path = Path("data"),
    *,
    backbone: str = "resnet50",
    weights: str = "imagenet",
    unfreeze: str = "layer4",
    init_head: Path | None = None,
    preset: str = "study",
    epochs: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    augment: str | None = None,
    image: ImageOptions = ImageOptions(),
    compute: DeviceOptions = DeviceOptions(batch_size=None),
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    out: Path | None = None,
    artifacts: Path = Path("artifacts"),
    progress: Progress = NULL,
    sync_bn: bool | None = None,
    tta: str | None = None,
    trunk_cache: str = "off",
    trunk_dtype: str = "auto",
    tensorboard: Path | None = None,
) -> tuple[Path, dict]:
    """Fine-tune; returns the run directory and its metrics (see :mod:`cars_tl.artifacts.runs`).

    ``seed`` seeds the head's initialisation, a random backbone's (``--weights random``, unless
    ``init_head`` fixes the backbone its features came from), the shuffling, the augmentation and the
    validation split; the default (0) reproduces earlier runs.
    ``image``: crop and margin; its resize mode (crop | squash | pad, for training, with the augmentation that fits
    it, and evaluation) and image size: None for the preset's (:func:`cars_tl.stages.presets.for_stage`, as
    extract-features and build-trunk).
    ``tta``: none | flip (None: the preset's, :data:`cars_tl.stages.presets.FINETUNE_TTA`): evaluation and the saved
    predictions average the logits of each image and its mirror; recorded in the config and in the
    run's transform spec, so ``predict`` averages alike.

    Under ``torchrun`` every process calls this; ``compute.batch_size`` (None: the preset's) is the global batch
    (see :mod:`cars_tl.core.distributed`) and only rank 0 writes the run. ``sync_bn`` (``None``: auto) turns
    BatchNorm into SyncBatchNorm where its statistics train in a job of several CUDA processes.
    ``trunk_cache``: auto | off | PATH, ``trunk_dtype``: its storage (see :mod:`cars_tl.models.trunk`).
    ``tensorboard``: also log every epoch there, live (:mod:`cars_tl.core.tensorboard`; rank 0 only).
    """
    started = time.perf_counter()
    check_available(tensorboard)
    config = resolve_config(
        preset,
        epochs=epochs,
        lr=lr,
        batch_size=compute.batch_size,
        optimizer=optimizer,
        augment=augment,
        resize_mode=image.resize,
        image_size=image.image_size,
    )
    # Recorded as before (image_size beside crop; resize only when not crop): configs stay comparable.
    resize_mode, image_size = config.pop("resize_mode"), config.pop("image_size")
    crop, margin = image.crop, image.margin
    config.update(
        backbone=backbone,
        weights=str(weights),
        unfreeze=unfreeze,
        init_head=str(init_head) if init_head else None,
        crop=crop,
        margin=margin,
        image_size=image_size,
        seed=check_seed(seed),
    )
    if resize_mode != "crop":  # absent means crop: configs of earlier runs stay comparable on --resume
        config["resize"] = resize_mode
    tta = feature_views.check_tta(presets.FINETUNE_TTA.get(preset, "none") if tta is None else tta)
    if tta != "none":  # absent means none, likewise
        config["tta"] = tta
    # Pretrained statistics are worth keeping; a random network's are not statistics at all.
    config["freeze_bn_stats"] = bool(config["freeze_bn_stats"]) and str(weights) != "random"
    manifest = manifests.load_manifest(data_dir)
    manifest.split("test")  # evaluated every epoch: a train-only dataset is refused here, saying so
    ctx = distributed.init(runtime.resolve_device(compute.device))
    distributed.local_batch(config["batch_size"], ctx)  # a global batch that does not divide: refused before any work
    device = ctx.device
    precision = runtime.resolve_precision(compute.precision, device)
    runtime.prepare_device(device, precision)
    config.update(device=device, precision=precision, dataset_fingerprint=manifest.fingerprint, sync_bn=sync_bn)
    workers = loaders.default_workers(device) if compute.workers is None else compute.workers

    # A random backbone is seeded by --seed, except under --init-head: the head was trained on the
    # features of one backbone (extract-features builds random weights from the default seed), and
    # D must start from that very backbone.
    backbone_seed = backbones.RANDOM_SEED if init_head else seed
    bb = backbones.build_backbone(backbone, weights, image_size, resize_mode, seed=backbone_seed)
    bb.transform = feature_views.with_options(bb.transform, tta)  # recorded: predict averages the views alike
    unfrozen = backbones.parse_unfreeze(unfreeze, bb)
    model = backbones.classifier_model(bb, manifest.num_classes, seed=seed)
    if init_head:
        training.load_init_head(model, _check_head_run(Path(init_head), bb, manifest, crop, margin))
    set_trainable(model, unfrozen, everything=unfreeze == "all")
    params = runs.count_params(model)
    synced = training.sync_batchnorm_wanted(model, config, sync_bn, ctx)
    if synced:
        model = distributed.sync_batchnorm(model, device)
    model.to(device, memory_format=torch.channels_last)
    run_dir = runs.resolve_run_dir(
        out,
        names.finetune_run_name(backbone, weights, unfreeze, preset),
        artifacts,
    )
    # Rank 0 alone takes the run's lock and writes; the other ranks learn where (a staging folder with --force).
    with distributed.rank0_output(
        ctx, lambda: runs.writing_run(run_dir, "finetune", force=force, resume=resume)
    ) as target:
        where = _Where(
            run_dir, target, params, workers, resume, force, progress, ctx, synced, tensorboard,
            trunk=dict(choice=str(trunk_cache), storage=trunk_dtype, artifacts=Path(artifacts)),
        )  # fmt: skip
        metrics = _train(model, bb, manifest, config, where)
        return run_dir, runs.finish(target, metrics, started) if ctx.is_main else metrics


def _resume_changes(state_config: dict, config: dict, force: bool, last_path: Path) -> list[str]:
    """The options that differ from the checkpoint's; refuses what cannot continue honestly."""
    differing = sorted(
        k
        for k in set(config) | set(state_config)
        if k not in RESUME_FREE and not _same_option(k, state_config.get(k), config.get(k))
    )
    listing = ", ".join(f"{k}: {state_config.get(k)!r} -> {config.get(k)!r}" for k in differing)
    if "epochs" in differing and (config["schedule"] != "none" or config["warmup_epochs"]):
        raise CarsTLError(
            f"--resume with --epochs {config['epochs']} instead of {state_config.get('epochs')}: the learning-rate schedule "
            f"({config['schedule']}, {config['warmup_epochs']} warmup epoch(s)) was laid out over {state_config.get('epochs')} epochs, "
            "and stretching it mid-run would jump the learning rate",
            f"resume with --epochs {state_config.get('epochs')}, or start a new run (--force without --resume, or --out)",
        )
    if differing == ["epochs"]:
        return differing  # a constant schedule continues as it was: optimizer state and all
    if differing and not force:
        raise CarsTLError(
            f"--resume with other options than {last_path.parent.parent} was started with: {listing}",
            "rerun with the original options, or add --force to continue from its weights with a new optimizer",
        )
    return differing


def _same_option(key: str, recorded, asked) -> bool:
    if key in RESUME_BY_TYPE and isinstance(recorded, str) and isinstance(asked, str):
        return recorded.split(":")[0] == asked.split(":")[0]
    return recorded == asked


@dataclasses.dataclass(frozen=True)
class _Where:
    """Where and how one fine-tune runs, beside its ``config`` (what it computes: device, precision and seed too)."""

    run_dir: Path
    target: Path  # the folder written (a staging folder under --force)
    params: dict
    workers: int
    resume: bool
    force: bool
    progress: Progress
    ctx: distributed.Context
    synced: bool  # BatchNorm turned into SyncBatchNorm
    tensorboard: Path | None
    trunk: dict  # trunk_store.data_source's choice, storage and artifacts


def _train(model, bb, manifest, config: dict, where: _Where) -> dict:
    """Data, optimizer and schedule; resume; the epochs with their checkpoints; the kept model's test scores."""
    device, precision, seed, workers, ctx = (
        config["device"],
        config["precision"],
        config["seed"],
        where.workers,
        where.ctx,
    )
    run_dir, target, progress, resume, force = where.run_dir, where.target, where.progress, where.resume, where.force
    last_path, best_path = target / "checkpoints" / "last.pt", target / "checkpoints" / "best.pt"
    opt = training.build_optimizer(model, config)
    spec = bb.transform
    crop, margin = config["crop"], config["margin"]
    train_set = CarsDataset(
        manifest,
        "train",
        transforms.train_transform(spec, config["augment"], loaders.data_path(device).batch_dtype),
        crop,
        margin,
        mark_bad=True,
    )
    eval_train = loaders.eval_dataset(manifest, "train", spec, device, crop, margin)
    test_set = loaders.eval_dataset(manifest, "test", spec, device, crop, margin)
    labels = np.array([r.label for r in train_set.records])
    fit_idx, val_idx = stratified_split(labels, config["val_fraction"], seed)
    fit_set = Subset(train_set, fit_idx.tolist()) if len(val_idx) else train_set
    # Each rank takes its slice of every global batch, and a contiguous shard of the evaluation splits.
    local_batch = distributed.local_batch(config["batch_size"], ctx)
    sampler = (
        loaders.ShardedEpochSampler(len(fit_set), seed, config["batch_size"], ctx)
        if ctx.active
        else loaders.EpochSampler(len(fit_set), seed)
    )
    train_loader = loaders.make_loader(
        loaders.SeededAugmentation(fit_set, seed), local_batch, workers, device, sampler=sampler
    )
    eval_batch = local_batch * 2
    eval_loaders = {
        "test": loaders.eval_loader(
            test_set, distributed.shard_range(len(test_set), ctx), eval_batch, workers, device, spec
        )
    }
    if len(val_idx):
        val_shard = [val_idx.tolist()[i] for i in distributed.shard_range(len(val_idx), ctx)]
        eval_loaders["val"] = loaders.eval_loader(eval_train, val_shard, eval_batch, workers, device, spec)
    steps_per_epoch = -(-len(fit_set) // config["batch_size"])
    scheduler = training.make_scheduler(opt, config, steps_per_epoch)
    select = "val" if "val" in eval_loaders else "test"
    scaler = training.make_scaler(device, precision)

    metrics = runs.new_metrics(
        "finetune",
        run_dir.name,
        config,
        params=where.params,
        model_file=MODEL_FILE,
        device=device,
        device_name=runtime.device_name(device),
        class_names=manifest.class_names,
        backbone={
            **bb.describe(),
            "crop": crop,
            "margin": margin,
            "precision": precision,
            "params": where.params["total"] - sum(p.numel() for p in model.head.parameters()),
        },
        inputs={"dataset_fingerprint": manifest.fingerprint, "init_head": config["init_head"]},
    )
    if ctx.active:
        metrics["distributed"] = {
            "world_size": ctx.world_size,
            "backend": ctx.backend,
            "per_rank_batch": local_batch,
            "sync_bn": where.synced,
            "batchnorm": "SyncBatchNorm (global batch statistics)"
            if where.synced
            else "unchanged (frozen, or per-process statistics)",
        }
    start_epoch, best = 1, None
    if resume and last_path.is_file():
        state = runs.load_checkpoint(last_path)
        differing = _resume_changes(state["config"], config, force, last_path)
        if differing and state["epoch"] >= config["epochs"]:  # nothing would train under the changed options
            raise CarsTLError(
                f"--resume: {run_dir} has trained all {state['epoch']} of its epochs, so nothing would continue under the changed "
                "options ("
                + ", ".join(f"{k}: {state['config'].get(k)!r} -> {config.get(k)!r}" for k in differing)
                + "); the run is left as it is",
                "to train with the new options, start a new run: the same command with --force and without --resume "
                "(the old run stays until the new one completes), or --out NEW_RUN_DIR",
            )
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CarsTLError(
                f"{last_path} does not fit the model asked for now: {str(exc).splitlines()[0][:200]}",
                "resume with the original --backbone, or start over with --force (without --resume)",
            ) from None
        if differing in ([], ["epochs"]):
            training.restore_optimizer(state, opt, scheduler, scaler)
        else:  # forced with other options: the weights carry on, the optimizer and schedule start afresh
            metrics["optimizer_restarted"] = True
        if differing:
            metrics["resumed_with_changes"] = {k: [state["config"].get(k), config.get(k)] for k in differing}
        start_epoch, best = state["epoch"] + 1, state["best"]
        metrics["history"] = state["history"]
        metrics["resumed_from_epoch"] = state["epoch"]
        if ctx.is_main:
            training.repair_best(state, best_path)
    # The data source: the images, or the trunk cache where it is exact (then ``net`` runs the top only).
    # Planned after the checkpoint is loaded: the cache is keyed on the frozen part's weights as they now are.
    source = trunk_store.data_source(
        **where.trunk,
        model=model,
        bb=bb,
        manifest=manifest,
        config=config,
        fit_idx=fit_idx,
        val_idx=val_idx,
        sampler=sampler,
        local_batch=local_batch,
        eval_batch=eval_batch,
        workers=workers,
        device=device,
        ctx=ctx,
        progress=progress,
        train_mode=lambda m: train_mode(m, config["freeze_bn_stats"]),
        val_images=eval_loaders.get("val"),
    )
    metrics["trunk_cache"] = source.record
    net = source.net
    if source.cached:
        train_loader, eval_loaders = source.train_loader, source.eval_loaders

    live = EpochLog(where.tensorboard, run_dir.name, start_epoch)
    if start_epoch == 1:  # the starting point, before any step (e.g. the init-head's accuracy)
        row = {"epoch": 0}
        for name, loader in eval_loaders.items():
            row.update(training.evaluate(net, loader, device, precision, name, spec, ctx))
        metrics["history"] = [row]
        live.on_epoch(row)
    if ctx.is_main:
        runs.write_metrics(target, metrics)
    # Frozen parameters have requires_grad False, so DDP leaves them out. Every trainable parameter
    # (head, unfrozen stages) takes part in every forward, so unused-parameter detection would only
    # add a walk over the autograd graph per step: off.
    forward = net
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            net, device_ids=[ctx.local_rank] if device.startswith("cuda") else None, find_unused_parameters=False
        )

    with runs.recording(target, metrics) if ctx.is_main else contextlib.nullcontext():
        for epoch in range(start_epoch, config["epochs"] + 1):
            training.seed_epoch(seed, epoch)
            sampler.set_epoch(epoch)
            row = training.train_epoch(
                model,
                train_loader,
                opt,
                scheduler,
                scaler,
                config,
                device,
                precision,
                epoch,
                len(fit_set),
                spec,
                progress,
                forward=forward,
                sampler=sampler if ctx.active else None,
                ctx=ctx,
            )
            if not math.isfinite(row["train_loss"]):
                metrics["diverged_at_epoch"] = epoch
                raise DivergedError(
                    f"training diverged: the loss became {row['train_loss']} in epoch {epoch}; "
                    f"checkpoints/last.pt keeps epoch {epoch - 1}",
                    "lower --lr and start again with --force (or --resume --force from the last good epoch)",
                )
            for name, loader in eval_loaders.items():
                row.update(training.evaluate(net, loader, device, precision, name, spec, ctx))
            metrics["history"].append(row)
            live.on_epoch({**row, "lr": [g["lr"] for g in opt.param_groups]})
            score = (row[f"{select}_acc"], -row[f"{select}_loss"])  # ties (small splits) go to the lower loss
            improved = best is None or score > (best["acc"], -best["loss"])
            if improved:
                best = {"epoch": epoch, "acc": score[0], "loss": -score[1]}
            if not ctx.is_main:
                continue
            # last.pt first: it names the best epoch, and holds that epoch's weights whenever best.pt
            # may lag behind it (a kill between the two writes), so _repair_best can always mend it.
            runs.save_checkpoint(
                last_path,
                training.checkpoint_state(
                    model, opt, scheduler, scaler, epoch=epoch, config=config, best=best, history=metrics["history"]
                ),
            )
            if improved:
                runs.save_checkpoint(best_path, {"model": model.state_dict(), "epoch": epoch, "config": config})
            runs.write_metrics(target, metrics)
        if ctx.is_main:
            kept = training.best_weights(best, last_path, best_path, model)
            runs.save_checkpoint(target / MODEL_FILE, kept)
            model.load_state_dict(kept)  # the kept model's test predictions
        distributed.broadcast_module(model, ctx)  # ... on every rank, each scoring its shard
        net.eval()
        tta = feature_views.options(spec)["tta"]
        penultimate = []  # the head's inputs while scoring: the test split's features, for the feature map
        hook = model.head.register_forward_pre_hook(lambda _, args: penultimate.append(args[0].detach().float().cpu()))
        scored = score_batches(
            lambda x: feature_views.view_mean(net, x, tta).float().softmax(1),
            eval_loaders["test"],
            test_set.records,
            device,
            precision,
            spec,
        )
        hook.remove()
        if tta != "none":  # each batch ran as [images, mirrors]: one row per image, the mean of its two views
            penultimate = [(rows[: len(rows) // 2] + rows[len(rows) // 2 :]) / 2 for rows in penultimate]
        penultimate = distributed.gather_rows(
            torch.cat(penultimate) if penultimate else torch.zeros(0, model.head.in_features), ctx
        )
        scored = _gather_scores(scored, manifest.num_classes, ctx)
        if ctx.is_main:
            runs.write_predictions(target, *scored, "probability")
            embeddings.save_penultimate(target, penultimate.numpy(), scored[1], scored[0])
    chosen = next((r for r in metrics["history"] if r["epoch"] == (best or {}).get("epoch")), metrics["history"][-1])
    last = metrics["history"][-1]
    selected_on = "validation" if select == "val" else "test"
    metrics["final"] = {
        **{
            k: chosen.get(k)
            for k in ("train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "val_loss", "val_acc")
        },
        "best_epoch": chosen["epoch"],
        "selected_by": "validation split of train"
        if select == "val"
        else "test accuracy (as the study did: optimistic)",
        "selected_on": selected_on,
        # The last epoch's numbers beside the kept epoch's: for a model kept by test accuracy, the honest one.
        "last_epoch": {k: last.get(k) for k in ("epoch", "test_loss", "test_acc", "test_top5")},
    }
    metrics["selection"] = {
        "selected_on": selected_on,
        "by": metrics["final"]["selected_by"],
        "chosen": {"best_epoch": chosen["epoch"]},
    }
    if select == "val" and config["init_head"]:
        metrics["final"]["note"] = (
            "the --init-head run was trained on all of train, validation images included: val metrics are optimistic"
        )
    live.on_end(config, metrics["final"])
    return metrics


def _gather_scores(scored, num_classes: int, ctx):
    """Rank 0: (ids, labels, scores) of every rank's test shard, in shard order (the whole split once)."""
    if not ctx.active:
        return scored
    ids, labels, scores = scored
    parts = [
        distributed.gather_rows(torch.as_tensor(np.asarray(a)), ctx)
        for a in (ids, labels, np.asarray(scores, dtype=np.float64).reshape(len(ids), num_classes))
    ]
    return tuple(p.numpy() for p in parts) if ctx.is_main else scored
