"""report: every run in the table, curves, kernels, sparsity chart, incomplete runs listed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TOY_CLASSES, toy_run
from typer.testing import CliRunner

from cars_tl.artifacts import runs
from cars_tl.cli import app
from cars_tl.core import locks
from cars_tl.core.errors import CarsTLError
from cars_tl.report import analysis, build, catalog, markup
from cars_tl.stages.sparsity import measure


def test_report_mentions_every_run(demo_dir, demo_finetune_run, demo_head_run, demo_svm_run, tmp_path):
    artifacts = tmp_path / "artifacts"
    for run in (demo_finetune_run, demo_head_run, demo_svm_run):
        shutil.copytree(run, artifacts / "runs" / run.name)
    broken = artifacts / "runs" / "half-done"
    shutil.copytree(demo_finetune_run, broken)
    metrics = json.loads((broken / runs.METRICS).read_text())
    metrics.update(status="running", name="half-done")
    (broken / runs.METRICS).write_text(json.dumps(metrics))
    measure([demo_head_run], split="test", limit=2, data_dir=demo_dir, out=artifacts / "sparsity")

    result = CliRunner().invoke(app, ["report", "--artifacts", str(artifacts)])
    assert result.exit_code == 0, result.output
    md = (artifacts / "report" / "report.md").read_text()
    html = (artifacts / "report" / "report.html").read_text()
    for run in (demo_finetune_run, demo_head_run, demo_svm_run):
        assert run.name in md and run.name in html
    assert "half-done" in md and "Incomplete runs" in md and "half-done" in result.output.replace("\n", "")
    assert "SVM kernels" in md and "poly" in md
    assert "sparsity.png" in md and html.count("data:image/png;base64,") >= 3  # curves x2 + sparsity
    assert (artifacts / "report" / f"curves-{demo_finetune_run.name}.png").is_file()
    assert "23,909,636" not in md  # resnet18 here: the table shows the runs' own counts
    assert f"{runs.read_metrics(demo_head_run)['params']['trainable']:,}" in md


def test_report_without_runs_says_what_to_do(tmp_path):
    result = CliRunner().invoke(app, ["report", "--artifacts", str(tmp_path)])
    assert result.exit_code == 2 and "train-head" in result.output


# --------------------------------------------------------------------------- analysis of saved predictions


def _toy_predictions(labels, first, ids=None):
    labels = np.asarray(labels)
    first = np.asarray(first)
    others = np.array([[c for c in range(4) if c != f][:2] for f in first])
    top = np.concatenate([first[:, None], others], axis=1)
    ids = np.arange(len(labels)) if ids is None else np.asarray(ids)
    return runs.Predictions(ids, labels, top, np.ones(top.shape, np.float32), "probability")


def test_per_class_and_make_level_accuracy_on_a_hand_made_set():
    # true:  0 0 0 1 1 2 2 2   (class 3 has no test image)
    # pred:  0 0 1 1 0 2 0 3   -> class 0: 2/3, class 1: 1/2, class 2: 1/3
    p = _toy_predictions([0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 0, 2, 0, 3])
    table = analysis.per_class_accuracy(p, 4)
    assert [(r["n"], r["correct"]) for r in table] == [(3, 2), (2, 1), (3, 1), (0, 0)]
    assert table[0]["acc"] == pytest.approx(200 / 3) and table[3]["acc"] is None
    mk = analysis.make_accuracy(p, TOY_CLASSES)
    # Errors: 0->1 (Audi->Audi), 1->0 (Audi->Audi), 2->0 (BMW->Audi), 2->3 (BMW->Volvo).
    assert mk["errors"] == 4 and mk["errors_within_make"] == 2 and mk["errors_within_make_pct"] == 50.0
    assert mk["top1_acc"] == 50.0 and mk["make_acc"] == 75.0 and mk["makes"] == 3
    pairs = analysis.confused_pairs(p, top=2)
    assert [(c["true"], c["predicted"], c["count"]) for c in pairs] == [(0, 1, 1), (1, 0, 1)]
    assert pairs[0]["example_id"] == 2 and pairs[0]["of"] == 3
    assert analysis.make_of("AM General Hummer SUV 2000") == "AM"


def test_the_gallery_is_a_fixed_sample_of_images_every_run_scored():
    a = _toy_predictions([0] * 40, [0] * 40, ids=np.arange(40))
    b = _toy_predictions([0] * 30, [0] * 30, ids=np.arange(10, 40))
    first = analysis.gallery_ids([a, b], size=8, seed=0)
    assert first == analysis.gallery_ids([b, a], size=8, seed=0) and len(first) == 8
    assert all(10 <= i < 40 for i in first) and first == sorted(first)
    assert analysis.gallery_ids([a, b], size=8, seed=1) != first


def test_runs_that_differ_only_by_seed_are_one_group(tmp_path):
    artifacts = tmp_path / "artifacts"
    for seed, acc in ((0, 40.0), (1, 50.0), (2, 60.0)):
        toy_run(artifacts, f"B-s{seed}", seed=seed, test_acc=acc)
    toy_run(artifacts, "B-tuned", preset="tuned", test_acc=70.0)
    toy_run(artifacts, "B-lr", seed=1, lr=0.1, test_acc=10.0)  # another learning rate: another configuration
    complete, problems = catalog.gather(artifacts)
    assert not problems
    groups = {tuple(g["runs"]): g for g in catalog.seed_groups(complete)}
    seeded = groups[("B-s0", "B-s1", "B-s2")]
    assert seeded["n"] == 3 and seeded["mean"] == pytest.approx(50.0) and seeded["std"] == pytest.approx(10.0)
    assert sorted(seeded["seeds"]) == [0, 1, 2] and seeded["group"] == "B"
    assert groups[("B-tuned",)]["n"] == 1 and groups[("B-tuned",)]["std"] is None
    assert ("B-lr",) in groups and len(groups) == 3
    result = build.build_report(artifacts, data_dir=None)
    md = Path(result["files"]["md"]).read_text()
    assert "50.00 ± 10.00" in md and "| B | study | resnet18 / random | 3 | 0, 1, 2 |" in md


def test_random_backbones_trained_with_two_seeds_are_one_group(demo_dir, tmp_path):
    """Model A with --weights random: each seed draws other backbone weights (another weights digest),
    which is the seed, not another configuration."""
    from helpers import tiny

    from cars_tl.stages.finetune import finetune

    artifacts = tmp_path / "artifacts"
    for seed in (0, 1):
        finetune(
            demo_dir, unfreeze="all", epochs=1, seed=seed, trunk_cache="off",
            out=artifacts / "runs" / f"A-s{seed}", **tiny(batch_size=16),
        )  # fmt: skip
    digests = {runs.read_metrics(artifacts / "runs" / f"A-s{s}")["backbone"]["weights_digest"] for s in (0, 1)}
    assert len(digests) == 2  # what used to split them
    complete, problems = catalog.gather(artifacts)
    assert not problems
    groups = catalog.seed_groups(complete)
    assert [(sorted(g["runs"]), g["n"], sorted(g["seeds"])) for g in groups] == [(["A-s0", "A-s1"], 2, [0, 1])]


def test_model_groups_follow_what_the_run_did():
    ft = lambda weights, unfreeze: {
        "kind": "finetune",
        "backbone": {"weights": weights},
        "config": {"unfreeze": unfreeze},
    }  # noqa: E731
    assert catalog.model_group(ft("random", "all")) == "A"
    assert catalog.model_group(ft("imagenet", "layer4")) == "D"
    assert catalog.model_group(ft("imagenet", "all")).startswith("finetune (pretrained")
    assert [catalog.model_group({"kind": k}) for k in ("head", "svm", "knn")] == ["B", "C", "kNN"]


def test_report_with_a_broken_run_still_renders(tmp_path):
    artifacts = tmp_path / "artifacts"
    toy_run(artifacts, "good", test_acc=75.0, labels=(0, 1, 2, 3), first=(0, 1, 2, 0))
    truncated = artifacts / "runs" / "truncated"
    truncated.mkdir()
    (truncated / runs.METRICS).write_text('{"kind": "head", "format_')
    wrong_shape = artifacts / "runs" / "wrong-shape"
    wrong_shape.mkdir()
    (wrong_shape / runs.METRICS).write_text(
        json.dumps({"kind": "head", "format_version": 1, "status": "complete", "final": [1, 2]})
    )
    garbage = toy_run(artifacts, "garbage-predictions")
    runs.predictions_path(garbage).write_bytes(b"not a zip file")
    result = CliRunner().invoke(app, ["report", "--artifacts", str(artifacts), "--data-dir", str(tmp_path / "nowhere")])
    assert result.exit_code == 0, result.output
    html = (artifacts / "report" / "report.html").read_text()
    statuses = {
        Path(p["run"]).name: p["status"]
        for p in json.loads((artifacts / "report" / "report.json").read_text())["incomplete"]
    }
    assert statuses == {"truncated": "unreadable", "wrong-shape": "unreadable", "garbage-predictions": "no predictions"}
    assert "Make-level accuracy" in html and "Prediction gallery" in html and "garbage-predictions" in html
    assert "Ford" not in html and "no thumbnails" in html  # no manifest: sections without pictures, said so
    assert "<table class='sortable'>" in html and "75.0" in html


def test_a_malicious_run_name_writes_nothing_outside_the_report(tmp_path):
    artifacts = tmp_path / "a" / "b" / "artifacts"
    epochs = [
        {"epoch": e, "train_loss": 1.0 / e, "train_acc": 50.0 + e, "test_loss": 1.2 / e, "test_acc": 40.0 + e}
        for e in (1, 2)
    ]
    toy_run(artifacts, "evil", display_name="../../../x", test_acc=60.0, history=epochs)
    toy_run(artifacts, "pipes", display_name="a | b <script>alert(1)</script> [x](y)")
    before = {p for p in tmp_path.rglob("*")}
    out = artifacts / "report"
    build.build_report(artifacts, data_dir=None)
    created = {p for p in tmp_path.rglob("*")} - before
    outside = {p for p in created if out not in p.parents and p != out}
    assert outside == {locks.lock_path(out)}  # only the report's own lock, beside it
    assert not list(tmp_path.rglob("x.png")) and (out / "curves-evil.png").is_file()
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "a \\| b \\<script\\>alert\\(1\\)\\</script\\> \\[x\\]\\(y\\)" in md and "<script>alert" not in md
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert catalog.slug("../../../x") == "x" and catalog.slug("..") == "run" and catalog.slug(".hidden") == "hidden"


def test_saved_predictions_agree_with_each_stage_s_reported_accuracy(
    demo_head_run, demo_svm_run, demo_finetune_run, demo_features, tmp_path
):
    from cars_tl.artifacts import features
    from cars_tl.models.svm import model as svm
    from cars_tl.stages.knn import run_knn

    knn_run, _ = run_knn(demo_features, ks=(5, 10), out=tmp_path / "knn")
    for run_dir in (demo_head_run, demo_svm_run, demo_finetune_run, knn_run):
        p = runs.read_predictions(run_dir)
        m = runs.read_metrics(run_dir)
        assert len(p.ids) == 72 and p.top_classes.shape == (72, 5)
        assert p.accuracy() == pytest.approx(m["final"]["test_acc"], abs=1e-3), run_dir
    test = features.load(demo_features).split("test")
    model = svm.load_model(runs.model_file(demo_svm_run))
    p = runs.read_predictions(demo_svm_run)
    assert list(p.ids) == list(test.ids) and (p.top_classes[:, 0] == model.predict(test.features)).all()
    assert p.score_kind == "decision score"


def test_predict_split_rewrites_a_run_s_predictions(demo_dir, demo_head_run, tmp_path):
    from cars_tl.stages.predict import predict_split

    run_dir = tmp_path / "head"
    shutil.copytree(demo_head_run, run_dir)
    saved = runs.read_predictions(run_dir)
    runs.predictions_path(run_dir).unlink()
    result = CliRunner().invoke(
        app, ["predict", "--split", "test", "--model", str(run_dir), "--data-dir", str(demo_dir)]
    )
    assert result.exit_code == 0, result.output
    again = runs.read_predictions(run_dir)
    assert (again.ids == saved.ids).all() and (again.top_classes[:, 0] == saved.top_classes[:, 0]).all()
    np.testing.assert_allclose(again.top_scores, saved.top_scores, atol=1e-4)
    with pytest.raises(CarsTLError, match="either image files or --split"):
        predict_split([run_dir], split="test", data_dir=demo_dir, images=[Path("x.jpg")])


def test_top_predictions_map_svm_columns_and_keep_its_own_rank_1(tmp_path):
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    top, values = runs.top_predictions(scores, columns=[2, 4, 7], first=[7, 4])
    assert top.tolist() == [[7, 4, 2], [4, 2, 7]] and values[0].tolist() == [0.4, 0.5, 0.1]
    top, values = runs.top_predictions(np.array([1.0, -2.0]), columns=[3, 8])  # sklearn's binary decision value
    assert top.tolist() == [[8, 3], [3, 8]] and values[:, 0].tolist() == [1.0, 2.0]
    path = runs.write_predictions(tmp_path, [5, 6], [7, 2], scores, "decision score", columns=[2, 4, 7], first=[7, 4])
    p = runs.read_predictions(tmp_path)
    assert path.name == "predictions-test.npz" and p.ids.tolist() == [5, 6] and p.accuracy() == 50.0
    assert not list(tmp_path.glob(".*tmp*"))


def test_numbers_selected_on_test_are_marked_and_the_last_epoch_shown(demo_dir, demo_features, tmp_path, monkeypatch):
    """A study finetune (best epoch by test accuracy) and a study `fit-svm --kernel all` (kernel by test
    accuracy) are marked as selected on test -- hatched bars with a legend entry, a `selected on`
    column -- beside a tuned head (chosen on validation); the finetune's last-epoch number is shown."""
    import matplotlib.axes
    from helpers import tiny

    from cars_tl.stages.finetune import finetune
    from cars_tl.stages.fit_svm import fit_svm
    from cars_tl.stages.train_head import train_head

    artifacts = tmp_path / "artifacts"
    _, ft = finetune(demo_dir, unfreeze="layer4", epochs=2, out=artifacts / "runs" / "D-study", **tiny(batch_size=16))
    _, svm_all = fit_svm(demo_features, kernel="all", out=artifacts / "runs" / "C-all")
    _, head = train_head(demo_features, preset="tuned", epochs=2, out=artifacts / "runs" / "B-tuned")
    assert ft["final"]["selected_on"] == "test" and ft["selection"]["chosen"]["best_epoch"] == ft["final"]["best_epoch"]
    assert (
        ft["final"]["last_epoch"]["epoch"] == 2
        and ft["final"]["last_epoch"]["test_acc"] == ft["history"][-1]["test_acc"]
    )
    assert (
        svm_all["final"]["selected_on"] == "test"
        and svm_all["selection"]["chosen"]["kernel"] == svm_all["final"]["kernel"]
    )
    assert head["final"]["selected_on"] == "validation"

    bars = []
    original_bar = matplotlib.axes.Axes.bar
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "bar",
        lambda self, x, h, *a, **k: bars.append((h, k.get("hatch"))) or original_bar(self, x, h, *a, **k),
    )
    legends = []
    original_legend = matplotlib.axes.Axes.legend
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "legend",
        lambda self, *a, **k: (
            legends.append([h.get_label() for h in k.get("handles", [])]) or original_legend(self, *a, **k)
        ),
    )
    result = build.build_report(artifacts, data_dir=None)

    groups = {g["runs"][0]: g for g in result["groups"]}
    assert groups["D-study"]["on_test"] and groups["C-all"]["on_test"] and not groups["B-tuned"]["on_test"]
    hatched = {round(h, 6) for h, hatch in bars if hatch}
    assert hatched == {round(ft["final"]["test_acc"], 6), round(svm_all["final"]["test_acc"], 6)}
    assert any(catalog.TEST_MARK in labels for labels in legends)
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["D-study"]["selected on"].startswith("test †") and rows["C-all"]["selected on"].startswith("test †")
    assert rows["B-tuned"]["selected on"] == "validation"
    assert rows["D-study"]["last-epoch test acc %"] == f"{ft['final']['last_epoch']['test_acc']:.2f}"
    md = Path(result["files"]["md"]).read_text()
    html = Path(result["files"]["html"]).read_text()
    for text in (md, html):
        assert catalog.TEST_MARK in text and "last-epoch test acc %" in text
    assert md.count(markup.md(f"test † ({catalog.TEST_MARK})")) == 4  # two runs, in the comparison and the seeds tables


def test_runs_written_before_selection_had_chosen_still_group_their_seeds(tmp_path):
    """Older tuned train-head runs wrote the weight decay they chose into config (selection had only
    the grid): the report still groups their seeds, and an explicit --weight-decay stays a setting."""
    artifacts = tmp_path / "artifacts"
    for seed, wd in ((0, 1e-3), (1, 1e-2), (2, 1e-3)):
        run_dir = toy_run(artifacts, f"B-tuned-s{seed}", preset="tuned", seed=seed, weight_decay=wd)
        metrics = runs.read_metrics(run_dir)
        metrics["selection"] = {"by": "cross-entropy on a validation split of train", "grid": [{"weight_decay": wd}]}
        runs.write_metrics(run_dir, metrics)
    toy_run(artifacts, "B-tuned-fixed", preset="tuned", weight_decay=1e-1)  # told, not chosen: another configuration
    complete, _ = catalog.gather(artifacts)
    groups = {tuple(sorted(g["runs"])): g for g in catalog.seed_groups(complete)}
    assert set(groups) == {("B-tuned-s0", "B-tuned-s1", "B-tuned-s2"), ("B-tuned-fixed",)}
    assert groups[("B-tuned-s0", "B-tuned-s1", "B-tuned-s2")]["selected_on"] == ["validation"]
    assert groups[("B-tuned-fixed",)]["selected_on"] == ["none"]


def test_every_run_kind_has_a_view_in_the_report():
    from cars_tl.artifacts import runs

    assert set(catalog.KIND_VIEWS) == set(runs.KINDS)
    assert all(isinstance(k.view, catalog.KindView) for k in runs.RUN_KINDS.values())  # on the kind's record


def _npz_declaring(path: Path, rows: int, data: bool) -> None:
    """A predictions file whose arrays declare ``rows`` rows: zeros deflated to almost nothing (a bomb),
    or (``data=False``) no data at all behind the headers."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, shape, dtype in (
            ("ids", (rows,), "<i8"),
            ("labels", (rows,), "<i8"),
            ("top_classes", (rows, 5), "<i8"),
            ("top_scores", (rows, 5), "<f4"),
        ):
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False, "shape": shape})
                f.write(header.getvalue())
                size = int(np.prod(shape)) * np.dtype(dtype).itemsize if data else 0
                for start in range(0, size, 1 << 24):
                    f.write(bytes(min(1 << 24, size - start)))
        for key in ("score_kind", "split"):
            with zf.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, np.array("probability" if key == "score_kind" else "test"))


def test_report_over_hostile_runs_lists_them_and_stays_small(tmp_path):
    import tracemalloc

    artifacts = tmp_path / "artifacts"
    toy_run(artifacts, "good", test_acc=75.0, first=(0, 1, 2, 0))
    good = json.loads((artifacts / "runs" / "good" / runs.METRICS).read_text())

    def hostile(run, **change):
        run_dir = toy_run(artifacts, run)
        (run_dir / runs.METRICS).write_text(json.dumps({**good, "name": run, **change}))
        return run_dir

    epoch = {"train_loss": 1.0, "train_acc": 50.0, "test_loss": 1.0, "test_acc": 50.0}
    too_large = {
        "history": hostile("history", history=[{"epoch": e, **epoch} for e in range(1, 10_002)]),
        "classes": hostile(
            "classes", class_names=[f"Make{i % 50} M{i}" for i in range(catalog.MAX_ENTRIES["class_names"] + 1)]
        ),
        "k values": hostile("k-values", kind="knn", k_results={str(k): {"k": k, "test_acc": 1.0} for k in range(1001)}),
        "name": hostile("name", name="x" * 20_001),
        "preset": hostile("preset", config={**good["config"], "preset": "p" * 20_001}),
        "padded": hostile("padded"),
    }
    with open(too_large["padded"] / runs.METRICS, "a") as f:
        f.write(" " * catalog.MAX_METRICS_BYTES)  # still valid JSON, refused from its size unread
    no_predictions = {"bomb": hostile("bomb"), "declared": hostile("declared")}
    _npz_declaring(runs.predictions_path(no_predictions["bomb"]), runs.PREDICTIONS_MAX_ROWS + 1, data=True)
    _npz_declaring(runs.predictions_path(no_predictions["declared"]), 10**12, data=False)
    nested = artifacts / "runs" / "nested"
    nested.mkdir()
    (nested / runs.METRICS).write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)

    tracemalloc.start()
    try:
        result = build.build_report(artifacts, data_dir=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    problems = {Path(p["run"]).name: p for p in result["problems"]}
    assert {problems[d.name]["status"] for d in too_large.values()} == {"too large"}
    assert {problems[d.name]["status"] for d in no_predictions.values()} == {"no predictions"}
    assert all("declared with shape" in problems[d.name]["detail"] for d in no_predictions.values())
    assert problems["nested"]["status"] == "unreadable"
    # runs with unreadable predictions are still compared, without their analysis
    assert sorted(r["model"] for r in result["rows"]) == ["bomb", "declared", "good"]
    html = (artifacts / "report" / "report.html").read_text()
    assert "Make-level accuracy" in html and all(name in html for name in problems)
    assert len(html) < 1_000_000 and peak < 200 << 20  # a bomb inflated would be ~100 MB, copied twice
