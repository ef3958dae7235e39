"""An ONNX file's tensors as far as the external-data check needs them, without reading their data.

`onnx.load(path, load_external_data=False)` reads the whole file and parses every weight into a
ModelProto only for the check to look at a few fields of each TensorProto: for VGG-19's 550 MB
model.onnx that took 0.67 s and peaked at 1.15 GB more memory, on every start (2 cores, issue 13).
This walks the protobuf wire format over a read-only mmap of the file instead and skips every
field that cannot lead to a TensorProto by its length, so the weights' pages are never read.

Which fields lead to a TensorProto comes from onnx's own message descriptors (every field, at any
depth, whose message type can hold a TensorProto: initializers, node attributes, subgraphs, sparse
tensors, functions, training info), not from a hand-kept list. Each TensorProto found is parsed by
protobuf itself from its `name`, `external_data` and `data_location` fields alone, so what the
check reads means what it means to any protobuf reader. Where a parser would merge repeated
occurrences of a singular field, each occurrence is returned on its own: every location a merged
tensor could name is checked. A file that is not valid wire format raises WireError.
"""

from __future__ import annotations

import functools
import mmap
import os
from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor
from onnx import ModelProto, TensorProto

# protobuf's own default recursion limit: a deeper file is refused rather than walked.
MAX_DEPTH = 100
_TENSOR = TensorProto.DESCRIPTOR.full_name
# The TensorProto fields the external-data check reads.
_TENSOR_FIELDS = frozenset(
    TensorProto.DESCRIPTOR.fields_by_name[name].number for name in ("name", "external_data", "data_location")
)
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5

# Per message type (full name): field number -> the message type (full name) of each field that can
# lead to a TensorProto.
Routes = dict[str, dict[int, str]]


class WireError(ValueError):
    """The file is not a valid protobuf encoding (or nests deeper than MAX_DEPTH)."""


@functools.cache
def _routes() -> Routes:
    reachable: dict[str, Descriptor] = {}
    stack = [ModelProto.DESCRIPTOR]
    while stack:
        message = stack.pop()
        if message.full_name not in reachable:
            reachable[message.full_name] = message
            stack.extend(f.message_type for f in message.fields if f.message_type is not None)
    holds = {_TENSOR}  # message types that can hold a TensorProto, at any depth
    grown = True
    while grown:
        grown = False
        for name, message in reachable.items():
            if name not in holds and any(
                f.message_type is not None and f.message_type.full_name in holds for f in message.fields
            ):
                holds.add(name)
                grown = True
    return {
        name: {
            f.number: f.message_type.full_name
            for f in message.fields
            if f.message_type is not None and f.message_type.full_name in holds
        }
        for name, message in reachable.items()
        if name in holds
    }


def tensors(path: str | os.PathLike[str]) -> list[TensorProto]:
    """Every TensorProto in the ONNX file at `path` (initializers, attributes, subgraphs, sparse
    tensors, functions), each with only its name, external_data and data_location. Raises OSError
    when the file cannot be read, WireError when it is not a protobuf encoding."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return []  # an empty ModelProto: no tensors (mmap refuses empty files)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            view = memoryview(data)
            try:
                return list(_walk(view, 0, len(view), ModelProto.DESCRIPTOR.full_name, 0))
            finally:
                view.release()


def _walk(data: memoryview, start: int, end: int, message: str, depth: int) -> Iterator[TensorProto]:
    if depth > MAX_DEPTH:
        raise WireError(f"messages nested more than {MAX_DEPTH} deep")
    routes = _routes()[message]
    for number, wire, value_start, value_end in _fields(data, start, end):
        target = routes.get(number)
        if target is None or wire != _LENGTH:
            continue  # cannot hold a tensor (a message with another wire type is an unknown field)
        if target == _TENSOR:
            yield _tensor(data, value_start, value_end)
        else:
            yield from _walk(data, value_start, value_end, target, depth + 1)


def _tensor(data: memoryview, start: int, end: int) -> TensorProto:
    """The TensorProto encoded in data[start:end], parsed from the fields the check reads only (a
    protobuf message is the concatenation of its fields, in any order)."""
    kept = bytearray()
    for number, _, field_start, value_end in _fields(data, start, end, with_tag=True):
        if number in _TENSOR_FIELDS:
            kept += data[field_start:value_end]
    tensor = TensorProto()
    try:
        tensor.ParseFromString(bytes(kept))
    except Exception as exc:  # protobuf's DecodeError, or its C implementation's own
        raise WireError(f"a tensor that does not parse: {exc}") from None
    return tensor


def _fields(
    data: memoryview, start: int, end: int, *, with_tag: bool = False
) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field in data[start:end]; start is where the
    value begins (or, with_tag, the field's tag), end where it ends."""
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _varint(data, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == _VARINT:
            _, value_end = _varint(data, pos, end)
        elif wire == _FIXED64:
            value_end = pos + 8
        elif wire == _FIXED32:
            value_end = pos + 4
        elif wire == _LENGTH:
            length, pos = _varint(data, pos, end)
            value_end = pos + length
        else:  # groups (3, 4) are not used by onnx.proto; 6 and 7 do not exist
            raise WireError(f"wire type {wire}")
        if value_end > end:
            raise WireError("a field runs past the end of its message")
        yield number, wire, field_start if with_tag else pos, value_end
        pos = value_end


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise WireError("a truncated or overlong varint")


__all__ = ["MAX_DEPTH", "WireError", "tensors"]
