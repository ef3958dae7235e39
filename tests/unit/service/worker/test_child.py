"""The child side of the pipe protocol (service/worker/child.py), in this process: what a handler's
JobContext reports and when it says stop, and how a handler's error crosses the pipe. The whole
protocol over real pipes is tested through the pool (test_pool, test_dispatch, test_supervisor)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest

from service.errors import Internal, InvalidArgument, NotFound, ServiceError
from service.worker import child
from service.worker.child import Failed, JobContext, Progress, Steps, service_error


@dataclass
class Flag:
    value: int = 0


@dataclass(frozen=True)
class Update:
    step: int


def context(cancel: Flag, sent: list[object], deadline: float | None = None) -> JobContext:
    parent = os.getppid()  # should_stop() also turns true when the parent process is gone
    return JobContext(job_id=7, send=sent.append, cancel_id=cancel, deadline=deadline, parent_pid=parent)


def test_should_stop_turns_true_for_its_own_job_or_its_deadline_and_stays_true() -> None:
    cancel, sent = Flag(), []
    ctx = context(cancel, sent)
    assert not ctx.should_stop() and ctx.stopped is None
    cancel.value = 6  # another job's id: not this one
    assert not ctx.should_stop()
    cancel.value = 7
    assert ctx.should_stop() and ctx.stopped == "cancelled"
    cancel.value = 0
    assert ctx.should_stop()  # sticky

    late = context(Flag(), sent, deadline=time.monotonic() - 1)
    assert late.should_stop() and late.stopped == "deadline"


def test_progress_counts_steps_and_steps_are_reported_at_most_every_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[object] = []
    ctx = context(Flag(), sent)
    ctx.progress(Update(step=3))
    assert sent == [Progress(7, Update(step=3), 3)] and ctx.steps == 3
    ctx.step()
    assert ctx.steps == 4 and len(sent) == 1  # within the interval: nothing sent
    monkeypatch.setattr(child, "STEPS_REPORT_INTERVAL_S", 0.0)
    ctx.step(2)
    assert sent[-1] == Steps(7, 6)


class TwoArgError(InvalidArgument):
    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} exceeds {limit}", reason="two_arg")


def test_a_handler_error_crosses_the_pipe_with_its_class_or_at_least_its_code() -> None:
    def crossed(exc: Exception) -> ServiceError:
        failed = child._failure(exc)
        assert isinstance(failed, Failed)
        return service_error(failed)

    error = crossed(NotFound("no model 'nope'", reason="model_not_found"))
    assert type(error) is NotFound and (error.message, error.reason) == ("no model 'nope'", "model_not_found")
    fallback = crossed(TwoArgError("style images", 16))  # does not unpickle: rebuilt from its code
    assert type(fallback) is InvalidArgument and fallback.reason == "two_arg"
    unexpected = child._failure(RuntimeError("boom"))
    assert unexpected.code is None and "RuntimeError: boom" in unexpected.traceback
    assert type(service_error(Failed(None, "NO_SUCH_CODE", "x", None, "T", ""))) is Internal
