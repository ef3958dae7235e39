"""The gradient commands of `cnnserve`: `explain`, `dream` and `stylize`, each one CnnserveClient
call that writes one PNG. service.cli registers them next to classify, score and models
(`register_explain`, `register_dream`, `register_stylize`).

The PNG is written atomically (a temporary file in the same folder, then a rename), so a reader
never sees half an image, and an existing file is never replaced unless --force is given: a dream
or a style transfer costs minutes of a server's CPU, and a mistyped -o should not cost an earlier
result. The check is made before the call (so a refusal costs nothing) and again when writing.

Dream and stylize show the streamed progress: a tqdm bar on a terminal (standard error), else a
plain line every --progress-interval seconds, as `cnnserve score` does; then one summary line
(--json: a JSON object on standard output instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import grpc
from tqdm import tqdm

from service.client.api import CnnserveClient
from service.client.channel import add_address_argument, connection_hint, not_connected
from service.client.gradient_results import (
    EXPLAIN_METHODS,
    DreamResult,
    ExplainResult,
    GradientProgress,
    Neuron,
    StylizeResult,
)
from service.client.results import UNTRAINED_WARNING, ClassScore, CnnserveError

GRADIENT_EXIT_STATUS = """exit status (explain, dream, stylize):
  0    the PNG written
  1    an image could not be read, or the server answered the call with an error (an undecodable
       image, an unknown model or layer, a model without the capability, a cap, a full queue,
       the deadline): as `cnnserve classify` does for an image answered with an error
  2    usage error (an -o file that exists, without --force), or the server could not be reached
       or is not serving the call (UNAVAILABLE: loading, draining, no gradient workers)
  130  stopped by SIGINT: the job is cancelled on the server and nothing is written"""

__all__ = ["GRADIENT_EXIT_STATUS", "register_dream", "register_explain", "register_stylize", "write_png"]


# --- shared: output file, failures, progress ----------------------------------------------------


class _Failed(Exception):
    """A reported failure: the command's exit status."""

    def __init__(self, status: int) -> None:
        self.status = status


def _fail(command: str, message: str, status: int) -> _Failed:
    print(f"cnnserve {command}: {message}", file=sys.stderr)
    return _Failed(status)


def _check_output(command: str, output: Path, force: bool) -> None:
    if output.is_dir():
        raise _fail(command, f"{output} is a directory; -o names the PNG file to write", 2)
    if not output.parent.is_dir():
        raise _fail(command, f"{output.parent} is not a directory", 2)
    if output.exists() and not force:
        raise _fail(command, f"{output} exists; pass --force to replace it", 2)


def write_png(path: Path, data: bytes, *, force: bool) -> None:
    """Write `data` to `path` atomically: a temporary file in the same folder, renamed over `path`
    (force) or hard-linked to it, which fails with FileExistsError when `path` appeared meanwhile."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make the PNG private to its writer
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(temp, path)
        else:
            try:
                os.link(temp, path)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: check, then rename
                if path.exists():
                    raise FileExistsError(path) from None
                os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def _read(command: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _fail(command, f"{path}: error: {exc.strerror or exc}", 1) from None


def _call_failed(command: str, address: str, exc: CnnserveError) -> _Failed:
    """UNAVAILABLE (not reached, or not serving): 2, with the connection hint when no gRPC server
    answered at all; any other answer of the server: 1 (GRADIENT_EXIT_STATUS)."""
    print(f"cnnserve {command}: {exc.code.name}: {exc.message}", file=sys.stderr)
    if not_connected(exc.code, exc.message):
        print(f"cnnserve {command}: {connection_hint(address)}", file=sys.stderr)
    return _Failed(2 if exc.code == grpc.StatusCode.UNAVAILABLE else 1)


class StepProgress:
    """The streamed steps of a dream or a style transfer: a tqdm bar on a terminal, else a line
    every `interval_s` (and one at the last step), or nothing when quiet."""

    def __init__(self, command: str, *, quiet: bool, interval_s: float, stream: TextIO | None = None) -> None:
        self.command = command
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        self.interval_s = interval_s
        self._bar: tqdm[Any] | None = None
        self._last = -float("inf")

    def __call__(self, progress: GradientProgress) -> None:
        if self.quiet:
            return
        losses = " ".join(f"{name} {value:.4g}" for name, value in sorted(progress.losses.items()))
        octave = f"octave {progress.octave} " if progress.octave else ""
        if self.stream.isatty():
            if self._bar is None:
                self._bar = tqdm(total=progress.total_steps, desc=self.command, unit="step", file=self.stream)
            self._bar.set_postfix_str(f"{octave}{losses}", refresh=False)
            self._bar.update(progress.step - self._bar.n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s or progress.step == progress.total_steps:
            self._last = now
            text = f"step {progress.step}/{progress.total_steps} {octave}{losses}".rstrip()
            print(f"{self.command}: {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _run(
    command: str,
    args: argparse.Namespace,
    call: Callable[[CnnserveClient], Any],
    write: Callable[[Any], None],
) -> int:
    """Check -o, make the call (SIGINT cancels it: 130), write the PNG, then report via `write`."""
    output = Path(args.output)
    try:
        _check_output(command, output, args.force)
        with CnnserveClient(args.address, timeout_s=args.timeout) as client:
            try:
                result = call(client)
            except CnnserveError as exc:
                raise _call_failed(command, args.address, exc) from None
        try:
            write_png(output, result.png, force=args.force)
        except FileExistsError:
            raise _fail(command, f"{output} appeared meanwhile; pass --force to replace it", 2) from None
        except OSError as exc:
            raise _fail(command, f"cannot write {output}: {exc.strerror or exc}", 1) from None
    except _Failed as failed:
        return failed.status
    except KeyboardInterrupt:
        newline = "\n" if sys.stderr.isatty() else ""  # after the bar and the terminal's ^C
        print(
            f"{newline}cnnserve {command}: interrupted; the job was cancelled, nothing written",
            file=sys.stderr,
        )
        return 130
    write(result)
    return 0


def _score(c: ClassScore | None) -> dict[str, Any] | None:
    return None if c is None else {"index": c.index, "label": c.label, "probability": c.probability}


def _untrained(untrained: bool) -> dict[str, Any]:
    """A JSON summary's say on the weights: `untrained`, and the warning when they are."""
    return {"untrained": untrained, **({"warning": UNTRAINED_WARNING} if untrained else {})}


def _say_untrained(untrained: bool) -> None:
    if untrained:
        print(f"  ({UNTRAINED_WARNING})")


def _class_text(c: ClassScore) -> str:
    return f"{c.label or 'class ' + str(c.index)} (index {c.index}, p {c.probability:.4f})"


def _common_arguments(parser: argparse.ArgumentParser, timeout_s: float) -> None:
    parser.add_argument("-o", "--output", required=True, metavar="PNG", help="the PNG file to write")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output file (without it an existing file is refused before the call, "
        "so a mistyped -o never costs an earlier result)",
    )
    parser.add_argument("--version", type=int, default=0, help="model version (default 0: the latest)")
    add_address_argument(parser)
    parser.add_argument(
        "--timeout", type=float, default=timeout_s, help="deadline in seconds (default %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")


def _progress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    parser.add_argument(
        "--progress-interval", type=float, default=5.0, metavar="SECONDS",
        help="off a terminal, a progress line every this many seconds (default %(default)s)",
    )  # fmt: skip


def _subparser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    description: str,
) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=GRADIENT_EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# --- explain -------------------------------------------------------------------------------------


def _neuron(text: str) -> Neuron:
    try:
        return Neuron.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _explain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.neuron is not None and args.target is not None:
        parser.error("--neuron explains one unit instead of a class: give --target or --neuron, not both")
    try:
        image = _read("explain", args.image)
    except _Failed as failed:
        return failed.status

    answer: dict[str, ExplainResult] = {}

    def call(client: CnnserveClient) -> Any:
        # The explanation carries the PNG; the response's model, version and method are kept too.
        result = client.explain(
            image, model=args.model, version=args.version, target=args.target, method=args.method,
            neuron=args.neuron,
        )  # fmt: skip
        answer["result"] = result
        if not result.explanations:
            raise CnnserveError(grpc.StatusCode.INTERNAL, "the server answered no explanation")
        return result.explanations[0]

    def write(e: Any) -> None:
        result = answer["result"]
        record = {
            "image": args.image, "output": args.output, "model": result.model, "version": result.version,
            "method": result.method, "explained": _score(e.explained), "predicted": _score(e.predicted),
            "neuron": None if e.neuron is None else {
                "layer": e.neuron.layer, "channel": e.neuron.channel, "y": e.neuron.y, "x": e.neuron.x,
                "activation": e.neuron.activation, "field": list(e.neuron.field),
            },
            "saliency_shape": list(e.saliency.shape), "seconds": result.seconds,
            **_untrained(result.untrained),
        }  # fmt: skip
        if args.json:
            print(json.dumps(record, indent=2))
            return
        print(f"{args.output}: {result.method} saliency of {args.image} ({result.model} v{result.version})")
        _say_untrained(result.untrained)
        if e.explained is not None:
            print(f"  explained: {_class_text(e.explained)}")
        if e.neuron is not None:
            n = e.neuron
            top, left, bottom, right = n.field
            field = f"rows {top}..{bottom - 1}, columns {left}..{right - 1}"
            where = f"{n.layer} channel {n.channel} at y {n.y}, x {n.x}"
            print(f"  neuron:    {where}: activation {n.activation:.4g}; receptive field {field}")
        if e.predicted is not None:
            print(f"  predicted: {_class_text(e.predicted)}")

    return _run("explain", args, call, write)


def register_explain(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _subparser(
        subparsers, "explain", "write a saliency map (guided backprop, Grad-CAM) of an image as a PNG",
        "Explain one image's classification (Explain): the guided-backprop, guided Grad-CAM or Grad-CAM "
        "saliency w.r.t. the model input, written as a PNG (signed: grey is 0; gradcam: the heatmap), and "
        "print the class explained and the class predicted. --neuron explains one unit of a layer instead.",
    )  # fmt: skip
    parser.add_argument("image", metavar="IMAGE", help="an image file (JPEG, PNG, WebP)")
    parser.add_argument("--model", required=True, help="model name (see `cnnserve models`)")
    parser.add_argument(
        "--target", type=int, help="the class index to explain (default: the predicted class)"
    )
    parser.add_argument(
        "--method", choices=list(EXPLAIN_METHODS), default="guided_backprop", help="default %(default)s"
    )
    parser.add_argument(
        "--neuron", type=_neuron, metavar="LAYER:CHANNEL[:Y,X]",
        help="explain one unit of a layer (GetModel's layers) instead of a class, e.g. layer4:12 (its "
        "strongest position) or layer4:12:3,5",
    )  # fmt: skip
    _common_arguments(parser, timeout_s=120.0)
    parser.set_defaults(func=_explain, subparser=parser)


# --- dream ---------------------------------------------------------------------------------------


def _dream(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        image = _read("dream", args.image)
    except _Failed as failed:
        return failed.status
    progress = StepProgress("dream", quiet=args.quiet or args.json, interval_s=args.progress_interval)

    def call(client: CnnserveClient) -> DreamResult:
        try:
            return client.dream(
                image, model=args.model, version=args.version, layers=args.layer, octaves=args.octaves,
                steps=args.steps, max_side=args.max_side, seed=args.seed, on_progress=progress,
            )  # fmt: skip
        finally:
            progress.close()

    def write(r: DreamResult) -> None:
        layers = [{"layer": la.layer, "weight": la.weight, "channels": list(la.channels)} for la in r.layers]
        if args.json:
            print(json.dumps({
                "image": args.image, "output": args.output, "model": r.model, "version": r.version,
                "width": r.width, "height": r.height, "steps": r.steps,
                "objective_before": r.objective_before, "objective_after": r.objective_after,
                "layers": layers, "seconds": r.seconds, **_untrained(r.untrained),
            }, indent=2))  # fmt: skip
            return
        names = ", ".join(la.layer for la in r.layers) or "the default layer"
        objective = f"objective {r.objective_before:.4g} -> {r.objective_after:.4g}"
        what = f"{r.width}x{r.height} dream of {args.image} ({r.model} v{r.version}, {names})"
        print(f"{args.output}: {what}: {r.steps} steps, {objective}, {r.seconds:.1f} s")
        _say_untrained(r.untrained)

    return _run("dream", args, call, write)


def register_dream(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _subparser(
        subparsers, "dream", "DeepDream an image into a PNG, with a progress bar",
        "DeepDream one image (the Dream RPC): gradient ascent on the activations of a model's layers over "
        "several octaves, the progress streamed as it runs, the result written as a PNG at the image's size. "
        "Unset options take the server's defaults (those of the original DeepDream notebook).",
    )  # fmt: skip
    parser.add_argument("image", metavar="IMAGE", help="an image file (JPEG, PNG, WebP), both sides >= 32 px")
    parser.add_argument("--model", required=True, help="model name (see `cnnserve models`)")
    parser.add_argument(
        "--layer", action="append", metavar="LAYER",
        help="a layer to amplify (repeatable; GetModel's layers, e.g. layer3, inception4c); default: the "
        "architecture's",
    )  # fmt: skip
    parser.add_argument("--octaves", type=int, help="image scales, coarsest first (server default 4)")
    parser.add_argument("--steps", type=int, help="gradient steps per octave (server default 10)")
    parser.add_argument(
        "--max-side", type=int, help="downscale the image first (server default: keep its size)"
    )
    parser.add_argument("--seed", type=int, default=0, help="jitter seed (default %(default)s)")
    _progress_arguments(parser)
    _common_arguments(parser, timeout_s=600.0)
    parser.set_defaults(func=_dream, subparser=parser)


# --- stylize -------------------------------------------------------------------------------------


def _stylize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        content = _read("stylize", args.content)
        styles = [_read("stylize", path) for path in args.styles]
    except _Failed as failed:
        return failed.status
    progress = StepProgress("stylize", quiet=args.quiet or args.json, interval_s=args.progress_interval)

    def call(client: CnnserveClient) -> StylizeResult:
        try:
            return client.stylize(
                content, styles, model=args.model, version=args.version, iterations=args.iterations,
                max_side=args.max_side, content_weight=args.content_weight, style_weight=args.style_weight,
                optimizer=args.optimizer, original_colors=args.original_colors, seed=args.seed,
                on_progress=progress,
            )  # fmt: skip
        finally:
            progress.close()

    def write(r: StylizeResult) -> None:
        if args.json:
            print(json.dumps({
                "content": args.content, "styles": args.styles, "output": args.output, "model": r.model,
                "version": r.version, "width": r.width, "height": r.height, "iterations": r.iterations,
                "best_iteration": r.best_iteration, "losses": r.losses, "initial_losses": r.initial_losses,
                "seconds": r.seconds, **_untrained(r.untrained),
            }, indent=2))  # fmt: skip
            return
        total = r.losses.get("total")
        loss = (
            ""
            if total is None
            else f", loss {r.initial_losses.get('total', float('nan')):.4g} -> {total:.4g}"
        )
        print(
            f"{args.output}: {r.width}x{r.height} {args.content} in the style of {', '.join(args.styles)} "
            f"({r.model} v{r.version}): {r.iterations} iterations (best {r.best_iteration}){loss}, "
            f"{r.seconds:.1f} s"
        )
        _say_untrained(r.untrained)

    return _run("stylize", args, call, write)


def register_stylize(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _subparser(
        subparsers, "stylize", "neural style transfer of an image into a PNG, with a progress bar",
        "Paint a content image in the style of one or more style images (the Stylize RPC, Gatys et al.; a "
        "VGG-19 model), the progress streamed as it runs, the result written as a PNG at the working size "
        "(the content downscaled to --max-side). Unset options take the server's defaults.",
    )  # fmt: skip
    parser.add_argument("content", metavar="CONTENT", help="the content image file")
    parser.add_argument("styles", nargs="+", metavar="STYLE", help="style image files (blended equally)")
    parser.add_argument("--model", default="vgg19", help="a VGG-19 model name (default %(default)s)")
    parser.add_argument(
        "--iterations", type=int, default=0, help="optimizer iterations (default: the server's, 300)"
    )
    parser.add_argument(
        "--max-side", type=int, help="working size: the content's longer side (server default 512)"
    )
    parser.add_argument("--content-weight", type=float, help="server default 1")
    parser.add_argument("--style-weight", type=float, help="server default 1e6")
    parser.add_argument("--optimizer", choices=["lbfgs", "adam"], help="server default lbfgs")
    parser.add_argument("--original-colors", action="store_true", help="keep the content's colours")
    parser.add_argument("--seed", type=int, default=0, help="default %(default)s")
    _progress_arguments(parser)
    _common_arguments(parser, timeout_s=600.0)
    parser.set_defaults(func=_stylize, subparser=parser)
