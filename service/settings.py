"""The one typed settings object. Every field is a `CNNSERVE_<NAME>` environment variable and a
`--<name-with-dashes>` flag of `cnnserve serve` (see service/cli.py); the Field description is the
--help text. Build it once in the entry point and pass it down: nothing else reads os.environ.

Durations end in `_s`, sizes in `_bytes`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CNNSERVE_", extra="forbid", validate_default=True)

    # --- network ---------------------------------------------------------------------------------
    host: str = Field(
        "0.0.0.0", description="Address the gRPC, HTTP/REST and metrics servers bind to (only this one)."
    )
    grpc_port: int = Field(
        8500, ge=0, le=65535, description="gRPC port (0 picks a free port, logged at start)."
    )
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus metrics HTTP port (0 picks one).")
    # 8000: the port Triton, KServe's examples and tritonclient's docs use for the v2 REST API, so a
    # `curl localhost:8000/v2/health/ready` copied from them works as it is.
    http_port: int = Field(
        8000,
        ge=0,
        le=65535,
        description="Open Inference Protocol (KServe v2) HTTP/REST port, plus POST /v2/models/NAME/classify "
        "with an image as the body; 0 turns REST off.",
    )

    # --- models ----------------------------------------------------------------------------------
    repository: Path = Field(Path("model_repository"), description="Model repository directory (read-only).")
    models: str = Field(
        "",
        description="Comma-separated models to load, each NAME or NAME:VERSION[+VERSION...]; "
        "empty loads every model at its latest version. NAME:all loads every version.",
    )

    # --- ONNX Runtime ----------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Execution provider: auto uses CUDA only when a GPU is really usable."
    )
    cuda_device_id: int = Field(
        0, ge=0, description="CUDA device id for ONNX Runtime and the gradient workers."
    )
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "HEURISTIC", description="cuDNN convolution algorithm search for the CUDA provider."
    )
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimization level."
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: one per core).")
    inter_op_threads: int = Field(1, ge=1, description="ONNX Runtime inter-op threads.")
    gil_switch_interval_ms: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="Python's GIL switch interval in the server process (Python's default is 5). Each "
        "ONNX Runtime call takes the GIL back several times; behind busy preprocessing threads every "
        "take waits up to one interval (a 2 ms GPU batch took 2.8 ms behind 16 such threads at 5 ms).",
    )
    cuda_fixed_batch: bool = Field(
        True,
        description="On CUDA, run every batch zero-padded to max_batch_size rows. ONNX Runtime's CUDA "
        "provider rebuilds its convolution plans whenever the batch size changes (~100 ms a batch "
        "for ResNet-50 on an H200, against 2-3 ms at a steady size); one shape avoids that.",
    )
    ort_cache_dir: str = Field(
        "none",
        description="Writable directory where ONNX Runtime's optimized graphs are kept between starts, "
        "so a restart skips graph optimization; none: off. Empty: $XDG_CACHE_HOME/cnnserve/ort, else "
        "~/.cache/cnnserve/ort. Off by default: on ONNX Runtime 1.31 with 2 CPU cores a hit saves "
        "0.07 s of ResNet-50's 0.16 s session and nothing measurable of VGG-19's 1.6 s, a miss costs "
        "0.2-0.9 s and each entry is as big as model.onnx. Must be owned by the server's user and not "
        "writable by group or others, else it is skipped (SECURITY.md). Never inside the read-only "
        "model repository.",
    )
    intra_op_spinning: bool = Field(
        False,
        description="Let ONNX Runtime's idle intra-op threads spin-wait for work. Off: in a server the "
        "cores are shared with image decoding and gRPC, and spinning threads starve them.",
    )

    # --- dynamic batching ------------------------------------------------------------------------
    max_batch_size: int = Field(16, ge=1, le=256, description="Largest batch sent to ONNX Runtime per model.")
    max_queue_delay_s: float = Field(
        0.002, ge=0.0, le=1.0, description="How long a batch may wait for more requests before it runs."
    )
    max_queue_size: int = Field(
        256,
        ge=1,
        description="Images that may wait per model version, besides the max_batch_size being computed; "
        "beyond that requests get RESOURCE_EXHAUSTED at once.",
    )
    instances: int = Field(
        1,
        ge=1,
        le=16,
        description="ONNX Runtime sessions per model version, each computing its own batch at once "
        "(Triton's instance_group count); a model's config.yaml may override it. Each instance holds "
        "its own copy of the weights. With intra_op_threads 0 the cores are split between a model's "
        "instances (cores // instances threads each) instead of each taking all of them.",
    )
    warmup_batch_sizes: str = Field(
        "auto",
        description="Batch sizes each model version runs once before it serves, so the first requests "
        "do not pay for allocations and kernel plans: auto (1 and the largest batch; on CUDA with "
        "cuda_fixed_batch the one fixed shape), all (1..max_batch_size), none, or a comma-separated "
        "list such as 1,8,16 (sizes above a model's batch limit are skipped). A model's config.yaml "
        "may override it. More sizes start slower: VGG-19 warms 1..16 for 25-31 s on 2 CPU cores.",
    )
    ort_cpu_mem_arena: bool = Field(
        False,
        description="ONNX Runtime's CPU memory arena. Off: memory for activations is returned after "
        "each run instead of kept at its high-water mark (server RSS after loading VGG-19 with "
        "batches of 1 and 16: 682 instead of 1196 MB; ResNet-50: 211 instead of 339 MB, the heap "
        "trimmed after each load either way), for 3-7% slower batches of 16 on 2 CPU cores "
        "(issue 13). On: throughput first.",
    )
    load_concurrency: int = Field(
        0,
        ge=0,
        le=64,
        description="Model versions loaded (verified, ONNX Runtime session built, warmed up) at once "
        "at start (0: the cores, at most 4, on CPU; 1 on CUDA, where parallel loads are not yet measured). "
        "Each version serves as soon as it is warm.",
    )
    repository_poll_s: float = Field(
        0.0,
        ge=0.0,
        le=86_400.0,
        description="Scan the repository this often and serve what changed: a new version that "
        "passes its checks loads in the background and serves once warm, a version that left the "
        "version policy drains and unloads (0: off; SIGHUP triggers one scan either way; serve with "
        "--frontends 1 only).",
    )
    serve_when: Literal["all", "any"] = Field(
        "all",
        description='When the overall health (service "") turns SERVING at start: all (every selected '
        "model version has loaded or failed to) or any (the first version that loads). Each "
        "model:<name> turns SERVING as soon as that model is warm either way.",
    )
    preprocess_threads: int = Field(
        0, ge=0, description="Threads decoding and preprocessing images (0: half the cores, at least 1)."
    )
    frontends: int = Field(
        1,
        ge=1,
        le=64,
        description="Serving processes. 1: one process runs everything. N > 1: N frontend processes "
        "share the gRPC port (parsing, decoding, streams, OIP) in front of one engine process (ONNX "
        "Runtime and the batchers) and one gradient process, under a supervisor that serves /metrics "
        '(serve only; README "Processes").',
    )

    # --- request caps ----------------------------------------------------------------------------
    # A request over a cap gets INVALID_ARGUMENT naming it (README "Request caps", SECURITY.md).
    max_images_per_request: int = Field(
        256, ge=1, description="Most images in one ClassifyBatch/ModelInfer; more: INVALID_ARGUMENT."
    )
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Most pixels an encoded image may declare, checked from its header before decoding "
        "(Classify, ModelInfer BYTES, gradient RPCs); more: INVALID_ARGUMENT.",
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Largest gRPC message sent; also received, but never less than max_images_per_request "
        "224x224 float32 images. A larger request: RESOURCE_EXHAUSTED (from gRPC); a larger answer: "
        "RESOURCE_EXHAUSTED naming this setting.",
    )
    max_deadline_s: float = Field(
        600.0,
        gt=0,
        description="Longest deadline a call may ask for; a call without one gets this. Longer: "
        "INVALID_ARGUMENT (ClassifyStream: each item is capped to it instead).",
    )
    max_top_k: int = Field(
        1000, ge=1, description="Largest top_k a request may ask for; more: INVALID_ARGUMENT."
    )

    # --- gradient jobs ---------------------------------------------------------------------------
    workers: int = Field(1, ge=0, description="PyTorch gradient worker processes (0 disables gradient RPCs).")
    worker_address: str = Field(
        "", description="host:port of a separate `cnnserve worker` tier; empty uses the local worker pool."
    )
    max_task_cost: float = Field(
        2.0e9,
        gt=0,
        description="Gradient admission budget in cost units (pixels x steps) admitted at once; one job "
        "costing more: INVALID_ARGUMENT, a full budget: RESOURCE_EXHAUSTED.",
    )
    max_task_iterations: int = Field(
        1000,
        ge=1,
        description="Most optimisation steps one gradient job may ask for (Dream: octaves x steps; "
        "Stylize: iterations); more: INVALID_ARGUMENT.",
    )
    max_task_image_side: int = Field(
        1024, ge=16, description="Longest image side a gradient job may use; longer: INVALID_ARGUMENT."
    )
    max_task_duration_s: float = Field(
        300.0,
        gt=0,
        description="Longest a gradient job may take from submission to result, whatever deadline the "
        "client set; a job running into it is stopped: DEADLINE_EXCEEDED naming it.",
    )
    max_task_batch: int = Field(
        16,
        ge=1,
        description="Most images in one Explain request (and style images in one Stylize); more: "
        "INVALID_ARGUMENT.",
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads per worker (0: cores / workers).")
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How much lower the gradient workers' CPU priority is than the server's (Unix nice; "
        "0: the same). Where they share cores, classification latency wins over a gradient job.",
    )
    worker_model_memory_bytes: int = Field(
        1 << 30,
        ge=0,
        description="Most bytes of model parameters and buffers one gradient worker keeps (0: no bound). "
        "A worker builds a model version's PyTorch module on the first job that needs it and keeps it; "
        "building one more that would pass this bound drops the least recently used ones first (never "
        "the one a running job uses). A model bigger than the bound alone is still built, alone. The "
        "default holds the six demo models together (about 0.95 GB, VGG-19 0.55 GB of it), so they "
        "never rebuild each other, and bounds what a larger repository costs per worker.",
    )
    worker_parity_process: bool = Field(
        True,
        description="Run each gradient worker's start-up parity self-test (its PyTorch network against "
        "model.onnx on ONNX Runtime) in a short-lived process of its own, so the long-lived worker "
        "never imports ONNX Runtime nor keeps what the test allocated: idle RSS per worker 305 -> 241 "
        "MB with ResNet-50, 320 -> 241 MB with the six demo models, for workers ready 1.4-2 s later "
        "(one more Python and torch import; 2 CPU cores, issue 13). Off: the test runs in the worker.",
    )
    worker_start_timeout_s: float = Field(
        300.0,
        gt=0,
        description="How long the gradient workers may take to start and load their models (a replacement "
        "worker too) before the pool gives up on them.",
    )
    worker_stop_grace_s: float = Field(
        0.0,
        ge=0,
        description="How long a gradient job may run on after its cancellation or deadline before its "
        "worker is killed and replaced (0: grace_period_s, clamped to 1..10 s).",
    )

    # --- connections and shutdown ----------------------------------------------------------------
    grace_period_s: float = Field(
        30.0, ge=0, description="On SIGTERM: how long accepted calls may take to finish before exit."
    )
    keepalive_time_s: float = Field(
        30.0, gt=0, description="Server keepalive ping interval (finds dead peers, keeps idle NAT entries)."
    )
    keepalive_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long a keepalive ping may go unacknowledged before the connection closes.",
    )
    keepalive_min_client_ping_s: float = Field(
        10.0,
        gt=0,
        description="Clients may send keepalive pings (also between calls) at most this often; faster "
        "pingers get GOAWAY too_many_pings. service.client pings every 30 s.",
    )
    max_connection_age_s: float = Field(
        300.0,
        gt=0,
        description="Connections get a graceful GOAWAY after this, so clients reconnect and rebalance "
        "onto new replicas.",
    )
    max_connection_age_grace_s: float | None = Field(
        None,
        ge=0,
        description="Time in-flight calls get after max_connection_age before the connection closes "
        "(default: max_task_duration_s, so no gradient job is cut off). Where this process serves "
        "gradient RPCs a smaller value is refused.",
    )
    max_concurrent_rpcs: int = Field(
        1024, ge=1, description="RPCs handled at once; beyond that gRPC answers RESOURCE_EXHAUSTED."
    )

    # --- logging ---------------------------------------------------------------------------------
    log_format: Literal["json", "text"] = Field("text", description="Log line format.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

    @field_validator("warmup_batch_sizes")
    @classmethod
    def _warmup_batch_sizes(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "all", "none"):
            return value
        try:
            sizes = [int(part) for part in value.split(",")]
        except ValueError:
            raise ValueError("give auto, all, none or comma-separated batch sizes such as 1,8,16") from None
        if any(not 1 <= s <= 256 for s in sizes):
            raise ValueError("batch sizes must be 1..256")
        return ",".join(str(s) for s in sorted(set(sizes)))

    def warmup_sizes(self, max_batch: int, *, fixed_shape: bool = False) -> list[int]:
        """The batch sizes to warm a model version up with whose batches hold at most `max_batch`
        (warmup_sizes_of the setting)."""
        return warmup_sizes_of(self.warmup_batch_sizes, max_batch, fixed_shape=fixed_shape)

    @field_validator("ort_cache_dir")
    @classmethod
    def _ort_cache_dir(cls, value: str) -> str:
        value = value.strip()
        return "none" if value.lower() == "none" else value

    @property
    def ort_cache_path(self) -> Path | None:
        """The ONNX Runtime graph cache directory, None when off (ort_cache_off_reason says why).

        The XDG location is read here, with the other environment variables, not deep in the engine.
        """
        if self.ort_cache_dir == "none":
            return None
        if self.ort_cache_dir:
            return Path(self.ort_cache_dir).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        if os.path.isabs(xdg):  # the XDG spec: a relative value is invalid and ignored
            return Path(xdg) / "cnnserve" / "ort"
        home = os.path.expanduser("~")
        if not os.path.isabs(home):  # no HOME and no passwd entry: nowhere sensible to default to
            return None
        return Path(home) / ".cache" / "cnnserve" / "ort"

    @property
    def ort_cache_off_reason(self) -> str:
        """Why ort_cache_path is None ("" when it is not)."""
        if self.ort_cache_path is not None:
            return ""
        if self.ort_cache_dir == "none":
            return "ort_cache_dir=none"
        return "no XDG_CACHE_HOME or home directory for the default ort_cache_dir; set one"

    @model_validator(mode="after")
    def _reload_in_one_process(self) -> Settings:
        # The frontends of `--frontends N` learn the engine process's models once, when they connect.
        if self.repository_poll_s > 0 and self.frontends > 1:
            raise ValueError(
                "repository_poll_s needs frontends=1: hot reload is not built for --frontends N yet"
            )
        return self

    @model_validator(mode="after")
    def _grace_lets_gradient_jobs_finish(self) -> Settings:
        # A GOAWAY after max_connection_age gives in-flight calls this grace, then cuts them: a
        # gradient job may legitimately run for max_task_duration_s (the default used to be 30 s
        # against a 300 s job cap). Only a process that serves gradient calls is bound by it.
        grace = self.max_connection_age_grace_s
        serves_gradients = self.workers > 0 or bool(self.worker_address)
        if grace is not None and serves_gradients and grace < self.max_task_duration_s:
            raise ValueError(
                f"max_connection_age_grace_s={grace:g} is below max_task_duration_s="
                f"{self.max_task_duration_s:g}: a connection reaching max_connection_age_s would cut "
                "gradient jobs off; raise it, leave it unset (it then follows max_task_duration_s), or "
                "run with workers=0"
            )
        return self

    @property
    def connection_age_grace_s(self) -> float:
        """max_connection_age_grace_s, or max_task_duration_s when unset."""
        if self.max_connection_age_grace_s is None:
            return self.max_task_duration_s
        return self.max_connection_age_grace_s

    @property
    def max_receive_message_bytes(self) -> int:
        """Sized for the largest allowed batch of float32 tensors at 224x224x3, plus framing."""
        largest_batch = self.max_images_per_request * 3 * 224 * 224 * 4
        return max(self.max_message_bytes, largest_batch + 1024 * 1024)


class WorkerSettings(Settings):
    """`cnnserve worker`'s settings: every Settings field, with the worker tier's own default ports
    (so a server and a worker run side by side on one host with no flags)."""

    grpc_port: int = Field(
        8600, ge=0, le=65535, description="gRPC port (0 picks a free port, logged at start)."
    )
    metrics_port: int = Field(9091, ge=0, le=65535, description="Prometheus metrics HTTP port (0 picks one).")
    http_port: int = Field(
        0, ge=0, le=65535, description="Unused: the gradient tier answers gRPC only (REST is the server's)."
    )


def warmup_sizes_of(spec: str, max_batch: int, *, fixed_shape: bool = False) -> list[int]:
    """The warm-up batch sizes a `warmup_batch_sizes` value (the setting's, or a model config's in
    the same form) gives for batches of at most `max_batch`. auto: one run at max_batch where every
    batch runs at that one shape (`fixed_shape`: CUDA with cuda_fixed_batch), else 1 and max_batch
    (ONNX Runtime on CPU allocates per shape; the sizes between cost a little more the first time
    they occur, measured in issue 13)."""
    if spec == "auto":
        return [max_batch] if fixed_shape else sorted({1, max_batch})
    if spec == "all":
        return list(range(1, max_batch + 1))
    if spec == "none":
        return []
    return [s for s in (int(p) for p in spec.split(",")) if s <= max_batch]


# What 0 does to each port setting (their descriptions say the same).
_PORT_ZERO = {
    "grpc_port": "0 picks a free one",
    "metrics_port": "0 picks a free one",
    "http_port": "0 turns REST off",
}


def bind_hint(field: str) -> str:
    """The end of a "cannot bind" message for the port setting `field`: which flag and variable
    choose another port. The usual cause is another process on the port (8000, REST's default, is
    many development servers' too)."""
    flag = "--" + field.replace("_", "-")
    return f"choose another port with {flag} or CNNSERVE_{field.upper()} ({_PORT_ZERO[field]})"
