"""DeepDream (Mordvintsev, Olah & Tyka 2015), after the original Caffe notebook, in [0, 1] pixel space.

Per step (the notebook's `make_step`):
1. roll the image by a random (dy, dx) in [-jitter, jitter] (circular shift);
2. gradient of the objective with respect to the pixels (the model's mean/std normalization is applied
   inside, so the model sees what it was trained on);
3. x += step_size * g / mean|g|  (the denominator gets a relative epsilon, 1e-8 * max|g|, and the
   smallest normal float, so a zero gradient is a zero step rather than NaN);
4. roll back, clip to [0, 1].

Octaves (the notebook's `deepdream`): the image pyramid is built by successive bilinear downscaling
by `octave_scale`; starting from the smallest, each octave runs `steps` steps on
`octave_base + detail`, and the detail it adds (result - octave_base) is upscaled bilinearly into
the next octave. Octaves smaller than params.MIN_IMAGE_SIDE are skipped.

Objective: sum over target layers of weight * mean(activation ** 2) (optionally only some channels).
The notebook's objective_L2 is 0.5 * sum(activation ** 2); because each step divides the gradient by
its mean magnitude, the two give the *same* update for a single layer. The mean makes the weights of
several layers comparable regardless of layer size.

Large images: when a side exceeds `tile_size`, the gradient is computed tile by tile on an image
rolled by a random offset (the TF notebook's `calc_grad_tiled`), so the seams move every step. Unlike
that notebook's loop, the tiles (equal sizes, each side <= tile_size) always cover the whole image.
Each tile's objective is weighted by its share of the pixels, so the assembled gradient is that of the
whole-image objective up to the tiles' border effects.

The forward pass stops as soon as every target layer has produced its output (nothing after the
deepest target runs), only the input gradient is computed (parameters are frozen for the job), and
the model is left exactly as it came (see model_state.frozen_model).
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.errors import Cancelled, InvalidArgument
from service.worker.model_state import frozen_model, model_device
from service.worker.params import DreamParams, fit_side, octave_sizes


@dataclass(frozen=True)
class DreamProgress:
    step: int  # 1-based, across octaves
    total_steps: int
    octave: int  # 1-based, coarsest first
    octaves: int
    losses: Mapping[str, float]  # {"objective": value before this step}
    preview: np.ndarray | None  # float32 (h, w, C) at the octave's size


@dataclass(frozen=True)
class DreamOutput:
    image: np.ndarray  # float32 (H, W, C) in [0, 1], the input's shape
    octave_sizes: tuple[tuple[int, int], ...]  # largest first
    steps: int
    objective_before: float  # on the input at the working size
    objective_after: float  # on the dreamed image at the working size
    losses: tuple[float, ...]  # objective before each step


class _StopForward(Exception):
    """Raised by a forward hook once every target layer has its activation: ends the forward early."""


def resolve_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Module path -> module; InvalidArgument naming the bad layer and listing some valid ones."""
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name in names:
        if name and name in modules:
            out[name] = modules[name]
            continue
        candidates = [n for n in modules if n]
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
        examples = close or [n for n in candidates if "." not in n][:8]
        raise InvalidArgument(
            f"model has no layer {name!r}; layers are module paths, e.g. " + ", ".join(map(repr, examples)),
            reason="unknown_layer",
        )
    return out


@contextlib.contextmanager
def capture(model: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield a dict filled with each layer's (first) output during a forward pass inside the block;
    the forward raises _StopForward once all are in (catch it around the model call)."""
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if name in acts:
                return
            if not isinstance(output, torch.Tensor) or output.dim() < 2:
                raise InvalidArgument(
                    f"layer {name!r} does not output a feature tensor", reason="unknown_layer"
                )
            acts[name] = output
            if len(acts) == len(layers):
                raise _StopForward

        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield acts
    finally:
        for h in handles:
            h.remove()


class _Objective:
    """sum_l w_l * mean(a_l[:, channels_l] ** 2), evaluated with the forward cut after the deepest layer."""

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, float],
        channels: Mapping[str, Sequence[int]],
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
    ) -> None:
        self.model = model
        self.weights = {name: float(w) for name, w in layers.items()}
        self.modules = resolve_layers(model, list(layers))
        self.channels = {name: list(ch) for name, ch in channels.items()}
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.checked = False

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """The objective at pixels x (1, C, h, w), differentiable with respect to x."""
        with capture(self.model, self.modules) as acts:
            try:
                self.model((x - self.mean) / self.std)
            except _StopForward:
                pass
        missing = [n for n in self.modules if n not in acts]
        if missing:
            raise InvalidArgument(
                f"layer {missing[0]!r} does not run at inference (auxiliary heads do not); pick another",
                reason="unknown_layer",
            )
        if not self.checked:
            for name, chans in self.channels.items():
                count = acts[name].shape[1]
                bad = [c for c in chans if not 0 <= c < count]
                if bad:
                    raise InvalidArgument(
                        f"channel {bad[0]} is out of range for layer {name!r}, which has {count} channels "
                        f"(0..{count - 1})",
                        reason="channel_out_of_range",
                    )
            self.checked = True
        total = x.new_zeros(())
        for name, weight in self.weights.items():
            a = acts[name]
            if name in self.channels:
                a = a[:, self.channels[name]]
            total = total + weight * a.float().pow(2).mean()
        return total

    def grad(self, x: torch.Tensor, weight: float = 1.0) -> tuple[float, torch.Tensor]:
        xr = x.detach().requires_grad_(True)
        value = self.value(xr) * weight
        (g,) = torch.autograd.grad(value, [xr])
        return float(value.detach()), g


def _tile_bounds(length: int, tile: int) -> list[tuple[int, int]]:
    n = math.ceil(length / tile)
    edges = [round(i * length / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def _gradient(
    objective: _Objective, x: torch.Tensor, tile_size: int, generator: torch.Generator
) -> tuple[float, torch.Tensor]:
    h, w = x.shape[-2:]
    if tile_size <= 0 or max(h, w) <= tile_size:
        return objective.grad(x)
    sy, sx = (int(v) for v in torch.randint(0, tile_size, (2,), generator=generator))
    shifted = torch.roll(x, shifts=(sy, sx), dims=(2, 3))
    grad = torch.zeros_like(x)
    loss = 0.0
    for y0, y1 in _tile_bounds(h, tile_size):
        for x0, x1 in _tile_bounds(w, tile_size):
            share = (y1 - y0) * (x1 - x0) / (h * w)
            part, g = objective.grad(shifted[:, :, y0:y1, x0:x1], share)
            grad[:, :, y0:y1, x0:x1] = g
            loss += part
    return loss, torch.roll(grad, shifts=(-sy, -sx), dims=(2, 3))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x[0].detach().float().permute(1, 2, 0).cpu().numpy(), dtype=np.float32)


def dream(
    model: nn.Module,
    image: np.ndarray,
    params: DreamParams,
    *,
    layers: Mapping[str, float] | None = None,
    mean: Sequence[float],
    std: Sequence[float],
    progress: Callable[[DreamProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DreamOutput:
    """DeepDream `image` (float32 (H, W, C) in [0, 1]) with `model` (its input normalization mean/std).

    layers: the objective (module path -> weight); overrides params.layers, one of them is required.
    progress: called after every step; should_stop: checked before every step, raising
    service.errors.Cancelled when it returns true. Bad layers/channels raise InvalidArgument (before
    any step is taken). Deterministic for a given params.seed on a given machine.
    """
    targets = _targets(image, params, layers, mean)
    img = np.asarray(image, dtype=np.float32)
    device = model_device(model)
    generator = torch.Generator().manual_seed(params.seed)
    with frozen_model(model):
        objective = _Objective(model, targets, params.channels, mean, std, device)
        original = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].to(device)
        h0, w0 = original.shape[-2:]
        work = fit_side(h0, w0, params.max_side)
        base = (
            F.interpolate(original, size=work, mode="bilinear", align_corners=False, antialias=True)
            if work != (h0, w0)
            else original
        )
        sizes = octave_sizes(work[0], work[1], params.octaves, params.octave_scale)
        bases = [base]
        for size in sizes[1:]:
            bases.append(_resize(bases[-1], size))

        with torch.no_grad():
            objective_before = float(objective.value(base))  # also validates layers and channels
        x, steps, losses = _ascend(objective, bases, params, generator, progress, should_stop)
        with torch.no_grad():
            objective_after = float(objective.value(x))
        if work != (h0, w0):
            # Put the dreamed detail on the full-resolution input instead of upscaling the small result.
            x = (original + _resize(x - base, (h0, w0))).clamp_(0.0, 1.0)
        result = _to_numpy(x)
    return DreamOutput(
        image=result,
        octave_sizes=tuple(sizes),
        steps=steps,
        objective_before=objective_before,
        objective_after=objective_after,
        losses=tuple(losses),
    )


def _targets(
    image: np.ndarray, params: DreamParams, layers: Mapping[str, float] | None, mean: Sequence[float]
) -> Mapping[str, float]:
    """The objective's layers, once the arguments are checked against each other."""
    targets = layers if layers is not None else params.layers
    if not targets:
        raise InvalidArgument("dream: name at least one layer", reason="unknown_layer")
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != len(mean):
        raise InvalidArgument(
            f"dream image must be (H, W, {len(mean)}), got shape {img.shape}", reason="not_an_image"
        )
    for name in params.channels:
        if name not in targets:
            raise InvalidArgument(f"dream: channels given for layer {name!r}, which is not a target")
    return targets


def _ascend(
    objective: _Objective,
    bases: list[torch.Tensor],
    params: DreamParams,
    generator: torch.Generator,
    progress: Callable[[DreamProgress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> tuple[torch.Tensor, int, list[float]]:
    """The octaves, coarsest first (the notebook's `deepdream`): `steps` steps on each octave's base
    plus the detail dreamed so far, upscaled. Returns the last image, the steps run and their losses."""
    total_steps = len(bases) * params.steps
    losses: list[float] = []
    detail = torch.zeros_like(bases[-1])
    x = bases[-1]
    step = 0
    for octave, octave_base in enumerate(reversed(bases), start=1):
        if octave > 1:
            detail = _resize(detail, (octave_base.shape[-2], octave_base.shape[-1]))
        x = (octave_base + detail).clamp(0.0, 1.0)
        for _ in range(params.steps):
            if should_stop is not None and should_stop():
                raise Cancelled(f"dream stopped after {step} of {total_steps} steps", reason="stopped")
            step += 1
            loss, x = _step(objective, x, params, generator)
            losses.append(loss)
            if progress is not None:
                want_preview = params.preview_every > 0 and step % params.preview_every == 0
                progress(
                    DreamProgress(
                        step=step,
                        total_steps=total_steps,
                        octave=octave,
                        octaves=len(bases),
                        losses={"objective": loss},
                        preview=_to_numpy(x) if want_preview else None,
                    )
                )
        detail = x - octave_base
    return x, step, losses


def _step(
    objective: _Objective, x: torch.Tensor, params: DreamParams, generator: torch.Generator
) -> tuple[float, torch.Tensor]:
    """One step (the notebook's `make_step`): jitter, a normalized gradient-ascent step, jitter undone,
    clipped to [0, 1]. Returns the objective before the step and the new image."""
    dy, dx = (
        (int(v) for v in torch.randint(-params.jitter, params.jitter + 1, (2,), generator=generator))
        if params.jitter
        else (0, 0)
    )
    shifted = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    loss, g = _gradient(objective, shifted, params.tile_size, generator)
    magnitude = g.abs()
    denominator = magnitude.mean() + 1e-8 * magnitude.max() + torch.finfo(g.dtype).tiny
    shifted = shifted + (params.step_size / denominator) * g
    return loss, torch.roll(shifted, shifts=(-dy, -dx), dims=(2, 3)).clamp_(0.0, 1.0)


__all__ = ["DreamOutput", "DreamProgress", "capture", "dream", "resolve_layers"]
