"""grpc.health.v1.Health as this server needs it: Watch streams that end during a graceful
shutdown, and List."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2


class _WriteTracker:
    """A ServicerContext proxy that remembers the last message written."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self.last: Any = None
        self.written = asyncio.Event()

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self.last = message
        self.written.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1.Health whose Watch streams end once they have told their watcher NOT_SERVING
    during a graceful shutdown. The stock servicer keeps them open, and every open Watch would hold
    `server.stop(grace)` for the whole grace period although nothing is left to do."""

    def __init__(self) -> None:
        super().__init__()
        self._shutting_down = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        tracker = _WriteTracker(context)
        inner = asyncio.ensure_future(super().Watch(request, tracker))
        shutting_down = asyncio.ensure_future(self._shutting_down.wait())
        try:
            await asyncio.wait({inner, shutting_down}, return_when=asyncio.FIRST_COMPLETED)
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            deadline = time.monotonic() + 1.0
            while not inner.done() and time.monotonic() < deadline:
                if tracker.last is not None and tracker.last.status == not_serving:
                    break
                tracker.written.clear()
                try:
                    await asyncio.wait_for(tracker.written.wait(), deadline - time.monotonic())
                except TimeoutError:
                    break
            if inner.done():
                inner.result()
        finally:
            inner.cancel()
            shutting_down.cancel()

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """Every service name with its status (the stock servicer answers UNIMPLEMENTED with a
        logged traceback). A handful of names: one per loaded model plus the fixed ones."""
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._shutting_down.set()


__all__ = ["HealthServicer"]
