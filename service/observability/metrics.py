"""Every Prometheus metric the service exports, defined once.

Naming follows prometheus.io: `cnnserve_` prefix, base units in the name, `_total` on counters,
histograms for durations, and the same low-cardinality labels everywhere: `method`, `model`, `code`,
`reason`, `task`, `provider`. In-process (`serve`, `worker`) everything is measured in the one
serving process around calls into the engine and the gradient pool. Under `serve --frontends N`
(service/multiprocess.py) the frontend, engine and gradient processes each record what
happens in them into client_python's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the
supervisor before it spawns them), and the supervisor's /metrics adds them up: the same names and
labels, one view (gauges say how: `multiprocess_mode`, ignored in-process). Process metrics
(`process_*`) come from client_python's default collectors on the same registry (in-process only).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# Request latencies on CPU span ~0.5 ms (LeNet) to seconds (queued ResNet-50 batches).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Gradient jobs run from ~10 ms (one explain) to minutes (a large stylization).
TASK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

registry: CollectorRegistry = REGISTRY

# --- requests (every RPC) ---------------------------------------------------------------------
REQUESTS = Counter(
    "cnnserve_requests_total",
    "RPCs answered, by method, model and gRPC status code.",
    ["method", "model", "code"],
)
REQUEST_DURATION = Histogram(
    "cnnserve_request_duration_seconds",
    "End-to-end RPC latency in the server.",
    ["method", "model"],
    buckets=LATENCY_BUCKETS,
)
INFLIGHT = Gauge(
    "cnnserve_inflight_requests", "RPCs being handled now.", ["method"], multiprocess_mode="livesum"
)
REJECTIONS = Counter(
    "cnnserve_rejections_total",
    "Requests refused before or instead of computing, by reason "
    "(queue_full, deadline, invalid_argument, not_found, too_large, unavailable, cost_budget, ...).",
    ["method", "model", "reason"],
)

# --- classification path ----------------------------------------------------------------------
IMAGES = Counter("cnnserve_images_total", "Images classified.", ["model"])
DECODE_DURATION = Histogram(
    "cnnserve_decode_duration_seconds",
    "Image decoding time per image.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
PREPROCESS_DURATION = Histogram(
    "cnnserve_preprocess_duration_seconds",
    "Resize, crop and normalization time per image.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "cnnserve_queue_wait_seconds",
    "Time a request waited in the batching queue.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "cnnserve_inference_duration_seconds",
    "ONNX Runtime run time per batch.",
    ["model", "provider"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "cnnserve_batch_size",
    "Images per ONNX Runtime call.",
    ["model"],
    buckets=BATCH_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "cnnserve_queue_depth", "Images waiting in the batching queue.", ["model"], multiprocess_mode="livesum"
)
MODEL_INFO = Gauge(
    "cnnserve_model_info",
    "Loaded model versions (value 1), with the execution provider in use.",
    ["model", "version", "provider", "trained"],
    multiprocess_mode="livemax",
)
MODEL_LOAD_FAILURES = Counter(
    "cnnserve_model_load_failures_total",
    "Model versions that failed their checks or their load (at start or in a repository reload); "
    "the versions already serving go on.",
    ["model", "version"],
)
PROVIDER_INFO = Gauge(
    "cnnserve_execution_provider_info",
    "The ONNX Runtime execution provider in use (value 1).",
    ["provider"],
    multiprocess_mode="livemax",
)
ENGINE_RESTARTS = Counter(
    "cnnserve_engine_restarts_total",
    "Classification engine threads restarted after a crash.",
    ["model"],
)

# --- gradient jobs (explain, dream, stylize) ---------------------------------------------------
TASK_DURATION = Histogram(
    "cnnserve_task_duration_seconds",
    "Gradient job run time in a worker.",
    ["task", "model"],
    buckets=TASK_BUCKETS,
)
TASK_STEPS = Counter(
    "cnnserve_task_steps_total",
    "Optimisation steps run by gradient jobs; rate() gives steps per second.",
    ["task", "model"],
)
TASK_STEP_RATE = Histogram(
    "cnnserve_task_steps_per_second",
    "Steps per second of each finished gradient job.",
    ["task", "model"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500),
)
TASK_QUEUE_WAIT = Histogram(
    "cnnserve_task_queue_wait_seconds",
    "Time a gradient job waited for a worker.",
    ["task"],
    buckets=TASK_BUCKETS,
)
TASKS_INFLIGHT = Gauge(
    "cnnserve_tasks_inflight",
    "Gradient jobs admitted and not finished.",
    ["task"],
    multiprocess_mode="livesum",
)
TASK_QUEUED_COST = Gauge(
    "cnnserve_task_queued_cost",
    "Admitted gradient work not yet finished, in cost units (pixels x steps).",
    multiprocess_mode="livesum",
)
TASK_COST_BUDGET = Gauge(
    "cnnserve_task_cost_budget", "The gradient admission budget, in cost units.", multiprocess_mode="livemax"
)
WORKER_RESTARTS = Counter("cnnserve_worker_restarts_total", "Gradient worker processes restarted.")
WORKER_DEATHS = Counter(
    "cnnserve_worker_deaths_total",
    "Gradient worker processes that went away while the pool was running, by reason: job_crash (died "
    "running a job: segfault, OOM kill, SIGKILL), idle_crash, init_failed (before it was ready), or "
    "killed by the pool: stop_overdue (ignored a cancel or deadline), ready_timeout, protocol_error.",
    ["reason"],
)
WORKERS_ALIVE = Gauge(
    "cnnserve_workers_alive", "Gradient worker processes alive and ready.", multiprocess_mode="livesum"
)
TASK_CANCELLATIONS = Counter(
    "cnnserve_task_cancellations_total",
    "Gradient jobs stopped by cancellation or deadline.",
    ["task"],
)
# Workers build a version's PyTorch module on its first job and drop the least recently used ones
# past settings.worker_model_memory_bytes (service/worker/loading.py). They report each build with
# the job (ctx.report); these are recorded where the pool runs, like every worker metric.
WORKER_MODEL_LOADS = Counter(
    "cnnserve_worker_model_loads_total",
    "Model versions built in a gradient worker for a job (first use, or again after an eviction or a "
    "worker restart).",
    ["model", "version"],
)
WORKER_MODEL_LOAD_DURATION = Histogram(
    "cnnserve_worker_model_load_seconds",
    "Time a gradient job spent building its model in the worker (weights.pt checked and read).",
    ["model"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
WORKER_MODEL_EVICTIONS = Counter(
    "cnnserve_worker_model_evictions_total",
    "Model versions a gradient worker dropped (least recently used) to stay under worker_model_memory_bytes.",
    ["model", "version"],
)
WORKER_MODEL_BYTES = Gauge(
    "cnnserve_worker_model_bytes",
    "Parameter and buffer bytes of the models the gradient workers hold now, summed over the workers.",
    multiprocess_mode="livesum",
)


# --- series created at 0 when a model loads -------------------------------------------------------
# A labelled counter has no series until its first increment, and increase()/rate() need two
# samples of a series: a counter born at 1 hides its first event, so
# `increase(cnnserve_engine_restarts_total[15m]) > 0` never fired on a pod's first engine restart.
# Every per-model counter is therefore created at 0 when the model loads, for the label values that
# are known then and form a small fixed set: the RPC methods that serve the model (as frontend/calls.py
# labels them) with code OK, and queue_full, the classification path's load shedding, which
# CnnserveQueueFullRejections watches. Other codes and reasons depend on the client or, for
# gradient RPCs, on the tier (cost_budget where jobs run, resource_exhausted or worker_unreachable
# where they are forwarded): they appear when they happen. At most 31 series per model.
# The RPCs the engine serves (classification and embeddings: one batcher, one admission).
CLASSIFY_METHODS = (
    "Classify",
    "ClassifyBatch",
    "ClassifyStream",
    "ModelInfer",
    "Embed",
    "EmbedStream",
    # The REST binding (frontend/rest.py) labels its calls rest:<the operation's gRPC name>.
    "rest:ModelInfer",
    "rest:Classify",
)
# Gradient task kind (LoadedModel.capabilities, TASK_STEPS' `task`) -> the RPCs that run it.
TASK_METHODS: dict[str, tuple[str, ...]] = {
    "explain": ("Explain",),
    "dream": ("Dream", "DreamUnary"),
    "stylize": ("Stylize", "StylizeUnary"),
    "feature_maps": ("FeatureMaps",),
    "filters": ("Filters",),
}


def init_classify_series(model: str) -> None:
    """Create the classification counters of `model` at 0 (a server that classifies with it)."""
    ENGINE_RESTARTS.labels(model=model)
    IMAGES.labels(model=model)
    for method in CLASSIFY_METHODS:
        REQUESTS.labels(method, model, "OK")
        REJECTIONS.labels(method, model, "queue_full")


def init_gradient_series(
    model: str, capabilities: Mapping[str, bool], *, runs_jobs: bool, version: int | None = None
) -> None:
    """Create the gradient RPC counters of `model` at 0 for each task its capabilities allow (a
    server that answers gradient RPCs), and the job counters where the jobs run (`runs_jobs`: a
    local worker pool or `cnnserve worker`, not a serving tier that forwards them), the worker
    model loads of `version` among them."""
    if runs_jobs and version is not None and any(capabilities.get(task) for task in TASK_METHODS):
        WORKER_MODEL_LOADS.labels(model=model, version=str(version))
    for task, methods in TASK_METHODS.items():
        if not capabilities.get(task):
            continue
        for method in methods:
            REQUESTS.labels(method, model, "OK")
        if runs_jobs:
            TASK_STEPS.labels(task=task, model=model)


class _Uncounted:
    """A metric child that records nothing (stop_counting_requests)."""

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_REQUEST_METRICS = (REQUESTS, REQUEST_DURATION, INFLIGHT, REJECTIONS)
_counting_requests = True


def stop_counting_requests() -> None:
    """In this process, record no RPC-level metric (requests, durations, in-flight, rejections):
    for the gradient process behind the frontends of `serve --frontends N`, whose calls the
    frontends already counted in the same /metrics view (each client call counts once). Its job
    metrics (cnnserve_task_*, the workers) are its own and still recorded."""
    global _counting_requests
    _counting_requests = False
    child.cache_clear()


@functools.lru_cache(maxsize=8192)
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, remembered: the hot path asks for the same few children on every
    request, and labels() validates, stringifies and takes a lock each time. Bounded: label values
    are model names, methods, codes and reasons (never client-chosen strings)."""
    if not _counting_requests and any(metric is m for m in _REQUEST_METRICS):
        return _Uncounted()
    return metric.labels(*labels)
