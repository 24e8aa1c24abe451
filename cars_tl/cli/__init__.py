"""The ``cars-tl`` command line: one module per command (mirroring ``stages/``), each one keyword call
into the library; shared options are declared once in :mod:`cars_tl.cli.options`, what commands print
beyond one line in :mod:`cars_tl.cli.tables`.

Importing a command module registers it on :data:`app`, in the order ``--help`` lists them.
"""

from cars_tl.cli.app import _error, app

from cars_tl.cli import (  # noqa: E402, F401  isort: skip
    download,
    extract,
    train_head,
    fit_svm,
    finetune,
    calibrate,
    build_trunk,
    predict,
    sparsity,
    report,
    knn,
    paths,
    inspect,
    track,
)

__all__ = ["app", "_error"]
