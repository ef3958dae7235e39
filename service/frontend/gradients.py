"""The gradient RPCs' backends (Explain, Dream, DreamUnary, Stylize, StylizeUnary, FeatureMaps,
Filters): the servicer
(service/frontend/inference.py) takes one by composition.

- `LocalGradients`: the gradient pool of this process (service.worker.pool.GradientPool,
  docs/SERVICE_INTERFACES.md "Gradient jobs"), or none (workers=0: UNAVAILABLE "gradient workers
  disabled"). protobuf -> job (convert.py) -> pool -> protobuf.
- `ForwardedGradients` (service/frontend/forwarding.py): the same calls relayed to the gradient
  tier (`cnnserve worker`).

Order of a local call's checks: ready -> pool configured -> model resolved (NOT_FOUND, before
anything reaches the pool, so client-chosen names never become metric labels) -> not an imported
ONNX model (FAILED_PRECONDITION "imported ONNX model: no PyTorch module") -> capability ->
the version not refused by the parity self-test -> images decoded (pixel caps) -> `validate_job`
(caps: INVALID_ARGUMENT naming the cap) -> layer names (`check_layers`, where metadata.json lists
the layers; else the gradient process checks them) -> `submit(cost=estimate_cost(job), deadline=...)`.

Cancellation: when the client cancels (or the deadline passes) grpc.aio cancels the handler's
coroutine; the `submit` awaiting inside it is cancelled with it and the pool stops the job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar

import grpc
import numpy as np

from service.catalog import IMPORTED_NO_GRADIENTS, imported
from service.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from service.frontend import convert
from service.worker import jobs
from service.worker.params import Limits

from .._proto.cnnserve.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from service.catalog import LoadedModel
    from service.frontend.calls import Rpc
    from service.frontend.state import ServingState

T = TypeVar("T")
GRADIENT_CAPABILITIES = frozenset({"explain", "dream", "stylize", "feature_maps", "filters"})
DISABLED_MESSAGE = "gradient workers disabled (the server runs with workers=0)"

Context: TypeAlias = grpc.aio.ServicerContext


class GradientBackend(Protocol):
    """What the servicer asks of a backend: each call's work inside calls.unary / calls.streamed."""

    def capabilities(self, model: LoadedModel) -> frozenset[str]:
        """The gradient RPCs ModelInfo may list for this model version."""
        ...

    async def explain(self, request: pb.ExplainRequest, context: Context, rpc: Rpc) -> pb.ExplainResponse: ...

    async def dream_unary(self, request: pb.DreamRequest, context: Context, rpc: Rpc) -> pb.DreamResult: ...

    async def stylize_unary(
        self, request: pb.StylizeRequest, context: Context, rpc: Rpc
    ) -> pb.StylizeResult: ...

    def dream(
        self, request: pb.DreamRequest, context: Context, rpc: Rpc
    ) -> AsyncIterator[pb.DreamResponse]: ...

    async def feature_maps(
        self, request: pb.FeatureMapsRequest, context: Context, rpc: Rpc
    ) -> pb.FeatureMapsResponse: ...

    async def filters(self, request: pb.FiltersRequest, context: Context, rpc: Rpc) -> pb.FiltersResponse: ...

    def stylize(
        self, request: pb.StylizeRequest, context: Context, rpc: Rpc
    ) -> AsyncIterator[pb.StylizeResponse]: ...


class Pool(Protocol):
    """The part of service.worker.pool.GradientPool the backend uses."""

    @property
    def alive_workers(self) -> int: ...

    async def submit(
        self,
        job: Any,
        *,
        cost: float,
        deadline: float | None,
        on_progress: Callable[[Any], None] | None = None,
    ) -> Any: ...


class LocalGradients:
    """The gradient RPCs on this process's pool; `pool` is set once it starts (None until then and
    with workers=0)."""

    def __init__(self, state: ServingState, pool: Pool | None = None) -> None:
        self._state = state
        self.pool = pool

    def capabilities(self, model: LoadedModel) -> frozenset[str]:
        if self.pool is None or self.refused_reason(model) is not None:
            return frozenset()
        return GRADIENT_CAPABILITIES

    def refused_reason(self, model: LoadedModel) -> str | None:
        """Why the gradient processes refused this model version (it failed their parity self-test
        with model.onnx, service.worker.loading), or None."""
        summary = getattr(self.pool, "ready_summary", None)
        refused = summary.get("refused") if isinstance(summary, Mapping) else None
        if not isinstance(refused, Mapping):
            return None
        reason = refused.get(f"{model.name}:{model.version}")
        return str(reason) if reason is not None else None

    # --- the calls ---------------------------------------------------------------------------------

    async def explain(self, request: pb.ExplainRequest, context: Context, rpc: Rpc) -> pb.ExplainResponse:
        pool, model = self._prepare(request.model, request.version, "explain", rpc)
        method = convert.explain_method(request.method)
        if not request.images:
            raise InvalidArgument("images is empty: send at least one image", reason="empty_image")
        self._check_batch(len(request.images), "images in one Explain")
        targets = convert.explain_targets(request, model, len(request.images))
        neuron = convert.explain_neuron(request)
        inputs = await asyncio.to_thread(
            convert.explain_inputs, list(request.images), model, self._state.settings.max_image_pixels
        )
        job = jobs.ExplainJob(
            model=model.name,
            version=model.version,
            inputs=inputs,
            targets=targets,
            method=method,
            plain_gradient=request.include_plain_gradient,
            neuron=neuron,
        )
        return convert.explain_response(await self._run(pool, job, context, model), model, method)

    async def feature_maps(
        self, request: pb.FeatureMapsRequest, context: Context, rpc: Rpc
    ) -> pb.FeatureMapsResponse:
        pool, model = self._prepare(request.model, request.version, "feature_maps", rpc)
        if not request.HasField("image"):
            raise InvalidArgument("image is required", reason="empty_image")
        if not request.layers:
            raise InvalidArgument("layers is empty: name 1..max_task_batch layers (GetModel layers)")
        self._check_batch(len(request.layers), "layers in one FeatureMaps")
        if not 0 <= request.max_channels <= jobs.MAX_CHANNELS:
            raise InvalidArgument(
                f"max_channels must be 0..{jobs.MAX_CHANNELS} (0: {jobs.DEFAULT_MAX_CHANNELS}), "
                f"got {request.max_channels}"
            )
        inputs = await asyncio.to_thread(
            convert.explain_inputs, [request.image], model, self._state.settings.max_image_pixels
        )
        job = jobs.FeatureMapsJob(
            model=model.name,
            version=model.version,
            inputs=inputs,
            layers=tuple(request.layers),
            max_channels=request.max_channels or jobs.DEFAULT_MAX_CHANNELS,
        )
        return convert.feature_maps_response(await self._run(pool, job, context, model), model)

    async def filters(self, request: pb.FiltersRequest, context: Context, rpc: Rpc) -> pb.FiltersResponse:
        pool, model = self._prepare(request.model, request.version, "filters", rpc)
        job = jobs.FiltersJob(model=model.name, version=model.version, layer=request.layer)
        return convert.filters_response(await self._run(pool, job, context, model), model)

    async def dream_unary(self, request: pb.DreamRequest, context: Context, rpc: Rpc) -> pb.DreamResult:
        pool, job, model = await self._dream_job(request, rpc)
        return convert.dream_result(await self._run(pool, job, context, model), model)

    async def stylize_unary(self, request: pb.StylizeRequest, context: Context, rpc: Rpc) -> pb.StylizeResult:
        pool, job, model = await self._stylize_job(request, rpc)
        return convert.stylize_result(await self._run(pool, job, context, model), model)

    def dream(self, request: pb.DreamRequest, context: Context, rpc: Rpc) -> AsyncIterator[pb.DreamResponse]:
        return self._progress(
            lambda: self._dream_job(request, rpc),
            context,
            lambda progress: pb.DreamResponse(progress=progress),
            lambda result, model: pb.DreamResponse(result=convert.dream_result(result, model)),
        )

    def stylize(
        self, request: pb.StylizeRequest, context: Context, rpc: Rpc
    ) -> AsyncIterator[pb.StylizeResponse]:
        return self._progress(
            lambda: self._stylize_job(request, rpc),
            context,
            lambda progress: pb.StylizeResponse(progress=progress),
            lambda result, model: pb.StylizeResponse(result=convert.stylize_result(result, model)),
        )

    # --- from request to job -----------------------------------------------------------------------

    def _prepare(self, name: str, version: int, kind: str, rpc: Rpc) -> tuple[Pool, LoadedModel]:
        state = self._state
        state.check_ready()
        pool = self.pool
        if pool is None:
            raise Unavailable(DISABLED_MESSAGE, reason="workers_disabled")
        model = state.resolve_model(name, version)
        rpc.model = model.name
        if imported(model):
            raise FailedPrecondition(
                f"model {model.name!r} version {model.version} does not serve {kind}: "
                f"{IMPORTED_NO_GRADIENTS} (gradient RPCs run on the PyTorch network; Classify, Embed "
                "where it has a features output, and the OIP serve it)",
                reason="imported_onnx",
            )
        if not model.capabilities.get(kind, False):
            raise InvalidArgument(
                f"model {model.name!r} version {model.version} ({model.architecture}) "
                f"does not support {kind}",
                reason="unsupported",
            )
        refused = self.refused_reason(model)
        if refused is not None:
            raise FailedPrecondition(
                f"model {model.name!r} version {model.version} is not offered for gradient RPCs: {refused}",
                reason="parity_failed",
            )
        return pool, model

    def _check_batch(self, n: int, what: str) -> None:
        limit = self._state.settings.max_task_batch
        if n > limit:
            raise InvalidArgument(
                f"{n} {what}; the limit is max_task_batch={limit}", reason="too_many_images"
            )

    async def _dream_job(self, request: pb.DreamRequest, rpc: Rpc) -> tuple[Pool, jobs.DreamJob, LoadedModel]:
        pool, model = self._prepare(request.model, request.version, "dream", rpc)
        params = convert.dream_params(request)
        if not request.HasField("image"):
            raise InvalidArgument("image is required", reason="empty_image")
        image = await asyncio.to_thread(
            convert.decode_rgb, request.image, model, "image", self._state.settings.max_image_pixels
        )
        job = jobs.DreamJob(model=model.name, version=model.version, image=image, params=params)
        return pool, job, model

    async def _stylize_job(
        self, request: pb.StylizeRequest, rpc: Rpc
    ) -> tuple[Pool, jobs.StylizeJob, LoadedModel]:
        pool, model = self._prepare(request.model, request.version, "stylize", rpc)
        params = convert.style_params(request)
        if not request.HasField("content"):
            raise InvalidArgument("content is required", reason="empty_image")
        if not request.styles:
            raise InvalidArgument("styles is empty: send at least one style image", reason="empty_image")
        self._check_batch(len(request.styles), "style images")
        max_pixels = self._state.settings.max_image_pixels

        def decode_all() -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
            content = convert.decode_rgb(request.content, model, "content image", max_pixels)
            styles = tuple(
                convert.decode_rgb(s.image, model, f"style image {i}", max_pixels)
                for i, s in enumerate(request.styles)
            )
            return content, styles

        content, styles = await asyncio.to_thread(decode_all)
        weights = tuple(float(s.weight) for s in request.styles)
        blend = weights if any(w != 0 for w in weights) else None
        job = jobs.StylizeJob(
            model=model.name,
            version=model.version,
            content=content,
            styles=styles,
            style_blend=blend,
            params=params,
        )
        return pool, job, model

    # --- running a job -----------------------------------------------------------------------------

    async def _run(
        self,
        pool: Pool,
        job: jobs.Job,
        context: Context,
        model: LoadedModel,
        on_progress: Callable[[Any], None] | None = None,
    ) -> Any:
        await asyncio.to_thread(jobs.validate_job, job, Limits.from_settings(self._state.settings))
        # Layer names against metadata.json's table, here without torch; an older export has none
        # and its gradient process checks them against the module (handlers.layer_table).
        jobs.check_layers(job, convert.model_layers(model))
        cost = jobs.estimate_cost(job)
        deadline = self._state.deadline(context)
        # max_task_duration_s bounds a job from admission to result, whatever deadline the client set.
        cap_s = self._state.settings.max_task_duration_s
        capped = time.monotonic() + cap_s
        if capped >= deadline:
            return await pool.submit(job, cost=cost, deadline=deadline, on_progress=on_progress)
        try:
            return await pool.submit(job, cost=cost, deadline=capped, on_progress=on_progress)
        except DeadlineExceeded as exc:
            raise DeadlineExceeded(
                f"the {job.kind} job was stopped after max_task_duration_s={cap_s:g} s ({exc})",
                reason="task_duration",
            ) from exc

    async def _progress(
        self,
        prepare: Callable[[], Awaitable[tuple[Pool, jobs.Job, LoadedModel]]],
        context: Context,
        progress_message: Callable[[pb.GradientProgress], T],
        result_message: Callable[[Any, LoadedModel], T],
    ) -> AsyncIterator[T]:
        """A streaming job's messages: one per progress update the gradient process reports, then
        the result (of the job's model). The job is cancelled when the caller stops reading
        (cancelled call, failed send)."""
        pool, job, model = await prepare()
        updates: asyncio.Queue[jobs.ProgressUpdate] = asyncio.Queue()
        running = asyncio.ensure_future(self._run(pool, job, context, model, on_progress=updates.put_nowait))
        try:
            while True:
                getter = asyncio.ensure_future(updates.get())
                try:
                    await asyncio.wait({running, getter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()
                if getter.done() and not getter.cancelled():
                    yield progress_message(convert.progress_proto(getter.result()))
                    continue
                break
            while not updates.empty():  # reported before the job finished
                yield progress_message(convert.progress_proto(updates.get_nowait()))
            yield result_message(running.result(), model)
        finally:
            if not running.done():
                running.cancel()


__all__ = ["DISABLED_MESSAGE", "GRADIENT_CAPABILITIES", "GradientBackend", "LocalGradients", "Pool"]
