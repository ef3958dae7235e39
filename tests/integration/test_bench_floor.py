"""bench.floor, the minimal Python server `make bench` compares cnnserve with, does the same work:
for the same images it answers what the real server answers (so it is a fair floor), its
--no-model variant skips only the model, and it stops cleanly on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from server_process import ROOT, ServerProcess, clean_env
from test_inference_api import digit_png, held_out

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


def _start_floor(model_dir: Path, *flags: str) -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", str(model_dir), *flags],
        cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if match := re.search(r"listening (\S+)", line):
                break
        else:
            raise AssertionError(f"bench.floor did not start: {''.join(lines)}")
        yield match[1]
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture
def floor(demo_repository: Path) -> Iterator[str]:
    yield from _start_floor(demo_repository / "lenet5" / "1")


@pytest.fixture
def floor_no_model(demo_repository: Path) -> Iterator[str]:
    yield from _start_floor(demo_repository / "lenet5" / "1", "--no-model")


def _classify(address: str, image: bytes, top_k: int) -> pb.ClassifyResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.InferenceStub(channel).Classify(
            pb.ClassifyRequest(model="lenet5", image=pb.ImageInput(encoded=image), top_k=top_k), timeout=60
        )


def test_floor_answers_what_the_server_answers(floor: str, server: ServerProcess) -> None:
    for index in held_out()[:8]:
        image = digit_png(index)
        ours, minimal = _classify(server.address, image, 3), _classify(floor, image, 3)
        assert [c.index for c in minimal.classes] == [c.index for c in ours.classes]
        assert [c.label for c in minimal.classes] == [c.label for c in ours.classes]
        for a, b in zip(minimal.classes, ours.classes, strict=True):
            assert a.probability == pytest.approx(b.probability, abs=1e-5)
        assert (minimal.model, minimal.version) == (ours.model, ours.version)


def test_floor_without_the_model_answers_uniform_probabilities(floor_no_model: str) -> None:
    response = _classify(floor_no_model, digit_png(held_out()[0]), 10)
    assert [c.index for c in response.classes] == list(range(10))  # ties: lower index first
    assert all(c.probability == pytest.approx(0.1) for c in response.classes)
