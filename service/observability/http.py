"""The metrics HTTP endpoint: `GET /metrics` (Prometheus exposition) and `GET /healthz`, nothing else.

prometheus_client.start_http_server answers every path with the metrics; this server answers only
`GET` on the two documented paths and 404 to everything else: any other path, and any other method
(HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE, CONNECT, made-up ones) on any path, the two
included. One answer for everything that is not ours means a scanner learns nothing about what
else might exist (no 405/Allow, no 501). It binds only the configured host and runs in daemon
threads so a slow scraper never touches the event loop.

`/healthz` is the readiness answer for HTTP probes: 200 "ok" while the server is ready (models
warmed up, not shutting down), 503 with the reason otherwise. Liveness is better probed over gRPC
(inference.GRPCInferenceService/ServerLive or grpc.health.v1.Health).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

# (ready?, reason shown when not ready)
ReadinessProbe = Callable[[], tuple[bool, str]]
NOT_FOUND_BODY = b"not found: only GET /metrics and GET /healthz\n"
COLLECT_ATTEMPTS = 3
COLLECT_RETRY_S = 0.02


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
            body = self._collect(encoder)
            if body is None:
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
            self._not_found()

    def _collect(self, encoder: Callable[[CollectorRegistry], bytes]) -> bytes | None:
        """The exposition, or None when collecting fails COLLECT_ATTEMPTS times in a row. Under
        `serve --frontends N` the registry reads every process's metrics file, and a file a process
        is creating that very moment can read as truncated (a fresh-clone CI run saw one scrape fail
        while a replacement supervisor's children started): such a read is retried, not answered
        500."""
        for attempt in range(COLLECT_ATTEMPTS):
            try:
                return encoder(self.server.registry)
            except Exception:  # noqa: BLE001 - a broken collector must not kill the endpoint silently
                if attempt == COLLECT_ATTEMPTS - 1:
                    log.exception("collecting metrics failed")
                    return None
                time.sleep(COLLECT_RETRY_S)
        return None

    def _not_found(self) -> None:
        if self.command != "GET":
            # Its body (if any) is left unread: close rather than parse it as the next request.
            self.close_connection = True
        self._send(HTTPStatus.NOT_FOUND, NOT_FOUND_BODY)

    def __getattr__(self, name: str) -> Any:
        # BaseHTTPRequestHandler dispatches method X to do_X and answers 501 when there is none:
        # every method but GET (the standard ones and made-up ones alike) gets the same 404.
        if name.startswith("do_"):
            return self._not_found
        raise AttributeError(name)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
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
