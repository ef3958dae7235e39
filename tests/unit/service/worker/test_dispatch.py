"""The gradient pool's jobs from admission to answer (service/worker/dispatch.py): cancellation,
deadlines, a handler that ignores should_stop(), and what a crash does to the jobs around it.
Real spawned processes (pool_harness.started_pool)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import numpy as np
import pytest
from pool_harness import LONG, eventually, gone, run, sample, started, started_pool

from service.errors import DeadlineExceeded, Unavailable

try:  # tests/ as packages or as rootdir-relative modules: the processes import it the same way
    from . import pool_handlers as h  # type: ignore[import-not-found]
except ImportError:
    import pool_handlers as h  # type: ignore[import-not-found,no-redef]


def test_cancelled_job_frees_its_process_within_two_seconds() -> None:
    async def scenario() -> None:
        cancellations = sample("cnnserve_task_cancellations_total", task="sleep")
        async with started_pool() as pool:
            a, pid_a = await started(pool, h.SleepJob(**LONG, announce=True, tag=1))
            b, pid_b = await started(pool, h.SleepJob(**LONG, announce=True, tag=2))
            assert pid_a != pid_b
            a.cancel()
            t0 = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await a
            # Both workers were busy, so this job can only run on the worker `a` freed.
            result = await pool.submit(h.EchoJob(np.zeros(1)), cost=1.0, deadline=None)
            assert result.pid == pid_a
            assert time.monotonic() - t0 < 2.0
            assert sample("cnnserve_task_cancellations_total", task="sleep") == cancellations + 1
            assert not b.done()
            b.cancel()
            with pytest.raises(asyncio.CancelledError):
                await b
            await eventually(lambda: pool.admitted_cost == 0.0, 2.0, "b's worker freed")

            # Cancelling a job that is still queued drops it without ever running it.
            c, _ = await started(pool, h.SleepJob(**LONG, announce=True))
            d, _ = await started(pool, h.SleepJob(**LONG, announce=True))
            queued = asyncio.create_task(pool.submit(h.SleepJob(), cost=7.0, deadline=None))
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
                await pool.submit(h.SleepJob(**LONG), cost=1.0, deadline=t0 + 0.5)
            assert 0.45 <= time.monotonic() - t0 < 1.5
            # The worker noticed within a step and is free again.
            await eventually(lambda: pool.admitted_cost == 0.0, 1.0, "worker freed after the deadline")

            # Both workers busy: a queued job's deadline passes before it ever runs.
            a, _ = await started(pool, h.SleepJob(**LONG, announce=True))
            b, _ = await started(pool, h.SleepJob(**LONG, announce=True))
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded) as queued:
                await pool.submit(h.SleepJob(), cost=1.0, deadline=t0 + 0.3)
            assert 0.25 <= time.monotonic() - t0 < 1.0
            assert "waited for a worker" in queued.value.message
            with pytest.raises(DeadlineExceeded):
                await pool.submit(h.SleepJob(), cost=1.0, deadline=time.monotonic() - 1)
            assert sample("cnnserve_task_cancellations_total", task="sleep") == cancellations + 2
            for job in (a, b):
                job.cancel()
            await asyncio.gather(a, b, return_exceptions=True)

    run(scenario)


def test_job_ignoring_should_stop_gets_its_process_replaced(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        restarts = sample("cnnserve_worker_restarts_total")
        async with started_pool(stop_grace_s=0.5) as pool:
            stubborn = h.SleepJob(**LONG, ignore_stop=True, announce=True)
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

    with caplog.at_level(logging.WARNING, logger="service.worker.dispatch"):
        run(scenario)


def test_sigkilled_process_fails_only_its_own_job_and_is_replaced() -> None:
    async def scenario() -> None:
        restarts = sample("cnnserve_worker_restarts_total")
        alive_gauge = sample("cnnserve_workers_alive")
        async with started_pool() as pool:
            assert sample("cnnserve_workers_alive") == alive_gauge + 2
            victim, victim_pid = await started(pool, h.SleepJob(**LONG, announce=True, tag=1))
            other, other_pid = await started(pool, h.SleepJob(steps=150, step_s=0.01, announce=True, tag=2))
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
            busy, _ = await started(pool, h.SleepJob(**LONG, announce=True))
            echo = await pool.submit(h.EchoJob(np.ones(2)), cost=1.0, deadline=None)
            assert echo.pid in (replacement, other_pid) and echo.worker_initialized_at > 0
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)
        assert sample("cnnserve_workers_alive") == alive_gauge

    run(scenario)


def test_crash_spares_the_other_running_job_and_every_queued_one() -> None:
    async def scenario() -> None:
        restarts = sample("cnnserve_worker_restarts_total")
        deaths = sample("cnnserve_worker_deaths_total", reason="job_crash")
        async with started_pool() as pool:
            victim, victim_pid = await started(pool, h.SleepJob(**LONG, announce=True, tag=1))
            other, _ = await started(pool, h.SleepJob(steps=100, step_s=0.01, announce=True, tag=2))
            queued = [
                asyncio.create_task(
                    pool.submit(h.SleepJob(steps=5, step_s=0.01, tag=10 + i), cost=1.0, deadline=None)
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


def test_reports_reach_on_report_in_order_and_a_dead_process_voids_them() -> None:
    """ctx.report() payloads reach the pool's on_report with the process's slot, before the job's
    answer; when that process dies, on_report hears None for its slot (what it reported is void)."""
    reports: list[tuple[int, object]] = []

    async def scenario() -> None:
        async with started_pool(workers=1, on_report=lambda slot, p: reports.append((slot, p))) as pool:
            pid = await pool.submit(h.ReportJob(notes=("a", "b")), cost=1.0, deadline=None)
            assert reports == [(0, "a"), (0, "b")]
            os.kill(pid, signal.SIGKILL)
            await eventually(lambda: (0, None) in reports, 10.0, "on_report(0, None) after the death")
            assert reports == [(0, "a"), (0, "b"), (0, None)]

    run(scenario)
