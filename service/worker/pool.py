"""The gradient pool: jobs (guided backprop, DeepDream, style transfer) in spawned gradient processes.

The pool knows nothing about the algorithms: it runs `handler(state, job, ctx)` in N gradient
processes, each of which ran `initializer()` once (docs/SERVICE_INTERFACES.md, "Gradient jobs").
It is four modules:

- this one: the public API (start, submit in its order of checks, close, the health the server
  follows);
- admission.py: what gets in, the cost budget with its wait estimate and the ledger of inputs that
  crashed a process;
- dispatch.py: each job from admission to answer, the queue, dispatch, deadlines and cancellation,
  what a process's messages and death mean for its job, and the job metrics;
- supervisor.py (with spawned.py): the N processes kept alive, spawn, the Ready handshake, crash
  detection by pipe EOF, reaping, respawn with backoff. It knows nothing about jobs.

Design (MLServer's parallel/ layout, not concurrent.futures.ProcessPoolExecutor, which fails *every*
pending future when one worker dies):

- Each gradient process has its own duplex Pipe, so a process that dies takes only its own job with
  it; jobs wait in a parent-side FIFO, never inside a process (dispatch.py).
- Admission is by cost (admission.py): admitted-but-unfinished cost may not exceed `cost_budget`; a
  job that does not fit is refused at once with an estimated wait.
- Cancellation and deadlines cross the process boundary (dispatch.py); JobContext.should_stop()
  checks them between optimisation steps, and a job that ignores it for `stop_grace_s` gets its
  process killed and replaced.
- Retry policy: a job whose process crashes is NOT retried by the pool. Its caller gets UNAVAILABLE
  (a code gRPC clients may retry) and the crash ledger gives the input a strike; if the same job
  crashes a process again it is answered INTERNAL, and from then on refused with INTERNAL at once,
  without touching a process. Retrying inside the pool would double the blast radius of a poison
  input and hide crashes from the client's own retry budget.
- Every process that goes away while the pool runs is counted in cnnserve_worker_deaths_total by
  reason (job_crash, idle_crash, init_failed, and the pool's own kills: stop_overdue, ready_timeout,
  protocol_error); every replacement in cnnserve_worker_restarts_total.
- Metrics are recorded in the serving process (service.observability.metrics, "gradient jobs"), by
  dispatch.py and admission.py, labelled task=`job.kind` (else the class name) and
  model=`job.model`. Rejections are the exception: the servicer counts each refused call once under
  its RPC method, from the error's `reason`. The metric names and labels keep "task" and "worker"
  (dashboards and alerts use them).

Deadlines are absolute `time.monotonic()` values in the serving process. The process gets the seconds
left at the moment the job is sent and measures them with its own monotonic clock: Python does not
promise that monotonic() shares a reference point across processes, and converting to wall-clock
time would let an NTP step move every deadline. The transfer delay only makes the process's own check
later by that much; the parent's timer still answers DEADLINE_EXCEEDED at the true deadline and sets
the job's stop flag.
"""

from __future__ import annotations

import asyncio
import logging
import math
import pickle
import time
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

from service.errors import DeadlineExceeded, Unavailable
from service.observability import metrics
from service.worker.admission import CostBudget, CrashLedger
from service.worker.child import JobContext, SharedInt, child_main
from service.worker.dispatch import Dispatcher, JobRecord
from service.worker.spawned import MP_CONTEXT
from service.worker.supervisor import ChildMetrics, Supervisor

__all__ = ["GradientPool"]

log = logging.getLogger(__name__)

StateT = TypeVar("StateT")
JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")


def _labels(job: object) -> tuple[str, str]:
    """(task, model) metric labels: `job.kind` (else the class name) and `job.model` (else "")."""
    kind = getattr(job, "kind", None)
    model = getattr(job, "model", None)
    return (kind if isinstance(kind, str) and kind else type(job).__name__), (
        model if isinstance(model, str) else ""
    )


class GradientPool(Generic[StateT, JobT, ResultT]):
    """N spawned gradient processes running `handler(state, job, ctx)`; see the module docstring.

    workers: the number of processes (settings.workers keeps its name).
    initializer: importable top-level callable (or functools.partial of one) run once per process;
        its return value is the process's state (e.g. the loaded models).
    handler: importable top-level callable `(state, job, ctx) -> result`; raises ServiceError
        subclasses for errors the client should see (re-raised here with their status), anything
        else is logged with its traceback and answered INTERNAL with a generic message.
    cost_budget: most cost units admitted and unfinished at once (settings.max_task_cost); also the
        cap for one job.
    start_timeout_s: how long start() waits for every initializer (and a replacement for its own).
    stop_grace_s: how long a job may ignore should_stop() after a cancel or its deadline before its
        process is killed and replaced.
    on_report(slot, payload): called on the event loop with each ctx.report() payload of the
        process in `slot`, and with None when that process is gone (what it reported is void).
    """

    def __init__(
        self,
        *,
        workers: int,
        initializer: Callable[[], StateT],
        handler: Callable[[StateT, JobT, JobContext], ResultT],
        cost_budget: float,
        name: str = "gradient",
        start_timeout_s: float = 300.0,
        stop_grace_s: float = 10.0,
        on_report: Callable[[int, Any], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not (math.isfinite(cost_budget) and cost_budget > 0):
            raise ValueError(f"cost_budget must be a positive finite number, got {cost_budget}")
        if start_timeout_s <= 0 or stop_grace_s <= 0:
            raise ValueError("start_timeout_s and stop_grace_s must be positive")
        self._n = workers
        self._name = name
        # The configured timeouts, as given (the supervisor and the dispatcher apply them).
        self._start_timeout_s = start_timeout_s
        self._stop_grace_s = stop_grace_s
        self._state: Literal["new", "starting", "running", "closing", "closed"] = "new"
        # One per slot, kept across restarts; lock-free (see child.py for why).
        cancel_ids: list[SharedInt] = [MP_CONTEXT.RawValue("q", 0) for _ in range(workers)]
        self._processes = Supervisor(
            name=name,
            count=workers,
            target=child_main,
            args=lambda slot: (cancel_ids[slot], initializer, handler),
            ready_timeout_s=start_timeout_s,
            # The dispatcher follows every process; it is built right below, before any can start.
            on_ready=lambda child: self._jobs.on_ready(child),
            on_message=lambda child, message: self._jobs.on_message(child, message),
            on_undecodable=lambda child: self._jobs.on_undecodable(child),
            on_exit=lambda child, status: self._jobs.on_exit(child, status),
            metrics=ChildMetrics(
                alive=metrics.WORKERS_ALIVE, deaths=metrics.WORKER_DEATHS, restarts=metrics.WORKER_RESTARTS
            ),
        )
        self._budget = CostBudget(cost_budget, name=name)
        self._crashes = CrashLedger()
        self._jobs = Dispatcher(
            name=name,
            processes=self._processes,
            budget=self._budget,
            crashes=self._crashes,
            cancel_ids=cancel_ids,
            stop_grace_s=stop_grace_s,
            on_report=on_report,
        )
        self._closed = asyncio.Event()

    # --- public API -------------------------------------------------------------------------------

    @property
    def alive_workers(self) -> int:
        """Processes that finished their initializer and have not died (health: NOT_SERVING at 0)."""
        return self._processes.alive

    @property
    def ready_summary(self) -> Any:
        """What the last process to become ready reported about its state (the state's
        `ready_summary()`, e.g. the model versions it refused), or None before any is ready. Every
        process runs the same initializer on the same config, so one report stands for all."""
        return self._processes.ready_summary

    @property
    def alive_generation(self) -> int:
        """Changes whenever alive_workers does (see wait_alive_change)."""
        return self._processes.alive_generation

    async def wait_alive_change(self, seen: int, timeout_s: float) -> None:
        """Return once alive_generation differs from `seen` (at once if it already does), or after
        `timeout_s`. Lets health drop to NOT_SERVING in the same loop turn the last process dies."""
        await self._processes.wait_alive_change(seen, timeout_s)

    @property
    def workers(self) -> int:
        """The configured number of processes."""
        return self._n

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the alive processes (for logs, debugging and tests)."""
        return self._processes.pids

    @property
    def cost_budget(self) -> float:
        return self._budget.budget

    @property
    def admitted_cost(self) -> float:
        """Cost units admitted and not finished (queued or running)."""
        return self._budget.admitted

    async def start(self) -> None:
        """Spawn the processes and wait until every one ran its initializer.

        Raises supervisor.ProcessStartError (with the child's traceback) if an initializer raises, a
        process dies before it is ready, or start_timeout_s passes; every process is stopped first.
        """
        if self._state != "new":
            raise RuntimeError(f"GradientPool.start() called in state {self._state!r}")
        self._state = "starting"
        try:
            await self._processes.start()
        except BaseException:
            self._state = "closed"
            self._closed.set()
            raise
        self._state = "running"

    async def submit(
        self,
        job: JobT,
        *,
        cost: float,
        deadline: float | None,
        on_progress: Callable[[Any], None] | None = None,
    ) -> ResultT:
        """Run `job` in a gradient process and return the handler's result.

        cost: the job's price in cost units (jobs.estimate_cost). deadline: absolute time.monotonic()
        or None. on_progress: called on the event loop, in order, with each ctx.progress() update.

        Raises: InvalidArgument (cost alone exceeds the budget), ResourceExhausted(reason="cost_budget")
        at once when the budget is full (message: estimated wait; attribute `retry_after_s`: seconds or
        None), DeadlineExceeded, Unavailable (no process ready, shutting down, or the process crashed),
        Internal (the job crashed processes twice, or the handler failed unexpectedly), the handler's
        own ServiceErrors. Cancelling the awaiting task stops the job in its process within a step.
        """
        record = self._enqueue(job, cost, deadline, on_progress)
        try:
            result: ResultT = await record.future
            return result
        except asyncio.CancelledError:
            self._jobs.abandon(record)
            raise

    async def close(self, grace_s: float) -> None:
        """Stop admitting (Unavailable), answer queued jobs Unavailable, let running jobs finish for up
        to `grace_s`, then stop (Unavailable) whatever still runs and reap every process."""
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
        self._processes.stop_respawning()
        await self._jobs.drain(grace_s)
        await self._processes.shutdown(graceful=self._jobs.is_idle)
        self._state = "closed"
        self._closed.set()
        log.info("%s worker pool closed", self._name)

    def _enqueue(
        self, job: JobT, cost: float, deadline: float | None, on_progress: Callable[[Any], None] | None
    ) -> JobRecord:
        """submit's checks, in order and all synchronous (so admission is exact and answered at
        once); then the dispatcher admits the job."""
        if self._state != "running":
            if self._state == "starting":
                # A server serves classification before its gradient processes have loaded the
                # models (tens of seconds for VGG-19 on 2 cores): say it is coming, not absent.
                what = "still starting (its processes load the models first); retry shortly"
            elif self._state in ("closing", "closed"):
                what = "shutting down"
            else:
                what = "not started"
            raise Unavailable(f"the {self._name} worker pool is {what}", reason="unavailable")
        label, model = _labels(job)
        self._budget.check_alone(cost, label)
        job_bytes = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        fingerprint = self._crashes.fingerprint(job_bytes)
        self._crashes.refuse_poison(fingerprint)
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"the deadline passed before the {label} job was queued")
        if self._processes.alive == 0:
            raise Unavailable(f"no {self._name} worker is ready (restarting); retry shortly")
        self._budget.check_room(cost, label, self._processes.alive)

        return self._jobs.add(
            label=label,
            model=model,
            cost=cost,
            job_bytes=job_bytes,
            fingerprint=fingerprint,
            deadline=deadline,
            on_progress=on_progress,
            now=now,
        )
