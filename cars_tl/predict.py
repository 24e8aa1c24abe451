"""``predict``: top-k classes for images, from one or more runs side by side.

Finetune and train-head runs give softmax probabilities; a fit-svm run gives its decision
scores (one-vs-rest shaped), labelled as such: they are not probabilities.

Each run sees the images preprocessed as it was trained (resize mode, size, crop, margin,
precision: see :mod:`cars_tl.inference`). An image file has no box: a ``--crop box`` run refuses
it unless ``boxed`` says the files already are box crops.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cars_tl import data
from cars_tl.errors import CarsTLError
from cars_tl.inference import load_run


def predict(images: list[Path], run_dirs: list[Path], top_k: int = 5, boxed: bool = False) -> list[dict]:
    """One entry per image: ``{"image", "predictions": {run name: {kind, score_kind, top: [...]}}}``."""
    if not run_dirs:
        raise CarsTLError("no --model given", "pass --model artifacts/runs/<name> (repeatable)")
    if top_k < 1:
        raise CarsTLError(f"--top-k must be positive, got {top_k}")
    for image in images:
        if not Path(image).is_file():
            raise CarsTLError(f"image {image} does not exist", "check the path")
    cache: dict = {}
    models = [load_run(Path(r), cache) for r in run_dirs]
    pictures = [data.open_image(Path(p)) for p in images]  # BadImageError names a non-image file
    results = [{"image": str(p), "predictions": {}} for p in images]
    features_memo: dict[tuple, torch.Tensor] = {}
    with torch.inference_mode():
        for m in models:
            key = m.preprocessing_key()
            if key not in features_memo:  # runs sharing a backbone and its preprocessing share features
                features_memo[key] = m.embed(torch.stack([m.tensor(p, boxed=boxed) for p in pictures]))
            scores = m.score(features_memo[key])
            # An SVM scores only the classes it saw (the rest are -inf): never list those.
            k = min(top_k, int(torch.isfinite(scores).sum(1).min()))
            values, indices = scores.topk(k, dim=1)
            for i, result in enumerate(results):
                label = m.name if m.name not in result["predictions"] else str(m.run_dir)
                result["predictions"][label] = {
                    "kind": m.kind, "run_dir": str(m.run_dir), "score_kind": m.score_kind, "precision": m.precision_used,
                    "top": [{"label": int(j), "class": m.class_names[int(j)], "score": round(float(v), 6)}
                            for v, j in zip(values[i], indices[i])],
                }
    return results
