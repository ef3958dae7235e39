"""The Open Inference Protocol's REST bodies <-> its protobuf messages.

The REST binding (rest.py) turns an inference request body into the `ModelInferRequest` the gRPC
binding receives, runs the same `OpenInference.model_infer`, and writes its `ModelInferResponse` back
as JSON. Two body forms, as KServe and Triton define them:

* JSON: `{"id", "parameters", "inputs": [{"name", "shape", "datatype", "parameters", "data"}],
  "outputs": [{"name", "parameters"}]}`; `data` flat or nested in row-major order. BYTES elements are
  strings (UTF-8), or `{"b64": "..."}` for binary data such as an encoded image (our extension: JSON
  has no bytes type).
* The binary tensor data extension: the header `Inference-Header-Content-Length: N` says the body's
  first N bytes are the JSON; an input with the parameter `binary_data_size` takes its data from the
  bytes after it, in input order, little-endian, row-major (BYTES: each element's 4-byte length,
  then its bytes). An output is answered in binary when its parameter `binary_data` is true, or when
  the request parameter `binary_data_output` is true and the output does not say otherwise; the
  response then carries the header and `binary_data_size` on those outputs.

Everything a client sent is either used or refused: an unknown key, a malformed tensor, a binary
section that does not add up, each is InvalidArgument naming it (HTTP 400).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import InvalidArgument
from service.frontend.oip import deserialize_bytes, serialize_bytes

from .._proto.inference import grpc_predict_v2_pb2 as pb

HEADER_LENGTH = "inference-header-content-length"
# JSON numbers of each numeric datatype (little-endian, as the binary extension defines them).
NUMERIC: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_REQUEST_KEYS = {"id", "parameters", "inputs", "outputs"}
_INPUT_KEYS = {"name", "shape", "datatype", "parameters", "data"}
_OUTPUT_KEYS = {"name", "parameters"}


@dataclass(frozen=True)
class InferCall:
    """A parsed REST inference request: the gRPC message, which outputs go back in binary, and the
    deadline the client asked for (seconds; None: none)."""

    request: pb.ModelInferRequest
    binary_outputs: frozenset[str]
    binary_by_default: bool
    timeout_s: float | None


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="invalid_argument")


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(the JSON, the binary section after it) of a request body."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.strip().isdecimal():
        raise _invalid(f"Inference-Header-Content-Length must be a byte count, got {header_length!r}")
    length = int(header_length)
    if not 0 < length <= len(body):
        raise _invalid(
            f"Inference-Header-Content-Length is {length}, but the body has {len(body)} bytes; it must be "
            "the length of the JSON at the start of the body"
        )
    return body[:length], memoryview(body)[length:]


def load_json(text: bytes, what: str = "request body") -> Any:
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _invalid(f"{what} is not valid JSON: {exc}") from None


def parse_infer(body: bytes, header_length: str | None, model_name: str, model_version: str) -> InferCall:
    """The request body of POST /v2/models/{model_name}[/versions/{model_version}]/infer."""
    text, binary = split_body(body, header_length)
    document = load_json(text)
    if not isinstance(document, dict):
        raise _invalid("the request body must be a JSON object with an `inputs` list")
    _refuse_unknown(document, _REQUEST_KEYS, "request")
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise _invalid(f"`id` must be a string, got {request_id!r}")
    request.id = _text(request_id, "`id`")
    parameters = _object(document.get("parameters", {}), "`parameters`")
    timeout_s = _timeout(parameters.pop("timeout", None))
    binary_by_default = _flag(parameters.pop("binary_data_output", False), "binary_data_output")
    _set_parameters(request.parameters, parameters, "request")

    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _invalid("`inputs` must be a non-empty list of tensors")
    offset = 0
    for position, tensor in enumerate(inputs):
        raw, offset = _input(request, tensor, position, binary, offset)
        request.raw_input_contents.append(raw)
    if offset != len(binary):
        raise _invalid(
            f"the body has {len(binary)} bytes after the JSON header, but the inputs' binary_data_size "
            f"add up to {offset}"
        )

    binary_outputs = set()
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise _invalid("`outputs` must be a list")
    for position, output in enumerate(outputs):
        output = _object(output, f"outputs[{position}]")
        _refuse_unknown(output, _OUTPUT_KEYS, f"outputs[{position}]")
        name = output.get("name")
        if not isinstance(name, str) or not name:
            raise _invalid(f"outputs[{position}] needs a `name`")
        name = _text(name, f"outputs[{position}].name")
        output_parameters = _object(output.get("parameters", {}), f"outputs[{position}].parameters")
        if _flag(output_parameters.pop("binary_data", binary_by_default), f"output {name!r} binary_data"):
            binary_outputs.add(name)
        requested = request.outputs.add(name=name)
        _set_parameters(requested.parameters, output_parameters, f"output {name!r}")
    return InferCall(request, frozenset(binary_outputs), binary_by_default, timeout_s)


def _input(
    request: pb.ModelInferRequest, tensor: Any, position: int, binary: memoryview, offset: int
) -> tuple[bytes, int]:
    """Add input `position` to the request; returns its raw content and the binary section's new
    offset."""
    where = f"inputs[{position}]"
    tensor = _object(tensor, where)
    _refuse_unknown(tensor, _INPUT_KEYS, where)
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not name:
        raise _invalid(f"{where} needs a `name`")
    where = f"input {_text(name, where + '.name')!r}"
    if not isinstance(datatype, str) or not datatype:
        raise _invalid(f"{where} needs a `datatype` (FP32, FP16 or BYTES)")
    _text(datatype, f"{where} datatype")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
        raise _invalid(f"{where}: `shape` must be a list of non-negative integers, got {shape!r}")
    parameters = _object(tensor.get("parameters", {}), f"{where} parameters")
    size = parameters.pop("binary_data_size", None)
    message = request.inputs.add(name=name, datatype=datatype, shape=shape)
    _set_parameters(message.parameters, parameters, where)
    if size is not None:
        if "data" in tensor:
            raise _invalid(f"{where} has both `data` and binary_data_size; send one")
        if type(size) is not int or size < 0:
            raise _invalid(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
        if offset + size > len(binary):
            raise _invalid(
                f"{where}: binary_data_size {size} runs past the end of the body "
                f"({len(binary) - offset} bytes left after the JSON and the inputs before it)"
            )
        return bytes(binary[offset : offset + size]), offset + size
    if "data" not in tensor:
        raise _invalid(
            f"{where} needs `data`, or the parameter binary_data_size with the data after the JSON"
        )
    return _json_data(tensor["data"], datatype.upper(), shape, where), offset


def _json_data(data: Any, datatype: str, shape: list[int], where: str) -> bytes:
    """A JSON `data` array as the tensor's raw (binary extension) form."""
    if not isinstance(data, list):
        raise _invalid(f"{where}: `data` must be an array")
    count = math.prod(shape)
    if datatype == "BYTES":
        elements = [_bytes_element(e, where) for e in _flatten(data, where)]
        if len(elements) != count:
            raise _invalid(f"{where} has {len(elements)} BYTES elements; shape {shape} needs {count}")
        return serialize_bytes(elements)
    dtype = NUMERIC.get(datatype)
    if dtype is None:
        raise _invalid(f"{where}: unknown datatype {datatype!r}")
    try:
        values = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise _invalid(f"{where}: `data` is not a regular array: {exc}") from None
    kind = "b" if datatype == "BOOL" else "iuf"
    if values.size and values.dtype.kind not in kind:
        raise _invalid(
            f"{where}: `data` of {datatype} must hold only numbers" + (" (true/false)" if kind == "b" else "")
        )
    if values.size != count:
        raise _invalid(f"{where} has {values.size} values in `data`; shape {shape} needs {count}")
    with np.errstate(over="ignore", invalid="ignore"):
        converted = values.astype(dtype)
    if dtype.kind in "iu" and not np.array_equal(converted, values):
        raise _invalid(f"{where}: a value in `data` is not a {datatype}")
    return np.ascontiguousarray(converted).tobytes()


def _flatten(data: list[Any], where: str) -> list[Any]:
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for element in stack[-1]:
            if isinstance(element, list):
                stack.append(iter(element))
                break
            flat.append(element)
        else:
            stack.pop()
    return flat


def _bytes_element(element: Any, where: str) -> bytes:
    if isinstance(element, str):
        return element.encode()
    if isinstance(element, dict) and set(element) == {"b64"} and isinstance(element["b64"], str):
        try:
            return base64.b64decode(element["b64"], validate=True)
        except binascii.Error as exc:
            raise _invalid(f"{where}: an element's b64 is not base64: {exc}") from None
    raise _invalid(f'{where}: a BYTES element must be a string or {{"b64": "<base64>"}}, got {element!r}')


def _text(value: str, where: str) -> str:
    """`value` if protobuf can hold it: JSON escapes can spell lone surrogates, which UTF-8 cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(f"{where} is not valid Unicode (a lone surrogate)") from None
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be a JSON object, got {value!r}")
    return dict(value)


def _refuse_unknown(document: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(document) - known)
    if unknown:
        raise _invalid(
            f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}"
        )


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise _invalid(f"{name} must be true or false, got {value!r}")
    return value


def _timeout(value: Any) -> float | None:
    """Triton's `timeout` request parameter: microseconds."""
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise _invalid(f"the timeout parameter is in microseconds, a non-negative integer; got {value!r}")
    return value / 1e6


def _set_parameters(target: Any, parameters: Mapping[str, Any], where: str) -> None:
    """JSON parameters into a protobuf map of InferParameter."""
    for key, value in parameters.items():
        _text(key, f"{where} parameter name")
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise _invalid(f"{where} parameter {key!r}: {value} does not fit in an int64")
            target[key].int64_param = value
        elif isinstance(value, str):
            target[key].string_param = _text(value, f"{where} parameter {key!r}")
        elif isinstance(value, float):
            target[key].double_param = value
        else:
            raise _invalid(f"{where} parameter {key!r} must be a string, number or boolean, got {value!r}")


def _parameters_json(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(parameter, choice)
    return out


def render_infer(response: pb.ModelInferResponse, call: InferCall) -> tuple[bytes, int | None]:
    """(the body, the JSON header's length when a binary section follows it, else None)."""
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    parameters = _parameters_json(response.parameters)
    if parameters:
        document["parameters"] = parameters
    outputs = []
    sections: list[bytes] = []
    # No outputs named: every output, binary as binary_data_output says.
    named = {output.name for output in call.request.outputs}
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        rendered: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        binary = output.name in call.binary_outputs or (output.name not in named and call.binary_by_default)
        if binary:
            rendered["parameters"] = {"binary_data_size": len(raw)}
            sections.append(raw)
        else:
            rendered["data"] = _data_json(raw, output.datatype)
        outputs.append(rendered)
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    if not sections:
        return header, None
    return b"".join([header, *sections]), len(header)


def _data_json(raw: bytes, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [element.decode("utf-8", "replace") for element in deserialize_bytes(raw)]
    values: list[Any] = np.frombuffer(raw, dtype=NUMERIC[datatype]).tolist()
    return values


def metadata_json(response: pb.ModelMetadataResponse) -> dict[str, Any]:
    def tensors(items: Sequence[pb.ModelMetadataResponse.TensorMetadata]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": response.name,
        "versions": list(response.versions),
        "platform": response.platform,
        "inputs": tensors(response.inputs),
        "outputs": tensors(response.outputs),
    }
