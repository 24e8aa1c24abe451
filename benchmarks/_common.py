"""Shared helpers for the benchmark scripts: machine info, the real data subset, timing, results.

Not a benchmark itself. Every script imports this as ``from _common import ...`` (the scripts put
their own folder on ``sys.path``), so it works as ``.venv/bin/python benchmarks/<name>.py`` from
the repository root or from anywhere else.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
SHARED = REPO.parent / "shared"
MINI_DATA = SHARED / "data" / "stanford_cars_mini"
LITE0_WEIGHTS = SHARED / "models" / "efficientnet_lite0_timm.pth"
LITE0 = "timm/efficientnet_lite0"


warnings.filterwarnings("ignore", message=".*worker processes in total.*")  # 3 workers on 2 cores: on purpose
BENCH_NICE = int(os.environ.get("BENCH_NICE", "-10"))


def claim_cpu() -> dict:
    """Raise this process's scheduling priority (``BENCH_NICE``, default -10; 0 leaves it alone),
    so that a concurrent job on a shared machine disturbs the timings less. With the kernel's
    autogroups on, nice only ranks processes of one session, so the nice of this process's own
    autogroup (/proc/self/autogroup) is set too. DataLoader workers inherit both. Only this
    process and its session are touched; without the permission they stay as they are."""
    if BENCH_NICE:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, BENCH_NICE)
        except OSError:
            pass
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(BENCH_NICE))
        except OSError:
            pass
    try:
        autogroup = Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        autogroup = None
    return {"nice": os.getpriority(os.PRIO_PROCESS, 0), "autogroup": autogroup}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2")))
    except OSError:
        pass
    return []


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict:
    import torch

    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
        "priority": claim_cpu(),
    }
    for package in ("torchvision", "timm", "numpy", "scikit-learn", "h5py", "Pillow"):
        try:
            import importlib.metadata as md

            info[package] = md.version(package)
        except Exception:
            pass
    return info


def require_shared(*paths: Path) -> None:
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise SystemExit(f"benchmark needs shared files that are absent: {', '.join(missing)}")


@contextmanager
def real_subset():
    """A temporary data dir holding an imported copy of the real 20-class subset (shared/ stays read-only)."""
    from cars_tl.sources.prepare import prepare_dataset

    require_shared(MINI_DATA)
    tmp = Path(tempfile.mkdtemp(prefix="cars_tl_bench_"))
    try:
        manifest, action = prepare_dataset(tmp / "data", str(MINI_DATA))
        yield tmp, manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values), idle


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all cores busy over ``seconds`` (everything on the machine, us included)."""
    try:
        total0, idle0 = _cpu_times()
        time.sleep(seconds)
        total1, idle1 = _cpu_times()
    except OSError:
        return 0.0
    span = max(1, total1 - total0)
    return 1.0 - (idle1 - idle0) / span


QUIET_LOG: list[dict] = []


def wait_for_quiet(label: str = "", threshold: float = 0.15, max_wait: float = 20.0) -> float:
    """Wait (up to ``max_wait`` s) until the machine is mostly idle, so a timing is not shared with
    someone else's job. Returns the busy fraction seen last; every call is logged in the results."""
    start = time.perf_counter()
    busy = cpu_busy(1.0)
    while busy > threshold and time.perf_counter() - start < max_wait:
        busy = cpu_busy(2.0)
    waited = time.perf_counter() - start
    QUIET_LOG.append({"before": label, "busy": round(busy, 3), "waited_s": round(waited, 1)})
    if busy > threshold:
        print(
            f"  [warning: machine still {busy:.0%} busy before {label!r} after {waited:.0f}s; figures may be contended]",
            flush=True,
        )
    return busy


def _own_cpu() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped DataLoader workers land here
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Contention:
    """Measures, over a ``with`` block, the share of the machine's cores that *other* processes
    used: (all busy CPU time from /proc/stat - this process's and its reaped children's) / (wall
    time x cores). Near 0 means the timing was not shared with anyone."""

    def __enter__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.t0 = time.perf_counter()
        self.stat0 = _cpu_times()
        self.own0 = _own_cpu()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        total1, idle1 = _cpu_times()
        busy = ((total1 - self.stat0[0]) - (idle1 - self.stat0[1])) / self.hz
        own = _own_cpu() - self.own0
        self.wall = wall
        self.own_cores = own / max(wall, 1e-9)
        self.foreign = max(0.0, busy - own) / max(wall * (os.cpu_count() or 1), 1e-9)
        return False


def best_of(fn, label: str, runs: int = 2, max_tries: int | None = None, max_foreign: float = 0.08, key=None):
    """Call ``fn()`` (which returns a dict holding ``seconds``) until ``runs`` calls were not
    contended (other processes used < ``max_foreign`` of the machine), at most ``max_tries`` calls;
    return the fastest clean result (or the least contended one, flagged). A result that already
    holds ``foreign_cpu_share`` (measured by the child process around its timed part) keeps it;
    otherwise the whole call is measured here. The returned result also gets ``tries``,
    ``clean_runs`` and ``all_seconds``."""
    max_tries = max_tries or runs + 2
    key = key or (lambda r: r["seconds"])
    results = []
    for attempt in range(max_tries):
        wait_for_quiet(label)
        with Contention() as c:
            result = fn()
        if "foreign_cpu_share" not in result:
            result = dict(result, foreign_cpu_share=round(c.foreign, 3), own_cores=round(c.own_cores, 2))
        results.append(result)
        clean = [r for r in results if r["foreign_cpu_share"] <= max_foreign]
        print(
            f"  {label}: try {attempt + 1}: {result['seconds']:.3f}s, foreign CPU {result['foreign_cpu_share']:.0%}",
            flush=True,
        )
        if len(clean) >= runs:
            break
    clean = [r for r in results if r["foreign_cpu_share"] <= max_foreign]
    if clean:
        best = min(clean, key=key)
    else:
        best = min(results, key=lambda r: r["foreign_cpu_share"])
        print(f"  [warning: every run of {label!r} was contended; kept the least contended]", flush=True)
    return dict(best, tries=len(results), clean_runs=len(clean), all_seconds=[round(r["seconds"], 4) for r in results])


def measured(fn, *args, **kwargs) -> dict:
    """``fn(*args, **kwargs)`` (returning a dict) timed with perf_counter under :class:`Contention`:
    adds ``seconds``, ``foreign_cpu_share`` and ``own_cores`` (cores this process and its reaped
    DataLoader workers kept busy). For the timed part inside an isolated child process."""
    with Contention() as c:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs) or {}
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, **out, "foreign_cpu_share": round(c.foreign, 3), "own_cores": round(c.own_cores, 2)}


# --------------------------------------------------------------------------- fresh processes, malloc


def _child(fn, malloc: bool, start_method: str, args, kwargs):
    import multiprocessing

    # A spawned child defaults to spawning its own children: DataLoader workers would then re-import
    # torch at every loader start. Use what a plain `python` process uses (fork on Linux).
    multiprocessing.set_start_method(start_method, force=True)
    claim_cpu()
    from cars_tl.core import runtime  # the CLI's own malloc tuning

    tuned = runtime.tune_malloc() if malloc else False
    out = fn(*args, **kwargs)
    if isinstance(out, dict):
        out = dict(out, malloc_tuned=tuned)
    return out


def isolated(fn, *args, malloc: bool = False, **kwargs):
    """Run module-level ``fn(*args, **kwargs)`` in a fresh Python process (spawned) and return its
    result: every measurement starts from the same process state, as one CLI command does.
    (Within one process, what ran before changes glibc malloc's mmap threshold, and with it the
    page faults every large tensor costs: order would change the figures.) ``malloc=True`` calls
    :func:`cars_tl.core.runtime.tune_malloc` first in that process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child, fn, malloc, multiprocessing.get_start_method(), args, kwargs).result()


def page_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = dict(payload)
    payload.setdefault("machine", machine_info())
    payload["machine"]["load_average_at_end"] = load_average()
    payload["machine"]["quiet_checks"] = QUIET_LOG
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    print(f"\nsaved {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    return str(value)


def target(value: float, goal: float, op: str = ">=") -> dict:
    met = value >= goal if op == ">=" else value <= goal
    return {"value": round(float(value), 4), "target": f"{op} {goal}", "met": bool(met)}


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)
