"""``report``: every run's metrics and saved test predictions gathered into the study's comparison.

Writes ``report.md`` (charts beside it as PNG), a self-contained ``report.html`` (charts and image
thumbnails inlined; one file, readable offline) and ``report.json``. Sections:

- a headline chart: test accuracy of every run grouped by model (A scratch, B head, C SVM,
  D partial fine-tune, kNN), study vs tuned preset, mean ± std (sample std) where several seeds of one
  configuration exist, every seed's own result as a dot; numbers selected on test (``final.selected_on``:
  the study's best epoch or kernel by test accuracy) hatched, with the last epoch's number beside them;
- the comparison table, runs grouped by seed (configurations that differ only by ``seed``, or by
  values the runs chose: ``selection``), SVM kernels and kNN k values; a ``selected on`` column;
- all runs' test-accuracy curves in one chart (each run's loss/accuracy charts folded below it);
- from each run's ``predictions-test.npz`` (see :mod:`cars_tl.artifacts.runs`): make-level accuracy (the
  make is the first word of the class name: how often the prediction is at least the right make,
  and how many errors stay within the make), per-class accuracy (best and worst 10 per run, and
  a full sortable table), the most confused class pairs with a thumbnail of each class, and a
  prediction gallery (a seeded sample of test images, the same for every run, with every run's
  top-3);
- the sparsity chart when ``sparsity`` has been run; runs running, failed or unreadable, listed.

Thumbnails come from the manifest's images (``--data-dir``); without a manifest matching the runs'
dataset fingerprint the sections stay, without pictures. A broken run or predictions file is
listed, never fatal. File names come from a slug of the run's folder name, never from what an
artifact contains; every name shown is escaped (HTML and Markdown).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

import numpy as np

from cars_tl.artifacts import runs
from cars_tl.core import locks
from cars_tl.core.atomic import atomic_path, atomic_write_text
from cars_tl.core.errors import CarsTLError, check_output_path
from cars_tl.data import devkit
from cars_tl.data import manifest as manifests
from cars_tl.data.images import crop_box, open_image

COLUMNS = (
    "model",
    "kind",
    "backbone / weights / preset",
    "trainable params",
    "total params",
    "train time",
    "train loss",
    "train acc %",
    "test loss",
    "test acc %",
    "test top-5 %",
    "best epoch",
    "selected on",
    "last-epoch test acc %",
)
# How a run's reported number was selected (metrics ``final.selected_on``); "test" is the study's
# protocol (best epoch or kernel by test accuracy): optimistic, marked in the chart and tables.
SELECTED_ON_TEST = "test"
TEST_MARK = "selected on test, as the study did"
GROUP_ORDER = ("A", "B", "C", "D", "kNN")
GROUP_TITLES = {
    "A": "from scratch (random weights, all trained)",
    "B": "frozen features + Linear head",
    "C": "frozen features + SVM",
    "D": "part of the backbone fine-tuned",
    "kNN": "k nearest neighbours on frozen features",
}
PRESET_COLOURS = {"study": "#4C72B0", "tuned": "#DD8452"}
OTHER_COLOUR = "#8C8C8C"
GROUP_COLOURS = {"A": "#C44E52", "B": "#4C72B0", "C": "#55A868", "D": "#8172B3", "kNN": "#937860"}
# Config entries that say where or how fast a run ran, not what it computed.
NOT_CONFIGURATION = (
    "seed",
    "features",
    "init_head",
    "device",
    "workers",
    "data_dir",
    "out",
    "artifacts",
    "resume",
    "force",
    "dataset_fingerprint",
    "chunk",
)
TOP_CLASSES = 10
TOP_CONFUSIONS = 5
GALLERY_SIZE = 8
GALLERY_SEED = 0
THUMB_PX = 96
GALLERY_PX = 150


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(float(seconds), 60)
    return f"{int(minutes)}m {secs:04.1f}s" if minutes else f"{secs:.1f}s"


def slug(text: str) -> str:
    """A file-name-safe version of ``text``: letters, digits, ``.``, ``_``, ``-``; never empty, never hidden."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip(".-_")[:80]
    return value or "run"


# --------------------------------------------------------------------------- what a run is


def model_group(m: dict) -> str:
    """The study's model letter from what the run did: A, B, C, D, kNN (or a description)."""
    kind, c = m.get("kind"), m.get("config") or {}
    if kind == "head":
        return "B"
    if kind == "svm":
        return "C"
    if kind == "knn":
        return "kNN"
    if kind == "finetune":
        weights = str((m.get("backbone") or {}).get("weights", c.get("weights")))
        unfreeze = str(c.get("unfreeze"))
        if weights == "random" and unfreeze == "all":
            return "A"
        if unfreeze not in ("all", "none"):  # D's recipe (the demo runs it on random weights too)
            return "D"
        return f"finetune ({'random' if weights == 'random' else 'pretrained'}, unfreeze {unfreeze})"
    return str(kind)


def setting(m: dict) -> str:
    """What distinguishes the run within its model group: preset, kernel, k."""
    c, f = m.get("config") or {}, m.get("final") or {}
    if m.get("kind") == "svm":
        kernel = f"all kernels (best {f.get('kernel')})" if c.get("kernel") == "all" else f"{c.get('kernel')}"
        return kernel + ("" if c.get("scale") in (None, "l2") else f", {c.get('scale')} scaling")
    if m.get("kind") == "knn":
        return f"k={f.get('k')}, T={c.get('temperature')}"
    label = str(c.get("preset", ""))
    if m.get("kind") == "finetune" and model_group(m) not in ("A", "D"):
        label += f", unfreeze {c.get('unfreeze')}"
    return label


def selected_on(m: dict) -> str:
    """What the run's reported number was chosen on: test | validation | train-cv | none (older runs:
    read from ``selected_by`` and ``selection``)."""
    f = m.get("final") or {}
    if f.get("selected_on"):
        return str(f["selected_on"])
    by = str(f.get("selected_by") or "")
    if by.startswith("test accuracy"):
        return "test"
    if "cross-validation" in by or any("search" in k for k in (m.get("kernels") or {}).values() if isinstance(k, dict)):
        return "train-cv"
    if "validation" in by or m.get("selection"):
        return "validation"
    return "none"


def chosen_keys(m: dict) -> set[str]:
    """Config keys that hold a value the run chose (a result, not an option): left out of the
    configuration. Runs before ``selection.chosen`` existed wrote train-head's weight decay there."""
    selection = m.get("selection") or {}
    keys = set(selection.get("chosen") or {})
    if m.get("kind") == "head" and selection.get("grid") and "chosen" not in selection:
        keys.add("weight_decay")
    return keys


def configuration_key(m: dict) -> str:
    """Equal for runs that differ only by seed (and by where they ran or read their inputs from, and
    by the values they chose on a validation split or by CV: those are under ``selection``)."""
    b, c = m.get("backbone") or {}, m.get("config") or {}
    skip = set(NOT_CONFIGURATION) | chosen_keys(m)
    config = {k: v for k, v in c.items() if k not in skip}
    config["init_head"] = bool(c.get("init_head"))
    identity = {
        "kind": m.get("kind"),
        "backbone": b.get("backbone"),
        "weights_digest": b.get("weights_digest", b.get("weights")),
        "transform": b.get("transform"),
        "crop": b.get("crop"),
        "margin": b.get("margin"),
        "dataset": (m.get("inputs") or {}).get("dataset_fingerprint"),
        "config": config,
    }
    return json.dumps(identity, sort_keys=True, default=str)


def seed_groups(complete: list[dict]) -> list[dict]:
    """Runs grouped by :func:`configuration_key`, in model order: mean, sample std and n of test accuracy."""
    groups: dict[str, dict] = {}
    for m in complete:
        key = configuration_key(m)
        g = groups.setdefault(
            key,
            {
                "key": key,
                "group": model_group(m),
                "setting": setting(m),
                "preset": (m.get("config") or {}).get("preset"),
                "kind": m.get("kind"),
                "backbone": f"{(m.get('backbone') or {}).get('backbone')} / {(m.get('backbone') or {}).get('weights')}",
                "runs": [],
                "seeds": [],
                "test_accs": [],
                "selected_on": [],
                "last_epoch_accs": [],
            },
        )
        g["runs"].append(m["name"])
        g["seeds"].append((m.get("config") or {}).get("seed"))
        acc = (m.get("final") or {}).get("test_acc")
        if acc is not None:
            g["test_accs"].append(float(acc))
        if selected_on(m) not in g["selected_on"]:
            g["selected_on"].append(selected_on(m))
        last = ((m.get("final") or {}).get("last_epoch") or {}).get("test_acc")
        if last is not None:
            g["last_epoch_accs"].append(float(last))
    out = []
    for g in groups.values():
        accs = np.array(g["test_accs"], dtype=np.float64)
        g["n"] = len(accs)
        g["mean"] = float(accs.mean()) if len(accs) else None
        g["std"] = float(accs.std(ddof=1)) if len(accs) > 1 else None
        g["on_test"] = SELECTED_ON_TEST in g["selected_on"]
        g["last_epoch_mean"] = float(np.mean(g["last_epoch_accs"])) if g["last_epoch_accs"] else None
        out.append(g)
    rank = {name: i for i, name in enumerate(GROUP_ORDER)}
    return sorted(out, key=lambda g: (rank.get(g["group"], len(rank)), g["group"], str(g["preset"]), g["setting"]))


# --------------------------------------------------------------------------- analysis of predictions


def make_of(class_name: str) -> str:
    """The make is the first word of a Stanford Cars class name (``BMW M3 Coupe 2012`` -> ``BMW``)."""
    return str(class_name).split()[0] if str(class_name).split() else str(class_name)


def per_class_accuracy(predictions: runs.Predictions, num_classes: int) -> list[dict]:
    """Per label: test images, correct top-1, accuracy in % (None for a class without test images)."""
    n = np.bincount(predictions.labels, minlength=num_classes)[:num_classes]
    correct = np.bincount(predictions.labels[predictions.correct], minlength=num_classes)[:num_classes]
    return [
        {"label": i, "n": int(n[i]), "correct": int(correct[i]), "acc": 100.0 * correct[i] / n[i] if n[i] else None}
        for i in range(num_classes)
    ]


def make_accuracy(predictions: runs.Predictions, class_names: list[str]) -> dict:
    """Top-1 accuracy, accuracy at the make level, and how many errors stay within the true make."""
    makes = np.array([make_of(c) for c in class_names], dtype=object)
    true_make, predicted_make = makes[predictions.labels], makes[predictions.top_classes[:, 0]]
    right_make = true_make == predicted_make
    wrong = ~predictions.correct
    n, errors = len(predictions.labels), int(wrong.sum())
    within = int((wrong & right_make).sum())
    return {
        "images": n,
        "top1_acc": 100.0 * float(predictions.correct.mean()) if n else None,
        "make_acc": 100.0 * float(right_make.mean()) if n else None,
        "errors": errors,
        "errors_within_make": within,
        "errors_within_make_pct": 100.0 * within / errors if errors else None,
        "makes": int(len(set(makes.tolist()))),
    }


def confused_pairs(predictions: runs.Predictions, top: int = TOP_CONFUSIONS) -> list[dict]:
    """The most frequent (true, predicted) pairs among the errors, most frequent first (ties: lower labels)."""
    wrong = ~predictions.correct
    if not wrong.any():
        return []
    pairs = np.stack([predictions.labels[wrong], predictions.top_classes[wrong, 0]], axis=1)
    unique, counts = np.unique(pairs, axis=0, return_counts=True)
    order = np.lexsort((unique[:, 1], unique[:, 0], -counts))[:top]
    out = []
    for i in order:
        true, predicted = int(unique[i, 0]), int(unique[i, 1])
        of_true = predictions.labels == true
        example = predictions.ids[of_true & (predictions.top_classes[:, 0] == predicted)][0]
        out.append(
            {
                "true": true,
                "predicted": predicted,
                "count": int(counts[i]),
                "of": int(of_true.sum()),
                "example_id": int(example),
            }
        )
    return out


def gallery_ids(
    prediction_sets: list[runs.Predictions], size: int = GALLERY_SIZE, seed: int = GALLERY_SEED
) -> list[int]:
    """A fixed sample of test images every run scored: the same ids for the same test set and seed."""
    if not prediction_sets:
        return []
    common = prediction_sets[0].ids
    for p in prediction_sets[1:]:
        common = np.intersect1d(common, p.ids)
    common = np.unique(common)
    if len(common) <= size:
        return [int(i) for i in common]
    return sorted(int(i) for i in np.random.default_rng(seed).choice(common, size=size, replace=False))


# --------------------------------------------------------------------------- gathering


def row_for(m: dict) -> dict:
    f = m.get("final") or {}
    b = m.get("backbone") or {}
    c = m.get("config") or {}
    if m["kind"] == "svm":
        kernel = f"all kernels (best {f.get('kernel')})" if c.get("kernel") == "all" else f"{c.get('kernel')} kernel"
        label = f"{kernel}, {c.get('scale')} scaling"
    elif m["kind"] == "knn":
        label = f"k={f.get('k')}, T={c.get('temperature')}"
    else:
        label = c.get("preset", "")
    if m["kind"] == "finetune":
        label += f", unfreeze {c.get('unfreeze')}"
    params = m.get("params") or {}
    return {
        "model": m["name"],
        "kind": m["kind"],
        "backbone / weights / preset": f"{b.get('backbone')} / {b.get('weights')} / {label}",
        "trainable params": _fmt(params.get("trainable")),
        "total params": _fmt(params.get("total")),
        "train time": _duration(m.get("wall_time_s"))
        + (" (trunk cache)" if (m.get("trunk_cache") or {}).get("used") else ""),
        "train loss": _fmt(f.get("train_loss"), 4),
        "train acc %": _fmt(f.get("train_acc")),
        "test loss": _fmt(f.get("test_loss"), 4),
        "test acc %": _fmt(f.get("test_acc")),
        "test top-5 %": _fmt(f.get("test_top5")),
        "best epoch": _fmt(f.get("best_epoch")),
        "selected on": _selected_label(selected_on(m)),
        "last-epoch test acc %": _fmt((f.get("last_epoch") or {}).get("test_acc")),
    }


def _selected_label(on: str) -> str:
    return f"test † ({TEST_MARK})" if on == SELECTED_ON_TEST else on


def gather(artifacts: Path) -> tuple[list[dict], list[dict]]:
    """(complete runs' metrics, problems: runs running, failed or unreadable)."""
    complete, problems = [], []
    slugs: set[str] = set()
    for run_dir in runs.list_runs(artifacts):
        try:
            m = runs.read_metrics(run_dir)
            if m.get("status") != "complete":
                epochs = len([h for h in m.get("history", []) if h.get("epoch", 0) > 0])
                problems.append(
                    {
                        "run": str(run_dir),
                        "status": str(m.get("status", "?")),
                        "detail": f"{epochs} of {(m.get('config') or {}).get('epochs', '?')} epochs done"
                        + (f"; {m['error']}" if m.get("error") else ""),
                    }
                )
                continue
            m["name"] = str(m.get("name") or run_dir.name)
            row_for(m)  # a run whose metrics cannot fill a row is a broken run, not a crash
        except CarsTLError as exc:
            problems.append({"run": str(run_dir), "status": "unreadable", "detail": exc.message})
            continue
        except Exception as exc:  # valid JSON of the wrong shape
            problems.append(
                {"run": str(run_dir), "status": "unreadable", "detail": f"{type(exc).__name__}: {exc}"[:300]}
            )
            continue
        base = slug(run_dir.name)
        unique, i = base, 2
        while unique in slugs:
            unique, i = f"{base}-{i}", i + 1
        slugs.add(unique)
        m["run_dir"], m["slug"] = str(run_dir), unique
        complete.append(m)
    return complete, problems


def _load_predictions(complete: list[dict], problems: list[dict]) -> dict[str, runs.Predictions]:
    out = {}
    for m in complete:
        try:
            p = runs.read_predictions(Path(m["run_dir"]))
            if len(p.labels) and (
                p.top_classes.max() >= len(m["class_names"]) or p.labels.max() >= len(m["class_names"])
            ):
                raise CarsTLError(
                    f"{m['run_dir']}: predictions name labels beyond the run's {len(m['class_names'])} classes"
                )
        except CarsTLError as exc:
            problems.append(
                {
                    "run": m["run_dir"],
                    "status": "no predictions",
                    "detail": exc.message + (f" (next: {exc.hint})" if exc.hint else ""),
                }
            )
            continue
        except Exception as exc:
            problems.append(
                {"run": m["run_dir"], "status": "no predictions", "detail": f"{type(exc).__name__}: {exc}"[:300]}
            )
            continue
        out[m["slug"]] = p
    return out


# --------------------------------------------------------------------------- images


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)


def plot_curves(m: dict, path: Path) -> bool:
    """Loss and accuracy per epoch; train solid, test dashed, validation dotted."""
    history = m.get("history", [])
    if not any(h.get("epoch", 0) > 0 for h in history):
        return False
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for ax, metric, label in ((axes[0], "loss", "mean cross-entropy"), (axes[1], "acc", "accuracy (%)")):
        for split, style in (("train", "-"), ("test", "--"), ("val", ":")):
            # Epoch 0 is the evaluation before any step (test/val only).
            points = [(h["epoch"], h[f"{split}_{metric}"]) for h in history if h.get(f"{split}_{metric}") is not None]
            if points:
                ax.plot(*zip(*points), style, marker="o", markersize=3, label=split)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(m["name"], fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_headline(groups: list[dict], complete: list[dict], path: Path) -> bool:
    """Test accuracy per configuration, grouped by model; bars are means, whiskers ± std, dots single seeds."""
    shown = [g for g in groups if g["mean"] is not None]
    if not shown:
        return False
    plt = _pyplot()
    from matplotlib.patches import Patch

    by_name = {m["name"]: m for m in complete}
    fig, ax = plt.subplots(
        figsize=(max(6.0, 1.0 + 0.75 * len(shown) + 0.4 * len({g["group"] for g in shown})), 4.2), dpi=110
    )
    x, positions, labels, previous = 0.0, [], [], None
    group_spans: dict[str, list[float]] = {}
    for g in shown:
        if previous is not None and g["group"] != previous:
            x += 0.6  # a gap between model groups
        previous = g["group"]
        colour = PRESET_COLOURS.get(str(g["preset"]), OTHER_COLOUR)
        ax.bar(
            x,
            g["mean"],
            width=0.7,
            color=colour,
            alpha=0.85,
            hatch="///" if g["on_test"] else None,
            edgecolor="#222" if g["on_test"] else None,
            yerr=g["std"] if g["std"] is not None else None,
            capsize=4,
            ecolor="#222",
        )
        if g["on_test"] and g["last_epoch_mean"] is not None:  # the same runs' last epoch, not chosen on test
            ax.plot([x - 0.35, x + 0.35], [g["last_epoch_mean"]] * 2, color="#222", lw=2, ls="--", zorder=4)
        accs = [(by_name[r].get("final") or {}).get("test_acc") for r in g["runs"] if r in by_name]
        accs = [a for a in accs if a is not None]
        if len(accs) > 1:
            ax.scatter([x + 0.18] * len(accs), accs, s=12, color="#222", zorder=3)
        text = f"{g['mean']:.1f}" + (f"\n±{g['std']:.1f}" if g["std"] is not None else "") + f"\nn={g['n']}"
        ax.text(x, g["mean"] + (g["std"] or 0) + 1.0, text, ha="center", va="bottom", fontsize=7)
        positions.append(x)
        labels.append(g["setting"] if len(g["setting"]) <= 18 else g["setting"][:17] + "…")
        group_spans.setdefault(g["group"], []).append(x)
        x += 1.0
    ax.set_xticks(positions, labels, rotation=30, ha="right", fontsize=8)
    top = max(g["mean"] + (g["std"] or 0) for g in shown)
    ceiling = max(10.0, top * 1.1 + 18)  # room for the value labels and the group names above the bars
    ax.set_ylim(0, ceiling)
    for name, xs in group_spans.items():
        ax.text(
            sum(xs) / len(xs),
            ceiling * 0.985,
            name if len(name) <= 6 else name[:6] + "…",
            ha="center",
            va="top",
            fontsize=11,
            fontweight="bold",
            color=GROUP_COLOURS.get(name, "#444"),
        )
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    presets = sorted({str(g["preset"]) for g in shown})
    handles = [
        Patch(color=PRESET_COLOURS.get(p, OTHER_COLOUR), label=p if p in PRESET_COLOURS else "no preset")
        for p in presets
    ]
    if any(g["on_test"] for g in shown):
        from matplotlib.lines import Line2D

        handles.append(Patch(facecolor="white", edgecolor="#222", hatch="///", label=TEST_MARK))
        if any(g["on_test"] and g["last_epoch_mean"] is not None for g in shown):
            handles.append(Line2D([], [], color="#222", lw=2, ls="--", label="its last epoch (not chosen on test)"))
    ax.legend(
        handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="preset", title_fontsize=8
    )
    ax.set_title("Test accuracy by model (bar: mean over seeds, whisker: ± sample std, dots: single seeds)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_test_curves(complete: list[dict], path: Path) -> bool:
    """Every run's test accuracy per epoch in one chart; runs without epochs are horizontal lines."""
    with_history = [
        m
        for m in complete
        if any(h.get("test_acc") is not None and h.get("epoch", 0) > 0 for h in m.get("history", []))
    ]
    if not with_history:
        return False
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(10, 4.4), dpi=110)
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    for m in with_history:
        group = model_group(m)
        style = styles[seen.get(group, 0) % len(styles)]
        seen[group] = seen.get(group, 0) + 1
        points = [(h["epoch"], h["test_acc"]) for h in m["history"] if h.get("test_acc") is not None]
        ax.plot(
            *zip(*points),
            style,
            marker="o",
            markersize=3,
            color=GROUP_COLOURS.get(group, OTHER_COLOUR),
            label=m["name"][:40],
        )
    for m in complete:
        if m in with_history or (m.get("final") or {}).get("test_acc") is None:
            continue
        ax.axhline(
            m["final"]["test_acc"],
            color=GROUP_COLOURS.get(model_group(m), OTHER_COLOUR),
            alpha=0.5,
            lw=1,
            ls=":",
            label=f"{m['name'][:40]} (no epochs)",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("Test accuracy per epoch, all runs (colour: model group)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


NOISE_NOTE = ". Per-class results and confusions of these classes partly measure label noise, not the model."


def label_noise(data_dir: Path | None, fingerprints: set[str]) -> list[str]:
    """The runs' dataset's identical images with different labels (its manifest.json), as lines; [] when none or unknown."""
    if data_dir is None:
        return []

    try:
        meta = json.loads((devkit.stanford_root(Path(data_dir)) / manifests.MANIFEST_JSON).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(meta, dict) or (fingerprints and meta.get("fingerprint") not in fingerprints):
        return []
    return manifests.describe_label_conflicts(meta.get("label_conflicts"), limit=5)


class Thumbnails:
    """Small JPEG thumbnails of manifest images, as data URIs; empty when no matching manifest."""

    def __init__(self, data_dir: Path | None, fingerprints: set[str]):
        self.manifest, self.note, self._cache = None, "", {}
        if data_dir is None:
            self.note = "no --data-dir given: no thumbnails"
            return

        try:
            manifest = manifests.load_manifest(Path(data_dir))
        except CarsTLError as exc:
            self.note = f"no thumbnails: {exc.message}"
            return
        if fingerprints and manifest.fingerprint not in fingerprints:
            self.note = (
                f"no thumbnails: the manifest in {data_dir} is not the dataset the runs used (fingerprint differs)"
            )
            return
        self.manifest = manifest
        self.records = {r.index: r for r in manifest.records}
        self.first_train = {}
        for r in manifest.records:
            if r.split == "train":
                self.first_train.setdefault(r.label, r.index)

    def of(self, image_id: int | None, size: int = THUMB_PX, box: bool = True) -> str | None:
        if self.manifest is None or image_id is None or image_id not in self.records:
            return None
        key = (image_id, size, box)
        if key not in self._cache:
            record = self.records[image_id]
            try:
                image = open_image(self.manifest.root / record.path)
                if box:
                    image = crop_box(image, record.box, 0.05)
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=72)
                self._cache[key] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
            except Exception:  # a missing or bad image leaves a blank, never a broken page
                self._cache[key] = None
        return self._cache[key]

    def of_class(self, label: int) -> str | None:
        return self.of(self.first_train.get(label)) if self.manifest is not None else None


# --------------------------------------------------------------------------- text helpers

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>~])")


def md(text) -> str:
    """Text safe inside a Markdown table cell or heading: special characters escaped, one line."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def _md_table(columns, rows) -> str:
    lines = ["| " + " | ".join(md(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(md(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(columns, rows, cls: str = "", raw: tuple = ()) -> str:
    """``raw`` columns hold HTML already made safe (images, marks); everything else is escaped."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{r[c] if c in raw else esc(r[c])}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _grid_note(search: dict | None) -> str:
    """A C grid extended past its end (fit-svm --C auto), in a few words."""
    ext = (search or {}).get("C_grid_extended")
    if not ext:
        return ""
    return " ".join(f"extended {d} ×{ext[d]}" for d in ("up", "down") if ext[d]) + (
        " (cap hit)" if ext.get("capped") else ""
    )


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _score(value: float, kind: str) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{100 * value:.0f}%" if kind in ("probability", "vote share") else f"{value:.2f}"


def _img(uri: str | None, alt: str, cls: str = "thumb") -> str:
    return f"<img class='{cls}' alt='{esc(alt)}' src='{uri}'>" if uri else f"<span class='noimg'>{esc(alt)}</span>"


# --------------------------------------------------------------------------- the report


def build_report(
    artifacts: Path = Path("artifacts"),
    *,
    out: Path | None = None,
    sparsity_dir: Path | None = None,
    data_dir: Path | None = Path("data"),
) -> dict:
    """Write the report; returns the table rows, groups, kernel rows, problems and file paths."""
    artifacts = Path(artifacts)
    out = check_output_path(Path(out) if out else artifacts / "report", "folder")
    sparsity_dir = Path(sparsity_dir) if sparsity_dir else artifacts / "sparsity"
    complete, problems = gather(artifacts)
    if not complete and not problems:
        raise CarsTLError(
            f"no runs under {artifacts / 'runs'}", "run train-head, fit-svm or finetune first (or make demo)"
        )
    out.mkdir(parents=True, exist_ok=True)
    with locks.writer_lock(out, "report"):
        return _write_report(complete, problems, out, sparsity_dir, data_dir)


def _write_report(complete, problems, out: Path, sparsity_dir: Path, data_dir) -> dict:
    rank = {name: i for i, name in enumerate(GROUP_ORDER)}
    complete.sort(key=lambda m: (rank.get(model_group(m), len(rank)), m["name"]))
    rows = [row_for(m) for m in complete]
    groups = seed_groups(complete)
    predictions = _load_predictions(complete, problems)
    analysed = [m for m in complete if m["slug"] in predictions]
    thumbs = (
        Thumbnails(data_dir, {(m.get("inputs") or {}).get("dataset_fingerprint") for m in analysed} - {None})
        if analysed
        else None
    )

    short = lambda v: f"{v:.4g}" if isinstance(v, float) else _fmt(v)  # noqa: E731 - C and gamma span decades
    kernel_cols = (
        "run",
        "kernel",
        "C",
        "gamma",
        "CV acc % (mean ± std of folds)",
        "C grid",
        "train acc %",
        "test acc %",
        "fit s",
        "predict s",
        "support vectors",
    )
    kernels = [
        {
            "run": m["name"],
            "kernel": k.get("kernel"),
            "C": short(k.get("C", (m.get("config") or {}).get("C"))),  # chosen by CV with --C auto
            "gamma": short(k.get("gamma_value")) if k.get("kernel") != "linear" else "",
            "CV acc % (mean ± std of folds)": _fmt(k.get("cv_acc"))
            + (f" ± {k['cv_std']:.2f}" if k.get("cv_std") is not None else ""),
            "C grid": _grid_note(k.get("search")),
            "train acc %": _fmt(k.get("train_acc")),
            "test acc %": _fmt(k.get("test_acc")),
            "fit s": _fmt(k.get("fit_seconds")),
            "predict s": _fmt(k.get("predict_seconds")),
            "support vectors": _fmt(k.get("support_vectors")),
        }
        for m in complete
        if m["kind"] == "svm"
        for k in (m.get("kernels") or {}).values()
    ]
    knn_cols = ("run", "k", "temperature", "test acc %", "test top-5 %")
    knn_rows = [
        {
            "run": m["name"],
            "k": _fmt(r.get("k")),
            "temperature": _fmt((m.get("config") or {}).get("temperature"), 3),
            "test acc %": _fmt(r.get("test_acc")),
            "test top-5 %": _fmt(r.get("test_top5")),
        }
        for m in complete
        if m["kind"] == "knn"
        for r in (m.get("k_results") or {}).values()
    ]
    group_cols = (
        "model",
        "setting",
        "backbone / weights",
        "n",
        "seeds",
        "test acc % (mean ± std)",
        "selected on",
        "last-epoch test acc % (mean)",
        "runs",
    )
    group_rows = [
        {
            "model": g["group"],
            "setting": g["setting"],
            "backbone / weights": g["backbone"],
            "n": str(g["n"]),
            "seeds": ", ".join("–" if s is None else str(s) for s in g["seeds"]),
            "test acc % (mean ± std)": "–"
            if g["mean"] is None
            else f"{g['mean']:.2f}" + (f" ± {g['std']:.2f}" if g["std"] is not None else ""),
            "selected on": ", ".join(_selected_label(on) for on in g["selected_on"]),
            "last-epoch test acc % (mean)": _fmt(g["last_epoch_mean"]),
            "runs": ", ".join(g["runs"]),
        }
        for g in groups
    ]

    headline = out / "headline.png"
    has_headline = plot_headline(groups, complete, headline)
    overlay = out / "test-accuracy-curves.png"
    has_overlay = plot_test_curves(complete, overlay)
    curves: list[tuple[str, Path]] = []
    for m in complete:
        path = out / f"curves-{m['slug']}.png"
        if plot_curves(m, path):
            curves.append((m["name"], path))
    sparsity_png = sparsity_dir / "sparsity.png"

    make_cols = (
        "run",
        "model",
        "test images",
        "top-1 %",
        "right make %",
        "errors",
        "errors within the make",
        "within make %",
    )
    make_rows, class_tables, confusions = [], {}, {}
    for m in analysed:
        p, names = predictions[m["slug"]], m["class_names"]
        mk = make_accuracy(p, names)
        make_rows.append(
            {
                "run": m["name"],
                "model": model_group(m),
                "test images": str(mk["images"]),
                "top-1 %": _pct(mk["top1_acc"]),
                "right make %": _pct(mk["make_acc"]),
                "errors": str(mk["errors"]),
                "errors within the make": str(mk["errors_within_make"]),
                "within make %": _pct(mk["errors_within_make_pct"]),
            }
        )
        m["make_level"] = mk
        class_tables[m["slug"]] = per_class_accuracy(p, len(names))
        confusions[m["slug"]] = confused_pairs(p)
    gallery = gallery_ids([predictions[m["slug"]] for m in analysed])

    noise = label_noise(data_dir, {(m.get("inputs") or {}).get("dataset_fingerprint") for m in complete} - {None})
    note = (
        "Losses are mean cross-entropy per image; accuracies in %. `best epoch` is the epoch whose model was kept "
        "(see each run's metrics.json for how it was selected). `selected on` says what a run's number was chosen on: "
        f"`test †` ({TEST_MARK}: the best epoch or kernel by test accuracy, optimistic; hatched in the chart, with the "
        "last epoch's number beside it), `validation` (a split of train), `train-cv` (cross-validation on train) or "
        "`none` (nothing chosen). Runs that differ only by seed (and by the values they chose) are one configuration: "
        "mean ± sample standard deviation over its n runs."
    )
    files = {"md": out / "report.md", "html": out / "report.html", "json": out / "report.json"}

    # ---- Markdown
    text = ["# cars_tl report", "", note]
    if noise:
        text += ["", "## Dataset", "", md(noise[0] + NOISE_NOTE), "", *(f"- {md(line)}" for line in noise[1:])]
    legend = "; ".join(f"{k}: {v}" for k, v in GROUP_TITLES.items())
    if has_headline:
        text += ["", "## Test accuracy by model", "", f"![test accuracy by model]({headline.name})", "", md(legend)]
    text += ["", "## Comparison", "", _md_table(COLUMNS, rows) if rows else "_no complete runs_"]
    if group_rows:
        text += ["", "## Seeds: configurations and their runs", "", _md_table(group_cols, group_rows)]
    if kernels:
        text += ["", "## SVM kernels", "", _md_table(kernel_cols, kernels)]
    if knn_rows:
        text += ["", "## kNN", "", _md_table(knn_cols, knn_rows)]
    if has_overlay:
        text += ["", "## Test accuracy per epoch, all runs", "", f"![test accuracy per epoch]({overlay.name})"]
    for name, path in curves:
        text += ["", f"### Training curves: {md(name)}", "", f"![training curves]({path.name})"]
    if make_rows:
        text += [
            "",
            "## Make-level accuracy",
            "",
            "The make is the first word of the class name. `right make`: the top-1 "
            "prediction is at least the right make; `errors within the make`: wrong model, right make.",
            "",
            _md_table(make_cols, make_rows),
        ]
        text += ["", "## Per-class accuracy (worst and best 10)"]
        for m in analysed:
            table = [r for r in class_tables[m["slug"]] if r["n"]]
            ranked = sorted(table, key=lambda r: (r["acc"], -r["n"], r["label"]))
            cols = ("class", "test images", "acc %")
            cells = lambda rs: [
                {"class": m["class_names"][r["label"]], "test images": str(r["n"]), "acc %": _pct(r["acc"])} for r in rs
            ]  # noqa: E731
            text += [
                "",
                f"### {md(m['name'])}",
                "",
                "Worst:",
                "",
                _md_table(cols, cells(ranked[:TOP_CLASSES])),
                "",
                "Best:",
                "",
                _md_table(cols, cells(list(reversed(ranked))[:TOP_CLASSES])),
            ]
        text += ["", "## Most confused class pairs"]
        for m in analysed:
            pairs = confusions[m["slug"]]
            text += ["", f"### {md(m['name'])}", ""]
            text += [
                _md_table(
                    ("true class", "predicted as", "images"),
                    [
                        {
                            "true class": m["class_names"][c["true"]],
                            "predicted as": m["class_names"][c["predicted"]],
                            "images": f"{c['count']} of {c['of']}",
                        }
                        for c in pairs
                    ],
                )
                if pairs
                else "_no errors_"
            ]
        if gallery:
            text += [
                "",
                f"## Prediction gallery ({len(gallery)} test images, seed {GALLERY_SEED}; ✗ = wrong top-1)",
                "",
            ]
            text += [
                _md_table(
                    ["image", "true class"] + [m["name"] for m in analysed],
                    _gallery_md_rows(gallery, analysed, predictions),
                )
            ]

    # feature_maps reads this module's model groups: imported here, where both are loaded
    from cars_tl.report.feature_maps import section as feature_map_section

    maps_md, maps_html = feature_map_section(complete, out, data_dir)
    if maps_md:
        text.append(maps_md)
    if sparsity_png.is_file():
        text += [
            "",
            "## Fraction of zero activations per ReLU call",
            "",
            f"![sparsity]({_relative(sparsity_png, out)})",
        ]
    if problems:
        text += ["", "## Incomplete runs and missing predictions", "", _md_table(("run", "status", "detail"), problems)]
    atomic_write_text(files["md"], "\n".join(text) + "\n")

    # ---- HTML
    parts = ["<h1>cars_tl report</h1>", f"<p>{esc(note)}</p>", _toc(has_headline, bool(make_rows), bool(gallery))]
    if noise:
        parts += [
            "<h2 id='dataset'>Dataset</h2>",
            f"<p>{esc(noise[0] + NOISE_NOTE)}</p>",
            "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in noise[1:]) + "</ul>",
        ]
    if has_headline:
        parts += [
            "<h2 id='headline'>Test accuracy by model</h2>",
            _png(headline, "test accuracy by model"),
            f"<p>{esc(legend)}</p>",
        ]
    parts += ["<h2 id='comparison'>Comparison</h2>", _html_table(COLUMNS, rows) if rows else "<p>No complete runs.</p>"]
    if group_rows:
        parts += [
            "<h2 id='seeds'>Seeds: configurations and their runs</h2>",
            "<p>Runs whose configuration differs only by <code>seed</code>; std is the sample standard deviation (n − 1).</p>",
            _html_table(group_cols, group_rows),
        ]
    if kernels:
        parts += ["<h2>SVM kernels</h2>", _html_table(kernel_cols, kernels)]
    if knn_rows:
        parts += [
            "<h2>kNN</h2>",
            "<p>Weighted vote of the k most cosine-similar training images, weight exp(cos / T); "
            "the run's result is its first k.</p>",
            _html_table(knn_cols, knn_rows),
        ]
    if has_overlay or curves:
        parts.append("<h2 id='curves'>Test accuracy per epoch, all runs</h2>")
        if has_overlay:
            parts.append(_png(overlay, "test accuracy per epoch, all runs"))
        for name, path in curves:
            parts.append(
                f"<details><summary>Training curves: {esc(name)}</summary>{_png(path, 'training curves: ' + name)}</details>"
            )
    if make_rows:
        parts += [
            "<h2 id='make'>Make-level accuracy</h2>",
            "<p>The make is the first word of the class name. <b>right make</b>: the top-1 prediction is at least the right "
            "make; <b>errors within the make</b>: wrong model, right make — a fine-grained error.</p>",
            _html_table(make_cols, make_rows),
        ]
        parts += _html_per_class(analysed, class_tables)
        parts += _html_confusions(analysed, confusions, predictions, thumbs)
    if gallery:
        parts += _html_gallery(gallery, analysed, predictions, thumbs)
    if maps_html:
        parts.append(maps_html)
    if sparsity_png.is_file():
        parts += ["<h2>Fraction of zero activations per ReLU call</h2>", _png(sparsity_png, "sparsity per ReLU call")]
    if problems:
        parts += [
            "<h2 id='problems'>Incomplete runs and missing predictions</h2>",
            _html_table(("run", "status", "detail"), problems),
        ]
    atomic_write_text(files["html"], _HTML.format(body="\n".join(parts)))

    summary = {
        "runs": rows,
        "seed_groups": [{k: v for k, v in g.items() if k != "key"} for g in groups],
        "kernels": kernels,
        "knn": knn_rows,
        "make_level": {m["name"]: m["make_level"] for m in analysed},
        "confusions": {m["name"]: confusions[m["slug"]] for m in analysed},
        "gallery_ids": gallery,
        "incomplete": problems,
        "label_noise": noise,
    }
    atomic_write_text(files["json"], json.dumps(summary, indent=2, default=str))
    return {
        "rows": rows,
        "columns": COLUMNS,
        "groups": groups,
        "kernels": kernels,
        "knn": knn_rows,
        "problems": problems,
        "make_level": summary["make_level"],
        "files": {k: str(v) for k, v in files.items()},
        "thumbnails": thumbs.note if thumbs is not None and thumbs.note else None,
    }


def _toc(headline: bool, analysis: bool, gallery: bool) -> str:
    links = [("headline", "headline chart")] if headline else []
    links += [("comparison", "comparison"), ("seeds", "seeds"), ("curves", "curves")]
    if analysis:
        links += [("make", "make level"), ("per-class", "per class"), ("confusions", "confusions")]
    if gallery:
        links.append(("gallery", "gallery"))
    return "<nav>" + " · ".join(f"<a href='#{a}'>{esc(t)}</a>" for a, t in links) + "</nav>"


def _png(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img alt='{esc(alt)}' src='data:image/png;base64,{data}'>"


def _html_per_class(analysed: list[dict], tables: dict) -> list[str]:
    parts = [
        "<h2 id='per-class'>Per-class accuracy</h2>",
        "<p>Worst and best 10 classes per run (ties: more test images first). "
        "The full table below sorts by any column (click its header).</p>",
    ]
    for i, m in enumerate(analysed):
        table = [r for r in tables[m["slug"]] if r["n"]]
        ranked = sorted(table, key=lambda r: (r["acc"], -r["n"], r["label"]))
        cols = ("class", "test images", "acc %")
        cells = lambda rs: [
            {"class": m["class_names"][r["label"]], "test images": str(r["n"]), "acc %": _pct(r["acc"])} for r in rs
        ]  # noqa: E731
        parts.append(
            f"<details{' open' if i == 0 else ''}><summary>{esc(m['name'])}</summary><div class='pair'>"
            f"<div><h4>worst {TOP_CLASSES}</h4>{_html_table(cols, cells(ranked[:TOP_CLASSES]))}</div>"
            f"<div><h4>best {TOP_CLASSES}</h4>{_html_table(cols, cells(list(reversed(ranked))[:TOP_CLASSES]))}</div></div></details>"
        )
    names = analysed[0]["class_names"]
    same_classes = all(m["class_names"] == names for m in analysed)
    if same_classes:
        columns = ["class", "make", "test images"] + [m["name"] for m in analysed]
        rows = []
        for label, name in enumerate(names):
            n = tables[analysed[0]["slug"]][label]["n"]
            row = {"class": name, "make": make_of(name), "test images": str(n)}
            row.update({m["name"]: _pct(tables[m["slug"]][label]["acc"]) for m in analysed})
            rows.append(row)
        parts.append(
            f"<details><summary>All {len(names)} classes × {len(analysed)} runs (sortable)</summary>"
            f"{_html_table(columns, rows, cls='sortable')}</details>"
        )
    return parts


def _html_confusions(analysed, confusions, predictions, thumbs) -> list[str]:
    parts = [
        "<h2 id='confusions'>Most confused class pairs</h2>",
        "<p>Per run, the most frequent (true class → predicted class) errors; left: a test image of the true class that "
        "was predicted as the other, right: a training image of the predicted class.</p>",
    ]
    if thumbs is not None and thumbs.note:
        parts.append(f"<p class='note'>{esc(thumbs.note)}</p>")
    for i, m in enumerate(analysed):
        pairs = confusions[m["slug"]]
        body = (
            "<p>No errors.</p>"
            if not pairs
            else "<div class='pairs'>"
            + "".join(
                "<figure class='confusion'>"
                f"{_img(thumbs.of(c['example_id']) if thumbs else None, m['class_names'][c['true']])}"
                "<span class='arrow'>→</span>"
                f"{_img(thumbs.of_class(c['predicted']) if thumbs else None, m['class_names'][c['predicted']])}"
                f"<figcaption><b>{esc(m['class_names'][c['true']])}</b> → {esc(m['class_names'][c['predicted']])}"
                f"<br>{c['count']} of {c['of']} test images</figcaption></figure>"
                for c in pairs
            )
            + "</div>"
        )
        parts.append(f"<details{' open' if i < 2 else ''}><summary>{esc(m['name'])}</summary>{body}</details>")
    return parts


def _top3(p: runs.Predictions, image_id: int, names: list[str]) -> tuple[list[tuple[str, str, bool]], bool] | None:
    where = np.flatnonzero(p.ids == image_id)
    if not len(where):
        return None
    i = int(where[0])
    true = int(p.labels[i])
    top = [
        (names[int(c)], _score(float(s), p.score_kind), int(c) == true)
        for c, s in zip(p.top_classes[i, :3], p.top_scores[i, :3])
    ]
    return top, int(p.top_classes[i, 0]) == true


def _gallery_md_rows(gallery, analysed, predictions) -> list[dict]:
    rows = []
    for image_id in gallery:
        first = predictions[analysed[0]["slug"]]
        label = int(first.labels[np.flatnonzero(first.ids == image_id)[0]])
        row = {"image": f"manifest row {image_id}", "true class": analysed[0]["class_names"][label]}
        for m in analysed:
            got = _top3(predictions[m["slug"]], image_id, m["class_names"])
            row[m["name"]] = "–" if got is None else ("" if got[1] else "✗ ") + f"{got[0][0][0]} ({got[0][0][1]})"
        rows.append(row)
    return rows


def _html_gallery(gallery, analysed, predictions, thumbs) -> list[str]:
    parts = [
        f"<h2 id='gallery'>Prediction gallery</h2><p>{len(gallery)} test images drawn with seed {GALLERY_SEED} from those "
        "every run scored (the same images for every report of the same test set); each run's top-3 with its score "
        "(probability, SVM decision score or kNN vote share). <span class='wrong'>✗</span> marks a wrong top-1; "
        "the true class is in bold where it appears.</p><div class='gallery'>"
    ]
    if thumbs is not None and thumbs.note:
        parts.insert(0, f"<p class='note'>{esc(thumbs.note)}</p>")
    for image_id in gallery:
        first = predictions[analysed[0]["slug"]]
        label = int(first.labels[np.flatnonzero(first.ids == image_id)[0]])
        true_name = analysed[0]["class_names"][label]
        lines = []
        for m in analysed:
            got = _top3(predictions[m["slug"]], image_id, m["class_names"])
            if got is None:
                continue
            top, right = got
            items = ", ".join((f"<b>{esc(n)}</b>" if ok else esc(n)) + f" <small>{esc(s)}</small>" for n, s, ok in top)
            mark = "<span class='right'>✓</span>" if right else "<span class='wrong'>✗</span>"
            lines.append(
                f"<tr class='{'ok' if right else 'bad'}'><td>{mark}</td><td class='run'>{esc(m['name'])}</td><td>{items}</td></tr>"
            )
        picture = _img(thumbs.of(image_id, GALLERY_PX, box=False) if thumbs else None, true_name, "photo")
        parts.append(
            f"<div class='card'>{picture}<div class='truth'>{esc(true_name)}<small> · manifest row {image_id}</small></div>"
            f"<table class='preds'>{''.join(lines)}</table></div>"
        )
    parts.append("</div>")
    return parts


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(Path(path).resolve(), Path(start).resolve())


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cars_tl report</title>
<link rel="icon" href="data:,">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; padding: 0 1em; }}
nav {{ margin: 0 0 1em; font-size: 0.95em; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f0f0; }}
td:first-child, th:first-child, td:nth-child(2), td:nth-child(3) {{ text-align: left; }}
tbody tr:nth-child(even) {{ background: #fafafa; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
details {{ margin: 0.4em 0; }} summary {{ cursor: pointer; font-weight: 600; }}
.pair {{ display: flex; gap: 2em; flex-wrap: wrap; }} .pair h4 {{ margin: 0.5em 0 0; }}
table.sortable th {{ cursor: pointer; user-select: none; }} table.sortable th::after {{ content: " ⇅"; color: #999; }}
.pairs {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure.confusion {{ margin: 0.5em; padding: 0.5em; border: 1px solid #ddd; border-radius: 6px; width: 250px; text-align: center; }}
figure.confusion figcaption {{ font-size: 0.8em; margin-top: 0.3em; }}
.arrow {{ font-size: 1.5em; margin: 0 0.3em; vertical-align: middle; }}
img.thumb {{ width: {thumb}px; height: {thumb}px; object-fit: cover; vertical-align: middle; }}
.noimg {{ display: inline-block; width: {thumb}px; font-size: 0.7em; color: #777; vertical-align: middle; }}
.gallery {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 1em; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; }}
.card img.photo {{ width: {photo}px; height: auto; float: left; margin: 0 0.7em 0.3em 0; }}
.card .truth {{ font-weight: 600; margin-bottom: 0.3em; }}
table.preds {{ font-size: 0.78em; margin: 0; clear: both; width: 100%; }}
table.preds td {{ text-align: left; border: none; border-top: 1px solid #eee; padding: 2px 4px; }}
table.preds td.run {{ white-space: nowrap; color: #555; }}
tr.bad {{ background: #fff1f1 !important; }} .wrong {{ color: #c00; font-weight: bold; }} .right {{ color: #080; }}
.note {{ color: #a60; }}
</style></head><body>
{body}
<script>
document.querySelectorAll("table.sortable").forEach(function (table) {{
  table.querySelectorAll("th").forEach(function (th, column) {{
    th.addEventListener("click", function () {{
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var ascending = th.dataset.order !== "asc";
      th.dataset.order = ascending ? "asc" : "desc";
      var value = function (row) {{ var t = row.cells[column].textContent.trim(), n = parseFloat(t.replace(/,/g, ""));
        return isNaN(n) ? t.toLowerCase() : n; }};
      rows.sort(function (a, b) {{ var x = value(a), y = value(b);
        if (typeof x !== typeof y) {{ x = String(x); y = String(y); }}
        return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1); }});
      rows.forEach(function (row) {{ body.appendChild(row); }});
    }});
  }});
}});
</script>
</body></html>
""".replace("{thumb}", str(THUMB_PX)).replace("{photo}", str(GALLERY_PX))
