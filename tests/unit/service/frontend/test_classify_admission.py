"""The classify path has the engine admit a request into its model's batcher before any decoding or
validation, so an overloaded model refuses at once (RESOURCE_EXHAUSTED) without spending CPU on the
request, and a request that fails later gives its place back."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from linear_repo import png, random_image, run, settings_for

from service.engine.engine import ClassificationEngine
from service.errors import InvalidArgument, ResourceExhausted
from service.frontend.classify import ClassifyPath
from service.observability import metrics


def decoded(model: str) -> float:
    return (
        metrics.registry.get_sample_value("cnnserve_decode_duration_seconds_count", {"model": model}) or 0.0
    )


async def rgb_with_room_for_two(repo: dict[str, Any]) -> tuple[ClassificationEngine, ClassifyPath, Any, Any]:
    """The rgb model served with capacity 2 (a batch of 1 + a queue of 1): engine, classify path,
    model and its batcher."""
    engine = ClassificationEngine(
        settings_for(repo["root"], models="rgb", max_batch_size=1, max_queue_size=1)
    )
    engine.load()
    path = ClassifyPath(engine, engine._settings)
    await engine.start()
    model = engine.get("rgb")
    return engine, path, model, engine._served[(model.name, model.version)].batcher


def test_a_full_model_refuses_before_decoding_or_validating(repo: dict[str, Any]) -> None:
    async def main() -> None:
        engine, path, model, batcher = await rgb_with_room_for_two(repo)
        assert batcher.capacity == 2
        held = batcher.admit(2)  # what two requests in flight would hold
        decodes = decoded("rgb")
        with pytest.raises(ResourceExhausted, match="overloaded"):
            await path.classify_images(model, [b"not an image"], None)
        with pytest.raises(ResourceExhausted, match="overloaded"):
            await path.infer(model, np.full((1, 3, 8, 8), np.nan, np.float32), None)
        assert decoded("rgb") == decodes  # refused before any decoding
        held.release()
        # With room, the same requests are looked at, refused for what they are, and leave no trace.
        with pytest.raises(InvalidArgument, match="unsupported image format"):
            await path.classify_images(model, [b"not an image"], None)
        with pytest.raises(InvalidArgument, match="NaN or infinite"):
            await path.infer(model, np.full((1, 3, 8, 8), np.nan, np.float32), None)
        assert batcher.admitted_images == 0
        probs, _ = await path.classify_images(model, [png(random_image(0)), png(random_image(1))], None)
        assert probs.shape == (2, 4)
        assert batcher.admitted_images == 0
        await engine.stop()

    run(main)


def test_a_cancelled_request_gives_its_place_back(repo: dict[str, Any]) -> None:
    async def main() -> None:
        engine, path, model, batcher = await rgb_with_room_for_two(repo)
        big = png(random_image(0, size=(2000, 2000)))  # decoding takes a while
        task = asyncio.create_task(path.classify_images(model, [big, big], None))
        while batcher.admitted_images == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert batcher.admitted_images == 0
        await engine.stop()

    run(main)
