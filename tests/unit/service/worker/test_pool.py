"""WorkerPool: real spawned worker processes running the tiny handlers in pool_handlers.py.

Every test starts its own pool of 2 workers (a worker starts in well under a second: numpy and
service.errors only) and closes it, checking on the way what a client or an operator would notice:
statuses and messages, timings (crash detection, cancellation, admission), metrics, and that no
worker process is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.errors import (
    GENERIC_INTERNAL_MESSAGE,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from service.observability import metrics
from service.worker.pool import CRASHED_TWICE_MESSAGE, WorkerPool, WorkerStartError

try:  # tests/ as packages or as rootdir-relative modules: the workers import it the same way
    from . import pool_handlers as h  # type: ignore[import-not-found]
except ImportError:
    import pool_handlers as h  # type: ignore[import-not-found,no-redef]

LONG = dict(steps=1000, step_s=0.01)  # ~10 s unless stopped


def run(scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


def sample(name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def started_pool(**kwargs: Any) -> AsyncIterator[WorkerPool[Any, Any, Any]]:
    kwargs.setdefault("workers", 2)
    kwargs.setdefault("initializer", h.init_state)
    kwargs.setdefault("handler", h.handle)
    kwargs.setdefault("cost_budget", 100.0)
    pool: WorkerPool[Any, Any, Any] = WorkerPool(**kwargs)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close(grace_s=0)
    assert multiprocessing.active_children() == []


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until condition() holds; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def gone(pid: int) -> bool:
    """Exited *and reaped*: a zombie still has a /proc entry (state Z)."""
    return not os.path.exists(f"/proc/{pid}")


async def started(
    pool: WorkerPool[Any, Any, Any], task: h.SleepTask, **kwargs: Any
) -> tuple[asyncio.Task[Any], int]:
    """Submit an announcing SleepTask; return its asyncio task and the pid running it."""
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_progress(update: Any) -> None:
        if isinstance(update, h.Started) and not seen.done():
            seen.set_result(update.pid)

    job = asyncio.create_task(
        pool.submit(
            task, cost=kwargs.pop("cost", 1.0), deadline=kwargs.pop("deadline", None), on_progress=on_progress
        )
    )
    pid = await asyncio.wait_for(seen, 10)
    return job, pid


# --- results, progress, metrics -------------------------------------------------------------------


def test_runs_jobs_and_returns_numpy_results_and_metrics() -> None:
    async def scenario() -> None:
        before_cost = sample("cnnserve_task_queued_cost")
        waits = sample("cnnserve_task_queue_wait_seconds_count", task="echo")
        durations = sample("cnnserve_task_duration_seconds_count", task="echo", model="toy")
        steps = sample("cnnserve_task_steps_total", task="sleep", model="toy")
        rates = sample("cnnserve_task_steps_per_second_count", task="sleep", model="toy")
        async with started_pool() as pool:
            assert pool.alive_workers == 2
            assert len(set(pool.worker_pids)) == 2
            assert sample("cnnserve_task_cost_budget") == 100.0
            big = np.random.default_rng(0).random((512, 512, 3), dtype=np.float32)  # 3 MB each way
            result = await pool.submit(h.EchoTask(big), cost=1.0, deadline=None)
            assert result.doubled.dtype == np.float32
            np.testing.assert_array_equal(result.doubled, big * 2)
            assert result.pid in pool.worker_pids

            # Many small jobs: all answered, each with its own result, over both workers.
            results = await asyncio.gather(
                *(pool.submit(h.EchoTask(np.array([i])), cost=1.0, deadline=None) for i in range(20))
            )
            assert [int(r.doubled[0]) for r in results] == [2 * i for i in range(20)]

            sleep = await pool.submit(
                h.SleepTask(steps=7, step_s=0.001), cost=1.0, deadline=time.monotonic() + 10
            )
            assert sleep.steps_run == 7
            assert pool.admitted_cost == 0.0
        assert sample("cnnserve_task_queued_cost") == before_cost
        assert sample("cnnserve_task_queue_wait_seconds_count", task="echo") == waits + 21
        assert sample("cnnserve_task_duration_seconds_count", task="echo", model="toy") == durations + 21
        assert sample("cnnserve_task_steps_total", task="sleep", model="toy") == steps + 7
        assert sample("cnnserve_task_steps_per_second_count", task="sleep", model="toy") == rates + 1

    run(scenario)


def test_a_state_with_a_ready_summary_reports_it_to_the_parent() -> None:
    async def scenario() -> None:
        async with started_pool(workers=1) as pool:
            assert pool.ready_summary is None  # init_state has no summary
        async with started_pool(workers=2, initializer=h.init_summarized) as pool:
            summary = pool.ready_summary
            assert summary["refused"] == {"toy:2": "disagrees with its ONNX model"}
            assert summary["pid"] in pool.worker_pids

    run(scenario)


def test_progress_is_delivered_in_order_on_the_event_loop() -> None:
    async def scenario() -> None:
        loop_thread = threading.get_ident()
        seen: list[tuple[int, int, int]] = []

        def on_progress(update: h.StepUpdate) -> None:
            seen.append((update.step, int(update.payload[0]), threading.get_ident()))

        steps = sample("cnnserve_task_steps_total", task="progress", model="toy")
        async with started_pool() as pool:
            n = await pool.submit(h.ProgressTask(n=300), cost=1.0, deadline=None, on_progress=on_progress)
        assert n == 300
        assert [s for s, _, _ in seen] == list(range(1, 301))
        assert [p for _, p, _ in seen] == list(range(300))
        assert {t for _, _, t in seen} == {loop_thread}
        # A progress update's `step` counts as the job's step count.
        assert sample("cnnserve_task_steps_total", task="progress", model="toy") == steps + 300

    run(scenario)


# --- errors as values ---------------------------------------------------------------------------


def test_handler_errors_keep_their_status_and_unexpected_ones_are_internal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with started_pool() as pool:
            pids = sorted(pool.worker_pids)
            with pytest.raises(NotFound) as not_found:
                await pool.submit(h.FailTask("not_found"), cost=1.0, deadline=None)
            assert not_found.value.message == "no model 'nope' version 3"
            assert not_found.value.reason == "model_not_found"

            with pytest.raises(h.LayerNotFound) as custom:
                await pool.submit(h.FailTask("custom"), cost=1.0, deadline=None)
            assert custom.value.layer == "inception9z"
            assert custom.value.message == "model has no layer 'inception9z'"
            assert custom.value.reason == "unknown_layer"

            with pytest.raises(InvalidArgument) as fallback:
                await pool.submit(h.FailTask("unpicklable_custom"), cost=1.0, deadline=None)
            assert fallback.value.message == "style images exceeds 16"
            assert fallback.value.reason == "two_arg"

            with caplog.at_level(logging.ERROR, logger="service.worker.pool"):
                with pytest.raises(Internal) as internal:
                    await pool.submit(h.FailTask("unexpected"), cost=1.0, deadline=None)
            assert internal.value.message == GENERIC_INTERNAL_MESSAGE
            assert "secret" not in str(internal.value)
            logged = caplog.text
            assert "RuntimeError: secret internal detail: tensor 0x7f00 went away" in logged
            assert "pool_handlers.py" in logged and "in _fail" in logged  # the child's traceback

            # Errors are values: no worker died, and the pool still works.
            assert sorted(pool.worker_pids) == pids
            assert (await pool.submit(h.ProgressTask(n=1), cost=1.0, deadline=None)) == 1

    run(scenario)


# --- admission -----------------------------------------------------------------------------------


def test_cost_budget_burst_is_counted_exactly_and_refused_at_once() -> None:
    async def scenario() -> None:
        rejected = sample("cnnserve_rejections_total", method="sleep", model="toy", reason="cost_budget")
        async with started_pool(cost_budget=10.0) as pool:
            timings: list[tuple[str, float, BaseException | None]] = []

            async def one(i: int) -> None:
                t0 = time.perf_counter()
                try:
                    await pool.submit(h.SleepTask(steps=30, step_s=0.01, tag=i), cost=2.5, deadline=None)
                except ResourceExhausted as exc:
                    timings.append(("rejected", time.perf_counter() - t0, exc))
                else:
                    timings.append(("ok", time.perf_counter() - t0, None))

            fits, extra = 4, 3  # 4 x 2.5 == the budget exactly
            tasks = [asyncio.create_task(one(i)) for i in range(fits + extra)]
            await asyncio.sleep(0.05)
            assert pool.admitted_cost == 10.0
            assert sample("cnnserve_task_queued_cost") >= 10.0
            await asyncio.gather(*tasks)
            rejections = [t for t in timings if t[0] == "rejected"]
            assert len(rejections) == extra
            assert sum(1 for t in timings if t[0] == "ok") == fits
            for _, seconds, exc in rejections:
                assert seconds < 0.05
                assert isinstance(exc, ResourceExhausted)
                assert exc.reason == "cost_budget"
                assert "estimated wait unknown" in exc.message  # nothing finished yet when they came
                assert exc.retry_after_s is None  # type: ignore[attr-defined]
            assert pool.admitted_cost == 0.0

            # With throughput measured, the refusal says how long to wait.
            hold = [
                asyncio.create_task(pool.submit(h.SleepTask(steps=30, step_s=0.01), cost=5.0, deadline=None))
                for _ in range(2)
            ]
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            with pytest.raises(ResourceExhausted) as late:
                await pool.submit(h.SleepTask(), cost=1.0, deadline=None)
            assert time.perf_counter() - t0 < 0.05
            assert "estimated wait about" in late.value.message
            retry_after = late.value.retry_after_s  # type: ignore[attr-defined]
            assert isinstance(retry_after, float) and 0 < retry_after < 60
            await asyncio.gather(*hold)

            # One job alone over the budget can never run: INVALID_ARGUMENT naming the cap.
            with pytest.raises(InvalidArgument) as too_big:
                await pool.submit(h.SleepTask(), cost=10.5, deadline=None)
            assert "max_task_cost" in too_big.value.message and "10" in too_big.value.message
            with pytest.raises(ValueError):
                await pool.submit(h.SleepTask(), cost=float("nan"), deadline=None)
        # The servicer counts each refused call (under its RPC method); the pool must not count again.
        counted = sample("cnnserve_rejections_total", method="sleep", model="toy", reason="cost_budget")
        assert counted == rejected

    run(scenario)


# --- cancellation and deadlines ------------------------------------------------------------------


def test_cancelled_job_frees_its_worker_within_two_seconds() -> None:
    async def scenario() -> None:
        cancellations = sample("cnnserve_task_cancellations_total", task="sleep")
        async with started_pool() as pool:
            a, pid_a = await started(pool, h.SleepTask(**LONG, announce=True, tag=1))
            b, pid_b = await started(pool, h.SleepTask(**LONG, announce=True, tag=2))
            assert pid_a != pid_b
            a.cancel()
            t0 = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await a
            # Both workers were busy, so this job can only run on the worker `a` freed.
            result = await pool.submit(h.EchoTask(np.zeros(1)), cost=1.0, deadline=None)
            assert result.pid == pid_a
            assert time.monotonic() - t0 < 2.0
            assert sample("cnnserve_task_cancellations_total", task="sleep") == cancellations + 1
            assert not b.done()
            b.cancel()
            with pytest.raises(asyncio.CancelledError):
                await b
            await eventually(lambda: pool.admitted_cost == 0.0, 2.0, "b's worker freed")

            # Cancelling a job that is still queued drops it without ever running it.
            c, _ = await started(pool, h.SleepTask(**LONG, announce=True))
            d, _ = await started(pool, h.SleepTask(**LONG, announce=True))
            queued = asyncio.create_task(pool.submit(h.SleepTask(), cost=7.0, deadline=None))
            await eventually(lambda: pool.admitted_cost == 9.0, 1.0, "queued job admitted")
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            assert pool.admitted_cost == 2.0
            for job in (c, d):
                job.cancel()
            await asyncio.gather(c, d, return_exceptions=True)

    run(scenario)


def test_deadline_stops_a_running_job_and_expires_a_queued_one() -> None:
    async def scenario() -> None:
        cancellations = sample("cnnserve_task_cancellations_total", task="sleep")
        async with started_pool() as pool:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await pool.submit(h.SleepTask(**LONG), cost=1.0, deadline=t0 + 0.5)
            assert 0.45 <= time.monotonic() - t0 < 1.5
            # The worker noticed within a step and is free again.
            await eventually(lambda: pool.admitted_cost == 0.0, 1.0, "worker freed after the deadline")

            # Both workers busy: a queued job's deadline passes before it ever runs.
            a, _ = await started(pool, h.SleepTask(**LONG, announce=True))
            b, _ = await started(pool, h.SleepTask(**LONG, announce=True))
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded) as queued:
                await pool.submit(h.SleepTask(), cost=1.0, deadline=t0 + 0.3)
            assert 0.25 <= time.monotonic() - t0 < 1.0
            assert "waited for a worker" in queued.value.message
            with pytest.raises(DeadlineExceeded):
                await pool.submit(h.SleepTask(), cost=1.0, deadline=time.monotonic() - 1)
            assert sample("cnnserve_task_cancellations_total", task="sleep") == cancellations + 2
            for job in (a, b):
                job.cancel()
            await asyncio.gather(a, b, return_exceptions=True)

    run(scenario)


def test_job_ignoring_should_stop_gets_its_worker_replaced(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        restarts = sample("cnnserve_worker_restarts_total")
        async with started_pool(stop_grace_s=0.5) as pool:
            stubborn = h.SleepTask(**LONG, ignore_stop=True, announce=True)
            job, pid = await started(pool, stubborn, deadline=time.monotonic() + 0.3)
            with pytest.raises(DeadlineExceeded):
                await job
            await eventually(lambda: gone(pid), 3.0, "the stubborn worker killed and reaped")
            await eventually(lambda: pool.alive_workers == 2, 5.0, "replacement ready")
            assert pid not in pool.worker_pids
            assert pool.admitted_cost == 0.0
            assert sample("cnnserve_worker_restarts_total") == restarts + 1
            assert "ignored should_stop()" in caplog.text
            # Killed by the pool, not crashed by its input: the same task is not treated as poison.
            with pytest.raises(DeadlineExceeded):
                await pool.submit(stubborn, cost=1.0, deadline=time.monotonic() + 0.2)

    with caplog.at_level(logging.WARNING, logger="service.worker.pool"):
        run(scenario)


# --- fault tolerance -----------------------------------------------------------------------------


def test_sigkilled_worker_fails_only_its_own_job_and_is_replaced() -> None:
    async def scenario() -> None:
        restarts = sample("cnnserve_worker_restarts_total")
        alive_gauge = sample("cnnserve_workers_alive")
        async with started_pool() as pool:
            assert sample("cnnserve_workers_alive") == alive_gauge + 2
            victim, victim_pid = await started(pool, h.SleepTask(**LONG, announce=True, tag=1))
            other, other_pid = await started(pool, h.SleepTask(steps=150, step_s=0.01, announce=True, tag=2))
            os.kill(victim_pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(Unavailable) as crashed:
                await victim
            assert time.monotonic() - t0 < 3.0
            assert "crashed" in crashed.value.message and "SIGKILL" in crashed.value.message

            result = await other  # the healthy worker's job is untouched
            assert (result.pid, result.steps_run, result.tag) == (other_pid, 150, 2)

            await eventually(lambda: pool.alive_workers == 2, 10.0, "replacement worker ready")
            assert sample("cnnserve_worker_restarts_total") == restarts + 1
            assert sample("cnnserve_workers_alive") == alive_gauge + 2
            assert victim_pid not in pool.worker_pids and other_pid in pool.worker_pids
            assert gone(victim_pid)
            replacement = (set(pool.worker_pids) - {other_pid}).pop()
            # The replacement ran the initializer and takes jobs.
            busy, _ = await started(pool, h.SleepTask(**LONG, announce=True))
            echo = await pool.submit(h.EchoTask(np.ones(2)), cost=1.0, deadline=None)
            assert echo.pid in (replacement, other_pid) and echo.worker_initialized_at > 0
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)
        assert sample("cnnserve_workers_alive") == alive_gauge

    run(scenario)


def test_input_that_crashes_workers_twice_is_internal_and_not_retried() -> None:
    async def scenario() -> None:
        restarts = sample("cnnserve_worker_restarts_total")
        async with started_pool() as pool:
            poison = h.CrashTask("exit", nonce=1)
            t0 = time.monotonic()
            with pytest.raises(Unavailable) as first:
                await pool.submit(poison, cost=1.0, deadline=None)
            assert time.monotonic() - t0 < 3.0
            assert "exited with code 17" in first.value.message
            await eventually(lambda: pool.alive_workers == 2, 10.0, "replacement after os._exit")

            with pytest.raises(Unavailable) as segv:
                await pool.submit(h.CrashTask("segfault"), cost=1.0, deadline=None)
            assert "SIGSEGV" in segv.value.message
            await eventually(lambda: pool.alive_workers == 2, 10.0, "replacement after a segfault")

            # An equal task (same content, a new object) is the same input.
            with pytest.raises(Internal) as second:
                await pool.submit(h.CrashTask("exit", nonce=1), cost=1.0, deadline=None)
            assert second.value.message == CRASHED_TWICE_MESSAGE
            await eventually(lambda: pool.alive_workers == 2, 10.0, "replacement after the second crash")
            assert sample("cnnserve_worker_restarts_total") == restarts + 3

            # From now on it is refused at once, without killing another worker.
            pids = sorted(pool.worker_pids)
            t0 = time.perf_counter()
            with pytest.raises(Internal, match="crashed a gradient worker twice"):
                await pool.submit(poison, cost=1.0, deadline=None)
            assert time.perf_counter() - t0 < 0.05
            await asyncio.sleep(0.2)
            assert sorted(pool.worker_pids) == pids
            assert sample("cnnserve_worker_restarts_total") == restarts + 3
            assert pool.admitted_cost == 0.0

    run(scenario)


def test_failing_replacements_back_off_and_the_pool_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        marker = tmp_path / "broken"
        restarts = sample("cnnserve_worker_restarts_total")
        init_deaths = sample("cnnserve_worker_deaths_total", reason="init_failed")
        crashes = sample("cnnserve_worker_deaths_total", reason="idle_crash")
        initializer = functools.partial(h.init_unless, str(marker))
        async with started_pool(initializer=initializer) as pool:
            pids = pool.worker_pids
            marker.touch()  # from now on a fresh worker fails its initializer
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            await eventually(lambda: pool.alive_workers == 0, 3.0, "both deaths noticed")
            await eventually(
                lambda: caplog.text.count("died before it was ready") >= 2, 10.0, "both replacements failed"
            )
            # Health would say NOT_SERVING; a call is refused at once instead of waiting for its deadline.
            t0 = time.perf_counter()
            with pytest.raises(Unavailable, match="no gradient worker is ready"):
                await pool.submit(h.SleepTask(), cost=1.0, deadline=None)
            assert time.perf_counter() - t0 < 0.05
            assert "refusing to start while" in caplog.text  # the child's initializer error is logged

            marker.unlink()
            await eventually(lambda: pool.alive_workers == 2, 15.0, "replacements ready once fixed")
            assert not set(pids) & set(pool.worker_pids)
            assert (await pool.submit(h.ProgressTask(n=2), cost=1.0, deadline=None)) == 2
            assert sample("cnnserve_worker_restarts_total") >= restarts + 4  # >= 2 failed + 2 good
            assert sample("cnnserve_worker_deaths_total", reason="idle_crash") == crashes + 2
            assert sample("cnnserve_worker_deaths_total", reason="init_failed") >= init_deaths + 2

    with caplog.at_level(logging.ERROR, logger="service.worker.pool"):
        run(scenario)


def test_workers_ignore_sigint_and_sigterm() -> None:
    async def scenario() -> None:
        async with started_pool() as pool:
            pids = sorted(pool.worker_pids)
            job, pid = await started(pool, h.SleepTask(steps=50, step_s=0.01, announce=True))
            for p in pids:
                os.kill(p, signal.SIGINT)
                os.kill(p, signal.SIGTERM)
            result = await job
            assert (result.pid, result.steps_run) == (pid, 50)
            await asyncio.sleep(0.2)
            assert sorted(pool.worker_pids) == pids and pool.alive_workers == 2

    run(scenario)


def test_crash_spares_the_other_running_job_and_every_queued_one() -> None:
    async def scenario() -> None:
        restarts = sample("cnnserve_worker_restarts_total")
        deaths = sample("cnnserve_worker_deaths_total", reason="job_crash")
        async with started_pool() as pool:
            victim, victim_pid = await started(pool, h.SleepTask(**LONG, announce=True, tag=1))
            other, _ = await started(pool, h.SleepTask(steps=100, step_s=0.01, announce=True, tag=2))
            queued = [
                asyncio.create_task(
                    pool.submit(h.SleepTask(steps=5, step_s=0.01, tag=10 + i), cost=1.0, deadline=None)
                )
                for i in range(4)
            ]
            await eventually(lambda: pool.admitted_cost == 6.0, 2.0, "four jobs queued behind two running")
            os.kill(victim_pid, signal.SIGKILL)
            with pytest.raises(Unavailable, match="crashed"):
                await victim
            # The queued jobs never reached the dead worker: they run on the survivor or the replacement.
            results = await asyncio.gather(other, *queued)
            assert [(r.tag, r.steps_run) for r in results] == [(2, 100), *((10 + i, 5) for i in range(4))]
            await eventually(lambda: pool.alive_workers == 2, 10.0, "replacement ready")
            assert pool.admitted_cost == 0.0
        assert sample("cnnserve_worker_restarts_total") == restarts + 1
        assert sample("cnnserve_worker_deaths_total", reason="job_crash") == deaths + 1

    run(scenario)


def test_worker_deaths_are_counted_by_reason_and_a_stuck_job_is_not_poison() -> None:
    async def scenario() -> None:
        before = {
            reason: sample("cnnserve_worker_deaths_total", reason=reason)
            for reason in ("job_crash", "idle_crash", "stop_overdue")
        }
        restarts = sample("cnnserve_worker_restarts_total")
        async with started_pool(stop_grace_s=0.5) as pool:
            idle_pid = pool.worker_pids[0]
            os.kill(idle_pid, signal.SIGKILL)
            await eventually(
                lambda: idle_pid not in pool.worker_pids and pool.alive_workers == 2,
                10.0,
                "idle worker replaced",
            )
            assert gone(idle_pid)

            # A handler stuck in a step (never checks should_stop) whose caller cancels: the pool
            # kills its worker after stop_grace_s and starts another.
            stubborn = h.SleepTask(**LONG, ignore_stop=True, announce=True)
            job, pid = await started(pool, stubborn)
            job.cancel()
            t0 = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await job
            await eventually(lambda: gone(pid), 5.0, "the stuck worker killed and reaped")
            assert time.monotonic() - t0 >= 0.45  # it had its grace period first
            await eventually(lambda: pool.alive_workers == 2, 10.0, "replacement for the stuck worker")
            assert pool.admitted_cost == 0.0
            # Killed by the pool, not crashed by its input: the same task is admitted again.
            again, again_pid = await started(pool, stubborn)
            again.cancel()
            await asyncio.gather(again, return_exceptions=True)
            await eventually(lambda: gone(again_pid), 5.0, "the second stuck worker killed")
            await eventually(lambda: pool.alive_workers == 2, 10.0, "second replacement")
        after = {reason: sample("cnnserve_worker_deaths_total", reason=reason) for reason in before}
        assert after == {
            "job_crash": before["job_crash"],
            "idle_crash": before["idle_crash"] + 1,
            "stop_overdue": before["stop_overdue"] + 2,
        }
        assert sample("cnnserve_worker_restarts_total") == restarts + 3

    run(scenario)


def test_a_task_that_later_runs_to_the_end_loses_its_strike(tmp_path: Path) -> None:
    """One crash is a strike, not a verdict: the OOM killer or an operator may have killed the
    worker. A success clears it; only two crashes with no success between make the input poison."""

    async def scenario() -> None:
        marker = tmp_path / "crash-next-time"
        task = h.CrashIfMarkedTask(str(marker))
        async with started_pool() as pool:
            marker.touch()
            with pytest.raises(Unavailable):
                await pool.submit(task, cost=1.0, deadline=None)
            assert await pool.submit(task, cost=1.0, deadline=None) == "ok"
            marker.touch()
            with pytest.raises(Unavailable):  # a first strike again, not the second
                await pool.submit(task, cost=1.0, deadline=None)
            await eventually(lambda: pool.alive_workers == 2, 10.0, "replacement ready")
            marker.touch()
            with pytest.raises(Internal) as poison:
                await pool.submit(task, cost=1.0, deadline=None)
            assert poison.value.message == CRASHED_TWICE_MESSAGE
            marker.unlink(missing_ok=True)
            with pytest.raises(Internal):  # refused from now on, though it would succeed
                await pool.submit(task, cost=1.0, deadline=None)

    run(scenario)


# --- lifecycle ------------------------------------------------------------------------------------


def test_close_drains_running_jobs_then_stops_everything_without_zombies() -> None:
    async def scenario() -> None:
        alive_gauge = sample("cnnserve_workers_alive")
        pool: WorkerPool[Any, Any, Any] = WorkerPool(
            workers=2, initializer=h.init_state, handler=h.handle, cost_budget=100.0
        )
        with pytest.raises(Unavailable, match="not started"):
            await pool.submit(h.SleepTask(), cost=1.0, deadline=None)
        await pool.start()
        pids = list(pool.worker_pids)
        short, _ = await started(pool, h.SleepTask(steps=40, step_s=0.01, announce=True))
        long, _ = await started(pool, h.SleepTask(**LONG, announce=True))
        queued = asyncio.create_task(pool.submit(h.SleepTask(), cost=1.0, deadline=None))
        await asyncio.sleep(0.02)

        t0 = time.monotonic()
        closing = asyncio.create_task(pool.close(grace_s=1.0))
        await asyncio.sleep(0.02)
        with pytest.raises(Unavailable, match="shutting down"):
            await pool.submit(h.SleepTask(), cost=1.0, deadline=None)
        with pytest.raises(Unavailable, match="before this job started"):
            await queued
        assert (await short).steps_run == 40  # finished within the grace period
        with pytest.raises(Unavailable, match="before this job finished"):
            await long
        await closing
        assert 0.9 <= time.monotonic() - t0 < 5.0
        await pool.close(grace_s=1.0)  # idempotent

        assert pool.alive_workers == 0
        assert multiprocessing.active_children() == []
        assert all(gone(pid) for pid in pids)
        assert pool.admitted_cost == 0.0
        assert sample("cnnserve_workers_alive") == alive_gauge

    run(scenario)


def test_server_exiting_without_close_does_not_hang_or_leave_workers(tmp_path: Path) -> None:
    """multiprocessing's exit hook SIGTERMs and joins daemonic children, but workers ignore SIGTERM:
    the pool's own exit hook must kill them, or a server that crashed out would hang forever."""
    here = Path(__file__).resolve().parent
    script = tmp_path / "server.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, sys
            sys.path[:0] = [{str(here.parents[3])!r}, {str(here)!r}]
            import pool_handlers as h
            from service.worker.pool import WorkerPool

            async def main():
                pool = WorkerPool(workers=2, initializer=h.init_state, handler=h.handle, cost_budget=10.0)
                await pool.start()
                print(*pool.worker_pids, flush=True)
                stubborn = h.SleepTask(steps=1000, ignore_stop=True)
                asyncio.get_running_loop().create_task(pool.submit(stubborn, cost=1.0, deadline=None))
                await asyncio.sleep(0.2)  # returns with a job running and without close()

            if __name__ == "__main__":
                asyncio.run(main())
            """
        )
    )
    t0 = time.monotonic()
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True) as server:
        try:
            out, _ = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()  # the workers then see EOF and exit by themselves
            server.communicate()
            raise AssertionError("the server hung at exit") from None
    assert server.returncode == 0
    assert time.monotonic() - t0 < 15
    pids = [int(p) for p in out.split()]
    assert len(pids) == 2
    assert all(gone(pid) for pid in pids)


def test_initializer_failure_is_a_clear_start_error() -> None:
    async def scenario() -> None:
        pool: WorkerPool[Any, Any, Any] = WorkerPool(
            workers=2, initializer=h.init_fail, handler=h.handle, cost_budget=10.0
        )
        t0 = time.monotonic()
        with pytest.raises(WorkerStartError) as failed:
            await pool.start()
        assert time.monotonic() - t0 < 10.0
        assert "failed to initialize" in str(failed.value)
        assert "FileNotFoundError: no weights at /models/missing/weights.pt" in str(failed.value)
        assert multiprocessing.active_children() == []
        with pytest.raises(Unavailable):
            await pool.submit(h.SleepTask(), cost=1.0, deadline=None)

        hung: WorkerPool[Any, Any, Any] = WorkerPool(
            workers=2, initializer=h.init_hang, handler=h.handle, cost_budget=10.0, start_timeout_s=1.0
        )
        t0 = time.monotonic()
        with pytest.raises(WorkerStartError, match=r"not ready within 1 s \(0/2 ready\)"):
            await hung.start()
        assert time.monotonic() - t0 < 5.0
        assert multiprocessing.active_children() == []

    run(scenario)


def test_constructor_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="workers"):
        WorkerPool(workers=0, initializer=h.init_state, handler=h.handle, cost_budget=1.0)
    with pytest.raises(ValueError, match="cost_budget"):
        WorkerPool(workers=1, initializer=h.init_state, handler=h.handle, cost_budget=0.0)


def test_health_followers_are_woken_the_moment_a_worker_dies_or_becomes_ready() -> None:
    """alive_generation/wait_alive_change: the server's gradients health must never say SERVING
    while no worker is alive, so it waits on the pool instead of polling."""

    async def scenario() -> None:
        async with started_pool(workers=1) as pool:
            seen = pool.alive_generation
            assert pool.alive_workers == 1
            started = time.monotonic()
            waiter = asyncio.create_task(pool.wait_alive_change(seen, 30.0))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            os.kill(pool.worker_pids[0], signal.SIGKILL)
            await asyncio.wait_for(waiter, 10.0)
            assert pool.alive_workers == 0 and pool.alive_generation != seen
            assert time.monotonic() - started < 10.0
            # already changed: returns at once
            await asyncio.wait_for(pool.wait_alive_change(seen, 30.0), 0.5)
            seen = pool.alive_generation
            await asyncio.wait_for(pool.wait_alive_change(seen, 30.0), 30.0)  # the replacement
            assert pool.alive_workers == 1

    run(scenario)
