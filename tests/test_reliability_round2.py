"""Issue 19, items 1-4 and 8: readers that cannot be mixed up, locks that cannot be abused, a disk that
fills mid-write, make that reruns nothing when nothing changed. Real processes through the CLI.

Cases (for the next adversarial run):

1. readers vs download (cars_tl.core.locks.reader_lock / writer_lock on ``<data>/.stanford_cars.lock``):
   - extract-features stopped mid-extraction; ``download --source demo`` into its data folder -> exit 2,
     "being read by PID <extractor>"; the data folder untouched; the extraction then completes and its
     cache carries the folder's fingerprint; the reader's record is gone afterwards;
   - a download in progress (slowed demo generation); ``extract-features`` on that folder -> exit 2,
     "being replaced by PID <download>"; no cache written;
   - predict on an image of a data folder while a download holds it -> LockedError.
2. lock files:
   - a symlink planted at ``.<name>.lock`` -> exit 2 "symbolic link", the file it points to intact;
   - a hard link planted there -> refused the same way;
   - holder + two refused writers: both are told the holder's PID, the lock file still holds it.
3. full disk during the cache write (features.write builds the .h5 in memory, writes it with plain I/O):
   - a 8 MiB tmpfs filled by "another process" right after the room check -> exit 2, "not enough room",
     no .h5 and no temporary; the rerun with space resumes and succeeds (skipped where mount is refused);
   - a file-size limit hit mid-write (check bypassed) -> exit 2, same message, nothing left;
   - a 0.4 MB cache under a 1 MB ``ulimit -f`` is written (the check asks for the exact size).
4. kNN at T = 0.01 and 1e-4: see tests/test_knn.py (float64 reference, not at chance).
8. make: after ``download --verify`` rewrote the manifest with the same content, ``make all`` runs no
   stage; a changed fingerprint reruns extraction and the fine-tunes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cars_tl.artifacts import features
from cars_tl.core import locks
from cars_tl.data import devkit
from cars_tl.data import manifest as manifests
from cars_tl.stages.predict import predict

REPO = Path(__file__).resolve().parents[1]
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


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        timeout=timeout,
    )


def _python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        timeout=300,
    )


def _copy_data(demo_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(demo_dir, target, ignore=shutil.ignore_patterns(".*.lock", ".*.readers"))
    return target


# --------------------------------------------------------------------------- 1. readers vs download


def test_download_is_refused_while_an_extraction_reads_the_folder(demo_dir, tmp_path):
    data_dir = _copy_data(demo_dir, tmp_path)
    root = devkit.stanford_root(data_dir)
    manifest_before = (root / manifests.MANIFEST_JSON).read_bytes()
    out = tmp_path / "f.h5"
    reader = subprocess.Popen(
        [*CLI, "extract-features", "--data-dir", str(data_dir), *TINY_CLI, "--batch-size", "8", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(features.partial_dir(out).glob("train-*.npz")):
        assert reader.poll() is None, reader.stdout.read()
        time.sleep(0.02)
    reader.send_signal(signal.SIGSTOP)  # mid-extraction, reading the folder
    try:
        records = list(locks.readers_dir(root).glob("*.json"))
        assert len(records) == 1 and json.loads(records[0].read_text())["pid"] == reader.pid
        refused = _cli("download", "--data-dir", data_dir, "--source", "demo")
    finally:
        reader.send_signal(signal.SIGCONT)
    assert reader.wait(timeout=300) == 0, reader.stdout.read()
    assert refused.returncode == 2, refused.stdout
    assert (
        "being read by" in refused.stdout
        and f"PID {reader.pid}" in refused.stdout
        and "extract-features" in refused.stdout
    )
    assert "Traceback" not in refused.stdout
    # The folder was not replaced, and the cache describes the folder it read.
    assert (root / manifests.MANIFEST_JSON).read_bytes() == manifest_before
    assert sorted(p.name for p in data_dir.iterdir() if p.name.startswith(".stanford_cars.tmp")) == []
    cache = features.verify(out)
    assert cache.attrs["dataset_fingerprint"] == manifests.load_manifest(data_dir).fingerprint
    assert not list(locks.readers_dir(root).glob("*.json"))  # the reader's record left with it
    assert _cli("download", "--data-dir", data_dir, "--source", "demo").returncode == 0  # no reader now


SLOW_DOWNLOAD = """
import pathlib, sys, time
import cars_tl.sources.demo as demo
original = demo.generate_demo
def slow(root):
    original(root)
    pathlib.Path(sys.argv[2]).write_text("ready")
    time.sleep(120)
demo.generate_demo = slow
from cars_tl.sources.prepare import prepare_dataset
prepare_dataset(pathlib.Path(sys.argv[1]), "demo")
"""


def test_an_extraction_is_refused_while_a_download_replaces_the_folder(demo_dir, tmp_path):
    data_dir, ready = _copy_data(demo_dir, tmp_path), tmp_path / "ready"
    # Make the demo download rebuild (a different origin), so it stages a new folder and sleeps.
    (devkit.stanford_root(data_dir) / manifests.ORIGIN_FILE).write_text(json.dumps({"source": "elsewhere"}))
    writer = subprocess.Popen([sys.executable, "-c", SLOW_DOWNLOAD, str(data_dir), str(ready)], env=_env())
    out = tmp_path / "f.h5"
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the download died or hung"
            time.sleep(0.1)
        refused = _cli("extract-features", "--data-dir", data_dir, *TINY_CLI, "--out", out)
        image = next((devkit.stanford_root(data_dir) / "cars_test").iterdir())
        with pytest.raises(locks.LockedError, match=f"PID {writer.pid}"):
            predict([image], run_dirs=[])  # an image of that folder: the same refusal, before anything else
    finally:
        writer.kill()
        writer.wait()
    assert refused.returncode == 2, refused.stdout
    assert (
        "being replaced by" in refused.stdout and f"PID {writer.pid}" in refused.stdout and "download" in refused.stdout
    )
    assert "Traceback" not in refused.stdout
    assert not out.exists() and not features.partial_dir(out).exists()


# --------------------------------------------------------------------------- 2. lock files


def test_a_symlink_or_hard_link_at_a_lock_name_is_refused_and_its_target_kept(demo_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "feats" / "f.h5"
    out.parent.mkdir()
    locks.lock_path(out).symlink_to(victim)
    result = _cli("extract-features", "--data-dir", demo_dir, *TINY_CLI, "--out", out)
    assert result.returncode == 2, result.stdout
    assert (
        "symbolic link" in result.stdout
        and str(locks.lock_path(out)) in result.stdout
        and "Traceback" not in result.stdout
    )
    assert victim.read_text() == "precious" and not out.exists()
    locks.lock_path(out).unlink()
    os.link(victim, locks.lock_path(out))
    with pytest.raises(locks.LockFileError, match="other hard links"), locks.writer_lock(out, "test"):
        pass
    assert victim.read_text() == "precious"


def test_a_refused_writer_leaves_the_holders_record(demo_features, tmp_path):
    run_dir = tmp_path / "run"
    code = (
        "import sys, time; from pathlib import Path; from cars_tl.core import locks\n"
        f"with locks.writer_lock(Path({str(run_dir)!r}), 'holder-test'):\n"
        "    print('held', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        second = _cli("train-head", "--features", demo_features, "--epochs", "1", "--out", run_dir)
        third = _cli("train-head", "--features", demo_features, "--epochs", "1", "--out", run_dir)
        recorded = json.loads(locks.lock_path(run_dir).read_text())
    finally:
        holder.kill()
        holder.wait()
    for result in (second, third):
        assert result.returncode == 2, result.stdout
        assert f"PID {holder.pid}" in result.stdout and "holder-test" in result.stdout
    assert recorded["pid"] == holder.pid


# --------------------------------------------------------------------------- 3. full disk during the cache write


FILL_AFTER_CHECK = """
import os, sys
from pathlib import Path
from cars_tl.artifacts import features
from cars_tl.cli import app
real = features.ensure_room
def check_then_fill(path, needed, what="output"):
    real(path, needed, what)  # the check passes: then another process takes the space
    st = os.statvfs(Path(path).parent)
    with open(Path(path).parent.parent / "filler", "wb") as f:
        f.write(b"x" * max(0, st.f_bavail * st.f_frsize - 64 * 1024))
features.ensure_room = check_then_fill
sys.argv = ["cars-tl", *sys.argv[1:]]
app()
"""

LIMIT_WITHOUT_CHECK = """
import resource, sys
from cars_tl.artifacts import features
from cars_tl.cli import app
limit = int(sys.argv[1])
def passed_then_limited(*args, **kwargs):  # the check passed; then the limit shrank (the chunks were written)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
features.ensure_room = passed_then_limited
sys.argv = ["cars-tl", *sys.argv[2:]]
app()
"""

LIMITED = """
import resource, sys
from cars_tl.cli import app
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = ["cars-tl", *sys.argv[2:]]
app()
"""


def _assert_clean_refusal(result, out: Path):
    assert result.returncode == 2, result.stdout
    assert "not enough room for the feature cache" in result.stdout and str(out) in result.stdout
    assert "Traceback" not in result.stdout and "h5py" not in result.stdout and "HDF5" not in result.stdout
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_a_disk_that_fills_during_the_write_is_a_message_and_the_rerun_succeeds(demo_dir, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = mount / "feats" / "f.h5"
        result = _python(FILL_AFTER_CHECK, "extract-features", "--data-dir", demo_dir, *TINY_CLI, "--out", out)
        _assert_clean_refusal(result, out)
        assert "No space left" in result.stdout
        assert features.partial_dir(out).exists()  # the extracted chunks are kept for the rerun
        (mount / "filler").unlink()
        again = _cli("extract-features", "--data-dir", demo_dir, *TINY_CLI, "--out", out)
        assert again.returncode == 0, again.stdout
        assert len(features.verify(out).split("train").labels) == 144
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_file_size_limit_hit_during_the_write_is_the_same_message(demo_dir, tmp_path):
    out = tmp_path / "f.h5"
    result = _python(LIMIT_WITHOUT_CHECK, 100_000, "extract-features", "--data-dir", demo_dir, *TINY_CLI, "--out", out)
    _assert_clean_refusal(result, out)


def test_a_cache_that_fits_under_the_file_size_limit_is_written(demo_dir, tmp_path):
    out = tmp_path / "f.h5"
    result = _python(LIMITED, 1 << 20, "extract-features", "--data-dir", demo_dir, *TINY_CLI, "--out", out)
    assert result.returncode == 0, result.stdout
    size = out.stat().st_size
    assert 100_000 < size < 1 << 20  # the demo cache (about 0.4 MB) fits: it used to be refused
    assert features.verify(out).num_classes > 1


# --------------------------------------------------------------------------- 8. make reruns nothing when nothing changed


FAKE_CARS = """#!{python}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
if args[0] == "paths":  # make reads every name from the real CLI
    os.execv({python!r}, [{python!r}, "-m", "cars_tl", *args])
with open({log!r}, "a") as f:
    f.write(" ".join(args[:1]) + "\\n")
opt = lambda name: args[args.index(name) + 1] if name in args else None
out = opt("--out")
if args[0] in ("extract-features", "build-trunk"):
    Path(out).parent.mkdir(parents=True, exist_ok=True); Path(out).write_text("cache")
elif args[0] in ("train-head", "fit-svm", "knn", "finetune"):
    Path(out).mkdir(parents=True, exist_ok=True); (Path(out) / "metrics.json").write_text("{{}}")
elif args[0] == "sparsity":
    Path(out).mkdir(parents=True, exist_ok=True); (Path(out) / "sparsity.json").write_text("{{}}")
elif args[0] == "report":
    (Path(opt("--artifacts")) / "report").mkdir(parents=True, exist_ok=True)
    (Path(opt("--artifacts")) / "report" / "report.html").write_text("report")
elif args[0] == "predict":
    print("{{}}")
"""


def test_make_reruns_nothing_after_the_manifest_is_rewritten_with_the_same_content(demo_dir, tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    data_dir = _copy_data(demo_dir, tmp_path)
    log = tmp_path / "calls.log"
    fake = tmp_path / "cars-tl"
    fake.write_text(FAKE_CARS.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()
    make = [
        "make",
        "--no-print-directory",
        "-C",
        str(REPO),
        "all",
        f"VENV={venv}",
        f"CARS={fake}",
        f"DATA={data_dir}",
        f"ARTIFACTS={tmp_path / 'artifacts'}",
        "SOURCE=demo",
    ]

    def stages() -> list[str]:
        log.write_text("")
        result = subprocess.run(make, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return log.read_text().split()

    first = stages()
    assert {"download", "extract-features", "train-head", "finetune", "fit-svm", "knn", "report"} <= set(first)
    assert stages() == []
    # download --verify re-hashes every image and rewrites the manifest: same content, a new file.
    manifest = devkit.stanford_root(data_dir) / manifests.MANIFEST_JSON
    before = manifest.stat().st_mtime_ns
    verified = _cli("download", "--data-dir", data_dir, "--source", "demo", "--verify")
    assert verified.returncode == 0, verified.stdout
    assert manifest.stat().st_mtime_ns > before
    assert stages() == []
    # Another dataset (another fingerprint) reruns the image stages and what depends on them.
    meta = json.loads(manifest.read_text())
    meta["fingerprint"] = "0" * 64
    manifest.write_text(json.dumps(meta, indent=1))
    changed = stages()
    assert "extract-features" in changed and changed.count("finetune") >= 2
