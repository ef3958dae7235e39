"""The `cnnserve` command.

    cnnserve serve [--repository DIR] [--grpc-port N] ...   run the server (every Settings field is a
                                                             flag and a CNNSERVE_* variable)
    cnnserve worker [--grpc-port N] ...                     run the gradient-worker tier (the same
                                                             settings; ports 8600/9091 by default)
    cnnserve classify IMAGE... --model M [--top-k K]        classify images on a running server

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
import json
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from service.settings import Settings

ENV_PREFIX = str(Settings.model_config.get("env_prefix", ""))


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
    from service.server import configure_logging, run

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
    from service.server import configure_logging
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


def _classify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from service.client import CnnserveClient, CnnserveError, StreamResult

    paths: list[str] = args.images
    payloads: list[tuple[str, bytes]] = []
    failed = False
    for index, path in enumerate(paths):
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
        print(f"cnnserve classify: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
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
        description="Send images (JPEG, PNG, WebP) to a running server and print the top-k classes of each. "
        "Exit status 1 if any image failed.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--model", required=True, help="model name (see ListModels)")
    parser.add_argument("--version", type=int, default=0, help="model version (default 0: the latest)")
    parser.add_argument("--top-k", type=int, default=0, help="classes per image (default: the server's, 5)")
    parser.add_argument("--address", default="localhost:8500", help="server host:port (default %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="deadline in seconds (default %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=_classify, subparser=parser)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnserve", description="CNN inference service: ONNX Runtime classification over gRPC."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Each subcommand sets func(args, its parser) and subparser (for its usage errors).
    status: int = args.func(args, args.subparser)
    return status


if __name__ == "__main__":
    sys.exit(main())
