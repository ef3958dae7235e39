"""What the gradient pool lets in (service/worker/admission.py): the cost budget, exact under a burst
and refused at once with a wait estimate, and the ledger of inputs that crashed a process. The
CostBudget and CrashLedger tests need no process; the others run a real pool (pool_harness)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pool_harness import eventually, run, sample, started_pool

from service.errors import Internal, InvalidArgument, ResourceExhausted, Unavailable
from service.worker.admission import CRASHED_TWICE_MESSAGE, CostBudget, CrashLedger

try:  # tests/ as packages or as rootdir-relative modules: the processes import it the same way
    from . import pool_handlers as h  # type: ignore[import-not-found]
except ImportError:
    import pool_handlers as h  # type: ignore[import-not-found,no-redef]


def test_cost_budget_burst_is_counted_exactly_and_refused_at_once() -> None:
    async def scenario() -> None:
        rejected = sample("cnnserve_rejections_total", method="sleep", model="toy", reason="cost_budget")
        async with started_pool(cost_budget=10.0) as pool:
            timings: list[tuple[str, float, BaseException | None]] = []

            async def one(i: int) -> None:
                t0 = time.perf_counter()
                try:
                    await pool.submit(h.SleepJob(steps=30, step_s=0.01, tag=i), cost=2.5, deadline=None)
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
                asyncio.create_task(pool.submit(h.SleepJob(steps=30, step_s=0.01), cost=5.0, deadline=None))
                for _ in range(2)
            ]
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            with pytest.raises(ResourceExhausted) as late:
                await pool.submit(h.SleepJob(), cost=1.0, deadline=None)
            assert time.perf_counter() - t0 < 0.05
            assert "estimated wait about" in late.value.message
            retry_after = late.value.retry_after_s  # type: ignore[attr-defined]
            assert isinstance(retry_after, float) and 0 < retry_after < 60
            await asyncio.gather(*hold)

            # One job alone over the budget can never run: INVALID_ARGUMENT naming the cap.
            with pytest.raises(InvalidArgument) as too_big:
                await pool.submit(h.SleepJob(), cost=10.5, deadline=None)
            assert "max_task_cost" in too_big.value.message and "10" in too_big.value.message
            with pytest.raises(ValueError):
                await pool.submit(h.SleepJob(), cost=float("nan"), deadline=None)
        # The servicer counts each refused call (under its RPC method); the pool must not count again.
        counted = sample("cnnserve_rejections_total", method="sleep", model="toy", reason="cost_budget")
        assert counted == rejected

    run(scenario)


def test_input_that_crashes_processes_twice_is_internal_and_not_retried() -> None:
    async def scenario() -> None:
        restarts = sample("cnnserve_worker_restarts_total")
        async with started_pool() as pool:
            poison = h.CrashJob("exit", nonce=1)
            t0 = time.monotonic()
            with pytest.raises(Unavailable) as first:
                await pool.submit(poison, cost=1.0, deadline=None)
            assert time.monotonic() - t0 < 3.0
            assert "exited with code 17" in first.value.message
            await eventually(lambda: pool.alive_workers == 2, 10.0, "replacement after os._exit")

            with pytest.raises(Unavailable) as segv:
                await pool.submit(h.CrashJob("segfault"), cost=1.0, deadline=None)
            assert "SIGSEGV" in segv.value.message
            await eventually(lambda: pool.alive_workers == 2, 10.0, "replacement after a segfault")

            # An equal task (same content, a new object) is the same input.
            with pytest.raises(Internal) as second:
                await pool.submit(h.CrashJob("exit", nonce=1), cost=1.0, deadline=None)
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


def test_a_job_that_later_runs_to_the_end_loses_its_strike(tmp_path: Path) -> None:
    """One crash is a strike, not a verdict: the OOM killer or an operator may have killed the
    worker. A success clears it; only two crashes with no success between make the input poison."""

    async def scenario() -> None:
        marker = tmp_path / "crash-next-time"
        task = h.CrashIfMarkedJob(str(marker))
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


def test_cost_budget_holds_the_admitted_cost_exactly_and_estimates_the_wait() -> None:
    queued = sample("cnnserve_task_queued_cost")
    budget = CostBudget(10.0)
    budget.check_alone(10.0, "sleep")  # exactly the budget fits alone
    with pytest.raises(InvalidArgument, match="max_task_cost") as too_big:
        budget.check_alone(10.5, "sleep")
    assert too_big.value.reason == "too_large"
    for bad in (float("nan"), float("inf"), -1.0, True):
        with pytest.raises(ValueError):
            budget.check_alone(bad, "sleep")
    for i in range(10):
        budget.admit(i, 0.1, "sleep")
    assert budget.admitted == 1.0  # fsum: ten 0.1s are exactly 1.0
    budget.check_room(9.0, "sleep", 1)  # 1 + 9 is the budget exactly: fits
    with pytest.raises(ResourceExhausted) as full:
        budget.check_room(9.5, "sleep", 1)
    assert full.value.reason == "cost_budget" and "estimated wait unknown" in full.value.message
    assert full.value.retry_after_s is None  # type: ignore[attr-defined]
    budget.ran(4.0, 2.0)  # 2 cost units per second per process
    with pytest.raises(ResourceExhausted) as full:
        budget.check_room(10.0, "sleep", 2)
    # 1 unit over the budget, drained by 2 processes at 2 units/s each
    assert full.value.retry_after_s == pytest.approx(0.25)  # type: ignore[attr-defined]
    for i in range(10):
        budget.release(i)
    assert budget.admitted == 0.0
    assert sample("cnnserve_task_queued_cost") == pytest.approx(queued, abs=1e-9)  # the gauge adds up


def test_crash_ledger_strikes_poison_clears_and_forgets_the_oldest() -> None:
    ledger = CrashLedger(memory=3)
    a, b = ledger.fingerprint(b"job a"), ledger.fingerprint(b"job b")
    assert a == ledger.fingerprint(b"job a") and a != b
    assert ledger.strike(a) == 1
    ledger.refuse_poison(a)  # one strike is not a verdict
    ledger.clear(a)  # it ran to the end
    assert ledger.strike(a) == 1
    assert ledger.strike(a) == 2
    with pytest.raises(Internal) as poison:
        ledger.refuse_poison(a)
    assert poison.value.message == CRASHED_TWICE_MESSAGE and poison.value.reason == "worker_crash"
    for other in (b"c", b"d", b"e"):  # three newer inputs push the oldest out of a memory of 3
        ledger.strike(ledger.fingerprint(other))
    ledger.refuse_poison(a)
