"""The on-disk formats between stages, one owner each: feature caches, run directories, predictions."""
