"""PyTorch -> ONNX: export, check, verify against PyTorch with ONNX Runtime (export.publish writes
the result as a repository version).

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript), the maintained path;
the TorchScript exporter is deprecated. With a `torch.export.Dim` on the batch axis it gives every
architecture here a symbolic batch dimension ("batch"), and with `external_data=False` one
self-contained .onnx file (vgg19, the largest, is about 550 MB, under protobuf's 2 GB limit). Should
an exporter still write external data, the model is re-saved inline before anything else looks at it.

Every zoo network is exported with two outputs from one graph: "logits" [batch, classes] and
"features" [batch, D], the input of its final classifier layer (export.layers: the embedding). The
service serves both from one ONNX Runtime call. A model exported before this (one output) still
loads; it just has no embedding.

Every export is then:
1. `onnx.checker.check_model(path, full_check=True)` (full_check runs strict shape inference);
2. run with ONNX Runtime's CPUExecutionProvider on a seeded batch of `VERIFY_BATCH` N(0, 1) inputs
   and compared with the float32 PyTorch model on the same inputs:
   max_abs_diff = max |ort - torch|, relative_diff = max_abs_diff / max |torch|, for the logits
   and, with the same bound, for the features (features_relative_diff).
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
A model that fails either step is refused with VerificationError.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export.errors import UsageError, VerificationError
from export.layers import FEATURES_NAME, features_and_logits
from export.repository import ModelVersion

# The bounds are shared with the engine's fp16-at-load check.
from export.tolerances import (
    FP16_MAX,
    FP16_MAX_RELATIVE_DIFF,
    FP16_MIN_TOP1_AGREEMENT,
    FP16_SMALLEST_NORMAL,
    FP32_MAX_RELATIVE_DIFF,
    VERIFY_BATCH,
    VERIFY_SEED,
)

DEFAULT_OPSET = 18
MIN_OPSET = 17
MAX_OPSET = 23
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
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
    # The features output against PyTorch's penultimate activations, same bound (None: no features).
    features_max_abs_diff: float | None = None
    features_relative_diff: float | None = None


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


def check_opset(opset: int) -> None:
    """UsageError unless this exporter supports ONNX opset `opset`."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")


def export_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    head: str | None = None,
) -> None:
    """Export eval-mode `model` to one self-contained ONNX file at `path`.

    Input "input" [batch, *input_shape], output "logits" [batch, classes]; batch is symbolic. With
    `head` (the final classifier layer's module path, ArchSpec.head) a second output "features"
    [batch, D], the head's input, from the same graph. With `fp16` the weights, input and outputs
    are float16 (the model is converted on a copy).
    """
    path = Path(path)
    check_opset(opset)
    if fp16:
        model = _half_copy(model)
    dtype = torch.float16 if fp16 else torch.float32
    # Batch 2 for tracing: torch.export specializes a dimension that is 1 in the example input.
    example = torch.zeros(2, *input_shape, dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with contextlib.ExitStack() as stack:
        network: nn.Module = model.eval()
        if head is not None:
            network = stack.enter_context(features_and_logits(network, head))
        _trace(network, example, batch, path, opset, output_names(head is not None))
    _inline_external_data(path)


def output_names(features: bool) -> list[str]:
    """The exported outputs, in order."""
    return [OUTPUT_NAME, FEATURES_NAME] if features else [OUTPUT_NAME]


def _trace(
    network: nn.Module, example: torch.Tensor, batch: Any, path: Path, opset: int, outputs: list[str]
) -> None:
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                network,
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # the exporter's own errors are many and multi-line
        first = " ".join(str(e).split())[:300]
        raise VerificationError(f"ONNX export failed: {type(e).__name__}: {first}") from e


def _half_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).half().eval()


def check(path: Path, opset: int | None = None, *, features: bool = False) -> None:
    """onnx.checker with full_check (strict shape inference) plus our interface contract: one input
    "input", and the outputs "logits" (then "features" when `features`)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = " ".join(str(e).split())[:300]
        raise VerificationError(f"{path.name} fails onnx.checker: {first}") from None
    model_proto = onnx.load(str(path), load_external_data=False)
    graph = model_proto.graph
    inputs = [i.name for i in graph.input if i.name not in {init.name for init in graph.initializer}]
    outputs = [o.name for o in graph.output]
    expected = output_names(features)
    if inputs != [INPUT_NAME] or outputs != expected:
        raise VerificationError(
            f"{path.name} has inputs {inputs} and outputs {outputs}; expected [{INPUT_NAME!r}] and {expected}"
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


def ort_session(path: Path) -> Any:
    """An ONNX Runtime session for `path` on the CPUExecutionProvider (what verify runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings about inserted casts are expected
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _run_onnx(
    session: Any, path: Path, x: np.ndarray, fp16: bool, shapes: dict[str, tuple[int, ...]]
) -> list[np.ndarray]:
    """The ONNX model's outputs named in `shapes` for float32 input `x` (cast to float16 for an fp16
    model), each refused unless it has its shape and the model's dtype."""
    feed = x.astype(np.float16 if fp16 else np.float32)
    try:
        outputs = session.run(list(shapes), {INPUT_NAME: feed})
    except Exception as e:  # ORT raises its own Fail/InvalidArgument/NotImplemented types
        raise VerificationError(
            f"ONNX Runtime cannot run {path.name}: {' '.join(str(e).split())[:300]}"
        ) from None
    expected_dtype = np.float16 if fp16 else np.float32
    for (name, shape), got in zip(shapes.items(), outputs, strict=True):
        if got.shape != shape or got.dtype != expected_dtype:
            raise VerificationError(
                f"{path.name} returned {got.dtype} {list(got.shape)} as {name!r}, expected "
                f"{np.dtype(expected_dtype)} {list(shape)}"
            )
    return [np.asarray(got) for got in outputs]


def _relative(got: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max |got - reference|, that over max |reference|)."""
    max_abs = float(np.abs(got - reference).max())
    scale = float(np.abs(reference).max())
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")))


def _refuse_outside_bounds(result: Verification, scale: float, fp16: bool) -> None:
    """VerificationError unless `result` meets its bounds (and float16 can represent logits of
    magnitude `scale`)."""
    precision = "float16" if fp16 else "float32"
    if fp16 and scale < FP16_SMALLEST_NORMAL:
        raise VerificationError(
            f"float16 export is meaningless for these weights: the logits' magnitude {scale:.3g} is below "
            f"float16's smallest normal number {FP16_SMALLEST_NORMAL:.3g}"
        )
    relative, bound = result.relative_diff, result.max_relative_diff
    if not relative <= bound:
        raise VerificationError(
            f"{precision} ONNX model disagrees with PyTorch: relative diff {relative:.3g} > {bound:g} "
            f"(max abs diff {result.max_abs_diff:.3g})"
        )
    features = result.features_relative_diff
    if features is not None and not features <= bound:
        raise VerificationError(
            f"{precision} ONNX model's features disagree with PyTorch's penultimate activations: "
            f"relative diff {features:.3g} > {bound:g} (max abs diff {result.features_max_abs_diff:.3g})"
        )
    agreement, min_agreement = result.top1_agreement, result.min_top1_agreement
    if agreement < min_agreement:
        raise VerificationError(
            f"{precision} ONNX model disagrees with PyTorch: top-1 equal on {agreement:.0%} of "
            f"{result.batch} rows, need {min_agreement:.0%}"
        )


def verify(
    path: Path,
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    fp16: bool = False,
    head: str | None = None,
    batch: int = VERIFY_BATCH,
    seed: int = VERIFY_SEED,
) -> Verification:
    """Run the ONNX model and the float32 PyTorch `model` on the same seeded batch; compare the
    logits, and with `head` (the model was exported with it) the features, each against the bound.

    Raises VerificationError when the bound for the model's precision (module docstring) is missed.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_shape, generator=generator)
    with contextlib.ExitStack() as stack, torch.no_grad():
        network: nn.Module = model.eval()
        if head is not None:
            network = stack.enter_context(features_and_logits(network, head))
        out = network(x)
        references = [t.double().numpy() for t in (out if head is not None else (out,))]
    reference = references[0]
    shapes = dict(zip(output_names(head is not None), (r.shape for r in references), strict=True))
    session = ort_session(path)
    got = [g.astype(np.float64) for g in _run_onnx(session, path, x.numpy(), fp16, shapes)]
    got64 = got[0]
    scale = float(np.abs(reference).max())
    if not all(np.isfinite(g).all() for g in got):
        if fp16 and scale > FP16_MAX:
            raise VerificationError(
                f"float16 export is meaningless for these weights: the logits reach {scale:.3g}, beyond "
                f"float16's largest number {FP16_MAX:.0f}"
            )
        raise VerificationError(f"{path.name} produced non-finite outputs where PyTorch's are finite")
    max_abs, relative = _relative(got64, reference)
    agreement = float((got64.argmax(1) == reference.argmax(1)).mean())
    bound, min_agreement = (
        (FP16_MAX_RELATIVE_DIFF, FP16_MIN_TOP1_AGREEMENT) if fp16 else (FP32_MAX_RELATIVE_DIFF, 1.0)
    )
    features_abs, features_relative = _relative(got[1], references[1]) if head is not None else (None, None)
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
        features_max_abs_diff=features_abs,
        features_relative_diff=features_relative,
    )
    _refuse_outside_bounds(result, scale, fp16)
    return result


def verify_version(version: ModelVersion, model: nn.Module) -> Verification:
    """The export's parity check again, for a committed version and a float32 `model` rebuilt from
    its weights.pt (on the CPU): the same seeded batch, bound and top-1 rule as at export time, so a
    rebuild that matches the exporter's network reproduces `metadata.json`'s `verification`.

    Who rebuilds a network from a version (the gradient workers) runs this before trusting it: a
    module built with other arguments than the exporter's (GoogLeNet's transform_input, say) computes
    another function of the same weights, and this refuses it. Raises VerificationError.
    """
    head = _head(version) if version.metadata.get("features") else None
    return verify(version.onnx_path, model, version.input_shape, fp16=version.fp16, head=head)


def _head(version: ModelVersion) -> str:
    from export.models import get_spec

    return get_spec(version.architecture).head


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


def capabilities(arch: str, model: nn.Module) -> dict[str, bool]:
    """What the service may do with this model.

    embed: every export has the features output (export_onnx with the architecture's head).
    feature_maps and filters need only the PyTorch weights (filters: a convolution to show).
    explain (guided backprop) needs ReLU modules to hook: with none (LeNet-5 is tanh throughout) it
    would silently be a plain gradient, so it is offered only where the model has nn.ReLU modules.
    dream (DeepDream) and stylize (neural style, VGG-19's feature layers) are per architecture.
    """
    return {
        "classify": True,
        "embed": True,
        "explain": any(isinstance(m, nn.ReLU) for m in model.modules()),
        "dream": arch in DREAM_ARCHITECTURES,
        "stylize": arch in STYLIZE_ARCHITECTURES,
        "feature_maps": True,
        "filters": any(isinstance(m, nn.Conv2d) for m in model.modules()),
    }
