"""The cnnserve.v1.Inference servicer: each RPC is convert -> the classify path or a gradient
backend -> convert, inside the call skeleton of calls.py.

Composition, not subclasses: the serving tier passes its ClassifyPath and a gradient backend (its
own pool, LocalGradients, or the gradient tier, ForwardedGradients); the gradient tier passes no
ClassifyPath, and Classify, ClassifyBatch and ClassifyStream answer UNIMPLEMENTED there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from service.catalog import features_dim
from service.engine.protocol import FEATURES, LOGITS, features_missing
from service.errors import InvalidArgument, ServiceError
from service.frontend import convert
from service.frontend.calls import Rpc, item, streamed, unary
from service.frontend.classify import ClassifyPath, Timings, merge_timings
from service.frontend.gradients import GradientBackend

from .._proto.cnnserve.v1 import inference_pb2 as pb
from .._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from service.catalog import LoadedModel
    from service.frontend.state import ServingState

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context: TypeAlias = grpc.aio.ServicerContext


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "unimplemented"


class InferenceServicer(pb_grpc.InferenceServicer):
    """cnnserve.v1.Inference over a classify path (None: classification is not served here, with
    `not_served` as the message) and a gradient backend."""

    def __init__(
        self,
        state: ServingState,
        *,
        classify: ClassifyPath | None,
        gradients: GradientBackend,
        not_served: str = "",
    ) -> None:
        self._state = state
        self._classify = classify
        self._gradients = gradients
        self._not_served = not_served
        self._served = convert.SERVED_CAPABILITIES if classify is not None else frozenset()

    # --- classification ------------------------------------------------------------------------

    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        return await unary("Classify", context, lambda rpc: self.classify_one(request, context, rpc))

    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: Context
    ) -> pb.ClassifyBatchResponse:
        async def work(rpc: Rpc) -> pb.ClassifyBatchResponse:
            start = time.perf_counter()
            path = self._path()
            state = self._state
            state.check_ready()
            model = state.resolve_model(request.model, request.version)
            rpc.model = model.name
            top_k = convert.resolve_top_k(request.top_k, model, state.settings.max_top_k)
            if not request.images:
                raise InvalidArgument("images is empty: send at least one image", reason="empty_image")
            state.check_image_count(len(request.images))
            deadline = state.deadline(context)
            probabilities, timings = await self._classify_inputs(path, model, request.images, deadline)
            return pb.ClassifyBatchResponse(
                model=model.name,
                version=model.version,
                results=[
                    pb.Classification(classes=convert.top_classes(row, top_k, model.labels))
                    for row in probabilities
                ],
                timings=convert.timings_proto(timings, time.perf_counter() - start),
                untrained=not model.trained,
            )

        return await unary("ClassifyBatch", context, work)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyStreamRequest], context: Context
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """Reads items as they come, classifies up to a window of them concurrently (so they can
        share batches) and answers each as soon as it is done. Exactly one response per item.

        Metrics count items (method="ClassifyStream"); the stream itself shows in the in-flight
        gauge and, when it fails as a whole (not ready at the start, a broken request stream), as
        one request with its code.
        """

        async for response in self._serve_stream(
            "ClassifyStream", request_iterator, context, self.classify_one, pb.ClassifyStreamResponse
        ):
            yield response

    def _path(self) -> ClassifyPath:
        if self._classify is None:
            raise Unimplemented(self._not_served)
        return self._classify

    async def classify_one(
        self, request: pb.ClassifyRequest, context: Context, rpc: Rpc
    ) -> pb.ClassifyResponse:
        start = time.perf_counter()
        path = self._path()
        state = self._state
        state.check_ready()
        model = state.resolve_model(request.model, request.version)
        rpc.model = model.name
        top_k = convert.resolve_top_k(request.top_k, model, state.settings.max_top_k)
        if not request.HasField("image"):
            raise InvalidArgument("image is required", reason="empty_image")
        deadline = state.deadline(context, cap_longer=rpc.method == "ClassifyStream")
        probabilities, timings = await self._classify_inputs(path, model, [request.image], deadline)
        return pb.ClassifyResponse(
            model=model.name,
            version=model.version,
            classes=convert.top_classes(probabilities[0], top_k, model.labels),
            timings=convert.timings_proto(timings, time.perf_counter() - start),
            untrained=not model.trained,
        )

    async def _classify_inputs(
        self, path: ClassifyPath, model: LoadedModel, inputs: Sequence[pb.ImageInput], deadline: float
    ) -> tuple[np.ndarray, Timings | None]:
        """Probabilities [n, K] for request images in request order."""
        return await self._run_inputs(
            model,
            inputs,
            lambda images: path.classify_images(model, images, deadline),
            lambda batch: path.classify_tensors(model, batch, deadline, checked=True),
        )

    async def _run_inputs(
        self,
        model: LoadedModel,
        inputs: Sequence[pb.ImageInput],
        run_images: Callable[[list[bytes]], Awaitable[tuple[np.ndarray, Timings]]],
        run_tensors: Callable[[np.ndarray], Awaitable[tuple[np.ndarray, Timings]]],
    ) -> tuple[np.ndarray, Timings | None]:
        """Rows [n, ...] for request images in request order: encoded images go to `run_images`,
        tensors (checked here) to `run_tensors`; both kinds may be mixed (two concurrent calls)."""
        encoded: list[tuple[int, bytes]] = []
        tensors: list[tuple[int, np.ndarray]] = []
        for position, image in enumerate(inputs):
            kind = image.WhichOneof("kind")
            if kind == "encoded":
                encoded.append((position, image.encoded))
            elif kind == "tensor":
                try:
                    tensors.append((position, convert.tensor_from_proto(image.tensor, model)))
                except InvalidArgument as exc:
                    where = f"image {position}: " if len(inputs) > 1 else ""
                    raise InvalidArgument(where + exc.message, reason=exc.reason) from None
            else:
                where = f"image {position}" if len(inputs) > 1 else "image"
                raise InvalidArgument(f"{where} is empty: set `encoded` or `tensor`", reason="empty_image")
        calls: list[Awaitable[tuple[np.ndarray, Timings]]] = []
        if encoded:
            calls.append(run_images([data for _, data in encoded]))
        if tensors:
            calls.append(run_tensors(np.concatenate([t for _, t in tensors])))
        if len(calls) == 1:  # one kind of input, the usual case: already in request order
            return await calls[0]
        outcomes = await _first_error_gather(*calls)
        rows = np.empty((len(inputs), outcomes[0][0].shape[1]), dtype=np.float32)
        groups = [g for g in (encoded, tensors) if g]
        for group, (part, _) in zip(groups, outcomes, strict=True):
            rows[[position for position, _ in group]] = part
        return rows, merge_timings([t for _, t in outcomes])

    # --- embeddings ----------------------------------------------------------------------------

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        return await unary("Embed", context, lambda rpc: self._embed_one(request, context, rpc))

    async def EmbedStream(
        self, request_iterator: AsyncIterator[pb.EmbedStreamRequest], context: Context
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        """ClassifyStream's machinery and contract, with Embed's items."""

        async for response in self._serve_stream(
            "EmbedStream", request_iterator, context, self._embed_one, pb.EmbedStreamResponse
        ):
            yield response

    async def _embed_one(self, request: pb.EmbedRequest, context: Context, rpc: Rpc) -> pb.EmbedResponse:
        """The features (and with top_k the classes) of one image, from one engine call: the
        engine's rows hold both outputs of the same ONNX Runtime run."""
        start = time.perf_counter()
        path = self._path()
        state = self._state
        state.check_ready()
        model = state.resolve_model(request.model, request.version)
        rpc.model = model.name
        if not features_dim(model):  # refused before admission; the engine checks it too
            raise features_missing(model)
        top_k = convert.resolve_top_k(request.top_k, model, state.settings.max_top_k) if request.top_k else 0
        if not request.HasField("image"):
            raise InvalidArgument("image is required", reason="empty_image")
        deadline = state.deadline(context, cap_longer=rpc.method == "EmbedStream")
        outputs = (FEATURES, LOGITS) if top_k else (FEATURES,)
        rows, timings = await self._run_inputs(
            model,
            [request.image],
            lambda images: path.images_logits(model, images, deadline, outputs),
            lambda batch: path.infer(model, batch, deadline, checked=True, outputs=outputs),
        )
        return convert.embed_response(
            model,
            rows[0],
            normalize=request.normalize,
            top_k=top_k,
            timings=convert.timings_proto(timings, time.perf_counter() - start),
        )

    # --- streams -------------------------------------------------------------------------------

    def _stream_window(self) -> int:
        # Items of one stream classified concurrently: enough to fill a couple of batches, so a
        # single streaming client still gets batched, without one stream taking the whole queue.
        settings = self._state.settings
        return max(1, min(settings.max_queue_size, 2 * settings.max_batch_size))

    async def _serve_stream(
        self,
        method: str,
        request_iterator: AsyncIterator[Any],
        context: Context,
        one: Callable[[Any, Context, Rpc], Awaitable[Any]],
        response_type: Callable[..., Resp],
    ) -> AsyncIterator[Resp]:
        """A `method` stream of the classify path: ready checks, then each item's `request` done by
        `one` and answered with a `response_type` (its result or its status)."""

        def produce(rpc: Rpc) -> AsyncIterator[Resp]:
            self._path()
            self._state.check_ready()
            return self._stream(request_iterator, context, self._answer_items(method, one, response_type))

        async for response in streamed(method, context, produce, items=True):
            yield response

    def _answer_items(
        self,
        method: str,
        one: Callable[[Any, Context, Rpc], Awaitable[Any]],
        response_type: Callable[..., Resp],
    ) -> Callable[[Any, Context], Coroutine[Any, Any, Resp]]:
        """The answer to one item of a `method` stream (its `request` done by `one`); never raises:
        errors become the item's status."""

        async def answer(request: Any, context: Context) -> Resp:
            async def work(rpc: Rpc) -> Resp:
                if not request.HasField("request"):
                    raise InvalidArgument("stream item has no request", reason="invalid_argument")
                return response_type(id=request.id, result=await one(request.request, context, rpc))

            def failed(code: grpc.StatusCode, message: str) -> Resp:
                return response_type(id=request.id, error=pb.Status(code=code.value[0], message=message))

            return await item(method, context, work, failed)

        return answer

    async def _stream(
        self,
        request_iterator: AsyncIterator[Req],
        context: Context,
        answer: Callable[[Req, Context], Coroutine[Any, Any, Resp]],
    ) -> AsyncIterator[Resp]:
        """A stream's items answered by `answer` (which never raises: errors are the item's
        status), up to a window of them concurrently, each as soon as it is done."""
        done: asyncio.Queue[Resp | None] = asyncio.Queue()
        window = asyncio.Semaphore(self._stream_window())
        running: set[asyncio.Task[Resp]] = set()
        reader_error: list[BaseException] = []

        def finished(task: asyncio.Task[Resp]) -> None:
            running.discard(task)
            window.release()
            if not task.cancelled() and task.exception() is None:
                done.put_nowait(task.result())

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(answer(request, context))
                    running.add(task)
                    task.add_done_callback(finished)
            except DecodeError as exc:
                # grpc.aio parses stream items as they are read, so a malformed one surfaces here.
                reader_error.append(
                    InvalidArgument(
                        f"malformed request: a stream item is not a valid message of this stream ({exc})",
                        reason="malformed",
                    )
                )
            except Exception as exc:  # noqa: BLE001 - re-raised by the writer below
                reader_error.append(exc)
            finally:
                done.put_nowait(None)  # end of input

        reader = asyncio.create_task(read())
        try:
            input_ended = False
            while not input_ended or running or not done.empty():
                response = await done.get()
                if response is None:
                    input_ended = True
                    continue
                yield response
            if reader_error:
                raise reader_error[0]
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    # --- gradients -----------------------------------------------------------------------------

    async def Explain(self, request: pb.ExplainRequest, context: Context) -> pb.ExplainResponse:
        return await unary("Explain", context, lambda rpc: self._gradients.explain(request, context, rpc))

    async def DreamUnary(self, request: pb.DreamRequest, context: Context) -> pb.DreamResult:
        return await unary(
            "DreamUnary", context, lambda rpc: self._gradients.dream_unary(request, context, rpc)
        )

    async def StylizeUnary(self, request: pb.StylizeRequest, context: Context) -> pb.StylizeResult:
        return await unary(
            "StylizeUnary", context, lambda rpc: self._gradients.stylize_unary(request, context, rpc)
        )

    async def FeatureMaps(self, request: pb.FeatureMapsRequest, context: Context) -> pb.FeatureMapsResponse:
        return await unary(
            "FeatureMaps", context, lambda rpc: self._gradients.feature_maps(request, context, rpc)
        )

    async def Filters(self, request: pb.FiltersRequest, context: Context) -> pb.FiltersResponse:
        return await unary("Filters", context, lambda rpc: self._gradients.filters(request, context, rpc))

    async def Dream(self, request: pb.DreamRequest, context: Context) -> AsyncIterator[pb.DreamResponse]:
        async for message in streamed(
            "Dream", context, lambda rpc: self._gradients.dream(request, context, rpc)
        ):
            yield message

    async def Stylize(
        self, request: pb.StylizeRequest, context: Context
    ) -> AsyncIterator[pb.StylizeResponse]:
        async for message in streamed(
            "Stylize", context, lambda rpc: self._gradients.stylize(request, context, rpc)
        ):
            yield message

    # --- models --------------------------------------------------------------------------------

    def _info(
        self, model: LoadedModel, include_labels: bool = False, include_layers: bool = False
    ) -> pb.ModelInfo:
        versions = [m.version for m in self._state.models.models() if m.name == model.name]
        return convert.model_info(
            model,
            versions=versions,
            ready=self._state.model_ready(model),
            include_labels=include_labels,
            include_layers=include_layers,
            served=self._served | self._gradients.capabilities(model),
        )

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        async def work(rpc: Rpc) -> pb.ListModelsResponse:
            return pb.ListModelsResponse(models=[self._info(m) for m in self._state.models.models()])

        return await unary("ListModels", context, work)

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.ModelInfo:
        async def work(rpc: Rpc) -> pb.ModelInfo:
            model = self._state.resolve_model(request.name, request.version)
            rpc.model = model.name
            # The layer table only here: hundreds of entries per model would bloat ListModels.
            return self._info(model, include_labels=request.include_labels, include_layers=True)

        return await unary("GetModel", context, work)


async def _first_error_gather(*aws: Awaitable[T]) -> list[T]:
    """Like asyncio.gather, but the first failure cancels the others (no orphaned work)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


__all__ = ["InferenceServicer", "Unimplemented"]
