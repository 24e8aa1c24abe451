"""The report's sections, each written once: a function of the report's :class:`Context` returning its Markdown
lines, its HTML parts and its entries in the HTML table of contents. :data:`REGISTRY` holds them in page order."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cars_tl.artifacts import runs
from cars_tl.report.analysis import GALLERY_SEED, TOP_CLASSES, make_of
from cars_tl.report.catalog import (
    COLUMNS,
    GROUP_TITLES,
    KERNEL_COLUMNS,
    KNN_COLUMNS,
    TEST_MARK,
    model_group,
    selected_label,
)
from cars_tl.report.feature_maps import section as feature_map_section
from cars_tl.report.markup import (
    esc,
    fmt,
    html_table,
    img,
    md,
    md_table,
    pct,
    png,
    relative,
    score,
)
from cars_tl.report.thumbnails import GALLERY_PX, Thumbnails

NOTE = (
    "Losses are mean cross-entropy per image; accuracies in %. `best epoch` is the epoch whose model was kept "
    "(see each run's metrics.json for how it was selected). `selected on` says what a run's number was chosen on: "
    f"`test †` ({TEST_MARK}: the best epoch or kernel by test accuracy, optimistic; hatched in the chart, with the "
    "last epoch's number beside it), `validation` (a split of train), `train-cv` (cross-validation on train) or "
    "`none` (nothing chosen). Runs that differ only by seed (and by the values they chose) are one configuration: "
    "mean ± sample standard deviation over its n runs."
)
NOISE_NOTE = ". Per-class results and confusions of these classes partly measure label noise, not the model."


@dataclasses.dataclass
class Context:
    """What the sections show, gathered and computed once (charts already written)."""

    out: Path
    complete: list[dict]  # complete runs, in model order
    problems: list[dict]  # runs running, failed or unreadable, and missing predictions
    rows: list[dict]  # comparison rows, one per complete run
    groups: list[dict]  # seed groups
    kernels: list[dict]
    knn: list[dict]
    analysed: list[dict]  # complete runs with readable predictions (each with its "make_level")
    predictions: dict[str, runs.Predictions]  # by run slug
    class_tables: dict[str, list[dict]]  # per-class accuracy, by run slug
    confusions: dict[str, list[dict]]  # most confused pairs, by run slug
    gallery: list[int]  # manifest ids of the gallery's test images
    thumbs: Thumbnails | None
    noise: list[str]  # lines about the dataset's label noise
    headline: Path | None  # charts, None when not drawn
    overlay: Path | None
    curves: list[tuple[str, Path]]  # (run name, its curves chart)
    sparsity: Path | None
    data_dir: Path | None = None  # the dataset's folder: thumbnails and feature-map pictures


@dataclasses.dataclass
class Section:
    md: list[str] = dataclasses.field(default_factory=list)  # Markdown lines, each section's starting with ""
    html: list[str] = dataclasses.field(default_factory=list)
    toc: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (anchor, link text)


REGISTRY: list[Callable[[Context], Section]] = []


def section(function: Callable[[Context], Section]) -> Callable[[Context], Section]:
    """Register a section; sections appear in the order they are defined."""
    REGISTRY.append(function)
    return function


def toc(entries: list[tuple[str, str]]) -> str:
    return "<nav>" + " · ".join(f"<a href='#{a}'>{esc(t)}</a>" for a, t in entries) + "</nav>"


@section
def dataset(ctx: Context) -> Section:
    noise = ctx.noise
    if not noise:
        return Section()
    return Section(
        md=["", "## Dataset", "", md(noise[0] + NOISE_NOTE), "", *(f"- {md(line)}" for line in noise[1:])],
        html=[
            "<h2 id='dataset'>Dataset</h2>",
            f"<p>{esc(noise[0] + NOISE_NOTE)}</p>",
            "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in noise[1:]) + "</ul>",
        ],
    )


@section
def headline(ctx: Context) -> Section:
    if ctx.headline is None:
        return Section()
    legend = "; ".join(f"{k}: {v}" for k, v in GROUP_TITLES.items())
    return Section(
        md=["", "## Test accuracy by model", "", f"![test accuracy by model]({ctx.headline.name})", "", md(legend)],
        html=[
            "<h2 id='headline'>Test accuracy by model</h2>",
            png(ctx.headline, "test accuracy by model"),
            f"<p>{esc(legend)}</p>",
        ],
        toc=[("headline", "headline chart")],
    )


@section
def comparison(ctx: Context) -> Section:
    return Section(
        md=["", "## Comparison", "", md_table(COLUMNS, ctx.rows) if ctx.rows else "_no complete runs_"],
        html=[
            "<h2 id='comparison'>Comparison</h2>",
            html_table(COLUMNS, ctx.rows) if ctx.rows else "<p>No complete runs.</p>",
        ],
        toc=[("comparison", "comparison")],
    )


SEED_COLUMNS = (
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


@section
def seeds(ctx: Context) -> Section:
    rows = [
        {
            "model": g["group"],
            "setting": g["setting"],
            "backbone / weights": g["backbone"],
            "n": str(g["n"]),
            "seeds": ", ".join("–" if s is None else str(s) for s in g["seeds"]),
            "test acc % (mean ± std)": "–"
            if g["mean"] is None
            else f"{g['mean']:.2f}" + (f" ± {g['std']:.2f}" if g["std"] is not None else ""),
            "selected on": ", ".join(selected_label(on) for on in g["selected_on"]),
            "last-epoch test acc % (mean)": fmt(g["last_epoch_mean"]),
            "runs": ", ".join(g["runs"]),
        }
        for g in ctx.groups
    ]
    entry = [("seeds", "seeds")]  # in the contents even without runs, as before
    if not rows:
        return Section(toc=entry)
    return Section(
        md=["", "## Seeds: configurations and their runs", "", md_table(SEED_COLUMNS, rows)],
        html=[
            "<h2 id='seeds'>Seeds: configurations and their runs</h2>",
            "<p>Runs whose configuration differs only by <code>seed</code>; std is the sample standard deviation (n − 1).</p>",
            html_table(SEED_COLUMNS, rows),
        ],
        toc=entry,
    )


@section
def svm_kernels(ctx: Context) -> Section:
    if not ctx.kernels:
        return Section()
    startups = [
        f"{m['name']} {m['startup_seconds']:.2f} s"
        for m in ctx.complete
        if m["kind"] == "svm" and isinstance(m.get("startup_seconds"), (int, float))
    ]
    note = (
        "The fit s column leaves out each run's one-off start-up (imports), shown apart: " + ", ".join(startups) + "."
        if startups
        else ""
    )
    return Section(
        md=["", "## SVM kernels", "", md_table(KERNEL_COLUMNS, ctx.kernels), *(["", md(note)] if note else [])],
        html=[
            "<h2>SVM kernels</h2>",
            html_table(KERNEL_COLUMNS, ctx.kernels),
            *([f"<p>{esc(note)}</p>"] if note else []),
        ],
    )


@section
def knn(ctx: Context) -> Section:
    if not ctx.knn:
        return Section()
    return Section(
        md=["", "## kNN", "", md_table(KNN_COLUMNS, ctx.knn)],
        html=[
            "<h2>kNN</h2>",
            (
                "<p>Weighted vote of the k most cosine-similar training images, weight exp(cos / T); "
                "the run's result is its first k.</p>"
            ),
            html_table(KNN_COLUMNS, ctx.knn),
        ],
    )


CALIBRATION_COLUMNS = ("run", "base run", "T", "validation images", "test NLL", "test ECE % (15 bins)", "note")


def _percent(fraction) -> str:
    """A fraction read from a run's metrics as a percentage (anything not a number as it is)."""
    return (
        fmt(100 * fraction) if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) else fmt(fraction)
    )


@section
def calibration(ctx: Context) -> Section:
    """Calibrated runs (cars-tl calibrate): T, test NLL and ECE before -> after, each run's reliability diagram."""
    shown = [m for m in ctx.complete if m.get("kind") == "calibrated"]
    if not shown:
        return Section()
    rows, pictures = [], []
    for m in shown:
        c = m.get("calibration") or {}
        test, val = c.get("test") or {}, c.get("validation") or {}
        rows.append(
            {
                "run": m["name"],
                "base run": str((m.get("config") or {}).get("run")),
                "T": fmt(c.get("temperature"), 4),
                "validation images": fmt(val.get("images")),
                "test NLL": f"{fmt(test.get('nll_before'), 4)} → {fmt(test.get('nll_after'), 4)}",
                "test ECE % (15 bins)": " → ".join(_percent(test.get(k)) for k in ("ece_before", "ece_after")),
                "note": str(c.get("note") or ""),
            }
        )
        diagram = Path(m["run_dir"]) / "reliability.png"
        if diagram.is_file():
            pictures.append((m["name"], diagram))
    note = "Temperature scaling fitted on each base run's validation split; ECE: top-1 confidence in 15 equal bins."
    out = Section(
        md=["", "## Calibration", "", md(note), "", md_table(CALIBRATION_COLUMNS, rows)],
        html=["<h2 id='calibration'>Calibration</h2>", f"<p>{esc(note)}</p>", html_table(CALIBRATION_COLUMNS, rows)],
        toc=[("calibration", "calibration")],
    )
    for name, path in pictures:
        out.md += ["", f"![reliability diagram: {md(name)}]({relative(path, ctx.out)})"]
        out.html.append(
            f"<details><summary>Reliability diagram: {esc(name)}</summary>{png(path, 'reliability: ' + name)}</details>"
        )
    return out


@section
def curves(ctx: Context) -> Section:
    out = Section(toc=[("curves", "curves")])  # in the contents even without curves, as before
    if ctx.overlay is not None:
        out.md += ["", "## Test accuracy per epoch, all runs", "", f"![test accuracy per epoch]({ctx.overlay.name})"]
    for name, path in ctx.curves:
        out.md += ["", f"### Training curves: {md(name)}", "", f"![training curves]({path.name})"]
    if ctx.overlay is not None or ctx.curves:
        out.html.append("<h2 id='curves'>Test accuracy per epoch, all runs</h2>")
        if ctx.overlay is not None:
            out.html.append(png(ctx.overlay, "test accuracy per epoch, all runs"))
        for name, path in ctx.curves:
            out.html.append(
                f"<details><summary>Training curves: {esc(name)}</summary>{png(path, 'training curves: ' + name)}</details>"
            )
    return out


MAKE_COLUMNS = (
    "run",
    "model",
    "test images",
    "top-1 %",
    "right make %",
    "errors",
    "errors within the make",
    "within make %",
)


@section
def make_level(ctx: Context) -> Section:
    if not ctx.analysed:
        return Section()
    rows = []
    for m in ctx.analysed:
        mk = m["make_level"]
        rows.append(
            {
                "run": m["name"],
                "model": model_group(m),
                "test images": str(mk["images"]),
                "top-1 %": pct(mk["top1_acc"]),
                "right make %": pct(mk["make_acc"]),
                "errors": str(mk["errors"]),
                "errors within the make": str(mk["errors_within_make"]),
                "within make %": pct(mk["errors_within_make_pct"]),
            }
        )
    return Section(
        md=[
            "",
            "## Make-level accuracy",
            "",
            (
                "The make is the first word of the class name. `right make`: the top-1 "
                "prediction is at least the right make; `errors within the make`: wrong model, right make."
            ),
            "",
            md_table(MAKE_COLUMNS, rows),
        ],
        html=[
            "<h2 id='make'>Make-level accuracy</h2>",
            (
                "<p>The make is the first word of the class name. <b>right make</b>: the top-1 prediction is at least the right "
                "make; <b>errors within the make</b>: wrong model, right make — a fine-grained error.</p>"
            ),
            html_table(MAKE_COLUMNS, rows),
        ],
        toc=[("make", "make level")],
    )


CLASS_COLUMNS = ("class", "test images", "acc %")


def _worst_and_best(m: dict, table: list[dict]) -> tuple[list[dict], list[dict]]:
    """A run's worst and best :data:`TOP_CLASSES` classes with test images (ties: more test images first), as rows."""
    ranked = sorted([r for r in table if r["n"]], key=lambda r: (r["acc"], -r["n"], r["label"]))
    cells = lambda rs: [
        {"class": m["class_names"][r["label"]], "test images": str(r["n"]), "acc %": pct(r["acc"])} for r in rs
    ]
    return cells(ranked[:TOP_CLASSES]), cells(list(reversed(ranked))[:TOP_CLASSES])


@section
def per_class(ctx: Context) -> Section:
    analysed, tables = ctx.analysed, ctx.class_tables
    if not analysed:
        return Section()
    out = Section(
        md=["", "## Per-class accuracy (worst and best 10)"],
        html=[
            "<h2 id='per-class'>Per-class accuracy</h2>",
            (
                "<p>Worst and best 10 classes per run (ties: more test images first). "
                "The full table below sorts by any column (click its header).</p>"
            ),
        ],
        toc=[("per-class", "per class")],
    )
    for i, m in enumerate(analysed):
        worst, best = _worst_and_best(m, tables[m["slug"]])
        out.md += [
            "",
            f"### {md(m['name'])}",
            "",
            "Worst:",
            "",
            md_table(CLASS_COLUMNS, worst),
            "",
            "Best:",
            "",
            md_table(CLASS_COLUMNS, best),
        ]
        out.html.append(
            f"<details{' open' if i == 0 else ''}><summary>{esc(m['name'])}</summary><div class='pair'>"
            f"<div><h4>worst {TOP_CLASSES}</h4>{html_table(CLASS_COLUMNS, worst)}</div>"
            f"<div><h4>best {TOP_CLASSES}</h4>{html_table(CLASS_COLUMNS, best)}</div></div></details>"
        )
    names = analysed[0]["class_names"]
    if all(m["class_names"] == names for m in analysed):
        columns = ["class", "make", "test images"] + [m["name"] for m in analysed]
        rows = []
        for label, name in enumerate(names):
            n = tables[analysed[0]["slug"]][label]["n"]
            row = {"class": name, "make": make_of(name), "test images": str(n)}
            row.update({m["name"]: pct(tables[m["slug"]][label]["acc"]) for m in analysed})
            rows.append(row)
        out.html.append(
            f"<details><summary>All {len(names)} classes × {len(analysed)} runs (sortable)</summary>"
            f"{html_table(columns, rows, cls='sortable')}</details>"
        )
    return out


@section
def confusions(ctx: Context) -> Section:
    if not ctx.analysed:
        return Section()
    thumbs = ctx.thumbs
    out = Section(
        md=["", "## Most confused class pairs"],
        html=[
            "<h2 id='confusions'>Most confused class pairs</h2>",
            (
                "<p>Per run, the most frequent (true class → predicted class) errors; left: a test image of the true class that "
                "was predicted as the other, right: a training image of the predicted class.</p>"
            ),
        ],
        toc=[("confusions", "confusions")],
    )
    if thumbs is not None and thumbs.note:
        out.html.append(f"<p class='note'>{esc(thumbs.note)}</p>")
    for i, m in enumerate(ctx.analysed):
        pairs, names = ctx.confusions[m["slug"]], m["class_names"]
        out.md += ["", f"### {md(m['name'])}", ""]
        out.md += [
            md_table(
                ("true class", "predicted as", "images"),
                [
                    {
                        "true class": names[c["true"]],
                        "predicted as": names[c["predicted"]],
                        "images": f"{c['count']} of {c['of']}",
                    }
                    for c in pairs
                ],
            )
            if pairs
            else "_no errors_"
        ]
        body = (
            "<p>No errors.</p>"
            if not pairs
            else "<div class='pairs'>"
            + "".join(
                "<figure class='confusion'>"
                f"{img(thumbs.of(c['example_id']) if thumbs else None, names[c['true']])}"
                "<span class='arrow'>→</span>"
                f"{img(thumbs.of_class(c['predicted']) if thumbs else None, names[c['predicted']])}"
                f"<figcaption><b>{esc(names[c['true']])}</b> → {esc(names[c['predicted']])}"
                f"<br>{c['count']} of {c['of']} test images</figcaption></figure>"
                for c in pairs
            )
            + "</div>"
        )
        out.html.append(f"<details{' open' if i < 2 else ''}><summary>{esc(m['name'])}</summary>{body}</details>")
    return out


def _top3(p: runs.Predictions, image_id: int, names: list[str]) -> tuple[list[tuple[str, str, bool]], bool] | None:
    """A run's top-3 for one image: (class name, score, is the true class), and whether its top-1 is right."""
    where = np.flatnonzero(p.ids == image_id)
    if not len(where):
        return None
    i = int(where[0])
    true = int(p.labels[i])
    top = [
        (names[int(c)], score(float(s), p.score_kind), int(c) == true)
        for c, s in zip(p.top_classes[i, :3], p.top_scores[i, :3])
    ]
    return top, int(p.top_classes[i, 0]) == true


@section
def gallery(ctx: Context) -> Section:
    if not ctx.gallery:
        return Section()
    analysed, predictions, thumbs = ctx.analysed, ctx.predictions, ctx.thumbs
    rows = []
    html = [
        (
            f"<h2 id='gallery'>Prediction gallery</h2><p>{len(ctx.gallery)} test images drawn with seed {GALLERY_SEED} from those "
            "every run scored (the same images for every report of the same test set); each run's top-3 with its score "
            "(probability, SVM decision score or kNN vote share). <span class='wrong'>✗</span> marks a wrong top-1; "
            "the true class is in bold where it appears.</p><div class='gallery'>"
        )
    ]
    if thumbs is not None and thumbs.note:
        html.insert(0, f"<p class='note'>{esc(thumbs.note)}</p>")
    for image_id in ctx.gallery:
        first = predictions[analysed[0]["slug"]]
        label = int(first.labels[np.flatnonzero(first.ids == image_id)[0]])
        true_name = analysed[0]["class_names"][label]
        row = {"image": f"manifest row {image_id}", "true class": true_name}
        lines = []
        for m in analysed:
            got = _top3(predictions[m["slug"]], image_id, m["class_names"])
            row[m["name"]] = "–" if got is None else ("" if got[1] else "✗ ") + f"{got[0][0][0]} ({got[0][0][1]})"
            if got is None:
                continue
            top, right = got
            items = ", ".join((f"<b>{esc(n)}</b>" if ok else esc(n)) + f" <small>{esc(s)}</small>" for n, s, ok in top)
            mark = "<span class='right'>✓</span>" if right else "<span class='wrong'>✗</span>"
            lines.append(
                f"<tr class='{'ok' if right else 'bad'}'><td>{mark}</td><td class='run'>{esc(m['name'])}</td><td>{items}</td></tr>"
            )
        rows.append(row)
        picture = img(thumbs.of(image_id, GALLERY_PX, box=False) if thumbs else None, true_name, "photo")
        html.append(
            f"<div class='card'>{picture}<div class='truth'>{esc(true_name)}<small> · manifest row {image_id}</small></div>"
            f"<table class='preds'>{''.join(lines)}</table></div>"
        )
    html.append("</div>")
    title = f"## Prediction gallery ({len(ctx.gallery)} test images, seed {GALLERY_SEED}; ✗ = wrong top-1)"
    return Section(
        md=["", title, "", md_table(["image", "true class"] + [m["name"] for m in analysed], rows)],
        html=html,
        toc=[("gallery", "gallery")],
    )


@section
def feature_maps(ctx: Context) -> Section:
    markdown, html = feature_map_section(ctx.complete, ctx.out, ctx.data_dir)
    return Section(md=[markdown] if markdown else [], html=[html] if html else [])


@section
def sparsity(ctx: Context) -> Section:
    if ctx.sparsity is None:
        return Section()
    return Section(
        md=["", "## Fraction of zero activations per ReLU call", "", f"![sparsity]({relative(ctx.sparsity, ctx.out)})"],
        html=["<h2>Fraction of zero activations per ReLU call</h2>", png(ctx.sparsity, "sparsity per ReLU call")],
    )


@section
def problems(ctx: Context) -> Section:
    if not ctx.problems:
        return Section()
    columns = ("run", "status", "detail")
    return Section(
        md=["", "## Incomplete runs and missing predictions", "", md_table(columns, ctx.problems)],
        html=["<h2 id='problems'>Incomplete runs and missing predictions</h2>", html_table(columns, ctx.problems)],
    )
