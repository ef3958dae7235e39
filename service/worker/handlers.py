"""The child side of a gradient process, part two: running one job on the loaded models.

`handle(models, job, ctx)` is the pool's handler: it runs in the gradient process, once per job,
validates the job again against the caps (jobs.validate_job), resolves the model version, checks
what it supports and calls the algorithm (guided_backprop.py, deepdream.py, style_transfer.py) with
the context's progress and stop checks. The algorithms are imported inside the functions, so the
module imports without torch, as jobs.py does.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from service.errors import InvalidArgument
from service.worker.jobs import (
    DreamJob,
    DreamResult,
    ExplainJob,
    ExplainResult,
    FeatureMap,
    FeatureMapsJob,
    FeatureMapsResult,
    FiltersJob,
    FiltersResult,
    Job,
    JobContext,
    JobKind,
    NeuronExplained,
    ProgressUpdate,
    Result,
    StylizeJob,
    StylizeResult,
    check_layers,
    first_convolution,
    validate_job,
)
from service.worker.loading import LoadedModels, TorchModel
from service.worker.params import DEFAULT_DREAM_LAYERS, STYLE_ARCHITECTURES, LayerTable
from service.worker.rendering import encode_png, feature_map_png, filters_png, saliency_png, to_float_image

if TYPE_CHECKING:
    from export.receptive_field import Field

# Per module (dropped with it): the layer table computed for exports without metadata "layers", and
# the receptive fields computed so far. Each costs one meta-device pass, so once per module.
_TABLES: weakref.WeakKeyDictionary[Any, LayerTable] = weakref.WeakKeyDictionary()
_FIELDS: weakref.WeakKeyDictionary[Any, dict[str, Field]] = weakref.WeakKeyDictionary()


def _check_capability(model: TorchModel, kind: JobKind) -> None:
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


def handle(models: LoadedModels, job: Job, ctx: JobContext) -> Result:
    """Run one gradient job in the gradient process; raises service.errors.ServiceError subclasses
    (InvalidArgument, NotFound, Cancelled when ctx.should_stop() turned true)."""
    validate_job(job, models.limits)
    # The model's module is built here on its first job (the time counts as the job's); the process
    # tells the pool, which records it (loading.LoadMetrics).
    model = models.get(job.model, job.version, report=ctx.report)
    _check_capability(model, job.kind)
    started = time.perf_counter()
    if _names_layers(job):
        # The serving process checked the names already where metadata.json has the table; this is
        # the check for older exports, and the same function (jobs.check_layers) with the same
        # message either way.
        check_layers(job, layer_table(model))
    if isinstance(job, ExplainJob):
        return _explain(model, job, ctx, started)
    if isinstance(job, DreamJob):
        return _dream(model, job, ctx, started)
    if isinstance(job, FeatureMapsJob):
        return _feature_maps(model, job, ctx, started)
    if isinstance(job, FiltersJob):
        return _filters(model, job, started)
    return _stylize(model, job, ctx, started)


def _names_layers(job: Job) -> bool:
    return (
        (isinstance(job, ExplainJob) and job.neuron is not None)
        or (isinstance(job, DreamJob) and job.params.layers is not None)
        or isinstance(job, (FeatureMapsJob, FiltersJob))
    )


def layer_table(model: TorchModel) -> LayerTable:
    """The layers a job may name: metadata.json's "layers", else computed from the module
    (export.layers.addressable_layers, on the meta device) once per module."""
    if model.layers is not None:
        return model.layers
    table = _TABLES.get(model.module)
    if table is None:
        from export.layers import addressable_layers

        table = _TABLES[model.module] = addressable_layers(model.module, model.input_shape)
    return table


def receptive_field(model: TorchModel, layer: str) -> Field:
    """The receptive field of `layer`'s units at the model's input size (export.receptive_field)."""
    from export.receptive_field import receptive_field as compute

    fields = _FIELDS.setdefault(model.module, {})
    if layer not in fields:
        fields[layer] = compute(model.module, model.input_shape, layer)
    return fields[layer]


def _explain(model: TorchModel, job: ExplainJob, ctx: JobContext, started: float) -> ExplainResult:
    import torch

    from service.worker.guided_backprop import explain

    x = np.asarray(job.inputs, dtype=np.float32)
    if tuple(x.shape[1:]) != model.input_shape:
        raise InvalidArgument(
            f"explain inputs have shape {tuple(x.shape[1:])}; model {model.name!r} takes {model.input_shape}",
            reason="wrong_shape",
        )
    e = explain(
        model.module,
        torch.from_numpy(np.ascontiguousarray(x)),
        list(job.targets) if job.targets is not None else None,
        method=job.method,  # type: ignore[arg-type]  # checked in validate_job
        plain_gradient=job.plain_gradient,
        cam_layer=job.cam_layer,
        should_stop=ctx.should_stop,  # checked at every layer: a batch stops within one layer
        neuron=job.neuron,
    )
    # one batched pass: every image is done at once (counts the images as the job's steps)
    ctx.progress(ProgressUpdate(kind="explain", step=len(x), total_steps=len(x), losses={}))
    if not job.render:
        pngs: tuple[bytes, ...] = ()
    elif job.method == "gradcam":  # already a [0, 1] heatmap: drawn as it is, white = 1
        pngs = tuple(encode_png(s[0]) for s in e.saliency)
    else:
        pngs = tuple(saliency_png(s, job.render) for s in e.saliency)
    neurons: tuple[NeuronExplained, ...] = ()
    if job.neuron is not None and e.neuron_positions is not None and e.neuron_activations is not None:
        field = receptive_field(model, job.neuron.layer)
        _, height, width = model.input_shape
        neurons = tuple(
            NeuronExplained(
                layer=job.neuron.layer,
                channel=job.neuron.channel,
                y=int(y),
                x=int(x),
                activation=float(a),
                field=field.at(int(y), int(x), height, width),
            )
            for (y, x), a in zip(e.neuron_positions, e.neuron_activations, strict=True)
        )
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
        neurons=neurons,
    )


def _feature_maps(
    model: TorchModel, job: FeatureMapsJob, ctx: JobContext, started: float
) -> FeatureMapsResult:
    import torch

    from service.worker.feature_maps import activations, strongest_channels

    x = np.asarray(job.inputs, dtype=np.float32)
    if tuple(x.shape[1:]) != model.input_shape:
        raise InvalidArgument(
            f"feature maps input has shape {tuple(x.shape[1:])}; "
            f"model {model.name!r} takes {model.input_shape}",
            reason="wrong_shape",
        )
    acts = activations(
        model.module, torch.from_numpy(np.ascontiguousarray(x)), job.layers, should_stop=ctx.should_stop
    )
    ctx.progress(ProgressUpdate(kind="feature_maps", step=1, total_steps=1, losses={}))
    maps = []
    for name in job.layers:
        a = acts.layers[name]
        if a.ndim == 0:
            a = a.reshape(1)
        channels = strongest_channels(a, job.max_channels)
        maps.append(
            FeatureMap(layer=name, activations=a, png=feature_map_png(a, channels), channels=channels)
        )
    return FeatureMapsResult(
        model=model.name,
        version=model.version,
        maps=tuple(maps),
        predicted=acts.predicted,
        predicted_probability=acts.predicted_probability,
        seconds=time.perf_counter() - started,
    )


def _filters(model: TorchModel, job: FiltersJob, started: float) -> FiltersResult:
    from service.worker.feature_maps import conv_weights

    layer = job.layer or first_convolution(layer_table(model))
    weights = conv_weights(model.module, layer)
    return FiltersResult(
        model=model.name,
        version=model.version,
        layer=layer,
        weights=weights,
        png=filters_png(weights),
        seconds=time.perf_counter() - started,
    )


def _progress_sink(ctx: JobContext, kind: JobKind) -> Callable[[Any], None]:
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


def _dream(model: TorchModel, job: DreamJob, ctx: JobContext, started: float) -> DreamResult:
    from service.worker.deepdream import dream

    image = _image_for(model, job.image, "dream image")
    layers = job.params.layers
    if layers is None:
        if model.architecture not in DEFAULT_DREAM_LAYERS:
            raise InvalidArgument(
                f"dream: {model.architecture} has no default layer; name one", reason="unknown_layer"
            )
        layers = {DEFAULT_DREAM_LAYERS[model.architecture]: 1.0}
    out = dream(
        model.module,
        image,
        job.params,
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


def _stylize(model: TorchModel, job: StylizeJob, ctx: JobContext, started: float) -> StylizeResult:
    from service.worker.style_transfer import stylize

    if model.architecture not in STYLE_ARCHITECTURES:
        raise InvalidArgument(
            f"stylize needs a VGG-19 model; {model.name!r} is {model.architecture}", reason="unsupported"
        )
    content = _image_for(model, job.content, "content image")
    styles = [_image_for(model, s, f"style image {i}") for i, s in enumerate(job.styles)]
    out = stylize(
        model.module,
        content,
        styles,
        job.params,
        blend=job.style_blend,
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


__all__ = ["handle", "layer_table", "receptive_field"]
