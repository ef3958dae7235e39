"""The one classify path: admit, then decode into the admitted batch, then infer, then softmax.

Classify, ClassifyBatch, ClassifyStream and the Open Inference Protocol (FP32/FP16 tensors and
BYTES images alike) go through `ClassifyPath`, so every route gets the same order: under overload
a request is refused by the engine's `admit` at once, before any decoding or validation is spent
on it. Decoding and preprocessing run on this frontend's thread pool (Pillow and numpy release the
GIL), or on the event loop for a single image where the two thread hops cost more than they buy
(`_prepare_inline`). The engine (service/engine/protocol.py) sees tensors only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image

from service.engine.protocol import LOGITS, Engine, Rows
from service.errors import DeadlineExceeded, InvalidArgument, Unavailable
from service.images import check_tensor, decode_image, image_to_tensor, load_image, open_image
from service.observability import metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.catalog import LoadedModel

log = logging.getLogger(__name__)

T = TypeVar("T")

# Softmax of more values than this runs on the thread pool instead of the event loop.
_INLINE_SOFTMAX_VALUES = 65_536
# A single image this small, for a model input this small, is decoded on the event loop (see
# ClassifyPath._prepare_inline): about 0.1 ms of work, less than two thread hops.
INLINE_MAX_BYTES = 8 * 1024
INLINE_MAX_PIXELS = 128 * 128
INLINE_MAX_INPUT_PIXELS = 64 * 64
# When no other classification is in progress, a single image of at most this many pixels is
# decoded on the event loop too (a 224x224 JPEG: ~1 ms; this cap: a few ms of a loop nobody else
# is using), saving the two thread wake-ups to the pool and back (0.1-0.25 ms each on a 2-core VM).
# In a frontend process of `serve --frontends N` (N > 1) it is so even when busy: the processes
# are the parallelism there, and the hops cost more than the pool buys (issue 12, 2 cores,
# 224x224 JPEGs to lenet5: +19% Classify c=16, +18% ClassifyStream).
IDLE_INLINE_MAX_PIXELS = 512 * 512


@dataclass(frozen=True)
class Timings:
    """Where a request's time went. decode_s and preprocess_s add up every image's work (images
    are decoded in parallel, so wall time can be less); queue_s is time in the batcher not spent
    in its own ONNX Runtime runs; inference_s is the ONNX Runtime time of the batch(es) it rode in."""

    decode_s: float
    preprocess_s: float
    queue_s: float
    inference_s: float


def merge_timings(parts: Sequence[Timings]) -> Timings | None:
    """Timings of a request served by several engine calls running concurrently: decode and
    preprocess work adds up, queue and inference overlap (the longest counts)."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return Timings(
        decode_s=sum(t.decode_s for t in parts),
        preprocess_s=sum(t.preprocess_s for t in parts),
        queue_s=max(t.queue_s for t in parts),
        inference_s=max(t.inference_s for t in parts),
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [n, K] logits, computed in float64, returned as float32. The one softmax
    of the service: Classify's probabilities and the OIP "probabilities" output alike."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)  # stable: the largest exponent is 0
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


def default_preprocess_threads() -> int:
    """Preprocessing threads when settings.preprocess_threads is 0: half the cores, at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


def validated_tensor(batch: np.ndarray, model: LoadedModel) -> np.ndarray:
    """A client's preprocessed tensor, (n, C, H, W) or (C, H, W), checked (shape, dtype, finite
    values) and converted to the model's input dtype; float32 and float16 are accepted for any
    model. Finiteness is checked after the conversion too: a float32 value beyond float16's range
    becomes inf for an fp16 model, and that must be refused rather than computed."""
    shape = tuple(model.input_shape)
    x = check_tensor(batch, shape=shape, dtype=[np.dtype("float32"), np.dtype("float16")])
    target = np.dtype(model.input_dtype)
    if x.dtype != target:
        with np.errstate(over="ignore"):
            x = x.astype(target)
        x = check_tensor(x, shape=shape, dtype=target)
    return x


class _ModelMetrics:
    """One model's decode/preprocess histograms, looked up once instead of on every image."""

    __slots__ = ("decode", "preprocess")

    def __init__(self, name: str) -> None:
        self.decode = metrics.DECODE_DURATION.labels(model=name)
        self.preprocess = metrics.PREPROCESS_DURATION.labels(model=name)


class ClassifyPath:
    """See the module docstring. `close()` stops the decoding threads (after the engine drained)."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        # Half the cores by default: ONNX Runtime's intra-op threads (one per core) lose a whole
        # parallel op when a decoder preempts one of them, and with at most half the cores decoding,
        # half of them always run undisturbed (ResNet-50 at c=16 on 2 cores: +5% in paired runs).
        threads = settings.preprocess_threads or default_preprocess_threads()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="preprocess")
        self._active = 0  # classifications in progress (decoding, queued or computing)
        self._inline_when_busy = settings.frontends > 1  # see IDLE_INLINE_MAX_PIXELS
        self._metrics: dict[str, _ModelMetrics] = {}
        if Image.MAX_IMAGE_PIXELS is not None and settings.max_image_pixels > Image.MAX_IMAGE_PIXELS:
            log.warning(
                "max_image_pixels=%d is above Pillow's decompression-bomb limit: images are capped at %d",
                settings.max_image_pixels,
                Image.MAX_IMAGE_PIXELS,
            )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- probabilities ---------------------------------------------------------------------------

    async def classify_images(
        self, model: LoadedModel, images: list[bytes], deadline: float | None
    ) -> tuple[np.ndarray, Timings]:
        """Probabilities [n, K] for n encoded images (decoded and preprocessed in parallel)."""
        logits, timings = await self.images_logits(model, images, deadline)
        return await self._softmax(logits), timings

    async def classify_tensors(
        self, model: LoadedModel, batch: np.ndarray, deadline: float | None, *, checked: bool = False
    ) -> tuple[np.ndarray, Timings]:
        """Probabilities [n, K] for a raw (n, C, H, W) or (C, H, W) tensor, already preprocessed.
        checked: the values were validated already (convert.tensor_from_proto), not again here."""
        logits, timings = await self.infer(model, batch, deadline, checked=checked)
        return await self._softmax(logits), timings

    # --- logits ----------------------------------------------------------------------------------

    async def images_logits(
        self,
        model: LoadedModel,
        images: list[bytes],
        deadline: float | None,
        outputs: tuple[str, ...] = (LOGITS,),
    ) -> tuple[np.ndarray, Timings]:
        """float32 logits [n, K] for n encoded images: admitted, then decoded into their rows. With
        `outputs`, those outputs side by side instead (Engine.infer)."""
        n = len(images)
        if n == 0:
            raise InvalidArgument("no images in the request", reason="empty_image")
        self._check_count(n)
        _check_deadline(deadline, "before decoding")
        # Under overload the request is refused here, at once, before any decoding.
        admission = await self._engine.admit(model, n)
        self._active += 1
        try:
            rows = admission.inputs
            inline = self._prepare_inline(model, images, rows)
            if inline is not None:
                decode_s, preprocess_s = inline
            else:
                jobs = [functools.partial(self._prepare, model, images, i, rows) for i in range(n)]
                parts = await self._on_pool(jobs, deadline)
                decode_s = sum(d for d, _ in parts)
                preprocess_s = sum(p for _, p in parts)
            logits, engine_timings = await self._engine.infer(model, admission, deadline, outputs)
        finally:
            self._active -= 1
            admission.release()  # a no-op once the engine took it over
        return logits, Timings(decode_s, preprocess_s, engine_timings.queue_s, engine_timings.inference_s)

    async def infer(
        self,
        model: LoadedModel,
        batch: np.ndarray,
        deadline: float | None,
        *,
        checked: bool = False,
        outputs: tuple[str, ...] = (LOGITS,),
    ) -> tuple[np.ndarray, Timings]:
        """float32 logits [n, K] (or `outputs`, as images_logits) for a raw tensor: admitted, then
        validated into the admitted rows on the thread pool (unless `checked`: copied), then
        inferred."""
        _check_deadline(deadline, "before inference")
        n = batch.shape[0] if batch.ndim == len(model.input_shape) + 1 else 1
        self._check_count(n)
        admission = await self._engine.admit(model, max(1, n))  # refused before validation when full
        self._active += 1
        try:
            started = time.perf_counter()
            if checked:
                _fill(admission.inputs, batch.reshape((-1, *model.input_shape)))
            else:
                fill = functools.partial(self._validate_into, model, batch, admission.inputs)
                await self._on_pool([fill], deadline)
            check_s = time.perf_counter() - started
            logits, engine_timings = await self._engine.infer(model, admission, deadline, outputs)
        finally:
            self._active -= 1
            admission.release()
        return logits, Timings(0.0, check_s, engine_timings.queue_s, engine_timings.inference_s)

    # --- the work on the thread pool -------------------------------------------------------------

    def _check_count(self, n: int) -> None:
        cap = self._settings.max_images_per_request
        if n > cap:
            raise InvalidArgument(
                f"{n} images in one request; max_images_per_request is {cap}", reason="too_many_images"
            )

    def _validate_into(self, model: LoadedModel, batch: np.ndarray, rows: Rows) -> None:
        """Validate a client tensor (validated_tensor) and write it into the admitted rows."""
        _fill(rows, validated_tensor(batch, model).reshape((-1, *model.input_shape)))

    def _model_metrics(self, model: LoadedModel) -> _ModelMetrics:
        found = self._metrics.get(model.name)
        if found is None:
            found = self._metrics[model.name] = _ModelMetrics(model.name)
        return found

    def _prepare(
        self,
        model: LoadedModel,
        images: list[bytes],
        i: int,
        batch: Rows,
        opened: tuple[Image.Image, float] | None = None,
    ) -> tuple[float, float]:
        """Decode images[i] into batch[i] (preprocessed); returns (decode, preprocess) seconds.
        `opened`: the image with its header already parsed (open_image) and when that started."""
        try:
            if opened is None:
                t0 = time.perf_counter()
                image = decode_image(images[i], max_pixels=self._settings.max_image_pixels)
            else:
                image, t0 = opened
                image = load_image(image)
        except InvalidArgument as exc:
            if len(images) == 1:
                raise
            raise InvalidArgument(f"image {i}: {exc.message}", reason=exc.reason) from None
        t1 = time.perf_counter()
        image_to_tensor(image, model.preprocessing, out=batch[i])
        t2 = time.perf_counter()
        observed = self._model_metrics(model)
        observed.decode.observe(t1 - t0)
        observed.preprocess.observe(t2 - t1)
        return t1 - t0, t2 - t1

    def _prepare_inline(
        self, model: LoadedModel, images: list[bytes], batch: Rows
    ) -> tuple[float, float] | None:
        """Decode and preprocess a single image on the event loop where the two thread hops to the
        preprocessing pool and back cost more than they buy. None: use the pool.

        Two cases, both bounded by the pixel count the header declares (parsed before decoding, so
        a small file declaring a huge image still goes to the pool):
        - a tiny image (at most INLINE_MAX_BYTES, declaring at most INLINE_MAX_PIXELS) for a tiny
          model input (at most INLINE_MAX_INPUT_PIXELS), e.g. LeNet's 32x32 digits, always;
        - any image declaring at most IDLE_INLINE_MAX_PIXELS when this is the only classification
          in progress: nobody else is waiting for the loop, and at concurrency 1 the hops are a
          visible part of the latency; in a frontend process of `serve --frontends N`, always.
        """
        if len(images) != 1:
            return None
        _, height, width = model.input_shape
        tiny = len(images[0]) <= INLINE_MAX_BYTES and height * width <= INLINE_MAX_INPUT_PIXELS
        idle = self._active == 1 or self._inline_when_busy  # this request only, or a frontend process
        if not (tiny or idle):
            return None
        t0 = time.perf_counter()
        # A header that cannot be parsed raises here, as decode_image would (one image: same message).
        image = open_image(images[0], max_pixels=self._settings.max_image_pixels)
        declared_width, declared_height = image.size
        limit = max(INLINE_MAX_PIXELS if tiny else 0, IDLE_INLINE_MAX_PIXELS if idle else 0)
        if declared_width * declared_height > limit:
            return None
        return self._prepare(model, images, 0, batch, opened=(image, t0))

    async def _softmax(self, logits: np.ndarray) -> np.ndarray:
        if logits.size <= _INLINE_SOFTMAX_VALUES:
            return softmax(logits)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, softmax, logits)

    async def _on_pool(self, jobs: Iterable[Callable[[], T]], deadline: float | None) -> list[T]:
        """Run jobs on the preprocessing pool concurrently and return their results in order. The
        first error is raised (DeadlineExceeded if the deadline passes first) and the jobs not yet
        started are cancelled."""
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, job) for job in jobs]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            _, pending = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
            for future in futures:
                if future.done():
                    if future.cancelled():  # the pool was shut down under us
                        raise Unavailable("the server is shutting down", reason="unavailable")
                    if future.exception() is not None:
                        raise future.exception()  # type: ignore[misc]
            if pending:
                raise DeadlineExceeded(
                    "deadline exceeded while decoding and preprocessing", reason="deadline"
                )
            return [future.result() for future in futures]
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: no "exception was never retrieved" noise


def _fill(rows: Rows, x: np.ndarray) -> None:
    """Write the tensor x [n, C, H, W] into n admitted rows (cast to their float32)."""
    if len(x) != len(rows):
        raise InvalidArgument(f"{len(x)} images for {len(rows)} admitted rows", reason="invalid_argument")
    for i in range(len(x)):
        rows[i][...] = x[i]


def _check_deadline(deadline: float | None, when: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"deadline exceeded {when}", reason="deadline")


__all__ = ["ClassifyPath", "Timings", "merge_timings", "softmax", "validated_tensor"]
