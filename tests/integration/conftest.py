"""Integration fixtures: a demo model repository built once per session with the export CLI, and
real `python -m service serve` processes on 127.0.0.1 (ports chosen by the OS, read from the
server's `listening grpc=... metrics=...` log line)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from server_process import MAX_IMAGES, MAX_MESSAGE_BYTES, ROOT, ServerProcess, clean_env, module_server


def _run(args: Sequence[str], timeout: float) -> None:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"`python {' '.join(args)}` failed ({result.returncode}):\n{result.stderr[-4000:]}"
        )


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lenet5 v1 trained on the digits (its held-out split untouched) and resnet18 v1 with random
    weights, exported with the export CLI exactly as a user would."""
    base = tmp_path_factory.mktemp("demo")
    repository = base / "repository"
    checkpoint = base / "lenet5.pt"
    _run(["-m", "export", "train", "lenet5", "--out", str(checkpoint)], timeout=600)
    _run(
        ["-m", "export", "onnx", "lenet5", "--weights", str(checkpoint), "--repository", str(repository)], 600
    )
    _run(["-m", "export", "onnx", "resnet18", "--repository", str(repository)], timeout=600)
    return repository


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start_server(repository, *flags) -> ServerProcess (listening, not necessarily ready);
    every server started is stopped after the test."""
    started: list[ServerProcess] = []

    def start(repository: Path, *extra_args: str) -> ServerProcess:
        server = ServerProcess(repository, *extra_args)
        started.append(server)
        return server

    yield start
    for server in started:
        try:
            if server.process.poll() is None:
                server.terminate(timeout=30)
        finally:
            server.kill()


@pytest.fixture(scope="session")
def server(demo_repository: Path) -> Iterator[ServerProcess]:
    """One server for the API tests (test_inference_api, test_oip): lenet5 and resnet18, at most
    MAX_IMAGES images per request and MAX_MESSAGE_BYTES, so the receive limit is
    MAX_IMAGES * 3*224*224*4 + 1 MiB (about 5.8 MB). It must exit 0 on SIGTERM at the end."""
    yield from module_server(
        demo_repository,
        "--max-images-per-request", str(MAX_IMAGES),
        "--max-message-bytes", str(MAX_MESSAGE_BYTES),
        "--max-queue-delay-s", "0.01",
    )  # fmt: skip


@pytest.fixture(scope="session")
def tritonclient_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a venv of its own holding `tritonclient[http]` (from PyPI, through pip's
    cache): the client a Triton user already has, kept apart from this project's packages."""
    venv = tmp_path_factory.mktemp("tritonclient") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--prefer-binary",
         "tritonclient[http]>=2.40,<3", "requests>=2.31"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if install.returncode != 0:
        raise RuntimeError(f"pip install tritonclient[http] failed:\n{install.stderr[-4000:]}")
    return python
