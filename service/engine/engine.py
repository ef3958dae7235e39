"""The engine: the model versions chosen by the settings, each with its ONNX Runtime session and
dynamic batcher. Tensors in, logits out (service/engine/protocol.py is the contract; the frontend's
classify path, service/frontend/classify.py, decodes and preprocesses before and applies the softmax
after).

Loading is defensive: every file of a version is checked against the sha256 in its metadata.json
before ONNX Runtime sees it, and a version that fails any check is logged (naming the file and the
reason) and left out, so one bad model never takes the others down. Only when nothing is left does
`load()` fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from export import repository
from service.catalog import (
    Catalog,
    LoadedModel,
    ModelLoadError,
    input_name,
    loaded_model,
    output_name,
    select_versions,
)
from service.engine.batcher import Admission, BatchTimings, DynamicBatcher
from service.engine.ort_cache import OptimizedModelCache
from service.engine.providers import CUDA, ProviderChoice, select_provider
from service.engine.session import ModelSession
from service.errors import DeadlineExceeded, NotFound, Unavailable
from service.observability import metrics
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class _Served:
    model: LoadedModel
    session: ModelSession
    batcher: DynamicBatcher
    images: Any = field(init=False, repr=False)  # this model's images counter, looked up once

    def __post_init__(self) -> None:
        self.images = metrics.IMAGES.labels(model=self.model.name)


class ClassificationEngine:
    """The Engine of service/engine/protocol.py over ONNX Runtime. Lifecycle: load() (blocking: run
    it off the event loop), then `await start()` in the serving loop, `await stop()` to drain."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._served: dict[tuple[str, int], _Served] = {}
        self._catalog = Catalog()
        self._provider: ProviderChoice | None = None
        self._ort_cache: OptimizedModelCache | None = None
        self._loaded = False
        self._started = False
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------------------

    def load(self) -> None:
        """Scan the repository, verify and load the selected versions, warm every batch size up.

        Raises ModelLoadError (a RuntimeError) if the selection is invalid or nothing loads, and
        providers.ProviderUnavailable when device=cuda cannot be honoured.
        """
        if self._loaded:
            raise RuntimeError("ClassificationEngine.load() was already called")
        settings = self._settings
        self._provider = provider = select_provider(settings)
        log.info("execution provider: %s (%s)", provider.name, provider.reason)
        self._ort_cache = OptimizedModelCache.open(
            settings.ort_cache_path, why_off=settings.ort_cache_off_reason
        )
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
            input_name=input_name(model),
            output_name=output_name(model),
            input_dtype=model.input_dtype,
            input_shape=model.input_shape,
            require_provider=settings.device == "cuda",
            # External data must be a file metadata.json lists, i.e. one verify_files just hashed.
            listed_files=frozenset(meta["files"]),
            cache=self._ort_cache,
            model_sha256=meta["files"][repository.ONNX_FILE]["sha256"],  # verify_files just checked it
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
            "loaded %s:%d on %s in %.2f s (session %.2f s, ONNX Runtime graph cache %s; "
            "warm-up of batch sizes %s: %.2f s)",
            model.name,
            model.version,
            session.provider,
            time.perf_counter() - started,
            session.load_s,
            session.cache_outcome,
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

    async def admit(self, model: LoadedModel, n: int) -> LocalAdmission:
        """Reserve room for `n` images of `model` now, before any work on their input, with their
        input rows: refused at once (ResourceExhausted, reason queue_full) when they do not fit;
        Unavailable while loading or draining, NotFound for a version not served."""
        place = self.reserve(model, n)
        return LocalAdmission(place, np.empty((n, *model.input_shape), dtype=np.float32))

    async def infer(
        self, model: LoadedModel, admission: object, deadline: float | None
    ) -> tuple[np.ndarray, BatchTimings]:
        """float32 logits [n, K] for the admitted rows, filled by the caller (values validated by the
        frontend: this checks only that the admission is one of ours)."""
        if not isinstance(admission, LocalAdmission):
            raise TypeError(f"admission must come from this engine's admit(), got {type(admission).__name__}")
        return await self.run(model, admission.inputs, deadline, admission.place)

    # --- the engine process's primitives (service/engine/process.py) -------------------------------

    def capacity(self, model: LoadedModel) -> int:
        """Most images of this version admitted at once (its batcher's queue + batch)."""
        return self._serving(model).batcher.capacity

    def reserve(self, model: LoadedModel, n: int) -> Admission:
        """admit() without the rows: the batcher's place for n images."""
        return self._serving(model).batcher.admit(n)

    async def run(
        self, model: LoadedModel, x: np.ndarray, deadline: float | None, place: Admission
    ) -> tuple[np.ndarray, BatchTimings]:
        """Logits for x [n, *input_shape] in the reserved place."""
        served = self._serving(model)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline exceeded before inference", reason="deadline")
        logits, timings = await served.batcher.submit_timed(x, deadline, place)
        served.images.inc(len(x))
        return logits, timings


@dataclass(frozen=True)
class LocalAdmission:
    """An in-process Admission: the batcher's place and the rows, a private array."""

    place: Admission
    inputs: np.ndarray

    def release(self) -> None:
        self.place.release()


__all__ = ["ClassificationEngine", "LocalAdmission"]
