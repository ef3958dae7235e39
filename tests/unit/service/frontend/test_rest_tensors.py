"""The REST bodies <-> ModelInfer messages (service/frontend/rest_tensors.py), without a server."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service.errors import InvalidArgument
from service.frontend.rest_tensors import InferCall, parse_infer, render_infer


def body(document: dict[str, object], *sections: bytes) -> tuple[bytes, str | None]:
    text = json.dumps(document).encode()
    if not sections:
        return text, None
    return text + b"".join(sections), str(len(text))


def tensor(name: str, shape: list[int], datatype: str = "FP32", **fields: object) -> dict[str, object]:
    return {"name": name, "shape": shape, "datatype": datatype, **fields}


def refused(document: dict[str, object] | bytes, header: str | None = None) -> str:
    raw = document if isinstance(document, bytes) else json.dumps(document).encode()
    with pytest.raises(InvalidArgument) as info:
        parse_infer(raw, header, "m", "")
    return info.value.message


def test_flat_and_nested_json_data_give_the_same_raw_tensor() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    flat = parse_infer(*body({"inputs": [tensor("input", [2, 3, 4], data=x.ravel().tolist())]}), "m", "1")
    nested = parse_infer(*body({"inputs": [tensor("input", [2, 3, 4], data=x.tolist())]}), "m", "1")
    assert flat.request.raw_input_contents == nested.request.raw_input_contents == [x.tobytes()]
    assert (flat.request.model_name, flat.request.model_version) == ("m", "1")
    assert list(flat.request.inputs[0].shape) == [2, 3, 4] and flat.timeout_s is None


def test_binary_sections_are_taken_in_input_order_and_must_add_up() -> None:
    a, b = np.ones((1, 2), np.float32), np.full((1, 3), 2, np.float16)
    document = {
        "inputs": [
            tensor("a", [1, 2], parameters={"binary_data_size": a.nbytes}),
            tensor("b", [1, 3], "FP16", parameters={"binary_data_size": b.nbytes}),
        ]
    }
    call = parse_infer(*body(document, a.tobytes(), b.tobytes()), "m", "")
    assert call.request.raw_input_contents == [a.tobytes(), b.tobytes()]
    assert "binary_data_size" not in call.request.inputs[0].parameters  # used, not passed on
    text, header = body(document, a.tobytes(), b.tobytes(), b"extra")
    assert "add up to 14" in refused(text, header)
    text, header = body(document, a.tobytes())
    assert "runs past the end" in refused(text, header)
    assert "both `data` and binary_data_size" in refused(
        {"inputs": [tensor("a", [1], data=[1], parameters={"binary_data_size": 4})]}
    )


def test_bytes_elements_are_strings_or_base64() -> None:
    image = bytes(range(256))
    document = {
        "inputs": [tensor("input", [2], "BYTES", data=["text", {"b64": base64.b64encode(image).decode()}])]
    }
    call = parse_infer(*body(document), "m", "")
    assert (
        call.request.raw_input_contents[0] == struct.pack("<I", 4) + b"text" + struct.pack("<I", 256) + image
    )
    assert "string or" in refused({"inputs": [tensor("input", [1], "BYTES", data=[1])]})


@pytest.mark.parametrize(
    ("data", "datatype", "message"),
    [
        ([1.5], "INT32", "not a INT32"),
        ([2**40], "INT32", "not a INT32"),
        ([True], "FP32", "only numbers"),
        ([1], "BOOL", "only numbers (true/false)"),
        (["1"], "FP32", "only numbers"),
        ([[1, 2], [3]], "FP32", "not a regular array"),
    ],
)
def test_json_numbers_must_fit_their_datatype(data: list[object], datatype: str, message: str) -> None:
    shape = [2] if datatype != "FP32" or data != [[1, 2], [3]] else [3]
    shape = [len(data)] if not isinstance(data[0], list) else shape
    assert message in refused({"inputs": [tensor("input", shape, datatype, data=data)]})


def test_parameters_keep_their_json_types() -> None:
    document = {
        "inputs": [tensor("input", [1], data=[0.0])],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3, "binary_data": True}}],
        "parameters": {"timeout": 2_500_000, "flag": True, "ratio": 0.5, "who": "me"},
    }
    call = parse_infer(*body(document), "m", "")
    parameters = call.request.parameters
    assert parameters["flag"].WhichOneof("parameter_choice") == "bool_param"
    assert parameters["ratio"].double_param == 0.5 and parameters["who"].string_param == "me"
    assert "timeout" not in parameters and call.timeout_s == 2.5
    output = call.request.outputs[0]
    assert output.parameters["classification"].int64_param == 3 and "binary_data" not in output.parameters
    assert call.binary_outputs == {"probabilities"}
    assert "int64" in refused({"inputs": [tensor("input", [1], data=[0], parameters={"n": 2**63})]})
    assert "microseconds" in refused({"inputs": [], "parameters": {"timeout": 1.5}})
    assert "lone surrogate" in refused(b'{"id": "\\ud800", "inputs": []}')


def response() -> pb.ModelInferResponse:
    answer = pb.ModelInferResponse(model_name="m", model_version="1", id="r")
    answer.parameters["untrained"].bool_param = True
    logits = np.array([[1.0, -2.0]], np.float32)
    answer.outputs.add(name="logits", datatype="FP32", shape=[1, 2])
    answer.raw_output_contents.append(logits.tobytes())
    answer.outputs.add(name="probabilities", datatype="BYTES", shape=[1, 1])
    answer.raw_output_contents.append(struct.pack("<I", 8) + b"0.95:0:a")
    return answer


def call(named: list[str], binary: set[str], by_default: bool) -> InferCall:
    request = pb.ModelInferRequest()
    for name in named:
        request.outputs.add(name=name)
    return InferCall(request, frozenset(binary), by_default, None)


def test_render_as_json() -> None:
    payload, header = render_infer(response(), call([], set(), False))
    assert header is None
    document = json.loads(payload)
    assert document["id"] == "r" and document["parameters"] == {"untrained": True}
    logits, top = document["outputs"]
    assert logits == {"name": "logits", "datatype": "FP32", "shape": [1, 2], "data": [1.0, -2.0]}
    assert top["data"] == ["0.95:0:a"]


def test_render_with_the_binary_extension() -> None:
    # No outputs named: every output as binary_data_output says.
    payload, header = render_infer(response(), call([], set(), True))
    assert header is not None
    document = json.loads(payload[:header])
    sizes = [o["parameters"]["binary_data_size"] for o in document["outputs"]]
    assert sizes == [8, 12] and len(payload) == header + 20
    assert np.frombuffer(payload[header : header + 8], "<f4").tolist() == [1.0, -2.0]
    # Named outputs: each as it asked.
    payload, header = render_infer(response(), call(["logits", "probabilities"], {"logits"}, False))
    assert header is not None
    logits, top = json.loads(payload[:header])["outputs"]
    assert "data" not in logits and top["data"] == ["0.95:0:a"]
