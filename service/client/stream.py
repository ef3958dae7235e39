"""classify_stream's machinery: the request iterator gRPC pulls from its own thread, the thread that
reads the answers, and the bookkeeping that turns both into one StreamResult per item, per-item
deadlines included (the wire API has none)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service.client.images import ImageLike
from service.client.results import CnnserveError, StreamResult, call_error, stream_result


def pair(item: object) -> tuple[str, ImageLike]:
    if isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str):
        return item[0], item[1]
    shown = repr(item)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise TypeError(f"classify_stream takes (id, image) pairs with a str id, got {shown}")


def read_responses(call: Any, events: queue.SimpleQueue[tuple[str, Any]]) -> None:
    try:
        for response in call:
            events.put(("response", response))
        events.put(("end", None))
    except grpc.RpcError as exc:
        events.put(("broken", exc))


class ItemStream:
    """classify_stream's bookkeeping: when each item in flight was taken, and the events of the
    call (responses, its end, the request iterator's end or failure) in arrival order. The wire
    API has no per-item deadline, so it is kept here: answers are awaited with a timeout."""

    def __init__(self, item_timeout_s: float | None) -> None:
        self.item_timeout_s = item_timeout_s
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._sent: dict[str, float] = {}  # id -> time.monotonic() when taken; insertion order
        self._expired: set[str] = set()  # answered DEADLINE_EXCEEDED here, maybe still computing

    def requests(
        self, images: Iterable[object], request: Callable[[ImageLike], pb.ClassifyRequest]
    ) -> Iterator[pb.ClassifyStreamRequest]:
        """The call's request iterator: one message per (id, image) pair of `images`, each item
        taken (sending) just before it goes out; the caller's own errors reach results()."""
        try:
            for item in images:
                item_id, image = pair(item)
                message = pb.ClassifyStreamRequest(id=item_id, request=request(image))
                self.sending(item_id)
                yield message
        except GeneratorExit:  # gRPC dropped the iterator: the call is over already
            raise
        except BaseException as exc:
            # gRPC would swallow this and fail the call UNKNOWN ("Exception iterating
            # requests!"): hand it to the caller's thread instead, ahead of that failure.
            self.events.put(("caller_error", exc))
            raise
        self.events.put(("exhausted", None))

    def sending(self, item_id: str) -> None:
        """Called from gRPC's request thread just before the item goes out."""
        with self._lock:
            if item_id in self._sent:
                raise ValueError(f"id {item_id!r} is already in flight: ids must be unique")
            self._sent[item_id] = time.monotonic()

    def _wait_s(self) -> float | None:
        with self._lock:
            oldest = next(iter(self._sent.values()), None)
        if oldest is None or self.item_timeout_s is None:
            return None
        return max(0.0, oldest + self.item_timeout_s - time.monotonic())

    def _expire(self) -> list[str]:
        if self.item_timeout_s is None:
            return []
        limit = time.monotonic() - self.item_timeout_s
        with self._lock:
            expired = [item_id for item_id, sent in self._sent.items() if sent <= limit]
            for item_id in expired:
                del self._sent[item_id]
            self._expired.update(expired)
        return expired

    def results(self) -> Iterator[StreamResult]:
        exhausted = False
        while True:
            with self._lock:
                idle = not self._sent
                abandoned = bool(self._expired)
            # Everything sent is answered: wait for the server's end of the stream, unless an
            # expired item may keep the server busy for up to its max_deadline_s.
            if exhausted and idle and abandoned:
                return
            try:
                kind, payload = self.events.get(timeout=self._wait_s())
            except queue.Empty:
                kind, payload = "tick", None
            if kind == "response":
                with self._lock:
                    known = self._sent.pop(payload.id, None) is not None
                    self._expired.discard(payload.id)
                if known:
                    yield stream_result(payload)
            elif kind == "exhausted":
                exhausted = True
            elif kind == "caller_error":
                raise payload
            elif kind == "broken":
                raise call_error(payload) from None
            elif kind == "end":
                # Every item gets one result: one the server never answered did not get classified.
                with self._lock:
                    unanswered, self._sent = list(self._sent), {}
                for item_id in unanswered:
                    error = CnnserveError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream first")
                    yield StreamResult(item_id, error=error)
                return
            for item_id in self._expire():
                message = f"no answer within {self.item_timeout_s:g} s"
                yield StreamResult(item_id, error=CnnserveError(grpc.StatusCode.DEADLINE_EXCEEDED, message))
