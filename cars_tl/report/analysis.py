"""Analysis of saved test predictions (``predictions-test.npz``): per-class and make-level accuracy, the most
confused class pairs, the prediction gallery's sample of images; and the label noise of the runs' dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cars_tl.artifacts import runs
from cars_tl.data import devkit
from cars_tl.data import manifest as manifests
from cars_tl.data.label_conflicts import describe_label_conflicts

TOP_CLASSES = 10
TOP_CONFUSIONS = 5
GALLERY_SIZE = 8
GALLERY_SEED = 0


def make_of(class_name: str) -> str:
    """The make is the first word of a Stanford Cars class name (``BMW M3 Coupe 2012`` -> ``BMW``)."""
    return str(class_name).split()[0] if str(class_name).split() else str(class_name)


def per_class_accuracy(predictions: runs.Predictions, num_classes: int) -> list[dict]:
    """Per label: test images, correct top-1, accuracy in % (None for a class without test images)."""
    n = np.bincount(predictions.labels, minlength=num_classes)[:num_classes]
    correct = np.bincount(predictions.labels[predictions.correct], minlength=num_classes)[:num_classes]
    return [
        {"label": i, "n": int(n[i]), "correct": int(correct[i]), "acc": 100.0 * correct[i] / n[i] if n[i] else None}
        for i in range(num_classes)
    ]


def make_accuracy(predictions: runs.Predictions, class_names: list[str]) -> dict:
    """Top-1 accuracy, accuracy at the make level, and how many errors stay within the true make."""
    makes = np.array([make_of(c) for c in class_names], dtype=object)
    true_make, predicted_make = makes[predictions.labels], makes[predictions.top_classes[:, 0]]
    right_make = true_make == predicted_make
    wrong = ~predictions.correct
    n, errors = len(predictions.labels), int(wrong.sum())
    within = int((wrong & right_make).sum())
    return {
        "images": n,
        "top1_acc": 100.0 * float(predictions.correct.mean()) if n else None,
        "make_acc": 100.0 * float(right_make.mean()) if n else None,
        "errors": errors,
        "errors_within_make": within,
        "errors_within_make_pct": 100.0 * within / errors if errors else None,
        "makes": len(set(makes.tolist())),
    }


def confused_pairs(predictions: runs.Predictions, top: int = TOP_CONFUSIONS) -> list[dict]:
    """The most frequent (true, predicted) pairs among the errors, most frequent first (ties: lower labels)."""
    wrong = ~predictions.correct
    if not wrong.any():
        return []
    pairs = np.stack([predictions.labels[wrong], predictions.top_classes[wrong, 0]], axis=1)
    unique, counts = np.unique(pairs, axis=0, return_counts=True)
    order = np.lexsort((unique[:, 1], unique[:, 0], -counts))[:top]
    out = []
    for i in order:
        true, predicted = int(unique[i, 0]), int(unique[i, 1])
        of_true = predictions.labels == true
        example = predictions.ids[of_true & (predictions.top_classes[:, 0] == predicted)][0]
        out.append(
            {
                "true": true,
                "predicted": predicted,
                "count": int(counts[i]),
                "of": int(of_true.sum()),
                "example_id": int(example),
            }
        )
    return out


def gallery_ids(
    prediction_sets: list[runs.Predictions], size: int = GALLERY_SIZE, seed: int = GALLERY_SEED
) -> list[int]:
    """A fixed sample of test images every run scored: the same ids for the same test set and seed."""
    if not prediction_sets:
        return []
    common = prediction_sets[0].ids
    for p in prediction_sets[1:]:
        common = np.intersect1d(common, p.ids)
    common = np.unique(common)
    if len(common) <= size:
        return [int(i) for i in common]
    return sorted(int(i) for i in np.random.default_rng(seed).choice(common, size=size, replace=False))


def label_noise(data_dir: Path | None, fingerprints: set[str]) -> list[str]:
    """The runs' dataset's identical images with different labels (its manifest.json), as lines; [] when none or unknown."""
    if data_dir is None:
        return []
    try:
        meta = json.loads((devkit.stanford_root(Path(data_dir)) / manifests.MANIFEST_JSON).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(meta, dict) or (fingerprints and meta.get("fingerprint") not in fingerprints):
        return []
    return describe_label_conflicts(meta.get("label_conflicts"), limit=5)
