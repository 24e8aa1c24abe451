"""Stanford Cars on disk and in batches: the data layer (imports only :mod:`cars_tl.core`).

:mod:`~cars_tl.data.devkit` (torchvision's layout and the devkit's .mat files),
:mod:`~cars_tl.data.manifest` (the validated, fingerprinted manifest every stage reads),
:mod:`~cars_tl.data.label_conflicts` (its identical images: duplicates, label conflicts),
:mod:`~cars_tl.data.images` (decoding), :mod:`~cars_tl.data.dataset` (the Dataset and its
collation), :mod:`~cars_tl.data.transforms` (pixels to tensors) and :mod:`~cars_tl.data.loaders`
(batches).
"""
