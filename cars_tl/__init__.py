"""cars_tl: transfer-learning experiments on Stanford Cars.

Stages exchange files on disk: a manifest (data), HDF5 feature caches (features), run directories
(runs). Library modules are quiet; only :mod:`cars_tl.cli` prints.

The public Python API is re-exported here lazily (PEP 562), so ``import cars_tl`` and
``cars-tl --help`` import no torch: each name loads its module on first use.

- ``load_manifest(data_dir)``: the dataset's manifest, checked against the devkit and the files.
- ``load_features(path)``: a feature cache, every split read and verified (arrays and metadata).
- ``load_run(run_dir)``: a run rebuilt for inference (its model, preprocessing, class names).
- ``read_metrics(run_dir)``: a run's metrics.json, validated.
- ``ImageOptions``, ``DeviceOptions``: the option records the image stages take (``image=``, ``compute=``).
- every stage as a plain function: ``prepare_dataset``, ``extract_features``, ``train_head``,
  ``fit_svm``, ``run_knn``, ``finetune``, ``build_trunk``, ``calibrate``, ``predict``, ``predict_split``,
  ``measure_sparsity``, ``build_report``, ``inspect_paths``, ``track``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "load_manifest": ("cars_tl.data.manifest", "load_manifest"),
    "load_features": ("cars_tl.artifacts.features", "verify"),
    "load_run": ("cars_tl.models.inference", "load_run"),
    "read_metrics": ("cars_tl.artifacts.runs", "read_metrics"),
    "ImageOptions": ("cars_tl.core.options", "ImageOptions"),
    "DeviceOptions": ("cars_tl.core.options", "DeviceOptions"),
    "prepare_dataset": ("cars_tl.sources.prepare", "prepare_dataset"),
    "extract_features": ("cars_tl.stages.extract", "extract_features"),
    "train_head": ("cars_tl.stages.train_head", "train_head"),
    "fit_svm": ("cars_tl.stages.fit_svm", "fit_svm"),
    "run_knn": ("cars_tl.stages.knn", "run_knn"),
    "finetune": ("cars_tl.stages.finetune", "finetune"),
    "build_trunk": ("cars_tl.stages.trunk_cache", "build_trunk"),
    "calibrate": ("cars_tl.stages.calibrate", "calibrate"),
    "predict": ("cars_tl.stages.predict", "predict"),
    "predict_split": ("cars_tl.stages.predict", "predict_split"),
    "measure_sparsity": ("cars_tl.stages.sparsity", "measure"),
    "build_report": ("cars_tl.report.build", "build_report"),
    "inspect_paths": ("cars_tl.stages.inspect", "inspect_paths"),
    "track": ("cars_tl.report.track", "track"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'cars_tl' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
