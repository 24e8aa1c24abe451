"""What the commands print beyond one line: fit-svm's kernel table, predict's top-k table, report's runs
table, and the closing line of a training run. Rich is imported here, torch never."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from cars_tl.console import labelled


def final_line(run_dir: Path, metrics: dict) -> str:
    """train-head's and finetune's closing line: final train and test numbers, parameters, time."""
    f = metrics["final"]
    measured = all(f.get(k) is not None for k in ("test_loss", "test_acc", "test_top5"))
    test = (
        f"test loss {f['test_loss']:.4f} acc {f['test_acc']:.2f}% top-5 {f['test_top5']:.2f}%"
        if measured
        else "no test split (train-only dataset): nothing measured on test"
    )
    return (
        f"{metrics['kind']} run {run_dir}: train loss {f['train_loss']:.4f} acc {f['train_acc']:.2f}% | {test} | "
        f"trainable {metrics['params']['trainable']:,} of {metrics['params']['total']:,} params | {metrics['wall_time_s']:.1f} s"
    )


def svm_table(features: Path, metrics: dict) -> Table:
    """One row per fitted kernel; with a search (--C auto, --gamma cv) the chosen values and CV accuracy too."""
    config = metrics["config"]
    searched = any("search" in r for r in metrics["kernels"].values())
    table = Table(title=f"SVM on {features.name} ({config['scale']} scaling, C={config['C']}, gamma={config['gamma']})")
    if metrics.get("startup_seconds") is not None:
        table.caption = f"start-up (imports, once): {metrics['startup_seconds']:.2f} s, not in any kernel's fit s"
    columns = (
        ["kernel"]
        + (["C", "gamma", "CV acc %"] if searched else [])
        + ["train acc %", "test acc %", "fit s", "predict s", "support vectors"]
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "kernel" else "right")
    for r in metrics["kernels"].values():
        chosen = (
            [
                f"{r['C']:g}",
                f"{r['gamma_value']:.4g}" if r["kernel"] != "linear" else "-",
                f"{r['cv_acc']:.2f} ± {r['cv_std']:.2f}",
            ]
            if searched
            else []
        )
        table.add_row(
            r["kernel"],
            *chosen,
            f"{r['train_acc']:.2f}",
            f"{r['test_acc']:.2f}",
            f"{r['fit_seconds']:.2f}",
            f"{r['predict_seconds']:.2f}",
            str(r["support_vectors"]),
        )
    return table


def prediction_table(result: dict) -> Table:
    """One image: a column per model, its top-k classes with probability (or SVM decision score)."""
    table = Table(title=result["image"], show_lines=False)
    table.add_column("#", justify="right")
    for name, p in result["predictions"].items():
        table.add_column(labelled(f"{name}\n", (f"{p['kind']} · {p['score_kind']}", "dim")))
    rows = max(len(p["top"]) for p in result["predictions"].values())
    for i in range(rows):
        cells = []
        for p in result["predictions"].values():
            t = p["top"][i] if i < len(p["top"]) else None
            value = (
                f"{100 * t['score']:.1f}%"
                if t and p["score_kind"] == "probability"
                else (f"{t['score']:.3f}" if t else "")
            )
            cells.append(labelled(f"{t['class']} ", (value, "bold")) if t else "")
        table.add_row(str(i + 1), *cells)
    return table


def runs_table(result: dict) -> Table:
    """The report's comparison, as the terminal shows it (without kind, total params and best epoch)."""
    table = Table(title="cars_tl runs")
    shown = [c for c in result["columns"] if c not in ("kind", "total params", "best epoch")]
    for column in shown:
        table.add_column(
            column, justify="left" if column in ("model", "kind", "backbone / weights / preset") else "right"
        )
    for row in result["rows"]:
        table.add_row(*(row[c] for c in shown))
    return table
