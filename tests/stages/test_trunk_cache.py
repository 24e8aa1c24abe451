"""The trunk cache (issue 21): exactness against the image path, refusals with their reasons,
verification, resume across the two paths, torchrun."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    CLI,
    ENV,
    REPO,
    assert_refused,
    assert_same_run,
    cli_env,
    run_cli,
    run_cli_with_file_size_limit,
    run_python,
    tiny,
    torchrun_command,
    tuned_finetune_args,
)

from cars_tl.artifacts import runs, trunks
from cars_tl.data import manifest as manifests
from cars_tl.models import backbones, training, trunk, trunk_store
from cars_tl.stages import finetune as ft
from cars_tl.stages.trunk_cache import build_trunk

SMALL = tiny(image_size=32, batch_size=16)
RUN = tiny(SMALL, unfreeze="layer4", epochs=2)


def _model(unfreeze: str, name: str = "resnet18", weights: str = "random"):
    bb = backbones.build_backbone(name, weights, 32)
    model = backbones.classifier_model(bb, 5)
    ft.set_trainable(model, backbones.parse_unfreeze(unfreeze, bb), everything=unfreeze == "all")
    ft.train_mode(model)
    return bb, model


def _weights(run_dir: Path) -> dict:
    return runs.load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _assert_same_evaluation(a: dict, b: dict, a_dir: Path, b_dir: Path) -> None:
    """Every epoch's evaluation and the saved test scores, bit for bit."""
    keys = ("test_loss", "test_acc", "val_loss", "val_acc", "train_loss")
    assert [[r.get(k) for k in keys] for r in a["history"]] == [[r.get(k) for k in keys] for r in b["history"]]
    pa, pb = runs.read_predictions(a_dir), runs.read_predictions(b_dir)
    assert np.array_equal(pa.ids, pb.ids) and np.array_equal(pa.top_classes, pb.top_classes)
    assert np.array_equal(pa.top_scores, pb.top_scores)


def test_trunk_and_top_compose_to_the_network():
    for name, unfreeze in (("resnet18", "layer4"), ("resnet18", "layer3,layer4")):
        bb, model = _model(unfreeze, name)
        model.eval()
        cut = trunk.cut_index(model.body)
        assert trunk.units(model.body)[cut][0] == unfreeze.split(",")[0]
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(trunk.Top(model, cut)(trunk.Trunk(model.body, cut)(x)), model(x), atol=1e-5)


def test_timm_efficientnet_splits_at_blocks_6():
    pytest.importorskip("timm")
    bb, model = _model("blocks.6", "timm/efficientnet_lite0")
    model.eval()
    cut = trunk.cut_index(model.body)
    assert trunk.units(model.body)[cut - 1][0] == "blocks.5"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = trunk.Trunk(model.body, cut)(x)
        assert maps.shape[1:] == (192, 2, 2)
        assert torch.allclose(trunk.Top(model, cut)(maps), model(x), atol=1e-5)


@pytest.fixture(scope="module")
def cache(demo_dir, tmp_path_factory) -> Path:
    path, result = build_trunk(demo_dir, unfreeze="layer4", out=tmp_path_factory.mktemp("trunks") / "t.h5", **SMALL)
    assert result["action"] == "built" and result["cut"] == "layer3"
    return path


def test_cache_file_is_verified_contiguous_and_resumable(cache, demo_dir, tmp_path):
    attrs = trunks.verify(cache)
    assert (
        attrs["cut"] == "layer3"
        and attrs["top"] == "layer4"
        and attrs["storage"] == "fp32"
        and attrs["map_shape"] == [256, 2, 2]
    )
    memory = trunks.open_split(cache, "train", mode="memory")
    mapped = trunks.open_split(cache, "train", mode="mmap")
    assert memory.mode == "memory" and isinstance(mapped.maps, np.memmap)
    assert np.array_equal(memory.maps, mapped.maps)
    # Up to date: a second build does nothing.
    _, again = build_trunk(demo_dir, unfreeze="layer4", out=cache, **SMALL)
    assert again["action"] == "up to date"
    # A killed build resumes from its complete chunks.
    out = tmp_path / "r.h5"
    partial = trunks.PartialTrunk(out, {}, {"train": 1}, 1)  # another layout's leftovers: cleared
    partial.write_chunk("train", 0, np.zeros((1, 256, 2, 2), np.float32))
    _, first = build_trunk(demo_dir, unfreeze="layer4", out=out, **SMALL)
    assert first["action"] == "built"
    assert np.array_equal(trunks.open_split(out, "test").maps, trunks.open_split(cache, "test").maps)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_cache_is_never_trusted(cache, tmp_path, damage):
    bad = tmp_path / "bad.h5"
    raw = bytearray(cache.read_bytes())
    if damage == "flip":
        import h5py

        with h5py.File(cache, "r") as f:
            offset = f["train/maps"].id.get_offset()
        raw[offset + 100] ^= 0xFF
    else:
        raw = raw[: len(raw) // 2]
    bad.write_bytes(bytes(raw))
    identity = {k: trunks.read_attrs(cache).get(k) for k in trunks.IDENTITY_KEYS}
    fresh, why = trunks.check_existing(bad, identity)
    assert not fresh and why and ("corrupt" in why or "readable" in why or "SHA-256" in why)


def _config(**changes):
    return {
        **ft.resolve_config("study"),
        "unfreeze": "layer4",
        "crop": "full",
        "margin": 0.0,
        "precision": "fp32",
        **changes,
    }


def test_inexact_settings_fall_back_with_their_reason(cache, demo_dir, tmp_path):
    manifest = manifests.load_manifest(demo_dir)
    bb, model = _model("layer4")
    assert trunk.plan(str(cache), model, bb, _config(), manifest, tmp_path).path == cache  # exact: used
    cases = {
        "augments images": trunk.plan(
            "auto", model, bb, _config(augment="standard", preset="tuned"), manifest, tmp_path
        ),
        "precision mismatch": trunk.plan(str(cache), model, bb, _config(precision="bf16"), manifest, tmp_path),
        "other preprocessing": trunk.plan(str(cache), model, bb, _config(crop="box"), manifest, tmp_path),
        "another dataset": trunk.plan(
            str(cache), model, bb, _config(), dataclasses.replace(manifest, fingerprint="x"), tmp_path
        ),
        "off": trunk.plan("off", model, bb, _config(), manifest, tmp_path),
    }
    bb3, model3 = _model("layer3,layer4")
    cases["layer3 below that cut trains"] = trunk.plan(
        str(cache), model3, bb3, _config(unfreeze="layer3,layer4"), manifest, tmp_path
    )
    bb_all, model_all = _model("all")
    cases["first module, trains"] = trunk.plan("auto", model_all, bb_all, _config(unfreeze="all"), manifest, tmp_path)
    other_bb, other = _model("layer4")
    for p in other.body.layer2.parameters():  # a frozen BatchNorm in train mode would move its statistics
        p.requires_grad_(False)
    other.body.layer2.train()
    cases["train mode"] = trunk.plan("auto", other, other_bb, _config(), manifest, tmp_path)
    # A parameter-free dropout in the frozen part, left in train mode by train_mode (its closest
    # ancestor with parameters, the body, trains): its maps would change per batch.
    drop_bb, dropping = _model("layer4")
    dropping.body.relu = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Dropout(0.5))
    ft.train_mode(dropping)
    assert dropping.body.relu[1].training
    cases["train mode (relu.1)"] = trunk.plan("auto", dropping, drop_bb, _config(), manifest, tmp_path)
    for words, p in cases.items():
        assert p.path is None and words in p.reason and p.reason.endswith("trunk cache not used"), (words, p.reason)


@pytest.mark.slow
def test_cached_run_equals_the_image_path_and_resumes_across_paths(cache, demo_dir, tmp_path):
    images, m_images = ft.finetune(demo_dir, out=tmp_path / "images", **RUN)
    cached, m_cached = ft.finetune(demo_dir, out=tmp_path / "cached", trunk_cache=str(cache), **RUN)
    assert m_images["trunk_cache"]["used"] is False and m_cached["trunk_cache"]["used"] is True
    assert m_cached["trunk_cache"]["read"] == "memory" and m_cached["trunk_cache"]["bytes_per_image"] == 256 * 4 * 4
    _assert_same_weights(images, cached)
    # Evaluated from maps of the evaluation pipeline, as the image path evaluates: the same losses and scores.
    _assert_same_evaluation(m_images, m_cached, images, cached)
    # One epoch on the images, resumed on the cache (and the other way round): the same run.
    mixed, _ = ft.finetune(demo_dir, out=tmp_path / "mixed", **dict(RUN, epochs=1))
    _, m_mixed = ft.finetune(demo_dir, out=mixed, resume=True, trunk_cache=str(cache), **RUN)
    assert m_mixed["resumed_from_epoch"] == 1 and m_mixed["trunk_cache"]["used"]
    _assert_same_weights(images, mixed)
    back, _ = ft.finetune(demo_dir, out=tmp_path / "back", trunk_cache=str(cache), **dict(RUN, epochs=1))
    _, m_back = ft.finetune(demo_dir, out=back, resume=True, **RUN)
    assert m_back["trunk_cache"]["used"] is False
    _assert_same_weights(images, back)
    # predict reads the run as any other (the model file is the whole network) and reproduces it.
    from cars_tl.stages.predict import predict_split

    predict_split([images, cached], split="train", data_dir=demo_dir, workers=0)
    a, b = runs.read_predictions(images, "train"), runs.read_predictions(cached, "train")
    assert len(a.ids) and np.array_equal(a.top_scores, b.top_scores) and np.array_equal(a.ids, b.ids)


def test_a_validation_split_is_evaluated_from_the_evaluation_pipeline(demo_dir, tmp_path, monkeypatch):
    # tuned without augmentation on random weights: a validation split carved from train, whose
    # cached train maps went through the training transform (the CPU path's normalisation rounds
    # differently from the evaluation loader's).
    run = tiny(SMALL, unfreeze="layer4", epochs=1, preset="tuned", augment="none")
    seen = {"images": [], "cached": []}

    class Recording(training.Meter):  # the metrics are rounded: the logits themselves, every batch
        def add(self, logits, labels):
            seen[path].append(logits.detach().clone())
            super().add(logits, labels)

    monkeypatch.setattr(training, "Meter", Recording)
    path = "images"
    images, m_images = ft.finetune(demo_dir, out=tmp_path / "images", **run)
    path = "cached"
    cached, m_cached = ft.finetune(demo_dir, out=tmp_path / "cached", trunk_cache=str(tmp_path / "t.h5"), **run)
    assert m_cached["trunk_cache"]["used"] and "val_loss" in m_cached["history"][-1]
    _assert_same_weights(images, cached)
    assert len(seen["images"]) == len(seen["cached"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(seen["images"], seen["cached"]))
    _assert_same_evaluation(m_images, m_cached, images, cached)


def test_resume_with_other_options_keys_the_cache_on_the_trained_frozen_part(demo_dir, tmp_path):
    """One epoch trains everything; resumed with --force --unfreeze layer4, the frozen part is the
    checkpoint's trained layers, not the initial weights the fresh model was built with."""
    import shutil

    first, _ = ft.finetune(demo_dir, out=tmp_path / "first", **dict(RUN, unfreeze="all", epochs=1))
    for name in ("images", "cached"):
        shutil.copytree(first, tmp_path / name)
    resumed = dict(RUN, resume=True, force=True)
    _, m_images = ft.finetune(demo_dir, out=tmp_path / "images", **resumed)
    _, m_cached = ft.finetune(demo_dir, out=tmp_path / "cached", trunk_cache=str(tmp_path / "t.h5"), **resumed)
    assert m_cached["trunk_cache"]["used"] and m_cached["resumed_with_changes"]["unfreeze"] == ["all", "layer4"]
    _assert_same_weights(tmp_path / "images", tmp_path / "cached")
    _assert_same_evaluation(m_images, m_cached, tmp_path / "images", tmp_path / "cached")


def test_a_truncated_cache_path_is_rebuilt_saying_why(cache, demo_dir, demo_features, tmp_path):
    bad = tmp_path / "t.h5"
    bad.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    manifest = manifests.load_manifest(demo_dir)
    bb, model = _model("layer4")
    assert trunk.plan(str(bad), model, bb, _config(), manifest, tmp_path).path == bad  # not the images
    _, result = build_trunk(demo_dir, unfreeze="layer4", out=bad, **SMALL)
    assert result["action"] == "built" and "not a readable HDF5 file" in result["replaced"]
    assert np.array_equal(trunks.open_split(bad, "train").maps, trunks.open_split(cache, "train").maps)
    # Some other file named by mistake is not overwritten: the image path runs, saying why.
    other = tmp_path / "notes.txt"
    other.write_text("not a cache")
    p = trunk.plan(str(other), model, bb, _config(), manifest, tmp_path)
    assert p.path is None and "not a readable HDF5 file" in p.reason and other.read_text() == "not a cache"
    # Nor is a sound HDF5 file of another kind (a feature cache), nor a newer cars_tl's trunk cache.
    import h5py

    feature_cache = tmp_path / "features.h5"
    feature_cache.write_bytes(Path(demo_features).read_bytes())
    p = trunk.plan(str(feature_cache), model, bb, _config(), manifest, tmp_path)
    assert p.path is None and "trunk cache not used" in p.reason
    assert feature_cache.read_bytes() == Path(demo_features).read_bytes()
    for schema, rebuilt in ((trunks.SCHEMA_VERSION + 1, False), (trunks.SCHEMA_VERSION - 1, True)):
        versioned = tmp_path / f"schema{schema}.h5"
        versioned.write_bytes(cache.read_bytes())
        with h5py.File(versioned, "r+") as f:
            f.attrs["schema_version"] = schema
        p = trunk.plan(str(versioned), model, bb, _config(), manifest, tmp_path)
        assert (p.path == versioned) is rebuilt, (schema, p.reason)


def test_build_trunk_prepares_the_device_as_finetune_does(cache, demo_dir, monkeypatch):
    from cars_tl.core import runtime

    prepared = []
    monkeypatch.setattr(runtime, "prepare_device", lambda device, precision: prepared.append((device, precision)))
    _, result = build_trunk(demo_dir, unfreeze="layer4", out=cache, **SMALL)
    assert result["action"] == "up to date" and prepared == [("cpu", "fp32")]


def test_device_path_on_the_cpu_gives_the_same_batches(cache):
    split = trunks.open_split(cache, "test")
    on_device, _ = trunk_store.open_store(cache, "test", "cpu", on_device=True)
    assert isinstance(on_device, torch.Tensor)
    a = list(trunk_store.CachedBatches(split, split.labels, 8, positions=range(len(split))))
    b = list(trunk_store.CachedBatches(on_device, split.labels, 8, positions=range(len(split))))
    for (ma, la, pa, _), (mb, lb, pb, _) in zip(a, b):
        assert torch.equal(ma, mb) and torch.equal(la, lb) and torch.equal(pa, pb)


def test_sixteen_bit_storage_rounds_as_stated():
    x = torch.randn(4, 8, 3, 3) * 10
    for storage, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        stored = trunks.from_float(x, storage)
        assert stored.nbytes == x.numel() * 2
        assert torch.equal(trunks.to_float(stored, storage), x.to(dtype).float())


SMALL_CLI = ["--backbone", "resnet18", "--weights", "random", "--image-size", "32", "--precision", "fp32"]
BUILD = ["build-trunk", *SMALL_CLI, "--workers", "0", "--unfreeze", "layer4", "--batch-size", "16"]


def _assert_same_maps(a: Path, b: Path) -> None:
    for split in ("train", "test"):
        assert np.array_equal(trunks.open_split(a, split).maps, trunks.open_split(b, split).maps), split


def _leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def test_two_builds_started_together_build_once(cache, demo_dir, tmp_path):
    out = tmp_path / "t.h5"
    args = [*CLI, *BUILD, "--data-dir", str(demo_dir), "--out", str(out)]
    jobs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())
        for _ in range(2)
    ]
    results = [(job.pid, job.communicate(timeout=300)[0], job.returncode) for job in jobs]
    built = [r for r in results if r[2] == 0 and f"built: {out}" in r[1]]
    assert len(built) == 1, results
    (builder,) = built
    (other,) = [r for r in results if r is not builder]
    # The second either found the lock taken (refused, naming the builder) or started after the
    # first had finished (then the file was up to date): never a second build or a mixed file.
    if other[2] == 0:
        assert f"up to date: {out}" in other[1], other
    else:
        result = subprocess.CompletedProcess(args, other[2], other[1])
        assert_refused(result, f"{out} is being written by PID {builder[0]} (trunk-cache:", "would corrupt it")
    trunks.verify(out)
    _assert_same_maps(out, cache)
    assert not _leftovers(out) and not Path(f"{out}.partial").exists()


@pytest.mark.slow
def test_a_file_size_limit_is_a_message_and_a_later_build_resumes(cache, demo_dir, tmp_path):
    out = tmp_path / "t.h5"
    result = run_cli_with_file_size_limit([*BUILD, "--data-dir", demo_dir, "--out", out], 400_000)
    assert_refused(result, f"the trunk cache {out} needs about", "ulimit -f: 400.0 KB")
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("error:")]
    assert re.search(r"needs about \d+(\.\d)? (KB|MB)", line), line
    assert not out.exists() and not _leftovers(out)
    again = run_cli(*BUILD, "--data-dir", demo_dir, "--out", out)
    assert again.returncode == 0 and f"resumed: {out}" in again.stdout, again.stdout  # the chunks were kept
    _assert_same_maps(out, cache)
    assert not _leftovers(out) and not Path(f"{out}.partial").exists()


LIMIT_AFTER_CHECK = """
import resource, sys
from cars_tl.artifacts import trunks
from cars_tl.cli import app
limit = int(sys.argv[1])
def passed_then_limited(*args, **kwargs):  # the check passed; then the disk filled (the chunks were written)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
trunks.ensure_room = passed_then_limited
sys.argv = ["cars-tl", *sys.argv[2:]]
app()
"""


@pytest.mark.slow
def test_a_file_size_limit_hit_while_writing_is_a_message(cache, demo_dir, tmp_path):
    out = tmp_path / "t.h5"
    result = run_python(LIMIT_AFTER_CHECK, 400_000, *BUILD, "--data-dir", demo_dir, "--out", out)
    assert_refused(result, f"not enough room for the trunk cache {out}", "File too large")
    assert "h5py" not in result.stdout and "HDF5" not in result.stdout and "errno" not in result.stdout
    assert not out.exists() and not _leftovers(out)
    again = run_cli(*BUILD, "--data-dir", demo_dir, "--out", out)
    assert again.returncode == 0, again.stdout
    _assert_same_maps(out, cache)


def test_a_cache_that_fits_under_the_file_size_limit_is_written(cache, demo_dir, tmp_path):
    out = tmp_path / "t.h5"
    limit = cache.stat().st_size + 100_000  # the demo cache (0.9 MB) was said to need about 2.0 MB
    result = run_cli_with_file_size_limit([*BUILD, "--data-dir", demo_dir, "--out", out], limit)
    assert result.returncode == 0, result.stdout
    _assert_same_maps(out, cache)


def test_finetune_with_a_trunk_cache_that_cannot_be_written_stops_with_the_message(demo_dir, tmp_path):
    # Not a reason to run on the images (those are the inexact settings): the run stops before
    # training, saying which file and how to go on, and leaves no run behind.
    args = ["finetune", "--data-dir", demo_dir, *SMALL_CLI, "--workers", "0", "--unfreeze", "layer4"]
    args += ["--epochs", "1", "--batch-size", "16", "--trunk-cache", "auto", "--artifacts", tmp_path / "artifacts"]
    result = run_cli_with_file_size_limit([*args, "--out", tmp_path / "run"], 400_000)
    assert_refused(result, f"the trunk cache {tmp_path / 'artifacts' / 'trunks'}", "ulimit -f")
    (made,) = (tmp_path / "artifacts" / "trunks").glob("*.partial")
    assert not list((tmp_path / "artifacts" / "trunks").glob("*.h5")) and not list(made.parent.glob(".*.tmp-*"))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.slow
def test_two_process_cached_finetune_equals_one_process(demo_dir, tmp_path):

    # tuned without augmentation: BatchNorm statistics kept (as in test_distributed), so that per-process
    # batches compute what one process does; a validation split, read from the cache too.
    weights = tmp_path / "pretrained.pth"
    torch.save(backbones.build_backbone("resnet18", "random").body.state_dict(), weights)
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "cars_tl",
            *tuned_finetune_args(demo_dir, weights, tmp_path / "one", "--augment", "none"),
            "--trunk-cache",
            str(tmp_path / "one.h5"),
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        torchrun_command(
            2,
            *tuned_finetune_args(demo_dir, weights, tmp_path / "two", "--augment", "none"),
            "--trunk-cache",
            str(tmp_path / "two.h5"),
        ),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    m = runs.read_metrics(tmp_path / "two")
    assert m["trunk_cache"]["used"] and m["trunk_cache"]["action"] == "built" and m["distributed"]["world_size"] == 2
    assert "val_acc" in m["history"][-1]
    for split in ("train", "test"):  # the sharded build wrote the same maps
        assert np.array_equal(
            trunks.open_split(tmp_path / "one.h5", split).maps, trunks.open_split(tmp_path / "two.h5", split).maps
        )
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_bf16_autocast_run_with_bf16_storage_equals_the_image_path(demo_dir, tmp_path):
    # bf16 storage is exact under bf16 autocast: the trunk's output already is bf16 (measured: bit-equal).
    if not torch.backends.mkldnn.is_available():
        pytest.skip("bf16 autocast on the CPU needs oneDNN")
    run = tiny(RUN, precision="bf16")
    images, _ = ft.finetune(demo_dir, out=tmp_path / "images", **run)
    cached, m = ft.finetune(demo_dir, out=tmp_path / "cached", trunk_cache=str(tmp_path / "t.h5"), **run)
    assert m["trunk_cache"]["storage"] == "bf16" and m["trunk_cache"]["bytes_per_image"] == 256 * 2 * 2 * 2
    _assert_same_weights(images, cached)
