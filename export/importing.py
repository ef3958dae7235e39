"""`python -m export import MODEL.onnx`: an image classifier that is already ONNX (from timm, Keras, a
vendor, or any exporter) as a new version in the model repository, served like every other.

What is checked, in this order, before anything is written (each refusal names the problem):

1. External data: every tensor whose data lies outside the .onnx file must name a relative
   location with no `..`, no absolute path and no symlink on the way, resolving to a regular file
   inside the model's folder; otherwise the import (and onnx.checker, which would read it) stops.
2. `onnx.checker.check_model(full_check=True)`: a valid graph, strict shape inference.
3. The interface: exactly one graph input (initializers aside), a float32 or float16 tensor of rank
   4, images NCHW or NHWC (auto-detected from where the 1 or 3 channels are, or `--layout`); its
   channels, and its height and width where they are fixed, must be what the preprocessing gives.
   The logits: the graph's one output (or `--output NAME` among several), [batch, classes], the
   input's dtype. An optional embedding output (`--features-output NAME`), [batch, D].
4. The batch axis: a symbolic first dimension is kept. A fixed 1 (many exporters' default) is
   rewritten to a symbolic "batch" on the input and the outputs, and the rewritten graph must then
   run a batch of 2 whose rows equal the rows run alone (step 6): a graph that bakes the 1 into a
   Reshape fails there and is refused, rather than served wrongly. Rewriting rather than refusing,
   because a fixed 1 is usually only how the file was saved, and the batcher needs batches. Any
   other fixed batch size, or no batch axis at all (rank 3), is refused.
5. A final Softmax on the logits output becomes an Identity (the service applies softmax itself;
   twice would flatten the probabilities), recorded as `imported.softmax_dropped`. NHWC graphs get
   a Transpose in front of their input, so the served input is NCHW like every model here (the
   service's decode path and the OIP/KServe tensors speak NCHW); metadata.json's `imported.layout`
   records the original layout.
6. A smoke inference with ONNX Runtime (CPU): a seeded batch of 2 gives finite [2, classes] logits,
   equal within the export's bound to each row run alone; the labels count must equal the classes.

The version then holds model.onnx (and model.onnx.data when the source kept external data: its
tensors are copied there, one file, never referenced in place) and metadata.json, every file hashed
by `VersionWriter.commit`, built in a `.tmp-*` directory and renamed into place like every export.
It has no weights.pt: there is no PyTorch module, so metadata.json's capabilities offer classify
(and embed when a features output was named) and none of the gradient RPCs, and `imported` marks
it (the service says "imported ONNX model: no PyTorch module" to those RPCs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from export.errors import UsageError, VerificationError
from export.external_data import UnsafeLocation, confined_file
from export.metadata import IMPORTED_ARCHITECTURE, ONNX_FILE
from export.preprocessing import Preprocessing, describe_input
from export.repository import ModelVersion, VersionWriter, check_name, sha256_file
from export.tolerances import FP16_MAX_RELATIVE_DIFF, FP32_MAX_RELATIVE_DIFF
from export.user_files import check_label_count

log = logging.getLogger(__name__)

EXTERNAL_DATA_FILE = ONNX_FILE + ".data"
LAYOUTS = ("auto", "NCHW", "NHWC")
BATCH_DIM = "batch"
SMOKE_BATCH = 2
SMOKE_SEED = 0
_DTYPES: dict[int, str] = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}


@dataclass(frozen=True)
class ImportResult:
    version: ModelVersion
    seconds: float
    onnx_bytes: int  # model.onnx plus its external data, if any
    layout: str
    batch: str  # what was done to the batch axis


def _refuse(source: Path, why: str) -> VerificationError:
    return VerificationError(f"cannot import {source.name}: {why}")


# --- 1. external data ----------------------------------------------------------------------------


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[TensorProto]:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield attribute.sparse_tensor.values
                yield attribute.sparse_tensor.indices
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graph_tensors(subgraph)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every TensorProto a graph holds: initializers, sparse ones, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _model_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of the model: its graph, its local functions, its training info. (The
    server checks them all again at load, from the wire format: service/engine/onnx_wire.py.)"""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)
    for info in model.training_info:
        yield from _graph_tensors(info.initialization)
        yield from _graph_tensors(info.algorithm)


def _external_location(tensor: TensorProto) -> str | None:
    entries = {str(e.key): str(e.value) for e in tensor.external_data}
    if tensor.data_location != TensorProto.EXTERNAL and not entries:
        return None
    return entries.get("location", "")


def confined_external_data(source: Path, model: onnx.ModelProto) -> dict[str, Path]:
    """{location: file} of every external data file `model` (loaded from `source` without its
    external data) references; VerificationError for one that could read outside source's folder."""
    folder = source.resolve().parent
    found: dict[str, Path] = {}
    for tensor in _model_tensors(model):
        location = _external_location(tensor)
        if location is None or location in found:
            continue
        try:
            found[location] = confined_file(folder, location)
        except UnsafeLocation as why:
            raise _refuse(
                source,
                f"tensor {tensor.name!r} keeps its data in {location!r}, {why}; external data must be a "
                "plain file inside the model's folder",
            ) from None
    return found


# --- 2.-4. the graph -----------------------------------------------------------------------------


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """A tensor's dims: an int (fixed), a str (symbolic) or None (unknown)."""
    dims: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _tensor_kind(value: onnx.ValueInfoProto) -> str:
    """ "float32"/"float16", or what else it is, for messages."""
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"sequence_type": "a sequence", "map_type": "a map", "optional_type": "an optional"}.get(
            str(kind), f"a {kind}"
        )
    elem = int(value.type.tensor_type.elem_type)
    return _DTYPES.get(elem) or f"a {TensorProto.DataType.Name(elem).lower()} tensor"


def _layout(source: Path, dims: list[int | str | None], layout: str, channels: int) -> str:
    """NCHW or NHWC for an input of rank 4 (`layout` "auto": where the 1 or 3 channels are)."""
    first, last = dims[1] in (1, 3), dims[3] in (1, 3)
    if layout == "auto":
        if first == last:
            raise _refuse(
                source,
                f"cannot tell whether its input {dims} is NCHW or NHWC; say --layout NCHW or --layout NHWC",
            )
        layout = "NCHW" if first else "NHWC"
    c, h, w = (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
    if c != channels:
        raise _refuse(
            source,
            f"its input {dims} ({layout}) has {c} channels but the preprocessing gives {channels} "
            "(color_mode RGB: 3, L: 1)",
        )
    return layout


def _check_size(source: Path, dims: list[int | str | None], layout: str, crop: int) -> None:
    h, w = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    for what, size in (("height", h), ("width", w)):
        if isinstance(size, int) and size != crop:
            raise _refuse(
                source,
                f"its input {dims} ({layout}) has {what} {size} but the preprocessing crops {crop}x{crop}; "
                f"set crop (and resize) to {size}",
            )


def _one_input(source: Path, graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise _refuse(
            source, f"it has {len(inputs)} inputs {names}; an image classifier takes exactly one (the images)"
        )
    value: onnx.ValueInfoProto = inputs[0]
    kind = _tensor_kind(value)
    if kind not in _DTYPES.values():
        raise _refuse(
            source,
            f"its input {value.name!r} is {kind}; an image classifier takes one float32 or float16 tensor",
        )
    dims = _dims(value)
    if len(dims) == 3:
        raise _refuse(
            source,
            f"its input {value.name!r} {dims} has no batch axis; export it with a leading batch dimension "
            "[batch, C, H, W] (or [batch, H, W, C])",
        )
    if len(dims) != 4:
        raise _refuse(
            source, f"its input {value.name!r} has rank {len(dims)} {dims}; images are [batch, C, H, W]"
        )
    return value


def _output(
    source: Path, graph: onnx.GraphProto, name: str | None, what: str, dtype: str
) -> onnx.ValueInfoProto:
    outputs = {o.name: o for o in graph.output}
    if name is None:
        if len(outputs) != 1:
            raise _refuse(
                source, f"it has {len(outputs)} outputs {list(outputs)}; name the logits with --output NAME"
            )
        name = next(iter(outputs))
    if name not in outputs:
        raise _refuse(source, f"it has no output {name!r} (its outputs: {list(outputs)})")
    value: onnx.ValueInfoProto = outputs[name]
    kind = _tensor_kind(value)
    if kind != dtype:
        raise _refuse(source, f"its {what} output {name!r} is {kind}, not {dtype} like its input")
    dims = _dims(value)
    if len(dims) != 2:
        raise _refuse(source, f"its {what} output {name!r} has shape {dims}; expected [batch, {what}]")
    return value


def _make_batch_dynamic(source: Path, graph: onnx.GraphProto, values: list[onnx.ValueInfoProto]) -> str:
    """Give `values` (the input, then the outputs) a symbolic first dimension; what was done."""
    first = _dims(values[0])[0]
    if isinstance(first, int) and first != 1:
        raise _refuse(
            source,
            f"its input {values[0].name!r} has a fixed batch size {first}; export it with a dynamic "
            "batch dimension (or batch 1, which is made dynamic here)",
        )
    done = (
        "dynamic"
        if isinstance(first, str)
        else "made dynamic (was fixed 1)"
        if first == 1
        else "made symbolic"
    )
    for value in values:
        dim = value.type.tensor_type.shape.dim[0]
        if dim.HasField("dim_param"):
            continue
        if dim.HasField("dim_value") and dim.dim_value != 1:
            raise _refuse(source, f"its output {value.name!r} has a fixed batch size {dim.dim_value}")
        dim.dim_param = BATCH_DIM
    if done != "dynamic":
        # Intermediate shapes inferred for batch 1 would contradict the new axis: let ORT infer them.
        del graph.value_info[:]
    return done


def _drop_final_softmax(graph: onnx.GraphProto, logits: str) -> bool:
    """Turn a Softmax that produces the logits output into an Identity: the service applies softmax
    itself (ClassScore.probability), and softmax of probabilities would flatten every answer towards
    uniform (the ranking survives, the numbers do not). Keras and many vendors end in one."""
    for node in graph.node:
        if list(node.output) == [logits] and node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            if axis in (None, 1, -1):  # the class axis of [batch, classes] in every opset's default
                node.op_type = "Identity"
                del node.attribute[:]
                return True
    return False


def _transposed_input(graph: onnx.GraphProto, value: onnx.ValueInfoProto) -> str:
    """Put a Transpose NCHW -> NHWC in front of the NHWC input `value`; returns the new input's name."""
    taken = {v.name for v in (*graph.input, *graph.output, *graph.value_info)} | {
        out for node in graph.node for out in node.output
    }
    name = "input" if "input" not in taken else f"{value.name}_nchw"
    n, h, w, c = value.type.tensor_type.shape.dim
    new = onnx.helper.make_tensor_value_info(name, value.type.tensor_type.elem_type, None)
    for d in (n, c, h, w):
        new.type.tensor_type.shape.dim.add().CopyFrom(d)
    node = onnx.helper.make_node("Transpose", [name], [value.name], perm=[0, 2, 3, 1], name=f"{name}_to_nhwc")
    graph.node.insert(0, node)
    position = list(graph.input).index(value)
    graph.input.remove(value)
    graph.input.insert(position, new)
    return name


# --- 6. the smoke inference ----------------------------------------------------------------------


def _smoke(
    source: Path, path: Path, input_name: str, outputs: list[str], shape: tuple[int, int, int], dtype: str
) -> tuple[int, dict[str, Any]]:
    """Run the saved graph on a seeded batch and on each row alone. Returns (classes, verification)."""
    from export.onnx_export import ort_session

    try:
        session = ort_session(path)
    except Exception as e:  # ORT's own error types
        raise _refuse(source, f"ONNX Runtime cannot load it: {' '.join(str(e).split())[:300]}") from None
    np_dtype = np.float16 if dtype == "float16" else np.float32
    x = np.random.default_rng(SMOKE_SEED).standard_normal((SMOKE_BATCH, *shape)).astype(np_dtype)
    try:
        batch = session.run(outputs, {input_name: x})
        rows = [session.run(outputs, {input_name: x[i : i + 1]}) for i in range(SMOKE_BATCH)]
    except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidArgument/RuntimeException
        raise _refuse(
            source,
            f"ONNX Runtime cannot run it on a batch of {SMOKE_BATCH} {list(shape)} images: "
            f"{' '.join(str(e).split())[:300]}",
        ) from None
    for name, got in zip(outputs, batch, strict=True):
        if got.ndim != 2 or got.shape[0] != SMOKE_BATCH:
            raise _refuse(
                source,
                f"its output {name!r} is {list(got.shape)} for a batch of {SMOKE_BATCH}, not [batch, n]",
            )
        if not np.isfinite(got).all():
            raise _refuse(source, f"its output {name!r} is not finite on a normal random input")
    logits = batch[0].astype(np.float64)
    alone = np.concatenate([r[0] for r in rows]).astype(np.float64)
    max_abs = float(np.abs(logits - alone).max())
    scale = float(np.abs(alone).max())
    relative = max_abs / scale if scale > 0 else 0.0
    bound = FP16_MAX_RELATIVE_DIFF if dtype == "float16" else FP32_MAX_RELATIVE_DIFF
    if relative > bound:
        raise _refuse(
            source,
            f"a batch of {SMOKE_BATCH} gives other logits than its rows alone (relative diff "
            f"{relative:.3g} > {bound:g}): the graph does not treat its first dimension as a batch",
        )
    verification = {
        "batch": SMOKE_BATCH,
        "max_abs_diff": max_abs,
        "relative_diff": relative,
        "top1_equal": bool((logits.argmax(1) == alone.argmax(1)).all()),
        "max_relative_diff": bound,
        "reference": "onnxruntime, each row run alone (batch 1)",
        "provider": session.get_providers()[0],
    }
    return int(batch[0].shape[1]), verification


# --- the import ----------------------------------------------------------------------------------


def _load(source: Path) -> onnx.ModelProto:
    if not source.is_file():
        raise UsageError(f"{source} does not exist or is not a file")
    try:
        return onnx.load(str(source), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise _refuse(
            source, f"it is not an ONNX model ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None


def _check(source: Path, path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise _refuse(source, f"onnx.checker refuses it: {' '.join(str(e).split())[:300]}") from None


def _parameters(graph: onnx.GraphProto) -> int:
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in graph.initializer)


def import_onnx(
    source: str | Path,
    repository: str | Path,
    *,
    name: str,
    labels: list[str],
    preprocessing: Preprocessing,
    labels_source: str = "--labels",
    version: int | None = None,
    layout: str = "auto",
    output: str | None = None,
    features_output: str | None = None,
    trained_on: str | None = None,
) -> ImportResult:
    """Import the ONNX image classifier `source` as a new version of model `name` in `repository`
    (see the module docstring for what is checked and written). Raises VerificationError for a graph
    that cannot be served, UsageError for labels or preprocessing that do not fit it, RepositoryError
    for the repository; nothing is written then."""
    started = time.perf_counter()
    source = Path(source)
    check_name(name)
    if layout not in LAYOUTS:
        raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    model = _load(source)
    external = confined_external_data(source, model)
    _check(source, source)  # reads the external data, which is confined now

    graph = model.graph
    value = _one_input(source, graph)
    dtype = _tensor_kind(value)
    dims = _dims(value)
    layout = _layout(source, dims, layout, preprocessing.channels)
    _check_size(source, dims, layout, preprocessing.crop)
    logits = _output(source, graph, output, "classes", dtype)
    features = _output(source, graph, features_output, "features", dtype) if features_output else None
    if features is not None and features.name == logits.name:
        raise UsageError("--features-output names the logits output; name the embedding output")
    classes = _dims(logits)[1]
    if isinstance(classes, int):  # known now: refuse before any file is written
        check_label_count(labels, classes, labels_source)
    batch = _make_batch_dynamic(source, graph, [value, logits, *([features] if features else [])])
    softmax_dropped = _drop_final_softmax(graph, logits.name)
    input_name = _transposed_input(graph, value) if layout == "NHWC" else value.name
    shape = (preprocessing.channels, preprocessing.crop, preprocessing.crop)
    producer = " ".join(filter(None, [model.producer_name, model.producer_version])) or "unknown"
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    source_sha256 = sha256_file(source)
    external_sha256 = {location: sha256_file(path) for location, path in sorted(external.items())}

    writer = VersionWriter(repository, name, version)
    with writer:
        target = writer.path / ONNX_FILE
        if external:
            # The tensors in place, then saved beside the graph in one file of the version's own.
            onnx.external_data_helper.load_external_data_for_model(model, str(source.resolve().parent))
            onnx.save_model(
                model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                location=EXTERNAL_DATA_FILE, size_threshold=0,
            )  # fmt: skip
        else:
            onnx.save_model(model, str(target))
        del model
        _check(source, target)
        outputs = [logits.name, *([features.name] if features else [])]
        num_classes, verification = _smoke(source, target, input_name, outputs, shape, dtype)
        check_label_count(labels, num_classes, labels_source)
        feature_dim = int(_dims(features)[1] or 0) if features is not None else 0
        if features is not None and not feature_dim:
            feature_dim = _smoke_features_dim(target, input_name, features.name, shape, dtype)
        saved = onnx.load(str(target), load_external_data=False)
        metadata: dict[str, Any] = {
            "schema_version": 1,
            "name": name,
            "version": 0,  # set by commit
            "architecture": IMPORTED_ARCHITECTURE,
            "input": {
                "name": input_name,
                "shape": list(shape),
                "dtype": dtype,
                "description": describe_input(preprocessing),
            },
            "output": {"name": logits.name, "shape": [num_classes], "dtype": dtype},
            **(
                {"features": {"name": features.name, "shape": [feature_dim], "dtype": dtype, "layer": None}}
                if features is not None
                else {}
            ),
            # No PyTorch module: no layer a gradient RPC could name (GetModel lists none).
            "layers": [],
            "num_classes": num_classes,
            "preprocessing": preprocessing.to_dict(),
            "labels": labels,
            "trained": True,
            "trained_on": trained_on,
            "parameters": _parameters(saved.graph),
            "flops": 0,  # not measured: the graph's operators are not the zoo's modules
            "fp16": dtype == "float16",
            "source_checkpoint_sha256": None,
            "files": {},  # filled in by commit
            "opset": opset or 1,
            "exporters": _versions(producer),
            "exported_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "verification": verification,
            "capabilities": {
                "classify": True,
                "embed": features is not None,
                "explain": False,
                "dream": False,
                "stylize": False,
                "feature_maps": False,
                "filters": False,
            },
            # What marks an import (export.metadata.is_imported): where it came from, what was done.
            "imported": {
                "source_file": source.name,
                "source_sha256": source_sha256,
                "external_data_sha256": external_sha256,
                "producer": producer,
                "layout": layout,
                "batch": batch,
                # A final Softmax on the logits output, made an Identity (_drop_final_softmax).
                "softmax_dropped": softmax_dropped,
            },
            "training": None,
            "evaluation": None,
            "initialization": None,
            "build_kwargs": {},
        }
        del saved
        committed = writer.commit(metadata)
    files = committed.metadata["files"]
    return ImportResult(
        version=committed,
        seconds=time.perf_counter() - started,
        onnx_bytes=sum(int(entry["bytes"]) for entry in files.values()),
        layout=layout,
        batch=batch,
    )


def _smoke_features_dim(
    path: Path, input_name: str, output: str, shape: tuple[int, int, int], dtype: str
) -> int:
    from export.onnx_export import ort_session

    x = np.zeros((1, *shape), dtype=np.float16 if dtype == "float16" else np.float32)
    (got,) = ort_session(path).run([output], {input_name: x})
    return int(got.shape[1])


def _versions(producer: str) -> dict[str, str]:
    import onnxruntime

    return {"producer": producer, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


__all__ = ["EXTERNAL_DATA_FILE", "LAYOUTS", "ImportResult", "confined_external_data", "import_onnx"]
