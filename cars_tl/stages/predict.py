"""``predict``: top-k classes for images, from one or more runs side by side.

Finetune and train-head runs give softmax probabilities; a fit-svm run gives its decision
scores (one-vs-rest shaped), labelled as such: they are not probabilities.

Each run sees the images preprocessed as it was trained (resize mode, size, crop, margin,
precision: see :mod:`cars_tl.models.inference`). An image file has no box: a ``--crop box`` run refuses
it unless ``boxed`` says the files already are box crops.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cars_tl.artifacts import runs
from cars_tl.core import locks
from cars_tl.core.errors import CarsTLError
from cars_tl.core.locks import reads
from cars_tl.core.options import check_workers
from cars_tl.core.progress import NULL
from cars_tl.data import devkit, loaders
from cars_tl.data import manifest as manifests
from cars_tl.data.images import open_image
from cars_tl.models import knn
from cars_tl.models.inference import cached_split, load_run
from cars_tl.models.training import score_batches


@reads("predict", lambda a: manifests.dataset_roots(a["images"]))  # images of a data folder: no download meanwhile
def predict(images: list[Path], *, run_dirs: list[Path], top_k: int = 5, boxed: bool = False) -> list[dict]:
    """One entry per image: ``{"image", "predictions": {run name: {kind, score_kind, top: [...]}}}``."""
    if not run_dirs:
        raise CarsTLError("no --model given", "pass --model artifacts/runs/<name> (repeatable)")
    if not images:
        run = run_dirs[0]
        raise CarsTLError(
            "predict needs image files or --split, and got neither",
            f"cars-tl predict --model {run} IMAGE [IMAGE ...]   or   cars-tl predict --model {run} --split test",
        )
    if top_k < 1:
        raise CarsTLError(f"--top-k must be positive, got {top_k}")
    for image in images:
        if Path(image).is_dir():
            raise CarsTLError(
                f"image {image} is a folder; predict takes image files",
                f"pass the files inside it: cars-tl predict --model {run_dirs[0]} {Path(image) / '*.jpg'}",
            )
        if not Path(image).is_file():
            raise CarsTLError(f"image {image} does not exist", "check the path")
    cache: dict = {}
    models = [load_run(Path(r), cache) for r in run_dirs]
    pictures = [open_image(Path(p)) for p in images]  # BadImageError names a non-image file
    results = [{"image": str(p), "predictions": {}} for p in images]
    features_memo: dict[tuple, torch.Tensor] = {}
    with torch.inference_mode():
        for m in models:
            key = m.preprocessing_key()
            if m.forward is not None:  # a finetune run scores as its evaluation did, whole under its autocast
                scores = m.scores(torch.stack([m.tensor(p, boxed=boxed) for p in pictures]))
            else:
                if key not in features_memo:  # runs sharing a backbone and its preprocessing share features
                    features_memo[key] = m.embed(torch.stack([m.tensor(p, boxed=boxed) for p in pictures]))
                scores = m.score(features_memo[key])
            # An SVM scores only the classes it saw (the rest are -inf): never list those.
            k = min(top_k, int(torch.isfinite(scores).sum(1).min()))
            indices, values = runs.top_predictions(scores.numpy(), k)  # ties ranked as the saved predictions rank them
            for i, result in enumerate(results):
                label = m.name if m.name not in result["predictions"] else str(m.run_dir)
                result["predictions"][label] = {
                    "kind": m.kind,
                    "run_dir": str(m.run_dir),
                    "score_kind": m.score_kind,
                    "precision": m.precision_used,
                    "top": [
                        {"label": int(j), "class": m.class_names[int(j)], "score": round(float(v), 6)}
                        for v, j in zip(values[i], indices[i])
                    ],
                }
    return results


@reads("predict", lambda a: [devkit.stanford_root(a["data_dir"])])
def predict_split(
    run_dirs: list[Path],
    *,
    split: str,
    data_dir: Path,
    progress=NULL,
    images=(),
    batch_size: int = 64,
    workers: int | None = None,
) -> list[dict]:
    """Score every image of ``split`` with each run and save its ``predictions-<split>.npz`` (see :mod:`cars_tl.artifacts.runs`).

    The scores are the run's own: a train-head, fit-svm or knn run is scored from the feature cache
    it was made from (checked against the checksums the run recorded; a knn run votes again with its
    first ``k``), a finetune run from the images with its own model, precision and evaluation batch
    size, as its evaluation ran.
    """

    if images:
        raise CarsTLError(
            "give either image files or --split, not both", f"cars-tl predict --split {split} --model RUN"
        )
    if not run_dirs:
        raise CarsTLError("no --model given", "pass --model artifacts/runs/<name> (repeatable)")
    manifest = manifests.load_manifest(data_dir)
    manifest.split(split)  # validates the name
    workers = loaders.default_workers() if workers is None else check_workers(workers)  # no DeviceOptions: no device
    saved, cache = [], {}
    for run_dir in map(Path, run_dirs):
        metrics = runs.read_metrics(run_dir)
        # A knn run keeps no model for new images, but its cache reproduces its votes.
        m = None if metrics.get("kind") == "knn" else load_run(run_dir, cache)
        name, score_kind = (m.name, m.score_kind) if m else (metrics["name"], runs.RUN_KINDS["knn"].score_kind)
        recorded = (metrics.get("inputs") or {}).get("dataset_fingerprint")
        if recorded != manifest.fingerprint:
            raise CarsTLError(
                f"{run_dir} was trained on another dataset than {manifest.root} (fingerprint {str(recorded)[:12]} != {manifest.fingerprint[:12]})",
                "pass the --data-dir the run was made from",
            )
        with (
            locks.writer_lock(run_dir, "predict"),
            progress.task(f"predict {name}", total=len(manifest.split(split)), unit="img") as task,
        ):
            if m is None:
                arrays, scores = _knn_votes(run_dir, metrics, split, data_dir)
                ids, labels = arrays.ids, arrays.labels
                task.advance(len(ids))
            elif m.forward is None:  # head, SVM: the features the run was trained on
                arrays = cached_split(run_dir, metrics, split, data_dir)
                ids, labels = arrays.ids, arrays.labels
                with torch.inference_mode():
                    scores = m.score(torch.from_numpy(arrays.features)).double().numpy()
                task.advance(len(ids))
            else:
                ids, labels, scores = _score_images(m, metrics, manifest, split, workers, task)
            # An SVM's scores rank its own predict first (SVMModel.ranking_scores), as fit-svm saves them.
            path = runs.write_predictions(run_dir, ids, labels, scores, score_kind, split=split)
        accuracy = runs.read_predictions(run_dir, split).accuracy()
        saved.append(
            {
                "run": str(run_dir),
                "file": str(path),
                "count": len(ids),
                "accuracy": accuracy if accuracy is not None else float("nan"),
            }
        )
    return saved


def _knn_votes(run_dir: Path, metrics: dict, split: str, data_dir: Path):
    """A knn run's ``split`` arrays and vote shares, voted again from its cache as ``knn`` did."""
    train = cached_split(run_dir, metrics, "train", data_dir)
    arrays = cached_split(run_dir, metrics, split, data_dir)
    config = metrics["config"]
    k = int(config["k"][0])  # the run's predictions are its first k's
    votes = knn.knn_scores(
        train.features,
        train.labels,
        arrays.features,
        (k,),
        float(config["temperature"]),
        len(metrics["class_names"]),
        chunk=int(config.get("chunk") or knn.CHUNK),
    )[k]
    return arrays, knn.vote_shares(votes)


def _score_images(m, metrics: dict, manifest, split: str, workers: int, task):
    """A finetune run's (ids, labels, scores) on ``split``: its whole model (no BatchNorm folding),
    its precision and its evaluation batch size, as finetune scored its test split."""

    per_rank = (metrics.get("distributed") or {}).get("per_rank_batch") or metrics["config"]["batch_size"]
    dataset = loaders.eval_dataset(manifest, split, m.spec, "cpu", m.crop, m.margin)
    loader = loaders.eval_loader(dataset, range(len(dataset)), per_rank * 2, workers, "cpu", m.spec)
    return score_batches(m.forward, loader, dataset.records, "cpu", m.precision_used, m.spec, progress=task)
