"""Helpers of the gradient pool's tests (test_pool, test_dispatch, test_admission, test_supervisor).

`started_pool` starts a GradientPool of 2 real spawned processes running the tiny handlers in
pool_handlers.py (each starts in well under a second: numpy and service.errors only) and closes it at
the end, checking that no process is left behind; the rest polls, samples metrics and finds the pid
running a job.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from service.observability import metrics
from service.worker.pool import GradientPool

try:  # tests/ as packages or as rootdir-relative modules: the processes import it the same way
    from . import pool_handlers as h  # type: ignore[import-not-found]
except ImportError:
    import pool_handlers as h  # type: ignore[import-not-found,no-redef]

LONG = dict(steps=1000, step_s=0.01)  # ~10 s unless stopped


def run(scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


def sample(name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def started_pool(**kwargs: Any) -> AsyncIterator[GradientPool[Any, Any, Any]]:
    kwargs.setdefault("workers", 2)
    kwargs.setdefault("initializer", h.init_state)
    kwargs.setdefault("handler", h.handle)
    kwargs.setdefault("cost_budget", 100.0)
    pool: GradientPool[Any, Any, Any] = GradientPool(**kwargs)
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
    pool: GradientPool[Any, Any, Any], task: h.SleepJob, **kwargs: Any
) -> tuple[asyncio.Task[Any], int]:
    """Submit an announcing SleepJob; return its asyncio task and the pid running it."""
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
