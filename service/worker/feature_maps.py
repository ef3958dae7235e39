"""What a network computes and what it learned, without gradients: the activations of named layers
for one image (FeatureMaps) and a convolution's kernels (Filters).

Activations are read with forward hooks during one ordinary forward pass to the logits (so the
top-1 class comes from the same pass), under torch.no_grad: nothing here builds a graph. A hooked
layer's first output is kept (every addressable layer runs once: export.layers). The channels a
picture shows are ranked by mean activation over the spatial axes, strongest first (Zeiler and
Fergus rank by the strongest activation; the mean favours channels that respond over the whole
image, which is what a grid of maps at one glance shows best).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from service.errors import InvalidArgument
from service.worker.guided_backprop import stop_checks
from service.worker.model_state import model_device, model_dtype


@dataclass(frozen=True)
class Activations:
    """layers: name -> float32 activations of the one image (no batch axis), in the order asked."""

    layers: dict[str, np.ndarray]
    predicted: int
    predicted_probability: float


def activations(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str],
    *,
    should_stop: Callable[[], bool] | None = None,
) -> Activations:
    """The outputs of `layers` (module paths) for x (1, C, H, W), and the top-1 class of the same
    pass. should_stop is checked before every layer (service.errors.Cancelled). InvalidArgument for
    a name that is no module or does not run."""
    modules = dict(model.named_modules())
    missing = [n for n in layers if not n or n not in modules]
    if missing:
        raise InvalidArgument(f"feature maps: the model has no layer {missing[0]!r}", reason="unknown_layer")
    found: dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_m: nn.Module, _i: Any, output: Any) -> None:
            if name not in found and isinstance(output, torch.Tensor):
                found[name] = output.detach()

        return hook

    inp = x.detach().to(device=model_device(model), dtype=model_dtype(model))
    with contextlib.ExitStack() as stack, torch.no_grad():
        if should_stop is not None:
            stack.enter_context(stop_checks(model, should_stop, what="feature maps"))
        for name in layers:
            stack.callback(modules[name].register_forward_hook(make_hook(name)).remove)
        logits = model(inp)
    not_run = [n for n in layers if n not in found]
    if not_run:
        raise InvalidArgument(
            f"feature maps: layer {not_run[0]!r} does not run in a forward pass", reason="unknown_layer"
        )
    probabilities = torch.softmax(logits.float(), dim=1)[0]
    top = int(probabilities.argmax())
    return Activations(
        layers={n: found[n][0].float().cpu().numpy().astype(np.float32) for n in layers},
        predicted=top,
        predicted_probability=float(probabilities[top]),
    )


def strongest_channels(activation: np.ndarray, count: int) -> tuple[int, ...]:
    """The `count` channels of one image's activation (C, ...) with the highest mean, strongest
    first (ties: the lower index first)."""
    means = activation.reshape(activation.shape[0], -1).mean(axis=1)
    order = np.argsort(-means, kind="stable")
    return tuple(int(c) for c in order[:count])


def conv_weights(model: nn.Module, layer: str) -> np.ndarray:
    """A Conv2d's weight as float32 (out, in / groups, kH, kW); InvalidArgument for anything else."""
    module = dict(model.named_modules()).get(layer) if layer else None
    if module is None:
        raise InvalidArgument(f"filters: the model has no layer {layer!r}", reason="unknown_layer")
    if not isinstance(module, nn.Conv2d):
        raise InvalidArgument(
            f"filters: layer {layer!r} is a {type(module).__name__}, not a Conv2d", reason="unknown_layer"
        )
    return module.weight.detach().float().cpu().numpy().astype(np.float32)


__all__ = ["Activations", "activations", "conv_weights", "strongest_channels"]
