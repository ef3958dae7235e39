"""Where a failure becomes a status: the one skeleton of every RPC, unary and streaming alike.

`Rpc` keeps one call's metrics (requests by code, latency, rejections by reason) and turns an
exception into a client-safe (code, message) with `errors.status_of`: a client never sees UNKNOWN
or a traceback. The skeletons put it around a servicer's work:

- `unary(method, context, work)`: one response;
- `streamed(method, context, produce)`: a server stream (Dream, Stylize, their forwarding, and
  ClassifyStream as a whole); messages as they come, then the status;
- `item(method, context, work, answer)`: one item of a bidirectional stream whose failure becomes
  that item's status, never the stream's (ClassifyStream's items).

Each counts the call in the in-flight gauge and records a cancellation (client gone, deadline
passed) as what it is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from service import errors
from service.errors import checked_response
from service.observability.metrics import INFLIGHT, REJECTIONS, REQUEST_DURATION, REQUESTS, child

T = TypeVar("T")

# How close to its deadline a cancelled call counts as expired rather than cancelled (see
# Rpc.cancelled): generous for a loaded machine, far below any deadline worth setting.
DEADLINE_SLACK_S = 0.25
# Trailing metadata with a failure's metrics reason, on a server that marks its statuses (the
# gradient tier): the frontend that forwarded the call counts the failure by the same reason
# (cost_budget, too_many_pixels, ...), not by its status code alone (forwarding.forwarded_error).
REASON_METADATA_KEY = "cnnserve-reason"


class Rpc:
    """Metrics and error mapping of one RPC (or of one item of a stream).

    `model` is the label for the metrics: set it once the model is resolved. Until then it is "",
    so a client sending made-up model names cannot blow up the label cardinality.
    """

    __slots__ = ("method", "model", "reason", "_start")

    def __init__(self, method: str) -> None:
        self.method = method
        self.model = ""
        self.reason = ""  # of the failure, once failed()
        self._start = time.perf_counter()

    def succeeded(self) -> None:
        self._record(grpc.StatusCode.OK, None)

    def failed(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """Record a failure; returns the (code, client-safe message) to answer with."""
        code, message, reason = errors.status_of(exc)
        self.reason = reason
        self._record(code, None if code == grpc.StatusCode.INTERNAL else reason)
        return code, message

    async def abort(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        """Record the failure and answer the call with its status (raises, as context.abort does)."""
        code, message = self.failed(exc)
        marked = tuple(context.trailing_metadata() or ())
        if marked:  # a server that marks its statuses (REASON_METADATA_KEY: why)
            context.set_trailing_metadata((*marked, (REASON_METADATA_KEY, self.reason)))
        await context.abort(code, message)

    def cancelled(self, context: grpc.aio.ServicerContext) -> None:
        """The call ended under us: the client cancelled it or its deadline passed.

        A client whose own deadline fires cancels the stream (RST_STREAM, seen here as a plain
        cancellation) while the server's copy of that deadline, started when the headers arrived,
        still has about one header transit to run. So a cancellation that lands within
        DEADLINE_SLACK_S of the deadline is counted as the deadline expiry it is.
        """
        self.record_cancelled(context.time_remaining())

    def record_cancelled(self, remaining: float | None) -> None:
        """`cancelled` for a call with `remaining` seconds to its deadline (None: it had none)."""
        if remaining is not None and remaining <= DEADLINE_SLACK_S:
            self._record(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline")
        else:
            self._record(grpc.StatusCode.CANCELLED, "cancelled")

    def _record(self, code: grpc.StatusCode, reason: str | None) -> None:
        child(REQUESTS, self.method, self.model, code.name).inc()
        child(REQUEST_DURATION, self.method, self.model).observe(time.perf_counter() - self._start)
        if reason is not None:
            child(REJECTIONS, self.method, self.model, reason).inc()


async def unary(method: str, context: grpc.aio.ServicerContext, work: Callable[[Rpc], Awaitable[T]]) -> T:
    """Run one unary RPC's `work` with metrics; any exception becomes `context.abort`."""
    rpc = Rpc(method)
    inflight = child(INFLIGHT, method)
    inflight.inc()
    try:
        response = checked_response(await work(rpc))
    except asyncio.CancelledError:
        rpc.cancelled(context)
        raise
    except Exception as exc:  # noqa: BLE001 - the one place every error becomes a status
        await rpc.abort(context, exc)
        raise AssertionError("context.abort returned") from None  # abort always raises
    else:
        rpc.succeeded()
        return response
    finally:
        inflight.dec()


async def streamed(
    method: str,
    context: grpc.aio.ServicerContext,
    produce: Callable[[Rpc], AsyncIterator[T]],
    *,
    items: bool = False,
) -> AsyncIterator[T]:
    """Relay the messages of `produce(rpc)` as they come, each checked against the send limit; any
    failure becomes the call's status (`context.abort`, with metrics), and a cancelled call
    (client gone, deadline passed) closes `produce`, which stops its work.

    items=True: the messages are a stream's items, each already recorded and checked by `item`
    (ClassifyStream): the call itself is recorded only when it fails as a whole.
    """
    rpc = Rpc(method)
    inflight = child(INFLIGHT, method)
    inflight.inc()
    failure: Exception | None = None
    messages: AsyncIterator[T] | None = None
    try:
        messages = produce(rpc)
        async for message in messages:
            yield message if items else checked_response(message)
    except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: grpc.aio stopped reading
        if not items:
            rpc.cancelled(context)
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never UNKNOWN
        failure = exc
    else:
        if not items:
            rpc.succeeded()
    finally:
        inflight.dec()
        if messages is not None:
            await _close(messages)
    if failure is not None:
        await rpc.abort(context, failure)


async def item(
    method: str,
    context: grpc.aio.ServicerContext,
    work: Callable[[Rpc], Awaitable[T]],
    failed: Callable[[grpc.StatusCode, str], T],
) -> T:
    """One item of a stream: `work(rpc)`'s response, or `failed(code, message)` (the item's own
    status) when it raises. Recorded like a call of `method`; never raises but for cancellation."""
    rpc = Rpc(method)
    try:
        response = checked_response(await work(rpc))
    except asyncio.CancelledError:
        rpc.cancelled(context)
        raise
    except Exception as exc:  # noqa: BLE001 - becomes this item's status
        code, message = rpc.failed(exc)
        return failed(code, message)
    rpc.succeeded()
    return response


async def _close(messages: AsyncIterator[object]) -> None:
    aclose = getattr(messages, "aclose", None)
    if aclose is not None:
        await aclose()


__all__ = ["DEADLINE_SLACK_S", "Rpc", "item", "streamed", "unary"]
