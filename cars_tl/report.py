"""``report``: every run's metrics gathered into the study's comparison.

Writes ``report.md`` (images beside it) and a self-contained ``report.html`` (images embedded):
the comparison table, the SVM kernel comparison, loss/accuracy curves per run, and the sparsity
chart when ``sparsity`` has been run. Runs still running or broken are listed, not hidden.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from cars_tl import runs
from cars_tl.atomic import atomic_path, atomic_write_text
from cars_tl.errors import CarsTLError

COLUMNS = ("model", "kind", "backbone / weights / preset", "trainable params", "total params", "train time",
           "train loss", "train acc %", "test loss", "test acc %", "test top-5 %", "best epoch")


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(float(seconds), 60)
    return f"{int(minutes)}m {secs:04.1f}s" if minutes else f"{secs:.1f}s"


def row_for(m: dict) -> dict:
    f = m.get("final") or {}
    b = m.get("backbone") or {}
    c = m.get("config") or {}
    if m["kind"] == "svm":
        kernel = f"all kernels (best {f.get('kernel')})" if c.get("kernel") == "all" else f"{c.get('kernel')} kernel"
        setting = f"{kernel}, {c.get('scale')} scaling"
    else:
        setting = c.get("preset", "")
    if m["kind"] == "finetune":
        setting += f", unfreeze {c.get('unfreeze')}"
    return {
        "model": m["name"], "kind": m["kind"], "backbone / weights / preset": f"{b.get('backbone')} / {b.get('weights')} / {setting}",
        "trainable params": _fmt(m.get("params", {}).get("trainable")), "total params": _fmt(m.get("params", {}).get("total")),
        "train time": _duration(m.get("wall_time_s")), "train loss": _fmt(f.get("train_loss"), 4), "train acc %": _fmt(f.get("train_acc")),
        "test loss": _fmt(f.get("test_loss"), 4), "test acc %": _fmt(f.get("test_acc")), "test top-5 %": _fmt(f.get("test_top5")),
        "best epoch": _fmt(f.get("best_epoch")),
    }


def gather(artifacts: Path) -> tuple[list[dict], list[dict]]:
    """(complete runs' metrics, problems: runs running, failed or unreadable)."""
    complete, problems = [], []
    for run_dir in runs.list_runs(artifacts):
        try:
            m = runs.read_metrics(run_dir)
        except CarsTLError as exc:
            problems.append({"run": str(run_dir), "status": "unreadable", "detail": exc.message})
            continue
        if m.get("status") != "complete":
            epochs = len([h for h in m.get("history", []) if h.get("epoch", 0) > 0])
            problems.append({"run": str(run_dir), "status": m.get("status", "?"),
                             "detail": f"{epochs} of {m.get('config', {}).get('epochs', '?')} epochs done"})
            continue
        m["run_dir"] = str(run_dir)
        complete.append(m)
    return complete, problems


def plot_curves(m: dict, path: Path) -> bool:
    """Loss and accuracy per epoch; train solid, test dashed, validation dotted."""
    history = m.get("history", [])
    if not any(h.get("epoch", 0) > 0 for h in history):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def _md_table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(columns, rows) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_report(artifacts: Path = Path("artifacts"), out: Path | None = None, sparsity_dir: Path | None = None) -> dict:
    """Write the report; returns the table rows, kernel rows, problems and file paths."""
    artifacts = Path(artifacts)
    out = Path(out) if out else artifacts / "report"
    sparsity_dir = Path(sparsity_dir) if sparsity_dir else artifacts / "sparsity"
    complete, problems = gather(artifacts)
    if not complete and not problems:
        raise CarsTLError(f"no runs under {artifacts / 'runs'}", "run train-head, fit-svm or finetune first (or make demo)")
    out.mkdir(parents=True, exist_ok=True)
    rows = [row_for(m) for m in complete]
    short = lambda v: f"{v:.4g}" if isinstance(v, float) else _fmt(v)  # noqa: E731 - C and gamma span decades
    kernel_cols = ("run", "kernel", "C", "gamma", "CV acc %", "train acc %", "test acc %", "fit s", "predict s", "support vectors")
    kernels = [
        {"run": m["name"], "kernel": k["kernel"], "C": short(k.get("C", m["config"].get("C"))),  # chosen by CV with --C auto
         "gamma": short(k.get("gamma_value")) if k["kernel"] != "linear" else "", "CV acc %": _fmt(k.get("cv_acc")), "train acc %": _fmt(k["train_acc"]), "test acc %": _fmt(k["test_acc"]),
         "fit s": _fmt(k["fit_seconds"]), "predict s": _fmt(k["predict_seconds"]), "support vectors": _fmt(k["support_vectors"])}
        for m in complete if m["kind"] == "svm" for k in m.get("kernels", {}).values()
    ]
    images: list[tuple[str, Path]] = []
    for m in complete:
        path = out / f"curves-{m['name']}.png"
        if plot_curves(m, path):
            images.append((f"Training curves: {m['name']}", path))
    sparsity_png = sparsity_dir / "sparsity.png"
    if sparsity_png.is_file():
        images.append(("Fraction of zero activations per ReLU call", sparsity_png))

    note = ("Losses are mean cross-entropy per image; accuracies in %. `best epoch` is the epoch whose model was kept "
            "(see each run's metrics.json for how it was selected).")
    md = ["# cars_tl report", "", note, "", "## Comparison", "", _md_table(COLUMNS, rows) if rows else "_no complete runs_"]
    if kernels:
        md += ["", "## SVM kernels", "", _md_table(kernel_cols, kernels)]
    if problems:
        md += ["", "## Incomplete runs", "", _md_table(("run", "status", "detail"), problems)]
    for title, path in images:
        md += ["", f"## {title}", "", f"![{title}]({_relative(path, out)})"]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")

    parts = [f"<h1>cars_tl report</h1><p>{html.escape(note)}</p><h2>Comparison</h2>", _html_table(COLUMNS, rows) if rows else "<p>No complete runs.</p>"]
    if kernels:
        parts += ["<h2>SVM kernels</h2>", _html_table(kernel_cols, kernels)]
    if problems:
        parts += ["<h2>Incomplete runs</h2>", _html_table(("run", "status", "detail"), problems)]
    for title, path in images:
        data = base64.b64encode(Path(path).read_bytes()).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    atomic_write_text(out / "report.html", _HTML.format(body="\n".join(parts)))
    atomic_write_text(out / "report.json", json.dumps({"runs": rows, "kernels": kernels, "incomplete": problems}, indent=2))
    return {"rows": rows, "columns": COLUMNS, "kernels": kernels, "problems": problems,
            "files": {"md": str(out / "report.md"), "html": str(out / "report.html")}}


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(Path(path).resolve(), Path(start).resolve())


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cars_tl report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f0f0; }}
td:first-child, th:first-child, td:nth-child(2), td:nth-child(3) {{ text-align: left; }}
tbody tr:nth-child(even) {{ background: #fafafa; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
</style></head><body>
{body}
</body></html>
"""
