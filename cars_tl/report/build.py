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

This module builds it: under the report folder's lock, gathers the runs (:mod:`.catalog`), draws the
charts (:mod:`.charts`), analyses the predictions (:mod:`.analysis`), writes every section of
:data:`.sections.REGISTRY` once as Markdown and once as HTML (:mod:`.template`), each file atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from cars_tl.artifacts import names
from cars_tl.core import locks
from cars_tl.core.atomic import atomic_write_text
from cars_tl.core.errors import CarsTLError, check_output_path
from cars_tl.report import analysis, catalog, charts, sections, template
from cars_tl.report.markup import esc
from cars_tl.report.thumbnails import Thumbnails


def build_report(
    artifacts: Path = Path("artifacts"),
    *,
    out: Path | None = None,
    sparsity_dir: Path | None = None,
    data_dir: Path | None = Path("data"),
) -> dict:
    """Write the report; returns the table rows, groups, kernel rows, problems and file paths."""
    artifacts = Path(artifacts)
    out = check_output_path(Path(out) if out else names.report_folder(artifacts), "folder")
    sparsity_dir = Path(sparsity_dir) if sparsity_dir else names.sparsity_folder(artifacts)
    complete, problems = catalog.gather(artifacts)
    if not complete and not problems:
        raise CarsTLError(
            f"no runs under {artifacts / 'runs'}", "run train-head, fit-svm or finetune first (or make demo)"
        )
    out.mkdir(parents=True, exist_ok=True)
    with locks.writer_lock(out, "report"):
        return _write_report(complete, problems, out, sparsity_dir, data_dir)


def _context(complete, problems, out: Path, sparsity_dir: Path, data_dir) -> sections.Context:
    """Everything the sections show: runs in model order, their tables, charts (written here), analyses."""
    catalog.sort_runs(complete)
    rows = [catalog.row_for(m) for m in complete]
    groups = catalog.seed_groups(complete)
    predictions = catalog.load_predictions(complete, problems)
    analysed = [m for m in complete if m["slug"] in predictions]
    thumbs = (
        Thumbnails(data_dir, {(m.get("inputs") or {}).get("dataset_fingerprint") for m in analysed} - {None})
        if analysed
        else None
    )

    headline = out / "headline.png"
    has_headline = charts.plot_headline(groups, complete, headline)
    overlay = out / "test-accuracy-curves.png"
    has_overlay = charts.plot_test_curves(complete, overlay)
    curves: list[tuple[str, Path]] = []
    for m in complete:
        path = out / f"curves-{m['slug']}.png"
        if charts.plot_curves(m, path):
            curves.append((m["name"], path))
    sparsity_png = sparsity_dir / "sparsity.png"

    class_tables, confusions = {}, {}
    for m in analysed:
        p, names = predictions[m["slug"]], m["class_names"]
        m["make_level"] = analysis.make_accuracy(p, names)
        class_tables[m["slug"]] = analysis.per_class_accuracy(p, len(names))
        confusions[m["slug"]] = analysis.confused_pairs(p)
    return sections.Context(
        out=out,
        complete=complete,
        problems=problems,
        rows=rows,
        groups=groups,
        kernels=catalog.kernel_rows(complete),
        knn=catalog.knn_rows(complete),
        analysed=analysed,
        predictions=predictions,
        class_tables=class_tables,
        confusions=confusions,
        gallery=analysis.gallery_ids([predictions[m["slug"]] for m in analysed]),
        thumbs=thumbs,
        noise=analysis.label_noise(
            data_dir, {(m.get("inputs") or {}).get("dataset_fingerprint") for m in complete} - {None}
        ),
        headline=headline if has_headline else None,
        overlay=overlay if has_overlay else None,
        curves=curves,
        sparsity=sparsity_png if sparsity_png.is_file() else None,
        data_dir=data_dir,
    )


def _write_report(complete, problems, out: Path, sparsity_dir: Path, data_dir) -> dict:
    ctx = _context(complete, problems, out, sparsity_dir, data_dir)
    written = [write(ctx) for write in sections.REGISTRY]
    files = {"md": out / "report.md", "html": out / "report.html", "json": out / "report.json"}
    text = ["# cars_tl report", "", sections.NOTE] + [line for s in written for line in s.md]
    atomic_write_text(files["md"], "\n".join(text) + "\n")
    parts = [
        "<h1>cars_tl report</h1>",
        f"<p>{esc(sections.NOTE)}</p>",
        sections.toc([entry for s in written for entry in s.toc]),
    ]
    parts += [part for s in written for part in s.html]
    atomic_write_text(files["html"], template.page("\n".join(parts)))

    analysed = ctx.analysed
    summary = {
        "runs": ctx.rows,
        "seed_groups": [{k: v for k, v in g.items() if k != "key"} for g in ctx.groups],
        "kernels": ctx.kernels,
        "knn": ctx.knn,
        "make_level": {m["name"]: m["make_level"] for m in analysed},
        "confusions": {m["name"]: ctx.confusions[m["slug"]] for m in analysed},
        "gallery_ids": ctx.gallery,
        "incomplete": ctx.problems,
        "label_noise": ctx.noise,
    }
    atomic_write_text(files["json"], json.dumps(summary, indent=2, default=str))
    return {
        "rows": ctx.rows,
        "columns": catalog.COLUMNS,
        "groups": ctx.groups,
        "kernels": ctx.kernels,
        "knn": ctx.knn,
        "problems": ctx.problems,
        "make_level": summary["make_level"],
        "files": {k: str(v) for k, v in files.items()},
        "thumbnails": ctx.thumbs.note if ctx.thumbs is not None and ctx.thumbs.note else None,
    }
