"""``track``: mirror finished run directories into a tracker (TensorBoard event files, or MLflow).

The run directories stay the source of truth; a tracker is a view of them. What one run becomes:

params     the run's config (``config.*``), its backbone (``backbone.*``: name, weights and their digest,
           transform, crop, precision), ``dataset_fingerprint``, ``features`` (path and SHA-256 of the
           cache for feature runs), ``seed``
metrics    per epoch with its step (``train_loss``, ``test_acc``, ... as in ``history``); kNN: per k
           (step = k); SVM: each kernel's figures (``kernel.<k>.test_acc``...); the final figures as
           ``final.<name>`` (the kept model's: best epoch, chosen kernel, first k)
tags       ``cars_tl.kind``, ``cars_tl.preset``, ``cars_tl.model_group`` (A, B, C, D, kNN as the report
           names them), ``cars_tl.setting``, ``cars_tl.run_dir``, ``cars_tl.path_id``, ``cars_tl.run_id``
artifacts  the run's top-level files up to 10 MB (metrics.json, predictions, head.pt...), and the
           SVM's cross-validation tables as ``cv-<kernel>.csv``; never the checkpoints

Idempotent: each run directory has a stable id, ``run_id`` = SHA-256 of its resolved path and its
metrics' ``created`` time (``path_id``: of the path alone). A run already mirrored with the same
``run_id`` is left alone; one with the same ``path_id`` and another ``run_id`` (the run was rerun with
``--force``) is replaced. Runs that failed or are still running are skipped, and said so.

In TensorBoard each run is ``DIR/<run name>/`` (events, plus ``cars_tl_track.json`` naming its ids);
in MLflow, a run of the experiment (default ``cars_tl``) named like the run directory. For a local
``sqlite:///path/mlflow.db`` store the artifacts go to ``mlartifacts/`` beside the database.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import time
from pathlib import Path

from cars_tl.artifacts import names, runs
from cars_tl.core.atomic import atomic_write_text
from cars_tl.core.errors import CarsTLError, check_output_path, parse_json
from cars_tl.core.tensorboard import EventLog, epoch_scalars, require_writer
from cars_tl.report.catalog import check_size, model_group, setting

TARGETS = ("tensorboard", "mlflow")
ARTIFACT_MAX_BYTES = 10 << 20
MARKER = "cars_tl_track.json"
PARAM_MAX_CHARS = 6000  # MLflow's limit on a parameter value


# --------------------------------------------------------------------------- what a run becomes


def run_ids(run_dir: Path, metrics: dict) -> tuple[str, str]:
    """(path_id, run_id): stable per run directory, and per run of it."""
    path = str(Path(run_dir).resolve())
    return (
        hashlib.sha256(path.encode()).hexdigest()[:16],
        hashlib.sha256(f"{path}\0{metrics.get('created')}".encode()).hexdigest()[:16],
    )


def _flat(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict) and prefix.count(".") < 1:
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
    else:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        out[prefix] = text[:PARAM_MAX_CHARS]


def params_of(m: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (m.get("config") or {}).items():
        _flat(f"config.{k}", v, out)
    b = m.get("backbone") or {}
    for k in ("backbone", "weights", "weights_digest", "transform", "crop", "margin", "precision", "num_features"):
        if k in b:
            _flat(f"backbone.{k}", b[k], out)
    inputs = m.get("inputs") or {}
    out["dataset_fingerprint"] = str(
        inputs.get("dataset_fingerprint") or (m.get("config") or {}).get("dataset_fingerprint")
    )
    if inputs.get("features"):
        out["features.path"] = str(inputs["features"].get("path"))
        out["features.sha256"] = str(inputs["features"].get("sha256"))
    out["seed"] = str((m.get("config") or {}).get("seed", ""))
    return out


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def histories_of(m: dict) -> dict[str, list[tuple[int, float]]]:
    """Metric name -> [(step, value)]: epochs for trained runs, k for kNN, one point per SVM kernel figure."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in m.get("history") or []:
        for k, v in row.items():
            if k != "epoch" and _number(v) is not None:
                out.setdefault(k, []).append((int(row["epoch"]), _number(v)))
    for r in (m.get("k_results") or {}).values():
        for k, v in r.items():
            if k != "k" and _number(v) is not None:
                out.setdefault(f"knn.{k}", []).append((int(r["k"]), _number(v)))
    for kernel, r in (m.get("kernels") or {}).items():
        for k, v in r.items():
            if _number(v) is not None:
                out.setdefault(f"kernel.{kernel}.{k}", []).append((0, _number(v)))
    return out


def final_of(m: dict) -> dict[str, float]:
    return {k: _number(v) for k, v in (m.get("final") or {}).items() if _number(v) is not None}


def tags_of(m: dict, run_dir: Path, path_id: str, run_id: str) -> dict[str, str]:
    return {
        "cars_tl.kind": str(m.get("kind")),
        "cars_tl.preset": str((m.get("config") or {}).get("preset", "")),
        "cars_tl.model_group": model_group(m),
        "cars_tl.setting": setting(m),
        "cars_tl.run_dir": str(Path(run_dir).resolve()),
        "cars_tl.path_id": path_id,
        "cars_tl.run_id": run_id,
        "cars_tl.created": str(m.get("created")),
    }


def cv_tables(m: dict) -> dict[str, str]:
    """``cv-<kernel>.csv``: the SVM's cross-validation accuracy, one row per (gamma, C) point searched.

    Long, not a gamma x C grid: each gamma has its own C grid (on its kernel's scale, one of them
    possibly extended), so no one C header fits every row."""
    tables = {}
    for kernel, r in (m.get("kernels") or {}).items():
        search = (r.get("search") if isinstance(r, dict) else None) or {}
        cv_acc, cv_std = search.get("cv_acc") or [], search.get("cv_std") or []
        if not cv_acc:
            continue
        gammas = search.get("gamma_grid") or [search.get("gamma_value")]
        # C_grids: one grid per gamma; records before it had one grid (C_grid), right for one gamma only;
        # a C given (not searched) is every gamma's one column.
        if search.get("C_grids"):
            c_grids = search["C_grids"]
        elif search.get("C_grid"):
            c_grids = [search["C_grid"]] * len(cv_acc) if len(cv_acc) == 1 else [None] * len(cv_acc)
        else:
            c_grids = [[search.get("C")]] * len(cv_acc)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["gamma", "C", "cv_acc", "cv_std"])
        for g, (gamma, row) in enumerate(zip(gammas, cv_acc)):
            grid = c_grids[g] if g < len(c_grids) and c_grids[g] and len(c_grids[g]) == len(row) else [None] * len(row)
            stds = cv_std[g] if g < len(cv_std) and len(cv_std[g]) == len(row) else [None] * len(row)
            for c, acc, std in zip(grid, row, stds):
                writer.writerow(
                    [
                        _cell(gamma) if kernel != "linear" else "",
                        "unknown" if c is None else _cell(c),
                        _cell(acc),
                        _cell(std),
                    ]
                )
        tables[f"cv-{kernel}.csv"] = buf.getvalue()
    return tables


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def small_files(run_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in Path(run_dir).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.stat().st_size <= ARTIFACT_MAX_BYTES
    )


@dataclasses.dataclass(frozen=True)
class RunView:
    """Everything a tracker gets from one run, computed from its metrics before anything is written."""

    params: dict[str, str]
    epochs: list[tuple[int, dict[str, float]]]  # TensorBoard's per-epoch scalars
    histories: dict[str, list[tuple[int, float]]]
    final: dict[str, float]
    tags: dict[str, str]
    hparams: dict
    tables: dict[str, str]
    start: int  # created, ms since the epoch
    end: int | None  # finished


MAX_METRIC_POINTS = 200_000  # far above any run cars_tl writes (an epoch or k gives a dozen points)


def view_of(run_dir: Path, m: dict, path_id: str, run_id: str) -> RunView:
    """The run's :class:`RunView`; a CarsTLError when its metrics do not have a run's shape (or are huge)."""
    try:
        histories = histories_of(m)
        points = sum(len(v) for v in histories.values())
        if points > MAX_METRIC_POINTS:
            raise CarsTLError(f"{points} metric points, more than the {MAX_METRIC_POINTS} a run can have")
        tags = tags_of(m, run_dir, path_id, run_id)
        return RunView(
            params=params_of(m),
            epochs=[(int(row["epoch"]), epoch_scalars(row)) for row in m.get("history") or []],
            histories=histories,
            final=final_of(m),
            tags=tags,
            hparams={**dict(m.get("config") or {}), **tags},
            tables=cv_tables(m),
            start=_millis(m.get("created")),
            end=_millis(m.get("finished")) if m.get("finished") else None,
        )
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        raise CarsTLError(
            f"its {runs.METRICS} does not have the shape a run writes ({type(exc).__name__}: {exc})"[:300]
        ) from None


# --------------------------------------------------------------------------- the walk


def _run_dirs(paths: list[Path]) -> list[Path]:
    found = []
    for p in paths:
        p = Path(p)
        if (p / runs.METRICS).is_file():
            found.append(p)
        elif names.runs_folder(p).is_dir() or p.is_dir():
            found.extend(
                runs.list_runs(p)
                if names.runs_folder(p).is_dir()
                else sorted(
                    d for d in p.iterdir() if d.is_dir() and (d / runs.METRICS).is_file() and not d.name.startswith(".")
                )
            )
        else:
            raise CarsTLError(
                f"{p} is neither a run directory nor a folder of runs",
                "pass run directories (artifacts/runs/NAME) or an artifacts folder",
            )
    return found


def track(paths: list[Path], *, to: str, target: str, experiment: str = "cars_tl") -> list[dict]:
    """Mirror every run under ``paths`` into ``to`` (tensorboard: a folder; mlflow: a tracking URI).
    Returns one ``{"run", "action", "detail"}`` per run: created, replaced, unchanged or skipped."""
    if to not in TARGETS:
        raise CarsTLError(
            f"unknown --to {to!r}; valid: {', '.join(TARGETS)}",
            "cars-tl track --to tensorboard DIR  or  --to mlflow sqlite:///mlflow.db",
        )
    sink = _TensorBoardSink(Path(target)) if to == "tensorboard" else _MlflowSink(target, experiment)
    results = []
    for run_dir in _run_dirs(paths):
        try:  # one bad run is skipped, said so, and the others still go
            check_size(run_dir)  # the report's bounds: a metrics.json far past any run's is not read
            m = runs.read_metrics(run_dir)
            check_size(run_dir, m)
            if m.get("status") != "complete":
                raise CarsTLError(f"status {m.get('status')}: only complete runs are mirrored")
            path_id, run_id = run_ids(run_dir, m)
            view = view_of(run_dir, m, path_id, run_id)
        except (CarsTLError, RecursionError, ValueError) as exc:
            detail = (
                exc.message if isinstance(exc, CarsTLError) else f"unreadable {runs.METRICS} ({type(exc).__name__})"
            )
            results.append({"run": str(run_dir), "action": "skipped", "detail": detail})
            continue
        action, detail = sink.mirror(run_dir, view, path_id, run_id, done=len(results))
        results.append({"run": str(run_dir), "action": action, "detail": detail})
    return results


# --------------------------------------------------------------------------- TensorBoard


class _TensorBoardSink:
    def __init__(self, root: Path):
        require_writer()
        try:
            self.root = check_output_path(root, "folder", "--to tensorboard")
        except CarsTLError as exc:
            raise CarsTLError(
                exc.message, "name a folder (new or made by track): --to tensorboard tensorboard/"
            ) from None

    def _folder(self, run_dir: Path, path_id: str) -> Path:
        folder = self.root / Path(run_dir).name
        marker = _read_json(folder / MARKER)
        if marker and marker.get("path_id") != path_id:  # another run directory of the same name
            folder = self.root / f"{Path(run_dir).name}-{path_id[:8]}"
        return folder

    def mirror(self, run_dir: Path, view: RunView, path_id: str, run_id: str, done: int = 0) -> tuple[str, str]:
        try:
            return self._mirror(run_dir, view, path_id, run_id)
        except OSError as exc:
            raise CarsTLError(
                f"cannot write TensorBoard files under {self.root} ({exc.strerror or exc}) while mirroring {run_dir}; "
                f"{done} run(s) before it were done",
                "check the folder (free space, permissions) and run the same command again: finished runs are left as they are",
            ) from None

    def _mirror(self, run_dir: Path, view: RunView, path_id: str, run_id: str) -> tuple[str, str]:
        folder = self._folder(run_dir, path_id)
        marker = _read_json(folder / MARKER)
        if marker and marker.get("run_id") == run_id:
            return "unchanged", str(folder)
        log = EventLog(folder.parent, folder.name)  # a fresh log: earlier event files of this folder go
        for step, scalars in view.epochs:
            log.scalars(step, scalars)
        for name, points in view.histories.items():
            if name.startswith(("knn.", "kernel.")):
                for step, value in points:
                    log.scalars(step, {name.replace(".", "/"): value})
        for name, text in view.tables.items():
            rows = list(csv.reader(io.StringIO(text)))
            table = "\n".join("| " + " | ".join(r) + " |" for r in rows[:1] + [["---"] * len(rows[0])] + rows[1:])
            log.text(f"cv/{name[3:-4]}", table)
        log.hparams(view.hparams, view.final)
        log.close()
        atomic_write_text(
            folder / MARKER, json.dumps({"path_id": path_id, "run_id": run_id, "run_dir": str(Path(run_dir).resolve())})
        )
        return ("replaced" if marker else "created"), str(folder)


def _read_json(path: Path) -> dict | None:
    try:
        value = parse_json(Path(path).read_text(), str(path))
    except (OSError, CarsTLError):
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------- MLflow


def require_mlflow():
    try:
        import logging

        from mlflow.tracking import MlflowClient
    except ImportError:
        raise CarsTLError(
            "tracking to MLflow needs the optional package mlflow-skinny (with SQLAlchemy and Alembic for a sqlite store), "
            "which is not installed",
            "pip install 'cars_tl[mlflow]'",
        ) from None
    for name in ("mlflow", "alembic"):  # the store's table migrations log at INFO: library code stays quiet
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient


MLFLOW_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
CONNECT_TIMEOUT_S = 5.0
# MLflow's own HTTP defaults (7 retries with backoff, 120 s per request) make an unreachable or stalled
# server look like a hang; lowered unless the user set them.
_MLFLOW_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_MLFLOW_HINT = (
    "use --to mlflow sqlite:///mlflow.db (a local file) or --to mlflow http://HOST:PORT (a running mlflow server)"
)


def check_mlflow_uri(uri: str) -> Path | None:
    """Refuse a tracking URI MLflow would choke on, lose at exit or wait on: returns the database file of a
    ``sqlite:///FILE`` store (None for a server), after a short connection check for a server's host:port."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()  # mysql+pymysql://...: SQLAlchemy's dialect+driver
    if scheme not in MLFLOW_SCHEMES:
        raise CarsTLError(
            f"unsupported MLflow tracking URI {uri!r} (scheme {parts.scheme or 'none'!r}); valid schemes: "
            f"{', '.join(MLFLOW_SCHEMES)} (the file store of ./mlruns is MLflow's deprecated one)",
            _MLFLOW_HINT,
        )
    if scheme == "sqlite":
        db = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
        if db in ("", ":memory:") or db.startswith(("file::memory:", ":memory:?")):
            raise CarsTLError(
                f"{uri!r} is an in-memory database: everything mirrored would vanish when track exits",
                "name a database file: --to mlflow sqlite:///mlflow.db",
            )
        try:
            return check_output_path(Path(db), "file").resolve()
        except CarsTLError as exc:
            raise CarsTLError(
                f"MLflow tracking URI {uri!r}: {exc.message.removeprefix('--out ')}",
                "name a database file in a folder: --to mlflow sqlite:///mlflow.db",
            ) from None
    try:
        host, port = parts.hostname, parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as exc:  # a port that is not a number, or out of range
        raise CarsTLError(f"MLflow tracking URI {uri!r}: {exc}", _MLFLOW_HINT) from None
    if not host:
        raise CarsTLError(f"MLflow tracking URI {uri!r} names no host", _MLFLOW_HINT)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise CarsTLError(
            f"cannot reach the MLflow tracking store at {host}:{port} ({uri}) within {CONNECT_TIMEOUT_S:g} s: "
            f"{exc.strerror or exc}",
            f"start it (e.g. mlflow server --host {host} --port {port}), check the address, or {_MLFLOW_HINT}",
        ) from None
    return None


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a tracking store raises when it fails (not a bug of ours): MLflow's, the database's, the network's."""
    from mlflow.exceptions import MlflowException

    errors: list[type[BaseException]] = [MlflowException, OSError]
    try:
        from sqlalchemy.exc import SQLAlchemyError

        errors.append(SQLAlchemyError)
    except ImportError:
        pass
    try:
        from requests import RequestException

        errors.append(RequestException)
    except ImportError:
        pass
    return tuple(errors)


class _MlflowSink:
    def __init__(self, uri: str, experiment: str):
        import os

        client_class = require_mlflow()
        db = check_mlflow_uri(uri)
        for name, value in _MLFLOW_HTTP_ENV.items():
            os.environ.setdefault(name, value)
        self.uri, self.errors = uri, _store_errors()
        try:
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            self.client = client_class(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                found.experiment_id
                if found
                else self.client.create_experiment(
                    experiment, artifact_location=(db.parent / "mlartifacts").as_uri() if db else None
                )
            )
        except self.errors as exc:
            raise self._failed(exc, "opening it") from None

    def _failed(self, exc: BaseException, doing: str) -> CarsTLError:
        text = " ".join(str(exc).split())[:400]
        return CarsTLError(
            f"the MLflow store {self.uri} failed while {doing}: {type(exc).__name__}: {text}",
            f"check that the store works, then run the same command again (finished runs are left as they are); or {_MLFLOW_HINT}",
        )

    def mirror(self, run_dir: Path, view: RunView, path_id: str, run_id: str, done: int = 0) -> tuple[str, str]:
        try:
            return self._mirror(run_dir, view, path_id, run_id)
        except self.errors as exc:
            raise self._failed(exc, f"mirroring {run_dir} ({done} run(s) before it were done)") from None

    def _mirror(self, run_dir: Path, view: RunView, path_id: str, run_id: str) -> tuple[str, str]:
        from mlflow.entities import Metric, Param

        earlier = self.client.search_runs([self.experiment_id], filter_string=f"tags.`cars_tl.path_id` = '{path_id}'")
        done = [r for r in earlier if r.data.tags.get("cars_tl.run_id") == run_id and r.info.status == "FINISHED"]
        if done:
            return "unchanged", done[0].info.run_id
        for r in earlier:  # an earlier run of this directory (before a --force rerun), or a half-mirrored one
            self.client.delete_run(r.info.run_id)
        start = view.start
        run = self.client.create_run(self.experiment_id, start_time=start, run_name=Path(run_dir).name, tags=view.tags)
        rid = run.info.run_id
        params = [Param(k, v) for k, v in view.params.items()]
        metrics = [
            Metric(name, value, start, step) for name, points in view.histories.items() for step, value in points
        ]
        metrics += [Metric(f"final.{k}", v, start, 0) for k, v in view.final.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(rid, params=params[i : i + 100])
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(rid, metrics=metrics[i : i + 1000])
        for path in small_files(run_dir):
            self.client.log_artifact(rid, str(path))
        for name, text in view.tables.items():
            self.client.log_text(rid, text, name)
        self.client.set_terminated(rid, "FINISHED", end_time=view.end)
        return ("replaced" if earlier else "created"), rid


def _millis(stamp) -> int:
    import datetime

    try:
        return int(datetime.datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%S%z").timestamp() * 1000)
    except (ValueError, OverflowError):
        return int(time.time() * 1000)
