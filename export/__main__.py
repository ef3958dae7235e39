"""`python -m export {describe,train,onnx,import,demo}`: the export stage's command line.

Results go to stdout, progress and errors to stderr. Any bad input ends with one line
`error: <what is wrong, naming it>` on stderr and a non-zero status (export.errors: 2 usage,
3 checkpoint, 4 verification, 5 repository, 1 other), and leaves no partial version behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from export.errors import ExportError, UsageError

USAGE_EXIT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; a one-line error (with a pointer to --help) is
        # easier to read in a log and to match in a script.
        self.exit(USAGE_EXIT, f"error: {self.prog}: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 2**63-1")
    return value


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _add_preprocessing_flags(p: argparse.ArgumentParser, default: str) -> None:
    """--preprocessing FILE and the flags that override its fields (export.user_files)."""
    g = p.add_argument_group(
        "preprocessing",
        f"how an image becomes the model's input, recorded in metadata.json (default: {default})",
    )
    g.add_argument(
        "--preprocessing",
        type=Path,
        metavar="FILE",
        help='JSON: {"color_mode": "RGB"|"L", "resize": N, "crop": N, "mean": [...], "std": [...], '
        '"invert": false}',
    )
    g.add_argument("--color-mode", choices=("RGB", "L"), help="RGB, or L (grayscale)")
    g.add_argument("--resize", type=_positive_int, metavar="N", help="shorter side after resizing")
    g.add_argument("--crop", type=_positive_int, metavar="N", help="centre crop, N x N: the input size")
    g.add_argument("--mean", type=_floats, metavar="M[,M,M]", help="per channel, on pixel / 255")
    g.add_argument("--std", type=_floats, metavar="S[,S,S]", help="per channel, on pixel / 255")
    g.add_argument(
        "--invert",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flip pixel values (255 - v) first: a model trained on light-on-dark images",
    )


def _preprocessing_fields(args: argparse.Namespace) -> dict[str, Any] | None:
    """The file's fields with the flags over them; None when neither was given."""
    from export.user_files import read_preprocessing_file

    fields = read_preprocessing_file(args.preprocessing) if args.preprocessing is not None else {}
    for key in ("color_mode", "resize", "crop", "mean", "std", "invert"):
        value = getattr(args, key)
        if value is not None:
            fields[key] = value
    return fields if fields or args.preprocessing is not None else None


def _where(args: argparse.Namespace) -> str:
    return f"preprocessing {args.preprocessing}" if args.preprocessing is not None else "preprocessing flags"


def build_parser() -> argparse.ArgumentParser:
    from export.onnx_export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
    from export.train import DEFAULT_EPOCHS, DEFAULT_SEED

    parser = _Parser(prog="python -m export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser("describe", help="print every architecture's parameters, depth, layers and FLOPs")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON to PATH")

    p = sub.add_parser("train", help="train LeNet-5 on the UCI digits and save a checkpoint")
    p.add_argument("arch", metavar="ARCH", help="architecture to train (lenet5)")
    p.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS, help=f"default {DEFAULT_EPOCHS}")
    p.add_argument("--seed", type=_seed, default=DEFAULT_SEED, help=f"default {DEFAULT_SEED}")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PATH",
        help="checkpoint path (default artifacts/ARCH.pt); PATH.sha256 gets its sha256",
    )

    p = sub.add_parser("onnx", help="export an architecture to a new model version in the repository")
    p.add_argument("arch", metavar="ARCH", help="architecture (see `describe`)")
    p.add_argument("--repository", type=Path, required=True, metavar="DIR", help="model repository")
    p.add_argument(
        "--weights",
        type=Path,
        metavar="FILE",
        help="checkpoint (state_dict) to export; default: seeded random weights, marked untrained",
    )
    p.add_argument("--version", type=_positive_int, help="version number (default: highest existing + 1)")
    p.add_argument("--name", help="model name in the repository (default: ARCH)")
    p.add_argument("--fp16", action="store_true", help="float16 weights, input and output")
    p.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})",
    )
    p.add_argument(
        "--seed", type=_seed, default=0, help="seed of the random weights without --weights (default 0)"
    )
    p.add_argument(
        "--trained-on",
        help="data set the --weights were trained on (default: the architecture's, e.g. imagenet, "
        "unless --labels are given)",
    )
    p.add_argument(
        "--num-classes",
        type=_positive_int,
        metavar="N",
        help="classes of a fine-tuned checkpoint (default: read from its classifier head)",
    )
    p.add_argument(
        "--labels",
        type=Path,
        metavar="FILE",
        help="class names, one per line in output order (required when the classes are not the "
        "architecture's data set's)",
    )
    _add_preprocessing_flags(p, "the architecture's")

    p = sub.add_parser("import", help="import an ONNX image classifier as a new model version")
    p.add_argument(
        "source", type=Path, metavar="MODEL.onnx", help="the ONNX model (its external data beside it)"
    )
    p.add_argument("--repository", type=Path, required=True, metavar="DIR", help="model repository")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--labels", type=Path, required=True, metavar="FILE", help="class names, one per line")
    p.add_argument("--version", type=_positive_int, help="version number (default: highest existing + 1)")
    p.add_argument(
        "--layout",
        choices=("auto", "NCHW", "NHWC"),
        default="auto",
        help="the input's layout (default auto: where its 1 or 3 channels are); NHWC gets a Transpose "
        "in front",
    )
    p.add_argument("--output", metavar="NAME", help="the logits output, when the graph has several")
    p.add_argument(
        "--features-output", metavar="NAME", help="an embedding output [batch, D], served by Embed"
    )
    p.add_argument("--trained-on", help="data set the model was trained on (for ModelInfo)")
    _add_preprocessing_flags(p, "none: color mode, crop, mean and std are required")

    p = sub.add_parser("demo", help="train LeNet-5 and export it plus random-weight ImageNet models")
    p.add_argument("--repository", type=Path, required=True, metavar="DIR", help="model repository")
    p.add_argument(
        "--models",
        metavar="A,B,...",
        help="comma-separated subset (default: lenet5,alexnet,googlenet,resnet18,resnet50,vgg19)",
    )
    return parser


def _describe(args: argparse.Namespace) -> None:
    from export.describe import describe_all, format_table

    rows = describe_all()
    print(format_table(rows))
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise ExportError(f"cannot write {args.json}: {e.strerror or e}") from None


def _train(args: argparse.Namespace) -> None:
    from export.models import get_spec
    from export.train import save_checkpoint, train_lenet5

    get_spec(args.arch)
    if args.arch != "lenet5":
        raise UsageError(
            f"only lenet5 can be trained here (on the bundled digits); {args.arch} needs ImageNet: "
            "export it with --weights FILE or with random weights"
        )
    out = args.out if args.out is not None else Path("artifacts") / f"{args.arch}.pt"
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name such as {out / 'lenet5.pt'}")
    result = train_lenet5(epochs=args.epochs, seed=args.seed, progress=sys.stderr)
    digest = save_checkpoint(result.model.state_dict(), out)
    print(f"held-out accuracy {result.test_accuracy:.2%} (train {result.train_accuracy:.2%})")
    print(f"wrote {out} sha256 {digest} (and {out}.sha256)")


def _onnx(args: argparse.Namespace) -> None:
    from export.models import get_spec
    from export.publish import export_to_repository
    from export.user_files import make_preprocessing, read_labels

    spec = get_spec(args.arch)
    if args.trained_on is not None and args.weights is None:
        raise UsageError("--trained-on describes --weights; without --weights the weights are random")
    labels = read_labels(args.labels) if args.labels is not None else None
    fields = _preprocessing_fields(args)
    preprocessing = (
        make_preprocessing(fields, spec.preprocessing, _where(args)) if fields is not None else None
    )
    result = export_to_repository(
        args.arch,
        args.repository,
        weights=args.weights,
        name=args.name,
        version=args.version,
        fp16=args.fp16,
        opset=args.opset,
        seed=args.seed,
        trained_on=args.trained_on,
        num_classes=args.num_classes,
        labels=labels,
        labels_source=f"labels file {args.labels}",
        preprocessing=preprocessing,
    )
    v = result.verification
    version = result.version
    line = (
        f"{version.name} v{version.version} -> {version.path}  {result.seconds:.1f}s  "
        f"{result.onnx_bytes / 1e6:.1f} MB  parity rel {v.relative_diff:.2e} (max abs {v.max_abs_diff:.2e}, "
        f"top-1 agreement {v.top1_agreement:.0%})"
    )
    evaluation = version.metadata.get("evaluation")
    if evaluation:
        line += f"  held-out accuracy {evaluation['accuracy']:.2%}"
    print(line)


def _import(args: argparse.Namespace) -> None:
    from export.importing import import_onnx
    from export.user_files import make_preprocessing, read_labels

    labels = read_labels(args.labels)
    preprocessing = make_preprocessing(_preprocessing_fields(args) or {}, None, _where(args))
    result = import_onnx(
        args.source,
        args.repository,
        name=args.name,
        labels=labels,
        labels_source=f"labels file {args.labels}",
        preprocessing=preprocessing,
        version=args.version,
        layout=args.layout,
        output=args.output,
        features_output=args.features_output,
        trained_on=args.trained_on,
    )
    version = result.version
    v = version.metadata["verification"]
    print(
        f"{version.name} v{version.version} -> {version.path}  {result.seconds:.1f}s  "
        f"{result.onnx_bytes / 1e6:.1f} MB  {version.num_classes} classes, input {result.layout}, batch "
        f"{result.batch}; batch of {v['batch']} equals its rows alone (max abs diff {v['max_abs_diff']:.2e})"
    )


def _demo(args: argparse.Namespace) -> None:
    from export.demo import demo

    models = None
    if args.models is not None:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models:
            raise UsageError("--models lists no model")
    demo(args.repository, models, out=sys.stdout, progress=sys.stderr)


COMMANDS = {"describe": _describe, "train": _train, "onnx": _onnx, "import": _import, "demo": _demo}


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argparse errors raise SystemExit(2) themselves)."""
    from export.models import UnknownArchitecture

    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except UnknownArchitecture as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    except ExportError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # e.g. a full disk while writing weights.pt: the version is removed
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
