"""The CUDA paths end to end, on a machine with a usable GPU (marked `gpu`: never in `make test`).

Two real servers over the same demo repository, one forced onto the CPU and one with
`--device cuda`, answer the same requests: the CUDA one must report CUDAExecutionProvider where
the issue asks (GetModel, ServerMetadata, the provider metric) and agree with the CPU one. The
gradient workers of the CUDA server run on the GPU too, and their guided-backprop map agrees with
the CPU worker's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import ServerProcess, module_server

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service._proto.inference import grpc_predict_v2_pb2 as oip
from service._proto.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from service.engine.providers import cuda_status

pytestmark = [
    pytest.mark.integration,
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_status(0).usable, reason="no usable CUDA device for ONNX Runtime"),
]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@pytest.fixture(scope="module")
def gpu_server(demo_repository: Path) -> Iterator[ServerProcess]:
    yield from module_server(demo_repository, "--device", "cuda", "--workers", "1")


@pytest.fixture(scope="module")
def cpu_server(demo_repository: Path) -> Iterator[ServerProcess]:
    yield from module_server(demo_repository, "--device", "cpu", "--workers", "1")


def wait_for_gradients(server: ServerProcess, timeout: float = 180) -> None:
    """The worker pool starts after the server is ready (it loads PyTorch weights on its own)."""
    stub = health_pb2_grpc.HealthStub(server.channel)
    request = health_pb2.HealthCheckRequest(service="cnnserve.v1.Inference/gradients")
    deadline = time.monotonic() + timeout
    while stub.Check(request, timeout=5).status != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "gradient workers not SERVING"
        time.sleep(0.2)


def tensor(seed: int, shape: tuple[int, ...]) -> pb.ImageInput:
    arr = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return pb.ImageInput(tensor=pb.Tensor(shape=list(shape), dtype="float32", data=arr.tobytes()))


def probabilities(server: ServerProcess, model: str, image: pb.ImageInput) -> dict[int, float]:
    stub = pb_grpc.InferenceStub(server.channel)
    response = stub.Classify(pb.ClassifyRequest(model=model, image=image, top_k=5), timeout=120)
    return {c.index: c.probability for c in response.classes}


def test_the_cuda_provider_is_in_use_and_reported(gpu_server: ServerProcess) -> None:
    stub = pb_grpc.InferenceStub(gpu_server.channel)
    for name in ("lenet5", "resnet18"):
        info = stub.GetModel(pb.GetModelRequest(name=name), timeout=30)
        assert info.execution_provider == CUDA, info
    assert gpu_server.sample("cnnserve_execution_provider_info", provider=CUDA) == 1
    assert gpu_server.sample("cnnserve_execution_provider_info", provider=CPU) == 0
    metadata = oip_grpc.GRPCInferenceServiceStub(gpu_server.channel).ServerMetadata(
        oip.ServerMetadataRequest(), timeout=30
    )
    assert f"execution_provider:{CUDA}" in metadata.extensions


@pytest.mark.parametrize(("model", "shape"), [("lenet5", (1, 32, 32)), ("resnet18", (3, 224, 224))])
def test_cuda_and_cpu_answer_the_same(
    gpu_server: ServerProcess, cpu_server: ServerProcess, model: str, shape: tuple[int, ...]
) -> None:
    for seed in range(4):
        image = tensor(seed, shape)
        on_gpu, on_cpu = probabilities(gpu_server, model, image), probabilities(cpu_server, model, image)
        assert list(on_gpu)[0] == list(on_cpu)[0]
        for index in set(on_gpu) & set(on_cpu):
            assert on_gpu[index] == pytest.approx(on_cpu[index], abs=2e-3)


def test_batches_on_cuda_equal_single_requests(gpu_server: ServerProcess) -> None:
    stub = pb_grpc.InferenceStub(gpu_server.channel)
    images = [tensor(seed, (3, 224, 224)) for seed in range(8)]
    batch = stub.ClassifyBatch(pb.ClassifyBatchRequest(model="resnet18", images=images, top_k=3), timeout=120)
    for image, result in zip(images, batch.results, strict=True):  # results: one per image, in order
        single = probabilities(gpu_server, "resnet18", image)
        assert [c.index for c in result.classes] == list(single)[:3]
        for c in result.classes:
            assert c.probability == pytest.approx(single[c.index], abs=1e-3)


def test_guided_backprop_on_the_gpu_worker_matches_the_cpu_worker(
    gpu_server: ServerProcess, cpu_server: ServerProcess
) -> None:
    # resnet18: LeNet-5 has no ReLU to guide (tanh throughout), so it does not offer explain.
    image = tensor(7, (3, 224, 224))
    request = pb.ExplainRequest(model="resnet18", images=[image], target_classes=[3])
    maps = []
    for server in (gpu_server, cpu_server):
        wait_for_gradients(server)
        try:
            response = pb_grpc.InferenceStub(server.channel).Explain(request, timeout=120)
        except grpc.RpcError as exc:  # pragma: no cover - the message is the diagnosis
            pytest.fail(f"Explain failed: {exc.code()} {exc.details()}")
        (explanation,) = response.explanations
        maps.append(np.frombuffer(explanation.saliency.data, dtype=np.float32))
    on_gpu, on_cpu = maps
    assert on_gpu.shape == on_cpu.shape
    # The GPU worker keeps PyTorch's TF32 convolutions (Hopper/Ampere): close, not bit-equal.
    assert np.corrcoef(on_gpu, on_cpu)[0, 1] > 0.99
