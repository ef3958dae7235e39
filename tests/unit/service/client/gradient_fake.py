"""An in-process fake cnnserve.v1.Inference for the client's gradient methods and commands: it
records every request and answers canned responses built from known numpy arrays, so a test can
assert both directions of the conversion exactly."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
from PIL import Image

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

SALIENCY = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5) / 7
GRADCAM = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
EMBEDDING = np.array([0.5, -1.25, 3.0], np.float32)
ACTIVATIONS = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3) - 4
WEIGHTS = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2) / 3
STEPS = 4


def png(side: int = 8, value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (value, value, value)).save(buffer, "PNG")
    return buffer.getvalue()


def tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(shape=list(array.shape), dtype="float32", data=array.astype("<f4").tobytes())


class RecordingInference(pb_grpc.InferenceServicer):
    """Records each request (`requests[method]`); a model named "missing" is NOT_FOUND, an image
    b"bad" INVALID_ARGUMENT. Dream/Stylize stream STEPS progress messages, then the result; a
    stream with `hang` set waits after its first progress until cancelled (then `cancelled` is set)."""

    def __init__(self) -> None:
        self.requests: dict[str, list[object]] = {}
        self.hang = False
        self.cancelled = threading.Event()

    def _record(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        self.requests.setdefault(method, []).append(request)
        if getattr(request, "model", "") == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown model 'missing'")
        images = [getattr(request, "image", None), getattr(request, "content", None)]
        images += list(getattr(request, "images", []))
        if any(i is not None and i.encoded == b"bad" for i in images):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "cannot decode the image")

    def Explain(self, request, context):  # type: ignore[no-untyped-def]
        self._record("Explain", request, context)
        explanations = []
        for index in range(len(request.images)):
            e = pb.Explanation(saliency=tensor(SALIENCY + index), png=png(), predicted=pb.ClassScore(
                index=3, label="three", probability=0.5))  # fmt: skip
            if request.HasField("neuron"):
                n = request.neuron
                y, x = (n.y, n.x) if n.HasField("y") else (1, 2)  # the fake's "strongest position"
                e.neuron.CopyFrom(pb.NeuronExplained(
                    layer=n.layer, channel=n.channel, y=y, x=x, activation=2.5,
                    field_top=0, field_left=1, field_bottom=10, field_right=11,
                ))  # fmt: skip
            else:
                target = (
                    request.target_classes[min(index, len(request.target_classes) - 1)]
                    if request.target_classes
                    else 3
                )
                e.explained.CopyFrom(pb.ClassScore(index=target, label=f"class {target}", probability=0.25))
            if request.include_plain_gradient:
                e.plain_gradient.CopyFrom(tensor(-SALIENCY))
            if request.method in (pb.EXPLAIN_METHOD_GUIDED_GRADCAM, pb.EXPLAIN_METHOD_GRADCAM):
                e.gradcam.CopyFrom(tensor(GRADCAM))
            explanations.append(e)
        method = request.method or pb.EXPLAIN_METHOD_GUIDED_BACKPROP
        return pb.ExplainResponse(model=request.model, version=4, method=method, explanations=explanations,
                                  seconds=0.5, untrained=_untrained(request.model))  # fmt: skip

    def _progress(
        self, context: grpc.ServicerContext, octave: int, losses: str
    ) -> Iterator[pb.GradientProgress]:
        if self.hang:
            # Run by gRPC when the call ends, which for a hanging stream is only by being cancelled
            # (registered up front: gRPC need not resume this generator once the client is gone).
            context.add_callback(self.cancelled.set)
        for step in range(1, STEPS + 1):
            preview = png(4, step) if step % 2 == 0 else b""
            yield pb.GradientProgress(
                step=step, total_steps=STEPS, octave=octave, losses={losses: float(step)}, preview_png=preview
            )
            if self.hang:
                while context.is_active():
                    time.sleep(0.01)
                return

    def Dream(self, request, context):  # type: ignore[no-untyped-def]
        self._record("Dream", request, context)
        for p in self._progress(context, 1, "objective"):
            yield pb.DreamResponse(progress=p)
        if self.hang:
            return
        layers = list(request.layers) or [pb.DreamLayer(layer="layer3", weight=1.0)]
        yield pb.DreamResponse(result=pb.DreamResult(
            model=request.model, version=2, png=png(16), width=16, height=16, steps=STEPS,
            objective_before=1.0, objective_after=9.0, layers=layers, seconds=1.5,
            untrained=_untrained(request.model),
        ))  # fmt: skip

    def Stylize(self, request, context):  # type: ignore[no-untyped-def]
        self._record("Stylize", request, context)
        for p in self._progress(context, 0, "total"):
            yield pb.StylizeResponse(progress=p)
        if self.hang:
            return
        yield pb.StylizeResponse(result=pb.StylizeResult(
            model=request.model, version=1, png=png(12), width=12, height=12, iterations=STEPS,
            best_iteration=3, losses={"total": 1.0, "style": 0.5}, initial_losses={"total": 8.0}, seconds=2.0,
            untrained=_untrained(request.model),
        ))  # fmt: skip

    def Embed(self, request, context):  # type: ignore[no-untyped-def]
        self._record("Embed", request, context)
        classes = [pb.ClassScore(index=i, label=f"c{i}", probability=0.1) for i in range(request.top_k)]
        return pb.EmbedResponse(model=request.model, version=1, embedding=tensor(EMBEDDING), norm=3.5,
                                classes=classes)  # fmt: skip

    def FeatureMaps(self, request, context):  # type: ignore[no-untyped-def]
        self._record("FeatureMaps", request, context)
        maps = [
            pb.FeatureMap(layer=layer, activations=tensor(ACTIVATIONS + i), png=png(), channels=[1, 0])
            for i, layer in enumerate(request.layers)
        ]
        predicted = pb.ClassScore(index=2, label="two", probability=0.75)
        return pb.FeatureMapsResponse(
            model=request.model, version=1, maps=maps, predicted=predicted, seconds=0.1
        )

    def Filters(self, request, context):  # type: ignore[no-untyped-def]
        self._record("Filters", request, context)
        return pb.FiltersResponse(model=request.model, version=1, layer=request.layer or "conv1",
                                  weights=tensor(WEIGHTS), png=png(), seconds=0.01)  # fmt: skip


def serve(servicer: RecordingInference) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _untrained(model: str) -> bool:
    """The fake's models named "untrained..." answer as the server does for random weights."""
    return model.startswith("untrained")
