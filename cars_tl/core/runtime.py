"""Where and how tensors are computed: device choice, precision, autocast, library versions."""

from __future__ import annotations

import contextlib
import os
import platform

from cars_tl.core.errors import CarsTLError
from cars_tl.core.options import PRECISIONS  # noqa: F401 - declared with the other device options

DEVICES = ("auto", "cpu", "cuda")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which taskset and cpusets narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES and not device.startswith("cuda:"):
        raise CarsTLError(f"unknown device {device!r}; valid: {', '.join(DEVICES)} (or cuda:N)")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CarsTLError(
            f"--device {device} asked for, but no CUDA device is available here", "use --device cpu (or auto)"
        )
    if device.startswith("cuda:"):
        index, count = device[len("cuda:") :], torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            valid = ", ".join(f"cuda:{i}" for i in range(count))
            raise CarsTLError(
                f"--device {device}: this machine has {count} CUDA device(s); valid: cuda, {valid}",
                "use --device cuda (the first) or one of the indices listed (nvidia-smi shows them)",
            )
    return device


def cuda_has_native_bf16(device: str) -> bool:
    """bf16 tensor cores (compute capability 8.0+, Ampere on) on the device asked for."""
    import torch

    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matrix work runs natively, so autocast pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def resolve_precision(precision: str, device: str) -> str:
    cuda = device.startswith("cuda")
    if precision == "auto":
        if cuda:
            return "bf16" if cuda_has_native_bf16(device) else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise CarsTLError("--precision fp16 needs a CUDA device", "use --precision bf16 or fp32 on the CPU")
    if precision == "bf16" and cuda and not cuda_has_native_bf16(device):
        raise CarsTLError(
            f"--precision bf16: {device} has no native bf16 (compute capability below 8.0)",
            "use --precision fp16 (or auto) on this GPU",
        )
    return precision


def use_device(device: str) -> None:
    """``cuda:N`` becomes the process's current CUDA device (``torch.cuda.set_device``), so that
    the pin-memory thread, the caching allocator and any context land on it, not on cuda:0. The
    one place every stage (and every torchrun process) selects its GPU."""
    import torch

    if device.startswith("cuda") and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))


def prepare_device(device: str, precision: str) -> None:
    """Backend settings for a run, called by every stage that runs a network on the device: the
    device selected (:func:`use_device`), cuDNN picks the fastest convolution algorithms for the
    fixed input size, and fp32 means fp32 (TF32 matrix math off), so ``--precision fp32`` is what
    it says."""
    import torch

    if not device.startswith("cuda"):
        return
    use_device(device)
    torch.backends.cudnn.benchmark = True
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def autocast(device: str, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


@contextlib.contextmanager
def intra_op_threads(count: int | None):
    """torch's intra-op thread count set to ``count`` inside the block, restored after (None: unchanged)."""
    import torch

    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tune_malloc() -> bool:
    """glibc only: keep large freed blocks for reuse instead of an mmap/munmap per tensor.

    By default every tensor above glibc's mmap threshold is mapped fresh and page-faulted in again
    on each forward pass; measured here, that halved model throughput (benchmarks/README.md).
    The CLI calls this at start-up (DataLoader workers inherit it); memory is then not returned
    to the OS after a peak. ``CARS_TL_NO_MALLOC_TUNING=1`` turns it off. Returns whether it applied.
    """
    import ctypes
    import os

    if os.environ.get("CARS_TL_NO_MALLOC_TUNING") or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Versions of what shapes the numbers, recorded in every artifact."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for package in ("cars_tl", "torch", "torchvision", "timm", "numpy", "scikit-learn", "h5py"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return out
