"""The REST server's sockets (service/frontend/rest.py): what the integration tests cannot see."""

from __future__ import annotations

import socket
import time

from servicer_fakes import FakeEngine, Harness


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_accepted_connections_have_nagle_off() -> None:
    """uvicorn writes an answer's headers and body separately: with Nagle on, the body waited for
    the client's delayed ACK, 40 ms per call. asyncio turns Nagle off only on sockets whose proto
    is TCP, so the listening socket must be made with IPPROTO_TCP."""
    h = Harness(FakeEngine(), http_port=_free_port())
    try:
        assert h.server.rest_server is not None
        with socket.create_connection(("127.0.0.1", h.server.http_port), timeout=5) as client:
            client.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(1024).startswith(b"HTTP/1.1 200")
            deadline = time.monotonic() + 5
            connections: list = []
            while not connections and time.monotonic() < deadline:
                connections = list(h.server.rest_server._server.server_state.connections)
            (connection,) = connections
            accepted = connection.transport.get_extra_info("socket")
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        h.close()
