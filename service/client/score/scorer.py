"""`cnnserve score`'s streaming loop: a window of images in flight over one ClassifyStream, per-item
retries with backoff, reopening a broken stream, per-image deadlines. (command.py's docstring has
the rules.)"""

from __future__ import annotations

import heapq
import itertools
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import numpy as np

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service.client.results import UNTRAINED_WARNING, status_code
from service.client.score.progress import Progress, Summary
from service.client.score.rows import RowWriter, make_row
from service.client.score.vectors import EmbeddingWriter

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0


@dataclass
class Item:
    path: str
    attempts: int = 0  # times sent
    sent_at: float = 0.0
    key: str = ""  # id of the attempt in flight


def read_file(path: str) -> bytes:
    """The file's bytes, with raw os calls: about half the CPU of open().read() per small image,
    which on a machine shared with the server is throughput."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        chunks = [os.read(fd, max(size, 1) + 1)]
        while chunks[-1]:  # the file grew, or st_size was not its length (e.g. a pipe): read on
            chunks.append(os.read(fd, 1 << 20))
        return b"".join(chunks)
    finally:
        os.close(fd)


def backoff_s(attempt: int, rng: random.Random) -> float:
    """Delay before attempt `attempt + 1` (attempt >= 1): exponential, capped, jittered."""
    return float(min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (attempt - 1)) * rng.uniform(0.5, 1.0))


class _Stream:
    """One ClassifyStream (or EmbedStream: `method`) call: requests fed through a queue, responses
    read by a thread into the scorer's event queue, tagged with this stream's generation."""

    def __init__(
        self, stub: Any, generation: int, events: queue.SimpleQueue[tuple[Any, ...]], method: str
    ) -> None:
        # Lists of requests: the scorer hands over a refill of the window at once (one wake-up of
        # gRPC's sending thread per refill, not one per image).
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        call = getattr(stub, method)
        self.call = call(itertools.chain.from_iterable(iter(self.requests.get, None)))
        self.generation = generation
        self._thread = threading.Thread(target=self._read, args=(events,), daemon=True, name="score-recv")
        self._thread.start()

    def _read(self, events: queue.SimpleQueue[tuple[Any, ...]]) -> None:
        try:
            for response in self.call:
                events.put(("response", self.generation, response))
            events.put(("end", self.generation, None))
        except grpc.RpcError as exc:
            events.put(("broken", self.generation, exc))

    def close(self, cancel: bool = True) -> None:
        self.requests.put(None)
        if cancel:
            self.call.cancel()


@dataclass
class _Items:
    """The run's images: pending (never sent, in path order), delayed (a retry waiting for its
    backoff: a heap by due time) and in flight (by the id of their attempt)."""

    pending: deque[Item]
    delayed: list[tuple[float, int, Item]] = field(default_factory=list)  # (due, tiebreak, item)
    inflight: dict[str, Item] = field(default_factory=dict)
    counter: int = 0  # the attempt ids and the heap's tiebreak

    def busy(self) -> bool:
        return bool(self.pending or self.delayed or self.inflight)

    def next_item(self, now: float) -> Item | None:
        """A due retry first, then a new path; None when neither is ready."""
        if self.delayed and self.delayed[0][0] <= now:
            return heapq.heappop(self.delayed)[2]
        if self.pending:
            return self.pending.popleft()
        return None

    def send(self, item: Item) -> str:
        """Count a new attempt of `item`, in flight from now; its id."""
        item.attempts += 1
        self.counter += 1
        item.key = f"{self.counter}"
        item.sent_at = time.monotonic()
        self.inflight[item.key] = item
        return item.key

    def delay(self, item: Item, due: float) -> None:
        self.counter += 1
        heapq.heappush(self.delayed, (due, self.counter, item))

    def requeue_inflight(self) -> None:
        """Every item in flight goes back to the front of the pending ones, in path order."""
        for item in sorted(self.inflight.values(), key=lambda i: i.path, reverse=True):
            self.pending.appendleft(item)
        self.inflight.clear()


# What the scorer's loop does after an event: its per-image deadline check and progress ("tail"),
# nothing more ("skip"), or end the run ("stop").
_Next = Literal["tail", "skip", "stop"]


class Scorer:
    """Scores paths over ClassifyStream, writing one row per path with `writer`. With an
    EmbeddingWriter, over EmbedStream instead: each successful row comes with its vector (and its
    classes, when `top_k` > 0, from the same forward pass). One run at a time; stop() may be
    called from a signal handler or another thread."""

    def __init__(
        self,
        stub: Any,
        *,
        model: str,
        version: int,
        top_k: int,
        window: int,
        max_attempts: int,
        deadline_s: float | None,
        writer: RowWriter | EmbeddingWriter,
        progress: Progress,
        rng: random.Random | None = None,
        normalize: bool = False,
    ) -> None:
        self.stub = stub
        self.model, self.version, self.top_k = model, version, top_k
        self.window = max(1, window)
        self.refill = max(1, self.window // 4)
        self.max_attempts = max(1, max_attempts)
        self.deadline_s = deadline_s
        self.writer = writer
        self.embed = isinstance(writer, EmbeddingWriter)
        self.normalize = normalize  # Embed's L2 normalization
        self.progress = progress
        self.rng = rng or random.Random()
        self.summary = Summary()
        # Why the run gave up, when it did: the stream kept failing (code, details).
        self.fatal: tuple[grpc.StatusCode, str] | None = None
        self.stopped_by: int | None = None  # the signal that stopped the run
        self.untrained: set[tuple[str, int]] = set()  # versions that answered with untrained weights
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        # The state of run(), set afresh by each run.
        self._items = _Items(deque())
        self._stream: _Stream | None = None
        self._generation = 0  # of the stream: events of a stream already given up are ignored
        self._reconnect_failures = 0  # consecutive stream failures without an answer in between
        self._reconnect_at = 0.0
        self._next_deadline_check = 0.0

    def stop(self, signum: int) -> None:
        """Stop the run at once, keeping every row written; safe in a signal handler
        (SimpleQueue.put is reentrant), and it wakes the scorer's wait."""
        self.stopped_by = signum
        self._events.put(("stop", None, None))

    def _finish(self, item: Item, row: dict[str, Any], vector: np.ndarray | None = None) -> None:
        if isinstance(self.writer, EmbeddingWriter):
            self.writer.write(row, vector)
        else:
            self.writer.write(row)
        if row["error"]:
            self.summary.failed += 1
        else:
            self.summary.scored += 1

    def _fail(self, item: Item, error: str) -> None:
        # The model and version asked for: the row says what it failed to be scored with.
        self._finish(item, make_row(item.path, model=self.model, version=self.version, error=error))

    def _update_progress(self, *, force: bool = False) -> None:
        self.progress.update(self.summary.scored + self.summary.failed, self.summary.failed, force=force)

    def run(self, paths: Sequence[str]) -> Summary:
        """Score `paths` (one row each, unless stopped or given up: see `stopped_by` and `fatal`).

        One loop over events: (re)open the stream when there is none and its backoff is over, fill
        the window, wait for one event (an answer, the stream's end or failure, stop, or a tick),
        handle it, then check the per-image deadlines and the progress."""
        start = time.monotonic()
        self._items = items = _Items(deque(Item(p) for p in paths))
        self._stream, self._generation = None, 0
        self._reconnect_failures, self._reconnect_at, self._next_deadline_check = 0, 0.0, 0.0
        self.progress.update(0, 0, force=True)
        while items.busy() and self.stopped_by is None:
            now = time.monotonic()
            if self._stream is None:
                if now < self._reconnect_at:
                    time.sleep(min(self._reconnect_at - now, 0.5))
                    continue
                self._generation += 1
                method = "EmbedStream" if self.embed else "ClassifyStream"
                self._stream = _Stream(self.stub, self._generation, self._events, method)
            self._fill(self._stream, now)
            if not items.busy():
                break
            kind, generation, payload = self._next_event(now)
            if kind == "stop":
                break
            if generation != self._generation:
                continue  # an event of a stream already given up
            step: _Next = "tail"
            if kind == "response":
                step = self._on_response(payload)
            elif kind in ("broken", "end"):
                step = self._on_stream_lost(kind, payload)
            if step == "stop":
                break
            if step == "tail":
                self._expire_deadlines()
                self._update_progress()
        if self._stream is not None:
            self._stream.close()
        self.summary.elapsed_s = time.monotonic() - start
        self._update_progress(force=True)
        self.progress.finish()
        return self.summary

    def _fill(self, stream: _Stream, now: float) -> None:
        """Fill the window: due retries first, then new paths; in refills of at least a quarter
        window, so that reading files and waking the sending thread happen in batches."""
        items = self._items
        batch: list[pb.ClassifyStreamRequest] = []
        refill = len(items.inflight) <= self.window - self.refill or self._events.empty()
        while refill and len(items.inflight) < self.window:
            item = items.next_item(now)
            if item is None:
                break
            try:
                data = read_file(item.path)
            except OSError as exc:
                code = {FileNotFoundError: "NOT_FOUND", PermissionError: "PERMISSION_DENIED"}.get(
                    type(exc), "UNKNOWN"
                )
                self._fail(item, f"{code}: {exc.strerror or exc}")
                continue
            key = items.send(item)
            batch.append(self._request(key, pb.ImageInput(encoded=data)))
        if batch:
            stream.requests.put(batch)

    def _request(self, key: str, image: pb.ImageInput) -> Any:
        if self.embed:
            embed = pb.EmbedRequest(
                model=self.model,
                version=self.version,
                top_k=self.top_k,
                image=image,
                normalize=self.normalize,
            )
            return pb.EmbedStreamRequest(id=key, request=embed)
        request = pb.ClassifyRequest(model=self.model, version=self.version, top_k=self.top_k, image=image)
        return pb.ClassifyStreamRequest(id=key, request=request)

    def _next_event(self, now: float) -> tuple[Any, ...]:
        """The next event, waiting for at most an answer, the next due retry, a per-image deadline
        or a progress tick; the rows are written out whenever nothing is waiting."""
        try:
            return self._events.get_nowait()
        except queue.Empty:
            pass
        flush_due = self.writer.flush()  # nothing waiting: write the rows out now
        self._update_progress()
        wake = now + (0.25 if self.deadline_s is not None else 1.0)
        if flush_due:
            wake = min(wake, time.monotonic() + flush_due)
        if self._items.delayed:
            wake = min(wake, self._items.delayed[0][0])
        try:
            return self._events.get(timeout=max(0.0, wake - time.monotonic()))
        except queue.Empty:
            return "tick", self._generation, None

    def _on_response(self, payload: pb.ClassifyStreamResponse | pb.EmbedStreamResponse) -> _Next:
        """An answer: a row, or a retry after a backoff (UNAVAILABLE, RESOURCE_EXHAUSTED)."""
        self._reconnect_failures = 0
        item = self._items.inflight.pop(payload.id, None)
        if item is None:
            return "skip"  # a late answer for an attempt already given up
        if payload.WhichOneof("outcome") == "result":
            r = payload.result
            warning = UNTRAINED_WARNING if r.untrained else ""
            if r.untrained:
                self.untrained.add((r.model, r.version))
            row = make_row(item.path, model=r.model, version=r.version, classes=r.classes, warning=warning)
            vector = None
            if isinstance(r, pb.EmbedResponse):
                vector = np.frombuffer(r.embedding.data, dtype="<f4").reshape(list(r.embedding.shape))
            self._finish(item, row, vector)
            return "skip"
        code = status_code(payload.error.code)
        if code in RETRYABLE and item.attempts < self.max_attempts:
            self.summary.retries += 1
            self._items.delay(item, time.monotonic() + backoff_s(item.attempts, self.rng))
            return "skip"
        self._fail(item, f"{code.name}: {payload.error.message}")
        return "tail"

    def _on_stream_lost(self, kind: str, payload: Any) -> _Next:
        """The stream is gone (or the server ended it early): reopen it after a backoff and re-send
        what is unanswered, or give up after max_attempts failures in a row."""
        code = payload.code() if kind == "broken" else grpc.StatusCode.UNAVAILABLE
        details = (payload.details() or "") if kind == "broken" else "the server ended the stream"
        if kind == "end" and not self._items.inflight:
            self._stream = None  # a clean end with nothing outstanding: a new stream when needed
            return "skip"
        if self._stream is not None:
            self._stream.close()
        self._stream = None
        self._items.requeue_inflight()
        self._reconnect_failures += 1
        retryable = code in RETRYABLE or code in (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.INTERNAL,
        )
        if not retryable or self._reconnect_failures >= self.max_attempts:
            self.fatal = (code, details)
            return "stop"
        self.summary.reconnects += 1
        self._reconnect_at = time.monotonic() + backoff_s(self._reconnect_failures, self.rng)
        return "tail"

    def _expire_deadlines(self) -> None:
        """Per-image deadlines, checked a few times a second."""
        if self.deadline_s is None or time.monotonic() < self._next_deadline_check:
            return
        now = time.monotonic()
        self._next_deadline_check = now + 0.25
        for key, item in list(self._items.inflight.items()):
            if now - item.sent_at >= self.deadline_s:
                del self._items.inflight[key]
                self._fail(item, f"DEADLINE_EXCEEDED: no answer within {self.deadline_s:g} s")
