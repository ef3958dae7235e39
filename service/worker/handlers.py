"""The child side of a gradient process, part two: running one job on the loaded models.

`handle(models, job, ctx)` is the pool's handler: it runs in the gradient process, once per job,
validates the job again against the caps (jobs.validate_job), resolves the model version, checks
what it supports and calls the algorithm (guided_backprop.py, deepdream.py, style_transfer.py) with
the context's progress and stop checks. The algorithms are imported inside the functions, so the
module imports without torch, as jobs.py does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from service.errors import InvalidArgument
from service.worker.jobs import (
    DreamJob,
    DreamResult,
    ExplainJob,
    ExplainResult,
    Job,
    JobContext,
    JobKind,
    ProgressUpdate,
    Result,
    StylizeJob,
    StylizeResult,
    validate_job,
)
from service.worker.loading import LoadedModels, TorchModel
from service.worker.params import DEFAULT_DREAM_LAYERS, STYLE_ARCHITECTURES
from service.worker.rendering import encode_png, saliency_png, to_float_image


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
    if isinstance(job, ExplainJob):
        return _explain(model, job, ctx, started)
    if isinstance(job, DreamJob):
        return _dream(model, job, ctx, started)
    return _stylize(model, job, ctx, started)


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
    )
    # one batched pass: every image is done at once (counts the images as the job's steps)
    ctx.progress(ProgressUpdate(kind="explain", step=len(x), total_steps=len(x), losses={}))
    if not job.render:
        pngs: tuple[bytes, ...] = ()
    elif job.method == "gradcam":  # already a [0, 1] heatmap: drawn as it is, white = 1
        pngs = tuple(encode_png(s[0]) for s in e.saliency)
    else:
        pngs = tuple(saliency_png(s, job.render) for s in e.saliency)
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


__all__ = ["handle"]
