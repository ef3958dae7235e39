"""The gradient pool's jobs from admission to answer: the queue, which process runs what, deadlines and
cancellation, and what each message from a process means for its job.

A job is queued (a parent-side FIFO: nothing waits inside a process, so a crash never strands queued
jobs and a slow job never blocks one behind it), then running on the first idle process, then
answered (its caller's future) and released (its cost leaves the budget). An answer can come before
the release: a deadline or a cancellation answers at once and raises the job's stop flag, and the
cost is held until the process really stops. Everything here runs on the event loop.

Stopping crosses the process boundary as a shared int64 per process slot (the id of the job to stop;
child.py says why it is lock-free) plus the seconds left until the deadline sent with the job. A job
that ignores should_stop() for `stop_grace_s` gets its process killed ("stop_overdue") and replaced.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.errors import GENERIC_INTERNAL_MESSAGE, Cancelled, DeadlineExceeded, Internal, Unavailable
from service.observability import metrics
from service.worker.admission import CRASHED_TWICE_MESSAGE, CostBudget, CrashLedger
from service.worker.child import Done, Failed, Ok, Progress, Report, RunJob, SharedInt, Steps, service_error
from service.worker.spawned import ChildProcess
from service.worker.supervisor import Supervisor

log = logging.getLogger(__name__)


@dataclass(eq=False)
class JobRecord:
    """The pool's record of one submitted job, from admission to its answer."""

    id: int
    task_label: str  # the `task` label of the metrics: the job's kind
    model_label: str
    cost: float
    job_bytes: bytes  # the pickle the process gets (and the crash ledger fingerprints)
    fingerprint: str
    deadline: float | None
    on_progress: Callable[[Any], None] | None
    future: asyncio.Future[Any]
    submitted_at: float
    dispatched_at: float | None = None
    process: ChildProcess | None = None
    steps: int = 0
    stop_reason: str | None = None  # "cancelled", "deadline", "shutdown"
    killed: bool = False  # the pool itself killed the process running it (not a crash of the input)
    released: bool = False
    deadline_timer: asyncio.TimerHandle | None = None
    watchdog: asyncio.TimerHandle | None = None


class Dispatcher:
    """The jobs of one GradientPool; `name` is for logs and messages ("gradient")."""

    def __init__(
        self,
        *,
        name: str,
        processes: Supervisor,
        budget: CostBudget,
        crashes: CrashLedger,
        cancel_ids: list[SharedInt],
        stop_grace_s: float,
        on_report: Callable[[int, Any], None] | None = None,
    ) -> None:
        self._name = name
        self._on_report = on_report
        self._processes = processes
        self._budget = budget
        self._crashes = crashes
        self._cancel_ids = cancel_ids
        self._stop_grace_s = stop_grace_s
        self._queue: collections.deque[JobRecord] = collections.deque()
        self._running: dict[ChildProcess, JobRecord] = {}  # the busy processes and their jobs
        self._next_job_id = 1  # 0 is the cancel flags' initial value: never a job id
        self._job_finished = asyncio.Event()
        self._draining = False

    def add(
        self,
        *,
        label: str,
        model: str,
        cost: float,
        job_bytes: bytes,
        fingerprint: str,
        deadline: float | None,
        on_progress: Callable[[Any], None] | None,
        now: float,
    ) -> JobRecord:
        """Admit a job that passed every check at `now` (time.monotonic()): its cost enters the
        budget, its deadline timer starts, and it goes to an idle process or waits in the queue."""
        loop = asyncio.get_running_loop()
        job = JobRecord(
            id=self._next_job_id,
            task_label=label,
            model_label=model,
            cost=float(cost),
            job_bytes=job_bytes,
            fingerprint=fingerprint,
            deadline=deadline,
            on_progress=on_progress,
            future=loop.create_future(),
            submitted_at=now,
        )
        self._next_job_id += 1
        self._budget.admit(job.id, job.cost, job.task_label)
        if deadline is not None:
            job.deadline_timer = loop.call_later(deadline - now, self._on_deadline, job)
        self._queue.append(job)
        self.dispatch()
        return job

    def dispatch(self) -> None:
        """Hand queued jobs to idle processes, oldest first."""
        while self._queue:
            child = next(
                (c for c in self._processes.children if c.state == "ready" and c not in self._running), None
            )
            if child is None:
                return
            job = self._queue.popleft()
            now = time.monotonic()
            time_left = None if job.deadline is None else max(0.0, job.deadline - now)
            try:
                # Blocking, but the process is idle in recv() and drains the pipe at once; a 12 MB
                # style-transfer image takes a few milliseconds.
                child.send(RunJob(job.id, job.job_bytes, time_left))
            except OSError:
                # The process died an instant ago; its reader thread will report it. The job never
                # reached it, so it goes back to the head of the queue, blameless.
                self._queue.appendleft(job)
                self._processes.mark_dead(child)
                continue
            self._running[child] = job
            job.process = child
            job.dispatched_at = now
            metrics.TASK_QUEUE_WAIT.labels(task=job.task_label).observe(now - job.submitted_at)

    def is_idle(self, child: ChildProcess) -> bool:
        return child not in self._running

    async def drain(self, grace_s: float) -> None:
        """The pool closes: queued jobs are answered Unavailable at once, running ones get `grace_s`
        to finish, then are answered Unavailable and marked for killing; from now on an idle
        process is stopped instead of given work."""
        self._draining = True
        while self._queue:
            job = self._queue.popleft()
            self._answer(job, Unavailable(f"the {self._name} worker pool shut down before this job started"))
            self._release(job)
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, grace_s)
        while self._running:
            left = end - loop.time()
            if left <= 0:
                break
            self._job_finished.clear()
            try:
                await asyncio.wait_for(self._job_finished.wait(), left)
            except TimeoutError:
                break
        for job in list(self._running.values()):
            log.warning(
                "job %d (%s) still running after the %.1f s grace period; stopping it",
                job.id,
                job.task_label,
                grace_s,
            )
            job.killed = True
            self._mark_stopped(job, "shutdown")
            self._answer(job, Unavailable(f"the {self._name} worker pool shut down before this job finished"))

    def _release(self, job: JobRecord) -> None:
        """The job no longer occupies the budget: it finished, was dropped from the queue, or its
        process is free (a stopped job keeps its cost until its process really stops)."""
        if job.released:
            return
        job.released = True
        for timer in (job.deadline_timer, job.watchdog):
            if timer is not None:
                timer.cancel()
        self._budget.release(job.id)
        self._job_finished.set()

    def _answer(self, job: JobRecord, outcome: BaseException | Any, *, error: bool = True) -> None:
        if job.future.done():
            return
        if error:
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    def _count_steps(self, job: JobRecord, steps: int) -> None:
        if steps > job.steps:
            metrics.TASK_STEPS.labels(task=job.task_label, model=job.model_label).inc(steps - job.steps)
            job.steps = steps

    # --- deadlines and cancellation -----------------------------------------------------------------

    def abandon(self, job: JobRecord) -> None:
        """The caller went away (asyncio cancellation): drop the job, or stop it in its process."""
        if job.released:
            return
        self._mark_stopped(job, "cancelled")
        if job.process is None:
            self._queue.remove(job)
            self._release(job)
        else:
            self._request_stop(job)

    def _mark_stopped(self, job: JobRecord, reason: str) -> None:
        if job.stop_reason is None:
            job.stop_reason = reason
            if reason in ("cancelled", "deadline"):
                metrics.TASK_CANCELLATIONS.labels(task=job.task_label).inc()

    def _request_stop(self, job: JobRecord) -> None:
        """Raise the job's stop flag in its process; kill the process if the handler ignores it."""
        child = job.process
        if child is None or self._running.get(child) is not job:
            return
        self._cancel_ids[child.slot].value = job.id
        if job.watchdog is None:
            job.watchdog = asyncio.get_running_loop().call_later(
                self._stop_grace_s, self._on_stop_overdue, job
            )

    def _on_stop_overdue(self, job: JobRecord) -> None:
        child = job.process
        if job.released or child is None or self._running.get(child) is not job:
            return
        log.warning(
            "%s job %d (%s) ignored should_stop() for %.1f s; killing worker %d (pid %s) to free it",
            self._name,
            job.id,
            job.task_label,
            self._stop_grace_s,
            child.slot,
            child.pid,
        )
        job.killed = True
        child.kill(reason="stop_overdue")

    def _on_deadline(self, job: JobRecord) -> None:
        if job.released or job.future.done():
            return
        self._mark_stopped(job, "deadline")
        if job.process is None:
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

    # --- what the processes report (the Supervisor's hooks) -----------------------------------------

    def on_ready(self, child: ChildProcess) -> None:
        if self._draining:
            self._processes.stop(child)
        self.dispatch()

    def on_message(self, child: ChildProcess, message: object) -> None:
        if isinstance(message, Progress):
            job = self._job_on(child, message.job_id)
            if job is not None:
                self._count_steps(job, message.steps)
                if job.on_progress is not None and not job.future.done():
                    try:
                        job.on_progress(message.update)
                    except Exception:
                        log.exception("on_progress callback of %s job %d failed", self._name, job.id)
        elif isinstance(message, Steps):
            job = self._job_on(child, message.job_id)
            if job is not None:
                self._count_steps(job, message.steps)
        elif isinstance(message, Report):
            self._report(child.slot, message.payload)
        elif isinstance(message, Done):
            self._on_done(child, message)
        else:
            log.error("unexpected message from %s worker %d: %r", self._name, child.slot, message)

    def on_undecodable(self, child: ChildProcess) -> None:
        # Maybe it was the job's Done: answer the job now (the supervisor replaces the process)
        # rather than risk a job that never finishes.
        job = self._running.get(child)
        if job is not None:
            job.killed = True
            self._answer(job, Internal(GENERIC_INTERNAL_MESSAGE))

    def on_exit(self, child: ChildProcess, status: str) -> bool:
        """The process is dead and reaped: its job, if it had one, crashed (or was killed by us).
        Whatever it reported about its state is void (on_report with None)."""
        self._report(child.slot, None)
        job = self._running.pop(child, None)
        if job is not None:
            self._on_crash(child, job, status)
        self.dispatch()
        return job is not None

    def _report(self, slot: int, payload: Any) -> None:
        if self._on_report is None:
            return
        try:
            self._on_report(slot, payload)
        except Exception:
            log.exception("on_report callback of the %s pool failed", self._name)

    def _job_on(self, child: ChildProcess, job_id: int) -> JobRecord | None:
        job = self._running.get(child)
        return job if job is not None and job.id == job_id else None

    def _on_done(self, child: ChildProcess, done: Done) -> None:
        job = self._job_on(child, done.job_id)
        if job is None:
            log.error("%s worker %d reported unknown job %d", self._name, child.slot, done.job_id)
            return
        del self._running[child]
        now = time.monotonic()
        run_s = now - (job.dispatched_at or now)
        self._count_steps(job, done.steps)
        metrics.TASK_DURATION.labels(task=job.task_label, model=job.model_label).observe(run_s)
        self._settle(child, job, done, run_s)
        self._release(job)
        if self._draining and child.state == "ready":
            self._processes.stop(child)
        self.dispatch()

    def _settle(self, child: ChildProcess, job: JobRecord, done: Done, run_s: float) -> None:
        """Turn a process's Done into the caller's result or exception."""
        if job.future.done():
            return  # already answered (deadline, cancellation, shutdown)
        stopped = job.stop_reason or done.stopped
        if stopped == "deadline":
            self._mark_stopped(job, "deadline")  # the process's own deadline check fired first
            self._answer(
                job, DeadlineExceeded(f"the {job.task_label} job ran past its deadline and was stopped")
            )
            return
        if stopped is not None:
            self._answer(job, Cancelled(f"the {job.task_label} job was cancelled"))
            return
        outcome = done.outcome
        if isinstance(outcome, Ok):
            self._crashes.clear(job.fingerprint)
            self._budget.ran(job.cost, run_s)
            if job.steps > 0 and run_s > 0:
                metrics.TASK_STEP_RATE.labels(task=job.task_label, model=job.model_label).observe(
                    job.steps / run_s
                )
            self._answer(job, outcome.result, error=False)
            return
        assert isinstance(outcome, Failed)
        if outcome.code is not None:
            self._answer(job, service_error(outcome))
            return
        log.error(
            "%s job %d (%s, model %r) failed in worker %d (pid %s) with an unexpected %s:\n%s",
            self._name,
            job.id,
            job.task_label,
            job.model_label,
            child.slot,
            child.pid,
            outcome.error_type,
            outcome.traceback,
        )
        self._answer(job, Internal(GENERIC_INTERNAL_MESSAGE))

    def _on_crash(self, child: ChildProcess, job: JobRecord, status: str) -> None:
        if job.killed:  # the pool killed it (stop overdue, shutdown, undecodable): not the input's fault
            self._release(job)
            return
        count = self._crashes.strike(job.fingerprint)
        log.error(
            "%s worker %d (pid %s) %s while running job %d (%s, model %r, input %s); crash %d of this input",
            self._name,
            child.slot,
            child.pid,
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


__all__ = ["Dispatcher", "JobRecord"]
