"""The `cnnserve` command.

    cnnserve serve [--repository DIR] [--grpc-port N] ...   run the server (every Settings field is a
                                                             flag and a CNNSERVE_* variable)
    cnnserve worker [--grpc-port N] ...                     run the gradient-worker tier (the same
                                                             settings; ports 8600/9091 by default)
    cnnserve classify IMAGE... --model M [--top-k K]        classify images on a running server
    cnnserve score DIR... --model M --output FILE           classify a folder into JSONL/CSV (resumable)
    cnnserve models [--json]                                the models a running server serves
    cnnserve explain IMAGE --model M -o OUT.png             a saliency map (guided backprop, Grad-CAM)
    cnnserve dream IMAGE --model M -o OUT.png               DeepDream, with a progress bar
    cnnserve stylize CONTENT STYLE... -o OUT.png            neural style transfer (a VGG-19 model)
    cnnserve --version

This module is the entry point (`main`), the top-level parser and the server side's commands
(serve, worker: the settings flags). The client commands (classify, score, models) and their exit
status table (EXIT_STATUS) live in service/client/commands.py and service/client/score/; explain,
dream and stylize (GRADIENT_EXIT_STATUS) in service/client/gradient_commands.py.

Precedence for `serve`: flag > CNNSERVE_* environment variable > default. The flags are generated
from `service.settings.Settings.model_fields`, so a new setting is a new flag with its description
as help, with nothing to add here.

The server commands need the `serve` extra (and `worker`, torch, for gradient workers); the client
commands only the base install. This module therefore imports pydantic and service.settings only
inside the server commands: on a client-only install `cnnserve --help` still lists serve and worker,
and running one says which extra to install instead of failing with a traceback.

More subcommands plug in by appending a `register(subparsers)` function to
`COMMANDS` that calls `set_defaults(func=..., subparser=parser)`, func(args, parser) returning the
exit status; `add_settings_arguments` / `settings_from_args` give them the same settings flags.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import importlib.util
import os
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from service.settings import Settings

# Not importable from service.settings on a client-only install (no pydantic): the same prefix, kept
# equal by tests/unit/service/test_settings_cli.py.
ENV_PREFIX = "CNNSERVE_"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _settings_class(cls: type[Settings] | None) -> type[Settings]:
    """`cls`, or service.settings.Settings (imported here: it needs the serve extra's pydantic)."""
    if cls is not None:
        return cls
    from service.settings import Settings

    return Settings


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[Settings] | None = None) -> None:
    """One flag per Settings field (kebab-case), help from its description, env and default."""
    cls = _settings_class(cls)
    group = parser.add_argument_group(
        "settings",
        f"Each flag is also the environment variable {ENV_PREFIX}<NAME>; flags win over the environment.",
    )
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        env = f"{ENV_PREFIX}{name.upper()}"
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} [env {env}; default {default}]".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = [str(c) for c in typing.get_args(annotation)]
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            # Values stay strings: pydantic parses and validates them exactly as it does env values.
            metavars: dict[object, str] = {
                int: "N",
                float: "SECONDS" if name.endswith("_s") else "X",
                Path: "DIR",
            }
            kwargs["metavar"] = metavars.get(annotation, "VALUE")
            if "choices" in kwargs:
                del kwargs["metavar"]
        group.add_argument(_flag(name), **kwargs)


def settings_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser, cls: type[Settings] | None = None
) -> Settings:
    """Settings from the environment, overridden by the flags given; usage error when invalid."""
    from pydantic import ValidationError

    cls = _settings_class(cls)
    overrides = {name: getattr(args, name) for name in cls.model_fields if hasattr(args, name)}
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:  # a rule across fields: its message names them
                problems.append(str(error["msg"]).removeprefix("Value error, "))
                continue
            field = str(error["loc"][0])
            source = _flag(field) if field in overrides else f"{ENV_PREFIX}{field.upper()}"
            problems.append(f"{source}: {error['msg']} (got {error.get('input')!r})")
        parser.error("; ".join(problems))


# --- a server command on a client-only install -------------------------------------------------

# Our own packages: a ModuleNotFoundError naming one of them is a bug, never a missing extra.
_OWN_PACKAGES = ("service", "export")


def _missing_extra(command: str, extra: str, error: ModuleNotFoundError) -> int:
    """Tell which extra a server command needs (exit status 2, as for a usage error)."""
    if (error.name or "").partition(".")[0] in _OWN_PACKAGES:
        raise error
    print(
        f"cnnserve {command} needs the {extra} extra, which this installation lacks (no module named "
        f"{error.name!r}): pip install 'cnnserve[{extra}]'",
        file=sys.stderr,
    )
    return 2


def _register_unavailable(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    command: str,
    extra: str,
    help_text: str,
    error: ModuleNotFoundError,
) -> None:
    """A stand-in for a server command whose settings cannot be imported here: listed in --help,
    it takes any arguments (main lets them through) and says what to install."""
    parser = subparsers.add_parser(
        command,
        help=f"{help_text} (needs pip install 'cnnserve[{extra}]')",
        description=f"Not available in this installation: pip install 'cnnserve[{extra}]'.",
    )
    parser.set_defaults(
        func=lambda args, parser: _missing_extra(command, extra, error), subparser=parser, any_arguments=True
    )


def _local_workers_need_torch(settings: Settings, parser: argparse.ArgumentParser, extra: str) -> None:
    """Gradient workers run PyTorch: without it (the serve extra alone) say so before starting."""
    if settings.workers > 0 and not settings.worker_address and importlib.util.find_spec("torch") is None:
        parser.error(
            f"{settings.workers} gradient worker(s) need PyTorch, which this installation lacks: "
            f"pip install 'cnnserve[{extra}]', or serve classification only with --workers 0"
        )


# --- serve -------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        from service.frontend.server import run
        from service.observability.logs import configure_logging
    except ModuleNotFoundError as exc:
        return _missing_extra("serve", "serve", exc)

    settings = settings_from_args(args, parser)
    _local_workers_need_torch(settings, parser, "worker")
    configure_logging(settings)
    if settings.frontends > 1:
        from service.multiprocess import run_multiprocess

        return run_multiprocess(settings)
    return asyncio.run(run(settings))


def register_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    try:
        from service.settings import Settings
    except ModuleNotFoundError as exc:
        _register_unavailable(subparsers, "serve", "serve", "run the gRPC server", exc)
        return
    parser = subparsers.add_parser(
        "serve",
        help="run the gRPC server",
        description="Serve the models of a repository over gRPC (cnnserve.v1.Inference and the Open "
        "Inference Protocol), with health, reflection and Prometheus metrics. SIGTERM drains gracefully.",
    )
    add_settings_arguments(parser, Settings)
    parser.set_defaults(func=_serve, subparser=parser)


# --- worker ------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        from service.frontend.gradient_tier import run_gradient_tier
        from service.observability.logs import configure_logging
        from service.settings import WorkerSettings
    except ModuleNotFoundError as exc:
        return _missing_extra("worker", "worker", exc)

    settings = settings_from_args(args, parser, WorkerSettings)
    if settings.workers < 1:
        parser.error(f"a worker needs at least one worker process: workers is {settings.workers}")
    _local_workers_need_torch(settings, parser, "worker")
    if settings.frontends != 1:
        parser.error("frontends is a `cnnserve serve` setting: a worker runs one gRPC process")
    configure_logging(settings)
    return asyncio.run(run_gradient_tier(settings))


def register_worker(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    try:
        from service.settings import WorkerSettings
    except ModuleNotFoundError as exc:
        _register_unavailable(subparsers, "worker", "worker", "run the gradient-worker tier", exc)
        return
    parser = subparsers.add_parser(
        "worker",
        help="run the gradient-worker tier",
        description="Serve Explain, Dream and Stylize from a pool of PyTorch worker processes over gRPC "
        "(cnnserve.v1.Inference), for `cnnserve serve --worker-address HOST:PORT`. Same settings as "
        "serve (the classification ones are unused); health, reflection and Prometheus metrics; "
        "SIGTERM drains gracefully.",
    )
    add_settings_arguments(parser, WorkerSettings)
    parser.set_defaults(func=_worker, subparser=parser)


# --- the client commands (service/client/) -----------------------------------------------------

# A string: argparse._SubParsersAction is not subscriptable at run time.
Registrar: TypeAlias = "Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]"


def _client_command(name: str, module: str = "commands") -> Registrar:
    """The registrar `name` of service.client.<module>, imported when the parser is built: importing
    this module (as every spawned gradient child does, through the main module) stays free of the
    client's grpc, numpy and PIL."""

    def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        commands = importlib.import_module(f"service.client.{module}")

        registrar: Registrar = getattr(commands, name)
        registrar(subparsers)

    return register


# Subcommand registrars, in --help order. Others append theirs.
COMMANDS: list[Registrar] = [
    register_serve,
    register_worker,
    _client_command("register_classify"),
    _client_command("register_score"),
    _client_command("register_models"),
    _client_command("register_explain", "gradient_commands"),
    _client_command("register_dream", "gradient_commands"),
    _client_command("register_stylize", "gradient_commands"),
]


def _version() -> str:
    try:
        return importlib.metadata.version("cnnserve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without `pip install`
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from service.client.commands import EXIT_STATUS
    from service.client.gradient_commands import GRADIENT_EXIT_STATUS

    parser = argparse.ArgumentParser(
        prog="cnnserve",
        description="CNN inference service: ONNX Runtime classification and PyTorch gradient "
        "visualizations over gRPC.",
        epilog=f"{EXIT_STATUS}\n\n{GRADIENT_EXIT_STATUS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cnnserve {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def _stdout_closed() -> int:
    """Our reader went away (`cnnserve score ... | head -3`): stop quietly, as Unix tools do. Python
    would also print "Exception ignored ... BrokenPipeError" when it flushes sys.stdout at exit, so
    standard output is pointed at /dev/null first."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (tests capture stdout)
        pass
    return 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # parse_args, but a stand-in for a server command this installation lacks takes any arguments.
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # Each subcommand sets func(args, its parser) and subparser (for its usage errors).
    try:
        status: int = args.func(args, args.subparser)
    except BrokenPipeError:
        return _stdout_closed()
    return status


if __name__ == "__main__":
    sys.exit(main())
