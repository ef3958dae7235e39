"""What the gradient pool lets in: the cost budget (with the wait estimate a refusal carries) and the
ledger of inputs that crashed a gradient process.

- Admission is by cost: the cost of the jobs admitted and not finished (queued or running) may not
  exceed `budget` (settings.max_task_cost, in jobs.estimate_cost's units). A job that does not fit is
  refused at once (ResourceExhausted, reason "cost_budget") with an estimated wait from the measured
  throughput: an EWMA of cost units per second per process over the jobs that ran to the end.
- Poison inputs: a job whose process crashes is not retried by the pool (pool.py says why); its
  fingerprint (a hash of the job's pickle) gets a strike here. A second crash makes the input poison,
  refused with INTERNAL from then on without touching a process. A run to the end clears the strike:
  the OOM killer picks the biggest process, not the guilty one.

Both run on the event loop only. Not counted here: cnnserve_rejections_total (the servicer counts
every refused call once, under its RPC method, from the error's `reason`).
"""

from __future__ import annotations

import collections
import hashlib
import math

from service.errors import Internal, InvalidArgument, ResourceExhausted
from service.observability import metrics

CRASHED_TWICE_MESSAGE = "this input crashed a gradient worker twice; it is not retried"

# Weight of the newest finished job in the throughput estimate (cost units per second per process).
RATE_EWMA_ALPHA = 0.2
# Job fingerprints remembered after a crash (bounded: a flood of distinct crashing inputs must not
# grow memory without limit; the oldest are forgotten first).
CRASH_MEMORY = 4096


class CostBudget:
    """The admitted cost and the throughput estimate; `name` is for the messages ("gradient")."""

    def __init__(self, budget: float, *, name: str = "gradient") -> None:
        self._budget = float(budget)
        self._name = name
        self._admitted: dict[int, tuple[float, str]] = {}  # job id -> (cost, task label)
        self._admitted_cost = 0.0
        self._rate: float | None = None  # cost units per second per process (EWMA)
        metrics.TASK_COST_BUDGET.set(self._budget)

    @property
    def budget(self) -> float:
        return self._budget

    @property
    def admitted(self) -> float:
        """Cost units admitted and not finished (queued or running)."""
        return self._admitted_cost

    def check_alone(self, cost: float, label: str) -> None:
        """ValueError for a cost that is not a finite number >= 0; InvalidArgument (reason "too_large")
        for a job that costs more than the whole budget: it could never run."""
        if (
            isinstance(cost, bool)
            or not isinstance(cost, (int, float))
            or not math.isfinite(cost)
            or cost < 0
        ):
            raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
        if cost > self._budget:
            raise InvalidArgument(
                f"this {label} job costs {cost:.4g} cost units, more than the {self._budget:.4g} a single "
                "job may use (max_task_cost); use fewer steps or a smaller image",
                reason="too_large",
            )

    def check_room(self, cost: float, label: str, processes: int) -> None:
        """ResourceExhausted (reason "cost_budget") when `cost` does not fit next to what is admitted;
        the message says the estimated wait, also given as the attribute `retry_after_s` (seconds, or
        None before any job finished). `processes`: the gradient processes alive."""
        if self._admitted_cost + cost <= self._budget:
            return
        wait_s = self.estimate_wait_s(cost, processes)
        wait = "unknown (no job has finished yet)" if wait_s is None else f"about {wait_s:.1f} s"
        error = ResourceExhausted(
            f"{self._name} workers are saturated: {self._admitted_cost:.4g} of {self._budget:.4g} "
            f"cost units are admitted and this {label} job needs {cost:.4g}; "
            f"estimated wait {wait}; retry later",
            reason="cost_budget",
        )
        error.retry_after_s = wait_s  # type: ignore[attr-defined]
        raise error

    def estimate_wait_s(self, cost: float, processes: int) -> float | None:
        if self._rate is None:
            return None
        excess = self._admitted_cost + cost - self._budget
        return max(0.0, excess / (self._rate * max(1, processes)))

    def admit(self, job_id: int, cost: float, label: str) -> None:
        self._admitted[job_id] = (cost, label)
        self._admitted_cost = math.fsum(c for c, _ in self._admitted.values())
        metrics.TASK_QUEUED_COST.inc(cost)
        metrics.TASKS_INFLIGHT.labels(task=label).inc()

    def release(self, job_id: int) -> None:
        cost, label = self._admitted.pop(job_id)
        # fsum over what is left: no float drift, exactly 0.0 when idle.
        self._admitted_cost = math.fsum(c for c, _ in self._admitted.values())
        metrics.TASK_QUEUED_COST.dec(cost)
        metrics.TASKS_INFLIGHT.labels(task=label).dec()

    def ran(self, cost: float, run_s: float) -> None:
        """A job of `cost` ran to the end in `run_s`: fold its throughput into the estimate."""
        if cost > 0 and run_s > 0:
            sample = cost / run_s
            self._rate = (
                sample
                if self._rate is None
                else (RATE_EWMA_ALPHA * sample + (1.0 - RATE_EWMA_ALPHA) * self._rate)
            )


class CrashLedger:
    """Strikes against the inputs that crashed a gradient process, by fingerprint (bounded)."""

    def __init__(self, memory: int = CRASH_MEMORY) -> None:
        self._memory = memory
        self._crashes: collections.OrderedDict[str, int] = collections.OrderedDict()

    @staticmethod
    def fingerprint(job_bytes: bytes) -> str:
        """The input's identity: a hash of the job's pickle (what the process was sent)."""
        return hashlib.blake2b(job_bytes, digest_size=16).hexdigest()

    def refuse_poison(self, fingerprint: str) -> None:
        """Internal(CRASHED_TWICE_MESSAGE, reason "worker_crash") for an input with two strikes."""
        if self._crashes.get(fingerprint, 0) >= 2:
            raise Internal(CRASHED_TWICE_MESSAGE, reason="worker_crash")

    def strike(self, fingerprint: str) -> int:
        """Record a crash of this input; returns its strikes so far."""
        count = self._crashes.get(fingerprint, 0) + 1
        self._crashes[fingerprint] = count
        self._crashes.move_to_end(fingerprint)
        while len(self._crashes) > self._memory:
            self._crashes.popitem(last=False)
        return count

    def clear(self, fingerprint: str) -> None:
        """The input ran to the end, so it is not poison: an earlier crash while it ran was something
        else (the OOM killer choosing it for a neighbour's memory, an operator)."""
        self._crashes.pop(fingerprint, None)


__all__ = ["CRASHED_TWICE_MESSAGE", "CostBudget", "CrashLedger"]
