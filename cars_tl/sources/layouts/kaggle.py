"""The Kaggle copy: ``cars_train/cars_train/``, ``cars_test/cars_test/``, ``car_devkit/devkit/``; no test labels
(``--test-labels FILE``, or the file anywhere in the source); its ``cars_annos.mat`` belongs to the all-in-one
release and is ignored. Found and imported by the torchvision layout's code, which tells the two apart."""

from __future__ import annotations

from pathlib import Path

from cars_tl.sources.layouts.base import Layout
from cars_tl.sources.layouts.torchvision import devkit_parts, import_devkit_folders


def _detect(folder: Path) -> bool:
    parts = devkit_parts(folder)
    return parts is not None and parts["layout"] == "kaggle"


LAYOUT = Layout(
    "kaggle",
    "cars_train/cars_train/, cars_test/cars_test/, car_devkit/devkit/ (test labels via --test-labels FILE "
    "or cars_test_annos_withlabels.mat anywhere in the source; cars_annos.mat beside them is ignored)",
    "the Kaggle copy (cars_train/cars_train, car_devkit/devkit)",
    _detect,
    import_devkit_folders,
)
