"""The engine process's wire: what a frontend and the engine process say to each other over one
Unix stream socket per frontend. Control only: the images travel in shared-memory rows
(service/engine/slots.py), never in these messages.

A message is a 8-byte header (JSON length, payload length, little-endian uint32) then a JSON object
then an optional raw payload (a result's float32 logits). Requests carry an `id` the reply repeats:

    frontend -> engine                              engine -> frontend
    {"op": "hello"}                                 {"op": "models", "models": [...], "ready": true}
    {"op": "admit", "id", "model", "version", "n"}  {"op": "admitted", "id", "rows": [...]} or error
    {"op": "infer", "id", "deadline"[, "outputs"]}  {"op": "result", "id", "queue_s", "inference_s",
                                                     "shape": [n, K]} + logits, or error
      ("outputs": ["logits", "features"] in any order; absent: logits; the reply's shape and payload
      hold the named outputs side by side, service/engine/protocol.py select_outputs)
    {"op": "release", "id"}   (admitted, not inferred: the place and rows back; no reply)
    {"op": "cancel", "id"}    (the caller went away: its request leaves the batcher; no reply)
                                                    {"op": "error", "id", "code", "message", "reason"}

Deadlines are absolute time.monotonic() values: CLOCK_MONOTONIC is one clock for every process of
the machine (Linux), so the engine honours the caller's own deadline.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import grpc

from service import errors
from service.errors import ServiceError

HEADER = struct.Struct("<II")
# A message's JSON is a few hundred bytes; this bounds what a confused peer can make us allocate.
MAX_JSON_BYTES = 16 * 1024 * 1024


def encode(message: dict[str, Any], payload: bytes = b"") -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body), len(payload)) + body + payload


async def receive(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    """The next message; asyncio.IncompleteReadError at the end of the stream."""
    json_bytes, payload_bytes = HEADER.unpack(await reader.readexactly(HEADER.size))
    if json_bytes > MAX_JSON_BYTES:
        raise ConnectionError(f"a {json_bytes}-byte message header: not a cnnserve engine peer")
    message = json.loads(await reader.readexactly(json_bytes))
    payload = await reader.readexactly(payload_bytes) if payload_bytes else b""
    if not isinstance(message, dict):
        raise ConnectionError("a message that is not a JSON object: not a cnnserve engine peer")
    return message, payload


def error_reply(request_id: int, exc: BaseException) -> dict[str, Any]:
    """The error message for a failure, with the status the frontend answers (client-safe message)."""
    code, message, reason = errors.status_of(exc)
    return {"op": "error", "id": request_id, "code": code.name, "message": message, "reason": reason}


def _error_classes() -> dict[str, type[ServiceError]]:
    found: dict[str, type[ServiceError]] = {}
    pending: list[type[ServiceError]] = [ServiceError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code.name, cls)
        pending.extend(cls.__subclasses__())
    return found


_BY_CODE = _error_classes()


def error_from(message: dict[str, Any]) -> ServiceError:
    """The ServiceError an error message stands for (its code, message and reason kept)."""
    cls = _BY_CODE.get(str(message.get("code")), ServiceError)
    error = cls(str(message.get("message", "")), reason=message.get("reason"))
    if cls is ServiceError:  # a code without a class of its own: keep it all the same
        error.code = getattr(grpc.StatusCode, str(message.get("code")), grpc.StatusCode.INTERNAL)
    return error


__all__ = ["encode", "error_from", "error_reply", "receive"]
