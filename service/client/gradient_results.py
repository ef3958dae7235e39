"""What the gradient and embedding methods of CnnserveClient hand back (explain, dream, stylize,
embed, feature_maps, filters), the arguments they take that are more than a number (Neuron,
DreamLayer, the method names), and the protobuf <-> Python conversions, so api.py only converts,
calls and converts back. Tensors come back as numpy arrays, exactly the server's float32 values."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service.client.results import ClassScore, Timings, scores, timings

# The Tensor.dtype spellings the server may send (inference.proto's Tensor), little-endian on the wire.
_DTYPES = {"float32": "<f4", "fp32": "<f4", "float16": "<f2", "fp16": "<f2"}

EXPLAIN_METHODS: dict[str, int] = {
    "guided_backprop": pb.EXPLAIN_METHOD_GUIDED_BACKPROP,
    "guided_gradcam": pb.EXPLAIN_METHOD_GUIDED_GRADCAM,
    "gradcam": pb.EXPLAIN_METHOD_GRADCAM,
}
STYLE_OPTIMIZERS: dict[str, int] = {
    "lbfgs": pb.STYLE_OPTIMIZER_LBFGS,
    "adam": pb.STYLE_OPTIMIZER_ADAM,
}
STYLE_INITS: dict[str, int] = {
    "content": pb.STYLE_INIT_CONTENT,
    "noise": pb.STYLE_INIT_NOISE,
}


def choice(kind: str, name: str, choices: Mapping[str, int]) -> Any:
    """The enum value of `name` among `choices` (ValueError naming the valid ones); Any, as the
    generated stubs type each enum field with its own enum type."""
    try:
        return choices[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}: one of {', '.join(choices)}") from None


def array(tensor: pb.Tensor) -> np.ndarray:
    """A Tensor message as a numpy array of its dtype (native byte order), shaped as it says."""
    dtype = _DTYPES.get(tensor.dtype.lower())
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {tensor.dtype!r}")
    values = np.frombuffer(tensor.data, dtype=dtype)
    return values.astype(values.dtype.newbyteorder("="), copy=True).reshape(tuple(tensor.shape))


def _optional_array(message: pb.Explanation, name: str) -> np.ndarray | None:
    return array(getattr(message, name)) if message.HasField(name) else None


def _score(message: pb.Explanation | pb.FeatureMapsResponse, name: str) -> ClassScore | None:
    if not message.HasField(name):
        return None
    c = getattr(message, name)
    return ClassScore(c.index, c.label, c.probability)


# --- Explain -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Neuron:
    """One unit to explain (ExplainRequest.neuron): a layer (ModelInfo.layers), a channel, and
    optionally the spatial position (row y, column x; both or neither: absent, the channel's
    strongest position in each image)."""

    layer: str
    channel: int
    y: int | None = None
    x: int | None = None

    def __post_init__(self) -> None:
        if (self.y is None) != (self.x is None):
            raise ValueError("a neuron's y and x are given both or neither")

    @classmethod
    def parse(cls, text: str) -> Neuron:
        """ "LAYER:CHANNEL" or "LAYER:CHANNEL:Y,X" (the CLI's --neuron), e.g. "layer4:12:3,5"."""
        match = re.fullmatch(r"(?P<layer>[^:]+):(?P<channel>\d+)(?::(?P<y>\d+),(?P<x>\d+))?", text.strip())
        if match is None:
            raise ValueError(f"a neuron is LAYER:CHANNEL or LAYER:CHANNEL:Y,X, got {text!r}")
        y, x = match["y"], match["x"]
        return cls(
            match["layer"],
            int(match["channel"]),
            None if y is None else int(y),
            None if x is None else int(x),
        )

    def message(self) -> pb.NeuronTarget:
        target = pb.NeuronTarget(layer=self.layer, channel=self.channel)
        if self.y is not None and self.x is not None:
            target.y, target.x = self.y, self.x
        return target


@dataclass(frozen=True)
class NeuronExplained:
    """The neuron an explanation targeted, resolved for its image: its position, its activation
    and its receptive field `field` = (top, left, bottom, right), bottom and right exclusive."""

    layer: str
    channel: int
    y: int
    x: int
    activation: float
    field: tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)
class Explanation:
    """One image's explanation. `saliency` float32 [C, H, W] w.r.t. the preprocessed input
    (GRADCAM: [1, H, W] in [0, 1]); `png` the saliency rendered; `explained` the class explained
    (None for a neuron target, then `neuron` is set); `predicted` the top-1 class; `plain_gradient`
    (asked for) and `gradcam` ([H, W], the Grad-CAM methods) float32 or None."""

    saliency: np.ndarray
    png: bytes
    explained: ClassScore | None
    predicted: ClassScore | None
    plain_gradient: np.ndarray | None = None
    gradcam: np.ndarray | None = None
    neuron: NeuronExplained | None = None


@dataclass(frozen=True)
class ExplainResult:
    """explain()'s answer: one Explanation per image, in order; `method` its name
    ("guided_backprop", ...); `seconds` the time spent in the worker."""

    model: str
    version: int
    method: str
    explanations: tuple[Explanation, ...]
    seconds: float
    # The version's weights are untrained (the demo's random weights): the answer means nothing.
    untrained: bool = False


_METHOD_NAMES = {value: name for name, value in EXPLAIN_METHODS.items()}


def _neuron_explained(n: pb.NeuronExplained) -> NeuronExplained:
    return NeuronExplained(
        n.layer, n.channel, n.y, n.x, n.activation, (n.field_top, n.field_left, n.field_bottom, n.field_right)
    )


def explain_result(response: pb.ExplainResponse) -> ExplainResult:
    explanations = tuple(
        Explanation(
            saliency=array(e.saliency),
            png=e.png,
            explained=_score(e, "explained"),
            predicted=_score(e, "predicted"),
            plain_gradient=_optional_array(e, "plain_gradient"),
            gradcam=_optional_array(e, "gradcam"),
            neuron=_neuron_explained(e.neuron) if e.HasField("neuron") else None,
        )
        for e in response.explanations
    )
    method = _METHOD_NAMES.get(response.method, "guided_backprop")  # UNSPECIFIED is guided backprop
    return ExplainResult(
        response.model, response.version, method, explanations, response.seconds, untrained=response.untrained
    )


# --- Dream and Stylize ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DreamLayer:
    """One DeepDream objective term: weight * mean(activation ** 2) of `layer` (a module path such
    as "layer3"), over `channels` only when given."""

    layer: str
    weight: float = 1.0
    channels: tuple[int, ...] = ()

    def message(self) -> pb.DreamLayer:
        return pb.DreamLayer(layer=self.layer, weight=self.weight, channels=list(self.channels))


def dream_layers(layers: Iterable[str | DreamLayer] | str | None) -> list[pb.DreamLayer]:
    if layers is None:
        return []
    if isinstance(layers, str):
        layers = [layers]
    return [(DreamLayer(layer) if isinstance(layer, str) else layer).message() for layer in layers]


@dataclass(frozen=True)
class GradientProgress:
    """One progress message of dream()/stylize(): `step` (1-based) of `total_steps`, the 1-based
    `octave` (dream; 0 for stylize), the `losses` so far, and `preview_png` on preview steps."""

    step: int
    total_steps: int
    octave: int
    losses: dict[str, float] = field(default_factory=dict)
    preview_png: bytes | None = None


def progress(message: pb.GradientProgress) -> GradientProgress:
    return GradientProgress(
        message.step, message.total_steps, message.octave, dict(message.losses), message.preview_png or None
    )


@dataclass(frozen=True)
class DreamResult:
    """The dreamed image (`png`, at the input's size), its size, the steps run, the objective
    before and after, the objective's layers as used, and the worker's time."""

    model: str
    version: int
    png: bytes
    width: int
    height: int
    steps: int
    objective_before: float
    objective_after: float
    layers: tuple[DreamLayer, ...]
    seconds: float
    # The version's weights are untrained (the demo's random weights): the answer means nothing.
    untrained: bool = False


def dream_result(r: pb.DreamResult) -> DreamResult:
    layers = tuple(DreamLayer(layer.layer, layer.weight, tuple(layer.channels)) for layer in r.layers)
    return DreamResult(
        r.model, r.version, r.png, r.width, r.height, r.steps, r.objective_before, r.objective_after, layers,
        r.seconds, untrained=r.untrained,
    )  # fmt: skip


@dataclass(frozen=True)
class StylizeResult:
    """The stylized image (`png`, at the working size), its size, the iterations run, the best
    one (whose image this is), the final and initial losses ("content", "style", "tv", "total")."""

    model: str
    version: int
    png: bytes
    width: int
    height: int
    iterations: int
    best_iteration: int
    losses: dict[str, float]
    initial_losses: dict[str, float]
    seconds: float
    # The version's weights are untrained (the demo's random weights): the answer means nothing.
    untrained: bool = False


def stylize_result(r: pb.StylizeResult) -> StylizeResult:
    return StylizeResult(
        r.model, r.version, r.png, r.width, r.height, r.iterations, r.best_iteration, dict(r.losses),
        dict(r.initial_losses), r.seconds, untrained=r.untrained,
    )  # fmt: skip


# --- Embed, FeatureMaps, Filters -----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EmbedResult:
    """`vector` float32 [D] (L2-normalized when asked), `norm` its L2 norm before normalizing,
    `classes` the top_k classes of the same pass (empty unless asked)."""

    model: str
    version: int
    vector: np.ndarray
    norm: float
    classes: tuple[ClassScore, ...]
    timings: Timings | None = None
    # The version's weights are untrained (the demo's random weights): the answer means nothing.
    untrained: bool = False


def embed_result(r: pb.EmbedResponse) -> EmbedResult:
    return EmbedResult(
        r.model,
        r.version,
        array(r.embedding),
        r.norm,
        scores(r.classes),
        timings(r.timings),
        untrained=r.untrained,
    )


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """One layer's whole output for the image (`activations`, float32) and a PNG tiling its
    strongest `channels`, strongest first."""

    layer: str
    activations: np.ndarray
    png: bytes
    channels: tuple[int, ...]


@dataclass(frozen=True)
class FeatureMapsResult:
    model: str
    version: int
    maps: tuple[FeatureMap, ...]
    predicted: ClassScore | None
    seconds: float
    # The version's weights are untrained (the demo's random weights): the answer means nothing.
    untrained: bool = False


def feature_maps_result(r: pb.FeatureMapsResponse) -> FeatureMapsResult:
    maps = tuple(FeatureMap(m.layer, array(m.activations), m.png, tuple(m.channels)) for m in r.maps)
    return FeatureMapsResult(
        r.model, r.version, maps, _score(r, "predicted"), r.seconds, untrained=r.untrained
    )


@dataclass(frozen=True, eq=False)
class FiltersResult:
    """A convolution's kernels: `weights` float32 [out, in / groups, kH, kW] and a PNG grid."""

    model: str
    version: int
    layer: str
    weights: np.ndarray
    png: bytes
    seconds: float
    # The version's weights are untrained (the demo's random weights): the answer means nothing.
    untrained: bool = False


def filters_result(r: pb.FiltersResponse) -> FiltersResult:
    return FiltersResult(
        r.model, r.version, r.layer, array(r.weights), r.png, r.seconds, untrained=r.untrained
    )
