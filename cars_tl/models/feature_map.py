"""The feature space as a picture: a seeded 2-D map (PCA to 50 dimensions, then scikit-learn's t-SNE)
of one split's features, coloured by make, with a few thumbnails, and the make-level separation as
numbers so that the picture does not mislead.

Sources: a feature cache's split (frozen features: models B, C, kNN), or a fine-tuned run's
``penultimate-test.npz`` (models A, D; :mod:`cars_tl.artifacts.embeddings`). A map is stored beside its
source, keyed by the source's SHA-256 and the settings, and reused until either changes.

The numbers: make-level leave-one-out k-nearest-neighbour accuracy (k = 10, majority vote of the
neighbours' makes, the image itself and its exact duplicates left out) in the 2-D map and in the full feature space (features
L2-normalised: cosine geometry, as the kNN stage uses). t-SNE keeps neighbourhoods, not distances:
the two numbers say how much of the full space's make structure the picture shows.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cars_tl.artifacts import embeddings, features, runs
from cars_tl.core.atomic import atomic_path, file_sha256
from cars_tl.core.errors import CarsTLError, parse_json
from cars_tl.data import manifest as manifests

PCA_DIMS = 50
PERPLEXITY = 30.0
KNN_K = 10
THUMBNAILS = 8
SETTINGS_VERSION = 2  # 2: leave-one-out leaves the image's exact duplicates out too


def make_of(class_name: str) -> str:
    """The make is the first word of a Stanford Cars class name (the report's rule, ``report.analysis.make_of``)."""
    return str(class_name).split()[0] if str(class_name).split() else str(class_name)


def settings(seed: int) -> dict:
    return {
        "method": "pca+tsne",
        "version": SETTINGS_VERSION,
        "seed": int(seed),
        "pca_dims": PCA_DIMS,
        "perplexity": PERPLEXITY,
        "knn_k": KNN_K,
    }


def duplicate_ids(x: np.ndarray) -> np.ndarray:
    """One id per distinct row of ``x``: rows with equal ids are exact duplicates (the same image twice)."""
    return np.unique(np.asarray(x), axis=0, return_inverse=True)[1].reshape(-1)


def knn_accuracy(x: np.ndarray, groups: np.ndarray, k: int = KNN_K, same: np.ndarray | None = None) -> float:
    """Leave-one-out k-NN accuracy (%) of ``groups`` on the rows of ``x`` (euclidean).

    Left out with the row: every row with its ``same`` id (default: its exact duplicates in ``x``),
    since a duplicate at distance 0 would vote for the row's own group. NaN when no row has another
    to vote (fewer than two distinct rows); k shrinks to what the largest set of duplicates leaves."""
    from sklearn.neighbors import NearestNeighbors

    n = len(x)
    same = duplicate_ids(x) if same is None else np.asarray(same).reshape(-1)
    largest = int(np.bincount(same).max()) if n else 0
    if n < 2 or largest >= n:
        return float("nan")
    k = min(k, n - largest)
    # The row's duplicates are among its nearest (at most `largest` of them): k + largest neighbours
    # always hold k others.
    _, idx = NearestNeighbors(n_neighbors=min(n, k + largest)).fit(x).kneighbors(x)
    other = same[idx] != same[:, None]
    voters = other & (np.cumsum(other, axis=1) <= k)
    n_groups = int(groups.max()) + 1
    counts = np.zeros((n, n_groups), np.int64)
    rows = np.broadcast_to(np.arange(n)[:, None], idx.shape)
    np.add.at(counts, (rows[voters], groups[idx][voters]), 1)
    return float(100.0 * (counts.argmax(1) == groups).mean())


def compute(x: np.ndarray, makes: np.ndarray, seed: int = 0) -> dict:
    """The 2-D map of the rows of ``x`` and the make-level kNN accuracies: {coords, knn_map, knn_full, seconds}."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    started = time.perf_counter()
    x = np.asarray(x, dtype=np.float32)
    same = duplicate_ids(x)  # on the features: duplicates need not land on one point of the map
    if len(x) < 5:
        raise CarsTLError(f"a feature map needs at least 5 images, this split has {len(x)}")
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    dims = min(PCA_DIMS, x.shape[1], len(x) - 1)
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(x)
    perplexity = min(PERPLEXITY, (len(x) - 1) / 3)
    coords = TSNE(
        n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed
    ).fit_transform(reduced)
    return {
        "coords": coords.astype(np.float32),
        "knn_map": knn_accuracy(coords, makes, same=same),
        "knn_full": knn_accuracy(x, makes, same=same),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _make_ids(labels: np.ndarray, class_names: list[str]) -> tuple[np.ndarray, list[str]]:
    names = sorted({make_of(n) for n in class_names})
    index = {m: i for i, m in enumerate(names)}
    return np.array([index[make_of(class_names[int(label)])] for label in labels], dtype=np.int64), names


def source_of(path: Path, split: str = "test") -> dict:
    """What a map is made from: ``path`` is a feature cache (.h5), a run directory (a finetune run's
    penultimate features; a feature run's cache), or a ``penultimate-*.npz``."""

    path = Path(path)
    if path.is_dir():
        m = runs.read_metrics(path)
        if m["kind"] == "finetune":
            file = embeddings.penultimate_path(path, "test")
            if not file.is_file():
                raise CarsTLError(
                    f"{path} has no {file.name}: it was fine-tuned before penultimate features were saved",
                    f"rerun it: cars-tl finetune ... --force --out {path}",
                )
            if split != "test":
                raise CarsTLError(
                    f"a fine-tuned run keeps its test split's features only, not {split!r}", "use --split test"
                )
            return {"file": file, "kind": "penultimate", "class_names": m["class_names"]}
        cache = ((m.get("inputs") or {}).get("features") or {}).get("path")
        if not cache or not Path(cache).is_file():
            raise CarsTLError(f"{path}: its feature cache {cache} is not there", "pass the .h5 file itself")
        path = Path(cache)
    if path.suffix == ".npz":
        return {"file": path, "kind": "penultimate", "class_names": None}
    if path.suffix not in (".h5", ".hdf5"):
        raise CarsTLError(f"{path}: not a feature cache (.h5), a run directory or a penultimate-*.npz")
    return {"file": path, "kind": "cache", "class_names": None}


def load_map(path: Path, split: str = "test", seed: int = 0, class_names: list[str] | None = None) -> dict:
    """The stored map of ``path``'s split, computed (and stored beside it) when absent or stale.

    Returns coords, labels, ids, knn_map, knn_full, seconds, class_names, makes, reused, map_file."""
    src = source_of(path, split)
    file = src["file"]
    digest = file_sha256(file)
    wanted = settings(seed)
    map_file = embeddings.map_path(file, split)
    stored = embeddings.load_map(map_file)
    if src["kind"] == "cache":
        attrs = features.read_attrs(file)
        names = list(attrs["class_names"])
    else:
        names = src["class_names"] or class_names
        if names is None:
            metrics_file = file.parent / "metrics.json"
            if metrics_file.is_file():
                recorded = parse_json(metrics_file.read_text(), str(metrics_file), "pass the run directory instead")
                names = recorded.get("class_names") if isinstance(recorded, dict) else None
        if names is None:
            raise CarsTLError(f"{file}: no class names beside it (no metrics.json)", "pass the run directory instead")
    reused = bool(stored and stored["source_sha256"] == digest and stored["settings"] == wanted)
    if not reused:
        if src["kind"] == "cache":
            arrays = features.load(file, (split,)).split(split)
            x, labels, ids = arrays.features, arrays.labels, arrays.ids
        else:
            z = embeddings.load_penultimate(file)
            x, labels, ids = z["features"], z["labels"], z["ids"]
        bad = int((~np.isfinite(x).all(axis=1)).sum()) if x.ndim == 2 else 0
        if bad:  # PCA and t-SNE take no NaN or inf
            raise CarsTLError(
                f"{file}: {bad} of {len(x)} rows of the {split} split's features are not finite (NaN or inf)",
                f"extract them again: rm {file}; cars-tl extract-features ... --out {file}"
                if src["kind"] == "cache"
                else f"fine-tune that run again: cars-tl finetune ... --force --out {file.parent}",
            )
        makes, _ = _make_ids(labels, names)
        result = compute(x, makes, seed)
        embeddings.save_map(
            map_file,
            result["coords"],
            labels,
            ids,
            digest,
            wanted,
            result["knn_map"],
            result["knn_full"],
            result["seconds"],
        )
        stored = embeddings.load_map(map_file)
    makes, make_names = _make_ids(stored["labels"], names)
    return {
        **stored,
        "class_names": names,
        "makes": makes,
        "make_names": make_names,
        "reused": reused,
        "map_file": str(map_file),
        "source": str(file),
        "split": split,
    }


def _spread(coords: np.ndarray, count: int, seed: int) -> list[int]:
    """``count`` rows far apart on the map (farthest-point sampling from a seeded start)."""
    if len(coords) == 0:
        return []
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(coords)))]
    distance = np.linalg.norm(coords - coords[chosen[0]], axis=1)
    while len(chosen) < min(count, len(coords)):
        nxt = int(distance.argmax())
        chosen.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(coords - coords[nxt], axis=1))
    return chosen


def plot(
    result: dict, out: Path, title: str = "", images: dict[int, Path] | None = None, thumbnails: int = THUMBNAILS
) -> Path:
    """The map as a PNG: one colour per make, a legend, ``thumbnails`` images placed on their points
    (from ``images``: manifest id -> image file), the kNN figures in the corner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    coords, makes, names = result["coords"], result["makes"], result["make_names"]
    palette = [plt.get_cmap(c)(i) for c in ("tab20", "tab20b", "tab20c") for i in range(20)]
    fig, ax = plt.subplots(figsize=(11, 8), dpi=90)
    size = float(np.clip(20000 / max(len(coords), 1), 4, 30))  # a few thousand points: small dots; a demo: visible ones
    for i, name in enumerate(names):
        rows = makes == i
        if rows.any():
            ax.scatter(
                coords[rows, 0],
                coords[rows, 1],
                s=size,
                color=palette[i % len(palette)],
                label=name,
                alpha=0.8,
                linewidths=0,
            )
    placed = 0
    for row in _spread(coords, thumbnails, result.get("settings", {}).get("seed", 0)) if images else []:
        path = images.get(int(result["ids"][row]))
        if path is None:
            continue
        try:
            from PIL import Image

            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((64, 64))
                ax.add_artist(
                    AnnotationBbox(OffsetImage(np.asarray(im), zoom=0.8), coords[row], frameon=True, pad=0.15)
                )
                placed += 1
        except OSError:
            continue
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(
        title or f"{Path(result['source']).name}: {result['split']} features by make (PCA {PCA_DIMS} → t-SNE)",
        fontsize=10,
    )
    ax.text(
        0.01,
        0.01,
        f"make-level {KNN_K}-NN accuracy (leave-one-out): 2-D map {result['knn_map']:.1f}% · "
        f"full space {result['knn_full']:.1f}%   ({len(coords)} images, seed {result['settings']['seed']})",
        transform=ax.transAxes,
        fontsize=8,
        va="bottom",
        bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"),
    )
    ax.legend(
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=6,
        markerscale=2,
        ncol=2 if len(names) > 25 else 1,
        frameon=False,
        title="make",
        title_fontsize=7,
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    result["thumbnails_placed"] = placed
    return out


def image_paths(data_dir: Path | None) -> dict[int, Path]:
    """Manifest id -> image file, for the thumbnails (empty without a readable manifest)."""
    if data_dir is None:
        return {}

    try:
        manifest = manifests.load_manifest(Path(data_dir), check_files=False)
    except CarsTLError:
        return {}
    return {r.index: manifest.root / r.path for r in manifest.records}
