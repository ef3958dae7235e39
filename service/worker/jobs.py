"""The gradient-job interface: jobs, results, progress updates, validation against the caps, and cost.

docs/SERVICE_INTERFACES.md ("Gradient jobs") is the contract. The pool (pool.py) knows nothing about
the algorithms; it calls, by name, in each spawned gradient process:

    models = loading.load_models(config)     # once per process (functools.partial(load_models, config))
    result = handlers.handle(models, job, ctx)  # per job; ctx.should_stop() / ctx.progress(update)

and, in the serving process before admitting a job, `validate_job(job, limits)` and
`estimate_cost(job)`.

Everything here is picklable and torch-free, so the serving process builds jobs and prices them
without loading PyTorch. Jobs, results and progress updates are frozen dataclasses of numpy arrays
and plain Python values: never tensors, never protobufs.

Images: `float32 (H, W, C)` in [0, 1] or `uint8 (H, W, C)`, C = the model's channels (1 for L models,
3 for RGB); `(H, W)` is accepted for one channel. Explain inputs are the *preprocessed* model tensor,
`float32 (N, C, H, W)`, exactly what the ONNX model takes.

Cost units ("pass-pixels"): one input pixel through one forward *or* one backward pass of the network.
A forward+backward step over an H x W image costs 2*H*W. So:

- explain: N*H*W * (1 forward + 1 backward, + 1 more backward when the plain gradient is also needed:
  guided_gradcam, plain_gradient=True; gradient and gradcam take one plain backward only);
- dream: sum over the octaves actually run of h_o*w_o * steps * 2, plus two forwards at the working
  size (the objective reported before and after);
- stylize: content pixels * iterations * 2 (each L-BFGS evaluation or Adam step is a forward and a
  backward), plus one forward of the content image and one of each style image (the targets);
- feature_maps: H*W (one forward, no backward); an explain with a neuron target costs what a class
  target costs (the forward runs to the logits: the response has the top-1 class);
- filters: FILTERS_COST, nearly free (the weights are read, no pass), yet not 0, so a flood of
  them still meets the budget.
The units ignore the architecture (a VGG-19 pixel costs more than a LeNet-5 pixel); the pool's
`cost_budget` (settings.max_task_cost) is in the same units.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from service.errors import InvalidArgument
from service.worker.params import (
    EXPLAIN_METHODS,
    MIN_IMAGE_SIDE,
    DreamParams,
    LayerTable,
    Limits,
    NeuronTarget,
    StyleParams,
    fit_side,
    is_finite_number,
    layer_entry,
    octave_sizes,
    require,
    style_size,
)
from service.worker.rendering import SaliencyStyle

JobKind = Literal["explain", "dream", "stylize", "feature_maps", "filters"]

# FeatureMaps: the channels the PNG tiles by default, and at most.
DEFAULT_MAX_CHANNELS = 16
MAX_CHANNELS = 256
# Filters reads weights and draws a grid: priced as one pass-pixel (estimate_cost).
FILTERS_COST = 1.0
# Explain methods a neuron target applies to (Grad-CAM is class-specific).
NEURON_METHODS = ("guided_backprop", "gradient")

# ---------------------------------------------------------------------------------------------------
# Jobs, results, progress


@dataclass(frozen=True)
class ExplainJob:
    """Guided backprop / Guided Grad-CAM / plain gradient for a batch of preprocessed inputs.

    inputs: float32 (N, C, H, W), the model's input tensor (its ModelInfo input shape).
    targets: one class per input, or None for each input's predicted class.
    method: "guided_backprop", "guided_gradcam", "gradcam" (the heatmap alone) or "gradient".
    render: also return one PNG per input ("signed" or "magnitude" rendering), or None.
    neuron: explain that unit's activation instead of a class (targets None; guided_backprop or
        gradient only).
    """

    kind: ClassVar[JobKind] = "explain"
    model: str
    version: int
    inputs: np.ndarray
    targets: tuple[int, ...] | None = None
    method: str = "guided_backprop"
    plain_gradient: bool = False
    cam_layer: str | None = None
    render: SaliencyStyle | None = "signed"
    neuron: NeuronTarget | None = None


@dataclass(frozen=True)
class NeuronExplained:
    """The neuron an explanation targeted, resolved for one image: its position (the strongest one
    when the job gave none), its activation, and its receptive field clipped to the input,
    (top, left, bottom, right), half-open."""

    layer: str
    channel: int
    y: int
    x: int
    activation: float
    field: tuple[int, int, int, int]


@dataclass(frozen=True)
class ExplainResult:
    model: str
    version: int
    saliency: np.ndarray  # float32 (N, C, H, W), w.r.t. the model input tensor
    classes: np.ndarray  # int64 (N,), the explained classes
    probabilities: np.ndarray  # float32 (N,), softmax probability of each explained class
    predicted: np.ndarray  # int64 (N,), top-1 classes
    predicted_probabilities: np.ndarray  # float32 (N,), softmax probability of each top-1 class
    plain: np.ndarray | None  # float32 (N, C, H, W) when asked for
    cam: np.ndarray | None  # float32 (N, H, W) in [0, 1] for guided_gradcam and gradcam
    cam_layer: str | None
    pngs: tuple[bytes, ...]  # one rendering per input when the job asked for it
    seconds: float
    neurons: tuple[NeuronExplained, ...] = ()  # one per input for a neuron target


@dataclass(frozen=True)
class FeatureMapsJob:
    """The activations of `layers` (names from the model's layer table) for one preprocessed input,
    float32 (1, C, H, W); each layer's `max_channels` strongest channels tiled into a PNG."""

    kind: ClassVar[JobKind] = "feature_maps"
    model: str
    version: int
    inputs: np.ndarray
    layers: tuple[str, ...]
    max_channels: int = DEFAULT_MAX_CHANNELS


@dataclass(frozen=True)
class FeatureMap:
    layer: str
    activations: np.ndarray  # float32, the layer's whole output for the image (no batch axis)
    png: bytes  # `channels` tiled in a near-square grid, each min-max scaled, grey
    channels: tuple[int, ...]  # the channels the PNG shows, strongest (mean activation) first


@dataclass(frozen=True)
class FeatureMapsResult:
    model: str
    version: int
    maps: tuple[FeatureMap, ...]  # in the job's order
    predicted: int  # top-1 class of the same forward pass
    predicted_probability: float
    seconds: float


@dataclass(frozen=True)
class FiltersJob:
    """A Conv2d's kernels; layer "" is the first convolution in forward order."""

    kind: ClassVar[JobKind] = "filters"
    model: str
    version: int
    layer: str = ""


@dataclass(frozen=True)
class FiltersResult:
    model: str
    version: int
    layer: str  # the convolution drawn (resolved when the job named none)
    weights: np.ndarray  # float32 (out, in / groups, kH, kW)
    png: bytes  # one cell per output channel, near-square grid, 1 px apart
    seconds: float


@dataclass(frozen=True)
class DreamJob:
    """DeepDream on one image (pixels in [0, 1]; see the module docstring for the array layout)."""

    kind: ClassVar[JobKind] = "dream"
    model: str
    version: int
    image: np.ndarray
    params: DreamParams = field(default_factory=DreamParams)


@dataclass(frozen=True)
class DreamResult:
    model: str
    version: int
    image: np.ndarray  # float32 (H, W, C) in [0, 1], the input's shape
    png: bytes
    layers: tuple[tuple[str, float], ...]  # the objective actually used
    octave_sizes: tuple[tuple[int, int], ...]  # (h, w) of each octave run, largest first
    steps: int  # steps run in all
    objective_before: float  # the objective on the input, at the working size
    objective_after: float  # the same on the result
    seconds: float


@dataclass(frozen=True)
class StylizeJob:
    """Neural style transfer of `content` towards the blended styles of `styles`.

    style_blend: one non-negative weight per style image (normalized to sum 1); None: equal weights.
    """

    kind: ClassVar[JobKind] = "stylize"
    model: str
    version: int
    content: np.ndarray
    styles: tuple[np.ndarray, ...]
    style_blend: tuple[float, ...] | None = None
    params: StyleParams = field(default_factory=StyleParams)


@dataclass(frozen=True)
class StylizeResult:
    model: str
    version: int
    image: np.ndarray  # float32 (h, w, 3) in [0, 1] at the working size (max_side)
    png: bytes
    losses: Mapping[str, float]  # content, style, tv, total of the returned (best) image, weighted
    initial_losses: Mapping[str, float]  # the same at the starting image
    iterations: int  # objective evaluations (L-BFGS) or steps (Adam) run
    best_iteration: int  # the evaluation that produced the returned image (1-based)
    seconds: float


@dataclass(frozen=True)
class ProgressUpdate:
    """One progress report, streamed to the parent's on_progress.

    step / total_steps: 1-based optimisation step (dream: across octaves; stylize: evaluation;
        explain: images explained, reported once when the batched pass is done).
    losses: named current losses ("objective" for dream; "content", "style", "tv", "total", "best" for
        stylize). octave: 1-based octave, coarsest first (dream only). preview_png: the current image.
    """

    kind: JobKind
    step: int
    total_steps: int
    losses: Mapping[str, float]
    octave: int | None = None
    preview_png: bytes | None = None


Job = ExplainJob | DreamJob | StylizeJob | FeatureMapsJob | FiltersJob
Result = ExplainResult | DreamResult | StylizeResult | FeatureMapsResult | FiltersResult


class JobContext(Protocol):
    """What `handlers.handle` needs from the context the pool passes with each job (the concrete one
    is service.worker.child.JobContext)."""

    def should_stop(self) -> bool: ...

    def progress(self, update: Any) -> None: ...

    def report(self, payload: Any) -> None: ...


# ---------------------------------------------------------------------------------------------------
# Validation and cost (serving process and worker)


def _image_hw(image: np.ndarray, name: str) -> tuple[int, int, int]:
    arr = np.asarray(image)
    require(
        arr.ndim in (2, 3),
        f"{name} must be an (H, W[, C]) image array, got shape {arr.shape}",
        "not_an_image",
    )
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    return int(arr.shape[0]), int(arr.shape[1]), int(channels)


def _check_side(h: int, w: int, limits: Limits, name: str) -> None:
    require(
        max(h, w) <= limits.max_image_side,
        f"{name} is {w}x{h}; its longer side exceeds max_task_image_side={limits.max_image_side}",
        "image_too_large",
    )
    require(min(h, w) >= MIN_IMAGE_SIDE, f"{name} is {w}x{h}; both sides must be at least {MIN_IMAGE_SIDE}")


def validate_job(job: Job, limits: Limits) -> None:
    """Check a job against the caps; raise InvalidArgument naming the cap. Model-independent checks
    only (the gradient process additionally checks layers, classes and channels against the loaded
    model)."""
    if isinstance(job, ExplainJob):
        _validate_explain(job, limits)
    elif isinstance(job, DreamJob):
        _validate_dream(job, limits)
    elif isinstance(job, StylizeJob):
        _validate_stylize(job, limits)
    elif isinstance(job, FeatureMapsJob):
        _validate_feature_maps(job, limits)
    elif isinstance(job, FiltersJob):
        require(isinstance(job.layer, str), "filters: layer must be a string")
    else:
        raise InvalidArgument(f"unknown task type {type(job).__name__}")


def _validate_explain(job: ExplainJob, limits: Limits) -> None:
    x = np.asarray(job.inputs)
    require(
        x.ndim == 4 and x.dtype.kind == "f",
        f"explain inputs must be a float (N, C, H, W) tensor, got {x.dtype} {x.shape}",
        "not_an_image",
    )
    n = x.shape[0]
    require(n >= 1, "explain needs at least one input")
    require(n <= limits.max_batch, f"explain got {n} inputs; the limit is max_task_batch={limits.max_batch}")
    require(
        max(x.shape[2], x.shape[3]) <= limits.max_image_side,
        f"explain input is {x.shape[3]}x{x.shape[2]}; its longer side exceeds "
        f"max_task_image_side={limits.max_image_side}",
        "image_too_large",
    )
    require(bool(np.isfinite(x).all()), "explain inputs contain NaN or Inf", "not_an_image")
    if job.targets is not None:
        require(len(job.targets) == n, f"explain got {len(job.targets)} targets for {n} inputs")
        require(
            all(isinstance(t, (int, np.integer)) and t >= 0 for t in job.targets),
            "explain targets must be class indices >= 0",
            "target_out_of_range",
        )
    require(
        job.method in EXPLAIN_METHODS,
        f"unknown explain method {job.method!r}; use one of {', '.join(EXPLAIN_METHODS)}",
    )
    require(
        job.render in (None, "signed", "magnitude"),
        f"unknown saliency rendering {job.render!r}; use 'signed', 'magnitude' or none",
    )
    if job.neuron is not None:
        require(job.targets is None, "explain: give a neuron or target classes, not both")
        require(
            job.method in NEURON_METHODS,
            f"explain: a neuron target works with guided backprop and the plain gradient, not {job.method} "
            "(Grad-CAM explains a class)",
        )
        job.neuron.check(None)


def _validate_feature_maps(job: FeatureMapsJob, limits: Limits) -> None:
    x = np.asarray(job.inputs)
    require(
        x.ndim == 4 and x.shape[0] == 1 and x.dtype.kind == "f",
        f"feature maps take one float (1, C, H, W) input, got {x.dtype} {x.shape}",
        "not_an_image",
    )
    require(
        max(x.shape[2], x.shape[3]) <= limits.max_image_side,
        f"feature maps input is {x.shape[3]}x{x.shape[2]}; its longer side exceeds "
        f"max_task_image_side={limits.max_image_side}",
        "image_too_large",
    )
    require(bool(np.isfinite(x).all()), "feature maps input contains NaN or Inf", "not_an_image")
    require(len(job.layers) >= 1, "feature maps: name at least one layer (ModelInfo.layers)", "unknown_layer")
    require(
        len(job.layers) <= limits.max_batch,
        f"feature maps: {len(job.layers)} layers; the limit is max_task_batch={limits.max_batch}",
    )
    require(len(set(job.layers)) == len(job.layers), "feature maps: a layer is named twice", "unknown_layer")
    require(
        isinstance(job.max_channels, int) and 1 <= job.max_channels <= MAX_CHANNELS,
        f"feature maps: max_channels must be 1..{MAX_CHANNELS} (0: {DEFAULT_MAX_CHANNELS})",
    )


def check_layers(job: Job, table: LayerTable | None) -> None:
    """The layer names a job gives (Explain's neuron, Dream's layers, FeatureMaps, Filters) against
    the model's layer table (metadata.json's "layers", or in the gradient process the module's own,
    export.layers.addressable_layers): InvalidArgument listing valid names. The one check of layer
    names: the serving process runs it where the metadata has the table (no torch needed), the
    gradient process always. None: no table here (an older export): the gradient process checks."""
    if table is None:
        return
    if isinstance(job, ExplainJob) and job.neuron is not None:
        job.neuron.check(table)
    elif isinstance(job, DreamJob) and job.params.layers is not None:
        for name in job.params.layers:
            entry = layer_entry(name, table, "dream")
            shape = [int(d) for d in entry["shape"]]
            chans = job.params.channels.get(name, ())
            bad = [c for c in chans if not 0 <= c < shape[0]] if shape else []
            require(
                not bad,
                f"dream: channel {bad[0] if bad else 0} is out of range for layer {name!r} of shape {shape}",
                "channel_out_of_range",
            )
    elif isinstance(job, FeatureMapsJob):
        for name in job.layers:
            layer_entry(name, table, "feature maps")
    elif isinstance(job, FiltersJob):
        convs = [str(e["name"]) for e in table if e["kind"] == "Conv2d"]
        require(bool(convs), "filters: the model has no Conv2d layer", "unknown_layer")
        if job.layer:
            entry = layer_entry(job.layer, table, "filters")
            require(
                entry["kind"] == "Conv2d",
                f"filters: layer {job.layer!r} is a {entry['kind']}, not a Conv2d; convolutions: "
                + ", ".join(convs[:12])
                + (f" ({len(convs)} in all)" if len(convs) > 12 else ""),
                "unknown_layer",
            )


def first_convolution(table: LayerTable) -> str:
    """The first Conv2d of the table (forward order): Filters' default layer."""
    for entry in table:
        if entry["kind"] == "Conv2d":
            return str(entry["name"])
    raise InvalidArgument("filters: the model has no Conv2d layer", reason="unknown_layer")


def _validate_dream(job: DreamJob, limits: Limits) -> None:
    h, w, _ = _image_hw(job.image, "dream image")
    _check_side(h, w, limits, "dream image")
    p = job.params
    sizes = octave_sizes(*fit_side(h, w, p.max_side), p.octaves, p.octave_scale)
    total = len(sizes) * p.steps
    require(
        total <= limits.max_iterations,
        f"dream asks for {total} steps ({len(sizes)} octaves x {p.steps}); the limit is "
        f"max_task_iterations={limits.max_iterations}",
        "too_many_iterations",
    )


def _validate_stylize(job: StylizeJob, limits: Limits) -> None:
    h, w, _ = _image_hw(job.content, "content image")
    _check_side(h, w, limits, "content image")
    require(len(job.styles) >= 1, "stylize needs at least one style image")
    require(
        len(job.styles) <= limits.max_batch,
        f"stylize got {len(job.styles)} style images; the limit is max_task_batch={limits.max_batch}",
    )
    for i, style in enumerate(job.styles):
        sh, sw, _ = _image_hw(style, f"style image {i}")
        _check_side(sh, sw, limits, f"style image {i}")
    if job.style_blend is not None:
        require(
            len(job.style_blend) == len(job.styles),
            f"stylize got {len(job.style_blend)} blend weights for {len(job.styles)} style images",
        )
        require(
            all(is_finite_number(b) and b >= 0 for b in job.style_blend) and sum(job.style_blend) > 0,
            "stylize blend weights must be >= 0 with a positive sum",
        )
    require(
        job.params.iterations <= limits.max_iterations,
        f"stylize asks for {job.params.iterations} iterations; the limit is "
        f"max_task_iterations={limits.max_iterations}",
        "too_many_iterations",
    )
    wh, ww = fit_side(h, w, job.params.max_side)
    sh_, sw_ = style_size((wh, ww), _image_hw(job.styles[0], "style image 0")[:2], job.params.style_scale)
    require(
        max(sh_, sw_) <= limits.max_image_side,
        f"style_scale makes the style images {sw_}x{sh_}, beyond max_task_image_side={limits.max_image_side}",
        "image_too_large",
    )


def estimate_cost(job: Job) -> float:
    """The job's cost in pass-pixels (module docstring): what the pool's cost budget admits."""
    if isinstance(job, ExplainJob):
        n, _, h, w = np.shape(job.inputs)
        # guided and plain gradients share the forward pass; each needs its own backward
        # gradcam: one plain backward gives dScore/dA and the plain input gradient together
        backward = (
            1
            if job.method in ("gradient", "gradcam")
            else 1 + int(job.method == "guided_gradcam" or job.plain_gradient)
        )
        return float(n * h * w * (1 + backward))
    if isinstance(job, FeatureMapsJob):
        _, _, h, w = np.shape(job.inputs)
        return float(h * w)
    if isinstance(job, FiltersJob):
        return FILTERS_COST
    if isinstance(job, DreamJob):
        h, w, _ = _image_hw(job.image, "dream image")
        dp = job.params
        wh, ww = fit_side(h, w, dp.max_side)
        sizes = octave_sizes(wh, ww, dp.octaves, dp.octave_scale)
        return float(sum(sh * sw for sh, sw in sizes) * dp.steps * 2 + 2 * wh * ww)
    if isinstance(job, StylizeJob):
        h, w, _ = _image_hw(job.content, "content image")
        sp = job.params
        wh, ww = fit_side(h, w, sp.max_side)
        styles = 0
        for style in job.styles:
            sh, sw, _ = _image_hw(style, "style image")
            a, b = style_size((wh, ww), (sh, sw), sp.style_scale)
            styles += a * b
        return float(wh * ww * sp.iterations * 2 + wh * ww + styles)
    raise InvalidArgument(f"unknown task type {type(job).__name__}")


__all__ = [
    "DEFAULT_MAX_CHANNELS",
    "FILTERS_COST",
    "MAX_CHANNELS",
    "NEURON_METHODS",
    "DreamJob",
    "DreamResult",
    "ExplainJob",
    "ExplainResult",
    "FeatureMap",
    "FeatureMapsJob",
    "FeatureMapsResult",
    "FiltersJob",
    "FiltersResult",
    "Job",
    "JobContext",
    "JobKind",
    "NeuronExplained",
    "NeuronTarget",
    "ProgressUpdate",
    "Result",
    "StylizeJob",
    "StylizeResult",
    "check_layers",
    "estimate_cost",
    "first_convolution",
    "validate_job",
]
