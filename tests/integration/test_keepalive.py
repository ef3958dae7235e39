"""Keepalive: a client with service.client's documented keepalive settings is never disconnected
with GOAWAY `too_many_pings`, on an idle connection or under a long-lived call.

The documented settings are client pings every DEFAULT_KEEPALIVE_S (30 s) against a server that
tolerates client pings down to keepalive_min_client_ping_s (10 s) and pings every keepalive_time_s
(30 s) itself. Watching two 30 s intervals would cost a minute, so every interval is scaled by
SCALE, keeping their ratios: the client pings every 7.5 s, the server tolerates 2.5 s and pings
every 7.5 s. (Ping ack timeouts are not scaled: they only matter for a dead peer, and a short one
would make the test flaky under load.)

A control client on the same server pings every second, faster than it tolerates, and *is*
disconnected with too_many_pings within the same window: the detection demonstrably works.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import ServerProcess, module_server

from service.client import DEFAULT_KEEPALIVE_S, DEFAULT_KEEPALIVE_TIMEOUT_S, default_channel_options
from service.settings import Settings

pytestmark = pytest.mark.integration

SCALE = 0.25


def default(setting: str) -> float:
    """The shipped default of a setting (not what this machine's CNNSERVE_* variables say)."""
    return float(Settings.model_fields[setting].default)


CLIENT_KEEPALIVE_S = DEFAULT_KEEPALIVE_S * SCALE
SERVER_MIN_CLIENT_PING_S = default("keepalive_min_client_ping_s") * SCALE
SERVER_KEEPALIVE_S = default("keepalive_time_s") * SCALE
WINDOW_S = 2 * CLIENT_KEEPALIVE_S + 1.0  # two client keepalive intervals, and a little more
# gRPC clients never ping more often than once a second, whatever keepalive_time they ask for.
CONTROL_KEEPALIVE_S = 1.0


def test_the_documented_client_keepalive_respects_the_server_defaults() -> None:
    """Unscaled: the shipped client default pings well above the shipped server's minimum, and the
    server's own pings get acked long before its timeout on any live connection."""
    assert DEFAULT_KEEPALIVE_S >= 2 * default("keepalive_min_client_ping_s")
    assert DEFAULT_KEEPALIVE_TIMEOUT_S <= DEFAULT_KEEPALIVE_S
    assert default("max_connection_age_s") > default("keepalive_time_s")
    options = dict(default_channel_options())
    assert options["grpc.keepalive_time_ms"] == DEFAULT_KEEPALIVE_S * 1000
    assert options["grpc.keepalive_permit_without_calls"] == 1


@dataclass
class Watched:
    """A channel, every connectivity state it went through, and an open Health.Watch stream."""

    channel: grpc.Channel
    states: list[grpc.ChannelConnectivity] = field(default_factory=list)
    stream_error: list[grpc.RpcError] = field(default_factory=list)
    call: grpc.Future | None = None
    reader: threading.Thread | None = None

    def watch(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        self.call = stub.Watch(health_pb2.HealthCheckRequest(service=""))

        def read() -> None:
            try:
                for _ in self.call:  # type: ignore[union-attr]
                    pass
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    self.stream_error.append(exc)

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def check(self) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status

    def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.reader is not None:
            self.reader.join(10)
        self.channel.close()


_CHANNEL_IDS = itertools.count()


def connect(server: ServerProcess, keepalive_s: float, *, stream: bool) -> Watched:
    # Every channel gets its own connection: equal channel arguments would share one subchannel.
    options = [
        *default_channel_options(keepalive_s=keepalive_s),
        ("cnnserve.test.channel", next(_CHANNEL_IDS)),
    ]
    watched = Watched(grpc.insecure_channel(server.address, options=options))
    watched.channel.subscribe(watched.states.append, try_to_connect=True)
    assert watched.check() == health_pb2.HealthCheckResponse.SERVING
    if stream:
        watched.watch()
    return watched


@pytest.fixture(scope="module", params=["1", "2"], ids=["one-process", "two-frontends"])
def keepalive_server(demo_repository: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """In one process, and under `serve --frontends 2` (each frontend applies the same keepalive)."""
    yield from module_server(
        demo_repository, "--models", "lenet5", "--max-batch-size", "1",
        "--keepalive-time-s", str(SERVER_KEEPALIVE_S),
        "--keepalive-min-client-ping-s", str(SERVER_MIN_CLIENT_PING_S),
        "--frontends", request.param,
    )  # fmt: skip


def _stays_ready(watched: Watched) -> None:
    ready = grpc.ChannelConnectivity.READY
    assert ready in watched.states
    after = watched.states[watched.states.index(ready) :]
    # Any GOAWAY (too_many_pings or otherwise) would take the channel out of READY.
    assert after == [ready], after
    assert watched.stream_error == [], [e.details() for e in watched.stream_error]
    assert watched.check() == health_pb2.HealthCheckResponse.SERVING


def test_documented_keepalive_sees_no_too_many_pings_over_two_intervals(
    keepalive_server: ServerProcess,
) -> None:
    assert SERVER_MIN_CLIENT_PING_S > CONTROL_KEEPALIVE_S
    idle = connect(keepalive_server, CLIENT_KEEPALIVE_S, stream=False)
    busy = connect(keepalive_server, CLIENT_KEEPALIVE_S, stream=True)
    control = connect(keepalive_server, CONTROL_KEEPALIVE_S, stream=True)
    try:
        time.sleep(WINDOW_S)  # the point of the test: time passing with pings on the connections
        _stays_ready(idle)
        _stays_ready(busy)
        # The control pinged every second against a server that tolerates every 2.5 s: after two
        # ping strikes the server sent GOAWAY too_many_pings, which ended its open stream.
        assert control.stream_error, f"the control was not disconnected; states {control.states}"
        error = control.stream_error[0]
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "too many pings" in (error.details() or "").lower(), error.details()
    finally:
        for watched in (idle, busy, control):
            watched.close()
