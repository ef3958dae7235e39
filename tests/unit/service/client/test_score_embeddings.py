"""`cnnserve score --embeddings DIR`: vectors in .npy shards indexed by the rows file, resumable and
shardable, never a row without its vector. Against an in-process fake Inference server whose
embedding of an image is a function of its bytes, so every vector can be recomputed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.cli import main
from service.client import score

DIM = 6


def expected_vector(data: bytes, normalize: bool = False) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(data)).standard_normal(DIM).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32) if normalize else v


class EmbedInference(pb_grpc.InferenceServicer):
    """EmbedStream: the vector of the image's bytes; "bad*" images are INVALID_ARGUMENT; top_k
    classes when asked. `delay_s` per item. Classify streams are not used by --embeddings."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.items = 0
        self.delay_s = delay_s
        self.requests: list[pb.EmbedRequest] = []

    def EmbedStream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        for item in request_iterator:
            self.items += 1
            self.requests.append(item.request)
            time.sleep(self.delay_s)
            request = item.request
            if request.image.encoded.startswith(b"bad"):
                yield pb.EmbedStreamResponse(id=item.id, error=pb.Status(code=3, message="not an image"))
                continue
            v = expected_vector(request.image.encoded, request.normalize)
            result = pb.EmbedResponse(
                model=request.model,
                version=request.version or 1,
                embedding=pb.Tensor(shape=[DIM], dtype="float32", data=v.astype("<f4").tobytes()),
                classes=[pb.ClassScore(index=2, label="two", probability=0.5)][: request.top_k],
            )
            yield pb.EmbedStreamResponse(id=item.id, result=result)


def serve(servicer: EmbedInference) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def fake() -> Iterator[tuple[str, EmbedInference]]:
    servicer = EmbedInference()
    server, address = serve(servicer)
    yield address, servicer
    server.stop(None)


def images(folder: Path, n: int, bad: tuple[int, ...] = ()) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for i in range(n):
        data = (b"bad %d" if i in bad else b"png %d") % i
        path = folder / f"{i:03d}.png"
        path.write_bytes(data)
        made[str(path)] = data
    return made


def run(address: str, *args: str) -> int:
    return main(["score", "--address", address, "--quiet", "--model", "m", *args])


def test_vectors_land_in_shards_indexed_by_the_rows(tmp_path: Path, fake: tuple[str, EmbedInference]) -> None:
    address, servicer = fake
    made = images(tmp_path / "in", 10, bad=(4,))
    out, vectors = tmp_path / "scores.jsonl", tmp_path / "vectors"
    assert (
        run(address, str(tmp_path / "in"), "-o", str(out), "--embeddings", str(vectors), "--shard-rows", "4")
        == 1
    )
    assert sorted(p.name for p in vectors.iterdir()) == [
        "scores-00000.npy",
        "scores-00001.npy",
        "scores-00002.npy",
    ]
    assert [np.load(p).shape for p in sorted(vectors.iterdir())] == [(4, DIM), (4, DIM), (1, DIM)]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and sum(bool(r["error"]) for r in rows) == 1
    bad = next(r for r in rows if r["error"])
    assert (
        bad["path"].endswith("004.png")
        and "embedding" not in bad
        and bad["error"].startswith("INVALID_ARGUMENT")
    )
    assert all(r["classes"] == [] for r in rows)  # classes only with --top-k
    paths, matrix = score.read_embeddings(str(out), str(vectors))
    assert sorted(paths) == sorted(p for p in made if not p.endswith("004.png"))
    assert matrix.dtype == np.float32 and matrix.shape == (9, DIM)
    for path, v in zip(paths, matrix, strict=True):
        np.testing.assert_array_equal(v, expected_vector(made[path]))
    assert not servicer.requests[0].normalize and servicer.requests[0].top_k == 0


def test_resume_adds_a_new_shard_and_never_repeats(tmp_path: Path, fake: tuple[str, EmbedInference]) -> None:
    address, servicer = fake
    images(tmp_path / "in", 6)
    out, vectors = tmp_path / "s.csv", tmp_path / "v"
    argv = [str(tmp_path / "in" / "00[0-2].png"), "-o", str(out), "--embeddings", str(vectors)]
    assert run(address, *argv, "--top-k", "1", "--normalize") == 0
    argv[0] = str(tmp_path / "in")
    assert run(address, *argv, "--top-k", "1", "--normalize") == 0
    assert servicer.items == 6  # the first three were not sent again
    assert sorted(p.name for p in vectors.iterdir()) == ["s-00000.npy", "s-00001.npy"]
    lines = out.read_text().splitlines()
    assert lines[0] == score.csv_header(embeddings=True).strip() and len(lines) == 7
    assert lines[1].endswith(",s-00000.npy:0") and ",two," in lines[1]
    paths, matrix = score.read_embeddings(str(out), str(vectors))
    assert len(paths) == 6
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, rtol=1e-6)


def test_mixing_runs_with_and_without_vectors_is_refused(
    tmp_path: Path, fake: tuple[str, EmbedInference]
) -> None:
    address, _ = fake
    images(tmp_path / "in", 2)
    out, vectors = tmp_path / "s.jsonl", tmp_path / "v"
    assert run(address, str(tmp_path / "in"), "-o", str(out), "--embeddings", str(vectors)) == 0
    before = out.read_bytes()
    assert run(address, str(tmp_path / "in"), "-o", str(out)) == 2  # would write rows without vectors
    assert (
        run(address, str(tmp_path / "in"), "-o", str(out), "--embeddings", str(tmp_path / "elsewhere")) == 2
    )
    assert out.read_bytes() == before
    with pytest.raises(SystemExit):
        run(address, str(tmp_path / "in"), "--embeddings", str(vectors))  # no rows file: no index


def test_sigterm_writes_the_partial_shard_with_its_rows_and_a_rerun_finishes(tmp_path: Path) -> None:
    """A real process stopped mid-run: every row it wrote names a vector that is there."""
    server, address = serve(EmbedInference(delay_s=0.01))
    try:
        made = images(tmp_path / "in", 200)
        out, vectors = tmp_path / "s.jsonl", tmp_path / "v"
        argv = ["score", str(tmp_path / "in"), "--address", address, "--model", "m", "-o", str(out)]
        argv += ["--embeddings", str(vectors), "--shard-rows", "16"]
        root = Path(__file__).resolve().parents[4]
        process = subprocess.Popen(
            [sys.executable, "-m", "service", *argv, "--quiet"], cwd=root, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while (not out.exists() or out.read_text().count("\n") < 20) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 128 + signal.SIGTERM, err
        paths, matrix = score.read_embeddings(str(out), str(vectors))
        assert 20 <= len(paths) < 200
        for path, v in zip(paths, matrix, strict=True):
            np.testing.assert_array_equal(v, expected_vector(made[path]))
        assert main([*argv, "--quiet"]) == 0
        paths, matrix = score.read_embeddings(str(out), str(vectors))
        assert sorted(paths) == sorted(made)
        for path, v in zip(paths, matrix, strict=True):
            np.testing.assert_array_equal(v, expected_vector(made[path]))
    finally:
        server.stop(None)
