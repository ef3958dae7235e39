"""What a gradient job may ask for: the explain methods, the DeepDream and style-transfer parameters,
the per-job caps, and the geometry both the algorithms and the price use.

A leaf: numpy and service.errors only, never torch. The serving process validates requests with it
(through jobs.py); the algorithms (guided_backprop.py, deepdream.py, style_transfer.py) take their
parameters and sizes from it, so the price `jobs.estimate_cost` puts on a job is the work they do.
"""

from __future__ import annotations

import difflib
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from service.errors import InvalidArgument

if TYPE_CHECKING:
    from service.settings import Settings

# The one list of explain methods: jobs.validate_job, guided_backprop.explain and the frontend's
# protobuf enum mapping (service.gradients) all read it. "gradient" has no enum value on the wire.
ExplainMethod = Literal["guided_backprop", "guided_gradcam", "gradcam", "gradient"]
EXPLAIN_METHODS: tuple[ExplainMethod, ...] = typing.get_args(ExplainMethod)

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


def require(ok: bool, message: str, reason: str = "invalid_argument") -> None:
    """Raise InvalidArgument(message, reason) unless `ok`: every parameter and cap check reads as one."""
    if not ok:
        raise InvalidArgument(message, reason=reason)


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite."""
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
            require(len(self.layers) > 0, "dream: give at least one layer (or none for the default)")
            for name, weight in self.layers.items():
                require(
                    isinstance(name, str) and bool(name),
                    f"dream: layer names must be non-empty, got {name!r}",
                )
                require(is_finite_number(weight), f"dream: weight of layer {name!r} must be a finite number")
        for name, chans in self.channels.items():
            require(
                isinstance(chans, (tuple, list)) and len(chans) > 0,
                f"dream: channels of layer {name!r} must be a non-empty list of indices",
            )
            require(
                all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in chans),
                f"dream: channels of layer {name!r} must be integers",
                reason="channel_out_of_range",
            )
            if self.layers is not None:
                require(
                    name in self.layers, f"dream: channels given for layer {name!r}, which is not a target"
                )
        require(isinstance(self.octaves, int) and 1 <= self.octaves <= 16, "dream: octaves must be 1..16")
        require(
            is_finite_number(self.octave_scale) and 1.0 < self.octave_scale <= 4.0,
            "dream: octave_scale must be in (1, 4]",
        )
        require(isinstance(self.steps, int) and self.steps >= 1, "dream: steps must be at least 1")
        require(
            is_finite_number(self.step_size) and 0.0 < self.step_size <= 1.0,
            "dream: step_size must be in (0, 1]",
        )
        require(isinstance(self.jitter, int) and self.jitter >= 0, "dream: jitter must be >= 0 pixels")
        require(
            isinstance(self.tile_size, int) and (self.tile_size == 0 or self.tile_size >= MIN_IMAGE_SIDE),
            f"dream: tile_size must be 0 (no tiling) or at least {MIN_IMAGE_SIDE}",
        )
        require(
            isinstance(self.max_side, int) and (self.max_side == 0 or self.max_side >= MIN_IMAGE_SIDE),
            f"dream: max_side must be 0 (keep the size) or at least {MIN_IMAGE_SIDE}",
        )
        require(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "dream: seed must be in [0, 2**63)")
        require(
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
            require(is_finite_number(value) and value >= 0, f"stylize: {name} must be a finite number >= 0")
        require(len(self.style_layers) > 0, "stylize: give at least one style layer")
        if self.style_layer_weights is not None:
            require(
                len(self.style_layer_weights) == len(self.style_layers),
                f"stylize: {len(self.style_layer_weights)} style_layer_weights for "
                f"{len(self.style_layers)} style layers",
            )
            require(
                all(is_finite_number(w) and w >= 0 for w in self.style_layer_weights),
                "stylize: style_layer_weights must be finite numbers >= 0",
            )
        require(
            self.init in ("content", "noise"),
            f"stylize: init must be 'content' or 'noise', got {self.init!r}",
        )
        require(
            self.optimizer in ("lbfgs", "adam"),
            f"stylize: optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}",
        )
        if self.learning_rate is not None:
            require(
                is_finite_number(self.learning_rate) and self.learning_rate > 0,
                "stylize: learning_rate must be a positive number",
            )
        require(
            isinstance(self.lbfgs_history, int) and self.lbfgs_history >= 1, "stylize: lbfgs_history >= 1"
        )
        require(isinstance(self.iterations, int) and self.iterations >= 1, "stylize: iterations must be >= 1")
        require(
            is_finite_number(self.style_scale) and 0.05 <= self.style_scale <= 4.0,
            "stylize: style_scale must be in [0.05, 4]",
        )
        require(
            isinstance(self.max_side, int) and (self.max_side == 0 or self.max_side >= MIN_IMAGE_SIDE),
            f"stylize: max_side must be 0 (keep the size) or at least {MIN_IMAGE_SIDE}",
        )
        require(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "stylize: seed must be in [0, 2**63)")
        require(
            isinstance(self.preview_every, int) and self.preview_every >= 0,
            "stylize: preview_every must be >= 0",
        )

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1.0 if self.optimizer == "lbfgs" else 0.02


# ---------------------------------------------------------------------------------------------------
# Layer names: what Explain's neuron, Dream and FeatureMaps may name


# A model's addressable layers, as metadata.json's "layers" and export.layers.addressable_layers
# write them: [{"name": "layer2", "shape": [128, 28, 28], "kind": "Sequential"}, ...] in forward order.
LayerTable = Sequence[Mapping[str, Any]]

# An unknown name is answered with every valid one up to this many (LeNet-5, AlexNet); beyond, with
# the closest names and the top-level ones, and a pointer to GetModel (ResNet-152 has hundreds).
MAX_LISTED_LAYERS = 40


def unknown_layer_message(name: str, table: LayerTable, what: str) -> str:
    """InvalidArgument's message for a layer name not in `table`: the valid names, or an excerpt."""
    names = [str(entry["name"]) for entry in table]
    if len(names) <= MAX_LISTED_LAYERS:
        return f"{what}: the model has no layer {name!r}; its layers are " + ", ".join(names)
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.6)
    top = [n for n in names if "." not in n][:12]
    examples = list(dict.fromkeys([*close, *top]))
    return (
        f"{what}: the model has no layer {name!r}; e.g. "
        + ", ".join(examples)
        + f" ({len(names)} layers in all: see GetModel layers)"
    )


def layer_entry(name: str, table: LayerTable, what: str) -> Mapping[str, Any]:
    """The table's entry for `name`; InvalidArgument (reason unknown_layer) listing valid names."""
    for entry in table:
        if entry["name"] == name:
            return entry
    raise InvalidArgument(unknown_layer_message(name, table, what), reason="unknown_layer")


@dataclass(frozen=True)
class NeuronTarget:
    """Explain one unit instead of a class: `channel` of layer `layer` at (y, x) of its output, or,
    with y and x None, that channel's strongest position in each image. A layer whose output is
    [C] (no spatial axes) takes the channel alone."""

    layer: str
    channel: int
    y: int | None = None
    x: int | None = None

    def check(self, table: LayerTable | None) -> None:
        """The model-independent checks, and with the model's layer table the layer, channel and
        position; InvalidArgument naming the layer's shape."""
        require(isinstance(self.layer, str) and bool(self.layer), "neuron: name a layer (ModelInfo.layers)")
        require((self.y is None) == (self.x is None), "neuron: give both y and x, or neither")
        require(
            self.channel >= 0 and (self.y is None or (self.y >= 0 and self.x is not None and self.x >= 0)),
            "neuron: channel, y and x must be >= 0",
            "channel_out_of_range",
        )
        if table is None:
            return
        entry = layer_entry(self.layer, table, "neuron")
        shape = [int(d) for d in entry["shape"]]
        require(
            len(shape) in (1, 3),
            f"neuron: layer {self.layer!r} has output shape {shape}; a neuron needs [C, H, W] or [C]",
            "unknown_layer",
        )
        require(
            self.channel < shape[0],
            f"neuron: channel {self.channel} is out of range for layer {self.layer!r} of shape {shape} "
            f"(channels 0..{shape[0] - 1})",
            "channel_out_of_range",
        )
        if self.y is None or self.x is None:
            return
        require(
            len(shape) == 3,
            f"neuron: layer {self.layer!r} has shape {shape}, no spatial position: give the channel alone",
            "channel_out_of_range",
        )
        require(
            self.y < shape[1] and self.x < shape[2],
            f"neuron: position (y={self.y}, x={self.x}) is out of range for layer {self.layer!r} of shape "
            f"{shape} (y 0..{shape[1] - 1}, x 0..{shape[2] - 1})",
            "channel_out_of_range",
        )


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


__all__ = [
    "DEFAULT_DREAM_LAYERS",
    "EXPLAIN_METHODS",
    "MAX_LISTED_LAYERS",
    "MIN_IMAGE_SIDE",
    "STYLE_ARCHITECTURES",
    "VGG19_STYLE_LAYERS",
    "DreamParams",
    "ExplainMethod",
    "LayerTable",
    "Limits",
    "NeuronTarget",
    "StyleParams",
    "fit_side",
    "is_finite_number",
    "layer_entry",
    "octave_sizes",
    "require",
    "style_size",
    "unknown_layer_message",
]
