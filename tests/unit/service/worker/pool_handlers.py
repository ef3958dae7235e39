"""Test-only initializers, handlers and jobs for the GradientPool tests.

They live in their own module (not the test file) because spawned processes import them by name:
spawn pickles `initializer` and `handler` as references, and the child gets the parent's sys.path.
Everything is tiny and numpy-only, so a process starts in well under a second.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from service.errors import InvalidArgument, NotFound
from service.worker.child import JobContext


@dataclass(frozen=True)
class State:
    pid: int
    initialized_at: float


def init_state() -> State:
    return State(pid=os.getpid(), initialized_at=time.time())


@dataclass(frozen=True)
class SummarizedState(State):
    """A state that reports something to the parent when ready (as the gradient processes report the
    model versions they refused)."""

    def ready_summary(self) -> dict[str, Any]:
        return {"refused": {"toy:2": "disagrees with its ONNX model"}, "pid": self.pid}


def init_summarized() -> SummarizedState:
    return SummarizedState(pid=os.getpid(), initialized_at=time.time())


def init_fail() -> State:
    raise FileNotFoundError("no weights at /models/missing/weights.pt")


def init_unless(marker: str) -> State:
    """Fails while `marker` exists (use with functools.partial): lets a test break replacements."""
    if os.path.exists(marker):
        raise RuntimeError(f"refusing to start while {marker} exists")
    return init_state()


def init_hang() -> State:
    time.sleep(120)
    return init_state()


# --- jobs and results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SleepJob:
    """`steps` optimisation steps of `step_s` each, checking should_stop() before every step."""

    kind: ClassVar[str] = "sleep"
    model: str = "toy"
    steps: int = 10
    step_s: float = 0.01
    ignore_stop: bool = False  # a misbehaving handler that never checks should_stop()
    announce: bool = False  # send a Started progress update (with the pid) before the first step
    tag: int = 0


@dataclass(frozen=True)
class Started:
    pid: int
    tag: int


@dataclass(frozen=True)
class SleepResult:
    pid: int
    steps_run: int
    tag: int


@dataclass(frozen=True)
class CrashJob:
    kind: ClassVar[str] = "crash"
    mode: Literal["exit", "sigkill", "segfault"]
    nonce: int = 0
    model: str = "toy"


@dataclass(frozen=True)
class CrashIfMarkedJob:
    """Crashes its process (os._exit) while `marker` exists, removing it first; returns "ok" otherwise.
    The same job (same pickle) can so crash once and succeed the next time."""

    kind: ClassVar[str] = "crash_if_marked"
    marker: str
    model: str = "toy"


@dataclass(frozen=True)
class FailJob:
    kind: ClassVar[str] = "fail"
    mode: Literal["not_found", "custom", "unpicklable_custom", "unexpected"]
    model: str = "toy"


@dataclass(frozen=True)
class ProgressJob:
    kind: ClassVar[str] = "progress"
    n: int
    model: str = "toy"


@dataclass(frozen=True)
class ReportJob:
    """Reports `notes` (ctx.report) and returns its process's pid."""

    kind: ClassVar[str] = "report"
    notes: tuple[str, ...]
    model: str = "toy"


@dataclass(frozen=True)
class StepUpdate:
    step: int
    total: int
    payload: np.ndarray


@dataclass(frozen=True)
class EchoJob:
    kind: ClassVar[str] = "echo"
    array: np.ndarray
    model: str = "toy"


@dataclass(frozen=True)
class EchoResult:
    doubled: np.ndarray
    pid: int
    worker_initialized_at: float


class LayerNotFound(NotFound):
    """A handler-defined ServiceError subclass with an extra attribute."""

    def __init__(self, layer: str) -> None:
        super().__init__(f"model has no layer {layer!r}", reason="unknown_layer")
        self.layer = layer


class TwoArgError(InvalidArgument):
    """A ServiceError subclass pickle cannot rebuild (two required arguments)."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} exceeds {limit}", reason="two_arg")


# --- the handler ----------------------------------------------------------------------------------


def handle(state: State, job: Any, ctx: JobContext) -> Any:
    if isinstance(job, SleepJob):
        return _sleep(state, job, ctx)
    if isinstance(job, CrashJob):
        return _crash(job)
    if isinstance(job, CrashIfMarkedJob):
        if os.path.exists(job.marker):
            os.unlink(job.marker)
            os._exit(19)
        return "ok"
    if isinstance(job, FailJob):
        return _fail(job)
    if isinstance(job, ProgressJob):
        for i in range(job.n):
            ctx.progress(StepUpdate(step=i + 1, total=job.n, payload=np.full(3, i, dtype=np.int64)))
        return job.n
    if isinstance(job, ReportJob):
        for note in job.notes:
            ctx.report(note)
        return os.getpid()
    if isinstance(job, EchoJob):
        return EchoResult(doubled=job.array * 2, pid=os.getpid(), worker_initialized_at=state.initialized_at)
    raise TypeError(f"unknown test job {type(job).__name__}")


def _sleep(state: State, job: SleepJob, ctx: JobContext) -> SleepResult:
    if job.announce:
        ctx.progress(Started(pid=os.getpid(), tag=job.tag))
    done = 0
    for _ in range(job.steps):
        if not job.ignore_stop and ctx.should_stop():
            break
        time.sleep(job.step_s)
        ctx.step()
        done += 1
    return SleepResult(pid=os.getpid(), steps_run=done, tag=job.tag)


def _crash(job: CrashJob) -> None:
    if job.mode == "exit":
        os._exit(17)
    if job.mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if job.mode == "segfault":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    time.sleep(10)  # the signal is delivered before this returns
    raise AssertionError("still alive after crashing")


def _fail(job: FailJob) -> None:
    if job.mode == "not_found":
        raise NotFound("no model 'nope' version 3", reason="model_not_found")
    if job.mode == "custom":
        raise LayerNotFound("inception9z")
    if job.mode == "unpicklable_custom":
        raise TwoArgError("style images", 16)
    raise RuntimeError("secret internal detail: tensor 0x7f00 went away")
