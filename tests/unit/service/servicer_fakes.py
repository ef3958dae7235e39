"""A classification engine double for the servicer and server tests (no ONNX Runtime).

It honours the engine protocol (service/engine/protocol.py): `get` raises NotFound, `admit` hands
out input rows that the real classify path (service/frontend/classify.py) decodes or copies into,
`infer` computes them (the classify path applies the softmax), and the deadline is honoured like
the batcher does (DeadlineExceeded, never computed). Its "network" is
transparent: logits[k] = -(mean(x) - k)^2, so a tensor filled with 3.0 is class 3.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from export.preprocessing import DIGITS, Preprocessing
from service.errors import DeadlineExceeded, NotFound, ResourceExhausted, Unavailable


@dataclass(frozen=True)
class FakeModel:
    name: str
    version: int
    architecture: str = "lenet5"
    input_shape: tuple[int, int, int] = (1, 32, 32)
    input_dtype: np.dtype = field(default_factory=lambda: np.dtype("float32"))
    num_classes: int = 10
    labels: tuple[str, ...] = tuple(f"digit {i}" for i in range(10))
    preprocessing: Preprocessing = DIGITS
    trained: bool = True
    trained_on: str | None = "digits"
    parameters: int = 61706
    flops: int = 429_000
    provider: str = "CPUExecutionProvider"
    capabilities: dict[str, bool] = field(default_factory=lambda: {"classify": True, "explain": True})
    metadata: dict[str, Any] = field(
        default_factory=lambda: {"input": {"name": "input"}, "output": {"name": "logits"}}
    )
    serving: Any = None  # LoadedModel.serving: a fake engine reports the settings' values
    path: Any = None  # LoadedModel.path: no version directory


@dataclass(frozen=True)
class FakeTimings:
    decode_s: float
    preprocess_s: float
    queue_s: float
    inference_s: float


def fake_logits(batch: np.ndarray, num_classes: int) -> np.ndarray:
    means = batch.reshape(batch.shape[0], -1).astype(np.float64).mean(axis=1)
    k = np.arange(num_classes)
    return (-((means[:, None] - k[None, :]) ** 2)).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class FakeEngine:
    def __init__(self, models: list[FakeModel] | None = None) -> None:
        self._models = models if models is not None else [FakeModel("lenet5", 1), FakeModel("lenet5", 2)]
        self._ready = False
        self.fail_with: BaseException | None = None  # raised by every compute call
        self.delay_s = 0.0  # "inference" time per call
        self.load_delay_s = 0.0
        self.load_error: Exception | None = None
        self.computed_images = 0  # images that reached the "network"
        self.stopped = False
        self.started_calls = 0
        self.lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._ready

    def load(self, on_loaded: Any = None, on_planned: Any = None) -> None:
        """Loads everything before any model serves (the callbacks of ClassificationEngine.load
        are not used: Server.load announces every model once the engine has started)."""
        time.sleep(self.load_delay_s)
        if self.load_error is not None:
            raise self.load_error

    async def start(self) -> None:
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        self.stopped = True

    def models(self) -> list[FakeModel]:
        return sorted(self._models, key=lambda m: (m.name, m.version))

    def get(self, name: str, version: int | None = None) -> FakeModel:
        candidates = [m for m in self._models if m.name == name]
        if not candidates:
            raise NotFound(f"unknown model {name!r}", reason="not_found")
        if version is None:
            return max(candidates, key=lambda m: m.version)
        for m in candidates:
            if m.version == version:
                return m
        raise NotFound(f"model {name!r} has no version {version}", reason="not_found")

    async def _compute(self, model: FakeModel, batch: np.ndarray, deadline: float | None) -> np.ndarray:
        self.started_calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed in the queue", reason="deadline")
        await asyncio.sleep(self.delay_s)
        self.computed_images += batch.shape[0]
        return fake_logits(batch, model.num_classes)

    async def admit(self, model: FakeModel, n: int) -> FakeAdmission:
        if not self._ready:
            raise Unavailable("models are still loading", reason="unavailable")
        self.get(model.name, model.version)  # NotFound like the engine
        return FakeAdmission(np.empty((n, *model.input_shape), dtype=np.float32))

    async def infer(
        self,
        model: FakeModel,
        admission: FakeAdmission,
        deadline: float | None,
        outputs: tuple[str, ...] = ("logits",),
    ) -> tuple[np.ndarray, FakeTimings]:
        assert outputs == ("logits",), "the fake engine's models have logits only"
        # The engine's contract: the admitted float32 rows, filled by the frontend (its session casts).
        batch = admission.inputs
        assert batch.ndim == 4 and tuple(batch.shape[1:]) == model.input_shape
        logits = await self._compute(model, batch.astype(model.input_dtype), deadline)
        return logits, FakeTimings(0.0, 0.0, 0.0, self.delay_s)


class FakeAdmission:
    def __init__(self, inputs: np.ndarray) -> None:
        self.inputs = inputs

    def release(self) -> None:
        pass


def queue_full() -> ResourceExhausted:
    return ResourceExhausted("queue full: 4 images waiting for lenet5", reason="queue_full")


class FakePoolLifecycle:
    """The part of GradientPool the server drives (start, close, liveness), for the pool doubles of
    the servicer tests; each double adds its own submit. `alive` workers while started and open."""

    alive_generation = 0

    def __init__(self, alive: int = 1) -> None:
        self.alive = alive
        self.started = False
        self.closed = False

    @property
    def alive_workers(self) -> int:
        return self.alive if self.started and not self.closed else 0

    async def wait_alive_change(self, seen: int, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)

    async def start(self) -> None:
        self.started = True

    async def close(self, grace_s: float) -> None:
        self.closed = True


class Harness:
    """The real service.frontend.server.Server around a FakeEngine, on 127.0.0.1 with ephemeral ports, its
    event loop in a background thread; tests talk to it over a real channel."""

    def __init__(
        self, engine: FakeEngine | None = None, *, load: bool = True, pool: Any = None, **overrides: Any
    ) -> None:
        import grpc

        from service.frontend.server import Server
        from service.settings import Settings

        self.engine = engine or FakeEngine()
        settings = {
            "host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_port": 0,
            "http_port": 0,  # REST off unless a test asks for it: one fixed default port for all
            "grace_period_s": 5.0,
            # No real PyTorch workers in servicer tests: pass `pool=FakePool()` for the gradient RPCs.
            "workers": 0,
            **overrides,
        }
        self.settings = Settings(**settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="harness-loop", daemon=True)
        self._thread.start()
        self.server = Server(self.settings, self.engine, pool=pool)
        self.run(self.server.start())
        if load:
            self.run(self.server.load())
        self.address = f"127.0.0.1:{self.server.grpc_port}"
        self.channel = grpc.insecure_channel(self.address)
        self._closed = False

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Any:
        """Schedule without waiting; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.channel.close()
        if not self.server.state.draining:
            self.run(self.server.shutdown(grace_s=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def counter(name: str, **labels: str) -> float:
    """Current value of a sample in the service's Prometheus registry (0 when absent)."""
    from service.observability.metrics import registry

    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
