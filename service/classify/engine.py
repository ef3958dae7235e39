"""The classification engine: the models chosen by the settings, each with its ONNX Runtime session
and dynamic batcher, and the decode -> preprocess -> batch -> softmax path the servicers call.

Loading is defensive: every file of a version is checked against the sha256 in its metadata.json
before ONNX Runtime sees it, and a version that fails any check is logged (naming the file and the
reason) and left out, so one bad model never takes the others down. Only when nothing is left does
`load()` fail.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from export import repository
from service.catalog import Catalog, LoadedModel, ModelLoadError, loaded_model, select_versions
from service.classify.batcher import Admission, DynamicBatcher
from service.classify.providers import CUDA, ProviderChoice, select_provider
from service.classify.session import ModelSession
from service.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from service.images import check_tensor, decode_image, image_to_tensor, load_image, open_image
from service.observability import metrics
from service.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Softmax of more values than this runs on the thread pool instead of the event loop.
_INLINE_SOFTMAX_VALUES = 65_536
# A single image this small, for a model input this small, is decoded on the event loop (see
# ClassificationEngine._prepare_inline): about 0.1 ms of work, less than two thread hops.
INLINE_MAX_BYTES = 8 * 1024
INLINE_MAX_PIXELS = 128 * 128
INLINE_MAX_INPUT_PIXELS = 64 * 64
# When no other classification is in progress, a single image of at most this many pixels is
# decoded on the event loop too (a 224x224 JPEG: ~1 ms; this cap: a few ms of a loop nobody else
# is using), saving the two thread wake-ups to the pool and back (0.1-0.25 ms each on a 2-core VM).
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


@dataclass
class _Served:
    model: LoadedModel
    session: ModelSession
    batcher: DynamicBatcher
    # This model's metric children, looked up once instead of on every request.
    decode_hist: Any = field(init=False, repr=False)
    preprocess_hist: Any = field(init=False, repr=False)
    images: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.decode_hist = metrics.DECODE_DURATION.labels(model=self.model.name)
        self.preprocess_hist = metrics.PREPROCESS_DURATION.labels(model=self.model.name)
        self.images = metrics.IMAGES.labels(model=self.model.name)


# --- the engine --------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [n, K] logits, computed in float64, returned as float32."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)  # stable: the largest exponent is 0
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


class ClassificationEngine:
    """See docs/SERVICE_INTERFACES.md. Lifecycle: load() (blocking: run it off the event loop),
    then `await start()` in the serving loop, `await stop()` to drain."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._served: dict[tuple[str, int], _Served] = {}
        self._catalog = Catalog()
        self._provider: ProviderChoice | None = None
        # Half the cores by default: ONNX Runtime's intra-op threads (one per core) lose a whole
        # parallel op when a decoder preempts one of them, and with at most half the cores decoding,
        # half of them always run undisturbed (ResNet-50 at c=16 on 2 cores: +5% in paired runs).
        threads = settings.preprocess_threads or default_preprocess_threads()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="preprocess")
        self._loaded = False
        self._started = False
        self._stopping = False
        self._active = 0  # classify/infer calls in progress (decoding, queued or computing)

    # --- lifecycle -------------------------------------------------------------------------------

    def load(self) -> None:
        """Scan the repository, verify and load the selected versions, warm every batch size up.

        Raises ModelLoadError (a RuntimeError) if the selection is invalid or nothing loads, and
        providers.ProviderUnavailable when device=cuda cannot be honoured.
        """
        if self._loaded:
            raise RuntimeError("ClassificationEngine.load() was already called")
        settings = self._settings
        if Image.MAX_IMAGE_PIXELS is not None and settings.max_image_pixels > Image.MAX_IMAGE_PIXELS:
            log.warning(
                "max_image_pixels=%d is above Pillow's decompression-bomb limit: images are capped at %d",
                settings.max_image_pixels,
                Image.MAX_IMAGE_PIXELS,
            )

        self._provider = provider = select_provider(settings)
        log.info("execution provider: %s (%s)", provider.name, provider.reason)
        root = Path(settings.repository)
        chosen = select_versions(root, settings.models)

        failures: list[str] = []
        for version in chosen:
            label = f"{version.name}:{version.version}"
            try:
                served = self._load_version(version, provider)
            except Exception as exc:  # noqa: BLE001 - one broken model must not stop the others
                failures.append(f"{label}: {exc}")
                log.error("not serving %s: %s", label, exc)
                continue
            self._served[(served.model.name, served.model.version)] = served
        if not self._served:
            raise ModelLoadError(
                f"no model could be loaded from {root}: " + "; ".join(failures or ["nothing selected"])
            )
        self._catalog = Catalog(served.model for served in self._served.values())
        for served in self._served.values():
            m = served.model
            metrics.MODEL_INFO.labels(
                model=m.name, version=str(m.version), provider=m.provider, trained=str(m.trained).lower()
            ).set(1)
            metrics.PROVIDER_INFO.labels(provider=m.provider).set(1)
        self._loaded = True

    def _load_version(self, version: repository.ModelVersion, provider: ProviderChoice) -> _Served:
        settings = self._settings
        started = time.perf_counter()
        # Raises naming the file whose size or sha256 differs from metadata.json.
        repository.verify_files(version)
        meta = version.metadata
        model = loaded_model(meta, provider="", path=Path(version.path))
        session = ModelSession(
            Path(version.path) / "model.onnx",
            settings=settings,
            provider=provider,
            input_name=str(meta["input"].get("name", "input")),
            output_name=str(meta["output"].get("name", "logits")),
            input_dtype=model.input_dtype,
            input_shape=model.input_shape,
            require_provider=settings.device == "cuda",
            # External data must be a file metadata.json lists, i.e. one verify_files just hashed.
            listed_files=frozenset(meta["files"]),
        )
        if session.num_classes is not None and session.num_classes != model.num_classes:
            raise ModelLoadError(
                f"model.onnx outputs {session.num_classes} classes, metadata.json says {model.num_classes}"
            )
        max_batch = settings.max_batch_size
        if session.batch_limit is not None:
            max_batch = min(max_batch, session.batch_limit)
        if session.provider == CUDA and settings.cuda_fixed_batch:
            session.fix_batch_size(max_batch)  # every batch then runs (and warms up) at one shape
        warmup_sizes = settings.warmup_sizes(max_batch)
        warmup_s = session.warmup(warmup_sizes)
        model = replace(model, provider=session.provider)
        batcher = DynamicBatcher(
            session.run,
            name=model.name,
            max_batch_size=max_batch,
            max_queue_delay_s=settings.max_queue_delay_s,
            max_queue_size=settings.max_queue_size,
            provider=session.provider,
            item_shape=model.input_shape,
        )
        log.info(
            "loaded %s:%d on %s in %.2f s (warm-up of batch sizes %s: %.2f s)",
            model.name,
            model.version,
            session.provider,
            time.perf_counter() - started,
            ",".join(map(str, warmup_sizes)) or "none",
            warmup_s,
        )
        return _Served(model, session, batcher)

    async def start(self) -> None:
        """Start every model's batcher; the engine is ready afterwards."""
        if not self._loaded:
            raise RuntimeError("ClassificationEngine.start() before load()")
        for served in self._served.values():
            await served.batcher.start()
        self._started = True

    async def stop(self) -> None:
        """Refuse new requests, finish the queued ones, stop the threads."""
        self._stopping = True
        await asyncio.gather(*(s.batcher.close() for s in self._served.values()))
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self._loaded and self._started and not self._stopping

    @property
    def provider(self) -> ProviderChoice | None:
        return self._provider

    # --- lookup ----------------------------------------------------------------------------------

    def models(self) -> list[LoadedModel]:
        return self._catalog.models()

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The loaded model `name` at `version` (None: the latest loaded). Raises NotFound."""
        return self._catalog.get(name, version)

    def _serving(self, model: LoadedModel) -> _Served:
        if self._stopping:
            raise Unavailable("the server is shutting down", reason="unavailable")
        if not self.ready:
            raise Unavailable("models are still loading", reason="unavailable")
        served = self._served.get((model.name, model.version))
        if served is None:
            raise NotFound(f"model {model.name}:{model.version} is not loaded", reason="not_found")
        return served

    # --- requests --------------------------------------------------------------------------------

    async def classify_images(
        self, model: LoadedModel, images: list[bytes], deadline: float | None
    ) -> tuple[np.ndarray, Timings]:
        """Probabilities [n, K] for n encoded images (decoded and preprocessed in parallel)."""
        served = self._serving(model)
        n = len(images)
        if n == 0:
            raise InvalidArgument("no images in the request", reason="empty_image")
        self._check_count(n)
        _check_deadline(deadline, "before decoding")
        batch = np.empty((n, *model.input_shape), dtype=np.float32)
        # Under overload the request is refused here, at once, before any decoding (batcher.admit).
        admission = served.batcher.admit(n)
        self._active += 1
        try:
            inline = self._prepare_inline(served, images, batch)
            if inline is not None:
                decode_s, preprocess_s = inline
            else:
                parts = await self._on_pool(
                    [functools.partial(self._prepare, served, images, i, batch) for i in range(n)], deadline
                )
                decode_s = sum(d for d, _ in parts)
                preprocess_s = sum(p for _, p in parts)
            logits, queue_s, inference_s = await self._submit(served, batch, deadline, admission)
        finally:
            self._active -= 1
            admission.release()  # a no-op once the batcher took it over
        probabilities = await self._softmax(logits)
        served.images.inc(n)
        return probabilities, Timings(decode_s, preprocess_s, queue_s, inference_s)

    def _prepare(
        self,
        served: _Served,
        images: list[bytes],
        i: int,
        batch: np.ndarray,
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
        image_to_tensor(image, served.model.preprocessing, out=batch[i])
        t2 = time.perf_counter()
        served.decode_hist.observe(t1 - t0)
        served.preprocess_hist.observe(t2 - t1)
        return t1 - t0, t2 - t1

    def _prepare_inline(
        self, served: _Served, images: list[bytes], batch: np.ndarray
    ) -> tuple[float, float] | None:
        """Decode and preprocess a single image on the event loop where the two thread hops to the
        preprocessing pool and back cost more than they buy. None: use the pool.

        Two cases, both bounded by the pixel count the header declares (parsed before decoding, so
        a small file declaring a huge image still goes to the pool):
        - a tiny image (at most INLINE_MAX_BYTES, declaring at most INLINE_MAX_PIXELS) for a tiny
          model input (at most INLINE_MAX_INPUT_PIXELS), e.g. LeNet's 32x32 digits, always;
        - any image declaring at most IDLE_INLINE_MAX_PIXELS when this is the only classification
          in progress: nobody else is waiting for the loop, and at concurrency 1 the hops are a
          visible part of the latency.
        """
        if len(images) != 1:
            return None
        _, height, width = served.model.input_shape
        tiny = len(images[0]) <= INLINE_MAX_BYTES and height * width <= INLINE_MAX_INPUT_PIXELS
        idle = self._active == 1  # this request only
        if not (tiny or idle):
            return None
        t0 = time.perf_counter()
        # A header that cannot be parsed raises here, as decode_image would (one image: same message).
        image = open_image(images[0], max_pixels=self._settings.max_image_pixels)
        declared_width, declared_height = image.size
        limit = max(INLINE_MAX_PIXELS if tiny else 0, IDLE_INLINE_MAX_PIXELS if idle else 0)
        if declared_width * declared_height > limit:
            return None
        return self._prepare(served, images, 0, batch, opened=(image, t0))

    async def classify_tensors(
        self, model: LoadedModel, batch: np.ndarray, deadline: float | None
    ) -> tuple[np.ndarray, Timings]:
        """Probabilities [n, K] for a raw (n, C, H, W) or (C, H, W) tensor, already preprocessed."""
        logits, timings = await self.infer(model, batch, deadline)
        return await self._softmax(logits), timings

    async def infer(
        self, model: LoadedModel, batch: np.ndarray, deadline: float | None
    ) -> tuple[np.ndarray, Timings]:
        """float32 logits [n, K] for a raw tensor (the Open Inference Protocol's output)."""
        served = self._serving(model)
        _check_deadline(deadline, "before inference")
        n = batch.shape[0] if batch.ndim == len(model.input_shape) + 1 else 1
        self._check_count(n)
        admission = served.batcher.admit(max(1, n))  # refused before validation when full
        self._active += 1
        try:
            started = time.perf_counter()
            (x,) = await self._on_pool([functools.partial(self._validated, model, batch)], deadline)
            check_s = time.perf_counter() - started
            logits, queue_s, inference_s = await self._submit(served, x, deadline, admission)
        finally:
            self._active -= 1
            admission.release()  # a no-op once the batcher took it over
        served.images.inc(len(x))
        return logits, Timings(0.0, check_s, queue_s, inference_s)

    def _check_count(self, n: int) -> None:
        cap = self._settings.max_images_per_request
        if n > cap:
            raise InvalidArgument(
                f"{n} images in one request; max_images_per_request is {cap}", reason="too_many_images"
            )

    def _validated(self, model: LoadedModel, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0] if batch.ndim == len(model.input_shape) + 1 else 1
        self._check_count(n)
        # float32 is always accepted (clients' natural type); an fp16 model also takes float16.
        accepted = list(dict.fromkeys([np.dtype(np.float32), np.dtype(model.input_dtype)]))
        x = check_tensor(batch, shape=model.input_shape, dtype=accepted)
        if x.dtype != model.input_dtype:
            with np.errstate(over="ignore"):
                x = x.astype(model.input_dtype)
            # float32 values beyond float16's range became inf: refuse rather than compute garbage.
            x = check_tensor(x, shape=model.input_shape, dtype=model.input_dtype)
        return x

    async def _submit(
        self, served: _Served, x: np.ndarray, deadline: float | None, admission: Admission
    ) -> tuple[np.ndarray, float, float]:
        logits, timings = await served.batcher.submit_timed(x, deadline, admission)
        return logits, timings.queue_s, timings.inference_s

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


def default_preprocess_threads() -> int:
    """Preprocessing threads when settings.preprocess_threads is 0: half the cores, at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


def _check_deadline(deadline: float | None, when: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"deadline exceeded {when}", reason="deadline")


__all__ = ["ClassificationEngine", "Timings", "softmax"]
