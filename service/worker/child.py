"""The child side of the gradient pool: the child's main loop, JobContext, and the pipe messages.

This module runs inside every spawned gradient process, so it imports nothing heavy: the algorithms'
modules come in through the pickled `initializer` / `handler` references. The parent half lives in
supervisor.py (spawn, the Ready/InitFailed handshake, reaping) and pool.py (jobs); everything that
crosses the pipe is one of the frozen dataclasses below (plain data: the job travels as the pickle
bytes the parent already made to fingerprint it).

Protocol on one duplex Pipe per child (the parent never shares a pipe between children, so one
death never touches another child's job):

    child -> parent   Ready | InitFailed, then per job: (Progress | Steps | Report)*, Done
    parent -> child   RunJob | Stop

Cancellation uses a shared, lock-free int64 per child (`cancel_id`): the parent writes the id of the
job to stop, `JobContext.should_stop()` compares it with its own id. Lock-free on purpose: a
multiprocessing.Event or a locked Value takes a semaphore, and a child SIGKILLed while holding it
would deadlock the parent's next cancel. An aligned 8-byte store/load cannot tear, and job ids are
never reused, so a stale value can never stop the wrong job.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

from service.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)

# The ServiceErrors a Failed may name by code when the error itself does not unpickle (service_error).
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

# Child exit statuses the parent can tell apart in its logs.
EXIT_INIT_FAILED = 3

# A handler that never calls progress() still reports its step count at most this often, so
# rate(cnnserve_task_steps_total) moves during a minutes-long job, not only at its end.
STEPS_REPORT_INTERVAL_S = 1.0


class SharedInt(Protocol):
    """multiprocessing.sharedctypes.RawValue("q"): an int64 in memory shared with the parent."""

    value: int


# --- messages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunJob:
    job_id: int
    task_bytes: bytes  # pickle of the task (the parent fingerprints these exact bytes)
    time_left_s: float | None  # seconds until the job's deadline when the parent sent it; None: none


@dataclass(frozen=True)
class Stop:
    """Exit after the current job (the parent sends it only to idle children)."""


@dataclass(frozen=True)
class Ready:
    pid: int
    init_s: float
    # The state's `ready_summary()` when it has one (plain data): what the initializer wants the
    # parent to know, e.g. the model versions it refused. None otherwise.
    summary: Any = None


@dataclass(frozen=True)
class InitFailed:
    error: str  # "ExcType: message"
    traceback: str


@dataclass(frozen=True)
class Progress:
    job_id: int
    update: Any
    steps: int


@dataclass(frozen=True)
class Steps:
    job_id: int
    steps: int


@dataclass(frozen=True)
class Report:
    """Something the handler tells the parent about the process's state while running a job (e.g.
    loading.ModelLoad: it built a model for it), for the pool's `on_report`; plain data."""

    job_id: int
    payload: Any


@dataclass(frozen=True)
class Ok:
    result: Any


@dataclass(frozen=True)
class Failed:
    """The handler raised. `error` is the pickled ServiceError when it round-trips through pickle
    (so its class and attributes survive), else None and the parent rebuilds it from `code`."""

    service_error: bytes | None
    code: str | None  # grpc.StatusCode name for ServiceErrors, None for unexpected exceptions
    message: str
    reason: str | None
    error_type: str
    traceback: str


@dataclass(frozen=True)
class Done:
    job_id: int
    outcome: Ok | Failed
    steps: int
    stopped: str | None  # why should_stop() turned true ("cancelled", "deadline", "parent_gone"), if it did
    run_s: float  # handler time in the child


# --- the context handlers get ---------------------------------------------------------------------


class JobContext:
    """Passed to the handler with each job, inside the gradient process.

    should_stop(): the parent cancelled the job (the client went away, or the deadline passed and the
        parent gave up), the job's deadline passed, or the parent process is gone. Check it between
        optimisation steps; once true it stays true. After it turned true, whatever the handler returns
        or raises is answered with DeadlineExceeded / Cancelled by the pool.
    progress(update): send a picklable update (a frozen dataclass of plain values / numpy arrays) to
        the parent's on_progress callback; delivered in order. If the update has an int `step`
        attribute (1-based, cumulative), it also counts as the job's step count.
    step(n=1): count n optimisation steps for cnnserve_task_steps_total (for handlers whose progress
        updates carry no `step`).
    report(payload): send a picklable note about the process's state (not the job's progress) to
        the pool's on_report callback, e.g. that it built a model for this job.
    """

    def __init__(
        self,
        *,
        job_id: int,
        send: Callable[[object], None],
        cancel_id: SharedInt,
        deadline: float | None,
        parent_pid: int,
    ) -> None:
        self._job_id = job_id
        self._send = send
        self._cancel_id = cancel_id
        self._deadline = deadline  # this process's time.monotonic()
        self._parent_pid = parent_pid
        self._stopped: str | None = None
        self._steps = 0
        self._last_steps_sent = 0
        self._last_report = time.monotonic()

    @property
    def job_id(self) -> int:
        return self._job_id

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def stopped(self) -> str | None:
        """Why should_stop() turned true, or None if it never did."""
        return self._stopped

    def should_stop(self) -> bool:
        if self._stopped is not None:
            return True
        if self._cancel_id.value == self._job_id:
            self._stopped = "cancelled"
        elif self._deadline is not None and time.monotonic() >= self._deadline:
            self._stopped = "deadline"
        elif os.getppid() != self._parent_pid:
            self._stopped = "parent_gone"
        return self._stopped is not None

    def progress(self, update: Any) -> None:
        step = getattr(update, "step", None)
        if isinstance(step, int) and not isinstance(step, bool) and step > self._steps:
            self._steps = step
        self._send(Progress(self._job_id, update, self._steps))
        self._last_steps_sent = self._steps
        self._last_report = time.monotonic()

    def report(self, payload: Any) -> None:
        self._send(Report(self._job_id, payload))

    def step(self, n: int = 1) -> None:
        self._steps += n
        now = time.monotonic()
        if now - self._last_report >= STEPS_REPORT_INTERVAL_S and self._steps != self._last_steps_sent:
            self._send(Steps(self._job_id, self._steps))
            self._last_steps_sent = self._steps
            self._last_report = now


# --- the child's main loop ------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"


def _failure(exc: BaseException) -> Failed:
    tb = "".join(traceback.format_exception(exc))
    error_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
    if isinstance(exc, ServiceError):
        blob: bytes | None
        try:
            blob = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
            pickle.loads(blob)  # a subclass with a custom __init__ may not rebuild; then send by code
        except Exception:
            blob = None
        return Failed(blob, exc.code.name, exc.message, exc.reason, error_type, tb)
    return Failed(None, None, str(exc), None, error_type, tb)


def service_error(failed: Failed) -> ServiceError:
    """The parent's side of `_failure`: the handler's ServiceError, with its class and attributes when
    it round-trips through pickle, else rebuilt from its code; an unknown code is Internal."""
    if failed.service_error is not None:
        try:
            error = pickle.loads(failed.service_error)
        except Exception:
            error = None
        if isinstance(error, ServiceError):
            return error
    cls = _ERRORS_BY_CODE.get(failed.code or "", Internal)
    return cls(failed.message, reason=failed.reason)


def child_main(
    conn: Connection,
    cancel_id: SharedInt,
    initializer: Callable[[], Any],
    handler: Callable[[Any, Any, JobContext], Any],
) -> None:
    """Entry point of a gradient process (multiprocessing spawn target): the ready handshake, then
    one job per RunJob until Stop or until the parent is gone."""
    _ignore_signals()
    parent_pid = os.getppid()
    send_lock = threading.Lock()  # a handler may report progress from its own threads

    def send(message: object) -> None:
        with send_lock:
            conn.send(message)

    state = _initialize(conn, send, initializer)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break  # the parent is gone
        if isinstance(message, Stop):
            break
        assert isinstance(message, RunJob), message
        if not _run_job(message, state, handler, send, cancel_id, parent_pid):
            break  # the parent is gone
        # Drop the last job's arrays now rather than holding them while idle.
        del message
    conn.close()


def _ignore_signals() -> None:
    # The parent owns signals: a Ctrl-C (SIGINT to the whole foreground process group) or a SIGTERM
    # to the group (systemd KillMode=control-group, `kill -- -PGID`) must not kill jobs the parent
    # is draining; the parent stops its children with a Stop message, or SIGKILL after its grace
    # period. The parent blocked both signals around the spawn so the window before this line is
    # covered too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _initialize(conn: Connection, send: Callable[[object], None], initializer: Callable[[], Any]) -> Any:
    """Run the initializer and answer Ready (with the state's ready_summary()), or InitFailed and
    exit with EXIT_INIT_FAILED."""
    started = time.monotonic()
    try:
        state = initializer()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails start()
        try:
            send(InitFailed(_describe(exc), "".join(traceback.format_exception(exc))))
        except OSError:
            pass
        conn.close()
        os._exit(EXIT_INIT_FAILED)
    summarize = getattr(state, "ready_summary", None)
    send(Ready(os.getpid(), time.monotonic() - started, summarize() if callable(summarize) else None))
    return state


def _run_job(
    message: RunJob,
    state: Any,
    handler: Callable[[Any, Any, JobContext], Any],
    send: Callable[[object], None],
    cancel_id: SharedInt,
    parent_pid: int,
) -> bool:
    """Run one job and send its Done; False when the parent is gone."""
    job_started = time.monotonic()
    deadline = None if message.time_left_s is None else job_started + message.time_left_s
    ctx = JobContext(
        job_id=message.job_id, send=send, cancel_id=cancel_id, deadline=deadline, parent_pid=parent_pid
    )
    outcome: Ok | Failed
    try:
        task = pickle.loads(message.task_bytes)
        outcome = Ok(handler(state, task, ctx))
    except Exception as exc:
        outcome = _failure(exc)
    done = Done(message.job_id, outcome, ctx.steps, ctx.stopped, time.monotonic() - job_started)
    try:
        send(done)
    except OSError:
        return False
    except Exception as exc:  # the result does not pickle: answer the job instead of dying
        send(Done(message.job_id, _failure(exc), ctx.steps, ctx.stopped, done.run_s))
    return True
