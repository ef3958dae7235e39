"""Spawned child processes kept alive: spawn, the ready handshake, crash detection, respawn with backoff.

The shape is uvicorn's supervisors/multiprocess.py: one object per child process (`ChildProcess`,
spawned.py: uvicorn's `Process`) and a supervisor that starts N of them, replaces the ones that die
and stops them all (`Supervisor`, uvicorn's `Multiprocess` with its init_processes,
keep_subprocess_alive and terminate_all/join_all). Reshaped for a parent that runs an asyncio loop:

- Ready handshake: a child answers Ready (with its state's summary) once its initializer ran, or
  InitFailed and exits with EXIT_INIT_FAILED (child.py). `start()` waits for every child; a
  replacement gets `ready_timeout_s` on its own and is killed after it ("ready_timeout").
- Crash detection by pipe EOF, not by polling (uvicorn pings each child every 0.5 s): each child's
  reader thread (spawned.py) reports its death the moment the process is gone, then its exit status.
- Respawn: a child that was ready is replaced at once; one that died before it was ready after
  0.5 s, 1 s, 2 s, ... 30 s. uvicorn stops the parent when a child fails to start; a server here
  keeps classifying with its gradient RPCs UNAVAILABLE, so it keeps retrying, slowly.
- Health: `alive` counts the ready children, and `wait_alive_change` wakes a follower the moment it
  changes (the server's gradients health follows it; nothing polls).
- Interpreter exit without `shutdown()`: the children are killed, or multiprocessing's own exit hook
  would wait forever for children that ignore SIGTERM.

It knows nothing about what the children do: every message but the handshake goes to the owner's
`on_message`, and the owner hears of each death through `on_exit`. The gradient pool (pool.py) owns
one; the engine processes of the coming process split are meant to own another. Everything runs on
the event loop except the reader threads, which only post to it.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import Counter, Gauge

from service.worker.child import InitFailed, Ready, Stop
from service.worker.spawned import REAP_TIMEOUT_S, ChildProcess, exit_status

log = logging.getLogger(__name__)

# shutdown(): how long idle children get to exit after Stop before they are SIGKILLed.
STOP_TIMEOUT_S = 2.0
# Replacement children that die before they are ready are respawned after 0.5 s, 1 s, 2 s, ... 30 s.
RESPAWN_BACKOFF_S = (0.5, 30.0)


class ProcessStartError(RuntimeError):
    """start() failed: a child's initializer raised, a child died before it was ready, or the
    children were not ready within ready_timeout_s. The message carries the child's traceback."""


@dataclass(frozen=True)
class ChildMetrics:
    """Where a supervisor counts its children."""

    alive: Gauge  # children ready and not dead
    deaths: Counter  # labelled `reason`: job_crash, idle_crash, init_failed, or a kill_reason
    restarts: Counter  # replacements spawned


class Supervisor:
    """`count` spawned children running `target(conn, *args(slot))`, kept alive; see the module docstring.

    name: for logs, errors and process names ("gradient" -> "gradient worker 0 (pid 123) ready").
    target: importable top-level function, the child's main; it must answer Ready or InitFailed
        first (child.child_main does).
    args: the rest of `target`'s arguments for a slot (picklable; e.g. the slot's cancel flag).
    ready_timeout_s: start() waits this long for every child, a replacement this long for itself.
    on_ready(child): the child answered Ready (it is already counted alive).
    on_message(child, message): every message but Ready and InitFailed, in order.
    on_undecodable(child): a message from the child did not unpickle; the child is killed right
        after ("protocol_error").
    on_exit(child, status) -> bool: the child is dead and reaped (status: `exit_status`); return
        whether it died while working (a "job_crash" rather than an "idle_crash").
    """

    def __init__(
        self,
        *,
        name: str,
        count: int,
        target: Callable[..., None],
        args: Callable[[int], tuple[Any, ...]],
        ready_timeout_s: float,
        on_ready: Callable[[ChildProcess], None],
        on_message: Callable[[ChildProcess, object], None],
        on_undecodable: Callable[[ChildProcess], None],
        on_exit: Callable[[ChildProcess, str], bool],
        metrics: ChildMetrics,
    ) -> None:
        self._name = name
        self._count = count
        self._target = target
        self._args = args
        self._ready_timeout_s = ready_timeout_s
        self._on_ready_hook = on_ready
        self._on_message_hook = on_message
        self._on_undecodable_hook = on_undecodable
        self._on_exit_hook = on_exit
        self._metrics = metrics
        self._state: Literal["new", "starting", "running", "stopping", "stopped"] = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: list[ChildProcess | None] = [None] * count
        self._respawn_failures = [0] * count
        self._respawn_timers: dict[int, asyncio.TimerHandle] = {}
        self._alive = 0
        # Bumped whenever _alive changes; health follows it at once (wait_alive_change), not by polling.
        self._alive_generation = 0
        self._alive_changed = asyncio.Event()  # set and replaced at each change
        self._ready_summary: Any = None

    # --- what the owner reads -----------------------------------------------------------------------

    @property
    def alive(self) -> int:
        """Children that answered Ready and have not died."""
        return self._alive

    @property
    def alive_generation(self) -> int:
        """Changes whenever `alive` does (see wait_alive_change)."""
        return self._alive_generation

    async def wait_alive_change(self, seen: int, timeout_s: float) -> None:
        """Return once alive_generation differs from `seen` (at once if it already does), or after
        `timeout_s`. Lets health drop to NOT_SERVING in the same loop turn the last child dies."""
        if self._alive_generation != seen:
            return
        try:
            await asyncio.wait_for(self._alive_changed.wait(), timeout_s)
        except TimeoutError:
            pass

    @property
    def ready_summary(self) -> Any:
        """The summary in the latest Ready (None before any child is ready)."""
        return self._ready_summary

    @property
    def children(self) -> list[ChildProcess]:
        """The current child of every slot that has one, in slot order."""
        return [c for c in self._slots if c is not None]

    @property
    def pids(self) -> list[int]:
        """Process ids of the ready children."""
        return [c.pid for c in self.children if c.state == "ready" and c.pid is not None]

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn every child and wait until each answered Ready.

        Raises ProcessStartError (with the child's traceback) if an initializer raises, a child dies
        before it is ready, or ready_timeout_s passes; every child is killed and reaped first.
        """
        if self._state != "new":
            raise RuntimeError(f"Supervisor.start() called in state {self._state!r}")
        self._loop = asyncio.get_running_loop()
        self._state = "starting"
        # Registered after multiprocessing's own exit hook, so it runs first (atexit is LIFO).
        atexit.register(self._kill_at_exit)
        started = time.monotonic()
        try:
            for slot in range(self._count):
                self._spawn(slot)
            async with asyncio.timeout(self._ready_timeout_s):
                await asyncio.gather(*(c.ready for c in self.children))
        except BaseException as exc:
            ready = self._alive
            await self._stop_children(graceful=None)
            self._state = "stopped"
            atexit.unregister(self._kill_at_exit)
            if isinstance(exc, TimeoutError):
                raise ProcessStartError(
                    f"{self._name} workers were not ready within {self._ready_timeout_s:g} s "
                    f"({ready}/{self._count} ready): the initializer is too slow or hung"
                ) from None
            if isinstance(exc, OSError):
                raise ProcessStartError(f"could not spawn {self._name} workers: {exc}") from exc
            raise
        self._state = "running"
        log.info("%d %s workers ready in %.1f s", self._count, self._name, time.monotonic() - started)

    def stop(self, child: ChildProcess) -> None:
        """Ask an idle child to exit (Stop); kill it if its pipe is already broken."""
        try:
            child.send(Stop())
        except OSError:
            child.kill()

    def mark_dead(self, child: ChildProcess) -> None:
        """The child is gone (EOF, or a send failed): no longer alive; its reader thread reports the
        exit itself."""
        if child.state == "dead":
            return
        if child.state == "ready":
            self._alive_delta(-1)
        child.state = "dead"
        if child.ready_timer is not None:
            child.ready_timer.cancel()

    def stop_respawning(self) -> None:
        """From now on a child that dies stays dead (its owner is shutting down)."""
        if self._state != "stopped":
            self._state = "stopping"
        for timer in self._respawn_timers.values():
            timer.cancel()
        self._respawn_timers.clear()

    async def shutdown(self, *, graceful: Callable[[ChildProcess], bool]) -> None:
        """Stop every child (Stop to the ready ones `graceful` accepts, SIGKILL to the rest) and reap
        them all; SIGKILL after STOP_TIMEOUT_S for any that does not exit."""
        self.stop_respawning()
        await self._stop_children(graceful)
        self._state = "stopped"
        atexit.unregister(self._kill_at_exit)

    # --- spawning and reaping -----------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        assert self._loop is not None
        child = ChildProcess.spawn(
            slot, name=self._name, target=self._target, args=self._args(slot), loop=self._loop
        )
        self._slots[slot] = child
        child.start_reader(
            name=self._name,
            on_message=self._on_message,
            on_undecodable=self._on_undecodable,
            on_eof=self.mark_dead,
            on_reaped=self._on_reaped,
        )
        if self._state == "running":  # start() has its own overall timeout
            child.ready_timer = self._loop.call_later(self._ready_timeout_s, self._on_ready_timeout, child)
        log.debug("spawned %s worker %d (pid %s)", self._name, slot, child.pid)

    def _on_message(self, child: ChildProcess, message: object) -> None:
        if isinstance(message, Ready):
            self._on_ready(child, message)
        elif isinstance(message, InitFailed):
            child.init_error = f"{message.error}\n{message.traceback}"
            log.error(
                "%s worker %d (pid %s) failed to initialize:\n%s",
                self._name,
                child.slot,
                child.pid,
                message.traceback,
            )
        else:
            self._on_message_hook(child, message)

    def _on_ready(self, child: ChildProcess, message: Ready) -> None:
        if child.state != "starting":
            return
        if child.ready_timer is not None:
            child.ready_timer.cancel()
        child.state = "ready"
        child.was_ready = True
        child.pid = message.pid
        self._ready_summary = message.summary
        self._alive_delta(+1)
        self._respawn_failures[child.slot] = 0
        if not child.ready.done():
            child.ready.set_result(None)
        log.info("%s worker %d (pid %d) ready in %.1f s", self._name, child.slot, message.pid, message.init_s)
        self._on_ready_hook(child)

    def _on_ready_timeout(self, child: ChildProcess) -> None:
        if child.state == "starting":
            child.init_error = f"not ready within {self._ready_timeout_s:g} s (initializer too slow or hung)"
            log.error(
                "%s worker %d (pid %s) %s; killing it", self._name, child.slot, child.pid, child.init_error
            )
            child.kill(reason="ready_timeout")

    def _on_undecodable(self, child: ChildProcess, exc: Exception) -> None:
        # We cannot tell which message it was, so the owner answers whatever the child was doing and
        # the child is replaced, rather than risking work that never finishes.
        log.error(
            "a message from %s worker %d (pid %s) could not be unpickled in the server: %r",
            self._name,
            child.slot,
            child.pid,
            exc,
        )
        self._on_undecodable_hook(child)
        child.kill(reason="protocol_error")

    def _on_reaped(self, child: ChildProcess, exitcode: int | None) -> None:
        self.mark_dead(child)
        status = exit_status(exitcode)
        if not child.ready.done():
            detail = child.init_error or (
                f"{status} before it was ready (its stderr has the details; e.g. the initializer or "
                "handler cannot be imported in a fresh process)"
            )
            child.ready.set_exception(
                ProcessStartError(f"{self._name} worker {child.slot} failed to initialize: {detail}")
            )
        working = self._on_exit_hook(child, status)
        if not child.reaped.done():
            child.reaped.set_result(exitcode)
        if self._state == "running":
            self._metrics.deaths.labels(reason=self._death_reason(child, working)).inc()
            if child.was_ready and not working:
                log.error(
                    "%s worker %d (pid %s) died while idle: %s", self._name, child.slot, child.pid, status
                )
            self._schedule_respawn(child)

    @staticmethod
    def _death_reason(child: ChildProcess, working: bool) -> str:
        """The deaths-counter reason for a child that went away while the supervisor ran."""
        if child.kill_reason is not None:
            return child.kill_reason  # the parent killed it: stop_overdue, ready_timeout, protocol_error
        if not child.was_ready:
            return "init_failed"
        return "job_crash" if working else "idle_crash"

    def _alive_delta(self, delta: int) -> None:
        self._alive += delta
        self._metrics.alive.inc(delta)
        self._alive_generation += 1
        self._alive_changed.set()
        self._alive_changed = asyncio.Event()

    # --- respawning -------------------------------------------------------------------------------

    def _backoff_s(self, slot: int) -> float:
        self._respawn_failures[slot] += 1
        low, high = RESPAWN_BACKOFF_S
        return float(min(high, low * 2 ** (self._respawn_failures[slot] - 1)))

    def _schedule_respawn(self, child: ChildProcess) -> None:
        assert self._loop is not None
        slot = child.slot
        if child.was_ready:
            delay = 0.0
        else:
            delay = self._backoff_s(slot)
            log.error(
                "replacement %s worker %d (pid %s) died before it was ready (%s, attempt %d); "
                "retrying in %.1f s",
                self._name,
                slot,
                child.pid,
                child.init_error.splitlines()[0] if child.init_error else "see its stderr",
                self._respawn_failures[slot],
                delay,
            )
        self._respawn_timers[slot] = self._loop.call_later(delay, self._respawn, slot)

    def _respawn(self, slot: int) -> None:
        self._respawn_timers.pop(slot, None)
        if self._state != "running":
            return
        self._metrics.restarts.inc()
        try:
            self._spawn(slot)
        except Exception:
            log.exception("could not respawn %s worker %d", self._name, slot)
            assert self._loop is not None
            self._respawn_timers[slot] = self._loop.call_later(self._backoff_s(slot), self._respawn, slot)
        else:
            log.warning("respawned %s worker %d (pid %s)", self._name, slot, self._slots[slot].pid)  # type: ignore[union-attr]

    # --- stopping ---------------------------------------------------------------------------------

    async def _stop_children(self, graceful: Callable[[ChildProcess], bool] | None) -> None:
        """Stop every child (Stop to the ready ones `graceful` accepts, SIGKILL otherwise) and reap them."""
        children = [c for c in self.children if not c.reaped.done()]
        for c in children:
            if graceful is not None and c.state == "ready" and graceful(c):
                self.stop(c)
            else:
                c.kill()
        if not children:
            return
        pending = {c.reaped for c in children}
        _, pending = await asyncio.wait(pending, timeout=STOP_TIMEOUT_S)
        if pending:
            for c in children:
                if not c.reaped.done():
                    c.kill()
            _, pending = await asyncio.wait(pending, timeout=REAP_TIMEOUT_S + STOP_TIMEOUT_S)
            if pending:
                log.error("%d %s worker processes could not be reaped", len(pending), self._name)
        for c in children:
            if c.thread is not None:
                c.thread.join(timeout=1.0)

    def _kill_at_exit(self) -> None:
        """Interpreter exit without shutdown() (a crash of the server's main code): kill the children.

        multiprocessing's own exit hook would SIGTERM daemonic children and then join them, but the
        children ignore SIGTERM (the parent owns signals) and wait in recv() on a pipe the still
        living parent holds open: without this, the exit would hang forever.
        """
        children = self.children
        for c in children:
            c.kill()
        for c in children:
            c.join_at_exit()


__all__ = ["ChildMetrics", "ProcessStartError", "Supervisor"]
