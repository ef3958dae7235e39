"""DynamicBatcher: merging, splitting, back-pressure, deadlines, cancellation, drain, failures.

A fake runner stands in for ONNX Runtime: inputs are (n, 1) arrays of unique request ids, the
output is 2 * input, so every caller can check that it got exactly its own rows back, in order,
and the runner records every batch it saw.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from service.engine.batcher import DynamicBatcher
from service.errors import (
    GENERIC_INTERNAL_MESSAGE,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
)
from service.observability import metrics


class FakeRunner:
    """Records batches; optionally blocks until released or sleeps per batch."""

    def __init__(self, *, delay_s: float = 0.0, blocking: bool = False, poison: float | None = None) -> None:
        self.batches: list[np.ndarray] = []
        self.delay_s = delay_s
        self.gate = threading.Event()
        if not blocking:
            self.gate.set()
        self.entered = threading.Event()
        self.poison = poison
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            self.batches.append(x.copy())
        self.entered.set()
        assert self.gate.wait(10), "test runner was never released"
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.poison is not None and np.any(x == self.poison):
            raise RuntimeError("poisoned batch")
        return x * 2.0

    def seen_ids(self) -> set[float]:
        return {float(v) for b in self.batches for v in b.ravel()}

    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


def ids(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1)


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), timeout=30))


def make(runner: FakeRunner, **kw: Any) -> DynamicBatcher:
    name = kw.pop("name", "fake")
    params: dict[str, Any] = {"max_batch_size": 8, "max_queue_delay_s": 0.002, "max_queue_size": 64}
    params.update(kw)
    return DynamicBatcher(runner, name=name, **params)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.001)


def test_concurrent_requests_are_merged_and_answers_are_not_mixed() -> None:
    runner = FakeRunner(delay_s=0.02)  # requests pile up while a batch runs

    async def main() -> None:
        b = make(runner, max_batch_size=8, max_queue_size=256)
        await b.start()
        sizes = [1 + (i % 3) for i in range(40)]
        starts = np.cumsum([0, *sizes])[:-1] * 10 + 1000
        results = await asyncio.gather(
            *(b.submit(ids(int(s), n), None) for s, n in zip(starts, sizes, strict=True))
        )
        for s, n, out in zip(starts, sizes, results, strict=True):
            np.testing.assert_array_equal(out, ids(int(s), n) * 2)
        await b.close()

    run(main)
    assert max(runner.sizes()) > 1, runner.sizes()
    assert all(size <= 8 for size in runner.sizes())
    assert sum(runner.sizes()) == sum(1 + (i % 3) for i in range(40))  # nothing computed twice
    assert len(runner.batches) < 40


def test_request_larger_than_max_batch_is_split_and_reassembled_in_order() -> None:
    runner = FakeRunner()

    async def main() -> None:
        b = make(runner, max_batch_size=8)
        await b.start()
        out, timings = await b.submit_timed(ids(0, 37), None)
        np.testing.assert_array_equal(out, ids(0, 37) * 2)
        assert timings.batches == 5
        assert timings.inference_s > 0
        await b.close()

    run(main)
    assert runner.sizes() == [8, 8, 8, 8, 5]


def test_full_queue_is_refused_at_once_with_the_queue_size() -> None:
    runner = FakeRunner(blocking=True)

    async def main() -> None:
        b = make(runner, max_batch_size=2, max_queue_size=4)
        await b.start()
        running = asyncio.create_task(b.submit(ids(0, 2), None))  # taken into the (blocked) batch
        await wait_until(runner.entered.is_set)
        queued = [asyncio.create_task(b.submit(ids(10 + 2 * i, 2), None)) for i in range(2)]
        await wait_until(lambda: b.queued_images == 4)
        started = time.monotonic()
        with pytest.raises(ResourceExhausted) as info:
            await b.submit(ids(100, 1), None)
        assert time.monotonic() - started < 0.05
        assert info.value.reason == "queue_full"
        # 2 being computed + 4 waiting: the capacity is max_queue_size + max_batch_size.
        assert "6 of 6 images admitted" in info.value.message
        runner.gate.set()
        results = await asyncio.gather(running, *queued)
        np.testing.assert_array_equal(results[2], ids(12, 2) * 2)
        await b.close()

    run(main)
    assert 100.0 not in runner.seen_ids()


@pytest.mark.parametrize("first_batch", [0, 1, 4])
def test_admission_is_exact_whatever_the_batch_timing(first_batch: int) -> None:
    """N + Q + k one-image requests while nothing finishes: exactly k refusals, whether the runner
    took nothing yet, a batch of 1 (it was idle when the first arrived) or a full batch."""
    batch, queue, k = 4, 8, 3
    runner = FakeRunner(blocking=True)

    async def main() -> None:
        b = make(runner, max_batch_size=batch, max_queue_size=queue, max_queue_delay_s=0)
        await b.start()
        assert b.capacity == queue + batch
        early = [asyncio.create_task(b.submit(ids(i, 1), None)) for i in range(first_batch)]
        if first_batch:
            await wait_until(runner.entered.is_set)  # the runner holds a batch of `first_batch`
        late = [asyncio.create_task(b.submit(ids(i, 1), None)) for i in range(first_batch, batch + queue + k)]
        await asyncio.sleep(0.05)  # every submit ran its admission; none was computed
        refused = [t for t in early + late if t.done() and isinstance(t.exception(), ResourceExhausted)]
        assert len(refused) == k
        assert b.admitted_images == batch + queue
        runner.gate.set()
        answered = await asyncio.gather(*(t for t in early + late if t not in refused))
        assert len(answered) == batch + queue
        assert b.admitted_images == 0
        await b.close()

    run(main)
    assert sum(runner.sizes()) == batch + queue  # the refused were never computed


def test_rows_of_an_abandoned_request_hold_capacity_until_their_batch_ends() -> None:
    runner = FakeRunner(blocking=True)

    async def main() -> None:
        b = make(runner, max_batch_size=2, max_queue_size=2, max_queue_delay_s=0)
        await b.start()
        victim = asyncio.create_task(b.submit(ids(0, 2), None))
        await wait_until(runner.entered.is_set)  # both rows are in the running batch
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        # The runner still computes the victim's rows: they keep their place in the capacity.
        assert b.admitted_images == 2
        queued = asyncio.create_task(b.submit(ids(10, 2), None))
        await wait_until(lambda: b.queued_images == 2)
        with pytest.raises(ResourceExhausted):
            await b.submit(ids(20, 1), None)
        runner.gate.set()
        np.testing.assert_array_equal(await queued, ids(10, 2) * 2)
        assert b.admitted_images == 0
        np.testing.assert_array_equal(await b.submit(ids(30, 4), None), ids(30, 4) * 2)
        await b.close()

    run(main)


def test_a_request_beyond_the_capacity_can_never_fit() -> None:
    async def main() -> None:
        b = make(FakeRunner(), max_batch_size=2, max_queue_size=3)
        await b.start()
        with pytest.raises(ResourceExhausted) as info:
            await b.submit(ids(0, 6), None)
        assert "can never fit" in info.value.message and "capacity of 5" in info.value.message
        np.testing.assert_array_equal(await b.submit(ids(0, 5), None), ids(0, 5) * 2)  # exactly fits
        await b.close()

    run(main)


def test_admit_reserves_room_until_submitted_or_released() -> None:
    async def main() -> None:
        b = make(FakeRunner(), max_batch_size=2, max_queue_size=2)
        await b.start()
        first = b.admit(3)
        with pytest.raises(ResourceExhausted):
            b.admit(2)
        with pytest.raises(ResourceExhausted):
            await b.submit(ids(0, 2), None)
        first.release()
        first.release()  # idempotent
        assert b.admitted_images == 0
        second = b.admit(2)
        out, _ = await b.submit_timed(ids(0, 2), None, second)  # counted once, not twice
        np.testing.assert_array_equal(out, ids(0, 2) * 2)
        second.release()  # a no-op once consumed
        assert b.admitted_images == 0
        with pytest.raises(RuntimeError, match="used twice"):
            await b.submit_timed(ids(0, 2), None, second)
        with pytest.raises(ResourceExhausted, match="can never fit"):
            b.admit(5)
        await b.close()
        with pytest.raises(Unavailable):
            b.admit(1)

    run(main)


def test_deadline_while_queued_fails_promptly_and_is_never_computed() -> None:
    runner = FakeRunner(blocking=True)

    async def main() -> None:
        b = make(runner, max_batch_size=1)
        await b.start()
        first = asyncio.create_task(b.submit(ids(0, 1), None))
        await wait_until(runner.entered.is_set)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await b.submit(ids(500, 1), time.monotonic() + 0.05)
        waited = time.monotonic() - started
        assert 0.04 <= waited < 0.5, waited  # the timer fired, not the next batch boundary
        assert b.queued_images == 0
        runner.gate.set()
        await first
        await b.submit(ids(1, 1), None)
        await b.close()

    run(main)
    assert 500.0 not in runner.seen_ids()


def test_expired_deadline_is_refused_before_queueing() -> None:
    runner = FakeRunner()

    async def main() -> None:
        b = make(runner)
        await b.start()
        with pytest.raises(DeadlineExceeded):
            await b.submit(ids(7, 1), time.monotonic() - 0.001)
        await b.close()

    run(main)
    assert runner.batches == []


def test_deadline_found_expired_when_the_batch_is_formed() -> None:
    # A controllable clock: the request's timer (real time) has not fired yet, but by the batcher's
    # clock its deadline is past when the next batch forms: it is answered without being computed.
    now = [0.0]
    runner = FakeRunner(blocking=True)

    async def main() -> None:
        b = DynamicBatcher(
            runner,
            name="clock",
            max_batch_size=1,
            max_queue_delay_s=0.0,
            max_queue_size=8,
            clock=lambda: now[0],
        )
        await b.start()
        first = asyncio.create_task(b.submit(ids(0, 1), None))
        await wait_until(runner.entered.is_set)
        late = asyncio.create_task(b.submit(ids(900, 1), 5.0))  # 5 s of real timer
        ok = asyncio.create_task(b.submit(ids(901, 1), None))
        await wait_until(lambda: b.queued_images == 2)
        now[0] = 10.0
        runner.gate.set()
        await first
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await late
        assert time.monotonic() - started < 1.0
        np.testing.assert_array_equal(await ok, ids(901, 1) * 2)
        await b.close()

    run(main)
    assert 900.0 not in runner.seen_ids()


def test_cancelled_caller_leaves_the_queue() -> None:
    runner = FakeRunner(blocking=True)

    async def main() -> None:
        b = make(runner, max_batch_size=1)
        await b.start()
        first = asyncio.create_task(b.submit(ids(0, 1), None))
        await wait_until(runner.entered.is_set)
        victim = asyncio.create_task(b.submit(ids(300, 3), None))
        await wait_until(lambda: b.queued_images == 3)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        assert b.queued_images == 0
        runner.gate.set()
        await first
        np.testing.assert_array_equal(await b.submit(ids(5, 1), None), ids(5, 1) * 2)
        await b.close()

    run(main)
    assert not {300.0, 301.0, 302.0} & runner.seen_ids()


def test_close_drains_queued_work_then_refuses() -> None:
    runner = FakeRunner(delay_s=0.01)

    async def main() -> None:
        b = make(runner, max_batch_size=2)
        await b.start()
        tasks = [asyncio.create_task(b.submit(ids(10 * i, 2), None)) for i in range(6)]
        await asyncio.sleep(0)  # all six queued
        closing = asyncio.create_task(b.close())
        await asyncio.sleep(0)
        with pytest.raises(Unavailable):
            await b.submit(ids(999, 1), None)
        await closing
        for i, task in enumerate(tasks):
            np.testing.assert_array_equal(task.result(), ids(10 * i, 2) * 2)
        with pytest.raises(Unavailable):
            await b.submit(ids(999, 1), None)

    run(main)
    assert sum(runner.sizes()) == 12


def test_runner_failure_answers_internal_and_the_batcher_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = FakeRunner(poison=666.0)

    async def main() -> None:
        b = make(runner)
        await b.start()
        with pytest.raises(Internal) as info:
            await b.submit(ids(666, 1), None)
        assert info.value.message == GENERIC_INTERNAL_MESSAGE
        np.testing.assert_array_equal(await b.submit(ids(1, 4), None), ids(1, 4) * 2)
        await b.close()

    run(main)
    assert "inference failed" in caplog.text
    assert "poisoned batch" in caplog.text  # the traceback is logged, not sent


def test_a_failing_request_fails_alone_when_batched_with_others(caplog: pytest.LogCaptureFixture) -> None:
    runner = FakeRunner(blocking=True, poison=666.0)

    async def main() -> None:
        b = make(runner, max_queue_delay_s=0)
        await b.start()
        first = asyncio.ensure_future(b.submit(ids(1, 1), None))  # holds the runner at its gate
        await wait_until(runner.entered.is_set)
        good = asyncio.ensure_future(b.submit(ids(10, 2), None))
        bad = asyncio.ensure_future(b.submit(ids(666, 1), None))
        also_good = asyncio.ensure_future(b.submit(ids(20, 1), None))
        await wait_until(lambda: b.queued_images == 4)
        runner.gate.set()
        np.testing.assert_array_equal(await first, ids(1, 1) * 2)
        np.testing.assert_array_equal(await good, ids(10, 2) * 2)
        np.testing.assert_array_equal(await also_good, ids(20, 1) * 2)
        with pytest.raises(Internal) as info:
            await bad
        assert info.value.message == GENERIC_INTERNAL_MESSAGE
        assert b.admitted_images == 0  # every image released, the failed one too
        np.testing.assert_array_equal(await b.submit(ids(30, 3), None), ids(30, 3) * 2)
        await b.close()

    run(main)
    # The merged batch of 4 failed; its three requests ran alone; only 666 failed again.
    assert runner.sizes() == [1, 4, 2, 1, 1, 3], runner.sizes()
    assert "running the 3 requests of the failed batch one by one" in caplog.text


def test_single_client_never_waits_for_company() -> None:
    runner = FakeRunner()

    async def main() -> None:
        b = make(runner, max_queue_delay_s=0.2)  # a long delay makes any waiting obvious
        await b.start()
        for i in range(20):
            started = time.monotonic()
            await b.submit(ids(i, 1), None)
            assert time.monotonic() - started < 0.1
        await b.close()

    run(main)


def test_concurrent_clients_wait_for_each_other_within_the_delay() -> None:
    runner = FakeRunner()

    async def main() -> None:
        b = make(runner, max_queue_delay_s=0.5, max_batch_size=8)
        await b.start()
        await asyncio.gather(b.submit(ids(0, 1), None), b.submit(ids(1, 1), None))  # two clients seen
        before = len(runner.batches)
        first = asyncio.create_task(b.submit(ids(10, 1), None))
        await asyncio.sleep(0.05)  # well inside the delay: the runner must still be waiting
        second = asyncio.create_task(b.submit(ids(11, 1), None))
        started = time.monotonic()
        await asyncio.gather(first, second)
        assert time.monotonic() - started < 0.3  # both arrived: no need to sit out the delay
        assert runner.sizes()[before:] == [2]
        await b.close()

    run(main)


def test_metrics_are_recorded() -> None:
    runner = FakeRunner()

    def sample(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    async def main() -> None:
        b = DynamicBatcher(
            runner,
            name="metrics-test",
            max_batch_size=4,
            max_queue_delay_s=0,
            max_queue_size=16,
            provider="CPU",
        )
        await b.start()
        await b.submit(ids(0, 3), None)
        await b.close()

    before = sample("cnnserve_batch_size_sum", model="metrics-test")
    run(main)
    assert sample("cnnserve_batch_size_sum", model="metrics-test") - before == 3
    assert sample("cnnserve_queue_wait_seconds_count", model="metrics-test") >= 1
    assert sample("cnnserve_inference_duration_seconds_count", model="metrics-test", provider="CPU") >= 1
    assert sample("cnnserve_queue_depth", model="metrics-test") == 0


# --- instances: several runners, a batch each at once ---------------------------------------------


def test_instances_compute_batches_at_once_and_answers_are_not_mixed() -> None:
    first, second = FakeRunner(blocking=True), FakeRunner(blocking=True)

    async def main() -> None:
        b = DynamicBatcher(
            [first, second], name="two", max_batch_size=2, max_queue_delay_s=0, max_queue_size=8
        )
        await b.start()
        assert b.instances == 2
        a = asyncio.create_task(b.submit(ids(0, 2), None))
        await wait_until(lambda: first.entered.is_set() or second.entered.is_set())
        c = asyncio.create_task(b.submit(ids(10, 2), None))
        # The second batch starts on the other instance while the first is still held.
        await wait_until(lambda: first.entered.is_set() and second.entered.is_set())
        assert b.queued_images == 0
        d = asyncio.create_task(b.submit(ids(20, 1), None))
        await wait_until(lambda: b.queued_images == 1)  # no instance idle: it waits
        first.gate.set()
        second.gate.set()
        for task, start, n in ((a, 0, 2), (c, 10, 2), (d, 20, 1)):
            np.testing.assert_array_equal(await task, ids(start, n) * 2)
        assert b.admitted_images == 0
        await b.close()

    run(main)
    assert sorted(first.sizes() + second.sizes()) == [1, 2, 2]


def test_capacity_counts_a_batch_per_instance_and_admission_stays_exact() -> None:
    batch, queue, extra = 2, 3, 2
    runners = [FakeRunner(blocking=True) for _ in range(3)]

    async def main() -> None:
        b = DynamicBatcher(
            runners, name="three", max_batch_size=batch, max_queue_delay_s=0, max_queue_size=queue
        )
        await b.start()
        assert b.capacity == queue + 3 * batch
        tasks = [asyncio.create_task(b.submit(ids(i, 1), None)) for i in range(b.capacity + extra)]
        await asyncio.sleep(0.05)
        refused = [t for t in tasks if t.done() and isinstance(t.exception(), ResourceExhausted)]
        assert len(refused) == extra
        assert "3 instances x max_batch_size 2" in refused[0].exception().message  # type: ignore[union-attr]
        for runner in runners:
            runner.gate.set()
        answered = await asyncio.gather(*(t for t in tasks if t not in refused))
        assert len(answered) == queue + 3 * batch
        assert b.admitted_images == 0
        await b.close()

    run(main)
    assert sum(sum(r.sizes()) for r in runners) == queue + 3 * batch


def test_a_failing_instance_fails_only_its_batch_and_close_drains_every_instance() -> None:
    good, bad = FakeRunner(delay_s=0.01), FakeRunner(delay_s=0.01, poison=666.0)

    async def main() -> None:
        b = DynamicBatcher(
            [good, bad], name="mixed", max_batch_size=4, max_queue_delay_s=0, max_queue_size=256
        )
        await b.start()
        sizes = [1 + (i % 4) for i in range(60)]
        starts = [1000 + 10 * i for i in range(60)]
        tasks = [asyncio.create_task(b.submit(ids(s, n), None)) for s, n in zip(starts, sizes, strict=True)]
        poisoned = asyncio.create_task(b.submit(np.full((1, 1), 666.0, dtype=np.float32), None))
        closing = asyncio.create_task(b.close())  # refuses new work, answers everything queued
        for task, s, n in zip(tasks, starts, sizes, strict=True):
            np.testing.assert_array_equal(await task, ids(s, n) * 2)
        # Computed by whichever instance took it: only the poisoned one fails, and only on `bad`.
        try:
            out = await poisoned
        except Internal:
            assert any(np.any(x == 666.0) for x in bad.batches)
        else:
            np.testing.assert_array_equal(out, np.full((1, 1), 1332.0))
        await closing
        assert b.admitted_images == 0
        with pytest.raises(Unavailable):
            await b.submit(ids(0, 1), None)

    run(main)
    assert good.batches and bad.batches  # both instances worked
