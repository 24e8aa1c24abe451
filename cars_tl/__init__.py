"""cars_tl: transfer-learning experiments on Stanford Cars.

Stages exchange files on disk: a manifest (data), HDF5 feature caches (features), run directories
(runs). Library modules are quiet; only :mod:`cars_tl.cli` prints.
"""

__version__ = "0.1.0"
