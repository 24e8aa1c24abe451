"""``inspect``: look inside a feature cache or a run directory without writing code.

For a cache: provenance (backbone, weights and their SHA-256, transform, dataset fingerprint,
versions, options), splits and counts, skipped images, and per split the feature statistics
(dimension, mean L2 norm, fraction of exact zeros, vectors and values that are NaN or Inf).
For a run: what ``metrics.json`` says it is, its status and final metrics, and its saved predictions.
For a data folder (or its ``stanford_cars/`` or ``manifest.json``): what the manifest records: counts,
fingerprint, origin, duplicate images and every group of identical images with different labels.
Two caches of the same images are compared image by image (cosine similarity over the ids they
share, min and mean) along with the attributes and options that differ; two runs, by config and result.

Caches are read only through :mod:`cars_tl.artifacts.features` (the HDF5 owner). Results are plain dicts
(``--json``); :func:`render_text` lays them out for people.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cars_tl.artifacts import features, runs
from cars_tl.core.errors import CarsTLError
from cars_tl.data import devkit
from cars_tl.data import manifest as manifests
from cars_tl.data.label_conflicts import describe_label_conflicts

PROVENANCE = (
    "backbone",
    "weights",
    "weights_sha256",
    "weights_digest",
    "transform",
    "crop",
    "margin",
    "precision",
    "dataset_fingerprint",
    "num_classes",
    "feature_dim",
    "backbone_params",
    "created",
    "versions",
    "options",
)


def feature_stats(x: np.ndarray) -> dict:
    """Statistics of an (N, D) feature matrix, NaN and Inf counted rather than propagated."""
    x = np.asarray(x)
    finite_rows = np.isfinite(x).all(axis=1) if x.size else np.zeros(len(x), bool)
    norms = np.linalg.norm(x[finite_rows].astype(np.float64), axis=1) if finite_rows.any() else np.zeros(0)
    return {
        "count": int(len(x)),
        "dim": int(x.shape[1]) if x.ndim == 2 else 0,
        "mean_l2_norm": float(norms.mean()) if len(norms) else None,
        "min_l2_norm": float(norms.min()) if len(norms) else None,
        "zero_fraction": float((x == 0).mean()) if x.size else None,
        "zero_vectors": int((norms == 0).sum()),
        "nan_values": int(np.isnan(x).sum()),
        "inf_values": int(np.isinf(x).sum()),
        "non_finite_vectors": int((~finite_rows).sum()),
    }


def inspect_cache(path: Path) -> dict:
    cache = features.load(Path(path), ("train", "test"))
    attrs = cache.attrs
    splits = {}
    for name, s in cache.splits.items():
        labels = s.labels
        splits[name] = {
            "count": int(len(labels)),
            "classes_present": int(len(np.unique(labels))),
            "skipped": s.skipped,
            "features": feature_stats(s.features),
        }
    return {
        "type": "feature cache",
        "path": str(path),
        "provenance": {k: attrs.get(k) for k in PROVENANCE if k in attrs},
        "class_count": len(attrs.get("class_names", [])),
        "splits": splits,
    }


def inspect_run(run_dir: Path) -> dict:
    m = runs.read_metrics(Path(run_dir))
    out = {
        "type": "run",
        "path": str(run_dir),
        "kind": m["kind"],
        "name": m.get("name"),
        "status": m.get("status"),
        "error": m.get("error"),
        "created": m.get("created"),
        "finished": m.get("finished"),
        "wall_time_s": m.get("wall_time_s"),
        "device": m.get("device"),
        "config": m.get("config"),
        "provenance": m.get("backbone"),
        "inputs": m.get("inputs"),
        "params": m.get("params"),
        "versions": m.get("versions"),
        "epochs_recorded": len([h for h in m.get("history", []) if h.get("epoch", 0) > 0]),
        "final": m.get("final"),
        "model_file": m.get("model_file"),
    }
    for extra in ("kernels", "k_results", "selection"):
        if extra in m:
            out[extra] = m[extra]
    try:
        p = runs.read_predictions(run_dir)
        out["predictions"] = {
            "file": str(runs.predictions_path(run_dir)),
            "count": int(len(p.ids)),
            "score_kind": p.score_kind,
            "top1_acc": p.accuracy(),
            "agrees_with_final": _agrees(p.accuracy(), (m.get("final") or {}).get("test_acc")),
        }
    except CarsTLError as exc:
        out["predictions"] = {"missing": exc.message}
    return out


def _agrees(a, b) -> bool | None:
    return None if a is None or b is None else abs(float(a) - float(b)) < 1e-3


def compare_caches(a: Path, b: Path) -> dict:
    ca, cb = features.load(Path(a), ("train", "test")), features.load(Path(b), ("train", "test"))
    keys = sorted(set(ca.attrs) | set(cb.attrs))
    differ = {
        k: {"a": ca.attrs.get(k), "b": cb.attrs.get(k)}
        for k in keys
        if k not in ("options", "class_names") and ca.attrs.get(k) != cb.attrs.get(k)
    }
    oa, ob = ca.attrs.get("options") or {}, cb.attrs.get("options") or {}
    options = {k: {"a": oa.get(k), "b": ob.get(k)} for k in sorted(set(oa) | set(ob)) if oa.get(k) != ob.get(k)}
    splits = {}
    for name in sorted(set(ca.splits) | set(cb.splits)):
        if name not in ca.splits or name not in cb.splits:
            splits[name] = {"only_in": "a" if name in ca.splits else "b"}
            continue
        sa, sb = ca.splits[name], cb.splits[name]
        common, ia, ib = np.intersect1d(sa.ids, sb.ids, return_indices=True)
        entry = {
            "common_images": int(len(common)),
            "only_in_a": int(len(sa.ids) - len(common)),
            "only_in_b": int(len(sb.ids) - len(common)),
        }
        if len(common):
            xa, xb = sa.features[ia].astype(np.float64), sb.features[ib].astype(np.float64)
            if xa.shape[1] != xb.shape[1]:
                entry["cosine"] = f"not comparable: dimension {xa.shape[1]} vs {xb.shape[1]}"
            else:
                denominator = np.linalg.norm(xa, axis=1) * np.linalg.norm(xb, axis=1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    cosine = (xa * xb).sum(1) / denominator
                valid = np.isfinite(cosine)
                worst = int(np.argmin(np.where(valid, cosine, np.inf))) if valid.any() else None
                entry["cosine"] = {
                    "min": float(cosine[valid].min()) if valid.any() else None,
                    "mean": float(cosine[valid].mean()) if valid.any() else None,
                    "least_similar_id": int(common[worst]) if worst is not None else None,
                    "not_comparable": int((~valid).sum()),  # NaN/Inf or zero vectors
                    "identical_vectors": int((xa == xb).all(axis=1).sum()),
                }
            entry["labels_differ"] = int((sa.labels[ia] != sb.labels[ib]).sum())
        splits[name] = entry
    return {
        "type": "cache comparison",
        "a": str(a),
        "b": str(b),
        "attrs_differ": differ,
        "options_differ": options,
        "class_names_differ": ca.class_names != cb.class_names,
        "splits": splits,
    }


def compare_runs(a: Path, b: Path) -> dict:
    ma, mb = runs.read_metrics(Path(a)), runs.read_metrics(Path(b))
    ca, cb = ma.get("config") or {}, mb.get("config") or {}
    fa, fb = ma.get("final") or {}, mb.get("final") or {}
    sa, sb = ((m.get("selection") or {}).get("chosen") or {} for m in (ma, mb))
    return {
        "type": "run comparison",
        "a": str(a),
        "b": str(b),
        "kinds": [ma["kind"], mb["kind"]],
        "config_differ": {
            k: {"a": ca.get(k), "b": cb.get(k)} for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)
        },
        "final": {
            k: {"a": fa.get(k), "b": fb.get(k)}
            for k in ("train_acc", "test_acc", "test_top5", "test_loss")
            if k in fa or k in fb
        },
        # Values the runs chose (not options): train-head's weight decay, finetune's kept epoch, SVM's kernel/C.
        "chosen_differ": {
            k: {"a": sa.get(k), "b": sb.get(k)} for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)
        },
    }


def _manifest_json(path: Path) -> Path | None:
    """The manifest.json that a data folder, its stanford_cars/ or the file itself names."""

    for candidate in (path / devkit.STANFORD_DIR / manifests.MANIFEST_JSON, path / manifests.MANIFEST_JSON):
        if path.is_dir() and candidate.is_file():
            return candidate
    return path if path.is_file() and path.name == manifests.MANIFEST_JSON else None


def inspect_dataset(path: Path) -> dict:
    """What a dataset's manifest.json records (read as it is: ``download --verify`` checks the images)."""
    manifest_json = _manifest_json(Path(path))
    try:
        meta = json.loads(manifest_json.read_text())
    except (OSError, ValueError) as exc:
        raise CarsTLError(
            f"cannot read {manifest_json}: {exc}", "rebuild it: cars-tl download --data-dir DIR --verify"
        ) from None
    if not isinstance(meta, dict):
        raise CarsTLError(
            f"{manifest_json} is not a cars_tl manifest", "rebuild it: cars-tl download --data-dir DIR --verify"
        )
    return {
        "type": "dataset",
        "path": str(manifest_json),
        "fingerprint": meta.get("fingerprint"),
        "counts": meta.get("counts"),
        "classes": len(meta.get("class_names") or []),
        "origin": meta.get("origin"),
        "boxes": meta.get("boxes"),
        "clipped_boxes": meta.get("clipped_boxes"),
        "duplicates": meta.get("duplicates"),
        "label_conflicts": meta.get("label_conflicts"),
    }


def _kind_of(path: Path) -> str:
    path = Path(path)
    if _manifest_json(path) is not None:
        return "dataset"
    if path.is_dir():
        if (path / runs.METRICS).is_file():
            return "run"
        raise CarsTLError(
            f"{path} is a folder without {runs.METRICS}: not a cars_tl run",
            "pass a run directory (artifacts/runs/<name>) or a feature cache (.h5)",
        )
    if path.is_file():
        return "cache"
    raise CarsTLError(
        f"{path} does not exist",
        "pass a feature cache (artifacts/features/*.h5), a run directory (artifacts/runs/*) or a data folder "
        "(the --data-dir of download: it holds manifest.json)",
    )


def inspect_paths(paths: list[Path]) -> dict:
    """One path: its description; two paths of the same type: their comparison."""
    paths = [Path(p) for p in paths]
    if not 1 <= len(paths) <= 2:
        raise CarsTLError(f"inspect takes one or two paths, got {len(paths)}", "cars-tl inspect A.h5 [B.h5]")
    kinds = [_kind_of(p) for p in paths]
    if len(paths) == 1:
        return {"cache": inspect_cache, "run": inspect_run, "dataset": inspect_dataset}[kinds[0]](paths[0])
    if "dataset" in kinds:
        raise CarsTLError(
            f"inspect compares two caches or two runs, not data folders: {paths[0]} vs {paths[1]}",
            f"inspect one data folder at a time: cars-tl inspect {paths[kinds.index('dataset')]}",
        )
    if kinds[0] != kinds[1]:
        raise CarsTLError(
            f"cannot compare a {kinds[0]} with a {kinds[1]}: {paths[0]} vs {paths[1]}",
            "compare two feature caches, or two run directories",
        )
    return compare_caches(*paths) if kinds[0] == "cache" else compare_runs(*paths)


# --------------------------------------------------------------------------- text


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return "–" if v is None or v == "" else str(v)


def _stats_line(s: dict) -> str:
    line = (
        f"dim {s['dim']}, mean L2 norm {_value(s['mean_l2_norm'])} (min {_value(s['min_l2_norm'])}), "
        f"exact zeros {100 * (s['zero_fraction'] or 0):.2f}%"
    )
    problems = [
        f"{s['nan_values']} NaN values",
        f"{s['inf_values']} Inf values",
        f"{s['non_finite_vectors']} vectors not finite",
        f"{s['zero_vectors']} all-zero vectors",
    ]
    bad = [p for p in problems if not p.startswith("0 ")]
    return line + (" — WARNING: " + ", ".join(bad) if bad else ", no NaN/Inf")


def render_text(result: dict) -> str:
    """The inspection as aligned lines of text."""
    lines = [f"{result['type']}: {result.get('path') or result['a'] + '  vs  ' + result['b']}"]
    kind = result["type"]
    if kind == "feature cache":
        for key, value in result["provenance"].items():
            lines.append(f"  {key:<20} {_value(value)}")
        lines.append(f"  {'classes':<20} {result['class_count']}")
        for name, s in result["splits"].items():
            lines.append(
                f"  [{name}] {s['count']} images, {s['classes_present']} classes present, {len(s['skipped'])} skipped"
            )
            lines += [f"      skipped {k['path']}: {k['reason']}" for k in s["skipped"][:10]]
            lines.append("      " + _stats_line(s["features"]))
    elif kind == "dataset":
        for key in ("fingerprint", "counts", "classes", "origin", "boxes", "clipped_boxes", "duplicates"):
            lines.append(f"  {key:<20} {_value(result.get(key))}")
        conflicts = describe_label_conflicts(result.get("label_conflicts"), limit=None)
        lines.append(
            f"  {'label conflicts':<20} "
            + (conflicts[0] if conflicts else "none (no identical images with different labels)")
        )
        lines += [f"      {line}" for line in conflicts[1:]]
    elif kind == "run":
        for key in (
            "kind",
            "name",
            "status",
            "error",
            "created",
            "finished",
            "wall_time_s",
            "device",
            "model_file",
            "epochs_recorded",
        ):
            if result.get(key) is not None:
                lines.append(f"  {key:<20} {_value(result[key])}")
        for section in (
            "config",
            "provenance",
            "inputs",
            "params",
            "final",
            "selection",
            "kernels",
            "k_results",
            "predictions",
            "versions",
        ):
            if result.get(section):
                lines.append(f"  {section}:")
                lines += [f"      {k:<18} {_value(v)}" for k, v in result[section].items()]
    elif kind == "cache comparison":
        lines.append("  attributes that differ:" if result["attrs_differ"] else "  attributes: identical")
        lines += [
            f"      {k:<18} a: {_value(v['a'])}\n      {'':<18} b: {_value(v['b'])}"
            for k, v in result["attrs_differ"].items()
        ]
        lines.append("  options that differ:" if result["options_differ"] else "  options: identical")
        lines += [
            f"      {k:<18} a: {_value(v['a'])}  b: {_value(v['b'])}" for k, v in result["options_differ"].items()
        ]
        if result["class_names_differ"]:
            lines.append("  class names differ")
        for name, s in result["splits"].items():
            if "only_in" in s:
                lines.append(f"  [{name}] only in {s['only_in']}")
                continue
            c = s.get("cosine")
            cos = (
                f"cosine min {_value(c['min'])} mean {_value(c['mean'])} (least similar: manifest row "
                f"{c['least_similar_id']}), {c['identical_vectors']} identical vectors"
                + (f", {c['not_comparable']} not comparable (NaN/Inf/zero)" if c["not_comparable"] else "")
                if isinstance(c, dict)
                else (c or "")
            )
            lines.append(
                f"  [{name}] {s['common_images']} common images (only in a: {s['only_in_a']}, only in b: {s['only_in_b']}); {cos}"
                + (f"; {s['labels_differ']} labels differ" if s.get("labels_differ") else "")
            )
    else:
        lines.append(f"  kinds: {result['kinds'][0]} vs {result['kinds'][1]}")
        lines.append("  config that differs:" if result["config_differ"] else "  config: identical")
        lines += [f"      {k:<18} a: {_value(v['a'])}  b: {_value(v['b'])}" for k, v in result["config_differ"].items()]
        if result.get("chosen_differ"):
            lines.append("  chosen values that differ:")
            lines += [
                f"      {k:<18} a: {_value(v['a'])}  b: {_value(v['b'])}" for k, v in result["chosen_differ"].items()
            ]
        lines += [f"  {k:<20} a: {_value(v['a'])}  b: {_value(v['b'])}" for k, v in result["final"].items()]
    return "\n".join(lines)
