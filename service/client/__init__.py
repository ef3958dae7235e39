"""A small synchronous Python client for cnnserve.v1.Inference.

    from service.client import CnnserveClient

    with CnnserveClient("localhost:8500") as client:
        result = client.classify(Path("cat.jpg").read_bytes(), model="resnet50", top_k=3)
        print(result.classes[0].label, result.classes[0].probability)

Images are encoded bytes (JPEG/PNG/WebP) or a path to such a file, sent as they are; a PIL image
or a uint8 numpy array of pixels ([H, W] grayscale, [H, W, C] with C 1, 3 or 4), encoded as PNG
(lossless: the server sees exactly these pixels); or a preprocessed numpy array (float32/float16,
[C, H, W] or [1, C, H, W]).

The default channel configuration (`default_channel_options`):

* load balancing `round_robin`: with a `dns:///name:port` target that resolves to several
  replicas (e.g. a Kubernetes headless service) calls spread over all of them;
* retries (`DEFAULT_SERVICE_CONFIG`, see "Retry policy" below) of UNAVAILABLE and CANCELLED for
  the unary RPCs: up to 4 attempts for classification and metadata, 2 for the gradient RPCs;
* keepalive pings every 30 s (timeout 10 s), also between calls: above the server's
  keepalive_min_client_ping_s (10 s by default), so the server never answers "too_many_pings";
* message limits of 64 MiB each way, matching the server's default max_message_bytes.

The gradient RPCs and embeddings (result types in gradient_results.py; tensors come back as float32
numpy arrays, exactly the server's values):

    with CnnserveClient("localhost:8500", timeout_s=300) as client:
        saliency = client.explain("cat.jpg", model="resnet50").explanations[0].saliency  # [3, 224, 224]
        dreamed = client.dream("cat.jpg", model="googlenet", steps=10, on_progress=print)
        Path("dream.png").write_bytes(dreamed.png)

* `explain(images, *, model, target, method, plain_gradient, neuron)` -> ExplainResult: one
  Explanation (saliency, png, explained/predicted ClassScore, plain_gradient, gradcam,
  NeuronExplained) per image; `neuron` a Neuron or "LAYER:CHANNEL[:Y,X]".
* `dream(image, *, model, layers, octaves, steps, ..., seed, preview_every, on_progress)` ->
  DreamResult and `stylize(content, styles, *, model="vgg19", iterations, ..., on_progress)` ->
  StylizeResult use the streaming RPCs: `on_progress(GradientProgress)` is called for each step, in
  order, before the result is returned; an exception from it (or Ctrl-C) cancels the job.
* `embed(image, *, model, normalize, top_k)` -> EmbedResult (vector, norm, classes);
  `feature_maps(image, *, model, layers, max_channels)` -> FeatureMapsResult (a FeatureMap per
  layer); `filters(*, model, layer)` -> FiltersResult (weights, png).

Errors are raised as `CnnserveError` with the gRPC status code and the server's message; a bad
argument the client can see itself (an unknown method name, a malformed neuron) as ValueError.

Retry policy (what a rolling update needs to lose nothing; tests/integration/test_rolling_update.py):

* Retried: UNAVAILABLE (a replica still loading or draining, "server is shutting down", a refused
  or reset connection, a crashed gradient worker) and CANCELLED. Our server never answers a call
  CANCELLED on purpose: it comes from a replica's graceful stop, which cancels the calls that had
  reached it but were not yet handed to a handler (gRPC core kills them when shutdown starts, so
  they never ran), and the calls still running when the grace period ends. A CANCELLED the
  caller asked for (call.cancel(), a deadline) is never retried by gRPC.
* Every retried RPC is idempotent: classification and metadata are pure reads, a gradient job
  has no side effects. Gradient jobs cost seconds of CPU, so they get 2 attempts (one retry; every
  attempt is a new round_robin pick, so usually another replica) against 4 for the rest: an input
  that crashes a worker is retried at most once (a server answers INTERNAL once it crashed twice).
* Not retried: RESOURCE_EXHAUSTED (a full queue or cost budget: an automatic retry by every
  client would multiply the load exactly when the server sheds it; gRPC also uses it for
  deterministic limits such as an oversize message); DEADLINE_EXCEEDED; streams (ClassifyStream,
  Dream, Stylize: an item or progress message may already have been answered; `cnnserve score`
  reopens its stream and re-sends the unanswered items itself, so the two never multiply).
* Backoff: gRPC waits a random 0..min(0.1 s x 2^n, 1 s) before attempt n+1, and the call's
  deadline covers every attempt. The per-call retry buffer is the message limit (gRPC's default,
  256 KiB, would silently make a request larger than that, one 224x224 float32 tensor say,
  unretryable).

The package, one concern a module (every name above is importable from `service.client`):
api.py (CnnserveClient), channel.py (the channel options, the retry policy, the connection
hint), images.py (what an image may be), results.py (the result types, CnnserveError),
gradient_results.py (the gradient and embedding result types), stream.py (classify_stream's
machinery), commands.py (`cnnserve classify` and `cnnserve models`), gradient_commands.py
(`cnnserve explain`, `dream`, `stylize`) and score/ (`cnnserve score`). None of it imports torch,
ONNX Runtime or the server.
"""

from __future__ import annotations

from service.client.api import CnnserveClient
from service.client.channel import (
    CHEAP_UNARY_METHODS,
    DEFAULT_KEEPALIVE_S,
    DEFAULT_KEEPALIVE_TIMEOUT_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_SERVICE_CONFIG,
    GRADIENT_UNARY_METHODS,
    INFERENCE_SERVICE,
    OIP_SERVICE,
    RETRYABLE_STATUS_CODES,
    connection_hint,
    default_channel_options,
    not_connected,
)
from service.client.gradient_results import (
    DreamLayer,
    DreamResult,
    EmbedResult,
    ExplainResult,
    Explanation,
    FeatureMap,
    FeatureMapsResult,
    FiltersResult,
    GradientProgress,
    Neuron,
    NeuronExplained,
    StylizeResult,
)
from service.client.images import ImageLike, image_input
from service.client.results import ClassifyResult, ClassScore, CnnserveError, StreamResult, Timings

__all__ = [
    "CHEAP_UNARY_METHODS",
    "DEFAULT_KEEPALIVE_S",
    "DEFAULT_KEEPALIVE_TIMEOUT_S",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_SERVICE_CONFIG",
    "GRADIENT_UNARY_METHODS",
    "INFERENCE_SERVICE",
    "OIP_SERVICE",
    "RETRYABLE_STATUS_CODES",
    "ClassScore",
    "ClassifyResult",
    "CnnserveClient",
    "CnnserveError",
    "DreamLayer",
    "DreamResult",
    "EmbedResult",
    "ExplainResult",
    "Explanation",
    "FeatureMap",
    "FeatureMapsResult",
    "FiltersResult",
    "GradientProgress",
    "ImageLike",
    "Neuron",
    "NeuronExplained",
    "StreamResult",
    "StylizeResult",
    "Timings",
    "connection_hint",
    "default_channel_options",
    "image_input",
    "not_connected",
]
