"""Protobuf <-> domain, for both gRPC APIs' cnnserve.v1 messages: conversions only, no I/O.

Requests become validated arrays, parameters and jobs (service.worker.jobs) with InvalidArgument
naming the field; engine and job results become response messages.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from export.preprocessing import describe_input
from service import images
from service.catalog import features_dim, features_name, input_name, output_name
from service.errors import InvalidArgument
from service.frontend.classify import softmax, validated_tensor
from service.worker import jobs
from service.worker.params import EXPLAIN_METHODS, DreamParams, LayerTable, NeuronTarget, StyleParams
from service.worker.rendering import pil_to_array

from .._proto.cnnserve.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from service.catalog import LoadedModel
    from service.frontend.classify import Timings

DEFAULT_TOP_K = 5

# Wire dtype names a client may use for a raw tensor -> little-endian numpy dtype.
TENSOR_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "fp32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "fp16": np.dtype("<f2"),
}

# What this server serves per model, as ModelInfo.capabilities. The gradient RPCs add theirs when
# the server has a gradient backend (service.frontend.gradients); a model's metadata.json alone
# never advertises an RPC the server does not serve.
CAPABILITY_ENUM = {
    "classify": pb.CAPABILITY_CLASSIFY,
    "embed": pb.CAPABILITY_EMBED,
    "explain": pb.CAPABILITY_EXPLAIN,
    "dream": pb.CAPABILITY_DREAM,
    "stylize": pb.CAPABILITY_STYLIZE,
    "feature_maps": pb.CAPABILITY_FEATURE_MAPS,
    "filters": pb.CAPABILITY_FILTERS,
}
# The engine's: embed only where the version has the features output (metadata.json says so).
SERVED_CAPABILITIES = frozenset({"classify", "embed"})


# The wire's ExplainMethod enum, derived from the one list of job methods (params.EXPLAIN_METHODS):
# method "m" is EXPLAIN_METHOD_<M>, UNSPECIFIED is the first (guided backprop). "gradient" has no
# enum value (the plain gradient comes with include_plain_gradient); an enum value with no job method
# would be refused as unknown (tests/unit/service/frontend/test_servicers_gradients.py checks there is none).
EXPLAIN_METHOD_ENUM: dict[str, pb.ExplainMethod] = {
    method: pb.ExplainMethod.Value(f"EXPLAIN_METHOD_{method.upper()}")
    for method in EXPLAIN_METHODS
    if f"EXPLAIN_METHOD_{method.upper()}" in pb.ExplainMethod.keys()
}
EXPLAIN_METHOD_NAMES = {
    pb.EXPLAIN_METHOD_UNSPECIFIED: EXPLAIN_METHODS[0],
    **{value: method for method, value in EXPLAIN_METHOD_ENUM.items()},
}
OPTIMIZERS = {
    pb.STYLE_OPTIMIZER_UNSPECIFIED: "lbfgs",
    pb.STYLE_OPTIMIZER_LBFGS: "lbfgs",
    pb.STYLE_OPTIMIZER_ADAM: "adam",
}
INITS = {pb.STYLE_INIT_UNSPECIFIED: "content", pb.STYLE_INIT_CONTENT: "content", pb.STYLE_INIT_NOISE: "noise"}


# --- classification --------------------------------------------------------------------------


def resolve_top_k(requested: int, model: LoadedModel, max_top_k: int) -> int:
    """top_k for a request: 0 means min(5, classes); otherwise 1..min(max_top_k, classes)."""
    limit = min(max_top_k, model.num_classes)
    if requested == 0:
        return min(DEFAULT_TOP_K, limit)
    if not 1 <= requested <= limit:
        raise InvalidArgument(
            f"top_k must be between 1 and {limit} for {model.name} (it has {model.num_classes} classes, "
            f"max_top_k is {max_top_k}), got {requested}",
            reason="invalid_argument",
        )
    return requested


def top_classes(probabilities: np.ndarray, k: int, labels: Sequence[str]) -> list[pb.ClassScore]:
    """The k most probable classes of one probability row, most probable first (ties: lower index)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [
        pb.ClassScore(
            index=int(i), label=labels[i] if i < len(labels) else "", probability=float(probabilities[i])
        )
        for i in order
    ]


def tensor_from_proto(tensor: pb.Tensor, model: LoadedModel) -> np.ndarray:
    """A request Tensor -> validated (1, C, H, W) array of the model's input dtype."""
    wire = TENSOR_DTYPES.get(tensor.dtype.lower())
    if wire is None:
        raise InvalidArgument(
            f"unsupported tensor dtype {tensor.dtype!r}; use float32 or float16", reason="invalid_argument"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if not shape or any(d < 0 for d in shape):
        raise InvalidArgument(f"invalid tensor shape {list(shape)}", reason="invalid_argument")
    expected_bytes = math.prod(shape) * wire.itemsize
    if len(tensor.data) != expected_bytes:
        raise InvalidArgument(
            f"tensor data has {len(tensor.data)} bytes; "
            f"shape {list(shape)} of {wire.name} needs {expected_bytes}",
            reason="invalid_argument",
        )
    arr = np.frombuffer(tensor.data, dtype=wire).reshape(shape)
    if len(shape) == 4 and shape[0] != 1:
        raise InvalidArgument(
            f"one image per ImageInput: shape [C,H,W] or [1,C,H,W], got {list(shape)}",
            reason="invalid_argument",
        )
    return validated_tensor(arr, model)


def timings_proto(timings: Timings | None, total_s: float) -> pb.Timings:
    if timings is None:
        return pb.Timings(total_seconds=total_s)
    return pb.Timings(
        decode_seconds=timings.decode_s,
        preprocess_seconds=timings.preprocess_s,
        queue_seconds=timings.queue_s,
        inference_seconds=timings.inference_s,
        total_seconds=total_s,
    )


def model_info(
    model: LoadedModel,
    *,
    versions: Iterable[int],
    ready: bool,
    include_labels: bool = False,
    include_layers: bool = False,
    served: frozenset[str] = SERVED_CAPABILITIES,
) -> pb.ModelInfo:
    meta = model.metadata or {}
    dtype = np.dtype(model.input_dtype).name
    p = model.preprocessing
    capabilities = [
        value
        for name, value in CAPABILITY_ENUM.items()
        if name in served and model.capabilities.get(name, name == "classify")
    ]
    info = pb.ModelInfo(
        name=model.name,
        version=model.version,
        versions=sorted(versions),
        architecture=model.architecture,
        input=pb.TensorSpec(name=input_name(model), shape=list(model.input_shape), dtype=dtype),
        output=pb.TensorSpec(name=output_name(model), shape=[model.num_classes], dtype=dtype),
        num_classes=model.num_classes,
        labels_count=len(model.labels),
        preprocessing=pb.Preprocessing(
            color_mode=p.color_mode,
            resize=p.resize,
            crop=p.crop,
            mean=list(p.mean),
            std=list(p.std),
            invert=p.invert,
        ),
        trained=model.trained,
        trained_on=model.trained_on or "",
        # Repositories exported before metadata.json carried it: derived from the preprocessing.
        input_description=str(meta.get("input", {}).get("description") or describe_input(p)),
        parameters=model.parameters,
        flops=model.flops,
        execution_provider=model.provider,
        capabilities=capabilities,
        ready=ready,
    )
    features = features_name(model)
    if features is not None:
        info.features.CopyFrom(pb.TensorSpec(name=features, shape=[features_dim(model)], dtype=dtype))
    if model.serving is not None:
        sc = model.serving
        info.serving.CopyFrom(
            pb.ServingConfig(
                max_batch_size=sc.max_batch_size,
                max_queue_delay_s=sc.max_queue_delay_s,
                max_queue_size=sc.max_queue_size,
                warmup_batch_sizes=list(sc.warmup_batch_sizes),
                device=sc.device,
                version_policy=sc.version_policy,
                config_file=sc.config_file,
                instances=sc.instances,
                intra_op_threads=sc.intra_op_threads,
                precision=sc.precision,
            )
        )
    if include_labels:
        info.labels.extend(model.labels)
    table = model_layers(model)
    if include_layers and table is not None:
        info.layers.extend(
            pb.LayerInfo(name=str(e["name"]), shape=[int(d) for d in e["shape"]], kind=str(e["kind"]))
            for e in table
        )
    return info


def model_layers(model: LoadedModel) -> LayerTable | None:
    """metadata.json's "layers" (export.layers.addressable_layers at export), or None for a version
    exported before it (the gradient processes then check layer names from the module)."""
    layers = (model.metadata or {}).get("layers")
    return layers if isinstance(layers, list) and layers else None


# --- gradient jobs -----------------------------------------------------------------------------


def _enum(value: int, table: Mapping[Any, str], what: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"unknown {what} {value}", reason="invalid_argument") from None


def explain_method(value: int) -> str:
    """ExplainRequest.method -> the job's method name (params.EXPLAIN_METHODS)."""
    return _enum(value, EXPLAIN_METHOD_NAMES, "explain method")


def decode_rgb(item: pb.ImageInput, model: LoadedModel, name: str, max_pixels: int) -> np.ndarray:
    """An encoded ImageInput -> float32 (H, W, C) in [0, 1] in the model's colour mode."""
    kind = item.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"{name} is empty: set `encoded`", reason="empty_image")
    if kind != "encoded":
        raise InvalidArgument(
            f"{name}: send an encoded image (JPEG, PNG or WebP); tensors are not accepted here",
            reason="not_an_image",
        )
    try:
        image = images.decode_image(item.encoded, max_pixels=max_pixels)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{name}: {exc.message}", reason=exc.reason) from None
    if model.preprocessing.color_mode == "L":
        return pil_to_array(image, "L")
    return pil_to_array(image, "RGB")


def explain_inputs(items: Sequence[pb.ImageInput], model: LoadedModel, max_pixels: int) -> np.ndarray:
    """Request images -> float32 (N, C, H, W), the model's preprocessed input."""
    out = []
    for i, item in enumerate(items):
        where = f"image {i}" if len(items) > 1 else "image"
        kind = item.WhichOneof("kind")
        try:
            if kind == "encoded":
                decoded = images.decode_image(item.encoded, max_pixels=max_pixels)
                out.append(images.image_to_tensor(decoded, model.preprocessing)[None])
            elif kind == "tensor":
                out.append(tensor_from_proto(item.tensor, model).reshape((1, *model.input_shape)))
            else:
                raise InvalidArgument("is empty: set `encoded` or `tensor`", reason="empty_image")
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc.message}", reason=exc.reason) from None
    return np.concatenate(out).astype(np.float32)


def explain_targets(request: pb.ExplainRequest, model: LoadedModel, n: int) -> tuple[int, ...] | None:
    targets = list(request.target_classes)
    if not targets:
        return None
    if len(targets) == 1:
        targets = targets * n
    if len(targets) != n:
        raise InvalidArgument(
            f"{len(request.target_classes)} target_classes for {n} images: give none, one, or one per image",
            reason="invalid_argument",
        )
    for t in targets:
        if not 0 <= t < model.num_classes:
            raise InvalidArgument(
                f"target class {t} is out of range: {model.name} has {model.num_classes} classes "
                f"(0..{model.num_classes - 1})",
                reason="target_out_of_range",
            )
    return tuple(int(t) for t in targets)


def explain_neuron(request: pb.ExplainRequest) -> NeuronTarget | None:
    """ExplainRequest.neuron -> the job's NeuronTarget (None when unset); model-independent checks."""
    if not request.HasField("neuron"):
        return None
    n = request.neuron
    neuron = NeuronTarget(
        layer=n.layer,
        channel=int(n.channel),
        y=int(n.y) if n.HasField("y") else None,
        x=int(n.x) if n.HasField("x") else None,
    )
    neuron.check(None)
    return neuron


def dream_params(request: pb.DreamRequest) -> DreamParams:
    kwargs: dict[str, Any] = {}
    for name in ("octaves", "octave_scale", "steps", "step_size", "jitter", "tile_size", "max_side"):
        if request.HasField(name):
            kwargs[name] = getattr(request, name)
    if request.layers:
        layers: dict[str, float] = {}
        channels: dict[str, tuple[int, ...]] = {}
        for entry in request.layers:
            if entry.layer in layers:
                raise InvalidArgument(f"dream: layer {entry.layer!r} given twice", reason="invalid_argument")
            layers[entry.layer] = entry.weight or 1.0
            if entry.channels:
                channels[entry.layer] = tuple(int(c) for c in entry.channels)
        kwargs["layers"] = layers
        kwargs["channels"] = channels
    if request.seed >= 2**63:
        raise InvalidArgument("dream: seed must be below 2**63", reason="invalid_argument")
    return DreamParams(seed=int(request.seed), preview_every=max(0, request.preview_every), **kwargs)


def style_params(request: pb.StylizeRequest) -> StyleParams:
    kwargs: dict[str, Any] = {}
    for name in ("content_weight", "style_weight", "tv_weight", "learning_rate", "style_scale", "max_side"):
        if request.HasField(name):
            kwargs[name] = getattr(request, name)
    if request.iterations < 0:
        raise InvalidArgument("stylize: iterations must be >= 1 (0: the default)", reason="invalid_argument")
    if request.iterations:
        kwargs["iterations"] = int(request.iterations)
    if request.seed >= 2**63:
        raise InvalidArgument("stylize: seed must be below 2**63", reason="invalid_argument")
    return StyleParams(
        optimizer=_enum(request.optimizer, OPTIMIZERS, "optimizer"),  # type: ignore[arg-type]
        init=_enum(request.init, INITS, "init"),  # type: ignore[arg-type]
        original_colors=request.original_colors,
        seed=int(request.seed),
        preview_every=max(0, request.preview_every),
        **kwargs,
    )


# --- result -> protobuf ---------------------------------------------------------------------------


def tensor_proto(arr: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(arr, dtype="<f4")
    return pb.Tensor(shape=list(a.shape), dtype="float32", data=a.tobytes())


def embed_response(
    model: LoadedModel, row: np.ndarray, *, normalize: bool, top_k: int, timings: pb.Timings
) -> pb.EmbedResponse:
    """EmbedResponse from one engine row: the features (first D values), then, when top_k > 0, the
    logits of the same run. `norm` is the vector's L2 norm before normalization (in float64)."""
    dim = features_dim(model)
    vector = row[:dim]
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if normalize and norm > 0:
        vector = (vector.astype(np.float64) / norm).astype(np.float32)
    classes = top_classes(softmax(row[None, dim:])[0], top_k, model.labels) if top_k else []
    return pb.EmbedResponse(
        model=model.name,
        version=model.version,
        embedding=tensor_proto(vector),
        norm=norm,
        classes=classes,
        timings=timings,
        untrained=not model.trained,
    )


def _score(model: LoadedModel, index: int, probability: float) -> pb.ClassScore:
    label = model.labels[index] if index < len(model.labels) else ""
    return pb.ClassScore(index=index, label=label, probability=probability)


def explain_response(result: jobs.ExplainResult, model: LoadedModel, method: str) -> pb.ExplainResponse:
    explanations = []
    for i in range(result.saliency.shape[0]):
        cls = int(result.classes[i])
        e = pb.Explanation(
            saliency=tensor_proto(result.saliency[i]),
            png=result.pngs[i] if i < len(result.pngs) else b"",
            predicted=_score(model, int(result.predicted[i]), float(result.predicted_probabilities[i])),
        )
        if i < len(result.neurons):  # a neuron target: no class was explained
            n = result.neurons[i]
            top, left, bottom, right = n.field
            e.neuron.CopyFrom(
                pb.NeuronExplained(
                    layer=n.layer,
                    channel=n.channel,
                    y=n.y,
                    x=n.x,
                    activation=n.activation,
                    field_top=top,
                    field_left=left,
                    field_bottom=bottom,
                    field_right=right,
                )
            )
        else:
            e.explained.CopyFrom(_score(model, cls, float(result.probabilities[i])))
        if result.plain is not None:
            e.plain_gradient.CopyFrom(tensor_proto(result.plain[i]))
        if result.cam is not None:
            e.gradcam.CopyFrom(tensor_proto(result.cam[i]))
        explanations.append(e)
    return pb.ExplainResponse(
        model=result.model,
        version=result.version,
        method=EXPLAIN_METHOD_ENUM.get(method, pb.EXPLAIN_METHOD_UNSPECIFIED),
        explanations=explanations,
        seconds=result.seconds,
        untrained=not model.trained,
    )


def feature_maps_response(result: jobs.FeatureMapsResult, model: LoadedModel) -> pb.FeatureMapsResponse:
    return pb.FeatureMapsResponse(
        model=result.model,
        version=result.version,
        maps=[
            pb.FeatureMap(
                layer=m.layer, activations=tensor_proto(m.activations), png=m.png, channels=list(m.channels)
            )
            for m in result.maps
        ],
        predicted=_score(model, result.predicted, result.predicted_probability),
        seconds=result.seconds,
        untrained=not model.trained,
    )


def filters_response(result: jobs.FiltersResult, model: LoadedModel) -> pb.FiltersResponse:
    return pb.FiltersResponse(
        model=result.model,
        version=result.version,
        layer=result.layer,
        weights=tensor_proto(result.weights),
        png=result.png,
        seconds=result.seconds,
        untrained=not model.trained,
    )


def progress_proto(update: jobs.ProgressUpdate) -> pb.GradientProgress:
    return pb.GradientProgress(
        step=int(update.step),
        total_steps=int(update.total_steps),
        octave=int(update.octave or 0),
        losses={k: float(v) for k, v in update.losses.items()},
        preview_png=update.preview_png or b"",
    )


def dream_result(result: jobs.DreamResult, model: LoadedModel) -> pb.DreamResult:
    h, w = result.image.shape[:2]
    return pb.DreamResult(
        model=result.model,
        version=result.version,
        png=result.png,
        width=w,
        height=h,
        steps=result.steps,
        objective_before=result.objective_before,
        objective_after=result.objective_after,
        layers=[pb.DreamLayer(layer=name, weight=weight) for name, weight in result.layers],
        seconds=result.seconds,
        untrained=not model.trained,
    )


def stylize_result(result: jobs.StylizeResult, model: LoadedModel) -> pb.StylizeResult:
    h, w = result.image.shape[:2]
    return pb.StylizeResult(
        model=result.model,
        version=result.version,
        png=result.png,
        width=w,
        height=h,
        iterations=result.iterations,
        best_iteration=result.best_iteration,
        losses={k: float(v) for k, v in result.losses.items()},
        initial_losses={k: float(v) for k, v in result.initial_losses.items()},
        seconds=result.seconds,
        untrained=not model.trained,
    )
