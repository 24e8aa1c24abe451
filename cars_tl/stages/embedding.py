"""``inspect FILE --embedding OUT.png``: the 2-D feature map of a feature cache or a fine-tuned run.

The map is computed once per source and stored beside it (:mod:`cars_tl.models.feature_map`);
this stage draws it, with thumbnails from the dataset when ``data_dir`` holds it.
"""

from __future__ import annotations

from pathlib import Path

from cars_tl.core.errors import check_output_path
from cars_tl.models import feature_map


def embedding_picture(
    path: Path, *, out: Path, split: str = "test", data_dir: Path | None = Path("data"), seed: int = 0
) -> dict:
    """Write the map of ``path``'s ``split`` to ``out``; returns the figures and whether the stored map was reused."""
    check_output_path(Path(out), "file", "--embedding", "map.png")  # before the map, which takes minutes
    result = feature_map.load_map(Path(path), split, seed)
    feature_map.plot(result, Path(out), images=feature_map.image_paths(data_dir))
    return {
        "png": str(out),
        "map_file": result["map_file"],
        "reused": result["reused"],
        "images": len(result["coords"]),
        "makes": len(result["make_names"]),
        "knn_map": result["knn_map"],
        "knn_full": result["knn_full"],
        "seconds": result["seconds"],
        "thumbnails": result.get("thumbnails_placed", 0),
    }
