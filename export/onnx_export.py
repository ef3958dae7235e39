"""PyTorch -> ONNX: export, check, verify against PyTorch with ONNX Runtime, write a repository version.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript), the maintained path;
the TorchScript exporter is deprecated. With a `torch.export.Dim` on the batch axis it gives every
architecture here a symbolic batch dimension ("batch"), and with `external_data=False` one
self-contained .onnx file (vgg19, the largest, is about 550 MB, under protobuf's 2 GB limit). Should
an exporter still write external data, the model is re-saved inline before anything else looks at it.

Every export is then:
1. `onnx.checker.check_model(path, full_check=True)` (full_check runs strict shape inference);
2. run with ONNX Runtime's CPUExecutionProvider on a seeded batch of `VERIFY_BATCH` N(0, 1) inputs
   and compared with the float32 PyTorch model on the same inputs:
   max_abs_diff = max |ort - torch|, relative_diff = max_abs_diff / max |torch|.
   - float32: relative_diff <= FP32_MAX_RELATIVE_DIFF (1e-4) and the same top-1 class on every row;
   - float16 (`fp16=True`: half weights, float16 input and output, compared with the *float32*
     model, so the bound is what fp16 costs a user): relative_diff <= FP16_MAX_RELATIVE_DIFF (1e-2)
     and the same top-1 on at least FP16_MIN_TOP1_AGREEMENT (3/4) of the rows. Random-weight
     ImageNet models have nearly tied logits, so fp16 rounding can legitimately swap a top-1;
     measured on this project's models with seeded random weights, relative error 3.6e-4 (alexnet),
     5.1e-4 (resnet18), 5.6e-4 (lenet5), 7.3e-4 (resnet50), 1.0e-3 (vgg19), top-1 equal on all rows.
     Weights whose logits leave float16's range are refused outright: random googlenet's logits
     (~1e-11) underflow, random resnet152's (~1e8) overflow.
   ORT's CPU provider has no float16 kernels for some ops and inserts float32 casts around them; the
   result is still the float16 model's numbers at its inputs and outputs.
A model that fails either step is refused with VerificationError and its version directory removed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export.checkpoints import load_weights
from export.errors import UsageError, VerificationError
from export.preprocessing import describe_input
from export.repository import ONNX_FILE, WEIGHTS_FILE, ModelVersion, VersionWriter, check_name

DEFAULT_OPSET = 18
MIN_OPSET = 17
MAX_OPSET = 23
VERIFY_BATCH = 4
VERIFY_SEED = 0
FP32_MAX_RELATIVE_DIFF = 1e-4
FP16_MAX_RELATIVE_DIFF = 1e-2
FP16_MIN_TOP1_AGREEMENT = 0.75
FP16_SMALLEST_NORMAL = float(np.finfo(np.float16).tiny)  # 6.1e-05
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
RANDOM_WEIGHTS_SEED = 0
# Architectures whose gradient features the service offers (besides classify and explain).
DREAM_ARCHITECTURES = frozenset(
    {"alexnet", "alexnet_torchvision", "googlenet", "resnet18", "resnet34", "resnet50", "resnet101"}
    | {"resnet152", "vgg19"}
)
STYLIZE_ARCHITECTURES = frozenset({"vgg19"})

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verification:
    batch: int
    max_abs_diff: float
    relative_diff: float
    top1_equal: bool  # every row
    top1_agreement: float  # fraction of rows with the same top-1
    max_relative_diff: float  # the bound applied
    min_top1_agreement: float
    reference: str
    provider: str


@dataclass(frozen=True)
class ExportResult:
    version: ModelVersion
    seconds: float  # export + check + verification + writing
    onnx_bytes: int
    verification: Verification


# Loggers whose warnings are the exporter talking to itself: "torchvision is not installed. Skipping
# torchvision::nms" (we use no torchvision ops), and for opset 17 "setting the exporter to opset 18 ...
# automatic version conversion will be performed" (we check the opset of the result ourselves).
_CHATTY_LOGGERS = (
    "torch.onnx._internal.exporter._registration",
    "torch.onnx._internal.exporter._compat",
    "onnxscript.version_converter",
)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter that is no concern of ours (and would trip -W error).

    Besides _CHATTY_LOGGERS: the FutureWarning "isinstance(treespec, LeafSpec) is deprecated",
    raised inside torch.export's own pytree code in torch 2.13 (nothing a caller can change), and
    progress lines on stdout.
    """
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings(
                "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
            )
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _inline_external_data(path: Path) -> None:
    """Re-save `path` with every tensor inside it, deleting external data files it referenced."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    if not locations:
        return
    model = onnx.load(str(path), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=False)
    for location in locations:
        (path.parent / location).unlink(missing_ok=True)


def export_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
) -> None:
    """Export eval-mode `model` to one self-contained ONNX file at `path`.

    Input "input" [batch, *input_shape], output "logits" [batch, classes]; batch is symbolic.
    With `fp16` the weights, input and output are float16 (the model is converted on a copy).
    """
    path = Path(path)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
    if fp16:
        model = _half_copy(model)
    dtype = torch.float16 if fp16 else torch.float32
    # Batch 2 for tracing: torch.export specializes a dimension that is 1 in the example input.
    example = torch.zeros(2, *input_shape, dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                model.eval(),
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # the exporter's own errors are many and multi-line
        first = " ".join(str(e).split())[:300]
        raise VerificationError(f"ONNX export failed: {type(e).__name__}: {first}") from e
    _inline_external_data(path)


def _half_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).half().eval()


def check(path: Path, opset: int | None = None) -> None:
    """onnx.checker with full_check (strict shape inference) plus our interface contract."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = " ".join(str(e).split())[:300]
        raise VerificationError(f"{path.name} fails onnx.checker: {first}") from None
    model_proto = onnx.load(str(path), load_external_data=False)
    graph = model_proto.graph
    inputs = [i.name for i in graph.input if i.name not in {init.name for init in graph.initializer}]
    outputs = [o.name for o in graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise VerificationError(
            f"{path.name} has inputs {inputs} and outputs {outputs}; "
            f"expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]"
        )
    opsets = {o.domain or "ai.onnx": o.version for o in model_proto.opset_import}
    if opset is not None and opsets.get("ai.onnx") != opset:
        raise VerificationError(
            f"the exporter produced opset {opsets.get('ai.onnx')}, not the requested {opset}"
        )
    dim0 = graph.input[0].type.tensor_type.shape.dim[0]
    if not dim0.dim_param:
        raise VerificationError(
            f"{path.name} has a fixed batch dimension ({dim0.dim_value}), not a dynamic one"
        )


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings about inserted casts are expected
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def verify(
    path: Path,
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    fp16: bool = False,
    batch: int = VERIFY_BATCH,
    seed: int = VERIFY_SEED,
) -> Verification:
    """Run the ONNX model and the float32 PyTorch `model` on the same seeded batch; compare.

    Raises VerificationError when the bound for the model's precision (module docstring) is missed.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_shape, generator=generator)
    with torch.no_grad():
        reference = model.eval()(x).double().numpy()
    feed = x.numpy().astype(np.float16 if fp16 else np.float32)
    session = _session(path)
    try:
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: feed})
    except Exception as e:  # ORT raises its own Fail/InvalidArgument/NotImplemented types
        raise VerificationError(
            f"ONNX Runtime cannot run {path.name}: {' '.join(str(e).split())[:300]}"
        ) from None
    expected_dtype = np.float16 if fp16 else np.float32
    if got.shape != reference.shape or got.dtype != expected_dtype:
        raise VerificationError(
            f"{path.name} returned {got.dtype} {list(got.shape)}, expected {np.dtype(expected_dtype)} "
            f"{list(reference.shape)}"
        )
    got64 = got.astype(np.float64)
    scale = float(np.abs(reference).max())
    if not np.isfinite(got64).all():
        if fp16 and scale > FP16_MAX:
            raise VerificationError(
                f"float16 export is meaningless for these weights: the logits reach {scale:.3g}, beyond "
                f"float16's largest number {FP16_MAX:.0f}"
            )
        raise VerificationError(f"{path.name} produced non-finite logits where PyTorch's are finite")
    max_abs = float(np.abs(got64 - reference).max())
    relative = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    agreement = float((got64.argmax(1) == reference.argmax(1)).mean())
    bound, min_agreement = (
        (FP16_MAX_RELATIVE_DIFF, FP16_MIN_TOP1_AGREEMENT) if fp16 else (FP32_MAX_RELATIVE_DIFF, 1.0)
    )
    result = Verification(
        batch=batch,
        max_abs_diff=max_abs,
        relative_diff=relative,
        top1_equal=agreement == 1.0,
        top1_agreement=agreement,
        max_relative_diff=bound,
        min_top1_agreement=min_agreement,
        reference="pytorch float32",
        provider=session.get_providers()[0],
    )
    precision = "float16" if fp16 else "float32"
    if fp16 and scale < FP16_SMALLEST_NORMAL:
        raise VerificationError(
            f"float16 export is meaningless for these weights: the logits' magnitude {scale:.3g} is below "
            f"float16's smallest normal number {FP16_SMALLEST_NORMAL:.3g}"
        )
    if not relative <= bound:
        raise VerificationError(
            f"{precision} ONNX model disagrees with PyTorch: relative diff {relative:.3g} > {bound:g} "
            f"(max abs diff {max_abs:.3g})"
        )
    if agreement < min_agreement:
        raise VerificationError(
            f"{precision} ONNX model disagrees with PyTorch: top-1 equal on {agreement:.0%} of {batch} rows, "
            f"need {min_agreement:.0%}"
        )
    return result


def verify_version(version: ModelVersion, model: nn.Module) -> Verification:
    """The export's parity check again, for a committed version and a float32 `model` rebuilt from
    its weights.pt (on the CPU): the same seeded batch, bound and top-1 rule as at export time, so a
    rebuild that matches the exporter's network reproduces `metadata.json`'s `verification`.

    Who rebuilds a network from a version (the gradient workers) runs this before trusting it: a
    module built with other arguments than the exporter's (GoogLeNet's transform_input, say) computes
    another function of the same weights, and this refuses it. Raises VerificationError.
    """
    return verify(version.onnx_path, model, version.input_shape, fp16=version.fp16)


def exporter_versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript

    return {
        "torch": torch.__version__.split("+")[0],
        "onnx": onnx.__version__,
        "onnxscript": str(
            getattr(onnxscript, "__version__", None) or importlib_metadata.version("onnxscript")
        ),
        "onnxruntime": onnxruntime.__version__,
    }


def labels_for(dataset: str, num_classes: int) -> list[str]:
    """Class names for a data set: the digits, or ImageNet's 1000 classes (export/data)."""
    if dataset == "digits":
        labels = [str(d) for d in range(10)]
    elif dataset == "imagenet":
        from importlib import resources

        text = resources.files("export").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
        labels = text.splitlines()
    else:
        raise UsageError(f"no labels for data set {dataset!r}")
    if len(labels) != num_classes:
        raise UsageError(f"{dataset} has {len(labels)} labels but the model has {num_classes} classes")
    return labels


def capabilities(arch: str, model: nn.Module) -> dict[str, bool]:
    """What the service may do with this model.

    explain (guided backprop) needs ReLU modules to hook: with none (LeNet-5 is tanh throughout) it
    would silently be a plain gradient, so it is offered only where the model has nn.ReLU modules.
    dream (DeepDream) and stylize (neural style, VGG-19's feature layers) are per architecture.
    """
    return {
        "classify": True,
        "explain": any(isinstance(m, nn.ReLU) for m in model.modules()),
        "dream": arch in DREAM_ARCHITECTURES,
        "stylize": arch in STYLIZE_ARCHITECTURES,
    }


def _digits_accuracy(path: Path, fp16: bool) -> dict[str, Any]:
    """Held-out accuracy of the exported model itself, run by ONNX Runtime (what the service serves)."""
    from export.digits import SPLIT_DESCRIPTION, load_split

    split = load_split()
    session = _session(path)
    x = split.x_test.astype(np.float16 if fp16 else np.float32)
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    correct = int((logits.argmax(1) == split.y_test).sum())
    return {
        "dataset": "digits",
        "split": f"held-out ({SPLIT_DESCRIPTION})",
        "samples": len(split.y_test),
        "accuracy": round(correct / len(split.y_test), 6),
        "runtime": "onnxruntime CPUExecutionProvider",
    }


def export_to_repository(
    arch: str,
    repository: str | Path,
    *,
    weights: str | Path | None = None,
    model: nn.Module | None = None,
    name: str | None = None,
    version: int | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    trained_on: str | None = None,
    training: dict[str, Any] | None = None,
    build_kwargs: dict[str, Any] | None = None,
    seed: int = RANDOM_WEIGHTS_SEED,
) -> ExportResult:
    """Export architecture `arch` as a new version of model `name` (default: `arch`) in `repository`.

    Weights: `weights` (a checkpoint file, loaded strictly and safely), or an in-memory `model`, or
    neither: random initialization after `torch.manual_seed(seed)`, recorded as untrained.
    `trained_on` defaults to the architecture's data set when weights are given. GoogLeNet loaded
    from a checkpoint is built with transform_input=True as torchvision does for its published
    weights (override with build_kwargs={"transform_input": False}). The version is built in a
    `.tmp-*` directory and renamed into place only after the checker and the ORT parity check pass.
    """
    from export.describe import describe
    from export.models import build, get_spec

    started = time.perf_counter()
    spec = get_spec(arch)
    name = check_name(name or arch)
    if weights is not None and model is not None:
        raise UsageError("give either a checkpoint or an in-memory model, not both")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
    kwargs = dict(build_kwargs or {})
    if arch == "googlenet" and weights is not None:
        kwargs.setdefault("transform_input", True)
    trained = weights is not None or model is not None
    if trained_on is None and trained:
        trained_on = spec.dataset

    # Cheap refusals first (an existing version, an unwritable repository, a bad checkpoint), then
    # the export itself.
    writer = VersionWriter(repository, name, version)
    with writer:
        source_sha256 = None
        if model is None:
            with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
                torch.manual_seed(seed)
                model = build(arch, **kwargs)
            if weights is not None:
                source_sha256 = load_weights(model, weights, arch)
        model = model.eval()
        state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        torch.save(state_dict, writer.path / WEIGHTS_FILE)

        onnx_path = writer.path / ONNX_FILE
        export_onnx(model, spec.input_shape, onnx_path, opset=opset, fp16=fp16)
        check(onnx_path, opset)
        verification = verify(onnx_path, model, spec.input_shape, fp16=fp16)
        evaluation = _digits_accuracy(onnx_path, fp16) if trained and spec.dataset == "digits" else None

        described = describe(arch)
        dtype = "float16" if fp16 else "float32"
        metadata: dict[str, Any] = {
            "schema_version": 1,
            "name": name,
            "version": 0,  # set by commit
            "architecture": arch,
            "input": {
                "name": INPUT_NAME,
                "shape": list(spec.input_shape),
                "dtype": dtype,
                "description": describe_input(spec.preprocessing),
            },
            "output": {"name": OUTPUT_NAME, "shape": [spec.num_classes], "dtype": dtype},
            "num_classes": spec.num_classes,
            "preprocessing": spec.preprocessing.to_dict(),
            "labels": labels_for(spec.dataset, spec.num_classes),
            "trained": trained,
            "trained_on": trained_on if trained else None,
            # What the exported (eval-mode) network computes with: GoogLeNet's aux heads excluded.
            "parameters": int(described["parameters_without_aux"]),
            "flops": int(described["flops"]),
            "fp16": fp16,
            "source_checkpoint_sha256": source_sha256,
            "files": {},  # filled in by commit
            "opset": opset,
            "exporters": exporter_versions(),
            "exported_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "verification": asdict(verification),
            "capabilities": capabilities(arch, model),
            "training": training,
            "evaluation": evaluation,
            "build_kwargs": kwargs,
        }
        committed = writer.commit(metadata)
    onnx_bytes = committed.onnx_path.stat().st_size
    return ExportResult(
        version=committed,
        seconds=time.perf_counter() - started,
        onnx_bytes=onnx_bytes,
        verification=verification,
    )
