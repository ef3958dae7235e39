"""The `cnnserve` command.

    cnnserve serve [--repository DIR] [--grpc-port N] ...   run the server (every Settings field is a
                                                             flag and a CNNSERVE_* variable)
    cnnserve worker [--grpc-port N] ...                     run the gradient-worker tier (the same
                                                             settings; ports 8600/9091 by default)
    cnnserve classify IMAGE... --model M [--top-k K]        classify images on a running server
    cnnserve score DIR... --model M --output FILE           classify a folder into JSONL/CSV (resumable)
    cnnserve models [--json]                                the models a running server serves
    cnnserve --version

Exit status of the client commands (classify, score, models): EXIT_STATUS below.

Precedence for `serve`: flag > CNNSERVE_* environment variable > default. The flags are generated
from `service.settings.Settings.model_fields`, so a new setting is a new flag with its description
as help, with nothing to add here.

More subcommands (e.g. `score`) plug in by appending a `register(subparsers)` function to
`COMMANDS` that calls `set_defaults(func=..., subparser=parser)`, func(args, parser) returning the
exit status; `add_settings_arguments` / `settings_from_args` give them the same settings flags.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from service.settings import Settings

ENV_PREFIX = str(Settings.model_config.get("env_prefix", ""))

EXIT_STATUS = """exit status (classify, score, models):
  0    every image classified (models: listed)
  1    an image failed: unreadable, or answered with an error (score: an error row in the output)
  2    usage error, or the server could not be reached or failed the call as a whole
  130  stopped by SIGINT, 143 by SIGTERM (score: the rows written are kept; rerun to resume)
  141  standard output closed early (e.g. `| head`)"""


class WorkerSettings(Settings):
    """`cnnserve worker`'s settings: every Settings field, with the worker tier's own default ports
    (so a server and a worker run side by side on one host with no flags)."""

    grpc_port: int = Field(
        8600, ge=0, le=65535, description="gRPC port (0 picks a free port, logged at start)."
    )
    metrics_port: int = Field(9091, ge=0, le=65535, description="Prometheus metrics HTTP port (0 picks one).")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[Settings] = Settings) -> None:
    """One flag per Settings field (kebab-case), help from its description, env and default."""
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
    args: argparse.Namespace, parser: argparse.ArgumentParser, cls: type[Settings] = Settings
) -> Settings:
    """Settings from the environment, overridden by the flags given; usage error when invalid."""
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


# --- serve -------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from service.observability.logs import configure_logging
    from service.server import run

    settings = settings_from_args(args, parser)
    configure_logging(settings)
    return asyncio.run(run(settings))


def register_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the gRPC server",
        description="Serve the models of a repository over gRPC (cnnserve.v1.Inference and the Open "
        "Inference Protocol), with health, reflection and Prometheus metrics. SIGTERM drains gracefully.",
    )
    add_settings_arguments(parser)
    parser.set_defaults(func=_serve, subparser=parser)


# --- worker ------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from service.observability.logs import configure_logging
    from service.worker_server import run_worker

    settings = settings_from_args(args, parser, WorkerSettings)
    if settings.workers < 1:
        parser.error(f"a worker needs at least one worker process: workers is {settings.workers}")
    configure_logging(settings)
    return asyncio.run(run_worker(settings))


def register_worker(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


# --- classify ----------------------------------------------------------------------------------


def _call_failed(command: str, address: str, exc: Any) -> int:
    """Report a CnnserveError that failed a whole command (exit status 2), with a hint where to
    look when no gRPC server answered at all."""
    from service.client import connection_hint, not_connected

    print(f"cnnserve {command}: {exc.code.name}: {exc.message}", file=sys.stderr)
    if not_connected(exc.code, exc.message):
        print(f"cnnserve {command}: {connection_hint(address)}", file=sys.stderr)
    return 2


def _classify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from service.client import CnnserveClient, CnnserveError, StreamResult

    paths: list[str] = args.images
    payloads: list[tuple[str, bytes]] = []
    failed = False
    for index, path in enumerate(paths):
        if os.path.isdir(path):
            print(f"{path}: error: a directory; use `cnnserve score` for folders", file=sys.stderr)
            failed = True
            continue
        try:
            payloads.append((str(index), Path(path).read_bytes()))
        except OSError as exc:
            print(f"{path}: error: {exc.strerror or exc}", file=sys.stderr)
            failed = True
    results: dict[int, StreamResult] = {}
    try:
        with CnnserveClient(args.address, timeout_s=args.timeout) as client:
            for item in client.classify_stream(
                payloads, model=args.model, version=args.version, top_k=args.top_k
            ):
                results[int(item.id)] = item
    except CnnserveError as exc:
        return _call_failed("classify", args.address, exc)
    records: list[dict[str, Any]] = []
    for index, path in enumerate(paths):
        answer = results.get(index)
        if answer is None:  # unreadable file, already reported
            continue
        if answer.error is not None:
            failed = True
            print(f"{path}: error {answer.error.code.name}: {answer.error.message}", file=sys.stderr)
            continue
        result = answer.result
        assert result is not None  # a StreamResult has a result or an error
        if args.json:
            records.append(
                {
                    "image": path,
                    "model": result.model,
                    "version": result.version,
                    "classes": [
                        {"index": c.index, "label": c.label, "probability": c.probability}
                        for c in result.classes
                    ],
                }
            )
            continue
        print(f"{path}: {result.model} v{result.version}")
        for rank, c in enumerate(result.classes, 1):
            label = c.label or f"class {c.index}"
            print(f"  {rank}. {label:<30} {c.probability:8.4f}  (index {c.index})")
    if args.json:
        print(json.dumps(records, indent=2))
    return 1 if failed else 0


def register_classify(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="classify images on a running server",
        description="Send images (JPEG, PNG, WebP) to a running server and print the top-k classes of each "
        "(for a folder, use `cnnserve score`).",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--model", required=True, help="model name (see `cnnserve models`)")
    parser.add_argument("--version", type=int, default=0, help="model version (default 0: the latest)")
    parser.add_argument("--top-k", type=int, default=0, help="classes per image (default: the server's, 5)")
    parser.add_argument("--address", default="localhost:8500", help="server host:port (default %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="deadline per image in seconds (default %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=_classify, subparser=parser)


# --- models ------------------------------------------------------------------------------------


def _capabilities(info: Any) -> list[str]:
    from service._proto.cnnserve.v1 import inference_pb2 as pb

    return [pb.Capability.Name(c).removeprefix("CAPABILITY_").lower() for c in info.capabilities]


def _model_record(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "versions": list(info.versions),
        "architecture": info.architecture,
        "trained": info.trained,
        "trained_on": info.trained_on,
        "capabilities": _capabilities(info),
        "execution_provider": info.execution_provider,
        "ready": info.ready,
        "num_classes": info.num_classes,
        "input_shape": list(info.input.shape),
    }


def _models_table(models: Sequence[Any]) -> list[str]:
    rows = [["MODEL", "VERSION", "ARCHITECTURE", "TRAINED", "CAPABILITIES", "PROVIDER", "READY"]]
    for info in models:
        version = str(info.version)
        if len(info.versions) > 1 and info.version == max(info.versions):
            version += " (latest)"  # what version 0 addresses
        if not info.trained:
            trained = "no (random weights)"
        else:
            trained = f"yes ({info.trained_on})" if info.trained_on else "yes"
        rows.append(
            [
                info.name,
                version,
                info.architecture,
                trained,
                ",".join(_capabilities(info)) or "-",
                info.execution_provider or "-",
                "yes" if info.ready else "no",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from service.client import CnnserveClient, CnnserveError

    try:
        with CnnserveClient(args.address, timeout_s=args.timeout) as client:
            models = client.list_models()
    except CnnserveError as exc:
        return _call_failed("models", args.address, exc)
    if args.json:
        print(json.dumps([_model_record(m) for m in models], indent=2))
    elif not models:
        print("no models loaded")
    else:
        print("\n".join(_models_table(models)))
    return 0


def register_models(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the models a running server serves",
        description="List every loaded model version (ListModels): architecture, whether its weights are "
        "trained, the RPCs served for it, the ONNX Runtime execution provider, readiness.",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--address", default="localhost:8500", help="server host:port (default %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="deadline in seconds (default %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=_models, subparser=parser)


# Subcommand registrars, in --help order. Others append theirs (e.g. worker, score).
COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    register_serve,
    register_worker,
    register_classify,
]


def _register_score(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from service.score import register_score

    register_score(subparsers)


COMMANDS.append(_register_score)
COMMANDS.append(register_models)


def _version() -> str:
    try:
        return importlib.metadata.version("cnnserve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without `pip install`
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnserve",
        description="CNN inference service: ONNX Runtime classification over gRPC.",
        epilog=EXIT_STATUS,
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
    args = parser.parse_args(argv)
    # Each subcommand sets func(args, its parser) and subparser (for its usage errors).
    try:
        status: int = args.func(args, args.subparser)
    except BrokenPipeError:
        return _stdout_closed()
    return status


if __name__ == "__main__":
    sys.exit(main())
