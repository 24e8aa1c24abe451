"""The report's charts (matplotlib, PNG written atomically): the headline chart of test accuracy by model,
every run's test accuracy per epoch in one chart, and each run's loss and accuracy curves."""

from __future__ import annotations

from pathlib import Path

from cars_tl.core.atomic import atomic_path
from cars_tl.report.catalog import TEST_MARK, model_group

PRESET_COLOURS = {"study": "#4C72B0", "tuned": "#DD8452"}
OTHER_COLOUR = "#8C8C8C"
GROUP_COLOURS = {"A": "#C44E52", "B": "#4C72B0", "C": "#55A868", "D": "#8172B3", "kNN": "#937860"}


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
