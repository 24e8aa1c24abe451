"""``knn``: weighted k-nearest-neighbour classification on cached features (DINO / VISSL protocol).

Every feature vector is scaled to unit length, so a matrix product gives cosine similarities. For
each test image the ``k`` most similar training images vote for their class with weight
``exp(similarity / T)``; the class with the largest summed weight wins. (Wu et al. 2018, as used by
DINO's ``eval_knn.py``: k = 20, T = 0.07 by default.) The weights are computed as
``exp((similarity - top similarity) / T)``, the same up to one factor per test image (which cancels in
the vote and in the shares), so any positive T works: at T = 0.01 the plain exponent overflows float32.
The exponent is taken in float64, where every positive Python float stays positive (float32 rounds a
T below about 1.4e-45 to 0, and 0 / 0 = NaN would outvote everything). Nothing is trained, so the result is a
property of the features alone: a quick, hyperparameter-light check of a backbone's features.

Several ``k`` cost one pass: the largest ``k`` neighbours are found once per chunk of test images
and each ``k`` uses its first ``k``. Test images go through in chunks of ``chunk`` rows, so memory
is bounded by the two feature matrices plus ``chunk x n_train`` similarities, whatever the split sizes.

The run directory (``runs`` format, kind ``knn``) has no model file: its ``final`` metrics are those
of the first ``k`` asked for (never chosen on test), every ``k`` is in ``k_results``, and the first
``k``'s predictions are in ``predictions-test.npz`` (scores: each class's share of the votes).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cars_tl.artifacts import names, run_config, runs
from cars_tl.artifacts.features import feature_run_fields, load_train_test
from cars_tl.core import runtime
from cars_tl.core.errors import CarsTLError, check_number
from cars_tl.core.progress import NULL, Progress
from cars_tl.models.knn import CHUNK, DEFAULT_K, DEFAULT_TEMPERATURE, knn_scores, vote_shares


def parse_ks(values: list[str] | tuple | None) -> tuple[int, ...]:
    """``--k 10 --k 20`` or ``--k 10,20`` -> (10, 20), in the order given, duplicates dropped."""
    out: list[int] = []
    for value in values or ():
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                k = int(part)
            except ValueError:
                raise CarsTLError(f"--k {part!r} is not a whole number", "e.g. --k 20 or --k 10,20,50") from None
            if k < 1:
                raise CarsTLError(f"--k must be at least 1, got {k}", "e.g. --k 20 or --k 10,20,50")
            if k not in out:
                out.append(k)
    return tuple(out) or DEFAULT_K


def _metrics_of(votes: np.ndarray, labels: np.ndarray) -> dict:
    if not len(labels):
        return {"test_acc": None, "test_top5": None}
    top = np.argsort(-votes, axis=1, kind="stable")[:, :5]
    return {
        "test_acc": round(100.0 * float((top[:, 0] == labels).mean()), 4),
        "test_top5": round(100.0 * float((top == labels[:, None]).any(axis=1).mean()), 4),
    }


@run_config.recorded("knn", names={"features_path": "features", "ks": "k"})
def run_knn(
    features_path: Path,
    *,
    ks: tuple[int, ...] = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    force: bool = False,
    out: Path | None = None,
    artifacts: Path = Path("artifacts"),
    progress: Progress = NULL,
) -> tuple[Path, dict]:
    """Classify the test split by its nearest training images; returns the run directory and metrics."""

    started = time.perf_counter()
    ks = parse_ks(ks)
    check_number(
        "--temperature",
        temperature,
        minimum=0,
        exclusive_minimum=True,
        hint=f"e.g. --temperature {DEFAULT_TEMPERATURE}",
    )
    cache = load_train_test(Path(features_path), stage="knn")  # also refuses NaN/Inf features and an empty test split
    tr, te = cache.split("train"), cache.split("test")
    if max(ks) > len(tr.labels):
        raise CarsTLError(
            f"--k {max(ks)} is larger than the train split of {features_path} ({len(tr.labels)} images)",
            f"use --k {min(DEFAULT_K[0], len(tr.labels))} or any value up to {len(tr.labels)}",
        )
    run_dir = runs.resolve_run_dir(out, names.knn_run_name(cache.attrs["backbone"], cache.attrs["weights"]), artifacts)
    with runs.writing_run(run_dir, "knn", force=force) as target:
        config = {"k": list(ks), "temperature": temperature, "features": str(features_path), "chunk": CHUNK}
        fields = feature_run_fields(cache)
        votes = knn_scores(tr.features, tr.labels, te.features, ks, temperature, cache.num_classes, progress=progress)
        k_results = {str(k): {"k": k, **_metrics_of(votes[k], te.labels)} for k in ks}
        first = ks[0]
        metrics = runs.new_metrics(
            "knn",
            run_dir.name,
            config,
            **fields,
            params={"total": fields["backbone"]["params"] or 0, "trainable": 0},
            device="cpu",
            device_name=runtime.device_name("cpu"),
            model_file=None,
            k_results=k_results,
            final={
                **k_results[str(first)],
                "train_acc": None,
                "train_loss": None,
                "test_loss": None,
                "best_epoch": None,
                "k": first,
                "selected_by": "the first --k given (never chosen on test)",
            },
        )
        runs.write_predictions(target, te.ids, te.labels, vote_shares(votes[first]), "vote share")
        metrics = runs.finish(target, metrics, started)
    return run_dir, metrics
