"""The floor: the least a Python gRPC server has to do per Classify, as a same-run baseline.

A bare grpc.aio server whose Classify does only the essential work, inline on the event loop, with
the service's own code: decode (service.images: the header pixel cap, EXIF orientation), preprocess
into the input tensor (service.images.image_to_tensor), one ONNX Runtime call per request on a
session built like the service's (bench.raw_ort.open_session), softmax, top-k, the response. No
batching, no deadlines, no admission control, no metrics, no thread hops, and no error handling
beyond what grpc.aio does by itself. Nobody should serve with it: it answers "what does a
hand-rolled Python server doing the same work reach on this machine", which bounds what cnnserve
(a Python server doing that work and more) can reach here.

With --no-model it skips the ONNX Runtime call (all-zero logits): the cost of gRPC, decoding,
preprocessing and the response alone.

    python -m bench.floor MODEL_DIR [--no-model]   # MODEL_DIR holds model.onnx and metadata.json;
                                                    # prints "listening 127.0.0.1:PORT", serves until SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from bench.load import serve_baseline
from bench.raw_ort import open_session
from export.preprocessing import Preprocessing
from service import images
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.frontend.classify import softmax
from service.frontend.convert import top_classes
from service.settings import Settings


class FloorServicer(pb_grpc.InferenceServicer):
    """Classify for the one model in `model_dir`, everything inline (see the module doc)."""

    def __init__(self, model_dir: Path, *, run_model: bool = True) -> None:
        meta = json.loads((model_dir / "metadata.json").read_text())
        self.name = str(meta["name"])
        self.version = int(meta["version"])
        self.shape = tuple(int(d) for d in meta["input"]["shape"])
        self.num_classes = int(meta["num_classes"])
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.labels: Sequence[str] = tuple(str(x) for x in meta.get("labels") or ())
        self.max_pixels = int(Settings.model_fields["max_image_pixels"].default)
        self.session = open_session(model_dir / "model.onnx") if run_model else None
        if self.session is not None:
            self.session.warmup([1])

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        start = time.perf_counter()
        x = np.empty((1, *self.shape), dtype=np.float32)
        image = images.decode_image(request.image.encoded, max_pixels=self.max_pixels)
        images.image_to_tensor(image, self.preprocessing, out=x[0])
        if self.session is not None:
            logits = self.session.run(x)
        else:
            logits = np.zeros((1, self.num_classes), dtype=np.float32)
        probabilities = softmax(logits)[0]
        return pb.ClassifyResponse(
            model=self.name,
            version=self.version,
            classes=top_classes(probabilities, request.top_k or 5, self.labels),
            timings=pb.Timings(total_seconds=time.perf_counter() - start),
        )


async def serve(model_dir: Path, *, run_model: bool, port: int = 0) -> None:
    await serve_baseline(FloorServicer(model_dir, run_model=run_model), port)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path, help="a model version directory (model.onnx, metadata.json)")
    p.add_argument("--no-model", action="store_true", help="skip the ONNX Runtime call (zero logits)")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(serve(args.model_dir, run_model=not args.no_model, port=args.port))


if __name__ == "__main__":
    main()
