"""The one frozen-pass engine: extract-features and the trunk cache both run through it; its chunks
resume an interrupted pass to the very rows of an uninterrupted one; no module of models/ or stages/
grows past 600 lines."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny

from cars_tl.artifacts import features
from cars_tl.data.dataset import BadItem
from cars_tl.models import frozen_pass

ROOT = Path(__file__).resolve().parents[2] / "cars_tl"


class _Rows:
    """A split of ``n`` one-number "images" (the value is the position); ``bad`` positions are unreadable."""

    def __init__(self, n: int, bad=()):
        self.n, self.bad = n, set(bad)
        self.records = [type("R", (), {"label": i % 3, "index": 100 + i, "path": f"img{i}.jpg"})() for i in range(n)]

    def __len__(self):
        return self.n


@dataclasses.dataclass
class _ToyJob(frozen_pass.Job):
    path: Path
    sizes: dict
    batch_size: int = 2
    fail_after: int | None = None  # compute calls before an interruption
    calls: int = 0
    lock, label, row_shape = "toy", "toy", (2,)

    def pending(self):
        return tuple(self.sizes)

    def dataset(self, split):
        return _Rows(self.sizes[split], bad={3} if split == "test" else ())

    def start(self, todo):
        return {"splits": list(todo), "feature_dim": 2}

    def partial(self, meta, sizes, chunk_rows, join):
        return features.PartialCache(self.path, meta, sizes, chunk_rows, join=join)

    def loader(self, split, dataset, rows):
        for start in range(rows.start, rows.stop, self.batch_size):
            positions = [p for p in range(start, min(start + self.batch_size, rows.stop)) if p not in dataset.bad]
            bad = [BadItem(p, Path(f"img{p}.jpg"), "truncated") for p in range(start, start + 2) if p in dataset.bad]
            yield torch.tensor(positions, dtype=torch.float32), None, torch.tensor(positions, dtype=torch.long), bad

    def check_bad(self, bad):  # left out, as --skip-bad leaves them
        pass

    def compute(self, images):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return torch.stack([images, images * images], 1).numpy()

    def write_chunk(self, partial, split, start, block, valid, reasons):
        partial.write_chunk(split, start, block, valid, reasons)

    def finish(self, partial, datasets, todo):
        return {s: partial._gather(s) for s in todo}


def test_an_interrupted_pass_resumes_to_the_rows_of_an_uninterrupted_one(tmp_path):
    sizes = {"train": 21, "test": 11}  # chunks of 8 rows: short last chunks in both splits
    whole = frozen_pass.run(_ToyJob(tmp_path / "a.h5", sizes))
    assert whole.action == "computed" and whole.processed == 32
    rows, valid, bad = whole.written["test"]
    assert not valid[3] and bad == {3: "truncated"} and np.array_equal(rows[5], [5.0, 25.0])
    interrupted = _ToyJob(tmp_path / "b.h5", sizes, fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        frozen_pass.run(interrupted)
    resumed_job = _ToyJob(tmp_path / "b.h5", sizes)
    resumed = frozen_pass.run(resumed_job)
    assert resumed.action == "resumed" and resumed.processed == 32 - 8  # the first whole chunk was kept
    assert resumed_job.calls < 16  # only the missing chunks were computed
    for split in sizes:
        for a, b in zip(whole.written[split], resumed.written[split]):
            assert (a == b) if isinstance(a, dict) else np.array_equal(a, b)


def test_extract_features_and_the_trunk_cache_run_through_the_one_engine(demo_dir, tmp_path, monkeypatch):
    from cars_tl.stages.extract import extract_features
    from cars_tl.stages.trunk_cache import build_trunk

    jobs = []
    real = frozen_pass.run
    monkeypatch.setattr(frozen_pass, "run", lambda job, **kw: jobs.append(job.lock) or real(job, **kw))
    extract_features(demo_dir, splits=("test",), out=tmp_path / "f.h5", **tiny(batch_size=16))
    build_trunk(demo_dir, unfreeze="layer4", out=tmp_path / "t.h5", **tiny(batch_size=16))
    assert jobs == ["extract-features", "trunk-cache"]


def test_no_module_of_models_or_stages_is_over_600_lines():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in ROOT.glob("*/**/*.py")}
    over = {name: n for name, n in sizes.items() if name.startswith(("models/", "stages/")) and n > 600}
    assert not over, over
