"""Config files: a command's options as TOML, read by ``--config FILE`` and written by ``--print-config`` and
into every run directory as ``config.toml`` (the run's effective options: ``cars-tl finetune --config
runs/D/config.toml --out runs/D2`` reruns it).

Format (schema 1)::

    # comment lines: what wrote the file
    backbone = "resnet50"          # one key per option, named as the option (``image_size`` or ``image-size``)
    epochs = 15                    # typed as TOML: strings, integers, floats, booleans, arrays
    [cars-tl]                      # optional in a hand-written file
    command = "finetune"           # the command the options are for (another command's file is refused)
    schema = 1                     # a newer schema is refused, naming the file

An option left unset (``None``: "the preset's") is absent. A run's ``config.toml`` holds what the stage
was called with, as the command's options: not ``--force``/``--resume`` (how to write, not what), and
with the preset unresolved (the preset is recorded, so rerunning resolves it the same way).

The stages mark themselves with :func:`recorded`; :func:`write_current` writes the options of the stage
call in progress: :func:`cars_tl.artifacts.runs.write_metrics` with a run's first ``metrics.json`` (so an
interrupted run has it too, and a run that fails before it starts leaves its folder empty) and
:func:`cars_tl.artifacts.runs.finish` when a run completes (a resumed run's options replace the file only
then: a refused ``--resume`` changes nothing).

No torch here: the CLI reads this module for ``--help``-free option parsing.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import json
import math
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from cars_tl.core.atomic import atomic_write_text
from cars_tl.core.errors import CarsTLError

SCHEMA = 1
FILE = "config.toml"
META = "cars-tl"  # the table naming the command and the schema
MAX_BYTES = 1 << 20  # a config is a few hundred bytes; a larger file is not one
NOT_RECORDED = ("progress", "force", "resume")  # not options of what is computed

_current: contextvars.ContextVar[tuple[str, dict] | None] = contextvars.ContextVar("run_config", default=None)


def recorded(command: str, names: dict[str, str] | None = None):
    """Decorate a stage function: while it runs, its bound arguments (records flattened into their
    fields, parameters renamed to the command's options by ``names``) are the run's config."""
    names = names or {}

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            options = {}
            for name, value in bound.arguments.items():
                if name in NOT_RECORDED:
                    continue
                if dataclasses.is_dataclass(value) and not isinstance(value, type):
                    options.update(dataclasses.asdict(value))
                else:
                    options[names.get(name, name)] = value
            token = _current.set((command, options))
            try:
                return fn(*args, **kwargs)
            finally:
                _current.reset(token)

        return wrapper

    return decorate


def write_current(folder: Path) -> Path | None:
    """Write the running stage's options into ``folder``/config.toml; None outside a recorded stage."""
    current = _current.get()
    if current is None:
        return None
    command, options = current
    path = Path(folder) / FILE
    atomic_write_text(
        path, dumps(command, options, f"the options of this run: cars-tl {command} --config {FILE} reruns it")
    )
    return path


def dumps(command: str, options: dict, about: str = "") -> str:
    """TOML of ``options`` (None left out) and the ``[cars-tl]`` table naming ``command``."""
    import importlib.metadata as md

    try:
        version = md.version("cars_tl")
    except md.PackageNotFoundError:  # a source tree on PYTHONPATH
        version = "unknown"
    lines = [f"# cars-tl {command} (cars_tl {version})" + (f": {about}" if about else "")]
    for key, value in options.items():
        text = _value(value)
        if text is not None:
            lines.append(f"{_key(key)} = {text}")
        elif value is None:
            lines.append(f"# {_key(key)} = ...  (unset: the preset's or the command's own choice)")
    lines += ["", f"[{META}]", f"command = {json.dumps(command)}", f"schema = {SCHEMA}", ""]
    return "\n".join(lines)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def _value(value) -> str | None:
    """One TOML value; None (unset) and what TOML cannot hold give None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        items = [_value(v) for v in value]
        return None if any(v is None for v in items) else "[" + ", ".join(items) + "]"
    if hasattr(value, "item"):  # a numpy scalar
        return _value(value.item())
    return None


def read(path: Path, command: str) -> dict:
    """The options in config file ``path`` for ``command``, checked: readable TOML of schema <= 1,
    written for this command (when it says), no nested tables but ``[cars-tl]``."""
    path = Path(path)
    hint = f"write the options as TOML (cars-tl {command} --print-config shows the format), or pass another --config"
    try:
        if path.stat().st_size > MAX_BYTES:
            raise CarsTLError(f"config file {path} is {path.stat().st_size:,} bytes: not a config file", hint)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CarsTLError(f"config file {path} does not exist", hint) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CarsTLError(f"config file {path} cannot be read: {exc}", hint) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CarsTLError(f"config file {path} is not valid TOML: {exc}", hint) from None
    meta = data.pop(META, {})
    if not isinstance(meta, dict):
        raise CarsTLError(f"config file {path}: {META} must be a table ([{META}]), got {type(meta).__name__}", hint)
    schema = meta.get("schema", SCHEMA)
    if not isinstance(schema, int) or isinstance(schema, bool) or schema > SCHEMA or schema < 1:
        raise CarsTLError(
            f"config file {path} has schema {schema!r}; this cars_tl reads schema 1 to {SCHEMA}",
            "upgrade cars_tl, or write the file again with this version's --print-config",
        )
    written_for = meta.get("command")
    if written_for is not None and written_for != command:
        raise CarsTLError(
            f"config file {path} holds options of cars-tl {written_for}, not of cars-tl {command}",
            f"pass it to cars-tl {written_for} --config {path}, or write one for {command} with cars-tl {command} "
            "--print-config",
        )
    tables = sorted(k for k, v in data.items() if isinstance(v, dict))
    if tables:
        raise CarsTLError(
            f"config file {path}: table [{tables[0]}] is not an option; options are top-level keys "
            f"(only [{META}] is a table)",
            hint,
        )
    return data
