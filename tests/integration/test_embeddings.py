"""Embeddings end to end against a real server (the session's lenet5, trained on the digits, and
resnet18 with random weights): Embed and EmbedStream over gRPC, the features equal to PyTorch's
penultimate activations, the real-data oracle (1-NN on the trained LeNet-5's embeddings), and
`cnnserve score --embeddings`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from server_process import ServerProcess

from export import digits
from export.models import build, get_spec
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.cli import main
from service.client import score

pytestmark = pytest.mark.integration


def tensor(x: np.ndarray) -> pb.ImageInput:
    x = np.ascontiguousarray(x, dtype="<f4")
    return pb.ImageInput(tensor=pb.Tensor(shape=list(x.shape), dtype="float32", data=x.tobytes()))


def vector(response: pb.EmbedResponse) -> np.ndarray:
    return np.frombuffer(response.embedding.data, dtype="<f4").reshape(list(response.embedding.shape))


def embed_stream(stub: pb_grpc.InferenceStub, model: str, xs: np.ndarray) -> np.ndarray:
    requests = (
        pb.EmbedStreamRequest(
            id=str(i), request=pb.EmbedRequest(model=model, image=tensor(x), normalize=True)
        )
        for i, x in enumerate(xs)
    )
    out = np.empty((len(xs), 84), dtype=np.float32)
    answered = 0
    for response in stub.EmbedStream(requests, timeout=300):
        assert response.WhichOneof("outcome") == "result", response.error
        out[int(response.id)] = vector(response.result)
        answered += 1
    assert answered == len(xs)
    return out


def test_trained_lenet5_embeddings_find_the_digit_by_nearest_neighbour(server: ServerProcess) -> None:
    """The oracle on real data: the 360 held-out digits, each classified by its nearest neighbour
    (cosine) among the 1,437 training digits' embeddings, all computed by the server."""
    stub = pb_grpc.InferenceStub(server.channel)
    split = digits.load_split()
    assert (len(split.x_train), len(split.x_test)) == (1437, 360)
    train = embed_stream(stub, "lenet5", split.x_train)  # EmbedStream, L2-normalized

    def one(x: np.ndarray) -> np.ndarray:
        response = stub.Embed(pb.EmbedRequest(model="lenet5", image=tensor(x)), timeout=30)
        v = vector(response)
        assert v.shape == (84,) and response.norm == pytest.approx(float(np.linalg.norm(v)), rel=1e-5)
        return v / response.norm

    with ThreadPoolExecutor(8) as pool:  # unary Embed, normalized here from the norm it reports
        test = np.stack(list(pool.map(one, split.x_test)))
    nearest = (test @ train.T).argmax(axis=1)
    accuracy = float((split.y_train[nearest] == split.y_test).mean())
    print(f"1-NN cosine accuracy of the trained LeNet-5's embeddings on 360 held-out digits: {accuracy:.4f}")
    assert accuracy >= 0.95


def test_embed_equals_the_pytorch_penultimate_activations(
    server: ServerProcess, demo_repository: Path
) -> None:
    stub = pb_grpc.InferenceStub(server.channel)
    model = build("resnet18")
    model.load_state_dict(torch.load(demo_repository / "resnet18" / "1" / "weights.pt", weights_only=True))
    captured: list[torch.Tensor] = []
    model.get_submodule(get_spec("resnet18").head).register_forward_hook(
        lambda _m, i, _o: captured.append(i[0])
    )
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    expected = captured[0].numpy()
    for i in range(2):
        response = stub.Embed(pb.EmbedRequest(model="resnet18", image=tensor(x[i]), top_k=3), timeout=60)
        got = vector(response)
        assert got.shape == (512,)
        assert float(np.abs(got - expected[i]).max()) / float(np.abs(expected[i]).max()) <= 1e-4
        assert [c.index for c in response.classes] == list(np.argsort(-logits[i])[:3])
    info = stub.GetModel(pb.GetModelRequest(name="resnet18"))
    assert list(info.features.shape) == [512] and pb.CAPABILITY_EMBED in info.capabilities


def test_score_embeddings_of_a_directory(server: ServerProcess, tmp_path: Path) -> None:
    root = tmp_path / "digits"
    root.mkdir()
    for index in (int(i) for i in digits.split_indices()[1][:20]):
        digits.render(index).save(root / f"{index:04d}.png", "PNG")
    out, vectors = tmp_path / "rows.jsonl", tmp_path / "vectors"
    argv = ["score", str(root), "--address", server.address, "--model", "lenet5", "--quiet"]
    assert (
        main([*argv, "-o", str(out), "--embeddings", str(vectors), "--shard-rows", "8", "--top-k", "1"]) == 0
    )
    paths, matrix = score.read_embeddings(str(out), str(vectors))
    assert sorted(paths) == sorted(str(p) for p in root.iterdir()) and matrix.shape == (20, 84)
    assert len(list(vectors.iterdir())) == 3  # 8 + 8 + 4
    stub = pb_grpc.InferenceStub(server.channel)
    for path, v in zip(paths[:3], matrix[:3], strict=True):
        single = stub.Embed(
            pb.EmbedRequest(model="lenet5", image=pb.ImageInput(encoded=Path(path).read_bytes())), timeout=30
        )
        np.testing.assert_allclose(v, vector(single), rtol=1e-5, atol=1e-6)
