"""The gradient processes kept alive (service/worker/supervisor.py and spawned.py), through the pool
that owns them: the Ready handshake and its summary, start failures, replacement with backoff, deaths
by reason, signals, health followers, and an interpreter exit without close. Real spawned processes
(pool_harness.started_pool)."""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pool_harness import LONG, eventually, gone, run, sample, started, started_pool

from service.errors import Unavailable
from service.worker.pool import GradientPool
from service.worker.spawned import exit_status
from service.worker.supervisor import ProcessStartError

try:  # tests/ as packages or as rootdir-relative modules: the processes import it the same way
    from . import pool_handlers as h  # type: ignore[import-not-found]
except ImportError:
    import pool_handlers as h  # type: ignore[import-not-found,no-redef]


def test_a_state_with_a_ready_summary_reports_it_to_the_parent() -> None:
    async def scenario() -> None:
        async with started_pool(workers=1) as pool:
            assert pool.ready_summary is None  # init_state has no summary
        async with started_pool(workers=2, initializer=h.init_summarized) as pool:
            summary = pool.ready_summary
            assert summary["refused"] == {"toy:2": "disagrees with its ONNX model"}
            assert summary["pid"] in pool.worker_pids

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
                await pool.submit(h.SleepJob(), cost=1.0, deadline=None)
            assert time.perf_counter() - t0 < 0.05
            assert "refusing to start while" in caplog.text  # the child's initializer error is logged

            marker.unlink()
            await eventually(lambda: pool.alive_workers == 2, 15.0, "replacements ready once fixed")
            assert not set(pids) & set(pool.worker_pids)
            assert (await pool.submit(h.ProgressJob(n=2), cost=1.0, deadline=None)) == 2
            assert sample("cnnserve_worker_restarts_total") >= restarts + 4  # >= 2 failed + 2 good
            assert sample("cnnserve_worker_deaths_total", reason="idle_crash") == crashes + 2
            assert sample("cnnserve_worker_deaths_total", reason="init_failed") >= init_deaths + 2

    with caplog.at_level(logging.ERROR, logger="service.worker.supervisor"):
        run(scenario)


def test_processes_ignore_sigint_and_sigterm() -> None:
    async def scenario() -> None:
        async with started_pool() as pool:
            pids = sorted(pool.worker_pids)
            job, pid = await started(pool, h.SleepJob(steps=50, step_s=0.01, announce=True))
            for p in pids:
                os.kill(p, signal.SIGINT)
                os.kill(p, signal.SIGTERM)
            result = await job
            assert (result.pid, result.steps_run) == (pid, 50)
            await asyncio.sleep(0.2)
            assert sorted(pool.worker_pids) == pids and pool.alive_workers == 2

    run(scenario)


def test_process_deaths_are_counted_by_reason_and_a_stuck_job_is_not_poison() -> None:
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
            stubborn = h.SleepJob(**LONG, ignore_stop=True, announce=True)
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


def test_server_exiting_without_close_does_not_hang_or_leave_processes(tmp_path: Path) -> None:
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
            from service.worker.pool import GradientPool

            async def main():
                pool = GradientPool(workers=2, initializer=h.init_state, handler=h.handle, cost_budget=10.0)
                await pool.start()
                print(*pool.worker_pids, flush=True)
                stubborn = h.SleepJob(steps=1000, ignore_stop=True)
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
        pool: GradientPool[Any, Any, Any] = GradientPool(
            workers=2, initializer=h.init_fail, handler=h.handle, cost_budget=10.0
        )
        t0 = time.monotonic()
        with pytest.raises(ProcessStartError) as failed:
            await pool.start()
        assert time.monotonic() - t0 < 10.0
        assert "failed to initialize" in str(failed.value)
        assert "FileNotFoundError: no weights at /models/missing/weights.pt" in str(failed.value)
        assert multiprocessing.active_children() == []
        with pytest.raises(Unavailable):
            await pool.submit(h.SleepJob(), cost=1.0, deadline=None)

        hung: GradientPool[Any, Any, Any] = GradientPool(
            workers=2, initializer=h.init_hang, handler=h.handle, cost_budget=10.0, start_timeout_s=1.0
        )
        t0 = time.monotonic()
        with pytest.raises(ProcessStartError, match=r"not ready within 1 s \(0/2 ready\)"):
            await hung.start()
        assert time.monotonic() - t0 < 5.0
        assert multiprocessing.active_children() == []

    run(scenario)


def test_health_followers_are_woken_the_moment_a_process_dies_or_becomes_ready() -> None:
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


def test_exit_status_names_signals_and_codes() -> None:
    assert exit_status(-signal.SIGKILL) == "killed by SIGKILL (the OOM killer, or killed by an operator)"
    assert exit_status(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert exit_status(3) == "exited: initializer failed"
    assert exit_status(17) == "exited with code 17"
    assert exit_status(None) == "exit status unknown"
