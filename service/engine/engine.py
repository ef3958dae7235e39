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
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from export import repository
from service import memory
from service.catalog import (
    UNTRAINED_WARNING,
    Catalog,
    LoadedModel,
    ModelLoadError,
    features_dim,
    features_name,
    input_name,
    loaded_model,
    output_name,
    select_versions,
)
from service.engine.batcher import Admission, BatchTimings, DynamicBatcher
from service.engine.ort_cache import OptimizedModelCache
from service.engine.precision import check_fp16, convert_to_fp16, verify_batch
from service.engine.protocol import FEATURES, LOGITS, features_missing, select_outputs
from service.engine.providers import CUDA, ProviderChoice, select_provider
from service.engine.session import ModelSession
from service.errors import DeadlineExceeded, NotFound, Unavailable
from service.model_config import GRADIENT_RPCS, ModelConfig, ServingConfig, warmup_sizes
from service.observability import metrics
from service.settings import Settings

# Called from a loading thread: the names of the models being loaded (once, before any load), and
# each version as soon as it is loaded and warm (its batcher not yet started: start_version).
OnPlanned = Callable[[list[str]], None]
OnLoaded = Callable[[LoadedModel], None]

log = logging.getLogger(__name__)


@dataclass
class _Served:
    model: LoadedModel
    sessions: list[ModelSession]  # one per instance
    batcher: DynamicBatcher
    images: Any = field(init=False, repr=False)  # this model's images counter, looked up once
    started: bool = False  # its batcher runs: requests for this version are accepted
    # A version added by a reload serves classification until gradient processes that know it are
    # ready (offer_gradients): the capabilities it waits for.
    awaiting_gradients: dict[str, bool] | None = None

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
        self._providers: dict[str, ProviderChoice] = {}  # by device: a model's config may choose
        self._pending: set[str] = set()  # models selected whose versions are not all loaded yet
        self._lock = threading.Lock()  # the loading threads add to _served/_catalog
        # Where start-up time went, per version loaded: (verify, session, warm-up) seconds.
        self._load_times: list[tuple[float, float, float]] = []
        self._load_workers = 1
        self._ort_cache: OptimizedModelCache | None = None
        # Versions a reload took out of the catalog that still finish what they admitted.
        self._retiring: dict[tuple[str, int], _Served] = {}
        self._loaded = False
        self._started = False
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------------------

    def load(self, on_loaded: OnLoaded | None = None, on_planned: OnPlanned | None = None) -> None:
        """Scan the repository, then verify, load and warm up the selected versions,
        settings.load_concurrency at a time (each model's config.yaml over the settings). Each
        version is handed to `on_loaded` as soon as it is warm, so it can serve while the others
        still load (`start_version`).

        Raises ModelLoadError (a RuntimeError) if the selection is invalid or nothing loads, and
        providers.ProviderUnavailable when device=cuda cannot be honoured.
        """
        if self._loaded:
            raise RuntimeError("ClassificationEngine.load() was already called")
        settings = self._settings
        self._provider = provider = select_provider(settings)
        self._providers[settings.device] = provider
        log.info("execution provider: %s (%s)", provider.name, provider.reason)
        self._ort_cache = OptimizedModelCache.open(
            settings.ort_cache_path, why_off=settings.ort_cache_off_reason
        )
        root = Path(settings.repository)
        chosen = select_versions(root, settings.models)
        failures = [f"{name}: {why}" for name, why in chosen.refused.items()]
        self._pending = {version.name for version in chosen.versions}
        left = {name: sum(v.name == name for v in chosen.versions) for name in self._pending}
        if on_planned is not None:
            on_planned(sorted(self._pending))
        # On CUDA one at a time unless asked: concurrent CUDA session builds and warm-ups have not
        # run on a GPU yet (no device was lent to the session that wrote this).
        default_workers = 1 if provider.is_cuda else min(4, os.cpu_count() or 1)
        workers = self._load_workers = settings.load_concurrency or default_workers
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnnserve-load") as pool:
            futures = {
                pool.submit(self._load_version, version, chosen.config(version.name)): version
                for version in load_order(chosen.versions, workers)
            }
            for future in as_completed(futures):
                version = futures[future]
                left[version.name] -= 1
                try:
                    served = future.result()
                except Exception as exc:  # noqa: BLE001 - one broken model must not stop the others
                    failures.append(f"{version.name}:{version.version}: {exc}")
                    log.error("not serving %s:%d: %s", version.name, version.version, exc)
                    metrics.MODEL_LOAD_FAILURES.labels(model=version.name, version=str(version.version)).inc()
                else:
                    self._add(served)
                    if on_loaded is not None:
                        on_loaded(served.model)
                if left[version.name] == 0:
                    with self._lock:
                        self._pending.discard(version.name)
        if not self._served:
            raise ModelLoadError(
                f"no model could be loaded from {root}: " + "; ".join(failures or ["nothing selected"])
            )
        self._loaded = True

    def _add(self, served: _Served) -> None:
        m = served.model
        with self._lock:
            self._served[(m.name, m.version)] = served
            self._catalog = Catalog(s.model for s in self._served.values())
        metrics.MODEL_INFO.labels(
            model=m.name, version=str(m.version), provider=m.provider, trained=str(m.trained).lower()
        ).set(1)
        metrics.PROVIDER_INFO.labels(provider=m.provider).set(1)

    # --- hot reload (settings.repository_poll_s, SIGHUP) ----------------------------------------------

    async def reload(self) -> ReloadResult:
        """Scan the repository again and serve what changed, while serving: a selected version not
        loaded yet is verified, loaded and warmed up off the event loop, then serves (the latest
        rule picks it once warm); a loaded version no longer selected (its version_policy, or gone
        from the repository) stops taking new requests, finishes the ones it admitted and unloads.
        A version that fails is logged and counted and changes nothing: a model keeps its old
        versions until a new one serves. A version added here serves classification only until the
        server's gradient processes know it (offer_gradients). A model's changed config.yaml
        applies to versions loaded after it."""
        if not self._started or self._stopping:
            return ReloadResult()
        root = Path(self._settings.repository)
        try:
            chosen = await asyncio.to_thread(select_versions, root, self._settings.models)
        except ModelLoadError as exc:
            log.error("repository reload: %s; serving what was loaded", exc)
            return ReloadResult(failed=[str(exc)])
        wanted = {(v.name, v.version): v for v in chosen.versions}
        result = ReloadResult()
        for key, version in sorted(wanted.items()):
            if key in self._served:
                continue
            try:
                served = await asyncio.to_thread(self._load_version, version, chosen.config(version.name))
            except Exception as exc:  # noqa: BLE001 - the versions serving go on
                log.error("repository reload: not serving %s:%d: %s", version.name, version.version, exc)
                metrics.MODEL_LOAD_FAILURES.labels(model=version.name, version=str(version.version)).inc()
                result.failed.append(f"{version.name}:{version.version}: {exc}")
                continue
            gradients_off = {k: v and k not in GRADIENT_RPCS for k, v in served.model.capabilities.items()}
            if gradients_off != served.model.capabilities:
                served.awaiting_gradients = dict(served.model.capabilities)
            served.model = replace(served.model, capabilities=gradients_off)
            self._add(served)
            await self.start_version(served.model)
            log.info("repository reload: serving %s:%d", version.name, version.version)
            result.added.append(served.model)
        in_repository = {version.name for version in chosen.versions} | set(chosen.refused)
        for key, served in list(self._served.items()):
            name = key[0]
            keeps_a_wanted_version = any(k in self._served for k in wanted if k[0] == name and k != key)
            if key in wanted or (name in in_repository and not keeps_a_wanted_version):
                continue  # still selected, or its replacement did not load: it goes on serving
            await self._retire(served)
            result.removed.append(served.model)
        return result

    @property
    def awaiting_gradients(self) -> bool:
        """Some version a reload added waits for gradient processes that know it."""
        return any(s.awaiting_gradients is not None for s in list(self._served.values()))

    def offer_gradients(self) -> list[LoadedModel]:
        """Give the versions a reload added their gradient capabilities back (the caller's gradient
        processes now know them: Server._renew_gradient_pool). Returns those versions, updated."""
        offered = []
        with self._lock:
            for served in self._served.values():
                if served.awaiting_gradients is not None:
                    served.model = replace(served.model, capabilities=served.awaiting_gradients)
                    served.awaiting_gradients = None
                    offered.append(served.model)
            if offered:
                self._catalog = Catalog(s.model for s in self._served.values())
        return offered

    async def _retire(self, served: _Served) -> None:
        """Take a version out of the catalog (no new request resolves to it), let the requests it
        admitted finish (up to grace_period_s), then stop its batcher and drop its session."""
        m = served.model
        with self._lock:
            self._served.pop((m.name, m.version), None)
            self._catalog = Catalog(s.model for s in self._served.values())
            self._retiring[(m.name, m.version)] = served
        deadline = time.monotonic() + self._settings.grace_period_s
        while served.batcher.admitted_images and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await served.batcher.close()  # its runners let go of the sessions
        with self._lock:
            self._retiring.pop((m.name, m.version), None)
        served.sessions.clear()
        # The sessions' weights are freed now; give the pages back as after a load (memory.py).
        await asyncio.to_thread(memory.trim_heap)
        metrics.MODEL_INFO.remove(m.name, str(m.version), m.provider, str(m.trained).lower())
        log.info("repository reload: unloaded %s:%d", m.name, m.version)

    def _provider_for(self, device: str) -> ProviderChoice:
        with self._lock:
            found = self._providers.get(device)
        if found is None:
            found = select_provider(self._settings.model_copy(update={"device": device}))
            with self._lock:
                self._providers[device] = found
        return found

    def _load_version(self, version: repository.ModelVersion, config: ModelConfig) -> _Served:
        try:
            return self._build_version(version, config)
        finally:
            # Loading frees more than the session keeps (ONNX Runtime's parsed model.onnx, the
            # warm-up's activations), and glibc would hold on to it: 166 MB of idle RSS for
            # ResNet-50 alone, 490 MB for the six demo models (service/memory.py). A failed load
            # frees as much.
            memory.trim_heap()

    def _build_version(self, version: repository.ModelVersion, config: ModelConfig) -> _Served:
        settings = self._settings
        started = time.perf_counter()
        # Raises naming the file whose size or sha256 differs from metadata.json.
        repository.verify_files(version)
        verified_s = time.perf_counter() - started
        meta = version.metadata
        model = loaded_model(meta, provider="", path=Path(version.path), config=config)
        device = config.device or settings.device
        provider = self._provider_for(device)
        instances = config.instances or settings.instances
        threads = _threads_per_instance(settings.intra_op_threads, instances)
        open_session = partial(
            ModelSession,
            Path(version.path) / "model.onnx",
            settings=settings,
            provider=provider,
            input_name=input_name(model),
            output_name=output_name(model),
            features_name=features_name(model),
            input_dtype=model.input_dtype,
            input_shape=model.input_shape,
            require_provider=device == "cuda",
            # External data must be a file metadata.json lists, i.e. one verify_files just hashed.
            listed_files=frozenset(meta["files"]),
            cache=self._ort_cache,
            model_sha256=meta["files"][repository.ONNX_FILE]["sha256"],  # verify_files just checked it
            threads=threads,
        )
        session = open_session()
        if session.num_classes is not None and session.num_classes != model.num_classes:
            raise ModelLoadError(
                f"model.onnx outputs {session.num_classes} classes, metadata.json says {model.num_classes}"
            )
        if session.features_dim not in (None, features_dim(model)):
            said = features_dim(model)
            raise ModelLoadError(
                f"model.onnx outputs {session.features_dim} features, metadata.json says {said}"
            )
        exported = "fp16" if model.input_dtype == np.dtype(np.float16) else "fp32"
        asked = config.precision or "exported"
        if asked == "fp32" and exported == "fp16":
            raise ModelLoadError(
                "config.yaml asks for precision fp32 but this version is an fp16 export; export it "
                "without --fp16 (or ask for fp16 or exported)"
            )
        model_bytes = None
        precision = exported
        reference_s = 0.0  # the float32 session an fp16 conversion is checked against, then dropped
        if asked == "fp16" and exported == "fp32":
            reference_s = session.load_s
            session, model_bytes = _fp16_session(session, open_session, model)
            precision = "fp16 (converted at load)"
        sessions = [session, *(open_session(model_bytes=model_bytes) for _ in range(instances - 1))]
        session_s = reference_s + sum(s.load_s for s in sessions)

        max_batch = config.max_batch_size or settings.max_batch_size
        if session.batch_limit is not None:
            max_batch = min(max_batch, session.batch_limit)
        fixed = session.provider == CUDA and settings.cuda_fixed_batch
        if fixed:
            for s in sessions:
                s.fix_batch_size(max_batch)  # every batch then runs (and warms up) at one shape
        sizes = warmup_sizes(settings, config, max_batch, fixed_shape=fixed)
        warmup_s = sum(s.warmup(sizes) for s in sessions)  # each instance allocates its own
        serving = ServingConfig(
            max_batch_size=max_batch,
            max_queue_delay_s=(
                settings.max_queue_delay_s if config.max_queue_delay_s is None else config.max_queue_delay_s
            ),
            max_queue_size=settings.max_queue_size
            if config.max_queue_size is None
            else config.max_queue_size,
            warmup_batch_sizes=tuple(sizes),
            device=device,
            version_policy=config.version_policy.describe() if config.version_policy else "latest: 1",
            config_file=str(Path(version.path).parent / "config.yaml") if config != ModelConfig() else "",
            instances=instances,
            intra_op_threads=settings.intra_op_threads if threads is None else threads,
            precision=precision,
        )
        model = replace(model, provider=session.provider, serving=serving)
        batcher = DynamicBatcher(
            [s.run for s in sessions],
            name=model.name,
            max_batch_size=max_batch,
            max_queue_delay_s=serving.max_queue_delay_s,
            max_queue_size=serving.max_queue_size,
            provider=session.provider,
            item_shape=model.input_shape,
        )
        with self._lock:
            self._load_times.append((verified_s, session_s, warmup_s))
        log.info(
            "loaded %s:%d on %s in %.2f s (verify %.2f s, session %.2f s, ONNX Runtime graph cache %s%s; "
            "warm-up of batch sizes %s: %.2f s)",
            model.name,
            model.version,
            session.provider,
            time.perf_counter() - started,
            verified_s,
            session_s,
            session.cache_outcome,
            f", {instances} instances" if instances > 1 else "",
            ",".join(map(str, sizes)) or "none",
            warmup_s,
        )
        if not model.trained:
            # Said once per version at load: answers of random weights look like answers.
            log.warning("%s:%d has %s", model.name, model.version, UNTRAINED_WARNING)
        return _Served(model, sessions, batcher)

    def startup_summary(self) -> str:
        """Where the loading time went, summed over the versions (for the `ready in` line)."""
        with self._lock:
            times = list(self._load_times)
        verify, session, warmup = (sum(t[i] for t in times) for i in range(3))
        return (
            f"{len(times)} version(s) loaded {self._load_workers} at a time: verify {verify:.2f} s, "
            f"ONNX Runtime sessions {session:.2f} s, warm-up {warmup:.2f} s (summed over versions)"
        )

    async def start(self) -> None:
        """Start the batcher of every loaded version not started yet (start_version); the engine is
        ready once it has loaded everything and started."""
        if not self._loaded:
            raise RuntimeError("ClassificationEngine.start() before load()")
        for served in list(self._served.values()):
            if not served.started:
                await self.start_version(served.model)
        self._started = True

    async def start_version(self, model: LoadedModel) -> None:
        """Start one loaded version's batcher (on the serving loop): it accepts requests from now,
        while other versions may still load."""
        served = self._served[(model.name, model.version)]
        if served.started or self._stopping:
            return
        await served.batcher.start()
        served.started = True

    async def stop(self) -> None:
        """Refuse new requests, finish the queued ones, stop the threads."""
        self._stopping = True
        everything = [*self._served.values(), *self._retiring.values()]
        await asyncio.gather(*(s.batcher.close() for s in everything))

    @property
    def ready(self) -> bool:
        """Everything selected has loaded (or failed to) and started."""
        return self._loaded and self._started and not self._stopping

    @property
    def accepting(self) -> bool:
        """Some version serves: requests are taken (a version still loading answers UNAVAILABLE)."""
        return not self._stopping and any(s.started for s in list(self._served.values()))

    def version_ready(self, model: LoadedModel) -> bool:
        served = self._served.get((model.name, model.version))
        return served is not None and served.started and not self._stopping

    @property
    def provider(self) -> ProviderChoice | None:
        return self._provider

    # --- lookup ----------------------------------------------------------------------------------

    def models(self) -> list[LoadedModel]:
        return self._catalog.models()

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The loaded model `name` at `version` (None: the latest loaded). Raises NotFound, or
        Unavailable while the model is still loading (its first version is not warm yet)."""
        with self._lock:
            catalog, pending = self._catalog, name in self._pending
        try:
            return catalog.get(name, version)
        except NotFound:
            if pending:
                raise Unavailable(f"model {name!r} is still loading", reason="not_ready") from None
            raise

    def _serving(self, model: LoadedModel) -> _Served:
        if self._stopping:
            raise Unavailable("the server is shutting down", reason="unavailable")
        key = (model.name, model.version)
        served = self._served.get(key) or self._retiring.get(key)
        if served is None:
            raise NotFound(f"model {model.name}:{model.version} is not loaded", reason="not_found")
        if not served.started:
            raise Unavailable(f"model {model.name}:{model.version} is still loading", reason="unavailable")
        return served

    # --- requests --------------------------------------------------------------------------------

    async def admit(self, model: LoadedModel, n: int) -> LocalAdmission:
        """Reserve room for `n` images of `model` now, before any work on their input, with their
        input rows: refused at once (ResourceExhausted, reason queue_full) when they do not fit;
        Unavailable while loading or draining, NotFound for a version not served."""
        place = self.reserve(model, n)
        return LocalAdmission(place, np.empty((n, *model.input_shape), dtype=np.float32))

    async def infer(
        self,
        model: LoadedModel,
        admission: object,
        deadline: float | None,
        outputs: tuple[str, ...] = (LOGITS,),
    ) -> tuple[np.ndarray, BatchTimings]:
        """float32 `outputs` (protocol.select_outputs) for the admitted rows, filled by the caller
        (values validated by the frontend: this checks only that the admission is one of ours)."""
        if not isinstance(admission, LocalAdmission):
            raise TypeError(f"admission must come from this engine's admit(), got {type(admission).__name__}")
        return await self.run(model, admission.inputs, deadline, admission.place, outputs)

    # --- the engine process's primitives (service/engine/process.py) -------------------------------

    def capacity(self, model: LoadedModel) -> int:
        """Most images of this version admitted at once (its batcher's queue + batch)."""
        return self._serving(model).batcher.capacity

    def reserve(self, model: LoadedModel, n: int) -> Admission:
        """admit() without the rows: the batcher's place for n images."""
        return self._serving(model).batcher.admit(n)

    async def run(
        self,
        model: LoadedModel,
        x: np.ndarray,
        deadline: float | None,
        place: Admission,
        outputs: tuple[str, ...] = (LOGITS,),
    ) -> tuple[np.ndarray, BatchTimings]:
        """`outputs` for x [n, *input_shape] in the reserved place. Every request of a batch gets
        the session's whole rows (logits and features: one ONNX Runtime call serves both); each
        takes the columns it asked for."""
        served = self._serving(model)
        if FEATURES in outputs and served.sessions[0].features_name is None:
            raise features_missing(model)  # before any work: the session has no features output
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline exceeded before inference", reason="deadline")
        rows, timings = await served.batcher.submit_timed(x, deadline, place)
        served.images.inc(len(x))
        return select_outputs(model, outputs, rows), timings


def load_order(versions: list[repository.ModelVersion], workers: int) -> list[repository.ModelVersion]:
    """The order versions are handed to `workers` loading threads: the workers - 1 biggest first
    (by model.onnx's size, which load and warm-up time follow), each on a thread of its own from
    the start, then the rest smallest first on the last thread, so small models serve at once and
    the big ones do not start last and set the total. With one worker: smallest first. Six demo
    models on 2 cores: VGG-19 (6 s alone) no longer starts after the five others."""

    def size(version: repository.ModelVersion) -> int:
        return int(version.metadata["files"][repository.ONNX_FILE]["bytes"])

    ascending = sorted(versions, key=size)
    rest = len(ascending) - min(len(ascending), max(0, workers - 1))
    return ascending[rest:][::-1] + ascending[:rest]


def _threads_per_instance(setting: int, instances: int) -> int | None:
    """Intra-op threads of each instance's session: None where the setting applies as it is (it
    names a number, or one instance takes ONNX Runtime's default of one per core); else the cores
    split between the instances, so k sessions computing at once do not run k x cores threads."""
    if setting > 0 or instances == 1:
        return None
    return max(1, (os.cpu_count() or 1) // instances)


def _fp16_session(
    session: ModelSession, open_session: Callable[..., ModelSession], model: LoadedModel
) -> tuple[ModelSession, bytes]:
    """A session of the float16 conversion of the float32 model `session` runs, and the converted
    model, once it has met the float16 bounds against `session` on the seeded batch
    (service/engine/precision.py). Raises ModelLoadError."""
    if session.external_files:
        raise ModelLoadError("precision fp16 needs a self-contained model.onnx (this one has external data)")
    x = verify_batch(model.input_shape)
    reference = session.run(x)
    try:
        converted = convert_to_fp16(session.path)
    except Exception as exc:  # noqa: BLE001 - the converter's own errors
        raise ModelLoadError(f"precision fp16: cannot convert model.onnx to float16: {exc}") from exc
    fp16 = open_session(model_bytes=converted)
    check, refused = check_fp16(reference, fp16.run(x), classes=model.num_classes)
    if refused:
        raise ModelLoadError(f"precision fp16: {refused}")
    log.info("%s:%d: float16 at load: %s", model.name, model.version, check.describe())
    return fp16, converted


@dataclass
class ReloadResult:
    """What one repository reload changed."""

    added: list[LoadedModel] = field(default_factory=list)
    removed: list[LoadedModel] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LocalAdmission:
    """An in-process Admission: the batcher's place and the rows, a private array."""

    place: Admission
    inputs: np.ndarray

    def release(self) -> None:
        self.place.release()


__all__ = ["ClassificationEngine", "LocalAdmission", "ReloadResult"]
