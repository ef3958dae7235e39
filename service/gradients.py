"""The gradient RPCs of cnnserve.v1.Inference (Explain, Dream, DreamUnary, Stylize, StylizeUnary).

Thin, like the classification servicers: protobuf -> job (service.worker.jobs) -> the gradient pool
(service.worker.pool.GradientPool, docs/SERVICE_INTERFACES.md "Gradient jobs") -> protobuf. Order of
the checks of every call: ready -> pool configured (workers=0: UNAVAILABLE "gradient workers
disabled") -> model resolved (NOT_FOUND, before anything reaches the pool, so client-chosen names
never become metric labels) -> capability -> images decoded (pixel caps) -> `validate_job` (caps:
INVALID_ARGUMENT naming the cap) -> `submit(cost=estimate_cost(job), deadline=...)`.

Cancellation: when the client cancels (or the deadline passes) grpc.aio cancels the handler's
coroutine; the `submit` awaiting inside it is cancelled with it and the pool stops the job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import numpy as np

from service import images
from service.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    checked_response,
)
from service.observability.metrics import INFLIGHT
from service.worker import jobs
from service.worker.params import EXPLAIN_METHODS, DreamParams, Limits, StyleParams
from service.worker.rendering import pil_to_array

from ._proto.cnnserve.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from service.catalog import LoadedModel
    from service.servicers import Rpc, ServingState

GRADIENT_CAPABILITIES = frozenset({"explain", "dream", "stylize"})
DISABLED_MESSAGE = "gradient workers disabled (the server runs with workers=0)"

# The wire's ExplainMethod enum, derived from the one list of job methods (params.EXPLAIN_METHODS):
# method "m" is EXPLAIN_METHOD_<M>, UNSPECIFIED is the first (guided backprop). "gradient" has no
# enum value (the plain gradient comes with include_plain_gradient); an enum value with no job method
# would be refused as unknown (tests/unit/service/test_servicers_gradients.py checks there is none).
EXPLAIN_METHOD_ENUM: dict[str, pb.ExplainMethod] = {
    method: pb.ExplainMethod.Value(f"EXPLAIN_METHOD_{method.upper()}")
    for method in EXPLAIN_METHODS
    if f"EXPLAIN_METHOD_{method.upper()}" in pb.ExplainMethod.keys()
}
EXPLAIN_METHOD_NAMES = {
    pb.EXPLAIN_METHOD_UNSPECIFIED: EXPLAIN_METHODS[0],
    **{value: method for method, value in EXPLAIN_METHOD_ENUM.items()},
}
OPTIMIZERS = {
    pb.STYLE_OPTIMIZER_UNSPECIFIED: "lbfgs",
    pb.STYLE_OPTIMIZER_LBFGS: "lbfgs",
    pb.STYLE_OPTIMIZER_ADAM: "adam",
}
INITS = {pb.STYLE_INIT_UNSPECIFIED: "content", pb.STYLE_INIT_CONTENT: "content", pb.STYLE_INIT_NOISE: "noise"}


class Pool(Protocol):
    """The part of service.worker.pool.GradientPool the servicers use."""

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


# --- protobuf -> task ---------------------------------------------------------------------------


def _enum(value: int, table: Mapping[Any, str], what: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"unknown {what} {value}", reason="invalid_argument") from None


def decode_rgb(item: pb.ImageInput, model: LoadedModel, name: str, max_pixels: int) -> np.ndarray:
    """An encoded ImageInput -> float32 (H, W, C) in [0, 1] in the model's colour mode."""
    kind = item.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"{name} is empty: set `encoded`", reason="empty_image")
    if kind != "encoded":
        raise InvalidArgument(
            f"{name}: send an encoded image (JPEG, PNG or WebP); tensors are not accepted here",
            reason="not_an_image",
        )
    try:
        image = images.decode_image(item.encoded, max_pixels=max_pixels)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{name}: {exc.message}", reason=exc.reason) from None
    if model.preprocessing.color_mode == "L":
        return pil_to_array(image, "L")
    return pil_to_array(image, "RGB")


def explain_inputs(items: Sequence[pb.ImageInput], model: LoadedModel, max_pixels: int) -> np.ndarray:
    """Request images -> float32 (N, C, H, W), the model's preprocessed input."""
    from service.servicers import tensor_from_proto

    out = []
    for i, item in enumerate(items):
        where = f"image {i}" if len(items) > 1 else "image"
        kind = item.WhichOneof("kind")
        try:
            if kind == "encoded":
                decoded = images.decode_image(item.encoded, max_pixels=max_pixels)
                out.append(images.image_to_tensor(decoded, model.preprocessing)[None])
            elif kind == "tensor":
                out.append(tensor_from_proto(item.tensor, model).reshape((1, *model.input_shape)))
            else:
                raise InvalidArgument("is empty: set `encoded` or `tensor`", reason="empty_image")
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc.message}", reason=exc.reason) from None
    return np.concatenate(out).astype(np.float32)


def explain_targets(request: pb.ExplainRequest, model: LoadedModel, n: int) -> tuple[int, ...] | None:
    targets = list(request.target_classes)
    if not targets:
        return None
    if len(targets) == 1:
        targets = targets * n
    if len(targets) != n:
        raise InvalidArgument(
            f"{len(request.target_classes)} target_classes for {n} images: give none, one, or one per image",
            reason="invalid_argument",
        )
    for t in targets:
        if not 0 <= t < model.num_classes:
            raise InvalidArgument(
                f"target class {t} is out of range: {model.name} has {model.num_classes} classes "
                f"(0..{model.num_classes - 1})",
                reason="target_out_of_range",
            )
    return tuple(int(t) for t in targets)


def dream_params(request: pb.DreamRequest) -> DreamParams:
    kwargs: dict[str, Any] = {}
    for name in ("octaves", "octave_scale", "steps", "step_size", "jitter", "tile_size", "max_side"):
        if request.HasField(name):
            kwargs[name] = getattr(request, name)
    if request.layers:
        layers: dict[str, float] = {}
        channels: dict[str, tuple[int, ...]] = {}
        for entry in request.layers:
            if entry.layer in layers:
                raise InvalidArgument(f"dream: layer {entry.layer!r} given twice", reason="invalid_argument")
            layers[entry.layer] = entry.weight or 1.0
            if entry.channels:
                channels[entry.layer] = tuple(int(c) for c in entry.channels)
        kwargs["layers"] = layers
        kwargs["channels"] = channels
    if request.seed >= 2**63:
        raise InvalidArgument("dream: seed must be below 2**63", reason="invalid_argument")
    return DreamParams(seed=int(request.seed), preview_every=max(0, request.preview_every), **kwargs)


def style_params(request: pb.StylizeRequest) -> StyleParams:
    kwargs: dict[str, Any] = {}
    for name in ("content_weight", "style_weight", "tv_weight", "learning_rate", "style_scale", "max_side"):
        if request.HasField(name):
            kwargs[name] = getattr(request, name)
    if request.iterations < 0:
        raise InvalidArgument("stylize: iterations must be >= 1 (0: the default)", reason="invalid_argument")
    if request.iterations:
        kwargs["iterations"] = int(request.iterations)
    if request.seed >= 2**63:
        raise InvalidArgument("stylize: seed must be below 2**63", reason="invalid_argument")
    return StyleParams(
        optimizer=_enum(request.optimizer, OPTIMIZERS, "optimizer"),  # type: ignore[arg-type]
        init=_enum(request.init, INITS, "init"),  # type: ignore[arg-type]
        original_colors=request.original_colors,
        seed=int(request.seed),
        preview_every=max(0, request.preview_every),
        **kwargs,
    )


# --- result -> protobuf ---------------------------------------------------------------------------


def tensor_proto(arr: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(arr, dtype="<f4")
    return pb.Tensor(shape=list(a.shape), dtype="float32", data=a.tobytes())


def _score(model: LoadedModel, index: int, probability: float) -> pb.ClassScore:
    label = model.labels[index] if index < len(model.labels) else ""
    return pb.ClassScore(index=index, label=label, probability=probability)


def explain_response(result: jobs.ExplainResult, model: LoadedModel, method: str) -> pb.ExplainResponse:
    explanations = []
    for i in range(result.saliency.shape[0]):
        cls = int(result.classes[i])
        e = pb.Explanation(
            saliency=tensor_proto(result.saliency[i]),
            png=result.pngs[i] if i < len(result.pngs) else b"",
            explained=_score(model, cls, float(result.probabilities[i])),
            predicted=_score(model, int(result.predicted[i]), float(result.predicted_probabilities[i])),
        )
        if result.plain is not None:
            e.plain_gradient.CopyFrom(tensor_proto(result.plain[i]))
        if result.cam is not None:
            e.gradcam.CopyFrom(tensor_proto(result.cam[i]))
        explanations.append(e)
    return pb.ExplainResponse(
        model=result.model,
        version=result.version,
        method=EXPLAIN_METHOD_ENUM.get(method, pb.EXPLAIN_METHOD_UNSPECIFIED),
        explanations=explanations,
        seconds=result.seconds,
    )


def progress_proto(update: jobs.ProgressUpdate) -> pb.GradientProgress:
    return pb.GradientProgress(
        step=int(update.step),
        total_steps=int(update.total_steps),
        octave=int(update.octave or 0),
        losses={k: float(v) for k, v in update.losses.items()},
        preview_png=update.preview_png or b"",
    )


def dream_result(result: jobs.DreamResult) -> pb.DreamResult:
    h, w = result.image.shape[:2]
    return pb.DreamResult(
        model=result.model,
        version=result.version,
        png=result.png,
        width=w,
        height=h,
        steps=result.steps,
        objective_before=result.objective_before,
        objective_after=result.objective_after,
        layers=[pb.DreamLayer(layer=name, weight=weight) for name, weight in result.layers],
        seconds=result.seconds,
    )


def stylize_result(result: jobs.StylizeResult) -> pb.StylizeResult:
    h, w = result.image.shape[:2]
    return pb.StylizeResult(
        model=result.model,
        version=result.version,
        png=result.png,
        width=w,
        height=h,
        iterations=result.iterations,
        best_iteration=result.best_iteration,
        losses={k: float(v) for k, v in result.losses.items()},
        initial_losses={k: float(v) for k, v in result.initial_losses.items()},
        seconds=result.seconds,
    )


# --- the RPCs -------------------------------------------------------------------------------------


class GradientRpcs:
    """Mixed into service.servicers.InferenceServicer (which sets `_state`)."""

    _state: ServingState

    def _prepare(self, name: str, version: int, kind: str, rpc: Rpc) -> tuple[Pool, LoadedModel]:
        state = self._state
        state.check_ready()
        pool = state.gradients
        if pool is None:
            raise Unavailable(DISABLED_MESSAGE, reason="workers_disabled")
        model = state.resolve_model(name, version)
        rpc.model = model.name
        if not model.capabilities.get(kind, False):
            raise InvalidArgument(
                f"model {model.name!r} version {model.version} ({model.architecture}) "
                f"does not support {kind}",
                reason="unsupported",
            )
        refused = refused_reason(pool, model)
        if refused is not None:
            raise FailedPrecondition(
                f"model {model.name!r} version {model.version} is not offered for gradient RPCs: {refused}",
                reason="parity_failed",
            )
        return pool, model

    def _limits(self) -> Limits:
        return Limits.from_settings(self._state.settings)

    async def _run(
        self,
        pool: Pool,
        task: jobs.Job,
        context: grpc.aio.ServicerContext,
        on_progress: Callable[[Any], None] | None = None,
    ) -> Any:
        await asyncio.to_thread(jobs.validate_job, task, self._limits())
        cost = jobs.estimate_cost(task)
        deadline = self._state.deadline(context)
        # max_task_duration_s bounds a job from admission to result, whatever deadline the client set.
        cap_s = self._state.settings.max_task_duration_s
        capped = time.monotonic() + cap_s
        if capped >= deadline:
            return await pool.submit(task, cost=cost, deadline=deadline, on_progress=on_progress)
        try:
            return await pool.submit(task, cost=cost, deadline=capped, on_progress=on_progress)
        except DeadlineExceeded as exc:
            raise DeadlineExceeded(
                f"the {task.kind} job was stopped after max_task_duration_s={cap_s:g} s ({exc})",
                reason="task_duration",
            ) from exc

    # Explain -----------------------------------------------------------------------------------

    async def _explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext, rpc: Rpc
    ) -> pb.ExplainResponse:
        pool, model = self._prepare(request.model, request.version, "explain", rpc)
        method = _enum(request.method, EXPLAIN_METHOD_NAMES, "explain method")
        if not request.images:
            raise InvalidArgument("images is empty: send at least one image", reason="empty_image")
        limit = self._state.settings.max_task_batch
        if len(request.images) > limit:
            raise InvalidArgument(
                f"{len(request.images)} images in one Explain; the limit is max_task_batch={limit}",
                reason="too_many_images",
            )
        targets = explain_targets(request, model, len(request.images))
        inputs = await asyncio.to_thread(
            explain_inputs, list(request.images), model, self._state.settings.max_image_pixels
        )
        task = jobs.ExplainJob(
            model=model.name,
            version=model.version,
            inputs=inputs,
            targets=targets,
            method=method,
            plain_gradient=request.include_plain_gradient,
        )
        result = await self._run(pool, task, context)
        return explain_response(result, model, method)

    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainResponse:
        from service.servicers import unary

        return await unary("Explain", context, lambda rpc: self._explain(request, context, rpc))

    # Dream / Stylize ---------------------------------------------------------------------------

    async def _dream_task(self, request: pb.DreamRequest, rpc: Rpc) -> tuple[Pool, jobs.DreamJob]:
        pool, model = self._prepare(request.model, request.version, "dream", rpc)
        params = dream_params(request)
        if not request.HasField("image"):
            raise InvalidArgument("image is required", reason="empty_image")
        image = await asyncio.to_thread(
            decode_rgb, request.image, model, "image", self._state.settings.max_image_pixels
        )
        return pool, jobs.DreamJob(model=model.name, version=model.version, image=image, params=params)

    async def _stylize_task(self, request: pb.StylizeRequest, rpc: Rpc) -> tuple[Pool, jobs.StylizeJob]:
        pool, model = self._prepare(request.model, request.version, "stylize", rpc)
        params = style_params(request)
        if not request.HasField("content"):
            raise InvalidArgument("content is required", reason="empty_image")
        if not request.styles:
            raise InvalidArgument("styles is empty: send at least one style image", reason="empty_image")
        limit = self._state.settings.max_task_batch
        if len(request.styles) > limit:
            raise InvalidArgument(
                f"{len(request.styles)} style images; the limit is max_task_batch={limit}",
                reason="too_many_images",
            )
        max_pixels = self._state.settings.max_image_pixels

        def decode_all() -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
            content = decode_rgb(request.content, model, "content image", max_pixels)
            styles = tuple(
                decode_rgb(s.image, model, f"style image {i}", max_pixels)
                for i, s in enumerate(request.styles)
            )
            return content, styles

        content, styles = await asyncio.to_thread(decode_all)
        weights = tuple(float(s.weight) for s in request.styles)
        blend = weights if any(w != 0 for w in weights) else None
        task = jobs.StylizeJob(
            model=model.name,
            version=model.version,
            content=content,
            styles=styles,
            style_blend=blend,
            params=params,
        )
        return pool, task

    async def DreamUnary(self, request: pb.DreamRequest, context: grpc.aio.ServicerContext) -> pb.DreamResult:
        from service.servicers import unary

        async def work(rpc: Rpc) -> pb.DreamResult:
            pool, task = await self._dream_task(request, rpc)
            return dream_result(await self._run(pool, task, context))

        return await unary("DreamUnary", context, work)

    async def StylizeUnary(
        self, request: pb.StylizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.StylizeResult:
        from service.servicers import unary

        async def work(rpc: Rpc) -> pb.StylizeResult:
            pool, task = await self._stylize_task(request, rpc)
            return stylize_result(await self._run(pool, task, context))

        return await unary("StylizeUnary", context, work)

    async def Dream(
        self, request: pb.DreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DreamResponse]:
        async for message in self._streaming(
            "Dream",
            context,
            lambda rpc: self._dream_task(request, rpc),
            lambda p: pb.DreamResponse(progress=p),
            lambda r: pb.DreamResponse(result=dream_result(r)),
        ):
            yield message

    async def Stylize(
        self, request: pb.StylizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StylizeResponse]:
        async for message in self._streaming(
            "Stylize",
            context,
            lambda rpc: self._stylize_task(request, rpc),
            lambda p: pb.StylizeResponse(progress=p),
            lambda r: pb.StylizeResponse(result=stylize_result(r)),
        ):
            yield message

    async def _streaming(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        build: Callable[[Rpc], Awaitable[tuple[Pool, Any]]],
        progress_message: Callable[[pb.GradientProgress], Any],
        result_message: Callable[[Any], Any],
    ) -> AsyncIterator[Any]:
        """Progress messages as the worker reports them, then the result; any failure becomes the
        call's status (with metrics), cancellation stops the job."""
        from service.servicers import Rpc

        rpc = Rpc(method)
        INFLIGHT.labels(method).inc()
        failure: Exception | None = None
        job: asyncio.Task[Any] | None = None
        try:
            pool, task = await build(rpc)
            updates: asyncio.Queue[jobs.ProgressUpdate] = asyncio.Queue()
            job = asyncio.ensure_future(self._run(pool, task, context, on_progress=updates.put_nowait))
            while True:
                getter = asyncio.ensure_future(updates.get())
                try:
                    await asyncio.wait({job, getter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()
                if getter.done() and not getter.cancelled():
                    yield checked_response(progress_message(progress_proto(getter.result())))
                    continue
                break
            while not updates.empty():  # reported before the job finished
                yield checked_response(progress_message(progress_proto(updates.get_nowait())))
            result = job.result()
            yield checked_response(result_message(result))
        except asyncio.CancelledError:
            rpc.cancelled(context)
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never UNKNOWN
            failure = exc
        else:
            rpc.succeeded()
        finally:
            INFLIGHT.labels(method).dec()
            if job is not None and not job.done():
                job.cancel()
        if failure is not None:
            code, message = rpc.failed(failure)
            await context.abort(code, message)


def refused_reason(pool: object | None, model: LoadedModel) -> str | None:
    """Why the gradient workers refused this model version (it failed their parity self-test with
    model.onnx, service.worker.loading._load_version), or None. A remote worker tier reports its own
    refusals (FAILED_PRECONDITION from the tier); only a local pool's are known here."""
    summary = getattr(pool, "ready_summary", None)
    refused = summary.get("refused") if isinstance(summary, Mapping) else None
    if not isinstance(refused, Mapping):
        return None
    reason = refused.get(f"{model.name}:{model.version}")
    return str(reason) if reason is not None else None


def served_capabilities(
    base: frozenset[str], pool: object | None, model: LoadedModel | None = None
) -> frozenset[str]:
    """What ModelInfo.capabilities may list: the gradient RPCs only with a worker pool, and not for
    a `model` version the workers refused."""
    if pool is None or (model is not None and refused_reason(pool, model) is not None):
        return base
    return base | GRADIENT_CAPABILITIES


__all__ = [
    "DISABLED_MESSAGE",
    "GRADIENT_CAPABILITIES",
    "GradientRpcs",
    "refused_reason",
    "served_capabilities",
]
