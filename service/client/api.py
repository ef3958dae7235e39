"""CnnserveClient: the synchronous client of cnnserve.v1.Inference (usage: service.client's
docstring). It converts, calls and converts back; the channel, the images, the results and the
stream machinery each have their own module next to this one."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.client.channel import default_channel_options
from service.client.gradient_results import (
    EXPLAIN_METHODS,
    STYLE_INITS,
    STYLE_OPTIMIZERS,
    DreamLayer,
    DreamResult,
    EmbedResult,
    ExplainResult,
    FeatureMapsResult,
    FiltersResult,
    GradientProgress,
    Neuron,
    StylizeResult,
    choice,
    dream_layers,
    dream_result,
    embed_result,
    explain_result,
    feature_maps_result,
    filters_result,
    progress,
    stylize_result,
)
from service.client.images import ImageLike, image_input
from service.client.results import (
    ClassifyResult,
    CnnserveError,
    StreamResult,
    call_error,
    classify_result,
    scores,
    timings,
)
from service.client.stream import ItemStream, read_responses

T = TypeVar("T")
ProgressCallback = Callable[[GradientProgress], None]

# What explain(), stylize() and feature_maps() take as "one or several": a list or a tuple is
# several; anything else (bytes, a path, an array, a PIL image, a layer name) is one.
_MANY = (list, tuple)


def _images(images: ImageLike | Sequence[ImageLike]) -> list[pb.ImageInput]:
    if isinstance(images, _MANY):
        return [image_input(i) for i in images]
    return [image_input(images)]  # type: ignore[arg-type]  # not a list or tuple: one image


def _is_pair(style: object) -> bool:
    """Whether a stylize() style is one (image, weight) pair rather than a tuple of images."""
    return (
        isinstance(style, tuple)
        and len(style) == 2
        and isinstance(style[1], int | float)
        and not isinstance(style[1], bool)
    )


def _style_images(styles: Any) -> list[pb.StyleImage]:
    """stylize()'s `styles` (one image, a list or tuple of them, each maybe an (image, weight) pair)."""
    items = list(styles) if isinstance(styles, _MANY) and not _is_pair(styles) else [styles]
    pairs = [style if _is_pair(style) else (style, 0.0) for style in items]
    return [pb.StyleImage(image=image_input(image), weight=float(weight)) for image, weight in pairs]


def _set_optional(message: Any, **values: object) -> None:
    """Set the `optional` fields given (not None): an unset field takes the server's default."""
    for name, value in values.items():
        if value is not None:
            setattr(message, name, value)


def _run_stream(responses: Any, on_progress: ProgressCallback | None, convert: Callable[[Any], T]) -> T:
    """Read a Dream/Stylize stream: each progress message to `on_progress`, in order, then the one
    final result, converted. The call is cancelled whenever this returns or raises early (a
    KeyboardInterrupt, an exception from on_progress): the server then stops the job."""
    try:
        for response in responses:
            if response.WhichOneof("kind") == "progress":
                if on_progress is not None:
                    on_progress(progress(response.progress))
            elif response.WhichOneof("kind") == "result":
                return convert(response.result)
    except grpc.RpcError as exc:
        raise call_error(exc) from None
    finally:
        responses.cancel()
    raise CnnserveError(grpc.StatusCode.INTERNAL, "the stream ended without a result")


class CnnserveClient:
    """Synchronous client; thread-safe (one channel, shared). Use as a context manager or close()."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float | None = 30.0,
        options: Sequence[tuple[str, Any]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """`address` is any gRPC target ("host:port", "dns:///name:port"); `timeout_s` the default
        deadline of every call (None: no deadline); `options` replaces default_channel_options()."""
        channel_options = list(default_channel_options() if options is None else options)
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=channel_options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=channel_options)
        self._stub = pb_grpc.InferenceStub(self._channel)  # type: ignore[no-untyped-call]
        self.timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CnnserveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    def classify(
        self,
        image: ImageLike,
        *,
        model: str,
        version: int = 0,
        top_k: int = 0,
        timeout_s: float | None = None,
    ) -> ClassifyResult:
        """The top_k classes of one image (top_k 0: the server default, 5)."""
        request = pb.ClassifyRequest(model=model, version=version, top_k=top_k, image=image_input(image))
        try:
            return classify_result(self._stub.Classify(request, timeout=self._timeout(timeout_s)))
        except grpc.RpcError as exc:
            raise call_error(exc) from None

    def classify_batch(
        self,
        images: Sequence[ImageLike],
        *,
        model: str,
        version: int = 0,
        top_k: int = 0,
        timeout_s: float | None = None,
    ) -> list[ClassifyResult]:
        """One result per image, in order; one bad image fails the call (CnnserveError)."""
        request = pb.ClassifyBatchRequest(
            model=model, version=version, top_k=top_k, images=[image_input(i) for i in images]
        )
        try:
            response = self._stub.ClassifyBatch(request, timeout=self._timeout(timeout_s))
        except grpc.RpcError as exc:
            raise call_error(exc) from None
        batch_timings = timings(response.timings)
        return [
            ClassifyResult(response.model, response.version, scores(r.classes), batch_timings)
            for r in response.results
        ]

    def classify_stream(
        self,
        images: Iterable[tuple[str, ImageLike]],
        *,
        model: str,
        version: int = 0,
        top_k: int = 0,
        timeout_s: float | None = None,
        stream_timeout_s: float | None = None,
    ) -> Iterator[StreamResult]:
        """Classify (id, image) pairs over one stream; yields one StreamResult per pair as each
        completes (not necessarily in order). Per-item failures come back as StreamResult.error;
        a failure of the whole stream raises CnnserveError. `images` is consumed lazily, from a
        background thread, so it may be a generator producing images as they arrive.

        `timeout_s` is each item's deadline (default: the client's), counted from when the stream
        takes the item: an item not answered in time comes back as a DEADLINE_EXCEEDED error and
        its late answer is dropped. The stream itself has no deadline unless `stream_timeout_s`
        is given (the server still gives each item at most its max_deadline_s). Ids must be unique
        among the items in flight (ValueError).

        The caller's own errors (an item that is not an (id, image) pair: TypeError; a missing
        file: FileNotFoundError; ...) are raised as they are, never as a CnnserveError.
        """
        stream = ItemStream(self._timeout(timeout_s))

        def request(image: ImageLike) -> pb.ClassifyRequest:
            return pb.ClassifyRequest(model=model, version=version, top_k=top_k, image=image_input(image))

        call = self._stub.ClassifyStream(stream.requests(images, request), timeout=stream_timeout_s)
        reader = threading.Thread(
            target=read_responses, args=(call, stream.events), daemon=True, name="classify-stream"
        )
        reader.start()
        try:
            yield from stream.results()
        finally:
            call.cancel()

    def list_models(self, *, timeout_s: float | None = None) -> list[pb.ModelInfo]:
        """Every loaded model version (the ModelInfo protobuf messages)."""
        try:
            return list(
                self._stub.ListModels(pb.ListModelsRequest(), timeout=self._timeout(timeout_s)).models
            )
        except grpc.RpcError as exc:
            raise call_error(exc) from None

    def get_model(
        self, name: str, *, version: int = 0, include_labels: bool = False, timeout_s: float | None = None
    ) -> pb.ModelInfo:
        """One model version's metadata (version 0: the latest)."""
        request = pb.GetModelRequest(name=name, version=version, include_labels=include_labels)
        try:
            info: pb.ModelInfo = self._stub.GetModel(request, timeout=self._timeout(timeout_s))
            return info
        except grpc.RpcError as exc:
            raise call_error(exc) from None

    # --- gradient RPCs and embeddings (result types: gradient_results.py) -------------------------

    def explain(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        model: str,
        version: int = 0,
        target: int | Sequence[int] | None = None,
        method: str = "guided_backprop",
        plain_gradient: bool = False,
        neuron: Neuron | str | None = None,
        timeout_s: float | None = None,
    ) -> ExplainResult:
        """Saliency maps of one image or a list of them (1..max_task_batch), one Explanation each.

        `target`: the class to explain, None for each image's predicted class, one int for every
        image, or one per image. `method`: "guided_backprop", "guided_gradcam" or "gradcam".
        `plain_gradient`: also the unguided input gradient. `neuron`: explain one unit instead of a
        class (a Neuron, or "LAYER:CHANNEL[:Y,X]"); leave `target` None then."""
        if isinstance(neuron, str):
            neuron = Neuron.parse(neuron)
        targets = [] if target is None else [target] if isinstance(target, int) else list(target)
        request = pb.ExplainRequest(
            model=model,
            version=version,
            images=_images(images),
            target_classes=targets,
            method=choice("method", method, EXPLAIN_METHODS),
            include_plain_gradient=plain_gradient,
        )
        if neuron is not None:
            request.neuron.CopyFrom(neuron.message())
        try:
            return explain_result(self._stub.Explain(request, timeout=self._timeout(timeout_s)))
        except grpc.RpcError as exc:
            raise call_error(exc) from None

    def dream(
        self,
        image: ImageLike,
        *,
        model: str,
        version: int = 0,
        layers: str | Sequence[str | DreamLayer] | None = None,
        octaves: int | None = None,
        octave_scale: float | None = None,
        steps: int | None = None,
        step_size: float | None = None,
        jitter: int | None = None,
        tile_size: int | None = None,
        max_side: int | None = None,
        seed: int = 0,
        preview_every: int = 0,
        on_progress: ProgressCallback | None = None,
        timeout_s: float | None = None,
    ) -> DreamResult:
        """DeepDream of one encoded image over the streaming Dream RPC: `on_progress(progress)`
        is called for each step, in order (a GradientProgress; `preview_png` every
        `preview_every` steps), then the final result is returned. Parameters left None take the
        server's defaults (inference.proto's DreamRequest); `layers` None: the architecture's
        default layer. Raising from on_progress (or Ctrl-C) cancels the job on the server."""
        request = pb.DreamRequest(
            model=model,
            version=version,
            image=image_input(image),
            layers=dream_layers(layers),
            seed=seed,
            preview_every=preview_every,
        )
        _set_optional(
            request, octaves=octaves, octave_scale=octave_scale, steps=steps, step_size=step_size,
            jitter=jitter, tile_size=tile_size, max_side=max_side,
        )  # fmt: skip
        responses = self._stub.Dream(request, timeout=self._timeout(timeout_s))
        return _run_stream(responses, on_progress, dream_result)

    def stylize(
        self,
        content: ImageLike,
        styles: ImageLike | Sequence[ImageLike | tuple[ImageLike, float]],
        *,
        model: str = "vgg19",
        version: int = 0,
        iterations: int = 0,
        content_weight: float | None = None,
        style_weight: float | None = None,
        tv_weight: float | None = None,
        optimizer: str | None = None,
        learning_rate: float | None = None,
        style_scale: float | None = None,
        original_colors: bool = False,
        max_side: int | None = None,
        init: str | None = None,
        seed: int = 0,
        preview_every: int = 0,
        on_progress: ProgressCallback | None = None,
        timeout_s: float | None = None,
    ) -> StylizeResult:
        """Neural style transfer (a VGG-19 model) over the streaming Stylize RPC: `on_progress`
        as for dream(), then the final result. `styles`: one image or a list or tuple of them,
        each optionally an (image, blend weight) pair. `iterations` 0: the server's 300;
        `optimizer` "lbfgs" or "adam"; `init` "content" or "noise"; other parameters left None
        take the server's defaults (inference.proto's StylizeRequest)."""
        request = pb.StylizeRequest(
            model=model,
            version=version,
            content=image_input(content),
            styles=_style_images(styles),
            iterations=iterations,
            original_colors=original_colors,
            seed=seed,
            preview_every=preview_every,
        )
        if optimizer is not None:
            request.optimizer = choice("optimizer", optimizer, STYLE_OPTIMIZERS)
        if init is not None:
            request.init = choice("init", init, STYLE_INITS)
        _set_optional(
            request, content_weight=content_weight, style_weight=style_weight, tv_weight=tv_weight,
            learning_rate=learning_rate, style_scale=style_scale, max_side=max_side,
        )  # fmt: skip
        responses = self._stub.Stylize(request, timeout=self._timeout(timeout_s))
        return _run_stream(responses, on_progress, stylize_result)

    def embed(
        self,
        image: ImageLike,
        *,
        model: str,
        version: int = 0,
        normalize: bool = False,
        top_k: int = 0,
        timeout_s: float | None = None,
    ) -> EmbedResult:
        """The image's embedding (the penultimate activations, float32 [D]; L2-normalized when
        `normalize`), with the top_k classes of the same forward pass when top_k > 0."""
        request = pb.EmbedRequest(
            model=model, version=version, image=image_input(image), normalize=normalize, top_k=top_k
        )
        try:
            return embed_result(self._stub.Embed(request, timeout=self._timeout(timeout_s)))
        except grpc.RpcError as exc:
            raise call_error(exc) from None

    def feature_maps(
        self,
        image: ImageLike,
        *,
        model: str,
        layers: str | Sequence[str],
        version: int = 0,
        max_channels: int = 16,
        timeout_s: float | None = None,
    ) -> FeatureMapsResult:
        """The activations of named layers (ModelInfo.layers) for one image, one FeatureMap per
        layer in order, each with a PNG of its `max_channels` strongest channels."""
        request = pb.FeatureMapsRequest(
            model=model,
            version=version,
            image=image_input(image),
            layers=[layers] if isinstance(layers, str) else list(layers),
            max_channels=max_channels,
        )
        try:
            return feature_maps_result(self._stub.FeatureMaps(request, timeout=self._timeout(timeout_s)))
        except grpc.RpcError as exc:
            raise call_error(exc) from None

    def filters(
        self, *, model: str, layer: str = "", version: int = 0, timeout_s: float | None = None
    ) -> FiltersResult:
        """A convolution's learned kernels (`layer` "": the first convolution) and their PNG grid."""
        request = pb.FiltersRequest(model=model, version=version, layer=layer)
        try:
            return filters_result(self._stub.Filters(request, timeout=self._timeout(timeout_s)))
        except grpc.RpcError as exc:
            raise call_error(exc) from None
