"""The classify path (service/frontend/classify.py) over the real ClassificationEngine and a small
model repository (linear_repo): decoding, order, tensors, fp16, shared batches, deadlines, softmax,
the inline decode and the preprocessing threads."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import numpy as np
import pytest
from linear_repo import GRAY8, RGB8, expected_probs, png, random_image, run, settings_for
from PIL import Image

from service.engine.engine import ClassificationEngine
from service.errors import DeadlineExceeded, InvalidArgument, Unavailable
from service.frontend import classify as classify_mod
from service.frontend.classify import ClassifyPath
from service.observability import metrics


def classify_path(engine: ClassificationEngine) -> ClassifyPath:
    return ClassifyPath(engine, engine._settings)


def count_pool_calls(path: ClassifyPath, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of jobs of each trip to the preprocessing pool, from now on."""
    pool_calls: list[int] = []
    on_pool = path._on_pool

    async def counted(jobs: Any, deadline: float | None) -> Any:
        jobs = list(jobs)
        pool_calls.append(len(jobs))
        return await on_pool(jobs, deadline)

    monkeypatch.setattr(path, "_on_pool", counted)
    return pool_calls


# --- requests ------------------------------------------------------------------------------------


def test_classify_images_matches_numpy_and_keeps_order(repo: dict[str, Any]) -> None:
    w, b = repo["weights"][("rgb", 2)]
    arrays = [random_image(i, (12 + i, 10)) for i in range(7)]  # 7 > max_batch_size 4: two batches

    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="rgb"))
        path = classify_path(engine)
        await asyncio.to_thread(engine.load)
        assert not engine.ready
        await engine.start()
        assert engine.ready
        probs, timings = await path.classify_images(engine.get("rgb"), [png(a) for a in arrays], None)
        assert probs.dtype == np.float32 and probs.shape == (7, 4)
        np.testing.assert_allclose(probs, expected_probs(arrays, RGB8, w, b), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        assert timings.decode_s > 0 and timings.preprocess_s > 0 and timings.inference_s > 0
        assert timings.queue_s >= 0
        await engine.stop()
        assert not engine.ready
        with pytest.raises(Unavailable):
            await path.classify_images(engine.get("rgb"), [png(arrays[0])], None)

    run(main)


def test_one_bad_image_names_its_index(repo: dict[str, Any]) -> None:
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")

    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="rgb"))
        path = classify_path(engine)
        engine.load()
        await engine.start()
        model = engine.get("rgb")
        with pytest.raises(InvalidArgument) as info:
            await path.classify_images(model, [png(random_image(0)), gif.getvalue(), b""], None)
        assert info.value.message.startswith(
            ("image 1: unsupported image format GIF", "image 2: empty image")
        )
        with pytest.raises(InvalidArgument) as info:
            await path.classify_images(model, [gif.getvalue()], None)
        assert info.value.message == "unsupported image format GIF; send JPEG, PNG or WebP"
        with pytest.raises(InvalidArgument, match="max_images_per_request"):
            await path.classify_images(model, [b"x"] * 257, None)
        await engine.stop()

    run(main)


def test_grayscale_model_and_tensor_paths(repo: dict[str, Any]) -> None:
    w, b = repo["weights"][("gray", 1)]

    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="gray"))
        path = classify_path(engine)
        engine.load()
        await engine.start()
        model = engine.get("gray")
        color = random_image(5)
        probs, _ = await path.classify_images(model, [png(color)], None)
        np.testing.assert_allclose(probs, expected_probs([color], GRAY8, w, b), rtol=1e-4, atol=1e-6)
        x = np.random.default_rng(9).standard_normal((3, 1, 8, 8)).astype(np.float32)
        logits, timings = await path.infer(model, x, None)
        want = x.reshape(3, -1).astype(np.float64) @ w + b
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
        assert timings.decode_s == 0 and timings.inference_s > 0
        probs, _ = await path.classify_tensors(model, x[0], None)  # a single (C, H, W) tensor
        np.testing.assert_allclose(probs[0], np.exp(want[0]) / np.exp(want[0]).sum(), rtol=1e-4)
        with pytest.raises(InvalidArgument, match=r"expected shape \[N,1,8,8\], got \[2,3,8,8\]"):
            await path.infer(model, np.zeros((2, 3, 8, 8), np.float32), None)
        with pytest.raises(InvalidArgument, match="NaN or infinite"):
            await path.infer(model, np.full((1, 1, 8, 8), np.nan, np.float32), None)
        await engine.stop()

    run(main)


def test_fp16_model(repo: dict[str, Any]) -> None:
    w, b = repo["weights"][("half", 1)]
    image = random_image(11)

    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="half"))
        path = classify_path(engine)
        engine.load()
        await engine.start()
        model = engine.get("half")
        assert model.input_dtype == np.float16
        probs, _ = await path.classify_images(model, [png(image)], None)
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs, expected_probs([image], RGB8, w, b), atol=2e-2)
        x = np.zeros((1, 3, 8, 8), np.float32)
        x[0, 0, 0, 0] = 1e6  # fine in float32, inf in float16
        with pytest.raises(InvalidArgument, match="NaN or infinite"):
            await path.classify_tensors(model, x, None)
        logits, _ = await path.infer(model, np.zeros((2, 3, 8, 8), np.float16), None)
        assert logits.dtype == np.float32
        np.testing.assert_allclose(logits, np.broadcast_to(b.astype(np.float32), (2, 4)), atol=1e-3)
        await engine.stop()

    run(main)


def test_concurrent_requests_share_batches_and_get_their_own_answers(repo: dict[str, Any]) -> None:
    w, b = repo["weights"][("rgb", 2)]
    arrays = [random_image(100 + i) for i in range(24)]
    before = metrics.registry.get_sample_value("cnnserve_batch_size_count", {"model": "rgb"}) or 0.0

    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="rgb", max_batch_size=8))
        path = classify_path(engine)
        engine.load()
        await engine.start()
        model = engine.get("rgb")
        results = await asyncio.gather(*(path.classify_images(model, [png(a)], None) for a in arrays))
        for a, (probs, _) in zip(arrays, results, strict=True):
            np.testing.assert_allclose(probs, expected_probs([a], RGB8, w, b), rtol=1e-4, atol=1e-6)
        await engine.stop()

    run(main)
    batches = (
        metrics.registry.get_sample_value("cnnserve_batch_size_count", {"model": "rgb"}) or 0.0
    ) - before
    assert batches < len(arrays)  # merged: fewer ONNX Runtime calls than requests


def test_deadline(repo: dict[str, Any]) -> None:
    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="rgb"))
        path = classify_path(engine)
        engine.load()
        await engine.start()
        with pytest.raises(DeadlineExceeded):
            await path.classify_images(engine.get("rgb"), [png(random_image(1))], time.monotonic() - 0.01)
        with pytest.raises(DeadlineExceeded):
            await path.infer(engine.get("rgb"), np.zeros((1, 3, 8, 8), np.float32), time.monotonic() - 0.01)
        await engine.stop()

    run(main)


def test_softmax_is_stable() -> None:
    logits = np.array([[1000.0, 1000.0, -1000.0], [-1e4, 0.0, 1e4]], dtype=np.float32)
    probs = classify_mod.softmax(logits)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], atol=1e-7)


def test_a_single_image_is_decoded_on_the_event_loop_when_tiny_or_alone(
    repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preprocessing pool is skipped (two thread hops cost more than they buy) for one tiny
    image for a tiny model, always, and for one image of at most IDLE_INLINE_MAX_PIXELS when no other
    classification is in progress. Anything else, or a small file declaring a bigger image than
    the case allows (parsed from the header first), still goes to the pool."""
    import threading

    from service.frontend.classify import IDLE_INLINE_MAX_PIXELS, INLINE_MAX_BYTES

    w, b = repo["weights"][("gray", 1)]

    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="gray", preprocess_threads=2))
        path = classify_path(engine)
        engine.load()
        await engine.start()
        model = engine.get("gray")
        pool_calls = count_pool_calls(path, monkeypatch)
        color = random_image(5)
        declared_big = png(np.zeros((200, 200, 3), np.uint8))  # a small file, 40,000 pixels
        assert len(declared_big) <= INLINE_MAX_BYTES
        medium = random_image(6, (300, 200))  # 60,000 pixels, a file far over INLINE_MAX_BYTES
        assert len(png(medium)) > INLINE_MAX_BYTES
        over = png(np.zeros((600, 600, 3), np.uint8))
        assert 600 * 600 > IDLE_INLINE_MAX_PIXELS

        # Alone: every single image up to the idle cap is decoded on the loop.
        for image in (color, medium):
            probs, timings = await path.classify_images(model, [png(image)], None)
            np.testing.assert_allclose(probs, expected_probs([image], GRAY8, w, b), rtol=1e-4, atol=1e-6)
            assert timings.decode_s > 0
        await path.classify_images(model, [declared_big], None)
        assert pool_calls == []
        await path.classify_images(model, [over], None)
        await path.classify_images(model, [png(color), png(color)], None)
        assert pool_calls == [1, 2]
        with pytest.raises(InvalidArgument, match="corrupt"):  # refused on the loop, as on the pool
            await path.classify_images(model, [b"\x89PNG\r\n\x1a\n" + b"\x00" * 40], None)

        # Busy: another request holds a pool thread (its decoding waits for `gate`).
        gate = threading.Event()
        blocker_images = [over]
        prepare = path._prepare

        def gated(served: Any, images: list[bytes], *args: Any, **kwargs: Any) -> Any:
            if images is blocker_images:
                assert gate.wait(30)
            return prepare(served, images, *args, **kwargs)

        monkeypatch.setattr(path, "_prepare", gated)
        pool_calls.clear()
        blocker = asyncio.create_task(path.classify_images(model, blocker_images, None))
        while pool_calls != [1]:
            await asyncio.sleep(0.001)
        probs, _ = await path.classify_images(model, [png(color)], None)  # tiny: still inline
        np.testing.assert_allclose(probs, expected_probs([color], GRAY8, w, b), rtol=1e-4, atol=1e-6)
        assert pool_calls == [1]
        probs, _ = await path.classify_images(model, [png(medium)], None)
        np.testing.assert_allclose(probs, expected_probs([medium], GRAY8, w, b), rtol=1e-4, atol=1e-6)
        await path.classify_images(model, [declared_big], None)
        assert pool_calls == [1, 1, 1]
        gate.set()
        await blocker
        assert path._active == 0
        await engine.stop()

    run(main)


def test_a_frontend_process_decodes_single_images_on_its_event_loop_even_when_busy(
    repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve --frontends N`: the processes are the parallelism, so a single image up to
    IDLE_INLINE_MAX_PIXELS skips the pool even while other classifications are in progress; a
    bigger one and a request of several images still use it."""
    from service.frontend.classify import IDLE_INLINE_MAX_PIXELS

    w, b = repo["weights"][("gray", 1)]

    async def main() -> None:
        settings = settings_for(repo["root"], models="gray", preprocess_threads=2, frontends=2)
        engine = ClassificationEngine(settings)
        path = ClassifyPath(engine, settings)
        engine.load()
        await engine.start()
        model = engine.get("gray")
        pool_calls = count_pool_calls(path, monkeypatch)
        medium = random_image(6, (300, 200))
        over = png(np.zeros((600, 600, 3), np.uint8))
        assert 600 * 600 > IDLE_INLINE_MAX_PIXELS
        path._active += 5  # five other classifications in progress
        probs, _ = await path.classify_images(model, [png(medium)], None)
        np.testing.assert_allclose(probs, expected_probs([medium], GRAY8, w, b), rtol=1e-4, atol=1e-6)
        assert pool_calls == []
        await path.classify_images(model, [over], None)
        await path.classify_images(model, [png(medium), png(medium)], None)
        assert pool_calls == [1, 2]
        path._active -= 5
        path.close()
        await engine.stop()

    run(main)


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (16, 8), (None, 1)])
def test_preprocessing_takes_half_the_cores_by_default(
    monkeypatch: pytest.MonkeyPatch, cores: int | None, threads: int
) -> None:
    monkeypatch.setattr(classify_mod.os, "cpu_count", lambda: cores)
    assert classify_mod.default_preprocess_threads() == threads
