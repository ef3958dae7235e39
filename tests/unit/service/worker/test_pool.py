"""GradientPool, its public API: real spawned processes running the tiny handlers in pool_handlers.py.

Every test starts its own pool of 2 processes (pool_harness.started_pool) and closes it, checking on
the way what a client or an operator would notice: statuses and messages, timings, metrics, and that
no process is left behind. The pool's other modules have their own tests: test_dispatch.py (jobs:
cancellation, deadlines, crashes), test_admission.py (cost budget, poison inputs), test_supervisor.py
(the processes: start, replacement, signals, exit).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from typing import Any

import numpy as np
import pytest
from pool_harness import LONG, gone, run, sample, started, started_pool

from service.errors import GENERIC_INTERNAL_MESSAGE, Internal, InvalidArgument, NotFound, Unavailable
from service.worker.pool import GradientPool

try:  # tests/ as packages or as rootdir-relative modules: the processes import it the same way
    from . import pool_handlers as h  # type: ignore[import-not-found]
except ImportError:
    import pool_handlers as h  # type: ignore[import-not-found,no-redef]


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
            result = await pool.submit(h.EchoJob(big), cost=1.0, deadline=None)
            assert result.doubled.dtype == np.float32
            np.testing.assert_array_equal(result.doubled, big * 2)
            assert result.pid in pool.worker_pids

            # Many small jobs: all answered, each with its own result, over both workers.
            results = await asyncio.gather(
                *(pool.submit(h.EchoJob(np.array([i])), cost=1.0, deadline=None) for i in range(20))
            )
            assert [int(r.doubled[0]) for r in results] == [2 * i for i in range(20)]

            sleep = await pool.submit(
                h.SleepJob(steps=7, step_s=0.001), cost=1.0, deadline=time.monotonic() + 10
            )
            assert sleep.steps_run == 7
            assert pool.admitted_cost == 0.0
        assert sample("cnnserve_task_queued_cost") == before_cost
        assert sample("cnnserve_task_queue_wait_seconds_count", task="echo") == waits + 21
        assert sample("cnnserve_task_duration_seconds_count", task="echo", model="toy") == durations + 21
        assert sample("cnnserve_task_steps_total", task="sleep", model="toy") == steps + 7
        assert sample("cnnserve_task_steps_per_second_count", task="sleep", model="toy") == rates + 1

    run(scenario)


def test_progress_is_delivered_in_order_on_the_event_loop() -> None:
    async def scenario() -> None:
        loop_thread = threading.get_ident()
        seen: list[tuple[int, int, int]] = []

        def on_progress(update: h.StepUpdate) -> None:
            seen.append((update.step, int(update.payload[0]), threading.get_ident()))

        steps = sample("cnnserve_task_steps_total", task="progress", model="toy")
        async with started_pool() as pool:
            n = await pool.submit(h.ProgressJob(n=300), cost=1.0, deadline=None, on_progress=on_progress)
        assert n == 300
        assert [s for s, _, _ in seen] == list(range(1, 301))
        assert [p for _, p, _ in seen] == list(range(300))
        assert {t for _, _, t in seen} == {loop_thread}
        # A progress update's `step` counts as the job's step count.
        assert sample("cnnserve_task_steps_total", task="progress", model="toy") == steps + 300

    run(scenario)


def test_handler_errors_keep_their_status_and_unexpected_ones_are_internal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with started_pool() as pool:
            pids = sorted(pool.worker_pids)
            with pytest.raises(NotFound) as not_found:
                await pool.submit(h.FailJob("not_found"), cost=1.0, deadline=None)
            assert not_found.value.message == "no model 'nope' version 3"
            assert not_found.value.reason == "model_not_found"

            with pytest.raises(h.LayerNotFound) as custom:
                await pool.submit(h.FailJob("custom"), cost=1.0, deadline=None)
            assert custom.value.layer == "inception9z"
            assert custom.value.message == "model has no layer 'inception9z'"
            assert custom.value.reason == "unknown_layer"

            with pytest.raises(InvalidArgument) as fallback:
                await pool.submit(h.FailJob("unpicklable_custom"), cost=1.0, deadline=None)
            assert fallback.value.message == "style images exceeds 16"
            assert fallback.value.reason == "two_arg"

            with caplog.at_level(logging.ERROR, logger="service.worker.dispatch"):
                with pytest.raises(Internal) as internal:
                    await pool.submit(h.FailJob("unexpected"), cost=1.0, deadline=None)
            assert internal.value.message == GENERIC_INTERNAL_MESSAGE
            assert "secret" not in str(internal.value)
            logged = caplog.text
            assert "RuntimeError: secret internal detail: tensor 0x7f00 went away" in logged
            assert "pool_handlers.py" in logged and "in _fail" in logged  # the child's traceback

            # Errors are values: no worker died, and the pool still works.
            assert sorted(pool.worker_pids) == pids
            assert (await pool.submit(h.ProgressJob(n=1), cost=1.0, deadline=None)) == 1

    run(scenario)


def test_close_drains_running_jobs_then_stops_everything_without_zombies() -> None:
    async def scenario() -> None:
        alive_gauge = sample("cnnserve_workers_alive")
        pool: GradientPool[Any, Any, Any] = GradientPool(
            workers=2, initializer=h.init_state, handler=h.handle, cost_budget=100.0
        )
        with pytest.raises(Unavailable, match="not started"):
            await pool.submit(h.SleepJob(), cost=1.0, deadline=None)
        starting = asyncio.create_task(pool.start())
        await asyncio.sleep(0)  # start() has begun: its processes are spawning
        # what a client calling a server that serves classification already is told meanwhile
        with pytest.raises(Unavailable, match="is still starting .*; retry shortly"):
            await pool.submit(h.SleepJob(), cost=1.0, deadline=None)
        await starting
        pids = list(pool.worker_pids)
        short, _ = await started(pool, h.SleepJob(steps=40, step_s=0.01, announce=True))
        long, _ = await started(pool, h.SleepJob(**LONG, announce=True))
        queued = asyncio.create_task(pool.submit(h.SleepJob(), cost=1.0, deadline=None))
        await asyncio.sleep(0.02)

        t0 = time.monotonic()
        closing = asyncio.create_task(pool.close(grace_s=1.0))
        await asyncio.sleep(0.02)
        with pytest.raises(Unavailable, match="shutting down"):
            await pool.submit(h.SleepJob(), cost=1.0, deadline=None)
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


def test_constructor_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="workers"):
        GradientPool(workers=0, initializer=h.init_state, handler=h.handle, cost_budget=1.0)
    with pytest.raises(ValueError, match="cost_budget"):
        GradientPool(workers=1, initializer=h.init_state, handler=h.handle, cost_budget=0.0)
