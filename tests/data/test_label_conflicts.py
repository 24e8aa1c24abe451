"""Identical images carrying different labels (issue 18 §1): the official training split has 11 such
pairs, so they are accepted and listed (``--label-conflicts keep``, the default) or left out whole
(``drop``), in every layout the importer knows; real errors stay errors.

The noisy dataset is the demo with four files overwritten by another image's bytes:
a train image by a train image of another class (a conflict within the split), a test image by a
train image of another class (a conflict across splits), and, as before, a train image by one of
its own class (an allowed duplicate) and a test image by a train image of its class (the leak check).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from helpers import all_in_one_copy, class_folders, kaggle_copy, parquet_shards, tar_folder, toy_run
from typer.testing import CliRunner

from cars_tl.cli import app
from cars_tl.core.atomic import file_sha256
from cars_tl.core.errors import CarsTLError
from cars_tl.data import devkit
from cars_tl.data import manifest as manifests
from cars_tl.report import build
from cars_tl.sources.prepare import prepare_dataset

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


@pytest.fixture(scope="session")
def noisy(tmp_path_factory):
    """A torchvision-layout source with the four overwritten files, and what its manifest must hold."""
    base = tmp_path_factory.mktemp("noisy")
    ref, _ = prepare_dataset(base / "demo", "demo")
    root = base / "src" / "stanford_cars"
    shutil.copytree(ref.root, root, ignore=shutil.ignore_patterns("manifest.*", manifests.ORIGIN_FILE))
    train, test = ref.split("train"), ref.split("test")
    a = train[0]
    b = next(r for r in train if r.label != a.label)
    c = next(r for r in train[1:] if r not in (a, b))
    d = next(r for r in test if r.label != c.label)
    e = next(r for r in train if r not in (a, b, c))
    f = next(r for r in train if r.label == e.label and r not in (a, b, c, e))
    g = next(r for r in train if r not in (a, b, c, e, f))
    h = next(r for r in test if r.label == g.label and r != d)
    for src, dst in ((a, b), (c, d), (e, f), (g, h)):
        shutil.copyfile(root / src.path, root / dst.path)
    # What the manifest must say, from the devkit and the files themselves (not from cars_tl's grouping).
    rows = [(r.split, r.path, r.label, r.class_name, file_sha256(root / r.path)) for r in ref.records]
    labels = collections.defaultdict(set)
    for _split, _path, label, _name, sha in rows:
        labels[sha].add(label)
    noisy_shas = {sha for sha, ls in labels.items() if len(ls) > 1}
    assert len(noisy_shas) == 2
    return {
        "root": root,
        "rows": rows,
        "noisy": noisy_shas,
        "groups": [{a.path, b.path}, {c.path, d.path}],
        "group_splits": [("train", "train"), ("test", "train")],
    }


def expected_rows(noisy, policy: str) -> list[tuple]:
    return [r for r in noisy["rows"] if policy == "keep" or r[4] not in noisy["noisy"]]


def by_content(manifest: manifests.Manifest) -> collections.Counter:
    """(split, class name, sha256) of every row: layouts renumber images, the content stays."""
    return collections.Counter((r.split, r.class_name, file_sha256(manifest.root / r.path)) for r in manifest.records)


def make_source(layout: str, noisy, out: Path) -> tuple[Path, dict]:
    """The noisy dataset in ``layout``; extra download kwargs."""
    root = noisy["root"]
    out.mkdir(parents=True)
    if layout == "torchvision":
        return root.parent, {}
    if layout == "torchvision-tgz":
        return tar_folder(out / "sc.tgz", {"stanford_cars": root}), {}
    if layout == "torchvision-zip":
        with zipfile.ZipFile(out / "sc.zip", "w") as zf:
            for path in sorted(root.rglob("*")):
                zf.write(path, Path("stanford_cars") / path.relative_to(root))
        return out / "sc.zip", {}
    if layout == "kaggle":
        source, labels = kaggle_copy(root.parent, out / "kaggle")
        return source, {"test_labels": labels}
    if layout == "split archives":
        tar_folder(out / "cars_train.tgz", {"cars_train": root / "cars_train"})
        tar_folder(out / "cars_test.tgz", {"cars_test": root / "cars_test"})
        tar_folder(out / "car_devkit.tgz", {"devkit": root / "devkit"})
        shutil.copyfile(root / "cars_test_annos_withlabels.mat", out / "cars_test_annos_withlabels.mat")
        return out, {}
    if layout == "all-in-one":
        return all_in_one_copy(root, out / "aio", pack=True), {}
    keep, _ = prepare_dataset(out / "ref", str(root.parent))
    if layout == "class folders":
        return class_folders(keep, out / "folders"), {}
    if layout == "class folders + csv":
        return class_folders(keep, out / "folders", with_csv=True), {}
    assert layout == "parquet"
    return parquet_shards(keep, out / "hf"), {}


LAYOUTS = [
    "torchvision",
    "torchvision-tgz",
    "torchvision-zip",
    "kaggle",
    "split archives",
    "all-in-one",
    "class folders",
    "class folders + csv",
    pytest.param("parquet", marks=pytest.mark.skipif(not HAS_PYARROW, reason="needs pyarrow")),
]


@pytest.mark.parametrize("policy", ["keep", "drop"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_keeps_or_drops_identical_images_with_different_labels(layout, policy, noisy, tmp_path):
    source, extra = make_source(layout, noisy, tmp_path / "source")
    manifest, _ = prepare_dataset(tmp_path / "data", str(source), label_conflicts=policy, **extra)
    want = expected_rows(noisy, policy)
    assert by_content(manifest) == collections.Counter((s, name, sha) for s, _, _, name, sha in want)
    if (
        layout.startswith("torchvision") or layout == "kaggle" or layout == "split archives"
    ):  # file names kept: exact rows
        assert [(r.index, r.split, r.path, r.label, r.class_name, r.sha256) for r in manifest.records] == [
            (i, *row) for i, row in enumerate(want)
        ]
    meta = json.loads((manifest.root / manifests.MANIFEST_JSON).read_text())
    conflicts = meta["label_conflicts"]
    assert (
        conflicts["policy"],
        conflicts["groups"],
        conflicts["within_split"],
        conflicts["across_splits"],
        conflicts["images"],
    ) == (policy, 2, 1, 1, 4)
    assert [tuple(sorted(i["split"] for i in g["images"])) for g in conflicts["list"]] == noisy["group_splits"]
    assert {g["sha256"] for g in conflicts["list"]} == noisy["noisy"]
    if layout.startswith("torchvision"):
        assert [{i["path"] for i in g["images"]} for g in conflicts["list"]] == noisy["groups"]
    # The same-label copies are still what they were: one within a split, one train/test leak.
    assert meta["duplicates"]["within_splits_same_label"] == 1 and meta["duplicates"]["across_splits"] == 1
    if policy == "drop":
        assert manifest.origin["label_conflicts"] == "drop" and manifest.origin["label_conflicts_dropped"] == 4
        assert conflicts["dropped"] == 4 and manifest.counts() == {"train": 141, "test": 71}
        assert "--label-conflicts drop" in manifests.download_command(tmp_path / "data", manifest.origin)
    else:
        assert "label_conflicts" not in manifest.origin and conflicts["dropped"] == 0
        assert manifest.counts() == {"train": 144, "test": 72}
    manifests.load_manifest(tmp_path / "data")  # what every stage does: the dropped rows are not "missing"


def test_drop_changes_the_fingerprint_and_switching_policy_rebuilds(noisy, tmp_path):
    source = str(noisy["root"].parent)
    keep, action = prepare_dataset(tmp_path / "data", source)
    assert action == "imported"
    drop, action = prepare_dataset(tmp_path / "data", source, label_conflicts="drop")
    assert action == "imported" and drop.fingerprint != keep.fingerprint
    again, action = prepare_dataset(tmp_path / "data", source, label_conflicts="drop")
    assert action == "already verified" and again.fingerprint == drop.fingerprint
    verified, action = prepare_dataset(tmp_path / "data", source, label_conflicts="drop", verify=True)
    assert action == "verified" and verified.fingerprint == drop.fingerprint
    back, action = prepare_dataset(tmp_path / "data", source)
    assert action == "imported" and back.fingerprint == keep.fingerprint


def test_data_without_conflicts_keeps_its_fingerprint_under_either_policy(noisy, tmp_path):
    demo, _ = prepare_dataset(tmp_path / "demo", "demo")
    for policy in ("keep", "drop"):
        manifest, _ = prepare_dataset(tmp_path / policy, str(demo.root.parent), label_conflicts=policy)
        assert manifest.fingerprint == demo.fingerprint
        meta = json.loads((manifest.root / manifests.MANIFEST_JSON).read_text())
        assert meta["label_conflicts"]["groups"] == 0 and meta["label_conflicts"]["list"] == []
        assert "identical images with different labels" not in manifests.summary(manifest)


def test_a_bad_policy_is_refused_with_the_choices(tmp_path):
    with pytest.raises(CarsTLError, match="valid: keep, drop"):
        prepare_dataset(tmp_path, "demo", label_conflicts="fix")


def test_the_summary_says_it_in_one_line_and_inspect_lists_every_group(noisy, tmp_path):
    result = CliRunner().invoke(app, ["download", "--data-dir", str(tmp_path), "--source", str(noisy["root"].parent)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "identical images with different labels" in line]
    assert len(lines) == 1
    assert "2 groups" in lines[0] and "1 within a split, 1 across splits" in lines[0] and "kept" in lines[0]
    assert f"cars-tl inspect {tmp_path}" in lines[0] and "manifest.json" in lines[0]
    result = CliRunner().invoke(
        app,
        ["download", "--data-dir", str(tmp_path), "--source", str(noisy["root"].parent), "--label-conflicts", "drop"],
    )
    assert result.exit_code == 0, result.output
    assert "dropped: 4 images left out of the manifest" in result.output and "train 141, test 71" in result.output
    for target in (tmp_path, tmp_path / "stanford_cars", tmp_path / "stanford_cars" / "manifest.json"):
        result = CliRunner().invoke(app, ["inspect", str(target)])
        assert result.exit_code == 0, result.output
        assert "2 groups of identical images with different labels" in result.output
        for group in noisy["groups"]:
            line = next(line for line in result.output.splitlines() if min(group) in line)
            assert all(path in line for path in group)
    as_json = json.loads(CliRunner().invoke(app, ["inspect", str(tmp_path), "--json"]).output)
    assert as_json["type"] == "dataset" and as_json["label_conflicts"]["dropped"] == 4


def test_real_errors_stay_errors_beside_label_conflicts(noisy, tmp_path):
    source = tmp_path / "copy" / "stanford_cars"
    shutil.copytree(noisy["root"], source)
    victim = next(r for r in noisy["rows"] if r[0] == "train" and r[4] not in noisy["noisy"])
    (source / victim[1]).unlink()
    for policy in ("keep", "drop"):
        with pytest.raises(CarsTLError, match="1 missing images") as info:
            prepare_dataset(tmp_path / f"data-{policy}", str(source.parent), label_conflicts=policy)
        assert "identical images" not in info.value.message
    shutil.copyfile(noisy["root"] / victim[1], source / victim[1])
    names = devkit.read_class_names(source / devkit.DEVKIT_FILES["meta"])
    train = [
        dict(row, label=row["class"] - 1)
        for row in devkit.read_annotations(source / devkit.DEVKIT_FILES["train"], with_class=True)
    ]
    test = [
        dict(row, label=row["class"] - 1)
        for row in devkit.read_annotations(source / devkit.TEST_LABELS_NAMES[0], with_class=True)
    ]
    train[5]["label"] = len(names)  # class len+1: out of range
    devkit.write_devkit(source, names, train, test)
    with pytest.raises(CarsTLError, match="1 labels out of range"):
        prepare_dataset(tmp_path / "data-range", str(source.parent), label_conflicts="drop")


def test_the_report_lists_the_label_noise_of_the_runs_dataset(noisy, tmp_path):

    manifest, _ = prepare_dataset(tmp_path / "data", str(noisy["root"].parent))
    conflicts = json.loads((manifest.root / manifests.MANIFEST_JSON).read_text())["label_conflicts"]
    artifacts = tmp_path / "artifacts"
    toy_run(artifacts, "B-s0", test_acc=50.0)  # its dataset fingerprint is "cd" * 32
    shown = tmp_path / "shown" / "stanford_cars"
    shown.mkdir(parents=True)
    (shown / manifests.MANIFEST_JSON).write_text(json.dumps({"fingerprint": "cd" * 32, "label_conflicts": conflicts}))
    result = build.build_report(artifacts, data_dir=shown.parent)
    md = Path(result["files"]["md"]).read_text()
    html = Path(result["files"]["html"]).read_text()
    assert "## Dataset" in md and "2 groups of identical images with different labels" in md
    assert all(
        path in md.replace("\\", "") and path in html for group in noisy["groups"] for path in group
    )  # md escapes _
    assert json.loads(Path(result["files"]["json"]).read_text())["label_noise"][0].startswith("2 groups")
    # Another dataset than the runs': nothing said about it.
    result = build.build_report(artifacts, data_dir=tmp_path / "data")
    assert "identical images" not in Path(result["files"]["md"]).read_text()


def test_drop_says_when_it_leaves_a_class_without_training_images_or_a_split_empty(tmp_path):
    ref, _ = prepare_dataset(tmp_path / "demo", "demo")
    root = tmp_path / "src" / "stanford_cars"
    shutil.copytree(ref.root, root, ignore=shutil.ignore_patterns("manifest.*", manifests.ORIGIN_FILE))
    train = ref.split("train")
    donor = train[0]
    victim_class = next(r.label for r in train if r.label != donor.label)
    for r in train:  # every training image of one class is a copy of an image of another class
        if r.label == victim_class:
            shutil.copyfile(root / donor.path, root / r.path)
    for r in ref.split("test"):  # and every test image a copy of a training image of another class
        other = next(t for t in train if t.label not in (r.label, victim_class))
        shutil.copyfile(root / other.path, root / r.path)
    kept, _ = prepare_dataset(tmp_path / "keep", str(root.parent))
    assert "warning" not in manifests.summary(kept)
    manifest, _ = prepare_dataset(tmp_path / "drop", str(root.parent), label_conflicts="drop")
    assert manifest.counts()["test"] == 0 and victim_class not in {r.label for r in manifest.split("train")}
    text = manifests.summary(manifest)
    name = ref.class_names[victim_class]
    assert f"warning: --label-conflicts drop left 1 class without a training image ({name})" in text
    assert "the test split without any image" in text and "--label-conflicts keep" in text
