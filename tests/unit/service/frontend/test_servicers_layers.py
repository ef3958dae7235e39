"""Layer names in the serving process (no torch): GetModel's layers from metadata.json, and the
names Explain's neuron, Dream and FeatureMaps give checked before anything reaches the pool; a
model exported without the table defers the check to the gradient process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from servicer_fakes import FakeEngine, FakeModel, FakePoolLifecycle, Harness

from export.preprocessing import IMAGENET
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

CAPS = {"classify": True, "explain": True, "dream": True, "feature_maps": True, "filters": True}
# A layer table as export.layers.addressable_layers writes it, long enough to be excerpted.
LAYERS = [
    {"name": "conv1", "shape": [64, 112, 112], "kind": "Conv2d"},
    {"name": "bn1", "shape": [64, 112, 112], "kind": "BatchNorm2d"},
    *({"name": f"layer1.{i}.relu", "shape": [64, 56, 56], "kind": "ReLU"} for i in range(40)),
    {"name": "layer2", "shape": [128, 28, 28], "kind": "Sequential"},
    {"name": "fc", "shape": [1000], "kind": "Linear"},
]
META = {"input": {"name": "input"}, "output": {"name": "logits"}}


class RecordingPool(FakePoolLifecycle):
    def __init__(self) -> None:
        super().__init__()
        self.submits: list[Any] = []

    async def submit(self, task: Any, **kwargs: Any) -> Any:
        self.submits.append(task)
        raise AssertionError("the test expected a refusal before submit")


@pytest.fixture(scope="module")
def harness() -> Iterator[tuple[Harness, RecordingPool]]:
    def model(name: str, meta: dict[str, Any]) -> FakeModel:
        return FakeModel(
            name,
            1,
            architecture="resnet18",
            input_shape=(3, 224, 224),
            num_classes=1000,
            labels=(),
            preprocessing=IMAGENET,
            capabilities=CAPS,
            metadata=meta,
        )

    pool = RecordingPool()
    h = Harness(FakeEngine([model("new", {**META, "layers": LAYERS}), model("old", META)]), pool=pool)
    deadline = time.monotonic() + 10
    while not pool.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield h, pool
    h.close()


def _tensor() -> pb.ImageInput:
    x = np.zeros((3, 224, 224), np.float32)
    return pb.ImageInput(tensor=pb.Tensor(shape=[3, 224, 224], dtype="float32", data=x.tobytes()))


def test_get_model_lists_the_layers_list_models_does_not(harness: tuple[Harness, RecordingPool]) -> None:
    stub = pb_grpc.InferenceStub(harness[0].channel)
    info = stub.GetModel(pb.GetModelRequest(name="new"), timeout=10)
    assert [(layer.name, list(layer.shape), layer.kind) for layer in info.layers] == [
        (e["name"], e["shape"], e["kind"]) for e in LAYERS
    ]
    assert {pb.CAPABILITY_FEATURE_MAPS, pb.CAPABILITY_FILTERS} <= set(info.capabilities)
    assert not stub.GetModel(pb.GetModelRequest(name="old"), timeout=10).layers  # exported before them
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [len(m.layers) for m in listed.models] == [0, 0]


def test_names_are_checked_before_the_pool(harness: tuple[Harness, RecordingPool]) -> None:
    h, pool = harness
    stub = pb_grpc.InferenceStub(h.channel)
    image = _tensor()
    cases = [
        (
            stub.FeatureMaps,
            pb.FeatureMapsRequest(model="new", image=image, layers=["layer2", "layer9"]),
            "(44 layers in all: see GetModel layers)",  # after the closest names and the top-level ones
        ),
        (
            stub.Explain,
            pb.ExplainRequest(
                model="new", images=[image], neuron=pb.NeuronTarget(layer="layer2", channel=128)
            ),
            "channel 128 is out of range for layer 'layer2' of shape [128, 28, 28]",
        ),
        (
            stub.Explain,
            pb.ExplainRequest(
                model="new", images=[image], neuron=pb.NeuronTarget(layer="fc", channel=1, y=0, x=0)
            ),
            "no spatial position",
        ),
        (
            stub.DreamUnary,
            pb.DreamRequest(
                model="new", image=pb.ImageInput(encoded=b""), layers=[pb.DreamLayer(layer="layer3")]
            ),
            "",  # an empty image is refused first; the name check needs the job
        ),
        (stub.Filters, pb.FiltersRequest(model="new", layer="bn1"), "'bn1' is a BatchNorm2d, not a Conv2d"),
        (
            stub.FeatureMaps,
            pb.FeatureMapsRequest(model="new", image=image, layers=["fc"], max_channels=257),
            "max_channels must be 0..256",
        ),
        (
            stub.Explain,
            pb.ExplainRequest(
                model="new",
                images=[image],
                method=pb.EXPLAIN_METHOD_GUIDED_GRADCAM,
                neuron=pb.NeuronTarget(layer="layer2"),
            ),
            "not guided_gradcam",
        ),
    ]
    for call, request, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert message in info.value.details()
    assert pool.submits == []
    with pytest.raises(grpc.RpcError) as unknown:
        stub.FeatureMaps(pb.FeatureMapsRequest(model="new", image=image, layers=["layer9"]), timeout=10)
    assert unknown.value.details().startswith("feature maps: the model has no layer 'layer9'; e.g. layer2, ")
    assert "conv1, bn1, fc" in unknown.value.details()


def test_without_a_table_the_gradient_process_checks(harness: tuple[Harness, RecordingPool]) -> None:
    h, pool = harness
    stub = pb_grpc.InferenceStub(h.channel)
    with pytest.raises(grpc.RpcError):
        stub.FeatureMaps(pb.FeatureMapsRequest(model="old", image=_tensor(), layers=["layer9"]), timeout=10)
    (job,) = pool.submits  # reached the pool: its process knows the module's layers
    assert job.layers == ("layer9",)
    pool.submits.clear()
