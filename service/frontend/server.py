"""Build and run the server: grpc.aio with our two APIs, health and reflection, plus metrics HTTP.

Lifecycle (`run`):

1. Bind gRPC (settings.host:grpc_port) and the metrics HTTP server, start both, and log
   `listening grpc=HOST:PORT metrics=HOST:PORT` (the chosen ports when 0 was asked for). Health is
   NOT_SERVING and inference RPCs answer UNAVAILABLE, but probes and metadata work.
2. engine.load() in a thread (scan, verify, ONNX Runtime sessions, warm-up), engine.start(), then
   health SERVING for "", both services and every "model:<name>".
3. On SIGTERM/SIGINT: health NOT_SERVING at once, new calls UNAVAILABLE, accepted calls get up to
   grace_period_s to finish (`server.stop(grace)`), engine.stop(), exit 0. A second signal exits
   at once with status 1.

Gradient RPCs: with settings.worker_address set they are forwarded to a separate gradient tier
(service/frontend/forwarding.py) and `cnnserve.v1.Inference/gradients` mirrors that tier's health;
otherwise a local gradient pool runs here (workers > 0). `cnnserve worker`
(service/frontend/gradient_tier.py) is this server specialised to the gradient RPCs.

Exit status 1 with a clear log line when no model can be loaded or a port cannot be bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.engine.protocol import Engine, ModelSource
from service.frontend import reflection
from service.frontend.classify import ClassifyPath
from service.frontend.forwarding import ForwardedGradients, GradientTier
from service.frontend.gradients import LocalGradients
from service.frontend.health import HealthServicer
from service.frontend.inference import InferenceServicer
from service.frontend.interceptors import MalformedRequestInterceptor
from service.frontend.oip import GRPCInferenceServicer, OpenInference
from service.frontend.rest import RestApi, RestServer, bind_socket
from service.frontend.state import ServingState
from service.frontend.triton import add_triton_unimplemented_to_server
from service.observability import metrics
from service.observability.http import MetricsHTTPServer
from service.settings import Settings, bind_hint

from .._proto.cnnserve.v1 import inference_pb2, inference_pb2_grpc
from .._proto.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc

log = logging.getLogger("service.server")

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
OIP_SERVICE = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Health service name of the gradient RPCs (Explain, Dream, Stylize): SERVING only while at least
# one gradient worker is alive (the pool wakes the follower on every change; it also rechecks
# every GRADIENT_HEALTH_POLL_S for the drain).
GRADIENTS_SERVICE = f"{INFERENCE_SERVICE}/gradients"
GRADIENT_HEALTH_POLL_S = 0.5
T = TypeVar("T")


class StartupError(Exception):
    """The server cannot start (port in use, no model loadable); the message says why."""


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def grpc_options(settings: Settings) -> list[tuple[str, Any]]:
    """Channel arguments of the gRPC server (see grpc's include/grpc/impl/channel_arg_names.h)."""
    return [
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Server-initiated keepalive pings detect dead peers (e.g. a vanished NAT entry).
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout_s)),
        # Clients may ping (also between calls) as often as every keepalive_min_client_ping_s;
        # more often earns a GOAWAY "too_many_pings". service.client's defaults stay above it.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(settings.keepalive_min_client_ping_s)),
        ("grpc.http2.max_ping_strikes", 2),
        # Rotate connections so clients behind L4 load balancers spread onto new replicas.
        ("grpc.max_connection_age_ms", _ms(settings.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", _ms(settings.connection_age_grace_s)),
        # Never share a port with another process silently (Linux SO_REUSEPORT would).
        ("grpc.so_reuseport", 0),
    ]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _in_daemon_thread(fn: Callable[[], T], name: str) -> T:
    """Run a blocking call in a daemon thread: unlike the default executor, a SIGTERM during a long
    model load does not have to wait for it before the process can exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


class Server:
    """The gRPC server, its health/reflection services and the metrics endpoint, around an engine."""

    def __init__(
        self,
        settings: Settings,
        engine: ModelSource | None = None,
        pool: Any = None,
        *,
        share_port: bool = False,
        metrics_endpoint: bool = True,
        bind: str | None = None,
    ) -> None:
        """engine: the Engine (service/engine/protocol.py) to serve, default the ONNX Runtime one;
        the gradient tier passes a ModelSource. pool: a GradientPool-like object to use for the
        gradient RPCs instead of building one from the settings (tests); it is started by `load` and
        closed by `shutdown` all the same. Under `cnnserve serve --frontends N`
        (service/multiprocess.py): share_port lets sibling frontends bind the same gRPC port
        (SO_REUSEPORT; the supervisor holds the port against foreign processes), metrics_endpoint
        False leaves /metrics and /healthz to the supervisor, and bind replaces host:grpc_port (the
        gradient tier on a Unix socket)."""
        if engine is None:
            from service.engine.engine import ClassificationEngine  # onnxruntime: only where it serves

            engine = ClassificationEngine(settings)
        self.settings = settings
        self.engine: Any = engine  # load(), start() and stop() besides the protocol
        self.state = ServingState(engine, settings)
        # The classify path (made with the servicers) and the gradient RPCs' backend: this
        # process's pool (LocalGradients.pool, set once it starts) or the gradient tier's.
        self.classify: ClassifyPath | None = None
        self.local_gradients = LocalGradients(self.state)
        # Trailing metadata on every status this server answers (the gradient tier marks its own).
        self.trailing_metadata: tuple[tuple[str, str], ...] = ()
        self.share_port = share_port
        self.metrics_endpoint = metrics_endpoint
        self.bind = bind
        self._engine_task: asyncio.Task[None] | None = None
        self.health = HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.metrics_server: MetricsHTTPServer | None = None
        # The OIP REST binding (settings.http_port), made with the servicers where classification
        # is served; started once gRPC is bound.
        self.rest_api: RestApi | None = None
        self.rest_server: RestServer | None = None
        self.grpc_port = 0
        self.metrics_port = 0
        self.http_port = 0
        self._engine_started = False
        self.pool: Any = pool
        self._pool_task: asyncio.Task[None] | None = None
        self._pool_started = False  # this process's gradient pool is up (a reload may renew it)
        # The gradient tier the gradient RPCs go to (settings.worker_address); None: the local pool.
        self.tier: GradientTier | None = None
        self._warm: set[tuple[str, int]] = set()  # versions announced serving (_version_warm)
        self._reload_requested = asyncio.Event()  # SIGHUP (request_reload) or the poll interval
        self._reload_task: asyncio.Task[None] | None = None
        self._serving_announced = False  # serve_when=any: the overall status turned SERVING

    # --- readiness ------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.state.draining:
            return False, "shutting down"
        if not self.state.ready:
            return False, "loading models"
        return True, ""

    def _health_names(self) -> list[str]:
        models = sorted({m.name for m in self.engine.models()})
        return ["", INFERENCE_SERVICE, OIP_SERVICE, *(f"model:{name}" for name in models)]

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start gRPC and metrics HTTP; health NOT_SERVING until `load` finishes."""
        settings = self.settings
        options = grpc_options(settings)
        if self.share_port:  # the supervisor holds the port; sibling frontends share it on purpose
            options = [(k, 1 if k == "grpc.so_reuseport" else v) for k, v in options]
        server = grpc.aio.server(
            options=options,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            # A body that is not a valid message: INVALID_ARGUMENT naming the type (grpc.aio: UNKNOWN).
            # It also tells errors.checked_response the send limit of each call.
            interceptors=[
                MalformedRequestInterceptor(
                    settings.max_message_bytes, trailing_metadata=self.trailing_metadata
                )
            ],
        )
        services = self._add_servicers(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        # Reflection v1 and v1alpha (reflection.py), listing both and everything above.
        reflection.enable_server_reflection((*services, HEALTH_SERVICE), server)
        for name in ("", *services, GRADIENTS_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = self.bind or _address(settings.host, settings.grpc_port)
        try:
            self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise StartupError(f"cannot bind gRPC to {address}: {exc}; {bind_hint('grpc_port')}") from None
        if self.rest_api is not None and settings.http_port:
            try:
                sock = bind_socket(settings.host, settings.http_port, share_port=self.share_port)
            except OSError as exc:
                raise StartupError(
                    f"cannot bind HTTP/REST to {_address(settings.host, settings.http_port)}: {exc}; "
                    + bind_hint("http_port")
                ) from None
            self.rest_server = RestServer(self.rest_api, sock, settings)
            self.http_port = self.rest_server.port
        if self.metrics_endpoint:
            try:
                self.metrics_server = MetricsHTTPServer(
                    settings.host, settings.metrics_port, metrics.registry, self.readiness
                )
            except OSError as exc:
                if self.rest_server is not None:
                    await self.rest_server.stop()  # not started: closes its socket
                raise StartupError(
                    f"cannot bind metrics HTTP to {_address(settings.host, settings.metrics_port)}: {exc}; "
                    + bind_hint("metrics_port")
                ) from None
            self.metrics_port = self.metrics_server.port
        await server.start()
        self.grpc_server = server
        if self.rest_server is not None:
            await self.rest_server.start()
        http = _address(settings.host, self.http_port) if self.rest_server is not None else "off"
        if self.metrics_server is None:
            log.info("supervised process listening grpc=%s http=%s", address, http)
            return
        self.metrics_server.start()
        log.info(
            "listening grpc=%s metrics=%s http=%s",
            _address(settings.host, self.grpc_port),
            _address(settings.host, self.metrics_port),
            http,
        )

    def _add_servicers(self, server: grpc.aio.Server) -> tuple[str, ...]:
        """Register the API servicers; returns their service names (for reflection and health)."""
        gradients: LocalGradients | ForwardedGradients = self.local_gradients
        if self.settings.worker_address:
            try:
                self.tier = GradientTier(self.settings)
            except ValueError as exc:
                raise StartupError(str(exc)) from None
            self.tier.open()
            gradients = ForwardedGradients(self.state, self.tier)
        engine: Engine = self.engine
        self.classify = classify = ClassifyPath(engine, self.settings)
        inference = InferenceServicer(self.state, classify=classify, gradients=gradients)
        # The generated *_pb2_grpc modules carry no annotations.
        inference_pb2_grpc.add_InferenceServicer_to_server(inference, server)  # type: ignore[no-untyped-call]
        oip = OpenInference(self.state, classify)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            GRPCInferenceServicer(self.state, oip), server
        )
        self.rest_api = RestApi(self.state, oip, inference, self.settings)
        add_triton_unimplemented_to_server(server)  # Triton's RPCs we lack: UNIMPLEMENTED saying why
        return (INFERENCE_SERVICE, OIP_SERVICE)

    async def load(self) -> None:
        """Load and warm up the models, each version serving (`model:<name>` SERVING) as soon as
        it is warm; the overall status follows settings.serve_when. Then the gradient RPCs."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        warm: asyncio.Queue[Any] = asyncio.Queue()

        def on_planned(names: list[str]) -> None:
            loop.call_soon_threadsafe(warm.put_nowait, ("planned", names))

        def on_loaded(model: Any) -> None:
            loop.call_soon_threadsafe(warm.put_nowait, ("loaded", model))

        def load_engine() -> None:
            self.engine.load(on_loaded=on_loaded, on_planned=on_planned)

        loading = asyncio.ensure_future(_in_daemon_thread(load_engine, "cnnserve-load"))
        getter: asyncio.Future[Any] | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(warm.get())
                done, _ = await asyncio.wait({loading, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    kind, payload = getter.result()
                    getter = None
                    await self._on_load_event(kind, payload, started)
                    continue
                break  # loaded: the events it sent before finishing are already queued
            while not warm.empty():
                kind, payload = warm.get_nowait()
                await self._on_load_event(kind, payload, started)
            loading.result()
        except Exception as exc:
            raise StartupError(f"no model could be loaded from {self.settings.repository}: {exc}") from exc
        finally:
            if getter is not None:
                getter.cancel()
        await self.engine.start()
        self._engine_started = True
        for model in self.engine.models():  # an engine that announces none as it goes (a process's)
            if (model.name, model.version) not in self._warm:
                await self._version_warm(model, started)
        if self.state.draining:
            return
        for name in self._health_names():
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        models = ", ".join(f"{m.name}:{m.version} ({m.provider})" for m in self.engine.models())
        summary = getattr(self.engine, "startup_summary", lambda: "")()
        log.info(
            "ready in %.2fs: serving %s%s",
            time.perf_counter() - started,
            models,
            f"; {summary}" if summary else "",
        )
        if hasattr(self.engine, "wait_ready_change"):  # an engine process: it can go and come back
            self._engine_task = asyncio.create_task(self._follow_engine(), name="cnnserve-engine-health")
        if hasattr(self.engine, "reload"):
            self._reload_task = asyncio.create_task(self._watch_repository(), name="cnnserve-reload")
        if self.tier is not None:
            self._pool_task = asyncio.create_task(self._follow_worker_tier(), name="cnnserve-worker-tier")
        elif self.settings.workers > 0 or self.pool is not None:
            self._pool_task = asyncio.create_task(self._run_gradient_pool(), name="cnnserve-gradients")

    # --- hot reload --------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """SIGHUP: scan the repository once now (ClassificationEngine.reload)."""
        if not hasattr(self.engine, "reload"):
            log.warning("SIGHUP: this process does not reload its repository; ignored")
            return
        log.info("SIGHUP: scanning the repository")
        self._reload_requested.set()

    async def _watch_repository(self) -> None:
        """Reload on SIGHUP and every repository_poll_s (0: SIGHUP only), until shutdown; keep
        model:<name> health in step with what serves."""
        poll = self.settings.repository_poll_s
        while not self.state.draining:
            try:
                await asyncio.wait_for(self._reload_requested.wait(), timeout=poll or None)
            except TimeoutError:
                pass
            self._reload_requested.clear()
            if self.state.draining:
                return
            try:
                result = await self.engine.reload()
            except Exception:  # noqa: BLE001 - what serves goes on; the next scan tries again
                log.exception("repository reload failed")
                continue
            for model in result.added:
                await self._version_warm(model)
            self._warm -= {(m.name, m.version) for m in result.removed}
            served = {name for name, _ in self._warm}
            gone = sorted({m.name for m in result.removed} - served)
            await self._set_health([f"model:{name}" for name in gone], False)
            # A reload while the first gradient processes still start is caught up when they are
            # ready (_run_gradient_pool asks for one more scan).
            if self._pool_started and self.engine.awaiting_gradients:
                await self._renew_gradient_pool()

    async def _on_load_event(self, kind: str, payload: Any, started: float) -> None:
        if kind == "planned":  # registered NOT_SERVING until warm (a Check then says so, not NOT_FOUND)
            await self._set_health([f"model:{name}" for name in payload], False)
        else:
            await self._version_warm(payload, started)

    async def _version_warm(self, model: Any, started: float | None = None) -> None:
        """One version is loaded and warm (at start, or added by a reload): start it, zero its
        metrics, report model:<name> SERVING (and the overall status with serve_when=any). `started`:
        the start's clock, for the log line (a reload's engine logs its own)."""
        start_version = getattr(self.engine, "start_version", None)
        if start_version is not None:
            await start_version(model)
        # Every per-model counter at 0 before the first scrape of a ready server (metrics.py: why).
        answers_gradients = self.tier is not None or self.settings.workers > 0 or self.pool is not None
        if model.name not in {name for name, _ in self._warm}:
            metrics.init_classify_series(model.name)
        if answers_gradients:
            metrics.init_gradient_series(
                model.name, model.capabilities, runs_jobs=self.tier is None, version=model.version
            )
        self._warm.add((model.name, model.version))
        if self.state.draining:
            return
        await self._set_health([f"model:{model.name}"], True)
        if self.settings.serve_when == "any" and not self._serving_announced:
            self._serving_announced = True
            await self._set_health(["", INFERENCE_SERVICE, OIP_SERVICE], True)
        if started is not None:
            log.info(
                "serving %s:%d (%s) %.2fs after the start",
                model.name,
                model.version,
                model.provider,
                time.perf_counter() - started,
            )

    def _make_pool(self) -> Any:
        """The GradientPool for the model versions the engine loaded (same weights.pt)."""
        import functools
        import shutil
        import tempfile
        import weakref

        from service.worker import handlers, loading
        from service.worker.pool import GradientPool

        dirs = [path for m in self.engine.models() if (path := getattr(m, "path", None)) is not None]
        # The workers' parity verdicts, shared so that each version is tested once per pool, not once
        # per worker and again by every replacement (loading.py). Private (0700), gone with the pool.
        verdict_dir = tempfile.mkdtemp(prefix="cnnserve-parity-")
        config = loading.load_models_config(self.settings, dirs, verdict_dir=verdict_dir)
        stop_grace_s = self.settings.worker_stop_grace_s or max(1.0, min(10.0, self.settings.grace_period_s))
        pool = GradientPool(
            workers=self.settings.workers,
            initializer=functools.partial(loading.load_models, config),
            handler=handlers.handle,
            cost_budget=self.settings.max_task_cost,
            start_timeout_s=self.settings.worker_start_timeout_s,
            stop_grace_s=stop_grace_s,
            on_report=loading.LoadMetrics(),
        )
        weakref.finalize(pool, shutil.rmtree, verdict_dir, ignore_errors=True)
        return pool

    async def _run_gradient_pool(self) -> None:
        """Start the worker pool (the classification RPCs are already serving), then keep the
        gradients health status in step with pool.alive_workers until shutdown."""
        pool = self.pool if self.pool is not None else self._make_pool()
        self.pool = pool
        self.local_gradients.pool = pool
        try:
            started = time.perf_counter()
            await pool.start()
            log.info(
                "gradient workers ready in %.2fs: %d worker(s)",
                time.perf_counter() - started,
                pool.alive_workers,
            )
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - classification keeps serving; gradient RPCs answer UNAVAILABLE
            log.exception("the gradient workers failed to start; gradient RPCs are UNAVAILABLE")
            return
        self._pool_started = True
        if getattr(self.engine, "awaiting_gradients", False):
            self._reload_requested.set()  # versions a reload added meanwhile: renew the processes
        await self._follow_pool(pool, (GRADIENTS_SERVICE,))

    async def _renew_gradient_pool(self) -> None:
        """A reload added versions: gradient processes started with every version the engine now
        serves replace the running ones once ready (their parity self-tests included), then the
        added versions offer their gradient RPCs (engine.offer_gradients), and the old processes
        finish the jobs they hold (up to grace_period_s) and stop. Until then, and for good if the
        new processes fail to start, the added versions serve classification only. Both sets of
        processes run side by side meanwhile: the memory of the gradient workers, twice."""
        old = self.pool
        new = self._make_pool()
        started = time.perf_counter()
        try:
            await new.start()
        except asyncio.CancelledError:
            await new.close(grace_s=0)
            raise
        except Exception:  # noqa: BLE001 - the old processes and the classification path serve on
            log.exception(
                "repository reload: gradient workers for the new versions failed to start; "
                "those versions serve classification only"
            )
            return
        self.pool = self.local_gradients.pool = new
        for model in self.engine.offer_gradients():
            metrics.init_gradient_series(
                model.name, model.capabilities, runs_jobs=True, version=model.version
            )
        if self._pool_task is not None:
            self._pool_task.cancel()  # it follows the old processes' health
        self._pool_task = asyncio.create_task(
            self._follow_pool(new, (GRADIENTS_SERVICE,)), name="cnnserve-gradients"
        )
        log.info(
            "repository reload: gradient workers renewed in %.2fs: %d worker(s)",
            time.perf_counter() - started,
            new.alive_workers,
        )
        deadline = time.monotonic() + self.settings.grace_period_s
        try:
            while old.admitted_cost > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:  # a shutdown meanwhile still reaps the old processes
            await asyncio.shield(old.close(grace_s=max(0.0, deadline - time.monotonic())))

    async def _set_health(self, names: Iterable[str], serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in names:
            await self.health.set(name, status)

    async def _follow_pool(self, pool: Any, names: tuple[str, ...]) -> None:
        """Keep the health of `names` SERVING while pool.alive_workers > 0, until shutdown."""
        serving: bool | None = None
        while not self.state.draining:
            generation = pool.alive_generation
            alive = pool.alive_workers > 0
            if alive != serving:
                serving = alive
                await self._set_health(names, alive)
            # Woken by the pool the moment a worker dies or becomes ready; the timeout only bounds
            # how late a drain is noticed.
            await pool.wait_alive_change(generation, GRADIENT_HEALTH_POLL_S)

    async def _follow_engine(self) -> None:
        """Keep every health status but the gradients' in step with the engine process: NOT_SERVING
        while it is gone (calls fail UNAVAILABLE at once), SERVING again once its replacement is
        connected."""
        names = [name for name in self._health_names() if name != GRADIENTS_SERVICE]
        serving = True
        while not self.state.draining:
            await self.engine.wait_ready_change(GRADIENT_HEALTH_POLL_S)
            ready = bool(self.engine.ready)
            if ready == serving or self.state.draining:
                continue
            serving = ready
            if ready:
                log.info("the engine process is back: SERVING")
            else:
                log.warning("the engine process is gone: NOT_SERVING until its replacement is connected")
            await self._set_health(names, ready)

    async def _follow_worker_tier(self) -> None:
        """Mirror the gradient tier's gradients health (polled) on GRADIENTS_SERVICE until shutdown."""
        assert self.tier is not None
        serving: bool | None = None
        while not self.state.draining:
            ok, why = await self.tier.serving(timeout_s=max(1.0, 4 * GRADIENT_HEALTH_POLL_S))
            if ok != serving:
                if ok:
                    log.info("worker tier %s: gradients SERVING", self.tier.target)
                elif serving is None:
                    log.info("worker tier %s: gradients not serving yet (%s)", self.tier.target, why)
                else:
                    log.warning("worker tier %s: gradients not serving (%s)", self.tier.target, why)
                serving = ok
                await self._set_health((GRADIENTS_SERVICE,), ok)
            await asyncio.sleep(GRADIENT_HEALTH_POLL_S)

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING at once, refuse new calls, let accepted ones finish, stop the engine."""
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        self.state.draining = True
        # Marks every service NOT_SERVING and ignores later set() calls (a late load finishing).
        await self.health.enter_graceful_shutdown()
        log.info("shutting down: health NOT_SERVING, up to %.1fs for accepted calls to finish", grace)
        # Both protocols drain at once: calls in progress finish, new ones answer UNAVAILABLE.
        await asyncio.gather(
            *([self.grpc_server.stop(grace)] if self.grpc_server is not None else []),
            *([self.rest_server.stop()] if self.rest_server is not None else []),
        )
        if self._engine_task is not None:
            self._engine_task.cancel()
        if self._reload_task is not None:
            self._reload_task.cancel()
        if self._pool_task is not None:
            self._pool_task.cancel()
            try:
                await self._pool_task
            except BaseException:  # noqa: BLE001 - cancelled or failed: the pool is closed below either way
                pass
        if self.pool is not None:
            try:
                await self.pool.close(grace_s=0)
            except Exception:  # noqa: BLE001
                log.exception("closing the gradient workers failed")
        if self.tier is not None:
            await self.tier.close()  # after server.stop: forwarded calls had the grace period
        if self._engine_started:
            try:
                await self.engine.stop()
            except Exception:  # noqa: BLE001 - exit anyway, but say why it was not clean
                log.exception("stopping the engine failed")
        if self.classify is not None:
            self.classify.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("stopped")


async def run(
    settings: Settings,
    engine: ModelSource | None = None,
    *,
    server: Server | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT. Returns the process exit status.

    server: the Server to run (e.g. service.frontend.gradient_tier.GradientTierServer); default
    Server(settings, engine). on_ready: called once the models are loaded and health is SERVING
    (a supervised process tells its supervisor).
    """
    # See Settings.gil_switch_interval_ms: the model runner threads must get the GIL back quickly.
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("received %s: draining", signal.Signals(signum).name)
            stop.set()
        else:
            log.warning("received %s again: exiting now without draining", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    if server is None:
        server = Server(settings, engine)
    # SIGHUP rescans the repository (its default action would end the process).
    loop.add_signal_handler(signal.SIGHUP, server.request_reload)
    try:
        await server.start()
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    load = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failure = load.exception() if load.done() else None
    if failure is not None:
        stopping.cancel()
        if isinstance(failure, StartupError):
            # An operator's problem (empty repository, bad file): the message says it all.
            log.error("%s", failure)
            log.debug("startup failure details", exc_info=failure.__cause__)
        else:
            log.error("startup failed", exc_info=failure)
        await server.shutdown(grace_s=0)
        return 1
    if not load.done():
        log.info("stopping before the models finished loading")
        load.cancel()
    elif on_ready is not None:
        on_ready()
    await stopping
    await server.shutdown()
    return 0
