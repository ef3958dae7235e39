"""Test-only initializers, handlers and tasks for the WorkerPool tests.

They live in their own module (not the test file) because spawned workers import them by name:
spawn pickles `initializer` and `handler` as references, and the child gets the parent's sys.path.
Everything is tiny and numpy-only, so a worker starts in well under a second.
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
from service.worker.pool import JobContext


@dataclass(frozen=True)
class State:
    pid: int
    initialized_at: float


def init_state() -> State:
    return State(pid=os.getpid(), initialized_at=time.time())


@dataclass(frozen=True)
class SummarizedState(State):
    """A state that reports something to the parent when ready (as the gradient workers report the
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


# --- tasks and results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SleepTask:
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
class CrashTask:
    kind: ClassVar[str] = "crash"
    mode: Literal["exit", "sigkill", "segfault"]
    nonce: int = 0
    model: str = "toy"


@dataclass(frozen=True)
class CrashIfMarkedTask:
    """Crashes its worker (os._exit) while `marker` exists, removing it first; returns "ok" otherwise.
    The same task (same pickle) can so crash once and succeed the next time."""

    kind: ClassVar[str] = "crash_if_marked"
    marker: str
    model: str = "toy"


@dataclass(frozen=True)
class FailTask:
    kind: ClassVar[str] = "fail"
    mode: Literal["not_found", "custom", "unpicklable_custom", "unexpected"]
    model: str = "toy"


@dataclass(frozen=True)
class ProgressTask:
    kind: ClassVar[str] = "progress"
    n: int
    model: str = "toy"


@dataclass(frozen=True)
class StepUpdate:
    step: int
    total: int
    payload: np.ndarray


@dataclass(frozen=True)
class EchoTask:
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


def handle(state: State, task: Any, ctx: JobContext) -> Any:
    if isinstance(task, SleepTask):
        return _sleep(state, task, ctx)
    if isinstance(task, CrashTask):
        return _crash(task)
    if isinstance(task, CrashIfMarkedTask):
        if os.path.exists(task.marker):
            os.unlink(task.marker)
            os._exit(19)
        return "ok"
    if isinstance(task, FailTask):
        return _fail(task)
    if isinstance(task, ProgressTask):
        for i in range(task.n):
            ctx.progress(StepUpdate(step=i + 1, total=task.n, payload=np.full(3, i, dtype=np.int64)))
        return task.n
    if isinstance(task, EchoTask):
        return EchoResult(doubled=task.array * 2, pid=os.getpid(), worker_initialized_at=state.initialized_at)
    raise TypeError(f"unknown test task {type(task).__name__}")


def _sleep(state: State, task: SleepTask, ctx: JobContext) -> SleepResult:
    if task.announce:
        ctx.progress(Started(pid=os.getpid(), tag=task.tag))
    done = 0
    for _ in range(task.steps):
        if not task.ignore_stop and ctx.should_stop():
            break
        time.sleep(task.step_s)
        ctx.step()
        done += 1
    return SleepResult(pid=os.getpid(), steps_run=done, tag=task.tag)


def _crash(task: CrashTask) -> None:
    if task.mode == "exit":
        os._exit(17)
    if task.mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if task.mode == "segfault":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    time.sleep(10)  # the signal is delivered before this returns
    raise AssertionError("still alive after crashing")


def _fail(task: FailTask) -> None:
    if task.mode == "not_found":
        raise NotFound("no model 'nope' version 3", reason="model_not_found")
    if task.mode == "custom":
        raise LayerNotFound("inception9z")
    if task.mode == "unpicklable_custom":
        raise TwoArgError("style images", 16)
    raise RuntimeError("secret internal detail: tensor 0x7f00 went away")
