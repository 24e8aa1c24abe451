"""The data layer: real devkit parsing, manifest validation, image decoding, the Dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SHARED_DEVKIT, copy_demo_without_manifest, needs_devkit

from cars_tl.core.atomic import file_sha256
from cars_tl.core.errors import CarsTLError
from cars_tl.data import devkit
from cars_tl.data import manifest as manifests


@needs_devkit
def test_real_devkit_parses():
    names = devkit.read_class_names(SHARED_DEVKIT / "cars_meta.mat")
    train = devkit.read_annotations(SHARED_DEVKIT / "cars_train_annos.mat", with_class=True)
    test = devkit.read_annotations(SHARED_DEVKIT / "cars_test_annos.mat", with_class=False)
    assert len(names) == 196 and len(train) == 8144 and len(test) == 8041
    assert train[0] == {"fname": "00001.jpg", "box": (39, 116, 569, 375), "class": 14}
    assert "Ram C/V Cargo Van Minivan 2012" in names  # a slash: names never come from folders


def _rewrite_train(root: Path, edit) -> None:
    names = devkit.read_class_names(root / "devkit/cars_meta.mat")
    train = devkit.read_annotations(root / "devkit/cars_train_annos.mat", with_class=True)
    test = devkit.read_annotations(root / devkit.TEST_LABELS_NAMES[0], with_class=True)
    as_rows = lambda rows: [{"fname": r["fname"], "box": r["box"], "label": r["class"] - 1} for r in rows]  # noqa: E731
    train_rows = as_rows(train)
    edit(train_rows)
    devkit.write_devkit(root, names, train_rows, as_rows(test))


def test_manifest_rows_and_fingerprint(demo_dir):
    manifest = manifests.load_manifest(demo_dir)
    assert manifest.counts() == {"train": 144, "test": 72}
    assert manifest.num_classes == 6 and manifest.classes_present() == 6
    record = manifest.records[0]
    assert record.path.startswith("cars_train/") and 0 <= record.label < 6
    assert record.class_name == manifest.class_names[record.label]
    x1, y1, x2, y2 = record.box
    assert 1 <= x1 <= x2 <= record.width and 1 <= y1 <= y2 <= record.height
    assert len(manifest.fingerprint) == 64


def test_tampered_manifest_is_refused(demo_dir, tmp_path):
    root = copy_demo_without_manifest(demo_dir, tmp_path)
    manifests.build_manifest(root)
    csv_path = root / devkit.STANFORD_DIR / manifests.MANIFEST_CSV
    csv_path.write_text(csv_path.read_text().replace("cars_train/00001.jpg", "cars_train/00002.jpg", 1))
    with pytest.raises(CarsTLError, match="modified"):
        manifests.load_manifest(root)


def test_validation_reports_every_problem_at_once(demo_dir, tmp_path):
    root = copy_demo_without_manifest(demo_dir, tmp_path)
    stanford = root / devkit.STANFORD_DIR

    def break_rows(rows):
        rows.append(dict(rows[0]))  # duplicate image
        rows[1]["label"] = 250  # out of range (written 1-based as 251)
        rows[2]["box"] = (500, 500, 600, 600)  # entirely outside: empty after clipping
        rows[3]["box"] = (1, 1, 10_000, 10_000)  # overshoots: clipped and counted

    _rewrite_train(stanford, break_rows)
    (stanford / "cars_train" / "00005.jpg").unlink()
    with pytest.raises(CarsTLError) as err:
        manifests.build_manifest(root)
    message = str(err.value)
    for expected in ("1 missing images", "1 duplicate images", "1 labels out of range", "1 empty boxes", "00005.jpg"):
        assert expected in message


def test_overshooting_boxes_are_clipped_and_counted(demo_dir, tmp_path):
    root = copy_demo_without_manifest(demo_dir, tmp_path)
    stanford = root / devkit.STANFORD_DIR

    def overshoot(rows):
        rows[0]["box"] = (1, 1, 10_000, 10_000)

    _rewrite_train(stanford, overshoot)
    manifest = manifests.build_manifest(root)
    first = manifest.split("train")[0]
    assert manifest.clipped_boxes == 1
    assert first.box == (1, 1, first.width, first.height)


def test_missing_devkit_names_the_files(tmp_path):
    (tmp_path / devkit.STANFORD_DIR).mkdir()
    with pytest.raises(CarsTLError, match="cars_meta.mat") as err:
        manifests.build_manifest(tmp_path)
    assert "cars-tl download" in err.value.hint


def test_unreadable_mat_is_reported(demo_dir, tmp_path):
    root = copy_demo_without_manifest(demo_dir, tmp_path)
    (root / devkit.STANFORD_DIR / "devkit/cars_meta.mat").write_bytes(b"not a mat file")
    with pytest.raises(CarsTLError, match="unreadable .mat"):
        manifests.build_manifest(root)


# --------------------------------------------------------------------------- image modes


# --------------------------------------------------------------------------- Dataset


# --------------------------------------------------------------------------- the manifest checks the data


def _recompute_fingerprint(root: Path) -> None:
    """What a careful hand edit does: make manifest.json agree with the edited manifest.csv."""
    import hashlib
    import json

    stanford = root / devkit.STANFORD_DIR
    meta = json.loads((stanford / manifests.MANIFEST_JSON).read_text())
    meta["fingerprint"] = hashlib.sha256((stanford / manifests.MANIFEST_CSV).read_bytes()).hexdigest()
    (stanford / manifests.MANIFEST_JSON).write_text(json.dumps(meta))


def _edit_csv(root: Path, edit) -> None:
    csv_path = root / devkit.STANFORD_DIR / manifests.MANIFEST_CSV
    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(edit(lines)))
    _recompute_fingerprint(root)


def _set_label(line: str, label: int) -> str:
    cells = line.split(",")
    cells[3] = str(label)
    return ",".join(cells)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda lines: lines[:5] + lines[6:], id="row-removed"),
        pytest.param(lambda lines: [lines[0], _set_label(lines[1], 9), *lines[2:]], id="label-out-of-range"),
        pytest.param(
            lambda lines: [lines[0], _set_label(lines[1], (int(lines[1].split(",")[3]) + 1) % 6), *lines[2:]],
            id="label-changed",
        ),
    ],
)
def test_hand_edits_with_a_recomputed_fingerprint_fail_against_the_devkit(edit, demo_dir, tmp_path):
    root = copy_demo_without_manifest(demo_dir, tmp_path)
    manifests.build_manifest(root)
    _edit_csv(root, edit)
    with pytest.raises(CarsTLError, match="disagrees with the devkit annotations"):
        manifests.load_manifest(root)
    assert not manifests.manifest_is_current(root)


def test_a_replaced_image_is_caught_by_size_or_mtime(demo_dir, tmp_path):
    import os

    root = copy_demo_without_manifest(demo_dir, tmp_path)
    manifest = manifests.build_manifest(root)
    first, second = manifest.records[0], manifest.records[1]
    # Another image under the same name: a new size.
    target = root / devkit.STANFORD_DIR / first.path
    target.write_bytes(target.read_bytes() + b"\0" * 16)
    with pytest.raises(CarsTLError, match="changed since the manifest was written") as info:
        manifests.load_manifest(root)
    assert first.path in info.value.message and "--verify" in info.value.hint
    manifests.build_manifest(root)
    # The same size, other bytes (mtime moves with any write).
    target = root / devkit.STANFORD_DIR / second.path
    blob = bytearray(target.read_bytes())
    blob[-10] ^= 0xFF
    stat = target.stat()
    target.write_bytes(bytes(blob))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(CarsTLError, match="modified after the manifest") as info:
        manifests.load_manifest(root)
    assert second.path in info.value.message


def test_verify_rehashes_and_the_fingerprint_follows_the_pixels(tmp_path):
    from cars_tl.sources.prepare import prepare_dataset

    manifest, _ = prepare_dataset(tmp_path, "demo")
    target = manifest.root / manifest.records[3].path
    blob = bytearray(target.read_bytes())
    blob[-10] ^= 0xFF  # same size, other pixels
    target.write_bytes(bytes(blob))
    assert not manifests.manifest_is_current(tmp_path)
    rebuilt, action = prepare_dataset(tmp_path, "demo", verify=True)
    assert action == "verified" and rebuilt.fingerprint != manifest.fingerprint
    assert rebuilt.records[3].sha256 == file_sha256(target)
    again, action = prepare_dataset(tmp_path, "demo", verify=True)
    assert action == "verified" and again.fingerprint == rebuilt.fingerprint
    assert prepare_dataset(tmp_path, "demo")[1] == "already verified"


def test_modified_manifest_hint_reruns_the_recorded_origin(tmp_path):
    from cars_tl.sources.prepare import prepare_dataset

    manifest, _ = prepare_dataset(tmp_path, "demo")
    csv_path = manifest.root / manifests.MANIFEST_CSV
    csv_path.write_text(csv_path.read_text().replace(",", ";", 1))
    with pytest.raises(CarsTLError, match="modified") as info:
        manifests.load_manifest(tmp_path)
    assert f"cars-tl download --data-dir {tmp_path} --source demo" in info.value.hint
