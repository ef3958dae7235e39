"""service.client.CnnserveClient against the real server wiring (engine double)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from servicer_fakes import Harness

from service.client import DEFAULT_SERVICE_CONFIG, CnnserveClient, CnnserveError, default_channel_options
from service.settings import Settings


@pytest.fixture(scope="module")
def client() -> Iterator[CnnserveClient]:
    h = Harness(max_images_per_request=3)
    with CnnserveClient(h.address, timeout_s=10) as c:
        yield c
    h.close()


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (32, 32), value).save(buf, "PNG")
    return buf.getvalue()


def test_classify_accepts_bytes_paths_and_arrays(client: CnnserveClient, tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(_png(0))
    assert client.classify(_png(0), model="lenet5", top_k=1).classes[0].index == 0
    assert client.classify(path, model="lenet5", top_k=1).classes[0].index == 0
    result = client.classify(np.full((1, 32, 32), 6.0, np.float32), model="lenet5", version=1, top_k=2)
    assert (result.model, result.version) == ("lenet5", 1)
    assert [c.index for c in result.classes][0] == 6 and result.timings is not None


def test_classify_batch_and_errors(client: CnnserveClient) -> None:
    results = client.classify_batch([np.full((1, 32, 32), v, np.float32) for v in (1.0, 8.0)], model="lenet5")
    assert [r.classes[0].index for r in results] == [1, 8]
    with pytest.raises(CnnserveError) as info:
        client.classify_batch([_png(0)] * 4, model="lenet5")
    assert (
        info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        and "max_images_per_request is 3" in info.value.message
    )
    with pytest.raises(CnnserveError) as info:
        client.classify(_png(0), model="nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_classify_stream_yields_results_and_item_errors(client: CnnserveClient) -> None:
    def items():
        for i in range(10):
            yield str(i), np.full((1, 32, 32), float(i), np.float32)
        yield "bad", b"not an image"

    results = {r.id: r for r in client.classify_stream(items(), model="lenet5", top_k=1)}
    assert sorted(results) == sorted([*map(str, range(10)), "bad"])
    assert all(results[str(i)].result.classes[0].index == i for i in range(10))
    assert results["bad"].result is None and results["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT


def test_list_and_get_model(client: CnnserveClient) -> None:
    assert [(m.name, m.version) for m in client.list_models()] == [("lenet5", 1), ("lenet5", 2)]
    assert len(client.get_model("lenet5", include_labels=True).labels) == 10


def test_default_channel_config_is_compatible_with_the_server_defaults() -> None:
    options = dict(default_channel_options())
    config = json.loads(options["grpc.service_config"])
    assert config == DEFAULT_SERVICE_CONFIG
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    cheap, gradients = config["methodConfig"]
    for method_config in (cheap, gradients):
        assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert (cheap["retryPolicy"]["maxAttempts"], gradients["retryPolicy"]["maxAttempts"]) == (4, 2)
    # Every unary RPC is retried (all of the Open Inference Protocol's are unary); streams are not.
    assert {n.get("method") for n in cheap["name"]} == {
        "Classify",
        "ClassifyBatch",
        "ListModels",
        "GetModel",
        None,
    }
    assert {n["method"] for n in gradients["name"]} == {"Explain", "DreamUnary", "StylizeUnary"}
    assert {"service": "inference.GRPCInferenceService"} in cheap["name"]
    # A request the server accepts stays retryable (gRPC's default retry buffer is 256 KiB).
    assert options["grpc.per_rpc_retry_buffer_size"] == options["grpc.max_send_message_length"]
    server = Settings()
    assert options["grpc.keepalive_time_ms"] >= server.keepalive_min_client_ping_s * 1000
    assert options["grpc.max_send_message_length"] <= server.max_receive_message_bytes
