"""The engine process: one ClassificationEngine (ONNX Runtime sessions and dynamic batchers) serving
every frontend process of the machine over Unix sockets (issue 12's process split), so a batch still
merges requests from every frontend and admission stays exact across them.

What crosses (service/engine/wire.py): control messages on the socket; the images in the rows of
one shared-memory block per model version (service/engine/slots.py, rows = the version's admission
capacity, so an admitted request always finds its rows). Per request:

    admit(n)   the batcher's place (exact: refused at once when full) and n rows of the block
    infer      the rows run where they are when they are one run (a batch of one request then
               reaches ONNX Runtime as a view of the shared memory: no copy), else gathered; the
               logits go back in the reply; the rows are free again. A cancelled request's rows are
               free at once, while its batch may still be computing: a new request writing them can
               only spoil the output of the abandoned one, which nobody reads (a batch of several
               requests is concatenated, i.e. copied, before it runs)
    release    an admission that will not be inferred (the frontend failed to decode, say)
    cancel     the caller went away: the request leaves the batcher, its rows are free again

A frontend connection that closes (the frontend exited or was killed) gives back everything it held:
its places, its rows, its queued requests. The engine process unlinks its blocks when it stops; a
killed one leaves them to the supervisor (slots.remove_blocks with the engine's prefix).

    run_engine_process(settings_json, socket_path, prefix)   # the spawned process's target
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.catalog import LoadedModel, input_name
from service.engine import wire
from service.engine.batcher import Admission
from service.engine.engine import ClassificationEngine
from service.engine.protocol import LOGITS, OUTPUTS
from service.engine.slots import RowAllocator, SlotBlock, SlotLayout, is_contiguous
from service.errors import InvalidArgument
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class _Version:
    """One model version as the engine process serves it: its block and who holds which rows."""

    model: LoadedModel
    block: SlotBlock
    rows: RowAllocator


@dataclass
class _Held:
    version: _Version
    place: Admission
    rows: tuple[int, ...]


@dataclass(eq=False)
class _Connection:
    """One frontend: what it holds, so its death gives it all back."""

    writer: asyncio.StreamWriter
    held: dict[int, _Held] = field(default_factory=dict)
    running: dict[int, asyncio.Task[None]] = field(default_factory=dict)

    def send(self, message: dict[str, Any], payload: bytes = b"") -> None:
        if not self.writer.is_closing():
            self.writer.write(wire.encode(message, payload))


class EngineServer:
    """The engine process's server (see the module docstring). `await start(path)` after the
    engine's load() and start(); `await stop()` drains."""

    def __init__(self, engine: ClassificationEngine, *, prefix: str) -> None:
        self._engine = engine
        self._prefix = prefix
        self._versions: dict[tuple[str, int], _Version] = {}
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_Connection] = set()

    async def start(self, path: Path) -> None:
        for model in self._engine.models():
            layout = SlotLayout(self._engine.capacity(model), tuple(model.input_shape), model.num_classes)
            block = SlotBlock.create(layout, prefix=self._prefix)
            self._versions[(model.name, model.version)] = _Version(model, block, RowAllocator(layout.rows))
        self._server = await asyncio.start_unix_server(self._serve, path=str(path))
        path.chmod(0o600)  # our frontends only: they run as this user

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.writer.close()
        await self._engine.stop()
        for version in self._versions.values():
            version.block.close()
            version.block.unlink()
        self._versions.clear()

    # --- one frontend -------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(writer)
        self._connections.add(connection)
        try:
            while True:
                message, _ = await wire.receive(reader)
                self._dispatch(connection, message)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the frontend is gone (or spoke nonsense): give back what it held
        except Exception:  # noqa: BLE001 - one bad frontend must not take the engine down
            log.exception("engine connection failed")
        finally:
            self._connections.discard(connection)
            for task in connection.running.values():
                task.cancel()
            for request_id in list(connection.held):
                self._release(connection, request_id)
            writer.close()

    def _dispatch(self, connection: _Connection, message: dict[str, Any]) -> None:
        op, request_id = message.get("op"), int(message.get("id", 0))
        if op == "hello":
            connection.send({"op": "models", "models": self._describe(), "ready": self._engine.ready})
        elif op == "admit":
            try:
                connection.send(
                    {"op": "admitted", "id": request_id, "rows": self._admit(connection, message)}
                )
            except Exception as exc:  # noqa: BLE001 - the error goes back with its status
                connection.send(wire.error_reply(request_id, exc))
        elif op == "infer":
            outputs = tuple(str(name) for name in message.get("outputs", (LOGITS,)))
            task = asyncio.create_task(self._infer(connection, request_id, message.get("deadline"), outputs))
            connection.running[request_id] = task
            task.add_done_callback(lambda _: connection.running.pop(request_id, None))
        elif op == "release":
            self._release(connection, request_id)
        elif op == "cancel":
            running = connection.running.get(request_id)
            if running is not None:
                running.cancel()
            else:
                self._release(connection, request_id)
        else:
            raise ConnectionError(f"unknown op {op!r}")

    def _describe(self) -> list[dict[str, Any]]:
        return [
            {
                "metadata": version.model.metadata,
                "provider": version.model.provider,
                "path": str(version.model.path) if version.model.path is not None else None,
                "block": version.block.name,
                "rows": version.block.layout.rows,
                "input": input_name(version.model),
                # The model's config.yaml overrides and what it is served with (GetModel shows them).
                "config": version.model.config.model_dump(mode="json", exclude_none=True),
                "serving": version.model.serving.as_dict() if version.model.serving else None,
            }
            for version in self._versions.values()
        ]

    def _admit(self, connection: _Connection, message: dict[str, Any]) -> list[int]:
        model = self._engine.get(str(message["model"]), int(message["version"]))
        version = self._versions[(model.name, model.version)]
        n = int(message["n"])
        place = self._engine.reserve(model, n)  # exact: ResourceExhausted at once when full
        rows = version.rows.allocate(n, connection)  # always fits: rows = the batcher's capacity
        connection.held[int(message["id"])] = _Held(version, place, rows)
        return list(rows)

    async def _infer(
        self, connection: _Connection, request_id: int, deadline: float | None, outputs: tuple[str, ...]
    ) -> None:
        held = connection.held.get(request_id)
        try:
            if held is None:
                raise InvalidArgument(f"infer of request {request_id}, which holds no admission")
            if not set(outputs) <= set(OUTPUTS):
                raise InvalidArgument(f"infer of outputs {list(outputs)}; there are {list(OUTPUTS)}")
            x = _rows(held.version.block, held.rows)
            logits, timings = await self._engine.run(held.version.model, x, deadline, held.place, outputs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the error goes back with its status
            connection.send(wire.error_reply(request_id, exc))
        else:
            reply = {"op": "result", "id": request_id, "queue_s": timings.queue_s,
                     "inference_s": timings.inference_s, "shape": list(logits.shape)}  # fmt: skip
            connection.send(reply, logits.astype("<f4", copy=False).tobytes())
        finally:
            self._release(connection, request_id)

    def _release(self, connection: _Connection, request_id: int) -> None:
        held = connection.held.pop(request_id, None)
        if held is not None:
            held.place.release()  # a no-op once the batcher took it over
            held.version.rows.release(held.rows)


def _rows(block: SlotBlock, rows: tuple[int, ...]) -> Any:
    """The request's rows of `block`: a view when they are one run, else a gathered copy."""
    if is_contiguous(rows):
        return block.inputs[rows[0] : rows[0] + len(rows)]
    return block.inputs[list(rows)]


def run_engine_process(settings_json: str, socket_path: str, prefix: str) -> None:
    """The engine process: load, serve the socket until SIGTERM, drain, unlink the blocks."""
    settings = Settings.model_validate(json.loads(settings_json))

    async def main() -> None:
        engine = ClassificationEngine(settings)
        await asyncio.to_thread(engine.load)
        await engine.start()
        server = EngineServer(engine, prefix=prefix)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await server.start(Path(socket_path))
        log.info("engine process serving %s", socket_path)
        await stop.wait()
        await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


__all__ = ["EngineServer", "run_engine_process"]
