"""Serving the user's own models end to end, with real artefacts (issue 18): the README's "Serve your
own model" commands, run as written against a real server.

- evenodd: the digits LeNet-5 (the session's demo_repository one) fine-tuned into a 2-class
  even/odd model with the labels "even" and "odd", exported with `python -m export onnx lenet5
  --weights ... --labels`.
  Through Classify it must be right on >= 95% of the 360 held-out digits (sent as PNGs, so the
  server's decode path and the recorded preprocessing are what is tested).
- shapes: a small MobileNet-like CNN defined here (depthwise-separable blocks, not a zoo
  architecture), exported by torch's TorchScript exporter (batch fixed at 1), imported with
  `python -m export import` (which makes the batch dynamic). The
  server's ONNX Runtime answer (OIP ModelInfer, the raw logits) must equal ONNX Runtime run here on
  the user's own file within 1e-5; its gradient RPCs answer FAILED_PRECONDITION naming the reason.

The README's `python -m export` lines run in-process (export.__main__.main: a subprocess would cost
seconds of imports), its `cnnserve serve` line is the server (test ports, one gradient worker), its
`cnnserve classify` lines run against it (service.cli.main, with the test server's --address).
"""

from __future__ import annotations

import io
import math
import os
import re
import shlex
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from server_process import ROOT, ServerProcess
from torch import nn

from export import digits
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service._proto.inference import grpc_predict_v2_pb2 as oip
from service._proto.inference import grpc_predict_v2_pb2_grpc as oip_grpc

pytestmark = pytest.mark.integration

SHAPES = ("circle", "square", "triangle", "star")
SIDE = 64
SHAPES_PREPROCESSING = (
    '{"color_mode": "RGB", "resize": 72, "crop": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}'
)
IMPORTED_REASON = "imported ONNX model: no PyTorch module"
THREE = ("ant", "bee", "wasp")  # the classes of a fine-tuned ResNet-18


def readme_blocks() -> list[list[str]]:
    """The commands of each ```sh block in README's "Serve your own model" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Serve your own model\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [
        [line for line in block.splitlines() if line.strip() and not line.startswith("#")] for block in blocks
    ]


def run_export(line: str) -> None:
    from export.__main__ import main

    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "export"], line
    assert main(argv[3:]) == 0, line


# --- the user's artefacts --------------------------------------------------------------------------


class Separable(nn.Module):
    """MobileNet's block: depthwise 3x3, pointwise 1x1, each with batch norm and ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU6()
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.depthwise(x)))
        out: torch.Tensor = self.relu2(self.bn2(self.pointwise(x)))
        return out


class TinyMobileNet(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(Separable(8, 16, 1), Separable(16, 32, 2), Separable(32, 32, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # N x 3 x 64 x 64
        x = self.blocks(self.stem(x))
        # N x 32 x 16 x 16
        logits: torch.Tensor = self.fc(torch.flatten(self.pool(x), 1))
        return logits


def export_tiny_mobilenet(path: Path) -> None:
    """TinyMobileNet with seeded weights, exported the way many users' files were made: the
    TorchScript exporter with its defaults, so the batch dimension is fixed at 1 (the import makes
    it dynamic, and the server then runs batches of it). A fraction of a second; the dynamo
    exporter takes seconds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyMobileNet(len(SHAPES)).eval()
        for module in model.modules():  # batch-norm statistics that are not the identity
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    with warnings.catch_warnings(), torch.no_grad():
        # "the TorchScript-based ONNX export is deprecated": what users' older files were made with.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 3, SIDE, SIDE),), str(path), dynamo=False, input_names=["pixels"],
            output_names=["scores"], opset_version=17,
        )  # fmt: skip


def fine_tune_even_odd(digits_lenet5: Path, path: Path) -> float:
    """The digits LeNet-5 (the session's, trained on the training split only), its 10-way head
    replaced by a 2-way one and the whole network fine-tuned on digit % 2 for 3 epochs (a few
    seconds); saved at `path`. Returns its held-out accuracy (PyTorch)."""
    from export.models import build

    model = build("lenet5")
    model.load_state_dict(torch.load(digits_lenet5, weights_only=True))
    threads = torch.get_num_threads()
    # LeNet-5's tensors are too small for two threads to help, and on a shared 2-core machine two
    # threads made this 3x slower (15 s against 5 s, measured).
    torch.set_num_threads(1)
    try:
        return _fine_tune(model, path)
    finally:
        torch.set_num_threads(threads)


def _fine_tune(model: nn.Module, path: Path) -> float:
    from export.train import save_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.classifier[2] = nn.Linear(84, 2)
        split = digits.load_split()
        x, y = torch.from_numpy(split.x_train.copy()), torch.from_numpy(split.y_train % 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(3):
            order = torch.randperm(len(x))
            for start in range(0, len(x), 64):
                batch = order[start : start + 64]
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            predicted = model(torch.from_numpy(split.x_test.copy())).argmax(1).numpy()
    save_checkpoint(model.state_dict(), path)
    return float((predicted == split.y_test % 2).mean())


def write_three_class_resnet18(path: Path) -> None:
    """ResNet-18 with a 3-class head (seeded weights: what matters here is the head's shape, which
    the export reads from the checkpoint, and that the gradient workers run the network)."""
    from export.models import build
    from export.train import save_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build("resnet18")
        model.fc = nn.Linear(512, len(THREE))
    save_checkpoint(model.state_dict(), path)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Own:
    work: Path
    server: ServerProcess
    pytorch_accuracy: float

    @property
    def stub(self) -> pb_grpc.InferenceStub:
        return pb_grpc.InferenceStub(self.server.channel)


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory, demo_repository: Path) -> Iterator[Own]:
    work = tmp_path_factory.mktemp("own")
    accuracy = fine_tune_even_odd(demo_repository / "lenet5" / "1" / "weights.pt", work / "evenodd.pt")
    (work / "evenodd.txt").write_text("even\nodd\n")
    export_tiny_mobilenet(work / "shapes.onnx")
    (work / "shapes.txt").write_text("".join(f"{name}\n" for name in SHAPES))
    (work / "shapes.json").write_text(SHAPES_PREPROCESSING)
    (work / "digit.png").write_bytes(png(digits.render(int(digits.load_split().test_index[0]))))
    rng = np.random.default_rng(0)
    (work / "photo.png").write_bytes(png(Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))))

    commands = readme_blocks()[0]
    exports = [line for line in commands if line.startswith("python -m export ")]
    (serve,) = [line for line in commands if line.startswith("cnnserve serve ")]
    assert len(exports) == 2
    cwd = Path.cwd()
    os.chdir(work)  # the README's relative paths
    try:
        for line in exports:
            run_export(line)
        # Not in the README: a ReLU network with a head of its own, for the gradient RPCs.
        write_three_class_resnet18(work / "three.pt")
        (work / "three.txt").write_text("".join(f"{name}\n" for name in THREE))
        run_export(
            "python -m export onnx resnet18 --weights three.pt --labels three.txt --name three "
            "--repository model_repository"
        )
    finally:
        os.chdir(cwd)
    args = shlex.split(serve)[2:]
    args = [str(work / a) if args[i - 1] == "--repository" else a for i, a in enumerate(args)]
    args = [f"{a},three" if args[i - 1] == "--models" else a for i, a in enumerate(args)]  # not the README's
    server = ServerProcess(work / "model_repository", *args, "--workers", "1", "--torch-threads", "1")
    try:
        server.wait_ready()
        server.wait_serving("cnnserve.v1.Inference/gradients")
        yield Own(work, server, accuracy)
        assert server.terminate(timeout=60) == 0, server.log
    finally:
        server.kill()


def test_the_readme_commands_answer_with_the_users_labels(
    own: Own, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli import main

    monkeypatch.chdir(own.work)
    clients = [line for line in readme_blocks()[0] if line.startswith("cnnserve classify ")]
    assert len(clients) == 2
    outputs = []
    for line in clients:
        assert main([*shlex.split(line)[1:], "--address", own.server.address]) == 0, line
        outputs.append(capsys.readouterr().out)
    assert re.search(r"\b(even|odd)\b", outputs[0]), outputs[0]
    assert sum(name in outputs[1] for name in SHAPES) == 2, outputs[1]


def test_even_odd_through_classify_is_right_on_at_least_95_percent_of_held_out_digits(own: Own) -> None:
    split = digits.load_split()
    images = [pb.ImageInput(encoded=png(digits.render(int(i)))) for i in split.test_index]
    predicted = []
    for start in range(0, len(images), 8):
        response = own.stub.ClassifyBatch(
            pb.ClassifyBatchRequest(model="evenodd", top_k=1, images=images[start : start + 8]), timeout=60
        )
        assert not response.untrained
        predicted += [result.classes[0].label for result in response.results]
    truth = ["odd" if y % 2 else "even" for y in split.y_test]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
    print(
        f"even/odd LeNet-5 through Classify (PNG): {accuracy:.4f} on {len(truth)} held-out digits "
        f"(PyTorch on the same split: {own.pytorch_accuracy:.4f})"
    )
    assert accuracy >= 0.95


def test_the_imported_model_in_the_server_equals_onnxruntime_in_process(own: Own) -> None:
    x = np.random.default_rng(7).standard_normal((4, 3, SIDE, SIDE)).astype(np.float32)
    request = oip.ModelInferRequest(model_name="shapes")
    request.inputs.add(name="pixels", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    request.outputs.add(name="scores")
    response = oip_grpc.GRPCInferenceServiceStub(own.server.channel).ModelInfer(request, timeout=60)
    (meta,) = response.outputs
    assert (meta.name, list(meta.shape), meta.datatype) == ("scores", [4, len(SHAPES)], "FP32")
    served = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(4, len(SHAPES))
    session = ort.InferenceSession(str(own.work / "shapes.onnx"), providers=["CPUExecutionProvider"])
    # The user's file takes one image at a time (batch fixed at 1); the server ran the four as a batch.
    expected = np.concatenate([session.run(["scores"], {"pixels": x[i : i + 1]})[0] for i in range(len(x))])
    diff = float(np.abs(served - expected).max())
    print(f"max |ORT in the server - ORT in-process| on the imported model: {diff:.3g}")
    assert diff <= 1e-5
    # Classify and ClassifyStream answer with the user's labels.
    image = pb.ImageInput(encoded=(own.work / "photo.png").read_bytes())
    classes = own.stub.Classify(pb.ClassifyRequest(model="shapes", image=image), timeout=30).classes
    assert sorted(c.label for c in classes) == sorted(SHAPES)
    stream = own.stub.ClassifyStream(
        iter([pb.ClassifyStreamRequest(id="1", request=pb.ClassifyRequest(model="shapes", image=image))]),
        timeout=30,
    )
    (item,) = list(stream)
    assert [c.label for c in item.result.classes] == [c.label for c in classes]


def test_model_info_says_what_each_model_can_do(own: Own) -> None:
    shapes = own.stub.GetModel(pb.GetModelRequest(name="shapes", include_labels=True), timeout=10)
    assert shapes.architecture == "imported-onnx" and list(shapes.labels) == list(SHAPES)
    assert list(shapes.capabilities) == [pb.CAPABILITY_CLASSIFY]
    assert len(shapes.layers) == 0 and not shapes.HasField("features")
    assert (shapes.preprocessing.resize, shapes.preprocessing.crop) == (72, 64)
    evenodd = own.stub.GetModel(pb.GetModelRequest(name="evenodd", include_labels=True), timeout=10)
    assert evenodd.architecture == "lenet5" and list(evenodd.labels) == ["even", "odd"]
    assert evenodd.num_classes == 2 and evenodd.features.shape == [84] and len(evenodd.layers) > 0
    capabilities = set(evenodd.capabilities)
    assert {
        pb.CAPABILITY_CLASSIFY,
        pb.CAPABILITY_EMBED,
        pb.CAPABILITY_FEATURE_MAPS,
        pb.CAPABILITY_FILTERS,
    } <= (capabilities)


def test_gradient_rpcs_refuse_an_imported_model_naming_the_reason(own: Own) -> None:
    stub = own.stub
    image = pb.ImageInput(encoded=(own.work / "photo.png").read_bytes())
    calls = {
        "Explain": lambda: stub.Explain(pb.ExplainRequest(model="shapes", images=[image]), timeout=30),
        "DreamUnary": lambda: stub.DreamUnary(pb.DreamRequest(model="shapes", image=image), timeout=30),
        "Dream": lambda: list(stub.Dream(pb.DreamRequest(model="shapes", image=image), timeout=30)),
        "StylizeUnary": lambda: stub.StylizeUnary(
            pb.StylizeRequest(model="shapes", content=image, styles=[pb.StyleImage(image=image)]), timeout=30
        ),
        "FeatureMaps": lambda: stub.FeatureMaps(
            pb.FeatureMapsRequest(model="shapes", image=image, layers=["stem.0"]), timeout=30
        ),
        "Filters": lambda: stub.Filters(pb.FiltersRequest(model="shapes", layer="stem.0"), timeout=30),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (name, info.value.details())
        assert IMPORTED_REASON in (info.value.details() or ""), (name, info.value.details())
    # Embed: no features output, and the answer says what to do about it (not the zoo's re-export).
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(model="shapes", image=image), timeout=30)
    details = info.value.details() or ""
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "--features-output" in details and "python -m export onnx" not in details


def test_gradient_rpcs_work_on_the_fine_tuned_model(own: Own) -> None:
    image = pb.ImageInput(encoded=(own.work / "digit.png").read_bytes())
    maps = own.stub.FeatureMaps(
        pb.FeatureMapsRequest(model="evenodd", image=image, layers=["features.0"]), timeout=60
    )
    assert [m.layer for m in maps.maps] == ["features.0"]
    filters = own.stub.Filters(pb.FiltersRequest(model="evenodd", layer="features.0"), timeout=60)
    assert list(filters.weights.shape) == [6, 1, 5, 5]


@pytest.mark.slow
def test_the_readme_resnet50_command_exports_a_12_class_fine_tuned_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from export.models import build
    from export.repository import scan

    (line,) = readme_blocks()[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(build("resnet50", num_classes=12).state_dict(), tmp_path / "ft.pth")
    (tmp_path / "products.txt").write_text("".join(f"product {i}\n" for i in range(12)))
    (tmp_path / "products.json").write_text('{"resize": 160, "crop": 128}')
    monkeypatch.chdir(tmp_path)
    run_export(line)
    (version,) = scan(tmp_path / "model_repository", strict=True)
    meta = version.metadata
    assert meta["num_classes"] == 12 and meta["labels"][-1] == "product 11"
    assert meta["input"]["shape"] == [3, 128, 128] and meta["capabilities"]["explain"]


def test_the_gradient_rpcs_work_on_a_fine_tuned_model_with_its_own_classes(own: Own) -> None:
    """`python -m export onnx resnet18 --weights` with a 3-class head: Explain explains the user's
    classes (a saliency map of the image's size), Dream and FeatureMaps run on its network."""
    stub = own.stub
    image = pb.ImageInput(encoded=(own.work / "photo.png").read_bytes())
    info = stub.GetModel(pb.GetModelRequest(name="three", include_labels=True), timeout=10)
    assert (info.num_classes, list(info.labels)) == (3, list(THREE))
    assert {pb.CAPABILITY_EXPLAIN, pb.CAPABILITY_DREAM, pb.CAPABILITY_FEATURE_MAPS} <= set(info.capabilities)
    explained = stub.Explain(
        pb.ExplainRequest(model="three", images=[image], target_classes=[2]), timeout=120
    ).explanations[0]
    assert (explained.explained.index, explained.explained.label) == (2, "wasp")
    assert explained.predicted.label in THREE
    saliency = np.frombuffer(explained.saliency.data, dtype="<f4")
    assert saliency.size == math.prod(explained.saliency.shape) and np.abs(saliency).max() > 0
    assert explained.png.startswith(b"\x89PNG")
    dream = stub.DreamUnary(
        pb.DreamRequest(
            model="three", image=image, layers=[pb.DreamLayer(layer="layer2")], octaves=1, steps=2
        ),
        timeout=120,
    )
    assert dream.png.startswith(b"\x89PNG")
    maps = stub.FeatureMaps(pb.FeatureMapsRequest(model="three", image=image, layers=["layer1"]), timeout=60)
    assert [m.layer for m in maps.maps] == ["layer1"]
