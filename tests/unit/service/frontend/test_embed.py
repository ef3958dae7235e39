"""Embed and EmbedStream through the real server and the real engine, on the linear repository
(tests/unit/service/linear_repo.py: features = the flattened preprocessed input, logits =
features @ W + b), so every number is checked against numpy."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from linear_repo import GRAY8, RGB8, add_version, expected_probs, png, random_image, settings_for
from PIL import Image
from servicer_fakes import Harness, counter

from export.preprocessing import to_tensor
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.engine.engine import ClassificationEngine


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("embed") / "repo"
    weights = add_version(root, "rgb", 1, seed=1)
    add_version(root, "old", 1, p=GRAY8, classes=3, seed=2, features=False)  # exported before embeddings
    engine = ClassificationEngine(settings_for(root))
    h = Harness(engine, repository=root)  # type: ignore[arg-type]
    yield {"harness": h, "stub": pb_grpc.InferenceStub(h.channel), "weights": weights, "root": root}
    h.close()


def tensor_input(x: np.ndarray) -> pb.ImageInput:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pb.ImageInput(tensor=pb.Tensor(shape=list(x.shape), dtype="float32", data=x.tobytes()))


def vector(response: pb.EmbedResponse) -> np.ndarray:
    t = response.embedding
    assert t.dtype == "float32"
    return np.frombuffer(t.data, dtype="<f4").reshape(list(t.shape))


def test_embed_returns_the_features_output_and_its_norm(served: dict[str, Any]) -> None:
    x = np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32)
    response = served["stub"].Embed(pb.EmbedRequest(model="rgb", image=tensor_input(x)), timeout=10)
    assert (response.model, response.version) == ("rgb", 1)
    assert response.untrained  # the linear models are written as untrained
    np.testing.assert_array_equal(vector(response), x.reshape(-1))
    assert response.norm == pytest.approx(float(np.linalg.norm(x.astype(np.float64))), rel=1e-6)
    assert not response.classes and response.timings.total_seconds > 0


def test_normalize_gives_a_unit_vector_in_the_same_direction(served: dict[str, Any]) -> None:
    x = np.random.default_rng(1).standard_normal((3, 8, 8)).astype(np.float32)
    response = served["stub"].Embed(
        pb.EmbedRequest(model="rgb", image=tensor_input(x), normalize=True), timeout=10
    )
    v = vector(response).astype(np.float64)
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(v * response.norm, x.reshape(-1), rtol=1e-5, atol=1e-6)
    zero = served["stub"].Embed(
        pb.EmbedRequest(model="rgb", image=tensor_input(np.zeros((3, 8, 8))), normalize=True), timeout=10
    )
    assert zero.norm == 0 and not vector(zero).any()  # a zero vector stays zero, no NaN


def test_an_encoded_image_embeds_its_preprocessed_pixels(served: dict[str, Any]) -> None:
    image = random_image(3, (13, 9))
    response = served["stub"].Embed(
        pb.EmbedRequest(model="rgb", image=pb.ImageInput(encoded=png(image))), timeout=10
    )
    expected = to_tensor(Image.fromarray(image), RGB8).reshape(-1)
    np.testing.assert_allclose(vector(response), expected, rtol=1e-6, atol=1e-6)
    assert response.timings.decode_seconds > 0


def test_top_k_comes_from_the_same_single_run(served: dict[str, Any]) -> None:
    runs = counter("cnnserve_batch_size_count", model="rgb")  # one observation per ONNX Runtime call
    image = random_image(4)
    response = served["stub"].Embed(
        pb.EmbedRequest(model="rgb", image=pb.ImageInput(encoded=png(image)), top_k=3), timeout=10
    )
    assert counter("cnnserve_batch_size_count", model="rgb") == runs + 1  # features and logits: one run
    w, b = served["weights"]
    probs = expected_probs([image], RGB8, w, b)[0]
    assert [c.index for c in response.classes] == list(np.argsort(-probs)[:3])
    assert response.classes[0].label == f"class{response.classes[0].index}"
    np.testing.assert_allclose([c.probability for c in response.classes], np.sort(probs)[::-1][:3], rtol=1e-5)
    classify = served["stub"].Classify(
        pb.ClassifyRequest(model="rgb", image=pb.ImageInput(encoded=png(image)), top_k=3), timeout=10
    )
    assert [c.index for c in classify.classes] == [c.index for c in response.classes]
    assert classify.untrained and response.untrained


def test_a_model_exported_before_embeddings_is_a_failed_precondition(served: dict[str, Any]) -> None:
    stub = served["stub"]
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(model="old", image=tensor_input(np.zeros((1, 8, 8)))), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details()
    assert "old:1 was exported without the features output" in details
    assert f"python -m export onnx linear --name old --repository {served['root']}" in details
    # ... while it still classifies, and says what it offers
    assert stub.Classify(pb.ClassifyRequest(model="old", image=tensor_input(np.zeros((1, 8, 8)))), timeout=10)
    old, new = stub.GetModel(pb.GetModelRequest(name="old")), stub.GetModel(pb.GetModelRequest(name="rgb"))
    assert pb.CAPABILITY_EMBED not in old.capabilities and not old.HasField("features")
    assert pb.CAPABILITY_EMBED in new.capabilities
    assert (new.features.name, list(new.features.shape), new.features.dtype) == ("features", [192], "float32")


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (pb.EmbedRequest(model="rgb"), grpc.StatusCode.INVALID_ARGUMENT, "image is required"),
        (
            pb.EmbedRequest(model="rgb", image=pb.ImageInput()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "set `encoded`",
        ),
        (
            pb.EmbedRequest(model="rgb", top_k=5, image=tensor_input(np.zeros((3, 8, 8)))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_k must be between 1 and 4",
        ),
        (
            pb.EmbedRequest(model="rgb", image=tensor_input(np.zeros((1, 8, 8)))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "shape",
        ),
        (pb.EmbedRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "not loaded"),
    ],
)
def test_bad_requests(
    served: dict[str, Any], request_: pb.EmbedRequest, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        served["stub"].Embed(request_, timeout=10)
    assert info.value.code() == code and message in info.value.details()


def test_the_stream_answers_every_item_once_with_per_item_errors(served: dict[str, Any]) -> None:
    rng = np.random.default_rng(5)
    good = {f"ok{i}": rng.standard_normal((3, 8, 8)).astype(np.float32) for i in range(9)}
    items = [
        pb.EmbedStreamRequest(id=k, request=pb.EmbedRequest(model="rgb", image=tensor_input(x)))
        for k, x in good.items()
    ]
    items.insert(3, pb.EmbedStreamRequest(id="bad", request=pb.EmbedRequest(model="rgb")))
    items.insert(
        5,
        pb.EmbedStreamRequest(
            id="old", request=pb.EmbedRequest(model="old", image=tensor_input(np.zeros((1, 8, 8))))
        ),
    )
    before = counter("cnnserve_requests_total", method="EmbedStream", model="rgb", code="OK")
    responses = list(served["stub"].EmbedStream(iter(items), timeout=30))
    assert sorted(r.id for r in responses) == sorted(i.id for i in items)
    by_id = {r.id: r for r in responses}
    for key, x in good.items():
        np.testing.assert_array_equal(vector(by_id[key].result), x.reshape(-1))
    assert by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_id["old"].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert counter("cnnserve_requests_total", method="EmbedStream", model="rgb", code="OK") == before + len(
        good
    )


# --- the Open Inference Protocol's `features` output ---------------------------------------------------


def oip_request(model: str, x: np.ndarray, *outputs: str) -> Any:
    from service._proto.inference import grpc_predict_v2_pb2 as oip

    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def oip_outputs(response: Any) -> dict[str, np.ndarray]:
    return {
        out.name: np.frombuffer(raw, dtype="<f4").reshape(list(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def test_oip_lists_and_returns_the_features(served: dict[str, Any]) -> None:
    from service._proto.inference import grpc_predict_v2_pb2 as oip
    from service._proto.inference import grpc_predict_v2_pb2_grpc as oip_grpc

    stub = oip_grpc.GRPCInferenceServiceStub(served["harness"].channel)
    meta = stub.ModelMetadata(oip.ModelMetadataRequest(name="rgb"))
    assert [(o.name, list(o.shape)) for o in meta.outputs] == [
        ("logits", [-1, 4]),
        ("probabilities", [-1, 4]),
        ("features", [-1, 192]),
    ]
    config = stub.ModelConfig(oip.ModelConfigRequest(name="rgb")).config  # Triton's view too
    assert [(o.name, list(o.dims)) for o in config.output][2] == ("features", [192])
    old = stub.ModelMetadata(oip.ModelMetadataRequest(name="old"))
    assert [o.name for o in old.outputs] == ["logits", "probabilities"]

    x = np.random.default_rng(7).standard_normal((2, 3, 8, 8)).astype(np.float32)
    w, b = served["weights"]
    answer = stub.ModelInfer(oip_request("rgb", x, "features"))
    assert answer.parameters["untrained"].bool_param is True  # and says so in words
    assert answer.parameters["warning"].string_param == "untrained demo weights: answers are meaningless"
    got = oip_outputs(answer)
    assert list(got) == ["features"]
    np.testing.assert_array_equal(got["features"], x.reshape(2, -1))
    got = oip_outputs(stub.ModelInfer(oip_request("rgb", x, "features", "logits")))
    np.testing.assert_allclose(
        got["logits"], x.reshape(2, -1).astype(np.float64) @ w + b, rtol=1e-4, atol=1e-4
    )
    assert list(oip_outputs(stub.ModelInfer(oip_request("rgb", x)))) == [
        "logits",
        "probabilities",
        "features",
    ]

    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(oip_request("old", x[:, :1], "features"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "unknown output 'features'" in info.value.details()
        and "python -m export onnx" in info.value.details()
    )
    request = oip_request("rgb", x, "features")
    request.outputs[0].parameters["classification"].int64_param = 2
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "embedding" in info.value.details()


def test_the_engine_warns_once_per_untrained_version_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "repo"
    add_version(root, "demo", 1, seed=3)
    add_version(root, "real", 1, seed=4)  # made trained below: it says nothing
    meta_path = root / "real" / "1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["trained"], meta["trained_on"] = True, "imagenet"
    meta_path.write_text(json.dumps(meta))
    engine = ClassificationEngine(settings_for(root))
    with caplog.at_level(logging.WARNING, logger="service.engine.engine"):
        engine.load()
    warned = [r.getMessage() for r in caplog.records if "untrained demo weights" in r.getMessage()]
    assert warned == ["demo:1 has untrained demo weights: answers are meaningless"]
