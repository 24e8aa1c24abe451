"""The Typer app, its root options, and the one wrapper every command is registered through: a
:class:`CarsTLError` (also a value outside an option's choices) becomes ``error:``/``next:`` on stderr and
exit status 2.

Every command also takes ``--config FILE`` (TOML, :mod:`cars_tl.artifacts.run_config`): its keys become
Click's default map, so a file's value goes through the same conversion and checks as the flag, and a flag
given on the command line wins; ``--print-config`` prints the effective options and exits.

Imports of torch and of the stage modules happen inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from cars_tl.artifacts import kinds, names, run_config
from cars_tl.core.errors import CarsTLError


class _PlainHelp:
    """Help read as plain text, and flags without a `<bool>` beside them (they take no value)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Typer reads help as Rich markup: `cars_tl[tensorboard]` or `[study: 1; tuned: auto]` would vanish.
        self.help = escape(self.help) if self.help else self.help
        for param in self.params:
            if getattr(param, "help", None):
                param.help = escape(param.help)
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Group(_PlainHelp, TyperGroup):
    pass


class _Command(_PlainHelp, TyperCommand):
    """A command whose choice options refuse a value as the stages do (``error:``/``next:``, status 2)."""

    def parse_args(self, ctx, args):
        config = _config_argument(list(args))
        if config is not None:
            try:
                ctx.default_map = _config_defaults(self, Path(config))
            except CarsTLError as exc:
                _error(exc)
                raise typer.Exit(2) from None
        try:
            return super().parse_args(ctx, list(args))
        except typer.BadParameter as exc:
            given, _, _ = self.make_parser(ctx).parse_args(args=list(args))
            from_file = (
                exc.param is not None and exc.param.name not in given and exc.param.name in (ctx.default_map or {})
            )
            choices = getattr(getattr(exc.param, "type_descriptor", None), "choices", None)
            if from_file:
                value = ctx.default_map[exc.param.name]
                reason = (
                    _choice_error(self.name, exc.param, value, [str(c) for c in choices]).message
                    if choices
                    else exc.format_message()
                )
                _error(
                    CarsTLError(
                        f"config file {config}: {exc.param.name} = {value!r}: {reason}",
                        f"correct it in {config}, or give {max(exc.param.opts, key=len)} on the command line (it wins)",
                    )
                )
                raise typer.Exit(2) from None
            if not choices:
                raise
            _error(_choice_error(self.name, exc.param, given.get(exc.param.name), [str(c) for c in choices]))
            raise typer.Exit(2) from None


def _config_argument(args: list[str]) -> str | None:
    """The value of ``--config`` among the command's arguments, read before Click parses them (the file's
    values are Click's defaults)."""
    for i, arg in enumerate(args):
        if arg == "--":
            return None
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _config_defaults(command, path: Path) -> dict:
    """The file's options as a default map of ``command``'s parameters; an unknown key is refused, naming
    the keys the command takes."""
    options = run_config.read(path, command.name)
    keys = {}
    for param in command.params:
        if param.name in CONFIG_PARAMS or param.name == "help":
            continue
        spellings = {param.name, param.name.replace("_", "-")}
        for opt in param.opts:
            if opt.startswith("--"):
                spellings |= {opt[2:], opt[2:].replace("-", "_")}
        keys.update(dict.fromkeys(spellings, param))
    defaults = {}
    for key, value in options.items():
        param = keys.get(key)
        if param is None:
            valid = sorted({max(p.opts, key=len).lstrip("-") for p in keys.values()})
            raise CarsTLError(
                f"config file {path}: unknown option {key!r} for cars-tl {command.name}; valid: {', '.join(valid)}",
                f"correct or remove it (cars-tl {command.name} --print-config shows every option)",
            )
        if param.name in defaults:
            raise CarsTLError(f"config file {path} sets {key!r} twice (as {param.name} and {key})", "keep one of them")
        if (param.multiple or param.nargs == -1) and not isinstance(value, list):
            value = [value]
        defaults[param.name] = value
    return defaults


CONFIG_PARAMS = ("config", "print_config")


def _choice_error(command_name: str, param, value, choices: list[str]) -> CarsTLError:
    """The stages' wording for a value outside the choices; `paths` adds the make variable behind the option."""
    option = max(param.opts, key=len)
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if v not in choices), value[0] if value else None)
    default = param.default if param.default in choices else choices[0]
    variable = names.MAKE_VARIABLES.get(option) if command_name == "paths" else None
    return CarsTLError(
        f"unknown {option} {value!r}; valid: {', '.join(choices)}",
        f"e.g. {option} {default}" + (f" (make: {variable}={default})" if variable else ""),
    )


app = typer.Typer(
    name="cars-tl",
    cls=_Group,
    help="Transfer-learning experiments on Stanford Cars: download, cache features, train heads, SVMs and fine-tunes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        import importlib.metadata as md

        print(f"cars-tl {md.version('cars_tl')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
):
    """Transfer-learning experiments on Stanford Cars. Stages exchange files: manifest -> HDF5 features -> run directories -> report."""
    import signal

    from cars_tl.core.runtime import tune_malloc

    # Past `ulimit -f`, a write then fails with EFBIG (reported with the path) instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    tune_malloc()


def command(name: str):
    """Register a stage; a :class:`CarsTLError` becomes a red message and exit status 2."""

    def decorate(fn):
        from cars_tl.cli.options import ConfigFile, PrintConfig

        @functools.wraps(fn)
        def wrapper(*args, config=None, print_config=False, **kwargs):
            if print_config:
                print(run_config.dumps(name, kwargs, f"cars-tl {name} --config FILE reads this"), end="")
                raise typer.Exit(0)
            try:
                return fn(*args, **kwargs)
            except CarsTLError as exc:
                _error(exc)
                raise typer.Exit(2) from None
            except OSError as exc:
                from cars_tl.core.atomic import STORAGE_ERRNOS, storage_error

                if exc.errno not in STORAGE_ERRNOS:
                    raise
                _error(storage_error(exc, Path(exc.filename or ".")))
                raise typer.Exit(2) from None
            except RuntimeError as exc:
                from cars_tl.core.distributed import peer_failure

                if not peer_failure(exc):
                    raise
                from cars_tl.console import console, labelled, rank_prefix

                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                console.print(
                    labelled(
                        rank_prefix(),
                        ("stopped:", "bold red"),
                        " another process of this torchrun job failed or was lost "
                        f"(its own message says why) — {first}",
                    ),
                    highlight=False,
                    soft_wrap=True,
                )
                console.print(
                    labelled(("next:", "bold"), " ", RESUME_HINTS.get(name, f"fix that and rerun cars-tl {name}")),
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(1) from None
            except KeyboardInterrupt as exc:
                from cars_tl.console import console, labelled

                hint = getattr(exc, "hint", None) or RESUME_HINTS.get(
                    name, f"rerun cars-tl {name} to start it again"
                )  # runs.RerunInterrupted
                console.print(labelled((f"{name} interrupted", "yellow"), ": ", hint), highlight=False, soft_wrap=True)
                raise typer.Exit(130) from None

        # Typer reads the signature: the command's own options, then --config and --print-config.
        signature = inspect.signature(fn, eval_str=True)
        extra = [
            inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=a)
            for n, d, a in (("config", None, ConfigFile), ("print_config", False, PrintConfig))
        ]
        wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
        return app.command(name, cls=_Command)(wrapper)

    return decorate


def _error(exc: CarsTLError) -> None:
    """``error: MESSAGE`` and ``next: HINT`` on stderr, both verbatim (paths and hints may hold brackets)."""
    from cars_tl.console import console, labelled, rank_prefix

    console.print(labelled(rank_prefix(), ("error:", "bold red"), " ", exc.message), highlight=False, soft_wrap=True)
    if exc.hint:
        console.print(labelled(("next:", "bold"), " ", exc.hint), highlight=False, soft_wrap=True)


RESUME_HINTS = {
    "extract-features": "rerun the same cars-tl extract-features command to resume from the last complete chunk",
    "download": "rerun the same cars-tl download command: verified archives and partial downloads are kept",
    # Each stage that makes a run: its kind says (resume it, or replace the interrupted run with --force).
    **{k.stage: k.interrupted_hint for k in kinds.RUN_KINDS.values()},
}
