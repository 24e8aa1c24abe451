"""SVM kernels, written once: the kernel values from dot products (or squared distances, rbf), for
numpy arrays (the CV search's Gram matrices) and torch tensors (:func:`kernel_matrix`, by row blocks)."""

from __future__ import annotations

import numpy as np

from cars_tl.core.errors import CarsTLError

KERNELS = ("linear", "poly", "rbf", "sigmoid")


BLOCK = 2048


def check_kernel(kernel: str, *, allow_all: bool = False) -> str:
    """``kernel`` if it names one of :data:`KERNELS` (or ``all``, where ``allow_all``: fit-svm fits each);
    else the --kernel refusal users see."""
    if kernel in KERNELS or (allow_all and kernel == "all"):
        return kernel
    raise CarsTLError(f"unknown --kernel {kernel!r}; valid: {', '.join(KERNELS)}, all")


def kernel_matrix(a: np.ndarray, b: np.ndarray, kernel: str, gamma: float, degree: int, coef0: float) -> np.ndarray:
    """K(a, b) in float64 with torch matrix products, by row blocks."""
    import torch

    tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64))
    b_sq = (tb * tb).sum(1) if kernel == "rbf" else None
    out = np.empty((len(a), len(b)), dtype=np.float64)
    for start in range(0, len(a), BLOCK):
        ta = torch.from_numpy(np.ascontiguousarray(a[start : start + BLOCK], dtype=np.float64))
        dot = ta @ tb.T
        if kernel == "rbf":
            dot = ((ta * ta).sum(1)[:, None] + b_sq[None, :] - 2 * dot).clamp_min_(0)
        out[start : start + len(ta)] = kernel_values(dot, kernel, gamma, degree, coef0, torch).numpy()
    return out


def kernel_values(gram, kernel: str, gamma: float, degree: int, coef0: float, xp=np):
    """K from ``gram``: dot products, or squared distances for rbf. ``xp``: numpy or torch."""
    if kernel == "linear":
        return gram
    if kernel == "poly":
        return (gamma * gram + coef0) ** degree
    if kernel == "rbf":
        return xp.exp(-gamma * gram)
    if kernel == "sigmoid":
        return xp.tanh(gamma * gram + coef0)
    check_kernel(kernel)  # raises: every kernel of KERNELS is handled above
    raise AssertionError(f"kernel {kernel!r} listed in KERNELS but not computed")
