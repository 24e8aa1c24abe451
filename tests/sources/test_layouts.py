"""cars_tl.sources.layouts (one module per layout): the Kaggle copy, class folders and Hugging Face parquet shards, built from the real
subset in ../shared and from the demo, each compared with the torchvision layout image by image.

The comparison is by content: (SHA-256 of the image bytes) -> (class name, split, box). Images are
renumbered by some layouts, and class folders and parquet carry the canonical 196 names, so file
names and label numbers may differ while the dataset is the same.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers import (
    SHARED_DEVKIT,
    SHARED_MINI,
    class_folders,
    kaggle_copy,
    link_tree,
    needs_devkit,
    needs_mini,
    parquet_shards,
)
from typer.testing import CliRunner

from cars_tl.cli import app
from cars_tl.core.atomic import file_sha256
from cars_tl.core.errors import CarsTLError
from cars_tl.data import devkit
from cars_tl.data import manifest as manifests
from cars_tl.data.dataset import CarsDataset
from cars_tl.sources import classnames, layouts
from cars_tl.sources.demo import DEMO_CLASSES
from cars_tl.sources.prepare import prepare_dataset

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
needs_pyarrow = pytest.mark.skipif(not HAS_PYARROW, reason="needs pyarrow (pip install 'cars_tl[parquet]')")
RAM = "Ram C/V Cargo Van Minivan 2012"


def content(manifest: manifests.Manifest, boxes: bool = True) -> dict[str, tuple]:
    """sha256 of the bytes -> (class name, split[, box]), from the files themselves."""
    out = {}
    for r in manifest.records:
        digest = file_sha256(manifest.root / r.path)
        assert digest == r.sha256
        out[digest] = (r.class_name, r.split, r.box) if boxes else (r.class_name, r.split)
    assert len(out) == len(manifest.records)  # no duplicate images in these sources
    return out


def snapshot(data_dir: Path) -> dict[str, bytes]:
    """Everything under a data folder (less lock files), to prove a failed import changed nothing."""
    return {
        str(p.relative_to(data_dir)): p.read_bytes()
        for p in sorted(data_dir.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def fail_leaving_unchanged(data_dir: Path, source, match: str, **kwargs) -> CarsTLError:
    before = snapshot(data_dir)
    with pytest.raises(CarsTLError, match=match) as info:
        prepare_dataset(data_dir, str(source), **kwargs)
    assert snapshot(data_dir) == before
    assert not list(data_dir.glob(".stanford_cars.tmp-*"))
    return info.value


@pytest.fixture(scope="session")
def demo_ref(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("ref-demo")
    manifest, _ = prepare_dataset(data_dir, "demo")
    return manifest


@pytest.fixture(scope="session")
def mini_ref(tmp_path_factory):
    if not SHARED_MINI.is_dir():
        pytest.skip(f"real Stanford Cars subset absent ({SHARED_MINI})")
    data_dir = tmp_path_factory.mktemp("ref-mini")
    manifest, _ = prepare_dataset(data_dir, str(SHARED_MINI))
    return manifest


@pytest.fixture
def occupied(tmp_path, demo_ref):
    """A data folder already holding a dataset: failed imports must leave it as it was."""
    data_dir = tmp_path / "data"
    prepare_dataset(data_dir, "demo")
    return data_dir


# --------------------------------------------------------------------------- canonical names


@needs_devkit
def test_packaged_class_names_equal_the_real_devkit():
    assert list(classnames.canonical_names()) == devkit.read_class_names(SHARED_DEVKIT / "cars_meta.mat")


def test_canonical_names_normalise_apart_and_mangled_slashes_match():
    keys = [classnames.normalise(n) for n in classnames.canonical_names()]
    assert len(set(keys)) == 196
    ram = classnames.canonical_names().index(RAM)
    variants = [
        "Ram C-V Cargo Van Minivan 2012",
        "Ram CV Cargo Van Minivan 2012",
        "ram c_v cargo van minivan 2012",
        RAM,
    ]
    for name in variants:
        assert classnames.match_to_canonical([name], "test") == {name: ram}


def test_unknown_and_merged_names_are_errors_naming_them():
    with pytest.raises(CarsTLError) as info:
        classnames.match_to_canonical(
            ["Flying Car 2030", "Ram C-V Cargo Van Minivan 2012", "Ram CV Cargo Van Minivan 2012"], "folder X"
        )
    message = info.value.message
    assert "'Flying Car 2030' matches no class; nearest:" in message and "folder X" in message
    assert (
        "'Ram C-V Cargo Van Minivan 2012', 'Ram CV Cargo Van Minivan 2012' all match 'Ram C/V Cargo Van Minivan 2012'"
        in message
    )


# --------------------------------------------------------------------------- the Kaggle copy


@needs_mini
def test_kaggle_copy_needs_test_labels_and_says_exactly_which(tmp_path, occupied):
    source, _ = kaggle_copy(SHARED_MINI, tmp_path / "stanford-cars-dataset")
    error = fail_leaving_unchanged(occupied, source, "without the test labels")
    assert "cars_test_annos_withlabels.mat is missing" in error.message and "kaggle layout" in error.message
    assert "class" in error.message and "Kaggle" in error.message  # what it holds, where it is published
    assert "--test-labels" in error.hint and "--splits train" in error.hint
    assert "all-in-one" not in error.message  # cars_annos.mat did not confuse detection


@needs_mini
def test_kaggle_copy_with_test_labels_equals_the_torchvision_layout(tmp_path, mini_ref):
    source, labels = kaggle_copy(SHARED_MINI, tmp_path / "kaggle")
    manifest, action = prepare_dataset(tmp_path / "data", str(source), test_labels=labels)
    assert action == "imported" and manifest.origin["layout"] == "kaggle" and manifest.has_boxes
    assert content(manifest) == content(mini_ref)
    assert manifest.fingerprint == mini_ref.fingerprint  # same files, names and rows
    meta = json.loads((manifest.root / manifests.MANIFEST_JSON).read_text())
    assert meta["origin"]["layout"] == "kaggle" and meta["origin"]["test_labels"] == str(labels.resolve())


@needs_mini
def test_kaggle_test_labels_found_anywhere_in_the_source(tmp_path, mini_ref):
    source, labels = kaggle_copy(SHARED_MINI, tmp_path / "kaggle")
    (source / "extras" / "eval").mkdir(parents=True)
    shutil.move(labels, source / "extras" / "eval" / labels.name)
    manifest, _ = prepare_dataset(tmp_path / "data", str(source))
    assert content(manifest) == content(mini_ref)


@needs_mini
def test_kaggle_train_split_alone(tmp_path, mini_ref):
    source, _ = kaggle_copy(SHARED_MINI, tmp_path / "kaggle")
    manifest, _ = prepare_dataset(tmp_path / "data", str(source), splits=["train"])
    assert manifest.splits == ("train",) and manifest.counts() == {"train": 422, "test": 0}
    want = {k: v for k, v in content(mini_ref).items() if v[1] == "train"}
    assert content(manifest) == want
    with pytest.raises(CarsTLError, match="no test split") as info:
        manifest.split("test")
    assert "--splits train" in info.value.message and "--test-labels" in info.value.hint
    assert not (manifest.root / "cars_test").exists()
    reloaded = manifests.load_manifest(tmp_path / "data")
    assert reloaded.splits == ("train",)


@needs_mini
def test_cli_prints_the_recognised_layout(tmp_path):
    source, labels = kaggle_copy(SHARED_MINI, tmp_path / "kaggle")
    result = CliRunner().invoke(
        app, ["download", "--data-dir", str(tmp_path / "data"), "--source", str(source), "--test-labels", str(labels)]
    )
    assert result.exit_code == 0, result.output
    assert "imported:" in result.output and "kaggle layout imported from" in result.output
    result = CliRunner().invoke(app, ["download", "--data-dir", str(tmp_path / "d2"), "--source", str(source)])
    assert result.exit_code == 2 and "--splits train" in result.output


# --------------------------------------------------------------------------- class folders


@needs_mini
def test_class_folders_with_csv_equal_the_torchvision_layout(tmp_path, mini_ref):
    source = class_folders(mini_ref, tmp_path / "by-class", with_csv=True)
    manifest, _ = prepare_dataset(tmp_path / "data", str(source))
    assert manifest.origin["layout"] == "class folders" and manifest.has_boxes
    assert manifest.class_names == list(classnames.canonical_names())
    assert content(manifest) == content(mini_ref)


@pytest.mark.parametrize(
    "ram_folder", ["Ram C-V Cargo Van Minivan 2012", "Ram CV Cargo Van Minivan 2012", "ram c_v cargo van minivan 2012"]
)
def test_class_folders_without_boxes_from_the_demo(ram_folder, tmp_path, demo_ref):
    source = class_folders(demo_ref, tmp_path / "folders", rename={RAM: ram_folder})
    manifest, _ = prepare_dataset(tmp_path / "data", str(source))
    assert not manifest.has_boxes and manifest.origin["layout"] == "class folders"
    assert content(manifest, boxes=False) == content(demo_ref, boxes=False)
    assert all(r.box == (1, 1, r.width, r.height) for r in manifest.records)
    meta = json.loads((manifest.root / manifests.MANIFEST_JSON).read_text())
    assert meta["boxes"] is False
    with pytest.raises(CarsTLError, match="--crop box needs bounding boxes") as info:
        CarsDataset(manifest, "train", crop="box")
    assert "--crop full" in info.value.hint
    assert len(CarsDataset(manifest, "train", crop="full")) == 144


def test_unknown_class_folder_is_an_error_and_changes_nothing(tmp_path, demo_ref, occupied):
    source = class_folders(demo_ref, tmp_path / "folders", rename={"Acura RL Sedan 2012": "Acura Hovercraft 2031"})
    error = fail_leaving_unchanged(occupied, source, "matches no class")
    assert "'Acura Hovercraft 2031'" in error.message and "Acura" in error.message.split("nearest:")[1]


def test_two_folders_for_one_class_are_never_merged(tmp_path, demo_ref, occupied):
    source = class_folders(demo_ref, tmp_path / "folders", rename={RAM: "Ram C-V Cargo Van Minivan 2012"})
    extra = source / "car_data" / "car_data" / "train" / "Ram CV Cargo Van Minivan 2012"
    extra.mkdir()
    first = next((source / "car_data" / "car_data" / "train" / "Ram C-V Cargo Van Minivan 2012").iterdir())
    shutil.copyfile(first, extra / "x.jpg")
    fail_leaving_unchanged(occupied, source, "never merged")


@needs_mini
def test_a_csv_row_naming_a_missing_file_is_an_error(tmp_path, mini_ref, occupied):
    source = class_folders(mini_ref, tmp_path / "by-class", with_csv=True)
    with open(source / "anno_test.csv", "a", newline="") as f:
        csv.writer(f).writerow(["99999.jpg", 1, 1, 5, 5, 1])
    error = fail_leaving_unchanged(occupied, source, "99999.jpg")
    assert "anno_test.csv" in error.message and "line 416" in error.message


def test_mixed_layouts_in_one_folder_are_an_error(tmp_path, demo_ref, occupied):
    source = class_folders(demo_ref, tmp_path / "mixed")
    images = source / "car_data" / "car_data"
    link_tree(demo_ref.root / "cars_train", images / "cars_train")
    link_tree(demo_ref.root / "cars_test", images / "cars_test")
    link_tree(demo_ref.root / "devkit", images / "devkit")
    error = fail_leaving_unchanged(occupied, source, "mixes layouts")
    assert "torchvision" in error.message and "class folders" in error.message


def test_duplicates_across_splits_are_counted_and_label_conflicts_listed(tmp_path, demo_ref, occupied):
    source = class_folders(demo_ref, tmp_path / "folders")
    test_image = next(r for r in demo_ref.records if r.split == "test")
    train_dir = source / "car_data" / "car_data" / "train"
    shutil.copyfile(demo_ref.root / test_image.path, train_dir / test_image.class_name.replace("/", "-") / "leak.jpg")
    train_image = next(r for r in demo_ref.records if r.split == "train")
    class_dir = train_dir / train_image.class_name.replace("/", "-")
    shutil.copyfile(demo_ref.root / train_image.path, class_dir / "again.jpg")  # same bytes, same label: allowed
    manifest, _ = prepare_dataset(tmp_path / "leaky", str(source))
    meta = json.loads((manifest.root / manifests.MANIFEST_JSON).read_text())
    assert meta["duplicates"]["across_splits"] == 1 and len(meta["duplicates"]["across_splits_examples"]) == 1
    assert meta["duplicates"]["within_splits_same_label"] == 1
    assert "1 test images identical to train images" in manifests.summary(manifest)
    # The same bytes twice in train with the same label: allowed; with another label: listed (label noise), not an error.
    other = next(n for n in DEMO_CLASSES if n != test_image.class_name).replace("/", "-")
    shutil.copyfile(demo_ref.root / test_image.path, train_dir / other / "leak2.jpg")
    manifest, _ = prepare_dataset(tmp_path / "noisy", str(source))
    conflicts = json.loads((manifest.root / manifests.MANIFEST_JSON).read_text())["label_conflicts"]
    assert conflicts["groups"] == 1 and conflicts["within_split"] == 1 and conflicts["across_splits"] == 1
    sources = [i["source"] for i in conflicts["list"][0]["images"]]
    assert any(s.endswith("leak.jpg") for s in sources) and any(
        s.endswith("leak2.jpg") for s in sources
    )  # the source files
    assert not any(".tmp-" in s for s in sources)


def test_a_bad_image_is_named_by_its_source_file(tmp_path, demo_ref, occupied):
    source = link_tree(demo_ref.root, tmp_path / "copy" / "stanford_cars")
    victim = source / "cars_test" / "00003.jpg"
    victim.unlink()
    victim.write_bytes(b"not an image")
    error = fail_leaving_unchanged(occupied, source, "unreadable images")
    assert str(victim) in error.message and ".tmp-" not in error.message


@pytest.mark.parametrize("layout", ["torchvision", "class folders"])
def test_a_decompression_bomb_is_a_clean_error(layout, tmp_path, demo_ref, occupied, monkeypatch):
    from PIL import Image

    if layout == "torchvision":
        source = link_tree(demo_ref.root, tmp_path / "copy" / "stanford_cars")
    else:
        source = class_folders(demo_ref, tmp_path / "folders")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # every demo image is now over twice the limit
    error = fail_leaving_unchanged(occupied, source, "cannot read image|unreadable images")
    assert (
        str(source) in error.message and "decompression bomb" in error.message.lower() and ".tmp-" not in error.message
    )


# --------------------------------------------------------------------------- parquet


@needs_pyarrow
@pytest.mark.parametrize("names_in", ["metadata", "card"])
def test_parquet_shards_equal_the_torchvision_layout(names_in, tmp_path, demo_ref):
    source = parquet_shards(demo_ref, tmp_path / "hf", names_in=names_in)
    manifest, _ = prepare_dataset(tmp_path / "data", str(source))
    assert manifest.origin["layout"] == "parquet" and not manifest.has_boxes
    assert content(manifest, boxes=False) == content(demo_ref, boxes=False)  # the original bytes, not re-encoded
    assert {Path(r.path).suffix for r in manifest.records} == {".jpg"}


@needs_pyarrow
@needs_mini
def test_parquet_shards_of_the_real_subset(tmp_path, mini_ref):
    source = parquet_shards(mini_ref, tmp_path / "hf-mini", names_in="card")
    manifest, _ = prepare_dataset(tmp_path / "data", str(source))
    assert manifest.counts() == {"train": 422, "test": 415}
    assert content(manifest, boxes=False) == content(mini_ref, boxes=False)
    assert {r.sha256: (r.width, r.height) for r in manifest.records} == {
        r.sha256: (r.width, r.height) for r in mini_ref.records
    }


@needs_pyarrow
def test_a_parquet_shard_without_label_is_an_error_naming_it(tmp_path, demo_ref, occupied):
    source = parquet_shards(demo_ref, tmp_path / "hf", drop_label=True)
    error = fail_leaving_unchanged(occupied, source, "no label column")
    assert "train-00000-of-00002.parquet" in error.message


def test_parquet_without_pyarrow_names_the_extra(tmp_path, demo_ref, monkeypatch, occupied):
    source = tmp_path / "hf"
    (source / "data").mkdir(parents=True)
    (source / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    (source / "data" / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    error = fail_leaving_unchanged(occupied, source, "needs pyarrow")
    assert "cars_tl[parquet]" in error.hint


# --------------------------------------------------------------------------- a train-only dataset downstream


@pytest.mark.slow
def test_a_train_only_dataset_through_extract_features_and_train_head(tmp_path, demo_ref):
    from helpers import TINY, tiny

    from cars_tl.artifacts import features
    from cars_tl.stages.extract import extract_features
    from cars_tl.stages.finetune import finetune
    from cars_tl.stages.fit_svm import fit_svm
    from cars_tl.stages.train_head import train_head

    source = class_folders(demo_ref, tmp_path / "folders")
    shutil.rmtree(source / "car_data" / "car_data" / "test")
    data_dir = tmp_path / "data"
    manifest, _ = prepare_dataset(data_dir, str(source), splits=["train"])
    assert manifest.splits == ("train",)
    result = extract_features(data_dir, out=tmp_path / "f.h5", **tiny(batch_size=32))
    assert result.counts == {"train": 144}
    assert set(features.load(tmp_path / "f.h5").splits) == {"train"}
    run_dir, metrics = train_head(tmp_path / "f.h5", epochs=2, out=tmp_path / "head")
    assert metrics["status"] == "complete" and "train_acc" in metrics["final"] and "test_acc" not in metrics["final"]
    with pytest.raises(CarsTLError, match="its dataset has none"):
        fit_svm(tmp_path / "f.h5", kernel="linear", out=tmp_path / "svm")
    with pytest.raises(CarsTLError, match="no test split") as info:
        finetune(data_dir, epochs=1, out=tmp_path / "ft", **TINY)
    assert "--test-labels" in info.value.hint or "--splits" not in info.value.hint
    assert not (tmp_path / "ft").exists()
    with pytest.raises(CarsTLError, match="no test split"):
        extract_features(data_dir, splits=("test",), out=tmp_path / "g.h5", **TINY)


def test_every_registered_layout_is_accepted_and_listed_in_the_download_help():
    import typer.main

    command = typer.main.get_command(app).commands["download"]
    help_text = next(p.help for p in command.params if p.name == "source")
    for name, layout in layouts.REGISTRY.items():
        assert layout.name == name and layout.cli_help in help_text
        assert f"{name}: {layout.description}" in layouts.ACCEPTED_LAYOUTS
    assert len(layouts.ACCEPTED_LAYOUTS) == len(layouts.REGISTRY) + 1  # + a single archive holding any of them
