"""What many tests share: where the repository and ``../shared`` are, skip markers for the real files,
the tiny network settings, running the CLI in a real process, copying demo data, holding a lock from
another process, asserting a clean refusal, and rewriting feature caches.

Tests import these (``from helpers import ...``); fixtures stay in ``conftest.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from cars_tl.artifacts import features, runs
from cars_tl.core.options import DeviceOptions, ImageOptions
from cars_tl.data import devkit
from cars_tl.data import manifest as manifests
from cars_tl.sources import classnames
from cars_tl.sources.demo import DEMO_CLASSES
from cars_tl.stages import finetune as ft

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_MINI = SHARED / "data" / "stanford_cars_mini"
SHARED_DEVKIT = SHARED / "data" / "stanford_cars_devkit"
SHARED_EFFNET = SHARED / "models" / "efficientnet_lite0_timm.pth"
HAS_TIMM = importlib.util.find_spec("timm") is not None

needs_mini = pytest.mark.skipif(not SHARED_MINI.is_dir(), reason=f"real Stanford Cars subset absent ({SHARED_MINI})")
needs_devkit = pytest.mark.skipif(not SHARED_DEVKIT.is_dir(), reason=f"real devkit absent ({SHARED_DEVKIT})")
needs_effnet = pytest.mark.skipif(
    not (HAS_TIMM and SHARED_EFFNET.is_file()),
    reason="needs the timm extra (pip install 'cars_tl[timm]') and ../shared/models/efficientnet_lite0_timm.pth",
)

# Small, fast settings shared by the tests that run a real network (batch_size None: the stage's default).
TINY = dict(
    backbone="resnet18",
    weights="random",
    image=ImageOptions(image_size=64),
    compute=DeviceOptions(precision="fp32", workers=0, batch_size=None),
)
IMAGE_FIELDS = {f.name for f in dataclasses.fields(ImageOptions)}
DEVICE_FIELDS = {f.name for f in dataclasses.fields(DeviceOptions)}


def tiny(settings: dict = TINY, /, **options) -> dict:
    """``settings`` (:data:`TINY`, or keywords made by this function) with ``options`` applied: the image and
    device options (by their CLI names: crop, margin, image_size, resize; device, precision, workers,
    batch_size) into its records, the others as they are."""
    image = {k: options.pop(k) for k in list(options) if k in IMAGE_FIELDS}
    compute = {k: options.pop(k) for k in list(options) if k in DEVICE_FIELDS}
    return dict(
        settings,
        image=dataclasses.replace(settings["image"], **image),
        compute=dataclasses.replace(settings["compute"], **compute),
        **options,
    )


CLI = [sys.executable, "-m", "cars_tl"]


TINY_CLI = [
    "--backbone",
    "resnet18",
    "--weights",
    "random",
    "--image-size",
    "64",
    "--precision",
    "fp32",
    "--workers",
    "0",
]


def cli_env():
    return dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")


def run_cli(*args, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    """Run the CLI in a real process; stdout holds everything it printed (messages go to stderr)."""
    return subprocess.run(
        [*CLI, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
        timeout=timeout,
        cwd=cwd,
    )


def run_python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
        timeout=300,
    )


def copy_data(demo_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(demo_dir, target, ignore=shutil.ignore_patterns(".*.lock", ".*.readers"))
    return target


def hold_lock(path: Path) -> subprocess.Popen:
    """Another real process holding the writer lock of ``path`` until killed."""
    code = (
        "import sys, time; from pathlib import Path; from cars_tl.core import locks\n"
        f"with locks.writer_lock(Path({str(path)!r}), 'holder-test'):\n"
        "    print('held', flush=True); time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=cli_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout, result.stdout
    assert "error:" in result.stdout and "next:" in result.stdout, result.stdout
    for fragment in fragments:
        assert fragment in result.stdout, (fragment, result.stdout)


def rewrite_cache(src: Path, dst: Path, *, test=None, train=None, dataset_splits=None) -> Path:
    """A copy of the cache ``src`` with split arrays replaced (``test=False``: no test split), written as
    cars_tl writes caches (checksums and all), so only the content differs."""
    cache = features.load(src)
    splits = dict(cache.splits)
    for name, value in (("train", train), ("test", test)):
        if value is False:
            splits.pop(name)
        elif value is not None:
            splits[name] = value(splits[name])
    attrs = dict(cache.attrs)
    if dataset_splits is not None:
        attrs["options"] = dict(attrs.get("options") or {}, dataset_splits=list(dataset_splits))
    return features.write(dst, attrs, splits)


def cache_rows(s: features.SplitArrays, keep) -> features.SplitArrays:
    return features.SplitArrays(
        s.features[keep], s.labels[keep], s.ids[keep], [s.paths[i] for i in np.arange(len(s.labels))[keep]], []
    )


def poisoned(s: features.SplitArrays, value=np.nan) -> features.SplitArrays:
    x = s.features.copy()
    x[3, 7] = value
    return features.SplitArrays(x, s.labels, s.ids, s.paths, s.skipped)


def relu_features_with_a_dead_unit(seed=0, n_per_class=40, classes=4, dim=16):
    """Separable ReLU features; unit 0 is dead (exactly 0) on train but fires on test."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (classes, dim))

    def draw(n):
        y = np.repeat(np.arange(classes), n)
        x = np.maximum(centers[y] + rng.normal(0, 1, (len(y), dim)), 0).astype(np.float32)
        return x, y

    x_train, y_train = draw(n_per_class)
    x_test, y_test = draw(n_per_class // 2)
    x_train[:, 0] = 0.0
    x_test[:, 0] = rng.uniform(0.5, 2.0, len(x_test))  # a unit that woke up: must not get a 1e6 gain
    return x_train, y_train, x_test, y_test


def toy_cache(tmp_path, x_train, y_train, x_test, y_test):
    classes = int(y_train.max()) + 1
    attrs = {
        "backbone": "toy",
        "weights": "random",
        "weights_digest": "0",
        "transform": {"crop": 8},
        "crop": "full",
        "margin": 0.0,
        "precision": "fp32",
        "class_names": [f"c{i}" for i in range(classes)],
        "num_classes": classes,
        "feature_dim": x_train.shape[1],
        "dataset_fingerprint": "f",
        "versions": {},
        "options": {},
        "skip_bad": False,
    }
    split = lambda x, y: features.SplitArrays(x, y, np.arange(len(y)), [f"{i}.jpg" for i in range(len(y))], [])  # noqa: E731
    return features.write(tmp_path / "toy.h5", attrs, {"train": split(x_train, y_train), "test": split(x_test, y_test)})


class FullDisk:
    """Stands in for ``open``: a file whose every write fails as on a full disk (ENOSPC, no filename, as
    ``write()`` reports it). Patch a module's ``open`` with it: ``monkeypatch.setattr(mod, "open", FullDisk,
    raising=False)``."""

    def __init__(self, *_, **__):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def run_cli_with_file_size_limit(args, limit_bytes: int) -> subprocess.CompletedProcess:
    code = (
        "import resource, sys; from cars_tl.cli import app\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, resource.RLIM_INFINITY))\n"
        f"sys.argv = ['cars-tl', *{[str(a) for a in args]!r}]\n"
        "app()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
        timeout=300,
    )


def copy_demo_without_manifest(demo_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(demo_dir / devkit.STANFORD_DIR, tmp_path / devkit.STANFORD_DIR)
    for name in (manifests.MANIFEST_CSV, manifests.MANIFEST_JSON):
        (tmp_path / devkit.STANFORD_DIR / name).unlink()
    return tmp_path


def finetune_weights(run_dir: Path) -> dict:
    return runs.load_checkpoint(run_dir / ft.MODEL_FILE)


def tar_folder(archive: Path, items: dict[str, Path]) -> Path:
    """A .tgz holding each source path under its archive name."""
    with tarfile.open(archive, "w:gz") as tar:
        for arcname, src in items.items():
            tar.add(src, arcname=arcname)
    return archive


def all_in_one_copy(root: Path, out: Path, *, pack: bool) -> Path:
    """car_ims/ (or car_ims.tgz) + cars_annos.mat with train and test interleaved, as the original."""
    train = devkit.read_annotations(root / devkit.DEVKIT_FILES["train"], with_class=True)
    test = devkit.read_annotations(root / devkit.TEST_LABELS_NAMES[0], with_class=True)
    entries = [(split, row) for pair in zip(train, test) for split, row in zip(devkit.SPLITS, pair)]
    entries += [("train", row) for row in train[len(test) :]]
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    annotations = np.zeros((1, len(entries)), dtype=[(f, "O") for f in fields])
    (out / "car_ims").mkdir(parents=True)
    for n, (split, row) in enumerate(entries, start=1):
        rel = f"car_ims/{n:06d}.jpg"
        shutil.copyfile(root / devkit.IMAGE_DIRS[split] / row["fname"], out / rel)
        numbers = [*row["box"], row["class"], int(split == "test")]
        annotations[0, n - 1] = (np.array([rel]), *[np.array([[v]], dtype=np.uint16) for v in numbers])
    names = np.empty((1, len(DEMO_CLASSES)), dtype=object)
    names[0, :] = list(DEMO_CLASSES)
    scipy.io.savemat(out / "cars_annos.mat", {"annotations": annotations, "class_names": names})
    if pack:
        tar_folder(out / "car_ims.tgz", {"car_ims": out / "car_ims"})
        shutil.rmtree(out / "car_ims")
    return out


def class_folders(
    manifest: manifests.Manifest, out: Path, *, rename: dict[str, str] | None = None, with_csv: bool = False
) -> Path:
    """train/<class>/ test/<class>/ below car_data/car_data/, CSVs and names.csv at the top."""
    images = out / "car_data" / "car_data"
    canonical = list(classnames.canonical_names())
    rows = {s: [] for s in devkit.SPLITS}
    for r in manifest.records:
        folder = (rename or {}).get(r.class_name, r.class_name).replace("/", "-")
        target = images / r.split / folder / Path(r.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(manifest.root / r.path, target)
        rows[r.split].append([Path(r.path).name, *r.box, canonical.index(r.class_name) + 1])
    if with_csv:
        for split, split_rows in rows.items():
            with open(out / f"anno_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(split_rows)
        (out / "names.csv").write_text("\n".join(canonical) + "\n")
    return out


def kaggle_copy(mini: Path, out: Path) -> tuple[Path, Path]:
    """The Kaggle layout of the real subset, its test labels kept apart."""
    root = mini / "stanford_cars"
    link_tree(root / "cars_train", out / "cars_train" / "cars_train")
    link_tree(root / "cars_test", out / "cars_test" / "cars_test")
    (out / "car_devkit" / "devkit").mkdir(parents=True)
    for name in ("cars_meta.mat", "cars_train_annos.mat", "cars_test_annos.mat"):
        os.link(root / "devkit" / name, out / "car_devkit" / "devkit" / name)
    # The all-in-one release's annotations, whose car_ims/ paths match nothing here.
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    annotations = np.zeros((1, 1), dtype=[(f, "O") for f in fields])
    annotations[0, 0] = (
        np.array(["car_ims/000001.jpg"]),
        *[np.array([[v]], dtype=np.uint16) for v in (1, 1, 9, 9, 1, 0)],
    )
    scipy.io.savemat(
        out / "cars_annos.mat", {"annotations": annotations, "class_names": np.array([["a"]], dtype=object)}
    )
    labels = out.parent / f"{out.name}-labels" / "cars_test_annos_withlabels.mat"
    labels.parent.mkdir()
    shutil.copyfile(root / "cars_test_annos_withlabels.mat", labels)
    return out, labels


def parquet_shards(
    manifest: manifests.Manifest, out: Path, *, names_in: str = "metadata", drop_label: bool = False
) -> Path:
    """Hugging Face shards: data/train-0000N-of-00002.parquet, data/test-00000-of-00001.parquet.

    Labels index a shuffled name list (not the canonical order), as a card may well do.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted(manifest.class_names, key=lambda n: n[::-1])
    (out / "data").mkdir(parents=True)
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    metadata = (
        {b"huggingface": json.dumps({"info": {"features": features}}).encode()} if names_in == "metadata" else None
    )
    for split, count in (("train", 2), ("test", 1)):
        records = manifest.split(split)
        for n in range(count):
            part = records[n::count]
            columns = {
                "image": [{"bytes": (manifest.root / r.path).read_bytes(), "path": Path(r.path).name} for r in part]
            }
            if not drop_label:
                columns["label"] = pa.array([names.index(r.class_name) for r in part], pa.int64())
            table = pa.table(columns)
            if metadata:
                table = table.replace_schema_metadata(metadata)
            pq.write_table(table, out / "data" / f"{split}-{n:05d}-of-{count:05d}.parquet")
    if names_in == "card":
        lines = [
            "---",
            "dataset_info:",
            "  features:",
            "  - name: image",
            "    dtype: image",
            "  - name: label",
            "    dtype:",
            "      class_label:",
            "        names:",
        ]
        lines += [f"          '{i}': {json.dumps(n)}" for i, n in enumerate(names)]
        lines += ["---", "# Stanford Cars"]
        (out / "README.md").write_text("\n".join(lines) + "\n")
    return out


def toy_run(
    artifacts: Path,
    name: str,
    kind: str = "head",
    seed: int = 0,
    preset: str = "study",
    test_acc: float = 50.0,
    labels=(0, 1, 2, 3),
    first=(0, 1, 2, 3),
    history=(),
    **config,
) -> Path:
    run_dir = artifacts / "runs" / name
    run_dir.mkdir(parents=True)
    metrics = runs.new_metrics(
        kind,
        config.pop("display_name", name),
        {"preset": preset, "seed": seed, "features": f"/x/{name}.h5", **config},
        history=list(history),
        backbone={
            "backbone": "resnet18",
            "weights": "random",
            "weights_digest": "ab" * 32,
            "transform": {"crop": 8},
            "crop": "full",
            "margin": 0.0,
        },
        inputs={"dataset_fingerprint": "cd" * 32},
        class_names=TOY_CLASSES,
        params={"total": 10, "trainable": 5},
        model_file="head.pt",
        final={"test_acc": test_acc, "train_acc": 90.0},
    )
    metrics["status"] = "complete"
    runs.write_metrics(run_dir, metrics)
    runs.write_predictions(run_dir, np.arange(len(labels)), labels, np.eye(4)[list(first)], "probability")
    return run_dir


# One thread per process, as torchrun sets it for several processes (and the one-process reference too).
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def torchrun_command(nproc: int, *args: str, **kwargs) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "cars_tl",
        *args,
    ]


def assert_same_run(a_dir: Path, b_dir: Path) -> None:
    a = runs.load_checkpoint(a_dir / "checkpoints" / "last.pt")["model"]
    b = runs.load_checkpoint(b_dir / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), **DISTRIBUTED_WEIGHT_TOLERANCE), f"{key} differs"
    ha, hb = runs.read_metrics(a_dir)["history"], runs.read_metrics(b_dir)["history"]
    assert [r["epoch"] for r in ha] == [r["epoch"] for r in hb]
    for ra, rb in zip(ha, hb):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key.endswith(("_acc", "_top5")) or key == "epoch":
                assert ra[key] == rb[key], (ra["epoch"], key)
            elif key.endswith("_loss"):
                assert abs(ra[key] - rb[key]) <= DISTRIBUTED_LOSS_TOLERANCE, (ra["epoch"], key)
    pa, pb = runs.read_predictions(a_dir), runs.read_predictions(b_dir)
    assert np.array_equal(pa.ids, pb.ids) and np.array_equal(pa.top_classes, pb.top_classes)


TOY_CLASSES = ["Audi A4 2012", "Audi A6 2012", "BMW M3 2012", "Volvo XC90 2007"]


def link_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


DISTRIBUTED_LOSS_TOLERANCE = 1e-5  # float32 sums of differently sized batches; accuracies must be equal


DISTRIBUTED_WEIGHT_TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # measured: 2 epochs of AdamW differ by at most 1.6e-7


def tuned_finetune_args(data_dir: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    # tuned: seeded augmentation, a validation split, warmup + cosine, label smoothing, AdamW, and
    # BatchNorm statistics kept (frozen) with pretrained-like weights from a file.
    return [
        "finetune",
        "--data-dir",
        str(data_dir),
        "--backbone",
        "resnet18",
        "--weights",
        str(weights),
        "--unfreeze",
        "layer4",
        "--image-size",
        "32",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--preset",
        "tuned",
        "--out",
        str(out),
        *extra,
    ]


def extract_args(data_dir: Path, out: Path) -> list[str]:
    """extract-features with the TINY network, batch 16: the argv the distributed tests launch."""
    return [
        "extract-features",
        "--data-dir",
        str(data_dir),
        "--backbone",
        TINY["backbone"],
        "--weights",
        TINY["weights"],
        "--image-size",
        str(TINY["image"].image_size),
        "--precision",
        TINY["compute"].precision,
        "--workers",
        "0",
        "--batch-size",
        "16",
        "--out",
        str(out),
    ]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(job: subprocess.Popen) -> None:
    """SIGKILL a launcher and all its workers at once, as a lost machine would."""
    for pid in [job.pid, *descendants(job.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def assert_images_reproduce_saved(run_dir: Path, data_dir: Path, count: int | None = None) -> None:
    """``predict`` on the first ``count`` saved test images, read from their files, gives the run's saved
    top-5: the same classes, scores within predict's 6-decimal rounding."""
    from cars_tl.stages.predict import predict

    saved = runs.read_predictions(run_dir)
    manifest = manifests.load_manifest(data_dir)
    paths = {r.index: manifest.root / r.path for r in manifest.split("test")}
    ids = saved.ids[:count]
    tops = [
        next(iter(r["predictions"].values()))["top"] for r in predict([paths[int(i)] for i in ids], run_dirs=[run_dir])
    ]
    np.testing.assert_array_equal([[t["label"] for t in top] for top in tops], saved.top_classes[: len(ids)])
    np.testing.assert_allclose(
        [[t["score"] for t in top] for top in tops], saved.top_scores[: len(ids)], rtol=0, atol=1e-6
    )
