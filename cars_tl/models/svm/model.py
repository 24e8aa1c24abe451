"""The SVM as fitted and saved: feature scaling, gamma, the fast precomputed-kernel fit, the model that
predicts new images from its support vectors, and its skops file (trusted types only, checked on load)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cars_tl.core.atomic import atomic_path
from cars_tl.core.errors import CarsTLError, check_number
from cars_tl.models.svm import kernels
from cars_tl.models.svm.kernels import KERNELS

SCALES = ("none", "standard", "l2")


METHODS = ("precomputed", "plain")


# A higher power sends poly's kernel values to 0 or to overflow (libsvm then fails): no useful model.
DEGREE_MAX = 20


TRUSTED_TYPES = (
    "sklearn.svm._classes.SVC",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.float64",
    "numpy.int32",
    "numpy.int64",
    "builtins.dict",
    "builtins.list",
    "builtins.str",
    "builtins.int",
    "builtins.float",
    "builtins.tuple",
    "builtins.NoneType",
)


def load_libraries() -> float:
    """Import what fitting and kernels need (scikit-learn's SVC, torch) and return the seconds it took: a
    one-off start-up of the process, timed apart so that it is not charged to the first kernel's fit."""
    import time

    started = time.perf_counter()
    import sklearn.svm  # noqa: F401
    import torch

    torch.ones(2, 2) @ torch.ones(2, 2)  # the thread pool starts on the first operation
    return time.perf_counter() - started


def parse_gamma(gamma: str) -> str | float:
    if gamma in ("scale", "auto"):
        return gamma
    try:
        value = float(gamma)
    except ValueError:
        raise CarsTLError(
            f"--gamma {gamma!r} is not valid; valid: scale, auto, cv (cross-validated), or a positive number"
        ) from None
    return check_number(
        "--gamma", value, minimum=0, exclusive_minimum=True, hint="valid: scale, auto, cv, or a positive number"
    )


class Scaler:
    """``none`` | ``standard`` (train mean/std) | ``l2`` (each vector to unit length)."""

    def __init__(self, mode: str, mean: np.ndarray | None = None, std: np.ndarray | None = None):
        if mode not in SCALES:
            raise CarsTLError(f"unknown --scale {mode!r}; valid: {', '.join(SCALES)}")
        self.mode, self.mean, self.std = mode, mean, std

    @classmethod
    def fit(cls, mode: str, x: np.ndarray) -> Scaler:
        if mode == "standard":
            # StandardScaler's statistics: a feature constant on train gets scale 1, not a huge gain.
            from sklearn.preprocessing import StandardScaler

            scaler = StandardScaler().fit(np.asarray(x, dtype=np.float64))
            return cls(mode, scaler.mean_, scaler.scale_)
        return cls(mode)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.mode == "standard":
            return (x - self.mean) / self.std
        if self.mode == "l2":
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x


def gamma_value(gamma: str | float, x: np.ndarray) -> float:
    """sklearn's meaning: ``scale`` = 1 / (n_features * X.var()), ``auto`` = 1 / n_features."""
    if gamma == "scale":
        var = float(x.var())
        return 1.0 / (x.shape[1] * var) if var > 0 else 1.0
    if gamma == "auto":
        return 1.0 / x.shape[1]
    return float(gamma)


class SVMModel:
    """An SVC plus what it needs to score new features: scaling, kernel settings, support vectors."""

    def __init__(
        self,
        svc,
        scaler: Scaler,
        kernel: str,
        gamma: float,
        degree: int,
        coef0: float,
        method: str,
        support_vectors: np.ndarray | None = None,
        n_train: int = 0,
    ):
        self.svc, self.scaler, self.kernel = svc, scaler, kernel
        self.gamma, self.degree, self.coef0, self.method = gamma, degree, coef0, method
        self.support_vectors, self.n_train = support_vectors, n_train

    @property
    def classes(self) -> np.ndarray:
        return self.svc.classes_

    def _input(self, x: np.ndarray) -> np.ndarray:
        z = self.scaler(x)
        if self.method == "plain":
            return z
        # sklearn wants K against all training rows; only the support columns are ever read.
        full = np.zeros((len(z), self.n_train), dtype=np.float64)
        full[:, self.svc.support_] = kernels.kernel_matrix(
            z, self.support_vectors, self.kernel, self.gamma, self.degree, self.coef0
        )
        return full

    def _blocks(self, fn, x: np.ndarray) -> np.ndarray:
        return (
            np.concatenate([fn(self._input(x[i : i + 1024])) for i in range(0, len(x), 1024)])
            if len(x)
            else np.zeros(0)
        )

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._blocks(self.svc.predict, x)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """One-vs-rest shaped scores (sklearn's ``decision_function_shape="ovr"``): (n, classes)."""
        return self._blocks(self.svc.decision_function, x)

    def ranking_scores(self, x: np.ndarray) -> np.ndarray:
        """Scores (n, classes) whose argmax is exactly ``predict``: sklearn's one-vs-rest scores
        (one-vs-one votes plus confidences scaled below one vote), except where votes tie. There
        ``SVC.predict`` takes the lowest class index while the confidences may favour another class,
        so the predicted class's score is raised to just above the row's maximum: rank 1 is always
        what the SVM predicts (and what its recorded accuracy counts), ranks 2.. follow the scores."""
        x = np.asarray(x)
        if not len(x):
            return np.zeros((0, len(self.classes)))
        scores = self.decision_function(x).reshape(len(x), -1)
        if scores.shape[1] == 1:  # two classes: sklearn gives one column, positive for classes_[1]
            scores = np.concatenate([-scores, scores], axis=1)
        predicted = np.searchsorted(self.classes, self.predict(x))
        rows = np.arange(len(x))
        disagree = scores.argmax(1) != predicted
        scores[rows[disagree], predicted[disagree]] = scores[disagree].max(1) + 1e-9 * (
            1 + np.abs(scores[disagree].max(1))
        )
        return scores

    def to_state(self) -> dict:
        return {
            "svc": self.svc,
            "scale": self.scaler.mode,
            "scale_mean": self.scaler.mean,
            "scale_std": self.scaler.std,
            "kernel": self.kernel,
            "gamma": float(self.gamma),
            "degree": int(self.degree),
            "coef0": float(self.coef0),
            "method": self.method,
            "support_vectors": self.support_vectors,
            "n_train": int(self.n_train),
        }

    @classmethod
    def from_state(cls, state: dict) -> SVMModel:
        scaler = Scaler(state["scale"], state["scale_mean"], state["scale_std"])
        return cls(
            state["svc"],
            scaler,
            state["kernel"],
            state["gamma"],
            state["degree"],
            state["coef0"],
            state["method"],
            state["support_vectors"],
            state["n_train"],
        )


def fit_model(
    x: np.ndarray,
    y: np.ndarray,
    kernel: str,
    C: float,
    degree: int,
    gamma: str | float,
    coef0: float,
    scale: str,
    method: str = "precomputed",
) -> SVMModel:
    from sklearn.svm import SVC

    kernels.check_kernel(kernel)
    if method not in METHODS:
        raise CarsTLError(f"unknown --method {method!r}; valid: {', '.join(METHODS)}")
    check_number("--C", C, minimum=0, exclusive_minimum=True)
    scaler = Scaler.fit(scale, x)
    z = scaler(x)
    g = gamma_value(gamma, z)
    if method == "plain":
        svc = SVC(kernel=kernel, C=C, degree=degree, gamma=g, coef0=coef0).fit(z, y)
        return SVMModel(svc, scaler, kernel, g, degree, coef0, method)
    svc = SVC(kernel="precomputed", C=C).fit(kernels.kernel_matrix(z, z, kernel, g, degree, coef0), y)
    return SVMModel(svc, scaler, kernel, g, degree, coef0, method, z[svc.support_].copy(), len(z))


def save_model(model: SVMModel, path: Path) -> None:
    import skops.io as sio

    with atomic_path(Path(path)) as tmp:
        sio.dump(model.to_state(), tmp)


def load_model(
    path: Path, num_features: int | None = None, num_classes: int | None = None, recorded: dict | None = None
) -> SVMModel:
    """Load a skops file, refusing any type outside :data:`TRUSTED_TYPES` and any content that is not a
    consistent fitted model (see :func:`_state_problem`); ``num_features``/``num_classes``: those of the
    feature cache the run claims, which the model must match; ``recorded``: the settings its run
    recorded (:func:`recorded_settings`), which it must hold (a file can be edited apart from its run)."""
    import skops.io as sio

    path = Path(path)
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:
        raise CarsTLError(f"{path} is not a readable skops file: {exc}", "refit it with cars-tl fit-svm") from None
    refused = sorted(t for t in untrusted if t not in TRUSTED_TYPES)
    if refused:
        raise CarsTLError(
            f"refused to load {path}: it contains types outside the trusted list: {', '.join(refused)}",
            "only load SVM files made by cars-tl fit-svm; refit it yourself from the feature cache",
        )
    try:
        state = sio.load(path, trusted=list(untrusted))
    except Exception as exc:  # noqa: BLE001 - skops raises many types for damaged files
        raise CarsTLError(f"{path} is not a readable skops file: {exc}", "refit it with cars-tl fit-svm") from None
    problem = _state_problem(state)
    if problem is None:
        problem = _fitted_problem(state, num_features, num_classes)
    if problem:
        raise CarsTLError(
            f"{path} is not a cars_tl fit-svm model: {problem}", "refit it with cars-tl fit-svm --features F.h5 --force"
        )
    for field, value, expected in _settings_mismatch(state, recorded or {}):
        raise CarsTLError(
            f"{path} does not hold the model its run recorded: {field} is {value!r}, but metrics.json records "
            f"{expected!r} (the file was changed or replaced since fit-svm wrote it)",
            "refit it with cars-tl fit-svm --features F.h5 --force",
        )
    return SVMModel.from_state(state)


def recorded_settings(metrics: dict, model_file: str) -> dict:
    """What a fit-svm run's ``metrics.json`` says the model in ``model_file`` is: the kernel (also in the
    file's name), its C, gamma and support-vector count, and the run's degree, coef0, scale and method.
    Runs written before a field was recorded simply lack it."""
    config = metrics.get("config") or {}
    result = next((r for r in (metrics.get("kernels") or {}).values() if r.get("model_file") == model_file), {})
    by_name = next((k for k in KERNELS if model_file_name(k) == model_file), None)
    settings = {
        "kernel": result.get("kernel") or by_name,
        "C": result.get("C"),
        "gamma": result.get("gamma_value"),
        "support vectors": result.get("support_vectors"),
        "classes": result.get("classes"),
        **{k: config.get(k) for k in ("degree", "coef0", "scale", "method")},
    }
    return {k: v for k, v in settings.items() if v is not None}


def _settings_mismatch(state: dict, recorded: dict):
    """(field, value, expected) for each setting that differs from ``recorded``."""
    svc = state["svc"]
    held = {
        "kernel": state["kernel"],
        "C": float(svc.C),
        "gamma": float(state["gamma"]),
        "support vectors": len(svc.support_),
        "classes": [int(c) for c in svc.classes_],
        "degree": int(state["degree"]),
        "coef0": float(state["coef0"]),
        "scale": state["scale"],
        "method": state["method"],
    }
    for field, expected in recorded.items():
        value = held[field]
        same = (
            np.isclose(value, expected, rtol=1e-9, atol=0)
            if isinstance(value, float) and isinstance(expected, (int, float))
            else value == expected
        )
        if not same:
            yield field, value, expected


STATE_KEYS = (
    "svc",
    "scale",
    "scale_mean",
    "scale_std",
    "kernel",
    "gamma",
    "degree",
    "coef0",
    "method",
    "support_vectors",
    "n_train",
)


def _state_problem(state) -> str | None:
    """Why a loaded skops object is not a model that fit-svm wrote (None when it is)."""
    from sklearn.svm import SVC

    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not the dict fit-svm writes"
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        return f"it lacks {', '.join(missing)}"
    svc = state["svc"]
    if not isinstance(svc, SVC):
        return f"'svc' is a {type(svc).__name__}, not an sklearn SVC"
    unfitted = [a for a in ("support_", "classes_", "dual_coef_", "intercept_") if not hasattr(svc, a)]
    if unfitted:
        return f"its SVC is not fitted (no {', '.join(unfitted)})"
    if state["scale"] not in SCALES or state["kernel"] not in KERNELS or state["method"] not in METHODS:
        return f"unknown scale/kernel/method {state['scale']!r}/{state['kernel']!r}/{state['method']!r}"
    if state["scale"] == "standard" and not (
        isinstance(state["scale_mean"], np.ndarray) and isinstance(state["scale_std"], np.ndarray)
    ):
        return "standard scaling without its mean and scale arrays"
    if state["method"] == "precomputed":
        sv = state["support_vectors"]
        if not isinstance(sv, np.ndarray) or sv.ndim != 2 or len(sv) != len(svc.support_):
            return "its support vectors do not match the SVC's support"
    return None


def _fitted_problem(state: dict, num_features: int | None, num_classes: int | None) -> str | None:
    """Why the fitted attributes of a well-typed state cannot be a model fit-svm wrote (None when they can):
    shapes that agree with each other and with the cache, finite numbers, parameters in their ranges.
    A file of trusted types can still hold anything; this keeps a tampered or damaged one from crashing
    inside libsvm or printing garbage."""
    svc = state["svc"]

    def array(value, name: str, ndim: int, kind: str = "f") -> np.ndarray | str:
        if (
            not isinstance(value, np.ndarray)
            or value.ndim != ndim
            or value.dtype.kind not in ("iu" if kind == "i" else "fiu")
        ):
            return f"{name} is not a {ndim}-d {'integer' if kind == 'i' else 'numeric'} array"
        if kind == "f" and not np.isfinite(value).all():
            return f"{name} holds NaN or Inf"
        return value

    for name, value in (("gamma", state["gamma"]), ("coef0", state["coef0"]), ("C", getattr(svc, "C", None))):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.floating, np.integer))
            or not np.isfinite(value)
        ):
            return f"{name} is {value!r}, not a finite number"
    if not (state["gamma"] > 0 and svc.C > 0):
        return f"gamma {state['gamma']!r} and C {svc.C!r} must both be > 0"
    degree = state["degree"]
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or not 1 <= degree <= DEGREE_MAX:
        return f"degree is {degree!r}, not a whole number from 1 to {DEGREE_MAX}"
    n_train = state["n_train"]
    if isinstance(n_train, bool) or not isinstance(n_train, (int, np.integer)) or n_train < 0:
        return f"n_train is {n_train!r}, not a count"
    classes = array(getattr(svc, "classes_", None), "classes_", 1, "i")
    if isinstance(classes, str):
        return classes
    if len(classes) < 2 or len(np.unique(classes)) != len(classes) or not np.all(np.diff(classes) > 0):
        return f"its classes ({len(classes)}) are not two or more distinct sorted labels"
    if classes.min() < 0 or (num_classes is not None and classes.max() >= num_classes):
        return f"its classes {classes.min()}..{classes.max()} lie outside the run's {num_classes} classes 0..{(num_classes or 0) - 1}"
    n_cls, n_pairs = len(classes), len(classes) * (len(classes) - 1) // 2
    support = array(getattr(svc, "support_", None), "support_", 1, "i")
    if isinstance(support, str):
        return support
    n_sv = len(support)
    n_support = array(getattr(svc, "_n_support", None), "_n_support", 1, "i")
    if isinstance(n_support, str):
        return n_support
    if n_sv < 1 or n_support.shape != (n_cls,) or (n_support < 0).any() or int(n_support.sum()) != n_sv:
        return f"its per-class support counts {n_support.tolist()} do not add up to its {n_sv} support vectors for {n_cls} classes"
    for name, shape in (
        ("_dual_coef_", (n_cls - 1, n_sv)),
        ("dual_coef_", (n_cls - 1, n_sv)),
        ("_intercept_", (n_pairs,)),
        ("intercept_", (n_pairs,)),
    ):
        value = array(getattr(svc, name, None), name, len(shape))
        if isinstance(value, str):
            return value
        if value.shape != shape:
            return f"{name} has shape {value.shape}, expected {shape} for {n_cls} classes and {n_sv} support vectors"
    shape_fit = getattr(svc, "shape_fit_", None)
    if not isinstance(shape_fit, tuple) or len(shape_fit) != 2:
        return "shape_fit_ is not a (rows, columns) pair"
    d = num_features
    if state["method"] == "precomputed":
        if svc.kernel != "precomputed":
            return f"method 'precomputed' with an SVC of kernel {svc.kernel!r}"
        if support.min() < 0 or support.max() >= n_train or tuple(shape_fit) != (n_train, n_train):
            return f"its support indices or fitted shape {tuple(shape_fit)} do not fit its {n_train} training rows"
        if getattr(svc, "n_features_in_", None) != n_train:  # a precomputed SVC's columns: the training rows
            return f"n_features_in_ is {getattr(svc, 'n_features_in_', None)!r}, expected {n_train} (its training rows)"
        sv = array(state["support_vectors"], "support_vectors", 2)
        if isinstance(sv, str):
            return sv
        d = sv.shape[1] if d is None else d
        if sv.shape != (n_sv, d):
            return f"its support vectors have shape {sv.shape}, expected ({n_sv}, {d}) for the cache's {d}-d features"
    else:
        if svc.kernel != state["kernel"]:
            return f"its SVC kernel {svc.kernel!r} is not the recorded {state['kernel']!r}"
        sv = array(getattr(svc, "support_vectors_", None), "support_vectors_", 2)
        if isinstance(sv, str):
            return sv
        d = sv.shape[1] if d is None else d
        if sv.shape != (n_sv, d) or shape_fit[1] != d:
            return f"its support vectors have shape {sv.shape}, expected ({n_sv}, {d}) for the cache's {d}-d features"
        if getattr(svc, "n_features_in_", None) != d:
            return f"n_features_in_ is {getattr(svc, 'n_features_in_', None)!r}, expected {d} (the features' width)"
        # libsvm computes with the SVC's own copies of the settings: they must be the recorded ones.
        for name, own, recorded in (
            ("gamma", getattr(svc, "_gamma", None), state["gamma"]),
            ("degree", getattr(svc, "degree", None), state["degree"]),
            ("coef0", getattr(svc, "coef0", None), state["coef0"]),
        ):
            if not isinstance(own, (int, float, np.number)) or isinstance(own, bool) or own != recorded:
                return f"its SVC's {name} is {own!r}, expected {recorded!r} (the model's {name})"
    if state["scale"] == "standard":
        for name in ("scale_mean", "scale_std"):
            value = array(state[name], name, 1)
            if isinstance(value, str):
                return value
            if value.shape != (d,):
                return f"{name} has shape {value.shape}, expected ({d},)"
        if (state["scale_std"] <= 0).any():
            return "scale_std holds values <= 0"
    return None


def model_file_name(kernel: str) -> str:
    return f"svm-{kernel}.skops"
