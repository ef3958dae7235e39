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


def test_max_concurrent_rpcs_caps_rest_calls_with_a_429() -> None:
    """The REST calls in progress are capped like gRPC's (max_concurrent_rpcs): one over is a 429
    naming the setting, with Retry-After, and the cap frees as calls finish."""
    import asyncio
    import json

    from starlette.responses import Response

    h = Harness(FakeEngine(), http_port=_free_port(), max_concurrent_rpcs=1)
    try:
        api = h.server.rest_api
        assert api is not None

        async def scenario() -> tuple[int, dict[str, object], str, int]:
            release = asyncio.Event()

            async def slow(rpc: object) -> Response:
                await release.wait()
                return Response(status_code=200)

            async def quick(rpc: object) -> Response:
                return Response(status_code=200)

            first = asyncio.create_task(api._call("ModelInfer", slow))
            await asyncio.sleep(0.05)
            refused = await api._call("ModelInfer", quick)
            release.set()
            await first
            after = await api._call("ModelInfer", quick)
            body = json.loads(bytes(refused.body))
            return refused.status_code, body, refused.headers.get("retry-after", ""), after.status_code

        status, body, retry_after, after = h.run(scenario())
        assert status == 429 and "max_concurrent_rpcs is 1" in str(body["error"]) and retry_after == "1"
        assert after == 200
    finally:
        h.close()
