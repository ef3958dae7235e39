"""`cnnserve worker`: the gradient tier, the PyTorch gradient pool behind its own gRPC endpoint.

The serving tier (`cnnserve serve` with worker_address set, service/frontend/forwarding.py) forwards
Explain, Dream, DreamUnary, Stylize and StylizeUnary here. This is service.frontend.server.Server
specialised:

- the same servicer with the same backend for those RPCs (LocalGradients,
  service/frontend/gradients.py) and the same GradientPool (service/worker/pool.py), so a job
  behaves exactly as it does on a server with a local pool: caps (max_task_*), cost admission,
  deadlines, cancellation, crash handling, progress streaming;
- ListModels / GetModel for the model versions it computes with (capabilities: explain, dream and
  stylize as their metadata.json allows; no classify); Classify, ClassifyBatch and ClassifyStream
  answer UNIMPLEMENTED, and the Open Inference Protocol is not served;
- no ONNX Runtime session: `ModelCatalog` (a ModelSource, service/engine/protocol.py, and no
  more) reads the same repository with the same model selection (settings.models) as the serving
  tier, checks each version's weights.pt against metadata.json and leaves a broken version out
  (logged), and the gradient processes load those weights.pt files;
- grpc.health.v1: "", cnnserve.v1.Inference, cnnserve.v1.Inference/gradients and model:<name> are
  SERVING while at least one gradient process is alive (so a pod whose processes are all dead or
  restarting leaves its Service until one is back), reflection, Prometheus metrics on its own port
  (the same metrics: requests by method and code, and the gradient-job metrics), and the same
  SIGTERM drain as `serve`: NOT_SERVING, accepted jobs get grace_period_s, then the pool closes.

Every status this server answers carries the trailing metadata `cnnserve-tier: worker` (set by the
server's interceptor), so the frontend tells the tier's own answers (passed on unchanged) from
failures of the hop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import grpc

from service.catalog import Catalog, LoadedModel
from service.frontend.forwarding import TIER_METADATA
from service.frontend.inference import InferenceServicer
from service.frontend.server import (
    GRADIENTS_SERVICE,
    INFERENCE_SERVICE,
    Server,
    StartupError,
    _in_daemon_thread,
    run,
)
from service.observability import metrics
from service.settings import Settings

from .._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("service.worker_server")

NOT_HERE_MESSAGE = (
    "this is a gradient worker (`cnnserve worker`): it serves only Explain, Dream, Stylize, FeatureMaps "
    "and Filters; "
    "classify on the serving tier (`cnnserve serve`)"
)


def _torch_provider(settings: Settings) -> str:
    """ModelInfo.execution_provider of the tier's models (its gradient processes resolve "auto")."""
    if settings.device == "cuda":
        return f"pytorch:cuda:{settings.cuda_device_id}"
    return f"pytorch:{settings.device}" if settings.device == "cpu" else "pytorch"


class ModelCatalog:
    """The ModelSource of the gradient tier (service/engine/protocol.py), without ONNX Runtime: the
    selected model versions' metadata, for name resolution, capabilities, input decoding and
    ModelInfo. Lifecycle like the engine: load() (blocking), await start(), await stop()."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._catalog = Catalog()
        self._loaded = False
        self._stopping = False

    def load(self, on_loaded: Any = None, on_planned: Any = None) -> None:
        """Scan the repository, select like the serving tier, check each weights.pt (size, sha256).
        (The callbacks of ClassificationEngine.load are not used: the tier serves once all are read.)

        Raises RuntimeError (ModelLoadError) when the selection is invalid or no version is usable.
        """
        # The serving tier's own selection and metadata checks (service.catalog), so both tiers
        # agree on what a model is; no ONNX Runtime, no torch in this process.
        from export import repository
        from export.errors import IntegrityError
        from service.catalog import ModelLoadError, loaded_model, select_versions

        settings = self._settings
        root = Path(settings.repository)
        chosen = select_versions(root, settings.models)
        failures: list[str] = []
        models: list[LoadedModel] = []
        provider = _torch_provider(settings)
        failures += [f"{name}: {why}" for name, why in chosen.refused.items()]
        for version in chosen.versions:
            label = f"{version.name}:{version.version}"
            try:
                # weights.pt only, cheaply up front: the gradient processes verify every file again.
                # An imported ONNX model has none; it stays listed so its gradient RPCs get the
                # honest FAILED_PRECONDITION (gradients.py), and no process loads it (loading.py).
                if not version.imported:
                    repository.verify_file(version, repository.WEIGHTS_FILE)
                model = loaded_model(
                    version.metadata,
                    provider=provider,
                    path=Path(version.path),
                    config=chosen.config(version.name),
                )
            except (IntegrityError, RuntimeError) as exc:
                failures.append(f"{label}: {exc}")
                log.error("not computing with %s: %s", label, exc)
                continue
            models.append(model)
        if not models:
            raise ModelLoadError(
                f"no model could be loaded from {root}: " + "; ".join(failures or ["nothing selected"])
            )
        self._catalog = Catalog(models)
        self._loaded = True

    async def start(self) -> None:
        if not self._loaded:
            raise RuntimeError("ModelCatalog.start() before load()")

    async def stop(self) -> None:
        self._stopping = True

    @property
    def ready(self) -> bool:
        return self._loaded and not self._stopping

    def models(self) -> list[LoadedModel]:
        return self._catalog.models()

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The model `name` at `version` (None: the latest). Raises NotFound like the engine."""
        return self._catalog.get(name, version)


class GradientTierServer(Server):
    """service.frontend.server.Server serving the gradient RPCs from its own pool (the module docstring)."""

    def __init__(self, settings: Settings, catalog: Any = None, pool: Any = None, **server: Any) -> None:
        """catalog: an engine-like model catalog (tests); default ModelCatalog(settings).
        pool: a GradientPool-like object instead of the one built from the settings (tests).
        server: Server's keyword options (the gradient process of `serve --frontends N`)."""
        models = catalog if catalog is not None else ModelCatalog(settings)
        super().__init__(settings, models, pool=pool, **server)
        self.trailing_metadata = TIER_METADATA
        self._pool_started = False

    def readiness(self) -> tuple[bool, str]:
        if self.state.draining:
            return False, "shutting down"
        if not self.engine.ready:
            return False, "reading the model repository"
        if self.pool is None or not self._pool_started or self.pool.alive_workers == 0:
            return False, "no gradient worker process is ready"
        return True, ""

    def _add_servicers(self, server: grpc.aio.Server) -> tuple[str, ...]:
        # No classify path: Classify* answer UNIMPLEMENTED; capabilities are the gradient RPCs only.
        servicer = InferenceServicer(
            self.state, classify=None, gradients=self.local_gradients, not_served=NOT_HERE_MESSAGE
        )
        pb_grpc.add_InferenceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        return (INFERENCE_SERVICE,)

    def _health_names(self) -> list[str]:
        models = sorted({m.name for m in self.engine.models()})
        return ["", INFERENCE_SERVICE, GRADIENTS_SERVICE, *(f"model:{name}" for name in models)]

    async def load(self) -> None:
        """Read the repository, start the gradient processes (each loads the weights), then follow
        their liveness with every health status."""
        settings = self.settings
        started = time.perf_counter()
        if self.pool is None and settings.workers < 1:
            raise StartupError("cnnserve worker needs workers >= 1 (CNNSERVE_WORKERS / --workers)")
        try:
            await _in_daemon_thread(self.engine.load, "cnnserve-catalog")
        except Exception as exc:
            raise StartupError(f"no model could be loaded from {settings.repository}: {exc}") from exc
        await self.engine.start()
        self._engine_started = True
        # The gradient counters of every model at 0 (metrics.py: why); no classification here.
        for model in self.engine.models():
            metrics.init_gradient_series(
                model.name, model.capabilities, runs_jobs=True, version=model.version
            )
        pool = self.pool if self.pool is not None else self._make_pool()
        self.pool = pool
        self.local_gradients.pool = pool
        try:
            await pool.start()
        except Exception as exc:
            raise StartupError(f"the gradient workers failed to start: {exc}") from exc
        self._pool_started = True
        if self.state.draining:
            return
        models = ", ".join(f"{m.name}:{m.version}" for m in self.engine.models())
        log.info(
            "ready in %.2fs: %d gradient worker(s) computing with %s",
            time.perf_counter() - started,
            pool.alive_workers,
            models,
        )
        self._pool_task = asyncio.create_task(
            self._follow_pool(pool, tuple(self._health_names())), name="cnnserve-worker-health"
        )


async def run_gradient_tier(settings: Settings) -> int:
    """`cnnserve worker`: serve the gradient RPCs until SIGTERM/SIGINT; returns the exit status."""
    if settings.worker_address:
        # One settings file may serve both tiers; only `serve` forwards.
        log.info("cnnserve worker ignores worker_address=%r: it runs its own pool", settings.worker_address)
        settings = settings.model_copy(update={"worker_address": ""})
    return await run(settings, server=GradientTierServer(settings))


__all__ = ["NOT_HERE_MESSAGE", "ModelCatalog", "GradientTierServer", "run_gradient_tier"]
