"""A pool of spawned worker processes for gradient jobs (guided backprop, DeepDream, style transfer).

The pool knows nothing about the algorithms: it runs `handler(state, task, ctx)` in N worker
processes, each of which ran `initializer()` once (docs/SERVICE_INTERFACES.md, "Gradient jobs").

Design (MLServer's parallel/ layout, not concurrent.futures.ProcessPoolExecutor, which fails *every*
pending future when one worker dies):

- Each worker is a `spawn`ed process with its own duplex Pipe, so a worker that dies takes only its
  own job with it. One reader thread per worker blocks in `recv()`; it hands every message, and the
  pipe's EOF when the process dies, to the event loop with `call_soon_threadsafe`, then reaps the
  process. EOF is the crash detector: the parent closes its copy of the child's end after spawning,
  so EOF arrives the moment the process is gone (SIGKILL, os._exit, segfault, the OOM killer).
- Jobs wait in a parent-side FIFO and go to the first idle worker; nothing is queued inside a worker,
  so a crash never strands queued jobs and a slow job never blocks one behind it on the same worker.
- Admission is by cost: admitted-but-unfinished cost may not exceed `cost_budget`. A job that does not
  fit is refused at once (ResourceExhausted, reason "cost_budget") with an estimated wait from the
  measured throughput (an EWMA of cost units per second per worker over finished jobs).
- Cancellation and deadlines cross the process boundary as a shared int64 per worker (the id of the
  job to stop) plus the seconds left until the deadline sent with the job; JobContext.should_stop()
  checks both between optimisation steps. A job that ignores should_stop() for `stop_grace_s` gets its
  worker killed and replaced.
- Retry policy: a job whose worker crashes is NOT retried by the pool. Its caller gets UNAVAILABLE
  (a code gRPC clients may retry) and the pool remembers the task's fingerprint (a hash of its pickle);
  if the same task crashes a worker again it is answered INTERNAL, and from then on refused with
  INTERNAL at once, without touching a worker. Retrying inside the pool would double the blast radius
  of a poison input and hide crashes from the client's own retry budget. A task that later runs to
  the end loses its strike: it was not the cause (the OOM killer picks the biggest process, not the
  guilty one).
- Every worker that goes away while the pool runs is counted in cnnserve_worker_deaths_total by
  reason (job_crash, idle_crash, init_failed, and the pool's own kills: stop_overdue, ready_timeout,
  protocol_error); every replacement in cnnserve_worker_restarts_total.
- Metrics are recorded here, in the serving process (service.observability.metrics, "gradient jobs"), labelled
  task=`task.kind` (else the class name) and model=`task.model`. Rejections are the exception:
  the servicer counts each refused call once under its RPC method, from the error's `reason`.

Deadlines are absolute `time.monotonic()` values in the serving process. The worker gets the seconds
left at the moment the job is sent and measures them with its own monotonic clock: Python does not
promise that monotonic() shares a reference point across processes, and converting to wall-clock
time would let an NTP step move every deadline. The transfer delay only makes the worker's own check
later by that much; the parent's timer still answers DEADLINE_EXCEEDED at the true deadline and sets
the job's stop flag.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import hashlib
import logging
import math
import multiprocessing
import pickle
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Generic, Literal, TypeVar

from service.errors import (
    GENERIC_INTERNAL_MESSAGE,
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from service.observability import metrics
from service.worker._process import (
    EXIT_INIT_FAILED,
    Done,
    Failed,
    InitFailed,
    JobContext,
    Ok,
    Progress,
    Ready,
    RunJob,
    SharedInt,
    Steps,
    Stop,
    worker_main,
)

__all__ = ["JobContext", "WorkerPool", "WorkerStartError", "CRASHED_TWICE_MESSAGE"]

log = logging.getLogger(__name__)

StateT = TypeVar("StateT")
TaskT = TypeVar("TaskT")
ResultT = TypeVar("ResultT")

_MP = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child; spawn is clean

CRASHED_TWICE_MESSAGE = "this input crashed a gradient worker twice; it is not retried"

# Weight of the newest finished job in the throughput estimate (cost units per second per worker).
RATE_EWMA_ALPHA = 0.2
# Task fingerprints remembered after a crash (bounded: a flood of distinct crashing inputs must not
# grow memory without limit; the oldest are forgotten first).
CRASH_MEMORY = 4096
# After a pipe EOF, how long the process may take to finish exiting before it is SIGKILLed.
REAP_TIMEOUT_S = 5.0
# close(): how long idle workers get to exit after Stop before they are SIGKILLed.
STOP_TIMEOUT_S = 2.0
# Replacement workers that die before they are ready are respawned after 0.5 s, 1 s, 2 s, ... 30 s.
RESPAWN_BACKOFF_S = (0.5, 30.0)

_ERRORS_BY_CODE: dict[str, type[ServiceError]] = {
    cls.code.name: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        Cancelled,
        Internal,
    )
}


class WorkerStartError(RuntimeError):
    """start() failed: a worker's initializer raised, a worker died before it was ready, or the
    workers were not ready within start_timeout_s. The message carries the worker's traceback."""


def _labels(task: object) -> tuple[str, str]:
    """(task, model) metric labels: `task.kind` (else the class name) and `task.model` (else "")."""
    kind = getattr(task, "kind", None)
    model = getattr(task, "model", None)
    return (kind if isinstance(kind, str) and kind else type(task).__name__), (
        model if isinstance(model, str) else ""
    )


def _exit_status(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the OOM killer, or killed by an operator)" if exitcode == -signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    if exitcode == EXIT_INIT_FAILED:
        return "exited: initializer failed"
    return f"exited with code {exitcode}"


def _death_reason(worker: _Worker, job: _Job | None) -> str:
    """The cnnserve_worker_deaths_total reason for a worker that went away while the pool ran."""
    if worker.kill_reason is not None:
        return worker.kill_reason  # the pool killed it: stop_overdue, ready_timeout, protocol_error
    if not worker.was_ready:
        return "init_failed"
    return "job_crash" if job is not None else "idle_crash"


def _consume(fut: asyncio.Future[Any]) -> None:
    # A replacement worker's ready future may fail with nobody awaiting it; retrieve the exception so
    # asyncio does not log "exception was never retrieved" (the pool already logged it).
    if not fut.cancelled():
        fut.exception()


WorkerState = Literal["starting", "idle", "busy", "dead"]


class _Worker:
    def __init__(
        self, slot: int, process: BaseProcess, conn: Connection, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.slot = slot
        self.process = process
        self.pid: int | None = process.pid
        self.conn = conn
        self.state: WorkerState = "starting"
        self.was_ready = False
        self.job: _Job | None = None
        self.init_error: str | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        self.ready.add_done_callback(_consume)
        self.reaped: asyncio.Future[int | None] = loop.create_future()
        self.ready_timer: asyncio.TimerHandle | None = None
        self.thread: threading.Thread | None = None
        # Why the pool itself killed this worker (a cnnserve_worker_deaths_total reason), if it did.
        self.kill_reason: str | None = None


@dataclass(eq=False)
class _Job:
    id: int
    task_label: str
    model_label: str
    cost: float
    task_bytes: bytes
    fingerprint: str
    deadline: float | None
    on_progress: Callable[[Any], None] | None
    future: asyncio.Future[Any]
    submitted_at: float
    dispatched_at: float | None = None
    worker: _Worker | None = None
    steps: int = 0
    stop_reason: str | None = None  # "cancelled", "deadline", "shutdown"
    killed: bool = False  # the pool itself killed the worker running it (not a crash of the input)
    released: bool = False
    deadline_timer: asyncio.TimerHandle | None = None
    watchdog: asyncio.TimerHandle | None = None


class WorkerPool(Generic[StateT, TaskT, ResultT]):
    """N spawned worker processes running `handler(state, task, ctx)`; see the module docstring.

    initializer: importable top-level callable (or functools.partial of one) run once per worker; its
        return value is the worker's state (e.g. the loaded models).
    handler: importable top-level callable `(state, task, ctx) -> result`; raises ServiceError
        subclasses for errors the client should see (re-raised here with their status), anything
        else is logged with its traceback and answered INTERNAL with a generic message.
    cost_budget: most cost units admitted and unfinished at once (settings.max_task_cost); also the
        cap for one job.
    start_timeout_s: how long start() waits for every initializer (and a replacement for its own).
    stop_grace_s: how long a job may ignore should_stop() after a cancel or its deadline before its
        worker is killed and replaced.
    """

    def __init__(
        self,
        *,
        workers: int,
        initializer: Callable[[], StateT],
        handler: Callable[[StateT, TaskT, JobContext], ResultT],
        cost_budget: float,
        name: str = "gradient",
        start_timeout_s: float = 300.0,
        stop_grace_s: float = 10.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not (math.isfinite(cost_budget) and cost_budget > 0):
            raise ValueError(f"cost_budget must be a positive finite number, got {cost_budget}")
        if start_timeout_s <= 0 or stop_grace_s <= 0:
            raise ValueError("start_timeout_s and stop_grace_s must be positive")
        self._n = workers
        self._initializer = initializer
        self._handler = handler
        self._budget = float(cost_budget)
        self._name = name
        self._start_timeout_s = start_timeout_s
        self._stop_grace_s = stop_grace_s

        self._state: Literal["new", "starting", "running", "closing", "closed"] = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: list[_Worker | None] = [None] * workers
        # One per slot, kept across restarts; lock-free (see _process.py for why).
        self._cancel_ids: list[SharedInt] = [_MP.RawValue("q", 0) for _ in range(workers)]
        self._respawn_failures = [0] * workers
        self._respawn_timers: dict[int, asyncio.TimerHandle] = {}
        self._queue: collections.deque[_Job] = collections.deque()
        self._admitted: dict[int, _Job] = {}
        self._admitted_cost = 0.0
        self._next_job_id = 1  # 0 is the cancel flags' initial value: never a job id
        self._alive = 0
        # Bumped whenever _alive changes; health follows it at once (wait_alive_change), not by polling.
        self._alive_generation = 0
        self._alive_changed = asyncio.Event()  # set and replaced at each change
        self._rate: float | None = None  # cost units per second per worker (EWMA)
        self._crashes: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._job_finished = asyncio.Event()
        self._closed = asyncio.Event()
        self._ready_summary: Any = None
        metrics.TASK_COST_BUDGET.set(self._budget)

    # --- public API -------------------------------------------------------------------------------

    @property
    def alive_workers(self) -> int:
        """Workers that finished their initializer and have not died (health: NOT_SERVING at 0)."""
        return self._alive

    @property
    def ready_summary(self) -> Any:
        """What the last worker to become ready reported about its state (the state's
        `ready_summary()`, e.g. the model versions it refused), or None before any is ready. Every
        worker runs the same initializer on the same config, so one report stands for all."""
        return self._ready_summary

    @property
    def alive_generation(self) -> int:
        """Changes whenever alive_workers does (see wait_alive_change)."""
        return self._alive_generation

    async def wait_alive_change(self, seen: int, timeout_s: float) -> None:
        """Return once alive_generation differs from `seen` (at once if it already does), or after
        `timeout_s`. Lets health drop to NOT_SERVING in the same loop turn the last worker dies."""
        if self._alive_generation != seen:
            return
        try:
            await asyncio.wait_for(self._alive_changed.wait(), timeout_s)
        except TimeoutError:
            pass

    def _alive_delta(self, delta: int) -> None:
        self._alive += delta
        metrics.WORKERS_ALIVE.inc(delta)
        self._alive_generation += 1
        self._alive_changed.set()
        self._alive_changed = asyncio.Event()

    @property
    def workers(self) -> int:
        """The configured number of workers."""
        return self._n

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the alive workers (for logs, debugging and tests)."""
        return [
            w.pid for w in self._slots if w is not None and w.state in ("idle", "busy") and w.pid is not None
        ]

    @property
    def cost_budget(self) -> float:
        return self._budget

    @property
    def admitted_cost(self) -> float:
        """Cost units admitted and not finished (queued or running)."""
        return self._admitted_cost

    async def start(self) -> None:
        """Spawn the workers and wait until every one ran its initializer.

        Raises WorkerStartError (with the worker's traceback) if an initializer raises, a worker dies
        before it is ready, or start_timeout_s passes; every worker is stopped first.
        """
        if self._state != "new":
            raise RuntimeError(f"WorkerPool.start() called in state {self._state!r}")
        self._loop = asyncio.get_running_loop()
        self._state = "starting"
        # Registered after multiprocessing's own exit hook, so it runs first (atexit is LIFO).
        atexit.register(self._kill_at_exit)
        started = time.monotonic()
        try:
            for slot in range(self._n):
                self._spawn(slot)
            async with asyncio.timeout(self._start_timeout_s):
                await asyncio.gather(*(w.ready for w in self._slots if w is not None))
        except BaseException as exc:
            ready = self._alive
            await self._stop_workers(graceful=False)
            self._state = "closed"
            self._closed.set()
            atexit.unregister(self._kill_at_exit)
            if isinstance(exc, TimeoutError):
                raise WorkerStartError(
                    f"{self._name} workers were not ready within {self._start_timeout_s:g} s "
                    f"({ready}/{self._n} ready): the initializer is too slow or hung"
                ) from None
            if isinstance(exc, OSError):
                raise WorkerStartError(f"could not spawn {self._name} workers: {exc}") from exc
            raise
        self._state = "running"
        log.info("%d %s workers ready in %.1f s", self._n, self._name, time.monotonic() - started)

    async def submit(
        self,
        task: TaskT,
        *,
        cost: float,
        deadline: float | None,
        on_progress: Callable[[Any], None] | None = None,
    ) -> ResultT:
        """Run `task` on a worker and return the handler's result.

        cost: the job's price in cost units (tasks.estimate_cost). deadline: absolute time.monotonic()
        or None. on_progress: called on the event loop, in order, with each ctx.progress() update.

        Raises: InvalidArgument (cost alone exceeds the budget), ResourceExhausted(reason="cost_budget")
        at once when the budget is full (message: estimated wait; attribute `retry_after_s`: seconds or
        None), DeadlineExceeded, Unavailable (no worker ready, shutting down, or the worker crashed),
        Internal (the task crashed workers twice, or the handler failed unexpectedly), the handler's
        own ServiceErrors. Cancelling the awaiting task stops the job in its worker within a step.
        """
        if self._state != "running":
            raise Unavailable(
                f"the {self._name} worker pool is "
                + ("shutting down" if self._state in ("closing", "closed") else "not started"),
                reason="unavailable",
            )
        assert self._loop is not None
        label, model = _labels(task)
        if (
            isinstance(cost, bool)
            or not isinstance(cost, (int, float))
            or not math.isfinite(cost)
            or cost < 0
        ):
            raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
        if cost > self._budget:
            raise InvalidArgument(
                f"this {label} job costs {cost:.4g} cost units, more than the {self._budget:.4g} a single "
                "job may use (max_task_cost); use fewer steps or a smaller image",
                reason="too_large",
            )
        task_bytes = pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
        fingerprint = hashlib.blake2b(task_bytes, digest_size=16).hexdigest()
        if self._crashes.get(fingerprint, 0) >= 2:
            raise Internal(CRASHED_TWICE_MESSAGE, reason="worker_crash")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"the deadline passed before the {label} job was queued")
        if self._alive == 0:
            raise Unavailable(f"no {self._name} worker is ready (restarting); retry shortly")
        if self._admitted_cost + cost > self._budget:
            # Not counted in cnnserve_rejections_total here: the servicer counts every refused call
            # once, under its RPC method, with this error's reason (servicers.Rpc.failed).
            wait_s = self._estimate_wait_s(cost)
            wait = "unknown (no job has finished yet)" if wait_s is None else f"about {wait_s:.1f} s"
            error = ResourceExhausted(
                f"{self._name} workers are saturated: {self._admitted_cost:.4g} of {self._budget:.4g} "
                f"cost units are admitted and this {label} job needs {cost:.4g}; "
                f"estimated wait {wait}; retry later",
                reason="cost_budget",
            )
            error.retry_after_s = wait_s  # type: ignore[attr-defined]
            raise error

        job = _Job(
            id=self._next_job_id,
            task_label=label,
            model_label=model,
            cost=float(cost),
            task_bytes=task_bytes,
            fingerprint=fingerprint,
            deadline=deadline,
            on_progress=on_progress,
            future=self._loop.create_future(),
            submitted_at=now,
        )
        self._next_job_id += 1
        self._admit(job)
        if deadline is not None:
            job.deadline_timer = self._loop.call_later(deadline - now, self._on_deadline, job)
        self._queue.append(job)
        self._dispatch()
        try:
            result: ResultT = await job.future
            return result
        except asyncio.CancelledError:
            self._abandon(job)
            raise

    async def close(self, grace_s: float) -> None:
        """Stop admitting (Unavailable), answer queued jobs Unavailable, let running jobs finish for up
        to `grace_s`, then stop (Unavailable) whatever still runs and reap every worker process."""
        if self._state == "closed":
            return
        if self._state == "closing":
            await self._closed.wait()
            return
        if self._state == "new":
            self._state = "closed"
            self._closed.set()
            return
        self._state = "closing"
        for timer in self._respawn_timers.values():
            timer.cancel()
        self._respawn_timers.clear()
        while self._queue:
            job = self._queue.popleft()
            self._answer(job, Unavailable(f"the {self._name} worker pool shut down before this job started"))
            self._release(job)

        assert self._loop is not None
        end = self._loop.time() + max(0.0, grace_s)
        while self._running_jobs():
            left = end - self._loop.time()
            if left <= 0:
                break
            self._job_finished.clear()
            try:
                await asyncio.wait_for(self._job_finished.wait(), left)
            except TimeoutError:
                break
        for job in self._running_jobs():
            log.warning(
                "job %d (%s) still running after the %.1f s grace period; stopping it",
                job.id,
                job.task_label,
                grace_s,
            )
            job.killed = True
            self._mark_stopped(job, "shutdown")
            self._answer(job, Unavailable(f"the {self._name} worker pool shut down before this job finished"))
        await self._stop_workers(graceful=True)
        self._state = "closed"
        self._closed.set()
        atexit.unregister(self._kill_at_exit)
        log.info("%s worker pool closed", self._name)

    def _kill_at_exit(self) -> None:
        """Interpreter exit without close() (a crash of the server's main code): kill the workers.

        multiprocessing's own exit hook would SIGTERM daemonic children and then join them, but
        workers ignore SIGTERM (the parent owns signals) and wait in recv() on a pipe the still
        living parent holds open: without this, the exit would hang forever.
        """
        workers = [w for w in self._slots if w is not None]
        for w in workers:
            self._kill(w)
        for w in workers:
            try:
                w.process.join(REAP_TIMEOUT_S)
            except (ValueError, AssertionError, AttributeError):
                pass  # already reaped and closed by its reader thread

    # --- admission, dispatch and bookkeeping (event loop only) --------------------------------------

    def _estimate_wait_s(self, cost: float) -> float | None:
        if self._rate is None:
            return None
        excess = self._admitted_cost + cost - self._budget
        return max(0.0, excess / (self._rate * max(1, self._alive)))

    def _admit(self, job: _Job) -> None:
        self._admitted[job.id] = job
        self._admitted_cost = math.fsum(j.cost for j in self._admitted.values())
        metrics.TASK_QUEUED_COST.inc(job.cost)
        metrics.TASKS_INFLIGHT.labels(task=job.task_label).inc()

    def _release(self, job: _Job) -> None:
        """The job no longer occupies the budget: it finished, was dropped from the queue, or its
        worker is free (a stopped job keeps its cost until its worker really stops)."""
        if job.released:
            return
        job.released = True
        for timer in (job.deadline_timer, job.watchdog):
            if timer is not None:
                timer.cancel()
        del self._admitted[job.id]
        # fsum over what is left: no float drift, exactly 0.0 when idle.
        self._admitted_cost = math.fsum(j.cost for j in self._admitted.values())
        metrics.TASK_QUEUED_COST.dec(job.cost)
        metrics.TASKS_INFLIGHT.labels(task=job.task_label).dec()
        self._job_finished.set()

    def _answer(self, job: _Job, outcome: BaseException | Any, *, error: bool = True) -> None:
        if job.future.done():
            return
        if error:
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    def _mark_stopped(self, job: _Job, reason: str) -> None:
        if job.stop_reason is None:
            job.stop_reason = reason
            if reason in ("cancelled", "deadline"):
                metrics.TASK_CANCELLATIONS.labels(task=job.task_label).inc()

    def _running_jobs(self) -> list[_Job]:
        return [w.job for w in self._slots if w is not None and w.job is not None]

    def _dispatch(self) -> None:
        while self._queue:
            worker = next((w for w in self._slots if w is not None and w.state == "idle"), None)
            if worker is None:
                return
            job = self._queue.popleft()
            now = time.monotonic()
            time_left = None if job.deadline is None else max(0.0, job.deadline - now)
            try:
                # Blocking, but the worker is idle in recv() and drains the pipe at once; a 12 MB
                # style-transfer image takes a few milliseconds.
                worker.conn.send(RunJob(job.id, job.task_bytes, time_left))
            except OSError:
                # The worker died an instant ago; its reader thread will report it. The job never
                # reached it, so it goes back to the head of the queue, blameless.
                self._queue.appendleft(job)
                self._mark_dead(worker)
                continue
            worker.state = "busy"
            worker.job = job
            job.worker = worker
            job.dispatched_at = now
            metrics.TASK_QUEUE_WAIT.labels(task=job.task_label).observe(now - job.submitted_at)

    def _request_stop(self, job: _Job) -> None:
        """Raise the job's stop flag in its worker; kill the worker if the handler ignores it."""
        worker = job.worker
        if worker is None or worker.job is not job:
            return
        self._cancel_ids[worker.slot].value = job.id
        if job.watchdog is None:
            assert self._loop is not None
            job.watchdog = self._loop.call_later(self._stop_grace_s, self._on_stop_overdue, job)

    def _on_stop_overdue(self, job: _Job) -> None:
        worker = job.worker
        if job.released or worker is None or worker.job is not job:
            return
        log.warning(
            "%s job %d (%s) ignored should_stop() for %.1f s; killing worker %d (pid %s) to free it",
            self._name,
            job.id,
            job.task_label,
            self._stop_grace_s,
            worker.slot,
            worker.pid,
        )
        job.killed = True
        self._kill(worker, reason="stop_overdue")

    def _abandon(self, job: _Job) -> None:
        """The caller went away (asyncio cancellation)."""
        if job.released:
            return
        self._mark_stopped(job, "cancelled")
        if job.worker is None:
            self._queue.remove(job)
            self._release(job)
        else:
            self._request_stop(job)

    def _on_deadline(self, job: _Job) -> None:
        if job.released or job.future.done():
            return
        self._mark_stopped(job, "deadline")
        if job.worker is None:
            self._queue.remove(job)
            self._answer(
                job, DeadlineExceeded(f"the {job.task_label} job waited for a worker past its deadline")
            )
            self._release(job)
        else:
            self._answer(
                job, DeadlineExceeded(f"the {job.task_label} job ran past its deadline and was stopped")
            )
            self._request_stop(job)

    def _count_steps(self, job: _Job, steps: int) -> None:
        if steps > job.steps:
            metrics.TASK_STEPS.labels(task=job.task_label, model=job.model_label).inc(steps - job.steps)
            job.steps = steps

    # --- worker lifecycle -------------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        assert self._loop is not None
        parent_conn, child_conn = _MP.Pipe(duplex=True)
        process = _MP.Process(
            target=worker_main,
            args=(child_conn, self._cancel_ids[slot], self._initializer, self._handler),
            name=f"{self._name}-worker-{slot}",
            daemon=True,  # never outlive the server, even if close() is skipped
        )
        # The parent owns SIGINT/SIGTERM. Blocked signals stay blocked across fork+exec, so the child
        # cannot die of a Ctrl-C before worker_main sets SIG_IGN and unblocks them; here they stay
        # pending for these few milliseconds, not lost.
        blocked = {signal.SIGINT, signal.SIGTERM}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            process.start()
        except BaseException:
            parent_conn.close()
            child_conn.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        child_conn.close()  # else the parent holds the child's end open and never sees EOF
        worker = _Worker(slot, process, parent_conn, self._loop)
        self._slots[slot] = worker
        worker.thread = threading.Thread(
            target=self._read, args=(worker,), name=f"{self._name}-worker-{slot}-reader", daemon=True
        )
        worker.thread.start()
        if self._state == "running":  # start() has its own overall timeout
            worker.ready_timer = self._loop.call_later(self._start_timeout_s, self._on_ready_timeout, worker)
        log.debug("spawned %s worker %d (pid %s)", self._name, slot, worker.pid)

    def _read(self, worker: _Worker) -> None:
        """Reader thread: every message to the loop, then EOF -> reap the process -> the loop."""
        conn = worker.conn
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # noqa: BLE001 - a message that does not unpickle in the parent
                self._post(self._on_undecodable, worker, exc)
                continue
            self._post(self._on_message, worker, message)
        self._post(self._mark_dead, worker)
        process = worker.process
        process.join(REAP_TIMEOUT_S)
        if process.exitcode is None:  # closed its pipe but did not exit: make sure it does
            process.kill()
            process.join()
        exitcode = process.exitcode
        process.close()
        conn.close()
        self._post(self._on_reaped, worker, exitcode)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting for this worker anymore

    def _kill(self, worker: _Worker, *, reason: str | None = None) -> None:
        if reason is not None and worker.kill_reason is None:
            worker.kill_reason = reason
        try:
            worker.process.kill()
        except (ValueError, AttributeError):
            pass  # already reaped and closed by its reader thread

    def _on_message(self, worker: _Worker, message: object) -> None:
        if isinstance(message, Ready):
            self._on_ready(worker, message)
        elif isinstance(message, Progress):
            job = self._job_on(worker, message.job_id)
            if job is not None:
                self._count_steps(job, message.steps)
                if job.on_progress is not None and not job.future.done():
                    try:
                        job.on_progress(message.update)
                    except Exception:
                        log.exception("on_progress callback of %s job %d failed", self._name, job.id)
        elif isinstance(message, Steps):
            job = self._job_on(worker, message.job_id)
            if job is not None:
                self._count_steps(job, message.steps)
        elif isinstance(message, Done):
            self._on_done(worker, message)
        elif isinstance(message, InitFailed):
            worker.init_error = f"{message.error}\n{message.traceback}"
            log.error(
                "%s worker %d (pid %s) failed to initialize:\n%s",
                self._name,
                worker.slot,
                worker.pid,
                message.traceback,
            )
        else:
            log.error("unexpected message from %s worker %d: %r", self._name, worker.slot, message)

    def _job_on(self, worker: _Worker, job_id: int) -> _Job | None:
        job = worker.job
        return job if job is not None and job.id == job_id else None

    def _on_ready(self, worker: _Worker, message: Ready) -> None:
        if worker.state != "starting":
            return
        if worker.ready_timer is not None:
            worker.ready_timer.cancel()
        worker.state = "idle"
        worker.was_ready = True
        worker.pid = message.pid
        self._ready_summary = message.summary
        self._alive_delta(+1)
        self._respawn_failures[worker.slot] = 0
        if not worker.ready.done():
            worker.ready.set_result(None)
        log.info(
            "%s worker %d (pid %d) ready in %.1f s", self._name, worker.slot, message.pid, message.init_s
        )
        if self._state == "closing":
            self._send_stop(worker)
        self._dispatch()

    def _on_ready_timeout(self, worker: _Worker) -> None:
        if worker.state == "starting":
            worker.init_error = f"not ready within {self._start_timeout_s:g} s (initializer too slow or hung)"
            log.error(
                "%s worker %d (pid %s) %s; killing it", self._name, worker.slot, worker.pid, worker.init_error
            )
            self._kill(worker, reason="ready_timeout")

    def _on_done(self, worker: _Worker, done: Done) -> None:
        job = self._job_on(worker, done.job_id)
        if job is None:
            log.error("%s worker %d reported unknown job %d", self._name, worker.slot, done.job_id)
            return
        worker.job = None
        if worker.state == "busy":
            worker.state = "idle"
        now = time.monotonic()
        run_s = now - (job.dispatched_at or now)
        self._count_steps(job, done.steps)
        metrics.TASK_DURATION.labels(task=job.task_label, model=job.model_label).observe(run_s)
        self._settle(worker, job, done, run_s)
        self._release(job)
        if self._state == "closing" and worker.state == "idle":
            self._send_stop(worker)
        self._dispatch()

    def _settle(self, worker: _Worker, job: _Job, done: Done, run_s: float) -> None:
        """Turn a worker's Done into the caller's result or exception."""
        if job.future.done():
            return  # already answered (deadline, cancellation, shutdown)
        stopped = job.stop_reason or done.stopped
        if stopped == "deadline":
            self._mark_stopped(job, "deadline")  # the worker's own deadline check fired first
            self._answer(
                job, DeadlineExceeded(f"the {job.task_label} job ran past its deadline and was stopped")
            )
            return
        if stopped is not None:
            self._answer(job, Cancelled(f"the {job.task_label} job was cancelled"))
            return
        outcome = done.outcome
        if isinstance(outcome, Ok):
            # It ran to the end, so it is not a poison input: an earlier crash while it ran was
            # something else (the OOM killer choosing it for a neighbour's memory, an operator).
            self._crashes.pop(job.fingerprint, None)
            if job.cost > 0 and run_s > 0:
                sample = job.cost / run_s
                self._rate = (
                    sample
                    if self._rate is None
                    else (RATE_EWMA_ALPHA * sample + (1.0 - RATE_EWMA_ALPHA) * self._rate)
                )
            if job.steps > 0 and run_s > 0:
                metrics.TASK_STEP_RATE.labels(task=job.task_label, model=job.model_label).observe(
                    job.steps / run_s
                )
            self._answer(job, outcome.result, error=False)
            return
        assert isinstance(outcome, Failed)
        if outcome.code is not None:
            self._answer(job, _rebuild_service_error(outcome))
            return
        log.error(
            "%s job %d (%s, model %r) failed in worker %d (pid %s) with an unexpected %s:\n%s",
            self._name,
            job.id,
            job.task_label,
            job.model_label,
            worker.slot,
            worker.pid,
            outcome.error_type,
            outcome.traceback,
        )
        self._answer(job, Internal(GENERIC_INTERNAL_MESSAGE))

    def _on_undecodable(self, worker: _Worker, exc: Exception) -> None:
        # We cannot tell which message it was (maybe the job's Done), so the job is answered and the
        # worker replaced rather than risking a job that never finishes.
        log.error(
            "a message from %s worker %d (pid %s) could not be unpickled in the server: %r",
            self._name,
            worker.slot,
            worker.pid,
            exc,
        )
        job = worker.job
        if job is not None:
            job.killed = True
            self._answer(job, Internal(GENERIC_INTERNAL_MESSAGE))
        self._kill(worker, reason="protocol_error")

    def _send_stop(self, worker: _Worker) -> None:
        try:
            worker.conn.send(Stop())
        except OSError:
            self._kill(worker)

    def _mark_dead(self, worker: _Worker) -> None:
        if worker.state == "dead":
            return
        if worker.state in ("idle", "busy"):
            self._alive_delta(-1)
        worker.state = "dead"
        if worker.ready_timer is not None:
            worker.ready_timer.cancel()

    def _on_reaped(self, worker: _Worker, exitcode: int | None) -> None:
        self._mark_dead(worker)
        status = _exit_status(exitcode)
        if not worker.ready.done():
            detail = worker.init_error or (
                f"{status} before it was ready (its stderr has the details; e.g. the initializer or "
                "handler cannot be imported in a fresh process)"
            )
            worker.ready.set_exception(
                WorkerStartError(f"{self._name} worker {worker.slot} failed to initialize: {detail}")
            )
        job, worker.job = worker.job, None
        if job is not None:
            self._on_crash(worker, job, status)
        if not worker.reaped.done():
            worker.reaped.set_result(exitcode)
        if self._state == "running":
            metrics.WORKER_DEATHS.labels(reason=_death_reason(worker, job)).inc()
            if worker.was_ready and job is None:
                log.error(
                    "%s worker %d (pid %s) died while idle: %s", self._name, worker.slot, worker.pid, status
                )
            self._schedule_respawn(worker)
        self._dispatch()

    def _on_crash(self, worker: _Worker, job: _Job, status: str) -> None:
        if job.killed:  # the pool killed it (stop overdue, shutdown, undecodable): not the input's fault
            self._release(job)
            return
        count = self._crashes.get(job.fingerprint, 0) + 1
        self._crashes[job.fingerprint] = count
        self._crashes.move_to_end(job.fingerprint)
        while len(self._crashes) > CRASH_MEMORY:
            self._crashes.popitem(last=False)
        log.error(
            "%s worker %d (pid %s) %s while running job %d (%s, model %r, input %s); crash %d of this input",
            self._name,
            worker.slot,
            worker.pid,
            status,
            job.id,
            job.task_label,
            job.model_label,
            job.fingerprint,
            count,
        )
        if count >= 2:
            self._answer(job, Internal(CRASHED_TWICE_MESSAGE, reason="worker_crash"))
        else:
            self._answer(
                job,
                Unavailable(
                    f"the {self._name} worker running this job crashed ({status}); the job was not retried",
                    reason="worker_crash",
                ),
            )
        self._release(job)

    def _schedule_respawn(self, worker: _Worker) -> None:
        assert self._loop is not None
        slot = worker.slot
        if worker.was_ready:
            delay = 0.0
        else:
            self._respawn_failures[slot] += 1
            low, high = RESPAWN_BACKOFF_S
            delay = min(high, low * 2 ** (self._respawn_failures[slot] - 1))
            log.error(
                "replacement %s worker %d (pid %s) died before it was ready (%s, attempt %d); "
                "retrying in %.1f s",
                self._name,
                slot,
                worker.pid,
                worker.init_error.splitlines()[0] if worker.init_error else "see its stderr",
                self._respawn_failures[slot],
                delay,
            )
        self._respawn_timers[slot] = self._loop.call_later(delay, self._respawn, slot)

    def _respawn(self, slot: int) -> None:
        self._respawn_timers.pop(slot, None)
        if self._state != "running":
            return
        metrics.WORKER_RESTARTS.inc()
        try:
            self._spawn(slot)
        except Exception:
            log.exception("could not respawn %s worker %d", self._name, slot)
            self._respawn_failures[slot] += 1
            low, high = RESPAWN_BACKOFF_S
            delay = min(high, low * 2 ** (self._respawn_failures[slot] - 1))
            assert self._loop is not None
            self._respawn_timers[slot] = self._loop.call_later(delay, self._respawn, slot)
        else:
            log.warning("respawned %s worker %d (pid %s)", self._name, slot, self._slots[slot].pid)  # type: ignore[union-attr]

    async def _stop_workers(self, *, graceful: bool) -> None:
        """Stop every worker process (Stop to idle ones when graceful, SIGKILL otherwise) and reap them."""
        workers = [w for w in self._slots if w is not None and not w.reaped.done()]
        for w in workers:
            if graceful and w.state == "idle":
                self._send_stop(w)
            else:
                self._kill(w)
        if not workers:
            return
        pending = {w.reaped for w in workers}
        _, pending = await asyncio.wait(pending, timeout=STOP_TIMEOUT_S)
        if pending:
            for w in workers:
                if not w.reaped.done():
                    self._kill(w)
            _, pending = await asyncio.wait(pending, timeout=REAP_TIMEOUT_S + STOP_TIMEOUT_S)
            if pending:
                log.error("%d %s worker processes could not be reaped", len(pending), self._name)
        for w in workers:
            if w.thread is not None:
                w.thread.join(timeout=1.0)


def _rebuild_service_error(failed: Failed) -> ServiceError:
    """The handler's ServiceError, with its class and attributes when it round-trips through pickle."""
    if failed.service_error is not None:
        try:
            error = pickle.loads(failed.service_error)
        except Exception:
            error = None
        if isinstance(error, ServiceError):
            return error
    cls = _ERRORS_BY_CODE.get(failed.code or "", Internal)
    return cls(failed.message, reason=failed.reason)
