"""What the report compares: complete runs gathered from ``artifacts/runs`` (running, failed or unreadable ones
listed), what each run is (model group, setting, what its number was selected on, its configuration), runs
grouped by seed, and the rows of the comparison, SVM-kernel and kNN tables."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cars_tl.artifacts import hdf5, kinds, runs
from cars_tl.core.atomic import format_size
from cars_tl.core.errors import CarsTLError
from cars_tl.report.markup import duration, fmt

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


def slug(text: str) -> str:
    """A file-name-safe version of ``text``: letters, digits, ``.``, ``_``, ``-``; never empty, never hidden."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip(".-_")[:80]
    return value or "run"


# --------------------------------------------------------------------------- what a run is


def _finetune_group(m: dict) -> str:
    c = m.get("config") or {}
    weights = str((m.get("backbone") or {}).get("weights", c.get("weights")))
    unfreeze = str(c.get("unfreeze"))
    if weights == "random" and unfreeze == "all":
        return "A"
    if unfreeze not in ("all", "none"):  # D's recipe (the demo runs it on random weights too)
        return "D"
    return f"finetune ({'random' if weights == 'random' else 'pretrained'}, unfreeze {unfreeze})"


def _preset(m: dict) -> str:
    return str((m.get("config") or {}).get("preset", ""))


def _svm_kernel(m: dict, suffix: str) -> str:
    c, f = m.get("config") or {}, m.get("final") or {}
    return f"all kernels (best {f.get('kernel')})" if c.get("kernel") == "all" else f"{c.get('kernel')}{suffix}"


def _svm_setting(m: dict) -> str:
    scale = (m.get("config") or {}).get("scale")
    return _svm_kernel(m, "") + ("" if scale in (None, "l2") else f", {scale} scaling")


def _knn_setting(m: dict) -> str:
    return f"k={(m.get('final') or {}).get('k')}, T={(m.get('config') or {}).get('temperature')}"


def _finetune_setting(m: dict) -> str:
    unfreeze = "" if model_group(m) in ("A", "D") else f", unfreeze {(m.get('config') or {}).get('unfreeze')}"
    return _preset(m) + unfreeze


@dataclasses.dataclass(frozen=True)
class KindView:
    """How the report shows runs of one kind (registered as the kind's ``view``, :mod:`cars_tl.artifacts.kinds`):
    its model group, what sets it apart within the group, and its label in the comparison table."""

    group: Callable[[dict], str]
    setting: Callable[[dict], str]
    label: Callable[[dict], str]


kinds.register("head", view=KindView(group=lambda m: "B", setting=_preset, label=_preset))
kinds.register(
    "svm",
    view=KindView(
        group=lambda m: "C",
        setting=_svm_setting,
        label=lambda m: f"{_svm_kernel(m, ' kernel')}, {(m.get('config') or {}).get('scale')} scaling",
    ),
)
kinds.register("knn", view=KindView(group=lambda m: "kNN", setting=_knn_setting, label=_knn_setting))
kinds.register(
    "finetune",
    view=KindView(
        group=_finetune_group,
        setting=_finetune_setting,
        label=lambda m: (
            f"{(m.get('config') or {}).get('preset', '')}, unfreeze {(m.get('config') or {}).get('unfreeze')}"
        ),
    ),
)
kinds.register(
    "calibrated",
    view=KindView(
        group=lambda m: "calibrated",
        setting=lambda m: (
            f"T={(m.get('calibration') or {}).get('temperature')} of {(m.get('config') or {}).get('run')}"
        ),
        label=lambda m: f"T={(m.get('calibration') or {}).get('temperature')}",
    ),
)
# The views by kind, as registered above (the old table's name; the kind records hold them).
KIND_VIEWS: dict[str, KindView] = {k.name: k.view for k in kinds.RUN_KINDS.values() if k.view is not None}


def _view(m: dict) -> KindView | None:
    kind = kinds.RUN_KINDS.get(m.get("kind"))
    return kind.view if kind is not None else None


def model_group(m: dict) -> str:
    """The study's model letter from what the run did: A, B, C, D, kNN (or a description)."""
    view = _view(m)
    return view.group(m) if view else str(m.get("kind"))


def setting(m: dict) -> str:
    """What distinguishes the run within its model group: preset, kernel, k."""
    view = _view(m)
    return view.setting(m) if view else _preset(m)


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
        # A random backbone's digest is that of the weights its seed drew: the seed, in another form.
        "weights_digest": "random" if b.get("weights") == "random" else b.get("weights_digest", b.get("weights")),
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


# --------------------------------------------------------------------------- gathering


def row_for(m: dict) -> dict:
    """A run's row of the comparison table (:data:`COLUMNS`), formatted."""
    f = m.get("final") or {}
    b = m.get("backbone") or {}
    label = _view(m).label(m)
    params = m.get("params") or {}
    return {
        "model": m["name"],
        "kind": m["kind"],
        "backbone / weights / preset": f"{b.get('backbone')} / {b.get('weights')} / {label}",
        "trainable params": fmt(params.get("trainable")),
        "total params": fmt(params.get("total")),
        "train time": duration(m.get("wall_time_s"))
        + (" (trunk cache)" if (m.get("trunk_cache") or {}).get("used") else ""),
        "train loss": fmt(f.get("train_loss"), 4),
        "train acc %": fmt(f.get("train_acc")),
        "test loss": fmt(f.get("test_loss"), 4),
        "test acc %": fmt(f.get("test_acc")),
        "test top-5 %": fmt(f.get("test_top5")),
        "best epoch": fmt(f.get("best_epoch")),
        "selected on": selected_label(selected_on(m)),
        "last-epoch test acc %": fmt((f.get("last_epoch") or {}).get("test_acc")),
    }


def selected_label(on: str) -> str:
    """``selected on`` as shown: a test selection marked with † and :data:`TEST_MARK`."""
    return f"test † ({TEST_MARK})" if on == SELECTED_ON_TEST else on


# Bounds far above any run cars_tl writes (a finetune of 100 epochs: ~100 kB of metrics.json); a run
# past them is listed, not drawn: its charts and tables would take minutes and gigabytes.
MAX_METRICS_BYTES = 16 << 20
MAX_ENTRIES = {"history": 10_000, "k_results": 1_000, "kernels": 100, "class_names": hdf5.MAX_CLASSES}
MAX_NAME_CHARS = 200
MAX_TEXT_CHARS = 20_000  # a failed run's error may hold a traceback


class TooLarge(CarsTLError):
    """A run's files are larger than a run's can be (listed as "too large")."""


def check_size(run_dir: Path, m: dict | None = None) -> None:
    """A CarsTLError when ``run_dir``'s metrics.json (with ``m``: its lists) is larger than a run's can be."""
    if m is None:
        path = Path(run_dir) / runs.METRICS
        size = path.stat().st_size if path.is_file() else 0  # no file: read_metrics says so
        if size > MAX_METRICS_BYTES:
            raise TooLarge(
                f"{runs.METRICS} is {format_size(size)}, more than the {format_size(MAX_METRICS_BYTES)} a run writes"
            )
        return
    for key, limit in MAX_ENTRIES.items():
        value = m.get(key)
        if isinstance(value, (list, dict)) and len(value) > limit:
            raise TooLarge(f"{runs.METRICS} has {len(value)} {key}, more than the {limit} a run has")
    for key, value in m.items():  # a text shown as a label or a cell: every table and chart would carry it
        longest = _longest_text(value)
        if longest > MAX_TEXT_CHARS:
            raise TooLarge(
                f"{runs.METRICS} holds a text of {longest} characters under {key!r}, more than {MAX_TEXT_CHARS}"
            )


def _longest_text(value) -> int:
    longest, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            longest = max(longest, len(v))
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return longest


def gather(artifacts: Path) -> tuple[list[dict], list[dict]]:
    """(complete runs' metrics, problems: runs running, failed, unreadable or too large)."""
    complete, problems = [], []
    slugs: set[str] = set()
    for run_dir in runs.list_runs(artifacts):
        try:
            check_size(run_dir)
            m = runs.read_metrics(run_dir)
            check_size(run_dir, m)
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
            if len(m["name"]) > MAX_NAME_CHARS:  # a name is a label: charts and tables stay readable
                m["name"] = m["name"][: MAX_NAME_CHARS - 1] + "…"
            row_for(m)  # a run whose metrics cannot fill a row is a broken run, not a crash
        except CarsTLError as exc:
            status = "too large" if isinstance(exc, TooLarge) else "unreadable"
            problems.append({"run": str(run_dir), "status": status, "detail": exc.message})
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


def load_predictions(complete: list[dict], problems: list[dict]) -> dict[str, runs.Predictions]:
    """Each complete run's saved test predictions by run slug; a missing or bad file is added to ``problems``."""
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


def _grid_note(search: dict | None) -> str:
    """A C grid extended past its end (fit-svm --C auto), in a few words."""
    ext = (search or {}).get("C_grid_extended")
    if not ext:
        return ""
    return " ".join(f"extended {d} ×{ext[d]}" for d in ("up", "down") if ext[d]) + (
        " (cap hit)" if ext.get("capped") else ""
    )


def sort_runs(complete: list[dict]) -> None:
    """In model order (A, B, C, D, kNN, then others), by name within a model."""
    rank = {name: i for i, name in enumerate(GROUP_ORDER)}
    complete.sort(key=lambda m: (rank.get(model_group(m), len(rank)), m["name"]))


KERNEL_COLUMNS = (
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


def kernel_rows(complete: list[dict]) -> list[dict]:
    """One row per kernel of every SVM run."""
    short = lambda v: f"{v:.4g}" if isinstance(v, float) else fmt(v)  # C and gamma span decades
    return [
        {
            "run": m["name"],
            "kernel": k.get("kernel"),
            "C": short(k.get("C", (m.get("config") or {}).get("C"))),  # chosen by CV with --C auto
            "gamma": short(k.get("gamma_value")) if k.get("kernel") != "linear" else "",
            "CV acc % (mean ± std of folds)": fmt(k.get("cv_acc"))
            + (f" ± {k['cv_std']:.2f}" if k.get("cv_std") is not None else ""),
            "C grid": _grid_note(k.get("search")),
            "train acc %": fmt(k.get("train_acc")),
            "test acc %": fmt(k.get("test_acc")),
            "fit s": fmt(k.get("fit_seconds")),
            "predict s": fmt(k.get("predict_seconds")),
            "support vectors": fmt(k.get("support_vectors")),
        }
        for m in complete
        if m["kind"] == "svm"
        for k in (m.get("kernels") or {}).values()
    ]


KNN_COLUMNS = ("run", "k", "temperature", "test acc %", "test top-5 %")


def knn_rows(complete: list[dict]) -> list[dict]:
    """One row per k of every kNN run."""
    return [
        {
            "run": m["name"],
            "k": fmt(r.get("k")),
            "temperature": fmt((m.get("config") or {}).get("temperature"), 3),
            "test acc %": fmt(r.get("test_acc")),
            "test top-5 %": fmt(r.get("test_top5")),
        }
        for m in complete
        if m["kind"] == "knn"
        for r in (m.get("k_results") or {}).values()
    ]
