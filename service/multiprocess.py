"""`cnnserve serve --frontends N`: the serving path in processes, so it can use more than one core of
Python (issue 12). The supervisor (this process) starts, watches and replaces:

    supervisor ── holds the gRPC port (SO_REUSEPORT, a lock file against a second supervisor),
    │             serves /metrics (every process's metrics, added up) and /healthz
    ├─ frontend 0..N-1   grpc.aio on the shared port: parsing, caps, decode + preprocessing into
    │                    the engine's shared-memory rows, streams, OIP, health, reflection
    │                    (service/frontend/server.py with a RemoteEngine)
    ├─ engine            ONNX Runtime sessions and the dynamic batchers for every frontend, so a
    │                    batch merges requests from all of them and admission stays exact
    │                    (service/engine/process.py); Unix socket + shared memory
    └─ gradients         the gradient pool behind gRPC on a Unix socket (the gradient tier's
                         server); every frontend forwards Explain/Dream/Stylize to it (workers > 0
                         and no worker_address)

A frontend that dies is replaced (its calls fail UNAVAILABLE: the client's retry policy resends
them; the other frontends lose nothing; the engine gives back its places and rows). An engine that
dies fails every waiting call UNAVAILABLE at once, its frontends report NOT_SERVING, and a new
engine loads; they reconnect. SIGTERM drains the frontends within grace_period_s, then stops the
engine and the gradient process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from service.settings import Settings, bind_hint

log = logging.getLogger("service.server")

# How long the supervisor waits before it replaces a child that died (a child that dies before it
# was ever ready is not replaced: it is failing to start, see Multiprocess._watch).
RESTART_DELAY_S = 0.5
_CTX = mp.get_context("spawn")


# --- the children's entry points (spawned: module-level, settings as JSON) --------------------------


def _child_settings(settings_json: str, **update: Any) -> Settings:
    from service.observability.logs import configure_logging

    _follow_the_supervisor()
    settings = Settings.model_validate_json(settings_json).model_copy(update=update)
    configure_logging(settings)
    return settings


def _follow_the_supervisor() -> None:
    """Signals come from the supervisor alone: a child leaves the terminal's process group (a Ctrl-C
    would otherwise reach it directly and again through the supervisor, and a second signal means
    "exit without draining"), and it drains itself if the supervisor dies (SIGKILL, OOM), so no
    child outlives it."""
    os.setpgrp()
    supervisor = os.getppid()

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="cnnserve-supervisor-watch", daemon=True).start()


def engine_main(settings_json: str, socket_path: str, prefix: str) -> None:
    from service.engine.process import run_engine_process

    _child_settings(settings_json)
    run_engine_process(settings_json, socket_path, prefix)


def frontend_main(
    settings_json: str, socket_path: str, port: int, http_port: int, worker_address: str, ready: Any
) -> None:
    from service.engine.remote import RemoteEngine
    from service.frontend.server import Server, run

    settings = _child_settings(
        settings_json, grpc_port=port, http_port=http_port, worker_address=worker_address
    )
    server = Server(settings, RemoteEngine(Path(socket_path)), share_port=True, metrics_endpoint=False)
    sys.exit(asyncio.run(run(settings, server=server, on_ready=lambda: ready.send("ready"))))


def gradients_main(settings_json: str, socket_path: str, ready: Any) -> None:
    from service.frontend.gradient_tier import GradientTierServer
    from service.frontend.server import run
    from service.observability import metrics

    settings = _child_settings(settings_json, worker_address="")
    metrics.stop_counting_requests()  # the frontends count every call that reaches it
    server = GradientTierServer(settings, bind=f"unix:{socket_path}", metrics_endpoint=False)
    sys.exit(asyncio.run(run(settings, server=server, on_ready=lambda: ready.send("ready"))))


def _held_socket(host: str, port: int) -> socket.socket:
    """host:port bound with SO_REUSEPORT and not listening: the frontends bind it too and accept on
    it; while the supervisor holds it no foreign process can take it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held = socket.socket(family, socket.SOCK_STREAM)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((host, port))
    except OSError:
        held.close()
        raise
    return held


# --- the supervisor ----------------------------------------------------------------------------------


@dataclass
class _Child:
    kind: str
    index: int
    process: BaseProcess
    # The read end of the pipe on which it says "ready" (None for the engine: readiness is the
    # frontends'). A pipe per child, not a multiprocessing.Queue: no named semaphores in /dev/shm.
    pipe: Connection | None
    ready: bool = False

    @property
    def name(self) -> str:
        return self.kind if self.kind != "frontend" else f"frontend {self.index}"


class Multiprocess:
    """The supervisor (see the module docstring). `await run()` returns the exit status."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime = Path(tempfile.mkdtemp(prefix="cnnserve-"))
        self.engine_socket = self.runtime / "engine.sock"
        self.gradients_socket = self.runtime / "gradients.sock"
        self.prefix = f"cnnserve-{os.getpid()}"
        self.children: dict[tuple[str, int], _Child] = {}
        self._stop = asyncio.Event()
        self._replacing: set[asyncio.Task[None]] = set()
        self.port = 0
        self.http_port = 0  # 0: REST is off
        self._port_socket: socket.socket | None = None
        self._http_socket: socket.socket | None = None
        self._lock_file: Any = None
        self._stopping = False
        self._failed = False
        self._started = time.perf_counter()
        self._announced = False

    # --- lifecycle ------------------------------------------------------------------------------------

    async def run(self) -> int:
        from service.engine.slots import remove_blocks

        try:
            self._hold_port()
        except OSError as exc:
            log.error(
                "cannot bind gRPC to %s:%d: %s; %s",
                self.settings.host, self.settings.grpc_port, exc, bind_hint("grpc_port"),
            )  # fmt: skip
            return 1
        if self.settings.http_port:
            try:
                self._http_socket = _held_socket(self.settings.host, self.settings.http_port)
            except OSError as exc:
                log.error(
                    "cannot bind HTTP/REST to %s:%d: %s; %s",
                    self.settings.host, self.settings.http_port, exc, bind_hint("http_port"),
                )  # fmt: skip
                self._release_port()
                return 1
            self.http_port = self._http_socket.getsockname()[1]
        metrics = self._start_metrics()
        if metrics is None:
            return 1
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        # SIGHUP's default action would end the supervisor; the frontends learn the engine
        # process's models once (settings refuse repository_poll_s here): say so instead.
        loop.add_signal_handler(
            signal.SIGHUP, log.warning, "SIGHUP: repository reload needs --frontends 1; ignored"
        )
        self._spawn("engine", 0)
        if self._serves_gradients:
            self._spawn("gradients", 0)
        for index in range(self.settings.frontends):
            self._spawn("frontend", index)
        await self._stop.wait()
        for task in self._replacing:
            task.cancel()
        await self._stop_all()
        metrics.stop()
        remove_blocks(self.prefix)
        shutil.rmtree(self.runtime, ignore_errors=True)
        self._release_port()
        log.info("stopped")
        return 1 if self._failed else 0

    def _release_port(self) -> None:
        for held in (self._port_socket, self._http_socket):
            if held is not None:
                held.close()
        if self._lock_file is not None:
            Path(self._lock_file.name).unlink(missing_ok=True)
            self._lock_file.close()

    @property
    def _serves_gradients(self) -> bool:
        return self.settings.workers > 0 and not self.settings.worker_address

    def _hold_port(self) -> None:
        """Bind the gRPC port with SO_REUSEPORT and keep it: the frontends share it on purpose, a
        foreign process cannot take it, and a second supervisor is refused by the lock file."""
        held = _held_socket(self.settings.host, self.settings.grpc_port)
        self.port = held.getsockname()[1]
        lock = open(Path(tempfile.gettempdir()) / f"cnnserve-port-{self.port}.lock", "w")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            held.close()
            lock.close()
            raise OSError(f"port {self.port} is held by another cnnserve supervisor") from None
        self._port_socket, self._lock_file = held, lock

    def _start_metrics(self) -> Any:
        """/metrics adds up every process's metrics (client_python's multiprocess mode: the children
        inherit PROMETHEUS_MULTIPROC_DIR and write their values there); /healthz is our readiness."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from service.observability.http import MetricsHTTPServer

        directory = self.runtime / "metrics"
        directory.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
        try:
            server = MetricsHTTPServer(
                self.settings.host, self.settings.metrics_port, registry, self.readiness
            )
        except OSError as exc:
            log.error(
                "cannot bind metrics HTTP to %s:%d: %s; %s",
                self.settings.host, self.settings.metrics_port, exc, bind_hint("metrics_port"),
            )  # fmt: skip
            return None
        server.start()
        http = f"{self.settings.host}:{self.http_port}" if self.http_port else "off"
        log.info(
            "listening grpc=%s:%d metrics=%s:%d http=%s (supervisor of %d frontend processes)",
            self.settings.host, self.port, self.settings.host, server.port, http, self.settings.frontends,
        )  # fmt: skip
        return server

    def readiness(self) -> tuple[bool, str]:
        """Ready once every child reported ready; afterwards while a frontend is (a replaced one
        must not take the whole pod out of its Service while its sibling serves)."""
        if self._stopping:
            return False, "shutting down"
        waiting = [c.name for c in self.children.values() if not c.ready and c.kind != "engine"]
        if self._announced:
            serving = any(c.ready and c.kind == "frontend" for c in self.children.values())
            return serving, "" if serving else "no frontend process is ready"
        return not waiting, f"waiting for {', '.join(waiting)}" if waiting else ""

    # --- children -------------------------------------------------------------------------------------

    def _spawn(self, kind: str, index: int) -> None:
        """Start a child; the event loop hears its "ready" (its pipe) and its exit (its sentinel)."""
        settings_json = self.settings.model_dump_json()
        reader, writer = _CTX.Pipe(duplex=False)
        target: Callable[..., None]
        args: tuple[Any, ...]
        if kind == "engine":
            reader.close()
            target, args, pipe = engine_main, (settings_json, str(self.engine_socket), self.prefix), None
        elif kind == "gradients":
            target, args, pipe = gradients_main, (settings_json, str(self.gradients_socket), writer), reader
        else:
            address = (
                f"unix:{self.gradients_socket}" if self._serves_gradients else self.settings.worker_address
            )
            target, pipe = frontend_main, reader
            args = (settings_json, str(self.engine_socket), self.port, self.http_port, address, writer)
        process = _CTX.Process(target=target, args=args, name=f"cnnserve-{kind}-{index}", daemon=False)
        process.start()
        writer.close()  # the child holds the only write end: its exit is the pipe's EOF
        child = _Child(kind, index, process, pipe)
        self.children[(kind, index)] = child
        loop = asyncio.get_running_loop()
        if pipe is not None:
            loop.add_reader(pipe.fileno(), self._on_message, child)
        loop.add_reader(process.sentinel, self._on_exit, child)
        log.info("started %s (pid %d)", child.name, process.pid)

    def _on_message(self, child: _Child) -> None:
        assert child.pipe is not None
        try:
            child.pipe.recv()
        except (EOFError, OSError):  # it exited: _on_exit handles that
            asyncio.get_running_loop().remove_reader(child.pipe.fileno())
            child.pipe.close()
            return
        child.ready = True
        if not self._announced and self.readiness()[0]:
            self._announced = True
            log.info(
                "ready in %.2fs: %d frontend processes, one engine process%s",
                time.perf_counter() - self._started,
                self.settings.frontends,
                ", one gradient process" if self._serves_gradients else "",
            )

    def _on_exit(self, child: _Child) -> None:
        asyncio.get_running_loop().remove_reader(child.process.sentinel)
        if child.pipe is not None and not child.pipe.closed:
            while child.pipe.poll():  # a "ready" sent just before it died still counts
                self._on_message(child)
                if child.pipe.closed:
                    break
        if self._stopping:
            return
        task = asyncio.create_task(self._replace(child))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self, child: _Child) -> None:
        """Replace a child that died; give up (and stop) when one cannot start at all."""
        from prometheus_client import multiprocess

        from service.engine.slots import remove_blocks

        child.process.join()  # reaped (its sentinel said it is gone)
        code = child.process.exitcode
        multiprocess.mark_process_dead(child.process.pid)  # type: ignore[no-untyped-call]
        never_ready = not child.ready and (child.kind != "engine" or not self._announced)
        if never_ready:
            log.error("%s exited with status %s before it was ready: stopping", child.name, code)
            self._failed = True
            self._stop.set()
            return
        log.warning("%s (pid %s) exited with status %s: replacing it", child.name, child.process.pid, code)
        if child.kind == "engine":
            remove_blocks(self.prefix)  # what it left; the new engine makes new blocks
            with contextlib.suppress(FileNotFoundError):
                self.engine_socket.unlink()
        await asyncio.sleep(RESTART_DELAY_S)
        if self._stopping or self._stop.is_set():
            return
        self._spawn(child.kind, child.index)
        if child.kind == "engine":
            self.children[(child.kind, child.index)].ready = True  # readiness is the frontends'

    async def _stop_all(self) -> None:
        """SIGTERM the frontends (they drain within grace_period_s), then the engine and the
        gradient process; kill whatever is left after its time."""
        self._stopping = True
        grace = self.settings.grace_period_s
        for kinds, timeout in ((("frontend",), grace + 5), (("engine", "gradients"), grace + 15)):
            group = [c for c in self.children.values() if c.kind in kinds]
            for child in group:
                if child.process.is_alive():
                    os.kill(child.process.pid, signal.SIGTERM)  # type: ignore[arg-type]
            deadline = time.monotonic() + timeout
            for child in group:
                await asyncio.to_thread(child.process.join, max(0.0, deadline - time.monotonic()))
                if child.process.is_alive():
                    log.warning("%s did not stop in %.0f s: killed", child.name, timeout)
                    child.process.kill()
                    await asyncio.to_thread(child.process.join, 5)


def run_multiprocess(settings: Settings) -> int:
    """`cnnserve serve` with settings.frontends > 1: the supervisor until SIGTERM/SIGINT."""
    return asyncio.run(Multiprocess(settings).run())


__all__ = ["Multiprocess", "run_multiprocess"]
