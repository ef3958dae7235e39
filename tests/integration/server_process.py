"""A real `python -m service serve` subprocess for the integration tests (see conftest.py)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening grpc=(?P<grpc>\S+) metrics=(?P<metrics>\S+) http=(?P<http>\S+)")
SERVING = health_pb2.HealthCheckResponse.SERVING

# The shared server's caps (conftest.server), small so the limits are cheap to reach.
MAX_IMAGES = 8
MAX_MESSAGE_BYTES = 1024 * 1024


def clean_env() -> dict[str, str]:
    """The test process's environment without CNNSERVE_* (a developer's settings must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A `python -m service serve` subprocess and what a test needs to talk to it."""

    def __init__(
        self,
        repository: Path,
        *extra_args: str,
        launcher: Sequence[str] = ("-m", "service"),
        command: str = "serve",
    ) -> None:
        """launcher: what follows the interpreter and precedes `serve` (test_crash_recovery starts
        the server through a test-only module that wraps the gradient handler). command: the
        subcommand, "serve" or "worker" (the gradient-worker tier, test_worker_tier)."""
        # Classification tests need no PyTorch worker: spawning one costs seconds of CPU on a 2-core
        # CI machine. Tests of the gradient RPCs pass --workers N explicitly.
        if not any(a == "--workers" or a.startswith("--workers=") for a in extra_args):
            extra_args = ("--workers", "0", *extra_args)
        # REST on a free port (http_port 0 turns it off rather than picking one), unless the test
        # says otherwise; the gradient tier serves no REST.
        if command == "serve" and not any(a.startswith("--http-port") for a in extra_args):
            extra_args = ("--http-port", str(free_port()), *extra_args)
        self.args = [
            sys.executable, *launcher, command,
            "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
            "--repository", str(repository), "--log-format", "text", *extra_args,
        ]  # fmt: skip
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.address = ""
        self.metrics_address = ""
        self.http_address = ""  # host:port of REST, "off" when it is
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, env=clean_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, name="server-log", daemon=True)
        self._reader.start()
        self._channel: grpc.Channel | None = None

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            match = LISTENING.search(line)
            if match and not self._listening.is_set():
                self.address, self.metrics_address = match["grpc"], match["metrics"]
                self.http_address = match["http"]
                self._listening.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_listening(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"server did not start listening (exit {self.process.poll()}):\n{self.log}"
                )

    def wait_ready(self, timeout: float = 180.0) -> None:
        self.wait_listening(timeout)
        self.wait_serving("", timeout)

    def wait_serving(self, service: str, timeout: float = 180.0) -> None:
        """Until health `service` is SERVING (e.g. GRADIENTS_SERVICE: a gradient worker is up)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"health {service!r} not SERVING after {timeout}s:\n{self.log}")

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def new_channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.metrics_address}{path}", timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of GET /metrics, parsed with prometheus_client's parser."""
        status, body = self.http_get("/metrics")
        assert status == 200, body
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the exit status."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._reader.join(5)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        if self.process.stdout is not None:
            self.process.stdout.close()


def module_server(
    repository: Path, *extra_args: str, launcher: Sequence[str] = ("-m", "service")
) -> Iterator[ServerProcess]:
    """Body of a module-scoped server fixture: one ready server shared by a test module."""
    server = ServerProcess(repository, *extra_args, launcher=launcher)
    try:
        server.wait_ready()
        yield server
        code = server.terminate(timeout=60)
        assert code == 0, f"server exited with {code}:\n{server.log}"
    finally:
        server.kill()
