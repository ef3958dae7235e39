"""Dynamic batching: many clients' requests merged into one ONNX Runtime call per model version.

One asyncio task per batcher forms batches; each of the model's `instances` (one runner each, e.g.
one ONNX Runtime session) runs on its own single-thread executor (ONNX Runtime releases the GIL and
parallelises inside each op), so the event loop never blocks. With k instances up to k batches run
at once, each on an idle instance (Triton's instance_group count).

Batch formation is adaptive, in the classic way: while every instance is busy, new requests simply
accumulate, and the next batch takes whatever is queued the moment an instance is free. Waiting for
more (up to `max_queue_delay_s`, counted from the oldest queued request) only happens when the
batch is not full *and* recent traffic says more requests are about to come: the batcher keeps a
decaying peak of how many requests were outstanding at once, and stops waiting as soon as that many
are queued. A single client (concurrency 1) therefore never waits: its latency is the model's.

Every request holds n >= 1 images; one larger than `max_batch_size` is spread over several batches
and reassembled.

Admission is exact and synchronous. A model version holds at most `capacity` = Q + k * N images,
where Q = `max_queue_size` (images waiting), N = `max_batch_size` and k = the instances (the images
of the batches ONNX Runtime computes at once): an image counts from the moment its request is
admitted until the request is answered (or abandoned and none of its rows is in a running batch any
more). A request whose images do not fit is refused at once with RESOURCE_EXHAUSTED (reason
queue_full). The count does not depend on when the batcher task happens to take a batch, so
capacity + j one-image requests arriving while nothing finishes yield exactly j refusals. A caller
with work to do before its input is ready (decoding, validation) takes its place first with
`admit(n)` and hands the `Admission` to `submit_timed`: under overload a request is refused before
any of that work, at once, in arrival order. A request whose deadline passes while it waits is
answered DEADLINE_EXCEEDED at once (a timer, not the next batch boundary) and is never computed; a
cancelled caller's request leaves the queue; `close()` refuses new work and drains the queue.
When a batch's ONNX Runtime call fails, each of its requests is run again alone: only a request
whose own rows fail is answered INTERNAL.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.errors import (
    GENERIC_INTERNAL_MESSAGE,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from service.observability import metrics

log = logging.getLogger(__name__)

Runner = Callable[[np.ndarray], np.ndarray]

# How fast the outstanding-requests peak decays, per arrival: after a burst at concurrency 16, a
# lone client stops paying the batching delay within ~60 requests.
_PEAK_DECAY = 0.95


@dataclass(frozen=True)
class BatchTimings:
    """Where one request's time in the batcher went."""

    queue_s: float  # time in the batcher not spent running its own batches (waiting, splitting)
    inference_s: float  # ONNX Runtime time of the batch(es) that carried its images
    batches: int  # how many ONNX Runtime calls carried its images


@dataclass(eq=False)  # identity equality: requests are removed from the deque by identity
class _Request:
    x: np.ndarray
    deadline: float | None
    future: asyncio.Future[np.ndarray]
    enqueued: float
    n: int = 0
    taken: int = 0  # rows handed to a batch
    done: int = 0  # rows answered
    finished: bool = False  # answered (result or error) or abandoned: later rows are dropped
    out: np.ndarray | None = None
    inference_s: float = 0.0
    batches: int = 0
    finished_at: float = 0.0
    parts: list[tuple[int, int]] = field(default_factory=list)
    released: bool = False  # its n images no longer count against the capacity
    running: int = 0  # batches now computing some of its rows (it may be split over several)


class Admission:
    """Room for `n` images reserved by DynamicBatcher.admit; consumed by submit_timed, or given back
    with release() (idempotent; a no-op once consumed)."""

    __slots__ = ("n", "_batcher", "_open")

    def __init__(self, batcher: DynamicBatcher, n: int) -> None:
        self.n = n
        self._batcher = batcher
        self._open = True

    def _consume(self, batcher: DynamicBatcher, n: int) -> None:
        if not self._open or batcher is not self._batcher or n != self.n:
            raise RuntimeError(f"admission for {self.n} images used twice, elsewhere or for {n} images")
        self._open = False

    def release(self) -> None:
        if self._open:
            self._open = False
            self._batcher._admitted -= self.n


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


def _compute(runner: Runner, inputs: Sequence[np.ndarray], rows: int) -> tuple[np.ndarray, float]:
    """Runs on the model's thread: concatenate, run, check. Returns (outputs, seconds in the runner)."""
    x = inputs[0] if len(inputs) == 1 else np.concatenate(inputs, axis=0)
    started = time.perf_counter()
    y = np.asarray(runner(x))
    elapsed = time.perf_counter() - started
    if y.ndim < 1 or y.shape[0] != rows:
        raise RuntimeError(f"the runner returned shape {list(y.shape)} for a batch of {rows}")
    return y, elapsed


class DynamicBatcher:
    """Merges concurrent requests for one model version into batches (see the module doc)."""

    def __init__(
        self,
        runners: Runner | Sequence[Runner],
        *,
        name: str,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        provider: str = "",
        item_shape: tuple[int, ...] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`runners`: one per instance (or a single runner: one instance), each `runner(x[N, ...])
        -> y[N, ...]` called on its own thread, owned by the batcher, one batch at a time. `name`
        and `provider` label the metrics; `item_shape` (C, H, W), if given, is enforced on submit.
        `clock` must be the clock deadlines are measured on."""
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, max_queue_delay_s >= 0")
        self._runners: list[Runner] = [runners] if callable(runners) else list(runners)
        if not self._runners:
            raise ValueError("a batcher needs at least one runner")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._item_shape = tuple(item_shape) if item_shape is not None else None
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}-{i}")
            for i in range(len(self._runners))
        ]
        self._instances = len(self._runners)
        self._idle = list(range(self._instances))  # instances not computing a batch
        self._batches: set[asyncio.Task[None]] = set()  # the batches computing now
        self._clock = clock
        self._queue: deque[_Request] = deque()
        self._queued = 0  # images waiting (not yet handed to a batch)
        self._admitted = 0  # images of admitted requests not yet released (see the module doc)
        self._outstanding = 0  # requests submitted and not yet finished
        self._peak = 1.0  # decaying peak of _outstanding (see module doc)
        self._state = _State.NEW
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._queue_wait = metrics.QUEUE_WAIT.labels(model=name)
        self._batch_size = metrics.BATCH_SIZE.labels(model=name)
        self._inference = metrics.INFERENCE_DURATION.labels(model=name, provider=provider)
        # inc/dec, never set: two versions of one model share the `model` label and add up.
        self._depth = metrics.QUEUE_DEPTH.labels(model=name)

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start forming batches (call from the event loop that will submit)."""
        if self._state is not _State.NEW:
            raise RuntimeError(f"batcher {self.name} was already started")
        self._wakeup = asyncio.Event()  # bound to the running loop
        self._state = _State.RUNNING
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Refuse new requests (UNAVAILABLE), finish everything queued, then stop."""
        if self._state is _State.CLOSED:
            return
        if self._state is _State.NEW:
            self._state = _State.CLOSED
        else:
            self._state = _State.CLOSING
            self._wakeup.set()
            if self._task is not None:
                await asyncio.shield(self._task)
            self._state = _State.CLOSED
        for executor in self._executors:
            executor.shutdown(wait=False)
        # A closed batcher runs nothing again: it keeps no session (and its weights) alive.
        self._runners = []

    @property
    def queued_images(self) -> int:
        return self._queued

    @property
    def instances(self) -> int:
        """Batches computed at once (one per runner)."""
        return self._instances

    @property
    def capacity(self) -> int:
        """Most images admitted at once: max_queue_size waiting + a batch per instance computing."""
        return self.max_queue_size + self.instances * self.max_batch_size

    @property
    def admitted_images(self) -> int:
        """Images admitted and not yet released (waiting, being computed, or held for their request)."""
        return self._admitted

    @property
    def running(self) -> bool:
        return self._state is _State.RUNNING

    # --- submitting ------------------------------------------------------------------------------

    async def submit(self, x: np.ndarray, deadline: float | None) -> np.ndarray:
        """Outputs for the n inputs in `x` (rows in order). See submit_timed."""
        outputs, _ = await self.submit_timed(x, deadline)
        return outputs

    def admit(self, n: int) -> Admission:
        """Reserve room for `n` images now, as submit would (same errors, without the deadline);
        pass the result to submit_timed, or release() it if the request ends before that."""
        self._check_running()
        if n < 1:
            raise InvalidArgument("a request needs at least one input")
        self._check_capacity(n)
        self._admitted += n
        return Admission(self, n)

    async def submit_timed(
        self, x: np.ndarray, deadline: float | None, admission: Admission | None = None
    ) -> tuple[np.ndarray, BatchTimings]:
        """Queue `x` [n, ...] and wait for its outputs [n, ...] and their timings.

        Raises ResourceExhausted(reason="queue_full") at once when the images do not fit in the
        capacity (module doc; not checked again with an `admission` for these n images, which is
        consumed), DeadlineExceeded as soon as `deadline` (time.monotonic()) passes before the
        answer, Unavailable when the batcher is not running, Internal when the model run fails.
        """
        self._check_running()
        n = int(x.shape[0]) if x.ndim >= 1 else 0
        if n == 0:
            raise InvalidArgument("a request needs at least one input")
        if self._item_shape is not None and tuple(x.shape[1:]) != self._item_shape:
            raise InvalidArgument(
                f"expected inputs of shape {list(self._item_shape)}, got {list(x.shape[1:])}"
            )
        now = self._clock()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"deadline exceeded before model {self.name} could queue the request")
        if admission is not None:
            admission._consume(self, n)  # its images are already counted
        else:
            self._check_capacity(n)
            self._admitted += n

        loop = asyncio.get_running_loop()
        req = _Request(x=x, deadline=deadline, future=loop.create_future(), enqueued=now, n=n)
        self._queue.append(req)
        self._queued += n
        self._depth.inc(n)
        self._outstanding += 1
        self._peak = max(float(self._outstanding), self._peak * _PEAK_DECAY)
        self._wakeup.set()

        # The deadline is a timer that answers the request DEADLINE_EXCEEDED (and drops whatever of
        # it is not computed); awaiting the future itself keeps the hot path to one wake-up.
        timer = None if deadline is None else loop.call_later(max(0.0, deadline - now), self._expire, req)
        try:
            # Raises the error the request was answered with (DeadlineExceeded from the timer).
            outputs = await req.future
        except asyncio.CancelledError:
            # The caller went away (client cancelled): its images must not be computed.
            self._abandon(req)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        inference_s = req.inference_s
        queue_s = max(0.0, req.finished_at - req.enqueued - inference_s)
        return outputs, BatchTimings(queue_s=queue_s, inference_s=inference_s, batches=req.batches)

    def _check_running(self) -> None:
        if self._state is not _State.RUNNING:
            what = "shutting down" if self._state in (_State.CLOSING, _State.CLOSED) else "not started"
            raise Unavailable(f"model {self.name} is {what}; not accepting requests", reason="unavailable")

    def _capacity_terms(self) -> str:
        batches = f"max_batch_size {self.max_batch_size}"
        if self.instances > 1:
            batches = f"{self.instances} instances x {batches}"
        return f"max_queue_size {self.max_queue_size} + {batches}"

    def _check_capacity(self, n: int) -> None:
        capacity = self.capacity
        if n > capacity:
            raise ResourceExhausted(
                f"a request of {n} images can never fit model {self.name}'s capacity of {capacity} "
                f"images ({self._capacity_terms()}); send fewer per request",
                reason="queue_full",
            )
        if self._admitted + n > capacity:
            raise ResourceExhausted(
                f"model {self.name} is overloaded: {self._admitted} of {capacity} images admitted "
                f"({self._capacity_terms()}) and this request needs {n}; retry with backoff",
                reason="queue_full",
            )

    # --- bookkeeping -----------------------------------------------------------------------------

    def _dequeue_rest(self, req: _Request) -> None:
        """Take a request's not-yet-batched images out of the queue."""
        rest = req.n - req.taken
        if rest > 0:
            try:
                self._queue.remove(req)
            except ValueError:
                pass
            self._queued -= rest
            self._depth.dec(rest)
            req.taken = req.n

    def _release(self, req: _Request) -> None:
        if not req.released:
            req.released = True
            self._admitted -= req.n

    def _finish(
        self, req: _Request, *, result: np.ndarray | None = None, error: BaseException | None = None
    ) -> None:
        if req.finished:
            return
        req.finished = True
        req.finished_at = self._clock()
        self._outstanding -= 1
        self._dequeue_rest(req)
        if not req.running:
            self._release(req)  # else when its last batch ends: its rows still occupy a runner
        if req.future.done():
            return
        if error is not None:
            req.future.set_exception(error)
        elif result is not None:
            req.future.set_result(result)
        else:
            req.future.cancel()

    def _expire(self, req: _Request) -> None:
        """The request's deadline timer: answer it DEADLINE_EXCEEDED unless it is answered already."""
        if not req.finished:
            waited = self._clock() - req.enqueued
            message = f"deadline exceeded after {waited:.3f} s waiting for model {self.name}"
            self._finish(req, error=DeadlineExceeded(message))

    def _abandon(self, req: _Request) -> None:
        """The caller stopped waiting (deadline or cancellation): drop whatever is not computed."""
        self._finish(req)
        if req.future.done() and not req.future.cancelled():
            req.future.exception()  # mark retrieved: nobody will read it now

    # --- the batching task -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            try:
                await self._loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not leave callers hanging or stop serving
                log.error("model %s: batcher loop crashed; restarting it", self.name, exc_info=exc)
                metrics.ENGINE_RESTARTS.labels(model=self.name).inc()

    async def _loop(self) -> None:
        while True:
            if not self._queue or not self._idle:
                if not self._queue and self._state is not _State.RUNNING:
                    if self._batches:  # closing: the batches computing still answer
                        await asyncio.gather(*self._batches, return_exceptions=True)
                    return
                # A submit or a finished batch wakes the loop.
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_company()
            parts = self._take_batch()
            if parts:
                self._launch(parts)

    def _launch(self, parts: list[tuple[_Request, int, int]]) -> None:
        """Hand a batch to an idle instance. Its requests count as running from now, not from when
        the task first runs: one abandoned in between still holds its place (module doc)."""
        requests = list(dict.fromkeys(req for req, _, _ in parts))
        for req in requests:
            req.running += 1
        instance = self._idle.pop()
        task = asyncio.get_running_loop().create_task(
            self._run_batch(parts, requests, instance), name=f"batch-{self.name}-{instance}"
        )
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    def _expected_requests(self) -> int:
        return max(1, round(self._peak))

    async def _wait_for_company(self) -> None:
        """Wait (bounded by max_queue_delay_s from the oldest request) while the batch is not full
        and recent concurrency says more requests are on their way."""
        if self.max_queue_delay_s <= 0:
            return
        while (
            self._state is _State.RUNNING
            and self._queue
            and self._queued < self.max_batch_size
            and len(self._queue) < self._expected_requests()
        ):
            remaining = self._queue[0].enqueued + self.max_queue_delay_s - self._clock()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _take_batch(self) -> list[tuple[_Request, int, int]]:
        """Up to max_batch_size images from the head of the queue; expired requests are answered
        DEADLINE_EXCEEDED here and never computed."""
        now = self._clock()
        parts: list[tuple[_Request, int, int]] = []
        rows = 0
        while self._queue and rows < self.max_batch_size:
            req = self._queue[0]
            if req.deadline is not None and req.deadline <= now:
                self._finish(
                    req,
                    error=DeadlineExceeded(
                        f"deadline exceeded after {now - req.enqueued:.3f} s waiting for model {self.name}"
                    ),
                )
                continue
            take = min(req.n - req.taken, self.max_batch_size - rows)
            if req.taken == 0:
                self._queue_wait.observe(now - req.enqueued)
            parts.append((req, req.taken, req.taken + take))
            req.taken += take
            rows += take
            self._queued -= take
            self._depth.dec(take)
            if req.taken == req.n:
                self._queue.popleft()
        return parts

    async def _run_batch(
        self, parts: list[tuple[_Request, int, int]], requests: list[_Request], instance: int
    ) -> None:
        """Compute one batch (`requests`: those its parts come from) on `instance`, then give the
        instance back and wake the loop."""
        try:
            if not await self._run_parts(parts, instance, answer_failure=len(parts) == 1):
                # One request's input can fail the whole ONNX Runtime call: run each request of the
                # batch alone, so only the culprit is answered INTERNAL and the others are served.
                log.warning(
                    "model %s: running the %d requests of the failed batch one by one", self.name, len(parts)
                )
                for part in parts:
                    if not part[0].finished:
                        await self._run_parts([part], instance, answer_failure=True)
        except Exception as exc:  # a bug here must not leave the batch's callers hanging
            log.error("model %s: a batch crashed", self.name, exc_info=exc)
            metrics.ENGINE_RESTARTS.labels(model=self.name).inc()
            for req in requests:
                self._finish(req, error=Internal(GENERIC_INTERNAL_MESSAGE))
        finally:
            for req in requests:
                req.running -= 1
                if req.finished and not req.running:  # answered or abandoned: its images leave now
                    self._release(req)
            self._idle.append(instance)
            self._wakeup.set()

    async def _run_parts(
        self, parts: list[tuple[_Request, int, int]], instance: int, *, answer_failure: bool
    ) -> bool:
        """One ONNX Runtime call on these rows, on `instance`; delivers them to their requests. On
        failure: logs, answers the requests INTERNAL if `answer_failure`, and returns False."""
        rows = sum(stop - start for _, start, stop in parts)
        inputs = [req.x[start:stop] for req, start, stop in parts]
        loop = asyncio.get_running_loop()
        try:
            outputs, elapsed = await loop.run_in_executor(
                self._executors[instance], _compute, self._runners[instance], inputs, rows
            )
        except Exception as exc:
            log.error(
                "model %s: inference failed for a batch of %d images from %d requests",
                self.name,
                rows,
                len(parts),
                exc_info=exc,
            )
            if answer_failure:
                error: ServiceError = Internal(GENERIC_INTERNAL_MESSAGE)
                for req, _, _ in parts:
                    self._finish(req, error=error)
            return False
        self._batch_size.observe(rows)
        self._inference.observe(elapsed)
        offset = 0
        for req, start, stop in parts:
            count = stop - start
            if not req.finished:
                if req.out is None:
                    req.out = np.empty((req.n, *outputs.shape[1:]), dtype=outputs.dtype)
                # A copy per request: no caller's answer aliases another's.
                req.out[start:stop] = outputs[offset : offset + count]
                req.done += count
                req.inference_s += elapsed
                req.batches += 1
                if req.done == req.n:
                    self._finish(req, result=req.out)
            offset += count
        return True
