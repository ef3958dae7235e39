"""The Open Inference Protocol over REST (service/frontend/rest.py) on the real server, with
`requests` as a data scientist would call it: the answers equal gRPC's for the same request, the
binary tensor data extension round-trips, every failure is a JSON error with the HTTP status of its
gRPC code, and the calls show in the metrics."""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct
import zlib

import grpc
import numpy as np
import pytest
import requests
from PIL import Image
from server_process import MAX_IMAGES, ServerProcess

from service._proto.cnnserve.v1 import inference_pb2, inference_pb2_grpc
from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.frontend.rest import HTTP_STATUS

pytestmark = pytest.mark.integration

TIMEOUT = 60


def url(server: ServerProcess, path: str) -> str:
    return f"http://{server.http_address}{path}"


def photo(seed: int = 0, size: int = 96) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def digits_batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 32, 32), dtype=np.float32)


def json_infer(x: np.ndarray, **extra: object) -> dict[str, object]:
    return {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
        **extra,
    }


def grpc_infer(server: ServerProcess, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    return pb_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer(request, timeout=TIMEOUT)


def grpc_logits(server: ServerProcess, x: np.ndarray) -> np.ndarray:
    request = pb.ModelInferRequest(model_name="lenet5")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.outputs.add(name="logits")
    request.raw_input_contents.append(x.tobytes())
    response = grpc_infer(server, request)
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(len(x), -1)


def post(server: ServerProcess, path: str, **kwargs: object) -> requests.Response:
    return requests.post(url(server, path), timeout=TIMEOUT, **kwargs)  # type: ignore[arg-type]


def assert_error(response: requests.Response, status: int, contains: str = "") -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    assert isinstance(message, str) and contains in message, message
    return message


# --- health and metadata ---------------------------------------------------------------------------


def test_health_and_readiness_answer_as_the_protocol_says(server: ServerProcess) -> None:
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/lenet5/ready",
        "/v2/models/lenet5/versions/1/ready",
    ):
        response = requests.get(url(server, path), timeout=TIMEOUT)
        assert (response.status_code, response.content) == (200, b""), path
    for path in ("/v2/models/nope/ready", "/v2/models/lenet5/versions/9/ready"):
        assert requests.get(url(server, path), timeout=TIMEOUT).status_code == 400, path


def test_metadata_equals_grpc(server: ServerProcess) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(server.channel)
    document = requests.get(url(server, "/v2"), timeout=TIMEOUT).json()
    grpc_server = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=TIMEOUT)
    assert document["name"] == grpc_server.name and document["version"] == grpc_server.version
    assert set(document["extensions"]) == {*grpc_server.extensions, "binary_tensor_data"}
    for name in ("lenet5", "resnet18"):
        for path in (f"/v2/models/{name}", f"/v2/models/{name}/versions/1"):
            rest = requests.get(url(server, path), timeout=TIMEOUT).json()
            expected = stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=TIMEOUT)
            assert rest["name"] == expected.name and rest["versions"] == list(expected.versions)
            assert rest["platform"] == expected.platform
            assert rest["inputs"] == [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in expected.inputs
            ]
            assert rest["outputs"] == [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in expected.outputs
            ]
    untrained = requests.get(url(server, "/v2/models/resnet18"), timeout=TIMEOUT).json()["parameters"]
    assert untrained == {"untrained": True, "warning": "untrained demo weights: answers are meaningless"}
    assert "parameters" not in requests.get(url(server, "/v2/models/lenet5"), timeout=TIMEOUT).json()


def test_unknown_model_and_version_are_404_with_grpc_s_message(server: ServerProcess) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(server.channel)
    for name, version in (("nope", ""), ("lenet5", "9")):
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), timeout=TIMEOUT)
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "")
        assert assert_error(requests.get(url(server, path), timeout=TIMEOUT), 404) == info.value.details()


# --- inference -------------------------------------------------------------------------------------


def test_json_infer_equals_grpc(server: ServerProcess) -> None:
    x = digits_batch(3)
    response = post(server, "/v2/models/lenet5/infer", json=json_infer(x, id="r-1"))
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["model_name"] == "lenet5" and document["model_version"] == "1" and document["id"] == "r-1"
    assert document["parameters"]["execution_provider"] == "CPUExecutionProvider"
    outputs = {o["name"]: o for o in document["outputs"]}
    assert set(outputs) == {"logits", "probabilities", "features"}  # none named: all of them
    logits = np.asarray(outputs["logits"]["data"], np.float32).reshape(outputs["logits"]["shape"])
    np.testing.assert_allclose(logits, grpc_logits(server, x), rtol=1e-6, atol=1e-6)
    probabilities = np.asarray(outputs["probabilities"]["data"]).reshape(3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    assert outputs["features"]["shape"] == [3, 84]


def test_nested_data_and_classification_output(server: ServerProcess) -> None:
    x = digits_batch(2, seed=1)
    body = {
        "inputs": [{"name": "input", "shape": [2, 1, 32, 32], "datatype": "FP32", "data": x.tolist()}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
    }
    document = post(server, "/v2/models/lenet5/infer", json=body).json()
    (output,) = document["outputs"]
    assert (output["datatype"], output["shape"]) == ("BYTES", [2, 3])
    top = [int(element.split(":")[1]) for element in output["data"][:3]]
    assert top == list(np.argsort(-grpc_logits(server, x)[0], kind="stable")[:3])


def binary_request(
    x: np.ndarray, outputs: list[dict[str, object]] | None = None
) -> tuple[bytes, dict[str, str]]:
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": x.nbytes},
            }
        ],
        **({"outputs": outputs} if outputs is not None else {"parameters": {"binary_data_output": True}}),
    }
    text = json.dumps(header).encode()
    return text + x.tobytes(), {"Inference-Header-Content-Length": str(len(text))}


def read_binary(response: requests.Response) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    length = int(response.headers["Inference-Header-Content-Length"])
    document = json.loads(response.content[:length])
    arrays, offset = {}, length
    for output in document["outputs"]:
        size = output["parameters"]["binary_data_size"]
        arrays[output["name"]] = np.frombuffer(response.content[offset : offset + size], "<f4").reshape(
            output["shape"]
        )
        offset += size
    assert offset == len(response.content)
    return document, arrays


def test_binary_tensor_data_extension_round_trips(server: ServerProcess) -> None:
    x = digits_batch(4, seed=2)
    body, headers = binary_request(x)
    response = post(server, "/v2/models/lenet5/infer", data=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    _, arrays = read_binary(response)
    np.testing.assert_allclose(arrays["logits"], grpc_logits(server, x), rtol=1e-6, atol=1e-6)
    # One output in binary, one in JSON, as each asks.
    body, headers = binary_request(
        x, [{"name": "logits", "parameters": {"binary_data": True}}, {"name": "features"}]
    )
    response = post(server, "/v2/models/lenet5/infer", data=body, headers=headers)
    length = int(response.headers["Inference-Header-Content-Length"])
    document = json.loads(response.content[:length])
    logits, features = document["outputs"]
    assert "data" not in logits and logits["parameters"]["binary_data_size"] == 4 * 10 * 4
    assert len(features["data"]) == 4 * 84 and len(response.content) == length + 160


def test_encoded_images_as_bytes_in_binary_and_in_json(server: ServerProcess) -> None:
    images = [photo(1), photo(2)]
    raw = b"".join(struct.pack("<I", len(e)) + e for e in images)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "logits"}],
        }
    ).encode()
    binary = post(
        server,
        "/v2/models/resnet18/infer",
        data=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header))},
    ).json()
    in_json = post(
        server,
        "/v2/models/resnet18/infer",
        json={
            "inputs": [
                {
                    "name": "input",
                    "shape": [2],
                    "datatype": "BYTES",
                    "data": [{"b64": base64.b64encode(e).decode()} for e in images],
                }
            ],
            "outputs": [{"name": "logits"}],
        },
    ).json()
    assert binary["outputs"] == in_json["outputs"]
    assert binary["parameters"]["untrained"] is True


def test_gzip_and_deflate_both_ways(server: ServerProcess) -> None:
    x = digits_batch(1, seed=3)
    plain = json.dumps(json_infer(x, outputs=[{"name": "logits"}])).encode()
    for encoding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        response = post(
            server,
            "/v2/models/lenet5/infer",
            data=compress(plain),
            headers={"Content-Encoding": encoding, "Accept-Encoding": encoding},
        )
        assert response.status_code == 200 and response.headers["content-encoding"] == encoding
        logits = np.asarray(response.json()["outputs"][0]["data"], np.float32)  # requests inflates it
        np.testing.assert_allclose(logits, grpc_logits(server, x)[0], rtol=1e-6, atol=1e-6)


def test_the_classify_route_equals_grpc_classify(server: ServerProcess) -> None:
    image = photo(5)
    response = post(server, "/v2/models/resnet18/classify?top_k=4", data=image)
    assert response.status_code == 200, response.text
    document = response.json()
    expected = inference_pb2_grpc.InferenceStub(server.channel).Classify(
        inference_pb2.ClassifyRequest(
            model="resnet18", top_k=4, image=inference_pb2.ImageInput(encoded=image)
        ),
        timeout=TIMEOUT,
    )
    assert [(c["index"], c["label"]) for c in document["classes"]] == [
        (c.index, c.label) for c in expected.classes
    ]
    np.testing.assert_allclose(
        [c["probability"] for c in document["classes"]], [c.probability for c in expected.classes], rtol=1e-5
    )
    assert (document["model"], document["version"], document["untrained"]) == ("resnet18", 1, True)
    assert document["warning"] == "untrained demo weights: answers are meaningless"
    default = post(server, "/v2/models/lenet5/versions/1/classify", data=image).json()
    assert len(default["classes"]) == 5 and default["untrained"] is False and "warning" not in default


# --- failures ------------------------------------------------------------------------------------------


def test_every_grpc_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    assert HTTP_STATUS[grpc.StatusCode.INVALID_ARGUMENT] == 400
    assert HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404
    assert HTTP_STATUS[grpc.StatusCode.UNAVAILABLE] == 503
    assert HTTP_STATUS[grpc.StatusCode.INTERNAL] == 500


def test_a_bad_tensor_gets_grpc_s_message_as_a_400(server: ServerProcess) -> None:
    x = np.zeros((1, 1, 31, 32), np.float32)
    request = pb.ModelInferRequest(model_name="lenet5")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    with pytest.raises(grpc.RpcError) as info:
        grpc_infer(server, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        assert_error(post(server, "/v2/models/lenet5/infer", json=json_infer(x)), 400) == info.value.details()
    )


PAST_THE_END = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]}
).encode()


@pytest.mark.parametrize(
    ("body", "headers", "contains"),
    [
        (b"", {}, "not valid JSON"),
        (b"{", {}, "not valid JSON"),
        (b"\xff\xfe", {}, "not valid JSON"),
        (b"[" * 100_000, {}, "not valid JSON"),
        (b"[]", {}, "JSON object"),
        (b'{"inputs": []}', {}, "non-empty list"),
        (b'{"inputs": [1]}', {}, "must be a JSON object"),
        (b'{"inputs": [{"name": "input"}], "extra": 1}', {}, "unknown key"),
        (
            b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, -1]}]}',
            {},
            "non-negative integers",
        ),
        (
            b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [[1], 2]}]}',
            {},
            "regular array",
        ),
        (
            b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": ["a"]}]}',
            {},
            "only numbers",
        ),
        (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [2], "data": [1]}]}', {}, "needs 2"),
        (
            b'{"inputs": [{"name": "input", "datatype": "INT4", "shape": [1], "data": [1]}]}',
            {},
            "unknown datatype",
        ),
        (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32]}]}', {}, "needs `data`"),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}',
            {},
            "unknown input 'x'",
        ),
        (b'{"inputs": [], "parameters": {"timeout": -1}}', {}, "microseconds"),
        (
            b'{"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": [{"b64": "!"}]}]}',
            {},
            "base64",
        ),
        (b"{}", {"Inference-Header-Content-Length": "x"}, "byte count"),
        (b"{}", {"Inference-Header-Content-Length": "99"}, "body has 2 bytes"),
        (PAST_THE_END + b"AAAA", {"Inference-Header-Content-Length": str(len(PAST_THE_END))}, "past the end"),
        (b"not gzip", {"Content-Encoding": "gzip"}, "not valid gzip"),
        (b"{}", {"Content-Encoding": "br"}, "not supported"),
    ],
)
def test_bad_bodies_are_400s_never_500s(
    server: ServerProcess, body: bytes, headers: dict[str, str], contains: str
) -> None:
    assert_error(post(server, "/v2/models/lenet5/infer", data=body, headers=headers), 400, contains)


def test_caps_deadlines_and_routes_map_to_their_statuses(server: ServerProcess) -> None:
    too_many = json_infer(digits_batch(MAX_IMAGES + 1))
    assert_error(post(server, "/v2/models/lenet5/infer", json=too_many), 400, "max_images_per_request")
    huge = b"{" + b" " * (7 * 1024 * 1024) + b"}"  # over the ~5.8 MB receive limit
    with requests.Session() as session:  # the connection outlives the 413: the next call uses it
        path = url(server, "/v2/models/lenet5/infer")
        assert_error(session.post(path, data=huge, timeout=TIMEOUT), 413, "receive limit")
        assert session.post(path, json=json_infer(digits_batch(1)), timeout=TIMEOUT).status_code == 200
    expired = json_infer(digits_batch(1), parameters={"timeout": 0})
    assert_error(post(server, "/v2/models/lenet5/infer", json=expired), 504, "deadline")
    too_long = json_infer(digits_batch(1), parameters={"timeout": 10**12})
    assert_error(post(server, "/v2/models/lenet5/infer", json=too_long), 400, "max_deadline_s")
    assert_error(
        post(server, "/v2/models/lenet5/classify?top_k=0&x=1", data=photo()), 400, "unknown query parameter"
    )
    assert_error(
        post(server, "/v2/models/lenet5/classify?top_k=11", data=photo()), 400, "top_k must be between"
    )
    assert_error(post(server, "/v2/models/lenet5/classify", data=b"GIF89a"), 400, "unsupported image format")
    assert_error(post(server, "/v2/models/lenet5/classify", data=b""), 400)
    assert_error(post(server, "/v2/models/lenet5/classify?timeout_ms=0", data=photo()), 504, "deadline")
    assert_error(requests.get(url(server, "/v2/models/lenet5/infer"), timeout=TIMEOUT), 405)
    assert_error(requests.delete(url(server, "/v2"), timeout=TIMEOUT), 405)
    assert_error(requests.get(url(server, "/v1/models/lenet5"), timeout=TIMEOUT), 404)
    # Still serving after all that.
    assert post(server, "/v2/models/lenet5/infer", json=json_infer(digits_batch(1))).status_code == 200


def test_rest_calls_show_in_the_metrics(server: ServerProcess) -> None:
    before = server.sample("cnnserve_requests_total", method="rest:ModelInfer", model="lenet5", code="OK")
    assert post(server, "/v2/models/lenet5/infer", json=json_infer(digits_batch(1))).status_code == 200
    after = server.sample("cnnserve_requests_total", method="rest:ModelInfer", model="lenet5", code="OK")
    assert after == before + 1
    post(server, "/v2/models/lenet5/infer", data=b"{")
    assert (
        server.sample(
            "cnnserve_rejections_total", method="rest:ModelInfer", model="", reason="invalid_argument"
        )
        >= 1
    )
