"""The gradient-job interface the worker pool calls: tasks, results, `load_models`, `handle`, `estimate_cost`.

docs/SERVICE_INTERFACES.md ("Gradient jobs") is the contract. The pool knows nothing about the
algorithms; it calls, by name, in spawned worker processes:

    state = load_models(config)            # once per worker (functools.partial(load_models, config))
    result = handle(state, task, ctx)      # per job; ctx.should_stop() / ctx.progress(update)

and, in the serving process before admitting a job, `validate_task(task, limits)` and
`estimate_cost(task)`.

Everything here is picklable and torch-free (torch is imported inside `load_models`/`handle` only),
so the serving process builds tasks and prices them without loading PyTorch. Tasks, results and
progress updates are frozen dataclasses of numpy arrays and plain Python values: never tensors,
never protobufs.

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
  backward), plus one forward of the content image and one of each style image (the targets).
The units ignore the architecture (a VGG-19 pixel costs more than a LeNet-5 pixel); the pool's
`cost_budget` (settings.max_task_cost) is in the same units.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np

from export.preprocessing import Preprocessing
from service.errors import FailedPrecondition, InvalidArgument, NotFound
from service.worker.rendering import SaliencyStyle, encode_png, saliency_png, to_float_image

if TYPE_CHECKING:
    from torch import nn

    from service.settings import Settings

log = logging.getLogger(__name__)

TaskKind = Literal["explain", "dream", "stylize"]

# Dream and stylize images: no octave or image side below this (GoogLeNet's inception4c and VGG's
# conv5_1 still have a 2x2 map at 32 px; LeNet-5's C5 needs exactly 32).
MIN_IMAGE_SIDE = 32

# DeepDream layer per architecture when a request names none. GoogLeNet: inception_4c/output, the
# original notebook's default. The others: a comparably deep ReLU output (mid-level textures).
DEFAULT_DREAM_LAYERS: dict[str, str] = {
    "googlenet": "inception4c",
    "vgg19": "features.22",  # relu4_2
    "resnet18": "layer3",
    "resnet34": "layer3",
    "resnet50": "layer3",
    "resnet101": "layer3",
    "resnet152": "layer3",
    "alexnet": "features.11",  # relu after conv4
    "alexnet_torchvision": "features.9",  # relu after conv4
    "lenet5": "features.4",  # C3's tanh
}

EXPLAIN_METHODS = ("guided_backprop", "guided_gradcam", "gradcam", "gradient")

# Stylize needs VGG-19's `features` layout (style_transfer.VGG19_LAYERS).
STYLE_ARCHITECTURES = ("vgg19",)


# ---------------------------------------------------------------------------------------------------
# Limits and parameters


@dataclass(frozen=True)
class Limits:
    """Per-job caps, from the settings of the same names (settings.max_task_*)."""

    max_iterations: int = 1000  # settings.max_task_iterations: optimisation steps per job
    max_image_side: int = 1024  # settings.max_task_image_side: longest image side a job may use
    max_batch: int = 16  # settings.max_task_batch: images per explain job (and style images per job)

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_iterations=settings.max_task_iterations,
            max_image_side=settings.max_task_image_side,
            max_batch=settings.max_task_batch,
        )


def _require(ok: bool, message: str, reason: str = "invalid_argument") -> None:
    if not ok:
        raise InvalidArgument(message, reason=reason)


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class DreamParams:
    """DeepDream settings; the defaults are the original notebook's (Mordvintsev et al. 2015).

    layers: module path (model.named_modules(), e.g. "inception4c", "features.22") -> weight; the
        objective is sum_l weight_l * mean(activation_l ** 2). None: the architecture's default
        (DEFAULT_DREAM_LAYERS).
    channels: optional layer -> channel indices; that layer's objective then uses only those channels.
    octaves, octave_scale: image pyramid, each octave 1/octave_scale the size of the previous one;
        octaves smaller than MIN_IMAGE_SIDE are skipped.
    steps: gradient-ascent steps per octave.
    step_size: in [0, 1] pixel units (the notebook's 1.5 on a 0..255 scale), applied to the gradient
        divided by its mean absolute value.
    jitter: random circular shift of up to this many pixels each step, undone after the step.
    tile_size: compute the gradient in tiles of at most this side (0: never tile).
    max_side: downscale the input so its longer side is at most this first (0: no downscaling); the
        result is brought back to the input size.
    seed: seeds the jitter and tile shifts; equal seeds give equal results on the same machine (on
        CUDA, only as far as cuDNN's kernels are deterministic).
    preview_every: send a preview image with the progress update every N steps (0: never).
    """

    layers: Mapping[str, float] | None = None
    channels: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    octaves: int = 4
    octave_scale: float = 1.4
    steps: int = 10
    step_size: float = 1.5 / 255.0
    jitter: int = 32
    tile_size: int = 512
    max_side: int = 0
    seed: int = 0
    preview_every: int = 0

    def __post_init__(self) -> None:
        if self.layers is not None:
            _require(len(self.layers) > 0, "dream: give at least one layer (or none for the default)")
            for name, weight in self.layers.items():
                _require(
                    isinstance(name, str) and bool(name),
                    f"dream: layer names must be non-empty, got {name!r}",
                )
                _require(_finite_number(weight), f"dream: weight of layer {name!r} must be a finite number")
        for name, chans in self.channels.items():
            _require(
                isinstance(chans, (tuple, list)) and len(chans) > 0,
                f"dream: channels of layer {name!r} must be a non-empty list of indices",
            )
            _require(
                all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in chans),
                f"dream: channels of layer {name!r} must be integers",
                reason="channel_out_of_range",
            )
            if self.layers is not None:
                _require(
                    name in self.layers, f"dream: channels given for layer {name!r}, which is not a target"
                )
        _require(isinstance(self.octaves, int) and 1 <= self.octaves <= 16, "dream: octaves must be 1..16")
        _require(
            _finite_number(self.octave_scale) and 1.0 < self.octave_scale <= 4.0,
            "dream: octave_scale must be in (1, 4]",
        )
        _require(isinstance(self.steps, int) and self.steps >= 1, "dream: steps must be at least 1")
        _require(
            _finite_number(self.step_size) and 0.0 < self.step_size <= 1.0,
            "dream: step_size must be in (0, 1]",
        )
        _require(isinstance(self.jitter, int) and self.jitter >= 0, "dream: jitter must be >= 0 pixels")
        _require(
            isinstance(self.tile_size, int) and (self.tile_size == 0 or self.tile_size >= MIN_IMAGE_SIDE),
            f"dream: tile_size must be 0 (no tiling) or at least {MIN_IMAGE_SIDE}",
        )
        _require(
            isinstance(self.max_side, int) and (self.max_side == 0 or self.max_side >= MIN_IMAGE_SIDE),
            f"dream: max_side must be 0 (keep the size) or at least {MIN_IMAGE_SIDE}",
        )
        _require(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "dream: seed must be in [0, 2**63)")
        _require(
            isinstance(self.preview_every, int) and self.preview_every >= 0,
            "dream: preview_every must be >= 0",
        )


VGG19_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


@dataclass(frozen=True)
class StyleParams:
    """Neural style transfer settings (Gatys et al. 2015); see style_transfer.py for the losses.

    content_weight, style_weight, tv_weight: the loss weights (defaults 1, 1e6, 0).
    content_layer, style_layers: VGG-19 layer names (conv1_1 ... relu5_4, pool1 ... pool5); defaults
        relu4_2 and relu1_1 ... relu5_1, i.e. after the ReLU, as in the paper's Caffe network.
    style_layer_weights: one per style layer (default 1 each).
    init: start from the content image or from uniform noise (drawn with `seed`).
    optimizer: "lbfgs" (default, as Gatys) or "adam"; learning_rate None means 1.0 for L-BFGS and 0.02
        (pixel units) for Adam.
    iterations: objective evaluations (L-BFGS closure calls, each a forward+backward) or Adam steps.
    style_scale: style images are resized so their longer side is style_scale x the content's.
    original_colors: keep the content image's colours (luminance-only transfer, YIQ).
    max_side: the content image is downscaled so its longer side is at most this (0: keep); the
        result has the working size.
    preview_every: send a preview image with the progress update every N iterations (0: never).
    """

    content_weight: float = 1.0
    style_weight: float = 1e6
    tv_weight: float = 0.0
    content_layer: str = "relu4_2"
    style_layers: tuple[str, ...] = VGG19_STYLE_LAYERS
    style_layer_weights: tuple[float, ...] | None = None
    init: Literal["content", "noise"] = "content"
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    learning_rate: float | None = None
    lbfgs_history: int = 100
    iterations: int = 300
    style_scale: float = 1.0
    original_colors: bool = False
    max_side: int = 512
    seed: int = 0
    preview_every: int = 0

    def __post_init__(self) -> None:
        for name in ("content_weight", "style_weight", "tv_weight"):
            value = getattr(self, name)
            _require(_finite_number(value) and value >= 0, f"stylize: {name} must be a finite number >= 0")
        _require(len(self.style_layers) > 0, "stylize: give at least one style layer")
        if self.style_layer_weights is not None:
            _require(
                len(self.style_layer_weights) == len(self.style_layers),
                f"stylize: {len(self.style_layer_weights)} style_layer_weights for "
                f"{len(self.style_layers)} style layers",
            )
            _require(
                all(_finite_number(w) and w >= 0 for w in self.style_layer_weights),
                "stylize: style_layer_weights must be finite numbers >= 0",
            )
        _require(
            self.init in ("content", "noise"),
            f"stylize: init must be 'content' or 'noise', got {self.init!r}",
        )
        _require(
            self.optimizer in ("lbfgs", "adam"),
            f"stylize: optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}",
        )
        if self.learning_rate is not None:
            _require(
                _finite_number(self.learning_rate) and self.learning_rate > 0,
                "stylize: learning_rate must be a positive number",
            )
        _require(
            isinstance(self.lbfgs_history, int) and self.lbfgs_history >= 1, "stylize: lbfgs_history >= 1"
        )
        _require(
            isinstance(self.iterations, int) and self.iterations >= 1, "stylize: iterations must be >= 1"
        )
        _require(
            _finite_number(self.style_scale) and 0.05 <= self.style_scale <= 4.0,
            "stylize: style_scale must be in [0.05, 4]",
        )
        _require(
            isinstance(self.max_side, int) and (self.max_side == 0 or self.max_side >= MIN_IMAGE_SIDE),
            f"stylize: max_side must be 0 (keep the size) or at least {MIN_IMAGE_SIDE}",
        )
        _require(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "stylize: seed must be in [0, 2**63)")
        _require(
            isinstance(self.preview_every, int) and self.preview_every >= 0,
            "stylize: preview_every must be >= 0",
        )

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1.0 if self.optimizer == "lbfgs" else 0.02


# ---------------------------------------------------------------------------------------------------
# Geometry shared by the algorithms and estimate_cost (one definition, so the price is the work done)


def fit_side(h: int, w: int, max_side: int) -> tuple[int, int]:
    """(h, w) scaled down (aspect kept) so the longer side is at most max_side; 0 means no limit."""
    if max_side <= 0 or max(h, w) <= max_side:
        return h, w
    scale = max_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def octave_sizes(h: int, w: int, octaves: int, scale: float) -> list[tuple[int, int]]:
    """DeepDream's pyramid, largest first: each octave is the previous one divided by `scale`
    (as the notebook's successive `nd.zoom`); octaves with a side below MIN_IMAGE_SIDE are dropped."""
    sizes = [(h, w)]
    for _ in range(octaves - 1):
        ph, pw = sizes[-1]
        nh, nw = round(ph / scale), round(pw / scale)
        if min(nh, nw) < MIN_IMAGE_SIDE:
            break
        sizes.append((nh, nw))
    return sizes


def style_size(content_hw: tuple[int, int], style_hw: tuple[int, int], style_scale: float) -> tuple[int, int]:
    """A style image's working size: longer side = style_scale x the content's longer side."""
    target = max(MIN_IMAGE_SIDE, round(style_scale * max(content_hw)))
    sh, sw = style_hw
    scale = target / max(sh, sw)
    return max(MIN_IMAGE_SIDE, round(sh * scale)), max(MIN_IMAGE_SIDE, round(sw * scale))


# ---------------------------------------------------------------------------------------------------
# Tasks, results, progress


@dataclass(frozen=True)
class ExplainTask:
    """Guided backprop / Guided Grad-CAM / plain gradient for a batch of preprocessed inputs.

    inputs: float32 (N, C, H, W), the model's input tensor (its ModelInfo input shape).
    targets: one class per input, or None for each input's predicted class.
    method: "guided_backprop", "guided_gradcam", "gradcam" (the heatmap alone) or "gradient".
    render: also return one PNG per input ("signed" or "magnitude" rendering), or None.
    """

    kind: ClassVar[TaskKind] = "explain"
    model: str
    version: int
    inputs: np.ndarray
    targets: tuple[int, ...] | None = None
    method: str = "guided_backprop"
    plain_gradient: bool = False
    cam_layer: str | None = None
    render: SaliencyStyle | None = "signed"


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
    pngs: tuple[bytes, ...]  # one rendering per input when the task asked for it
    seconds: float


@dataclass(frozen=True)
class DreamTask:
    """DeepDream on one image (pixels in [0, 1]; see the module docstring for the array layout)."""

    kind: ClassVar[TaskKind] = "dream"
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
class StylizeTask:
    """Neural style transfer of `content` towards the blended styles of `styles`.

    style_blend: one non-negative weight per style image (normalized to sum 1); None: equal weights.
    """

    kind: ClassVar[TaskKind] = "stylize"
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

    kind: TaskKind
    step: int
    total_steps: int
    losses: Mapping[str, float]
    octave: int | None = None
    preview_png: bytes | None = None


Task = ExplainTask | DreamTask | StylizeTask
Result = ExplainResult | DreamResult | StylizeResult


class JobContext(Protocol):
    """What `handle` needs from the pool's context (service.worker.pool.JobContext)."""

    def should_stop(self) -> bool: ...

    def progress(self, update: Any) -> None: ...


# ---------------------------------------------------------------------------------------------------
# Validation and cost (serving process and worker)


def _image_hw(image: np.ndarray, name: str) -> tuple[int, int, int]:
    arr = np.asarray(image)
    _require(
        arr.ndim in (2, 3),
        f"{name} must be an (H, W[, C]) image array, got shape {arr.shape}",
        "not_an_image",
    )
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    return int(arr.shape[0]), int(arr.shape[1]), int(channels)


def _check_side(h: int, w: int, limits: Limits, name: str) -> None:
    _require(
        max(h, w) <= limits.max_image_side,
        f"{name} is {w}x{h}; its longer side exceeds max_task_image_side={limits.max_image_side}",
        "image_too_large",
    )
    _require(min(h, w) >= MIN_IMAGE_SIDE, f"{name} is {w}x{h}; both sides must be at least {MIN_IMAGE_SIDE}")


def validate_task(task: Task, limits: Limits) -> None:
    """Check a task against the caps; raise InvalidArgument naming the cap. Model-independent checks
    only (the worker additionally checks layers, classes and channels against the loaded model)."""
    if isinstance(task, ExplainTask):
        x = np.asarray(task.inputs)
        _require(
            x.ndim == 4 and x.dtype.kind == "f",
            f"explain inputs must be a float (N, C, H, W) tensor, got {x.dtype} {x.shape}",
            "not_an_image",
        )
        n = x.shape[0]
        _require(n >= 1, "explain needs at least one input")
        _require(
            n <= limits.max_batch, f"explain got {n} inputs; the limit is max_task_batch={limits.max_batch}"
        )
        _require(
            max(x.shape[2], x.shape[3]) <= limits.max_image_side,
            f"explain input is {x.shape[3]}x{x.shape[2]}; its longer side exceeds "
            f"max_task_image_side={limits.max_image_side}",
            "image_too_large",
        )
        _require(bool(np.isfinite(x).all()), "explain inputs contain NaN or Inf", "not_an_image")
        if task.targets is not None:
            _require(len(task.targets) == n, f"explain got {len(task.targets)} targets for {n} inputs")
            _require(
                all(isinstance(t, (int, np.integer)) and t >= 0 for t in task.targets),
                "explain targets must be class indices >= 0",
                "target_out_of_range",
            )
        _require(
            task.method in EXPLAIN_METHODS,
            f"unknown explain method {task.method!r}; use one of {', '.join(EXPLAIN_METHODS)}",
        )
        _require(
            task.render in (None, "signed", "magnitude"),
            f"unknown saliency rendering {task.render!r}; use 'signed', 'magnitude' or none",
        )
    elif isinstance(task, DreamTask):
        h, w, _ = _image_hw(task.image, "dream image")
        _check_side(h, w, limits, "dream image")
        p = task.params
        sizes = octave_sizes(*fit_side(h, w, p.max_side), p.octaves, p.octave_scale)
        total = len(sizes) * p.steps
        _require(
            total <= limits.max_iterations,
            f"dream asks for {total} steps ({len(sizes)} octaves x {p.steps}); the limit is "
            f"max_task_iterations={limits.max_iterations}",
            "too_many_iterations",
        )
    elif isinstance(task, StylizeTask):
        h, w, _ = _image_hw(task.content, "content image")
        _check_side(h, w, limits, "content image")
        _require(len(task.styles) >= 1, "stylize needs at least one style image")
        _require(
            len(task.styles) <= limits.max_batch,
            f"stylize got {len(task.styles)} style images; the limit is max_task_batch={limits.max_batch}",
        )
        for i, style in enumerate(task.styles):
            sh, sw, _ = _image_hw(style, f"style image {i}")
            _check_side(sh, sw, limits, f"style image {i}")
        if task.style_blend is not None:
            _require(
                len(task.style_blend) == len(task.styles),
                f"stylize got {len(task.style_blend)} blend weights for {len(task.styles)} style images",
            )
            _require(
                all(_finite_number(b) and b >= 0 for b in task.style_blend) and sum(task.style_blend) > 0,
                "stylize blend weights must be >= 0 with a positive sum",
            )
        _require(
            task.params.iterations <= limits.max_iterations,
            f"stylize asks for {task.params.iterations} iterations; the limit is "
            f"max_task_iterations={limits.max_iterations}",
            "too_many_iterations",
        )
        wh, ww = fit_side(h, w, task.params.max_side)
        sh_, sw_ = style_size(
            (wh, ww), _image_hw(task.styles[0], "style image 0")[:2], task.params.style_scale
        )
        _require(
            max(sh_, sw_) <= limits.max_image_side,
            f"style_scale makes the style images {sw_}x{sh_}, "
            f"beyond max_task_image_side={limits.max_image_side}",
            "image_too_large",
        )
    else:
        raise InvalidArgument(f"unknown task type {type(task).__name__}")


def estimate_cost(task: Task) -> float:
    """The task's cost in pass-pixels (module docstring): what the pool's cost budget admits."""
    if isinstance(task, ExplainTask):
        n, _, h, w = np.shape(task.inputs)
        # guided and plain gradients share the forward pass; each needs its own backward
        # gradcam: one plain backward gives dScore/dA and the plain input gradient together
        backward = (
            1
            if task.method in ("gradient", "gradcam")
            else 1 + int(task.method == "guided_gradcam" or task.plain_gradient)
        )
        return float(n * h * w * (1 + backward))
    if isinstance(task, DreamTask):
        h, w, _ = _image_hw(task.image, "dream image")
        dp = task.params
        wh, ww = fit_side(h, w, dp.max_side)
        sizes = octave_sizes(wh, ww, dp.octaves, dp.octave_scale)
        return float(sum(sh * sw for sh, sw in sizes) * dp.steps * 2 + 2 * wh * ww)
    if isinstance(task, StylizeTask):
        h, w, _ = _image_hw(task.content, "content image")
        sp = task.params
        wh, ww = fit_side(h, w, sp.max_side)
        styles = 0
        for style in task.styles:
            sh, sw, _ = _image_hw(style, "style image")
            a, b = style_size((wh, ww), (sh, sw), sp.style_scale)
            styles += a * b
        return float(wh * ww * sp.iterations * 2 + wh * ww + styles)
    raise InvalidArgument(f"unknown task type {type(task).__name__}")


# ---------------------------------------------------------------------------------------------------
# The worker side: loading models and handling jobs


@dataclass(frozen=True)
class TorchModel:
    """One loaded model version in a worker."""

    name: str
    version: int
    architecture: str
    module: nn.Module
    num_classes: int
    input_shape: tuple[int, int, int]
    preprocessing: Preprocessing
    capabilities: Mapping[str, bool]


@dataclass
class WorkerState:
    """What `load_models` returns and `handle` gets: the loaded models, the device and the caps."""

    models: dict[tuple[str, int], TorchModel]
    device: str
    limits: Limits
    # Versions that failed the parity self-test, with the reason: never used for a job.
    refused: dict[tuple[str, int], str] = field(default_factory=dict)

    def ready_summary(self) -> dict[str, Any]:
        """What the pool reports to the serving process with Ready (pool.ready_summary): the
        versions refused for gradient RPCs, as {"name:version": reason}."""
        return {"refused": {f"{n}:{v}": reason for (n, v), reason in self.refused.items()}}

    def get(self, name: str, version: int) -> TorchModel:
        """version 0 (or less) is the latest version of `name` the workers were given."""
        if version <= 0:
            versions = [v for (n, v) in (*self.models, *self.refused) if n == name]
            if not versions:
                raise NotFound(f"model {name!r} is not loaded in the gradient workers")
            version = max(versions)
        if (name, version) in self.refused:
            raise FailedPrecondition(
                f"model {name!r} version {version} is not offered for gradient RPCs: "
                f"{self.refused[(name, version)]}",
                reason="parity_failed",
            )
        try:
            return self.models[(name, version)]
        except KeyError:
            raise NotFound(
                f"model {name!r} version {version} is not loaded in the gradient workers"
            ) from None


def worker_config(settings: Settings, version_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """The `load_models` config for the model versions the server serves, from the settings."""
    import os

    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // max(1, settings.workers))
    return {
        "models": [str(p) for p in version_dirs],
        "device": settings.device,
        "cuda_device_id": settings.cuda_device_id,
        "torch_threads": threads,
        "nice": settings.worker_nice,
        "limits": {
            "max_iterations": settings.max_task_iterations,
            "max_image_side": settings.max_task_image_side,
            "max_batch": settings.max_task_batch,
        },
    }


class ParityError(RuntimeError):
    """A version's rebuilt PyTorch network disagrees with its model.onnx (see `_load_version`)."""

    def __init__(self, key: tuple[str, int], message: str) -> None:
        super().__init__(message)
        self.key = key


def _load_version(directory: Path, device: Any) -> TorchModel:
    """Rebuild one repository version as the exporter built it, and prove it.

    metadata.json is read and validated by export.repository (one reader, one schema), every file it
    lists is checked (size, sha256), the module is built with the exporter's `build_kwargs` and loads
    weights.pt strictly. Then the parity self-test (export.onnx_export.verify_version) runs the
    module and model.onnx on ONNX Runtime's CPU provider on the export's fixed input, on the CPU
    before the module moves to `device`: raises ParityError when they differ beyond the export's
    bound, RuntimeError for anything else that stops the version from loading.
    """
    import torch

    from export import repository
    from export.errors import ExportError, VerificationError
    from export.models import build, get_spec
    from export.onnx_export import verify_version

    try:
        version = repository.read_version(directory)
        repository.verify_files(version)
    except ExportError as exc:
        raise RuntimeError(str(exc)) from None
    label = f"{version.name}:{version.version}"
    get_spec(version.architecture)  # UnknownArchitecture names the known ones
    try:
        module = build(version.architecture, num_classes=version.num_classes, **version.build_kwargs)
    except TypeError as exc:
        raise RuntimeError(
            f"{label}: metadata.json's build_kwargs {version.build_kwargs} do not build "
            f"{version.architecture}: {exc}"
        ) from None
    state = torch.load(version.weights_path, map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    module = module.float().eval()
    for p in module.parameters():
        p.requires_grad_(False)  # workers never train; the algorithms take input gradients only
    try:
        parity = verify_version(version, module)
    except VerificationError as exc:
        raise ParityError(
            version.key,
            "the PyTorch network rebuilt from weights.pt disagrees with model.onnx "
            f"(ONNX Runtime) on the export's fixed input: {exc}",
        ) from None
    log.info(
        "%s: parity with model.onnx on ONNX Runtime: relative diff %.2g (bound %g)",
        label,
        parity.relative_diff,
        parity.max_relative_diff,
    )
    return TorchModel(
        name=version.name,
        version=version.version,
        architecture=version.architecture,
        module=module.to(device),
        num_classes=version.num_classes,
        input_shape=version.input_shape,
        preprocessing=version.preprocessing,
        capabilities=version.capabilities,
    )


def load_models(config: Mapping[str, Any]) -> WorkerState:
    """Load every model version listed in `config` (see `worker_config`) for gradient jobs.

    config["models"]: repository version directories (each with metadata.json and weights.pt);
    config["device"]: "auto" (CUDA when torch.cuda.is_available()), "cpu" or "cuda";
    config["cuda_device_id"], config["torch_threads"] (0: leave torch's default), config["nice"]
    (lower this worker's CPU priority by that much; 0: unchanged), config["limits"].
    Each version is rebuilt and checked as `_load_version` says; one that fails the parity self-test
    is left out of `models` and listed in `refused` (its jobs answer FAILED_PRECONDITION), anything
    else that stops a version from loading fails the worker's start.
    """
    import os

    import torch

    threads = int(config.get("torch_threads", 0))
    if threads > 0:
        torch.set_num_threads(threads)
    nice = int(config.get("nice", 0))
    if nice > 0:
        # Below the serving process: where they share cores, classification threads win.
        os.nice(nice)
    wanted = config.get("device", "auto")
    if wanted not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {wanted!r}")
    use_cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch.cuda.is_available() is false in the gradient worker")
    device = torch.device(f"cuda:{int(config.get('cuda_device_id', 0))}") if use_cuda else torch.device("cpu")
    models: dict[tuple[str, int], TorchModel] = {}
    refused: dict[tuple[str, int], str] = {}
    for entry in config.get("models", []):
        try:
            loaded = _load_version(Path(entry), device)
        except ParityError as exc:
            # Explaining another network than the one that classified is worse than not explaining:
            # the version keeps classifying (ONNX Runtime) but is not offered for gradient RPCs.
            refused[exc.key] = str(exc)
            log.error("not offering %s:%d for gradient RPCs: %s", *exc.key, exc)
            continue
        models[(loaded.name, loaded.version)] = loaded
    return WorkerState(
        models=models,
        device=str(device),
        limits=Limits(**dict(config.get("limits", {}))),
        refused=refused,
    )


def _check_capability(model: TorchModel, kind: TaskKind) -> None:
    if model.capabilities.get(kind) is False:
        raise InvalidArgument(
            f"model {model.name!r} version {model.version} does not support {kind}", reason="unsupported"
        )


def _image_for(model: TorchModel, image: np.ndarray, name: str) -> np.ndarray:
    arr = to_float_image(image, name=name)
    channels = model.preprocessing.channels
    if arr.shape[2] != channels:
        raise InvalidArgument(
            f"{name} has {arr.shape[2]} channel(s); model {model.name!r} takes {channels} "
            f"({model.preprocessing.color_mode})",
            reason="not_an_image",
        )
    return arr


def handle(state: WorkerState, task: Task, ctx: JobContext) -> Result:
    """Run one gradient job in the worker; raises service.errors.ServiceError subclasses
    (InvalidArgument, NotFound, Cancelled when ctx.should_stop() turned true)."""
    validate_task(task, state.limits)
    model = state.get(task.model, task.version)
    _check_capability(model, task.kind)
    started = time.perf_counter()
    if isinstance(task, ExplainTask):
        return _explain(model, task, ctx, started)
    if isinstance(task, DreamTask):
        return _dream(model, task, ctx, started)
    return _stylize(model, task, ctx, started)


def _explain(model: TorchModel, task: ExplainTask, ctx: JobContext, started: float) -> ExplainResult:
    import torch

    from service.worker.guided_backprop import explain

    x = np.asarray(task.inputs, dtype=np.float32)
    if tuple(x.shape[1:]) != model.input_shape:
        raise InvalidArgument(
            f"explain inputs have shape {tuple(x.shape[1:])}; model {model.name!r} takes {model.input_shape}",
            reason="wrong_shape",
        )
    e = explain(
        model.module,
        torch.from_numpy(np.ascontiguousarray(x)),
        list(task.targets) if task.targets is not None else None,
        method=task.method,  # type: ignore[arg-type]  # checked in validate_task
        plain_gradient=task.plain_gradient,
        cam_layer=task.cam_layer,
        should_stop=ctx.should_stop,  # checked at every layer: a batch stops within one layer
    )
    # one batched pass: every image is done at once (counts the images as the job's steps)
    ctx.progress(ProgressUpdate(kind="explain", step=len(x), total_steps=len(x), losses={}))
    if not task.render:
        pngs: tuple[bytes, ...] = ()
    elif task.method == "gradcam":  # already a [0, 1] heatmap: drawn as it is, white = 1
        pngs = tuple(encode_png(s[0]) for s in e.saliency)
    else:
        pngs = tuple(saliency_png(s, task.render) for s in e.saliency)
    return ExplainResult(
        model=model.name,
        version=model.version,
        saliency=e.saliency,
        classes=e.classes,
        probabilities=e.probabilities,
        predicted=e.predicted,
        predicted_probabilities=e.predicted_probabilities,
        plain=e.plain,
        cam=e.cam,
        cam_layer=e.cam_layer,
        pngs=pngs,
        seconds=time.perf_counter() - started,
    )


def _progress_sink(ctx: JobContext, kind: TaskKind) -> Callable[[Any], None]:
    def send(p: Any) -> None:
        preview = encode_png(p.preview) if p.preview is not None else None
        ctx.progress(
            ProgressUpdate(
                kind=kind,
                step=p.step,
                total_steps=p.total_steps,
                losses=dict(p.losses),
                octave=getattr(p, "octave", None),
                preview_png=preview,
            )
        )

    return send


def _dream(model: TorchModel, task: DreamTask, ctx: JobContext, started: float) -> DreamResult:
    from service.worker.deepdream import dream

    image = _image_for(model, task.image, "dream image")
    layers = task.params.layers
    if layers is None:
        if model.architecture not in DEFAULT_DREAM_LAYERS:
            raise InvalidArgument(
                f"dream: {model.architecture} has no default layer; name one", reason="unknown_layer"
            )
        layers = {DEFAULT_DREAM_LAYERS[model.architecture]: 1.0}
    out = dream(
        model.module,
        image,
        task.params,
        layers=layers,
        mean=model.preprocessing.mean,
        std=model.preprocessing.std,
        progress=_progress_sink(ctx, "dream"),
        should_stop=ctx.should_stop,
    )
    return DreamResult(
        model=model.name,
        version=model.version,
        image=out.image,
        png=encode_png(out.image),
        layers=tuple(layers.items()),
        octave_sizes=out.octave_sizes,
        steps=out.steps,
        objective_before=out.objective_before,
        objective_after=out.objective_after,
        seconds=time.perf_counter() - started,
    )


def _stylize(model: TorchModel, task: StylizeTask, ctx: JobContext, started: float) -> StylizeResult:
    from service.worker.style_transfer import stylize

    if model.architecture not in STYLE_ARCHITECTURES:
        raise InvalidArgument(
            f"stylize needs a VGG-19 model; {model.name!r} is {model.architecture}", reason="unsupported"
        )
    content = _image_for(model, task.content, "content image")
    styles = [_image_for(model, s, f"style image {i}") for i, s in enumerate(task.styles)]
    out = stylize(
        model.module,
        content,
        styles,
        task.params,
        blend=task.style_blend,
        mean=model.preprocessing.mean,
        std=model.preprocessing.std,
        progress=_progress_sink(ctx, "stylize"),
        should_stop=ctx.should_stop,
    )
    return StylizeResult(
        model=model.name,
        version=model.version,
        image=out.image,
        png=encode_png(out.image),
        losses=out.losses,
        initial_losses=out.initial_losses,
        iterations=out.iterations,
        best_iteration=out.best_iteration,
        seconds=time.perf_counter() - started,
    )


__all__ = [
    "DEFAULT_DREAM_LAYERS",
    "EXPLAIN_METHODS",
    "MIN_IMAGE_SIDE",
    "DreamParams",
    "DreamResult",
    "DreamTask",
    "ExplainResult",
    "ExplainTask",
    "JobContext",
    "Limits",
    "ParityError",
    "ProgressUpdate",
    "Result",
    "StyleParams",
    "StylizeResult",
    "StylizeTask",
    "Task",
    "TorchModel",
    "WorkerState",
    "estimate_cost",
    "fit_side",
    "handle",
    "load_models",
    "octave_sizes",
    "style_size",
    "validate_task",
    "worker_config",
]
