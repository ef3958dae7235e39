"""The client-side commands of `cnnserve`: `classify` and `models` here, `score` in score/, and the
exit-status table they share. service.cli builds the top-level parser and registers them
(`register_classify`, `register_score`, `register_models`).

Each register_* adds its subparser and `set_defaults(func=..., subparser=parser)`; func(args,
parser) returns the exit status (EXIT_STATUS).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service.client.api import CnnserveClient
from service.client.channel import add_address_argument, connection_hint, not_connected
from service.client.results import UNTRAINED_WARNING, ClassifyResult, CnnserveError, StreamResult
from service.client.score import register_score

EXIT_STATUS = """exit status (classify, score, models):
  0    every image classified (models: listed)
  1    an image failed: unreadable, or answered with an error (score: an error row in the output)
  2    usage error, or the server could not be reached or failed the call as a whole
  130  stopped by SIGINT, 143 by SIGTERM (score: the rows written are kept; rerun to resume)
  141  standard output closed early (e.g. `| head`)"""

__all__ = ["EXIT_STATUS", "register_classify", "register_models", "register_score"]


# --- classify ----------------------------------------------------------------------------------


def _call_failed(command: str, address: str, exc: CnnserveError) -> int:
    """Report a CnnserveError that failed a whole command (exit status 2), with a hint where to
    look when no gRPC server answered at all."""
    print(f"cnnserve {command}: {exc.code.name}: {exc.message}", file=sys.stderr)
    if not_connected(exc.code, exc.message):
        print(f"cnnserve {command}: {connection_hint(address)}", file=sys.stderr)
    return 2


def _read_images(paths: Sequence[str]) -> tuple[list[tuple[str, bytes]], bool]:
    """(id, bytes) of each readable file, the id its position in `paths`; whether any was not
    (reported: a directory, an unreadable file)."""
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
    return payloads, failed


def _classify_record(path: str, result: ClassifyResult) -> dict[str, Any]:
    record = {
        "image": path,
        "model": result.model,
        "version": result.version,
        "classes": [
            {"index": c.index, "label": c.label, "probability": c.probability} for c in result.classes
        ],
        "untrained": result.untrained,
    }
    if result.untrained:
        record["warning"] = UNTRAINED_WARNING
    return record


def _print_classes(path: str, result: ClassifyResult) -> None:
    print(f"{path}: {result.model} v{result.version}")
    if result.untrained:
        print(f"  ({UNTRAINED_WARNING})")
    for rank, c in enumerate(result.classes, 1):
        label = c.label or f"class {c.index}"
        print(f"  {rank}. {label:<30} {c.probability:8.4f}  (index {c.index})")


def _classify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    paths: list[str] = args.images
    payloads, failed = _read_images(paths)
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
            records.append(_classify_record(path, result))
        else:
            _print_classes(path, result)
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
    add_address_argument(parser)
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="deadline per image in seconds (default %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=_classify, subparser=parser)


# --- models ------------------------------------------------------------------------------------


def _capabilities(info: Any) -> list[str]:
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
    add_address_argument(parser)
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="deadline in seconds (default %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=_models, subparser=parser)
