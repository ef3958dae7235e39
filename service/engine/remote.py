"""The engine process as a frontend sees it: `RemoteEngine`, the Engine of service/engine/protocol.py
over the engine process's socket (service/engine/process.py, service/engine/wire.py), with the
input rows in the engine's shared-memory blocks (service/engine/slots.py). Imports neither torch
nor onnxruntime: it is what a frontend process holds instead of an engine.

Failure is loud and immediate: when the engine process goes away (killed, crashed, stopped), every
call waiting on it fails UNAVAILABLE at once (none waits for its deadline), and every later one
until a new engine is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog import Catalog, LoadedModel, loaded_model
from service.engine import wire
from service.engine.protocol import LOGITS
from service.engine.slots import SlotBlock, SlotLayout
from service.errors import Unavailable
from service.model_config import ModelConfig, ServingConfig

GONE_MESSAGE = "the engine process is not available (it is restarting); retry"


@dataclass(frozen=True)
class RemoteTimings:
    queue_s: float
    inference_s: float


class RemoteAdmission:
    """A place and rows the engine process holds for this frontend until infer() or release()."""

    def __init__(self, engine: RemoteEngine, request_id: int, inputs: list[np.ndarray]) -> None:
        self._engine = engine
        self.request_id = request_id
        self.inputs = inputs
        self._open = True

    def taken(self) -> bool:
        """Mark it handed to infer(); False if it was already."""
        was_open, self._open = self._open, False
        return was_open

    def release(self) -> None:
        if self.taken():
            # An engine that is gone holds nothing of ours any more: nothing to give back.
            with contextlib.suppress(Unavailable):
                self._engine._send({"op": "release", "id": self.request_id})


class RemoteEngine:
    """See the module docstring. `await connect()` before use, `await close()` at the end; or, as
    a server's engine, load() (nothing to load here), `await start()` (connect, then reconnect
    whenever the engine process is replaced) and `await stop()`."""

    def __init__(self, socket_path: Path, *, connect_timeout_s: float = 600.0) -> None:
        self._path = socket_path
        self._connect_timeout_s = connect_timeout_s
        self._keeper: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._listener: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}
        self._ids = itertools.count(1)
        self._catalog = Catalog()
        self._blocks: dict[tuple[str, int], SlotBlock] = {}
        self._engine_ready = False

    # --- connection --------------------------------------------------------------------------------

    async def connect(self, timeout_s: float = 60.0) -> None:
        """Connect (waiting up to timeout_s for the engine's socket), learn its models, attach
        their blocks."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(str(self._path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() >= deadline:
                    raise Unavailable(f"no engine process at {self._path}", reason="unavailable") from None
                await asyncio.sleep(0.05)
        self._writer.write(wire.encode({"op": "hello"}))
        hello, _ = await wire.receive(self._reader)
        models = []
        for entry in hello["models"]:
            path = Path(entry["path"]) if entry.get("path") else None
            model = loaded_model(
                entry["metadata"],
                provider=entry["provider"],
                path=path,
                config=ModelConfig.model_validate(entry.get("config") or {}),
                serving=ServingConfig.from_dict(entry["serving"]) if entry.get("serving") else None,
            )
            layout = SlotLayout(int(entry["rows"]), tuple(model.input_shape), model.num_classes)
            self._blocks[(model.name, model.version)] = SlotBlock.attach(entry["block"], layout)
            models.append(model)
        self._catalog = Catalog(models)
        self._engine_ready = bool(hello.get("ready"))
        self._listener = asyncio.create_task(self._listen(), name="cnnserve-engine-replies")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._listener is not None and not self._listener.done():
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        self._fail_pending()
        for block in self._blocks.values():
            block.close()
        self._blocks.clear()

    @property
    def ready(self) -> bool:
        return self._engine_ready and self._listener is not None and not self._listener.done()

    @property
    def why_not_ready(self) -> str | None:
        """What a call refused while not ready is told (ServingState.check_ready)."""
        return None if self.ready or self._keeper is None else GONE_MESSAGE

    # --- as a server's engine ------------------------------------------------------------------------

    def load(self, on_loaded: Any = None, on_planned: Any = None) -> None:
        """Nothing to load: the engine process loads the models (Server.load runs this first; the
        models are known, and announced, once start() has connected)."""

    async def start(self) -> None:
        """Connect (waiting for the engine process to load), then keep connected: when the engine
        process goes, reconnect to its replacement."""
        self._changed = asyncio.Event()
        await self.connect(self._connect_timeout_s)
        self._keeper = asyncio.create_task(self._keep_connected(), name="cnnserve-engine-keeper")

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        await self.close()

    async def wait_ready_change(self, timeout_s: float) -> None:
        """Return when `ready` may have changed, or after timeout_s."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        self._changed.clear()

    async def _keep_connected(self) -> None:
        while True:
            assert self._listener is not None
            await asyncio.wait({self._listener})
            self._changed.set()
            await self.close()
            while True:
                try:
                    await self.connect(self._connect_timeout_s)
                    break
                except (Unavailable, OSError, asyncio.IncompleteReadError):
                    await asyncio.sleep(0.2)
            self._changed.set()

    # --- the Engine protocol -------------------------------------------------------------------------

    def models(self) -> list[LoadedModel]:
        return self._catalog.models()

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        return self._catalog.get(name, version)

    async def admit(self, model: LoadedModel, n: int) -> RemoteAdmission:
        request_id = next(self._ids)
        message = {"op": "admit", "id": request_id, "model": model.name, "version": model.version, "n": n}
        reply, _ = await self._call(request_id, message)
        block = self._blocks[(model.name, model.version)]
        return RemoteAdmission(self, request_id, [block.inputs[row] for row in reply["rows"]])

    async def infer(
        self,
        model: LoadedModel,
        admission: object,
        deadline: float | None,
        outputs: tuple[str, ...] = (LOGITS,),
    ) -> tuple[np.ndarray, RemoteTimings]:
        if not isinstance(admission, RemoteAdmission) or not admission.taken():
            raise TypeError("infer() needs an open admission from this engine's admit()")
        request_id = admission.request_id
        message: dict[str, Any] = {"op": "infer", "id": request_id, "deadline": deadline}
        if outputs != (LOGITS,):
            message["outputs"] = list(outputs)
        try:
            reply, payload = await self._call(request_id, message)
        except asyncio.CancelledError:
            with contextlib.suppress(Unavailable):
                self._send({"op": "cancel", "id": request_id})
            raise
        logits = np.frombuffer(payload, dtype="<f4").reshape(reply["shape"])
        return logits, RemoteTimings(float(reply["queue_s"]), float(reply["inference_s"]))

    # --- the socket -----------------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is None or self._writer.is_closing() or not self.ready:
            raise Unavailable(GONE_MESSAGE, reason="unavailable")
        self._writer.write(wire.encode(message))

    async def _call(self, request_id: int, message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        future: asyncio.Future[tuple[dict[str, Any], bytes]] = asyncio.get_running_loop().create_future()
        self._send(message)
        self._pending[request_id] = future
        try:
            reply, payload = await future
        finally:
            self._pending.pop(request_id, None)
        if reply.get("op") == "error":
            raise wire.error_from(reply)
        return reply, payload

    async def _listen(self) -> None:
        assert self._reader is not None
        try:
            while True:
                reply, payload = await wire.receive(self._reader)
                future = self._pending.get(int(reply.get("id", 0)))
                if future is not None and not future.done():
                    future.set_result((reply, payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the engine process is gone
        finally:
            self._engine_ready = False
            self._fail_pending()

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unavailable(GONE_MESSAGE, reason="unavailable"))
        self._pending.clear()


__all__ = ["GONE_MESSAGE", "RemoteAdmission", "RemoteEngine"]
