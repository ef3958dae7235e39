"""The metrics HTTP endpoint: `GET /metrics` (Prometheus exposition) and `GET /healthz`, nothing else.

prometheus_client.start_http_server answers every path with the metrics; this server answers only
the two documented paths (404 elsewhere, 405 for other methods on them), binds only the configured
host, and runs in daemon threads so a slow scraper never touches the event loop.

`/healthz` is the readiness answer for HTTP probes: 200 "ok" while the server is ready (models
warmed up, not shutting down), 503 with the reason otherwise. Liveness is better probed over gRPC
(inference.GRPCInferenceService/ServerLive or grpc.health.v1.Health).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

# (ready?, reason shown when not ready)
ReadinessProbe = Callable[[], tuple[bool, str]]
ALLOWED_PATHS = ("/metrics", "/healthz")


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsServer
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds a client may take to send its request: a stuck scraper frees its thread
    server_version = "cnnserve-metrics"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's naming
        path = urlsplit(self.path).path
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            try:
                body = encoder(self.server.registry)
            except Exception:  # noqa: BLE001 - a broken collector must not kill the endpoint silently
                log.exception("collecting metrics failed")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"collecting metrics failed\n")
                return
            self._send(HTTPStatus.OK, body, content_type)
        elif path == "/healthz":
            ready, reason = self.server.readiness()
            if ready:
                self._send(HTTPStatus.OK, b"ok\n")
            else:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {reason}\n".encode())
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found: only GET /metrics and GET /healthz\n")

    def _not_allowed(self) -> None:
        path = urlsplit(self.path).path
        if path in ALLOWED_PATHS:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed: use GET\n", allow="GET")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found: only GET /metrics and GET /healthz\n")

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed  # noqa: N815

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        allow: str | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's signature
        log.debug("metrics http: %s - %s", self.address_string(), format % args)


class _MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], registry: CollectorRegistry, readiness: ReadinessProbe, family: int
    ) -> None:
        self.address_family = family
        self.registry = registry
        self.readiness = readiness
        super().__init__(address, _Handler)


class MetricsHTTPServer:
    """`GET /metrics` and `GET /healthz` on host:port, served from a background thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, readiness: ReadinessProbe) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._httpd = _MetricsServer((host, port), registry, readiness, family)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the chosen one when constructed with port 0)."""
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.25},
            name="cnnserve-metrics",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()
