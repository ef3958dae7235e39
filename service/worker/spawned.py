"""One spawned child process, as its parent sees it: spawn, the reader thread, kill, the exit status.

uvicorn's `Process` (supervisors/multiprocess.py) to supervisor.py's `Multiprocess`. The parent's
half of the pipe protocol in child.py:

- spawned with the `spawn` start method (CUDA cannot be used in a forked child; spawn is clean), with
  its own duplex Pipe, SIGINT/SIGTERM blocked around `start()` (the parent owns signals);
- one reader thread blocks in `recv()` and hands every message to the event loop with
  `call_soon_threadsafe`. The parent closes its copy of the child's end after spawning, so the pipe's
  EOF arrives the moment the process is gone (SIGKILL, os._exit, segfault, the OOM killer): EOF is
  the crash detector, no polling. The thread then reaps the process and reports its exit code.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

from service.worker.child import EXIT_INIT_FAILED

MP_CONTEXT = multiprocessing.get_context("spawn")

# After a pipe EOF, how long the process may take to finish exiting before it is SIGKILLed.
REAP_TIMEOUT_S = 5.0

ChildState = Literal["starting", "ready", "dead"]


def exit_status(exitcode: int | None) -> str:
    """A child's exit code in words, for logs and errors ("killed by SIGSEGV", "exited with code 17")."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the OOM killer, or killed by an operator)" if exitcode == -signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    if exitcode == EXIT_INIT_FAILED:
        return "exited: initializer failed"
    return f"exited with code {exitcode}"


def _consume(fut: asyncio.Future[Any]) -> None:
    # A replacement's ready future may fail with nobody awaiting it; retrieve the exception so
    # asyncio does not log "exception was never retrieved" (the supervisor already logged it).
    if not fut.cancelled():
        fut.exception()


class ChildProcess:
    """One spawned child: its process, the parent's end of its pipe, its reader thread, and where it
    is in its life (`state`: starting -> ready -> dead; a dead child is replaced, never revived).

    `ready` resolves when it answered Ready (or fails with the reason it never will), `reaped` with
    its exit code once the process is joined. Its fields other than the futures belong to the
    Supervisor; owners read `slot`, `pid` and `state`.
    """

    def __init__(
        self, slot: int, process: BaseProcess, conn: Connection, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.slot = slot
        self.process = process
        self.pid: int | None = process.pid
        self.conn = conn
        self.state: ChildState = "starting"
        self.was_ready = False
        self.init_error: str | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        self.ready.add_done_callback(_consume)
        self.reaped: asyncio.Future[int | None] = loop.create_future()
        self.ready_timer: asyncio.TimerHandle | None = None
        self.thread: threading.Thread | None = None
        # Why the parent itself killed this child (a deaths reason), if it did.
        self.kill_reason: str | None = None
        self._loop = loop

    @classmethod
    def spawn(
        cls,
        slot: int,
        *,
        name: str,
        target: Callable[..., None],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop,
    ) -> ChildProcess:
        """Start `target(conn, *args)` in a spawned daemon process with a duplex pipe to it."""
        parent_conn, child_conn = MP_CONTEXT.Pipe(duplex=True)
        process = MP_CONTEXT.Process(
            target=target,
            args=(child_conn, *args),
            name=f"{name}-worker-{slot}",
            daemon=True,  # never outlive the server, even if the supervisor's shutdown is skipped
        )
        # The parent owns SIGINT/SIGTERM. Blocked signals stay blocked across fork+exec, so the child
        # cannot die of a Ctrl-C before its main sets SIG_IGN and unblocks them; here they stay
        # pending for these few milliseconds, not lost.
        blocked = {signal.SIGINT, signal.SIGTERM}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            process.start()
        except BaseException:
            parent_conn.close()
            child_conn.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        child_conn.close()  # else the parent holds the child's end open and never sees EOF
        return cls(slot, process, parent_conn, loop)

    def start_reader(
        self,
        *,
        name: str,
        on_message: Callable[[ChildProcess, object], None],
        on_undecodable: Callable[[ChildProcess, Exception], None],
        on_eof: Callable[[ChildProcess], None],
        on_reaped: Callable[[ChildProcess, int | None], None],
    ) -> None:
        """Start the reader thread; each callback runs on the event loop, in the order of events."""
        self.thread = threading.Thread(
            target=self._read,
            args=(on_message, on_undecodable, on_eof, on_reaped),
            name=f"{name}-worker-{self.slot}-reader",
            daemon=True,
        )
        self.thread.start()

    def send(self, message: object) -> None:
        """Send one message down the pipe; raises OSError when the child is gone."""
        self.conn.send(message)

    def kill(self, *, reason: str | None = None) -> None:
        """SIGKILL the child (its reader thread then reaps it); the first `reason` given is the one
        its death is counted under."""
        if reason is not None and self.kill_reason is None:
            self.kill_reason = reason
        try:
            self.process.kill()
        except (ValueError, AttributeError):
            pass  # already reaped and closed by its reader thread

    def join_at_exit(self) -> None:
        """Wait (bounded) for a killed child at interpreter exit, whatever its reader did already."""
        try:
            self.process.join(REAP_TIMEOUT_S)
        except (ValueError, AssertionError, AttributeError):
            pass  # already reaped and closed by its reader thread

    def _read(
        self,
        on_message: Callable[[ChildProcess, object], None],
        on_undecodable: Callable[[ChildProcess, Exception], None],
        on_eof: Callable[[ChildProcess], None],
        on_reaped: Callable[[ChildProcess, int | None], None],
    ) -> None:
        """Reader thread: every message to the loop, then EOF -> reap the process -> the loop."""
        conn = self.conn
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # noqa: BLE001 - a message that does not unpickle in the parent
                self._post(on_undecodable, self, exc)
                continue
            self._post(on_message, self, message)
        self._post(on_eof, self)
        process = self.process
        process.join(REAP_TIMEOUT_S)
        if process.exitcode is None:  # closed its pipe but did not exit: make sure it does
            process.kill()
            process.join()
        exitcode = process.exitcode
        process.close()
        conn.close()
        self._post(on_reaped, self, exitcode)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting for this child anymore


__all__ = ["MP_CONTEXT", "REAP_TIMEOUT_S", "ChildProcess", "ChildState", "exit_status"]
