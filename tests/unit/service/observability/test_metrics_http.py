"""service.observability.http: GET /metrics and GET /healthz, and one 404 for everything else."""

from __future__ import annotations

import http.client
import socket
import struct
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Metric

from service.observability.http import NOT_FOUND_BODY, MetricsHTTPServer

METHODS = ("HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "BREW")
PATHS = (
    "/metrics",
    "/healthz",
    "/",
    "/metrics/",
    "/metrics/x",
    "/debug/pprof",
    "/-/reload",
    "/../etc/passwd",
)


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    registry = CollectorRegistry()
    Counter("cnnserve_test_total", "a counter", registry=registry).inc()
    server = MetricsHTTPServer("127.0.0.1", 0, registry, lambda: (True, ""))
    server.start()
    try:
        yield server.port
    finally:
        server.stop()


def request(
    port: int, method: str, path: str, body: bytes | None = None
) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


def raw(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_get_metrics_and_healthz(port: int) -> None:
    status, body, headers = request(port, "GET", "/metrics")
    assert status == 200 and b"cnnserve_test_total 1.0" in body
    assert headers["Content-Type"].startswith("text/plain")
    assert request(port, "GET", "/metrics?name[]=x")[0] == 200
    assert request(port, "GET", "/healthz")[:2] == (200, b"ok\n")


class _Flaky:
    """A collector that fails its first `failures` collections (a metrics file read mid-write)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def collect(self) -> Iterator[Metric]:
        if self.failures > 0:
            self.failures -= 1
            raise struct.error("unpack_from requires a buffer of at least 8 bytes")
        yield from Counter("cnnserve_flaky_total", "a counter", registry=None).collect()


@pytest.mark.parametrize(("failures", "status"), [(2, 200), (3, 500)])
def test_a_failed_collection_is_retried_before_it_is_a_500(failures: int, status: int) -> None:
    registry = CollectorRegistry()
    registry.register(_Flaky(failures))  # type: ignore[arg-type]
    server = MetricsHTTPServer("127.0.0.1", 0, registry, lambda: (True, ""))
    server.start()
    try:
        got, body, _ = request(server.port, "GET", "/metrics")
        assert got == status
        assert (b"cnnserve_flaky_total 0.0" in body) == (status == 200)
    finally:
        server.stop()


@pytest.mark.parametrize("path", [p for p in PATHS if p not in ("/metrics", "/healthz")])
def test_get_on_any_other_path_is_404(port: int, path: str) -> None:
    status, body, _ = request(port, "GET", path)
    assert (status, body) == (404, NOT_FOUND_BODY)


@pytest.mark.parametrize("method", METHODS)
def test_every_other_method_on_every_path_is_404(port: int, method: str) -> None:
    for path in PATHS:
        status, body, headers = request(
            port, method, path, body=b"x=1" if method in ("POST", "PUT") else None
        )
        assert status == 404, (method, path, status)
        assert "Allow" not in headers  # no hint about what else a path might accept
        assert body == (b"" if method == "HEAD" else NOT_FOUND_BODY), (method, path)


def test_a_body_left_unread_is_never_parsed_as_a_request(port: int) -> None:
    # A POST whose body is itself a GET request: the server answers 404 and closes the connection
    # instead of reading on and answering the smuggled request.
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = raw(
        port,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled,
    )
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert answer.count(b"HTTP/1.1 ") == 1, answer


def test_made_up_methods_get_404_not_501(port: int) -> None:
    answer = raw(port, b"M-SEARCH /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:80]
