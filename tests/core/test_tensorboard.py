"""Live TensorBoard logging (--tensorboard), read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import sys

import pytest
from helpers import tiny

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(path):
    acc = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def steps(acc, tag):
    return [e.step for e in acc.Scalars(tag)]


def test_train_head_logs_epochs_and_hparams(demo_features, tmp_path):
    from cars_tl.stages.train_head import train_head

    tb = tmp_path / "tb"
    run_dir, metrics = train_head(demo_features, epochs=3, out=tmp_path / "head", tensorboard=tb)
    acc = read_events(tb / run_dir.name)
    tags = set(acc.Tags()["scalars"])
    assert {
        "loss/train",
        "accuracy/train",
        "loss/test",
        "accuracy/test",
        "top5/test",
        "lr/group0",
        "speed/images_per_second",
    } <= tags
    assert steps(acc, "loss/train") == [1, 2, 3]
    logged = [e.value for e in acc.Scalars("accuracy/test")]
    assert logged == pytest.approx([r["test_acc"] for r in metrics["history"]], abs=1e-4)
    assert acc.Scalars("lr/group0")[0].value == pytest.approx(metrics["config"]["lr"])
    # The hparams view: the plugin's experiment, session start (with the config) and end records.
    assert set(acc.PluginTagToContent("hparams")) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    )
    assert start.session_start_info.hparams["optimizer"].string_value == "adam"
    assert start.session_start_info.hparams["epochs"].number_value == 3
    assert acc.Scalars("hparam/test_acc")[0].value == pytest.approx(metrics["final"]["test_acc"], abs=1e-4)


@pytest.mark.slow
def test_finetune_resume_continues_without_duplicate_steps(demo_dir, tmp_path):
    from cars_tl.stages.finetune import finetune

    tb, out = tmp_path / "tb", tmp_path / "ft"
    opts = tiny(unfreeze="layer4", batch_size=16, out=out, tensorboard=tb)
    finetune(demo_dir, epochs=1, **opts)
    _, metrics = finetune(demo_dir, epochs=2, resume=True, **opts)
    acc = read_events(tb / out.name)
    assert steps(acc, "loss/test") == [0, 1, 2]  # epoch 0: the starting point
    assert steps(acc, "loss/train") == [1, 2]
    assert {"lr/group0", "lr/group1"} <= set(acc.Tags()["scalars"])  # head and unfrozen layer4
    assert [e.value for e in acc.Scalars("accuracy/test")] == pytest.approx(
        [r["test_acc"] for r in metrics["history"]], abs=1e-4
    )


def test_killed_run_resumed_drops_the_lost_steps(tmp_path):
    """Steps a killed run logged past its last checkpoint are purged when the resumed run rewrites them."""
    from cars_tl.core.tensorboard import EpochLog

    first = EpochLog(tmp_path, "run")
    for epoch in range(4):  # epochs 0..3 logged, but (say) last.pt holds epoch 1
        first.on_epoch({"epoch": epoch, "train_loss": 10.0 + epoch})
    first.close()
    resumed = EpochLog(tmp_path, "run", start_epoch=2)
    for epoch in (2, 3, 4):
        resumed.on_epoch({"epoch": epoch, "train_loss": 20.0 + epoch})
    resumed.close()
    scalars = read_events(tmp_path / "run").Scalars("loss/train")
    assert [e.step for e in scalars] == [0, 1, 2, 3, 4]
    assert [e.value for e in scalars] == [10, 11, 22, 23, 24]


def test_fresh_run_replaces_earlier_curves(tmp_path):
    from cars_tl.core.tensorboard import EpochLog

    for offset in (0.0, 5.0):  # a --force rerun under the same name
        log = EpochLog(tmp_path, "run")
        for epoch in (1, 2):
            log.on_epoch({"epoch": epoch, "test_acc": offset + epoch})
        log.close()
    assert [e.value for e in read_events(tmp_path / "run").Scalars("accuracy/test")] == [6.0, 7.0]


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    from cars_tl.core.tensorboard import EpochLog

    for rank, expected in (("1", False), ("0", True)):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        log = EpochLog(tmp_path / f"rank{rank}", "run")
        log.on_epoch({"epoch": 1, "train_loss": 1.0})
        log.on_end({"lr": 0.1}, {"test_acc": 50.0})
        assert log.active is False
        assert (tmp_path / f"rank{rank}" / "run").is_dir() is expected


def test_missing_extra_names_it(demo_features, tmp_path, monkeypatch):
    from cars_tl.core.errors import CarsTLError
    from cars_tl.stages.train_head import train_head

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX -> ImportError
    with pytest.raises(CarsTLError) as err:
        train_head(demo_features, epochs=1, out=tmp_path / "head", tensorboard=tmp_path / "tb")
    assert "cars_tl[tensorboard]" in err.value.hint
    assert not (tmp_path / "head").exists()  # refused before any work
