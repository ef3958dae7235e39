"""onnx_wire: an ONNX file's tensors read from the wire format, their data skipped, exactly the
tensors a full parse finds (the external-data check in session.py relies on seeing every one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from service.engine import onnx_wire


def external(name: str, location: str) -> TensorProto:
    tensor = numpy_helper.from_array(np.arange(4, dtype=np.float32), name)
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=16)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    return tensor


def inline(name: str) -> TensorProto:
    return numpy_helper.from_array(np.ones((64, 64), dtype=np.float32), name)


def sparse(name: str, location: str) -> onnx.SparseTensorProto:
    indices = numpy_helper.from_array(np.array([1], dtype=np.int64), f"{name}_indices")
    return helper.make_sparse_tensor(external(name, location), indices, [4])


def subgraph(name: str) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Constant", [], [f"{name}_out"], value=external(f"{name}_const", f"{name}.bin"))],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [4])],
        [inline(f"{name}_init")],
    )


def rich_model() -> onnx.ModelProto:
    """A tensor in every place onnx.proto allows one, most of them external."""
    nodes = [
        helper.make_node("Constant", [], ["c"], value=external("attr_t", "attr_t.bin")),
        helper.make_node("Constant", [], ["s"], sparse_value=sparse("attr_sparse", "attr_sparse.bin")),
        helper.make_node("If", ["cond"], ["y"], then_branch=subgraph("then"), else_branch=subgraph("else")),
        helper.make_node(
            "Custom", [], ["z"], domain="test", graphs=[subgraph("listed")],
            tensors=[external("attr_list", "attr_list.bin"), inline("in")],
        ),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "main",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [external("W", "weights.bin"), inline("b")],
        sparse_initializer=[sparse("sparse_init", "sparse_init.bin")],
    )
    function = helper.make_function(
        "test", "F", [], ["f"], [helper.make_node("Constant", [], ["f"], value=external("fn_t", "fn.bin"))],
        [helper.make_opsetid("", 18)],
    )  # fmt: skip
    model = helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 18)])
    training = model.training_info.add()
    training.initialization.CopyFrom(subgraph("training"))
    return model


def parsed_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of a parsed model, walked by hand (what the check did before onnx_wire)."""

    def graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
        yield from graph.initializer
        for s in graph.sparse_initializer:
            yield from (s.values, s.indices)
        for node in graph.node:
            yield from node_tensors(node)

    def node_tensors(node: onnx.NodeProto) -> Iterator[TensorProto]:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            for s in attr.sparse_tensors:
                yield from (s.values, s.indices)
            if attr.HasField("g"):
                yield from graph_tensors(attr.g)
            for g in attr.graphs:
                yield from graph_tensors(g)

    yield from graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from node_tensors(node)
    for training in model.training_info:
        yield from graph_tensors(training.initialization)
        yield from graph_tensors(training.algorithm)


Summary = list[tuple[str, int, list[tuple[str, str]]]]


def summary(tensors: Iterator[TensorProto] | list[TensorProto]) -> Summary:
    return sorted((t.name, t.data_location, [(e.key, e.value) for e in t.external_data]) for t in tensors)


def test_finds_every_tensor_a_full_parse_finds_without_their_data(tmp_path: Path) -> None:
    model = rich_model()
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    found = onnx_wire.tensors(path)
    assert summary(found) == summary(parsed_tensors(onnx.load(str(path), load_external_data=False)))
    locations = {e.value for t in found for e in t.external_data if e.key == "location"}
    assert locations == {
        "weights.bin", "sparse_init.bin", "attr_t.bin", "attr_sparse.bin", "then.bin", "else.bin",
        "attr_list.bin", "listed.bin", "fn.bin", "training.bin",
    }  # fmt: skip
    # Only what the check reads is parsed: the weights themselves stay in the file.
    assert all(not t.raw_data and not t.dims for t in found)


def test_an_empty_file_has_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    assert onnx_wire.tensors(path) == []


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x3a\xff\xff\xff\xff\x0f", "past the end"),  # graph (7), 4 GB long, in 6 bytes
        (b"\x3a\x05\x2a\x10\x00", "past the end"),  # an initializer longer than its graph
        (b"\x3a", "truncated"),
        (b"\x3b\x00", "wire type 3"),  # a group
        (b"\x00\x00", "field number 0"),
    ],
)
def test_what_is_not_wire_format_is_refused(tmp_path: Path, data: bytes, why: str) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    with pytest.raises(onnx_wire.WireError, match=why):
        onnx_wire.tensors(path)


def length_delimited(number: int, payload: bytes) -> bytes:
    def varint(value: int) -> bytes:
        out = bytearray()
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        return bytes(out) + bytes([value])

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_a_file_that_nests_too_deep_is_refused(tmp_path: Path) -> None:
    # graph -> node -> attribute -> graph -> ...: written by hand, as protobuf refuses to build it.
    graph = b""
    for _ in range(onnx_wire.MAX_DEPTH // 3 + 1):
        attribute = length_delimited(6, graph)  # AttributeProto.g
        node = length_delimited(5, attribute)  # NodeProto.attribute
        graph = length_delimited(1, node)  # GraphProto.node
    path = tmp_path / "model.onnx"
    path.write_bytes(length_delimited(7, graph))  # ModelProto.graph
    with pytest.raises(onnx_wire.WireError, match="nested more than"):
        onnx_wire.tensors(path)
