"""Explain explains the network that classified: over gRPC, for the same photo, Explain's `predicted`
class and probability equal Classify's top-1 (within 1e-3).

The repository is built as a user with torchvision weights builds it: a GoogLeNet checkpoint file
exported with `python -m export onnx googlenet --weights FILE` (transform_input=True, recorded in
metadata.json's build_kwargs). A second model is the same export with build_kwargs removed from
metadata.json, as an older exporter or a hand edit leaves it: the gradient workers' parity self-test
refuses it (FAILED_PRECONDITION, no gradient capabilities) while it keeps classifying.
The photos are the two that ship with scikit-learn (china.jpg, flower.jpg).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image
from server_process import ROOT, ServerProcess, clean_env, module_server

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.frontend.server import GRADIENTS_SERVICE

pytestmark = pytest.mark.integration

PHOTOS = ("china.jpg", "flower.jpg")


def _export(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "export", "onnx", *args],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, make_checkpoint: Callable[..., Path]) -> Path:
    base = tmp_path_factory.mktemp("explain-parity")
    root = base / "repository"
    weights = make_checkpoint("googlenet", base / "googlenet.pth")
    for name in ("inception", "inception-lost"):
        _export("googlenet", "--weights", str(weights), "--repository", str(root), "--name", name)
    meta_path = root / "inception-lost" / "1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    assert meta["build_kwargs"] == {"transform_input": True}
    del meta["build_kwargs"]
    meta_path.write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerProcess]:
    yield from module_server(repository, "--workers", "1", "--torch-threads", "1")


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> pb_grpc.InferenceStub:
    server.wait_serving(GRADIENTS_SERVICE, timeout=180)
    return pb_grpc.InferenceStub(server.channel)


def photo(name: str) -> bytes:
    from sklearn.datasets import load_sample_image

    buf = io.BytesIO()
    Image.fromarray(load_sample_image(name)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("name", PHOTOS)
def test_explain_predicts_what_classify_answers(stub: pb_grpc.InferenceStub, name: str) -> None:
    image = pb.ImageInput(encoded=photo(name))
    classified = stub.Classify(pb.ClassifyRequest(model="inception", image=image, top_k=1), timeout=60)
    top = classified.classes[0]
    explained = stub.Explain(pb.ExplainRequest(model="inception", images=[image]), timeout=120)
    e = explained.explanations[0]
    assert (e.predicted.index, e.predicted.label) == (top.index, top.label)
    assert e.predicted.probability == pytest.approx(top.probability, abs=1e-3)
    # No target: the predicted class is the one explained, with the same probability.
    assert e.explained == e.predicted
    assert 0.0 < e.predicted.probability <= 1.0


def test_a_version_failing_the_parity_self_test_is_refused_and_keeps_classifying(
    stub: pb_grpc.InferenceStub, server: ServerProcess
) -> None:
    image = pb.ImageInput(encoded=photo("china.jpg"))
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(pb.ExplainRequest(model="inception-lost", images=[image]), timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith(
        "model 'inception-lost' version 1 is not offered for gradient RPCs: the PyTorch network "
        "rebuilt from weights.pt disagrees with model.onnx"
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.DreamUnary(pb.DreamRequest(model="inception-lost", image=image), timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    info_lost = stub.GetModel(pb.GetModelRequest(name="inception-lost"), timeout=10)
    # The engine's RPCs only: no gradient RPC (FeatureMaps and Filters included) for this version.
    assert list(info_lost.capabilities) == [pb.CAPABILITY_CLASSIFY, pb.CAPABILITY_EMBED]
    good = stub.GetModel(pb.GetModelRequest(name="inception"), timeout=10)
    assert pb.CAPABILITY_EXPLAIN in good.capabilities and pb.CAPABILITY_DREAM in good.capabilities
    # ONNX Runtime still serves it: only the gradient RPCs are refused.
    classified = stub.Classify(pb.ClassifyRequest(model="inception-lost", image=image, top_k=1), timeout=60)
    assert classified.classes[0].probability > 0
    assert "not offering inception-lost:1 for gradient RPCs" in server.log
