"""CnnserveClient: the synchronous client of cnnserve.v1.Inference (usage: service.client's
docstring). It converts, calls and converts back; the channel, the images, the results and the
stream machinery each have their own module next to this one."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.client.channel import default_channel_options
from service.client.images import ImageLike, image_input
from service.client.results import (
    ClassifyResult,
    StreamResult,
    call_error,
    classify_result,
    scores,
    timings,
)
from service.client.stream import ItemStream, read_responses


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
