"""Guided backpropagation (Springenberg et al. 2014), Guided Grad-CAM (Selvaraju et al. 2017) and plain
input gradients (Simonyan et al. 2014) for the classifiers of the zoo.

The guided rule: going backwards through a ReLU, the gradient passes only where the forward input was
positive (ordinary backprop) *and* the incoming gradient is positive. We implement it with a forward
hook on every `nn.ReLU` module that registers a tensor hook on that call's output; the tensor hook
clamps the incoming gradient at 0 and the ReLU's own backward then applies the forward mask:

    d(input) = [input > 0] * max(d(output), 0)

Why this way (and not a replaced module or a `full_backward_hook`):
- a forward hook fires on *every* call of a module, so a ReLU module reused several times in one
  forward gets the rule on each use (each call's output is its own tensor with its own hook);
- it works for `inplace=True` ReLUs: their output tensor is the overwritten input, and
  `[input > 0] == [relu(input) > 0]`, so nothing needs the pre-ReLU values;
  (`register_full_backward_hook` cannot be combined with in-place modules at all);
- the forward values are untouched, the hooks on tensors die with the graph, and the module hooks
  are removed in a `finally`, so the model is never left modified.

Limits, by design of the zoo (docs/STYLE: every activation is its own `nn.ReLU` module):
- `F.relu` / `torch.relu` calls inside `forward` cannot be hooked and get the plain gradient;
- code that applies an in-place ReLU and then keeps using the *old* reference (`self.relu(x); return x`)
  rather than the returned tensor would bypass the tensor hook; torchvision-style code never does.

Gradients are taken with `torch.autograd.grad` with respect to the input only, and the parameters'
`requires_grad` is switched off for the pass (restored afterwards): no weight gradient is computed or
stored, and `param.grad` is never touched.

Grad-CAM: the class score's *plain* gradient with respect to a late feature map A (N, K, h, w),
alpha_k = mean over (h, w) of dScore/dA^k, cam = ReLU(sum_k alpha_k A^k), upsampled bilinearly to the
input size and divided by its per-sample max (so it lies in [0, 1]). Guided Grad-CAM is the guided
backprop map times that cam. By default A is "the last convolutional feature map": the input of the
last module in execution order that receives a 4-D tensor with more than one spatial position (the
global average pool of GoogLeNet/ResNet/VGG, the last conv of LeNet-5); `cam_layer` names a module
whose output to use instead.

A neuron (Springenberg et al. 2014, section 3.3): instead of a class score, the activation of one
unit, `channel` of a layer's output at (y, x) (or that channel's strongest position in each
image), is differentiated, so the map shows what in the input excites that unit. The unit depends
only on its receptive field (export/receptive_field.py), so its saliency is exactly zero outside.

Plain and guided gradients share one forward pass: the tensor hooks read a switch that is off for the
plain backward pass and on for the guided one.

Stopping: an explain job is one batched forward and one or two backward passes, so there is no step
boundary to check a cancel flag at. With `should_stop`, every leaf module checks it before it runs and
again when its output's gradient arrives in the backward pass (`stop_checks`), so a deadline or a
cancellation stops a batch within one layer. A loop over the samples would stop at sample granularity,
but it gives up batching: a batch of 4 ResNet-18 images at 224 px took 1.1-1.4x as long one by one on
this project's busy 2-core machine (VGG-19: 1.07x), while the checks measured 0.97-1.02x (a Python
call per layer and pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.errors import Cancelled, InvalidArgument
from service.worker.model_state import frozen_model, model_device, model_dtype
from service.worker.params import EXPLAIN_METHODS as METHODS
from service.worker.params import ExplainMethod as Method
from service.worker.params import NeuronTarget


@dataclass(frozen=True)
class Explanation:
    """What `explain` returns; numpy arrays only.

    saliency: float32 (N, C, H, W), the raw signed map with respect to the *model input tensor*
        (the normalized tensor, not pixels): guided backprop, guided Grad-CAM or the plain gradient;
        for "gradcam", the Grad-CAM heatmap itself, float32 (N, 1, H, W) in [0, 1].
    classes: int64 (N,), the explained class of each sample.
    probabilities: float32 (N,), softmax probability of that class.
    predicted: int64 (N,), the model's top-1 class.
    predicted_probabilities: float32 (N,), softmax probability of the top-1 class.
    plain: float32 (N, C, H, W), the plain input gradient, when asked for (or when it is the method).
    cam: float32 (N, H, W) in [0, 1], the upsampled Grad-CAM map (guided_gradcam and gradcam).
    cam_layer: the module whose output (or, for the automatic choice, whose input) Grad-CAM used.
    neuron_positions: int64 (N, 2), the (y, x) of the neuron explained in each image ((0, 0) for a
        layer without spatial axes); None without a neuron target.
    neuron_activations: float32 (N,), that unit's activation in each image.
    """

    saliency: np.ndarray
    classes: np.ndarray
    probabilities: np.ndarray
    predicted: np.ndarray
    predicted_probabilities: np.ndarray
    plain: np.ndarray | None = None
    cam: np.ndarray | None = None
    cam_layer: str | None = None
    neuron_positions: np.ndarray | None = None
    neuron_activations: np.ndarray | None = None


class _Switch:
    """Shared on/off flag read by the tensor hooks at backward time."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False


@contextlib.contextmanager
def guided_relus(model: nn.Module, switch: _Switch) -> Iterator[int]:
    """Within the block, every `nn.ReLU` call of `model` applies the guided rule while `switch.on`.

    Yields the number of ReLU modules hooked. The module hooks are always removed on exit.
    """

    def clamp_incoming(grad: torch.Tensor) -> torch.Tensor | None:
        return grad.clamp(min=0) if switch.on else None

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(clamp_incoming)  # type: ignore[no-untyped-call]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def stop_checks(model: nn.Module, should_stop: Callable[[], bool], what: str = "explain") -> Iterator[int]:
    """Within the block, every leaf module of `model` calls `should_stop()` before it runs (forward)
    and when the gradient of its output arrives (backward), raising service.errors.Cancelled when it
    returns true. Yields the number of modules hooked; the module hooks are always removed on exit
    (the tensor hooks die with the graph)."""

    def check(phase: str) -> None:
        if should_stop():
            raise Cancelled(f"{what} stopped during the {phase} pass", reason="stopped")

    def on_grad(grad: torch.Tensor) -> None:
        check("backward")

    def pre_hook(module: nn.Module, inputs: Any) -> None:
        check("forward")

    def post_hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(on_grad)  # type: ignore[no-untyped-call]

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = []
    try:
        for m in leaves:
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(post_hook))
        yield len(leaves)
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _feature_map_probe(model: nn.Module, cam_layer: str | None) -> Iterator[dict[str, Any]]:
    """Capture Grad-CAM's feature map during a forward pass into the yielded dict ("A", "name")."""
    found: dict[str, Any] = {}
    handles = []
    try:
        if cam_layer is not None:
            module = _get_module(model, cam_layer)

            def out_hook(m: nn.Module, inputs: Any, output: Any) -> None:
                if isinstance(output, torch.Tensor) and output.dim() == 4:
                    found["A"], found["name"] = output, cam_layer

            handles.append(module.register_forward_hook(out_hook))
        else:

            def make_pre_hook(name: str) -> Callable[[nn.Module, Any], None]:
                def pre_hook(m: nn.Module, inputs: Any) -> None:
                    a = inputs[0] if inputs else None
                    if (
                        isinstance(a, torch.Tensor)
                        and a.dim() == 4
                        and a.shape[2] * a.shape[3] > 1
                        and a.requires_grad
                    ):
                        found["A"], found["name"] = a, name

                return pre_hook

            for name, m in model.named_modules():
                if name:  # the root's input is the image itself
                    handles.append(m.register_forward_pre_hook(make_pre_hook(name)))
        yield found
    finally:
        for h in handles:
            h.remove()


def _get_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise InvalidArgument(
            f"model has no layer {name!r}; layers are dotted module paths such as "
            + ", ".join(repr(n) for n in list(modules)[1:6]),
            reason="unknown_layer",
        )
    module: nn.Module = modules[name]
    return module


# ---------------------------------------------------------------------------------------------------


def explain(
    model: nn.Module,
    x: torch.Tensor,
    targets: Sequence[int] | None = None,
    *,
    method: Method = "guided_backprop",
    plain_gradient: bool = False,
    cam_layer: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    neuron: NeuronTarget | None = None,
) -> Explanation:
    """Explain `model`'s class scores for a batch of preprocessed inputs.

    x: (N, C, H, W) model input (already normalized, as the ONNX model takes it).
    targets: one class per sample; None explains each sample's predicted (top-1) class.
    method: "guided_backprop", "guided_gradcam", "gradcam" (the Grad-CAM heatmap alone, as the
        saliency (N, 1, H, W)) or "gradient" (plain input gradient).
    plain_gradient: also return the plain gradient (costs one extra backward pass, no extra forward).
    cam_layer: Grad-CAM feature map module (guided_gradcam and gradcam); None picks it automatically.
    should_stop: checked before every layer of the forward pass and at every layer of the backward
        passes (see `stop_checks`); when it returns true, service.errors.Cancelled is raised and the
        model is left as it came.

    neuron: differentiate that unit's activation instead of a class score (method guided_backprop
        or gradient, targets None); `classes` are then the predicted ones.

    The score differentiated is the target class's logit (pre-softmax), as in all three papers. Samples
    are independent (eval mode), so a batch gives the same maps as one call per sample.
    Raises InvalidArgument for a bad method, target or layer.
    """
    _check_arguments(x, targets, method)
    if neuron is not None:
        return _explain_neuron(
            model, x, neuron, method=method, plain_gradient=plain_gradient, should_stop=should_stop
        )
    need_guided = method in ("guided_backprop", "guided_gradcam")
    need_plain = method != "guided_backprop" or plain_gradient
    need_cam = method in ("guided_gradcam", "gradcam")

    device = model_device(model)
    inp = x.detach().to(device=device, dtype=model_dtype(model)).clone().requires_grad_(True)
    switch = _Switch()
    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen_model(model))
        if should_stop is not None:
            stack.enter_context(stop_checks(model, should_stop))
        if need_guided:
            stack.enter_context(guided_relus(model, switch))
        probe = stack.enter_context(_feature_map_probe(model, cam_layer)) if need_cam else None
        logits = model(inp)
        predicted, target_t = _classes(logits, x.shape[0], targets, device)
        score = logits.gather(1, target_t[:, None]).sum()
        plain = cam = cam_name = None
        if need_plain:
            plain, cam, cam_name = _plain_pass(score, inp, switch, probe, cam_layer, retain=need_guided)
        guided = _guided_pass(score, inp, switch) if need_guided else None
        softmax = torch.softmax(logits.detach().float(), dim=1)
        probabilities = softmax.gather(1, target_t[:, None])[:, 0]
        predicted_probabilities = softmax.gather(1, predicted[:, None])[:, 0]

    saliency = _to_numpy(_saliency(method, plain, guided, cam))
    assert saliency is not None
    return Explanation(
        saliency=saliency,
        classes=target_t.cpu().numpy().astype(np.int64),
        probabilities=probabilities.cpu().numpy().astype(np.float32),
        predicted=predicted.cpu().numpy().astype(np.int64),
        predicted_probabilities=predicted_probabilities.cpu().numpy().astype(np.float32),
        plain=_to_numpy(plain) if (plain_gradient or method == "gradient") else None,
        cam=_to_numpy(cam),
        cam_layer=cam_name,
    )


def _explain_neuron(
    model: nn.Module,
    x: torch.Tensor,
    neuron: NeuronTarget,
    *,
    method: Method,
    plain_gradient: bool,
    should_stop: Callable[[], bool] | None,
) -> Explanation:
    """explain() for a neuron target: the score is the sum over the batch of each image's unit."""
    if method not in ("guided_backprop", "gradient"):
        raise InvalidArgument(
            f"a neuron target works with guided backprop and the plain gradient, not {method}"
        )
    module = _get_module(model, neuron.layer)
    need_guided = method == "guided_backprop"
    device = model_device(model)
    inp = x.detach().to(device=device, dtype=model_dtype(model)).clone().requires_grad_(True)
    switch = _Switch()
    captured: list[torch.Tensor] = []

    def capture(m: nn.Module, inputs: Any, output: Any) -> None:
        if not captured and isinstance(output, torch.Tensor):
            captured.append(output)

    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen_model(model))
        if should_stop is not None:
            stack.enter_context(stop_checks(model, should_stop))
        if need_guided:
            stack.enter_context(guided_relus(model, switch))
        handle = module.register_forward_hook(capture)
        stack.callback(handle.remove)
        logits = model(inp)
        if not captured:
            raise InvalidArgument(f"neuron: layer {neuron.layer!r} does not run in a forward pass")
        act = captured[0]
        positions, units = _neuron_units(act, neuron)
        predicted, _ = _classes(logits, x.shape[0], None, device)
        score = units.sum()
        switch.on = False
        plain = None
        if method == "gradient" or plain_gradient:
            (plain,) = torch.autograd.grad(score, [inp], retain_graph=need_guided)
            plain = plain.detach()
        guided = _guided_pass(score, inp, switch) if need_guided else None
        softmax = torch.softmax(logits.detach().float(), dim=1)
        predicted_probabilities = softmax.gather(1, predicted[:, None])[:, 0]

    saliency = _to_numpy(guided if need_guided else plain)
    assert saliency is not None
    return Explanation(
        saliency=saliency,
        classes=predicted.cpu().numpy().astype(np.int64),
        probabilities=predicted_probabilities.cpu().numpy().astype(np.float32),
        predicted=predicted.cpu().numpy().astype(np.int64),
        predicted_probabilities=predicted_probabilities.cpu().numpy().astype(np.float32),
        plain=_to_numpy(plain) if plain_gradient else None,
        neuron_positions=positions,
        neuron_activations=units.detach().float().cpu().numpy().astype(np.float32),
    )


def _neuron_units(act: torch.Tensor, neuron: NeuronTarget) -> tuple[np.ndarray, torch.Tensor]:
    """(the (y, x) of each image's unit, int64 (N, 2); the units' activations, (N,), in the graph).
    InvalidArgument naming the layer's shape for a channel or position out of range."""
    shape = list(act.shape[1:])
    n = act.shape[0]
    if act.dim() not in (2, 4):
        raise InvalidArgument(
            f"neuron: layer {neuron.layer!r} has output shape {shape}; a neuron needs [C, H, W] or [C]",
            reason="unknown_layer",
        )
    if not 0 <= neuron.channel < shape[0]:
        raise InvalidArgument(
            f"neuron: channel {neuron.channel} is out of range for layer {neuron.layer!r} of shape {shape}",
            reason="channel_out_of_range",
        )
    rows = torch.arange(n, device=act.device)
    if act.dim() == 2:
        if neuron.y is not None:
            raise InvalidArgument(
                f"neuron: layer {neuron.layer!r} has shape {shape}, no spatial position: "
                "give the channel alone",
                reason="channel_out_of_range",
            )
        return np.zeros((n, 2), dtype=np.int64), act[:, neuron.channel]
    h, w = shape[1], shape[2]
    plane = act[:, neuron.channel]
    if neuron.y is None or neuron.x is None:
        flat = plane.detach().flatten(1).argmax(dim=1)  # the strongest position (first on ties)
        ys, xs = flat // w, flat % w
    else:
        if not (0 <= neuron.y < h and 0 <= neuron.x < w):
            raise InvalidArgument(
                f"neuron: position (y={neuron.y}, x={neuron.x}) is out of range for layer "
                f"{neuron.layer!r} of shape {shape}",
                reason="channel_out_of_range",
            )
        ys = torch.full((n,), neuron.y, device=act.device, dtype=torch.long)
        xs = torch.full((n,), neuron.x, device=act.device, dtype=torch.long)
    positions = torch.stack([ys, xs], dim=1).cpu().numpy().astype(np.int64)
    return positions, plane[rows, ys, xs]


def _check_arguments(x: torch.Tensor, targets: Sequence[int] | None, method: str) -> None:
    if method not in METHODS:
        raise InvalidArgument(f"unknown explain method {method!r}; use one of {', '.join(METHODS)}")
    if x.dim() != 4:
        raise InvalidArgument(f"input must be (N, C, H, W), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if targets is not None and len(targets) != n:
        raise InvalidArgument(f"got {len(targets)} targets for {n} inputs; give one per input or none")


def _classes(
    logits: Any, n: int, targets: Sequence[int] | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the predicted classes, the classes to explain: `targets`, else the predicted ones)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        raise InvalidArgument("explain needs a classifier returning (N, classes) logits")
    predicted = logits.detach().argmax(dim=1)
    if targets is None:
        return predicted, predicted
    num_classes = logits.shape[1]
    bad = [t for t in targets if not 0 <= int(t) < num_classes]
    if bad:
        raise InvalidArgument(
            f"target class {bad[0]} is out of range; the model has {num_classes} classes "
            f"(0..{num_classes - 1})",
            reason="target_out_of_range",
        )
    return predicted, torch.as_tensor([int(t) for t in targets], device=device, dtype=torch.long)


def _plain_pass(
    score: torch.Tensor,
    inp: torch.Tensor,
    switch: _Switch,
    probe: dict[str, Any] | None,
    cam_layer: str | None,
    *,
    retain: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    """The plain backward pass: the input gradient, and with a probe Grad-CAM from the same pass
    (dScore/dA comes with it). Returns (plain, cam, the cam layer's name)."""
    switch.on = False
    wrt = [inp]
    if probe is not None:
        if "A" not in probe:
            raise InvalidArgument(
                "found no 4-D feature map for Grad-CAM" + (f" at layer {cam_layer!r}" if cam_layer else "")
            )
        wrt.append(probe["A"])
    grads = torch.autograd.grad(score, wrt, retain_graph=retain)
    if probe is None:
        return grads[0].detach(), None, None
    cam = _grad_cam(probe["A"].detach(), grads[1].detach(), size=inp.shape[-2:])
    return grads[0].detach(), cam, probe["name"]


def _guided_pass(score: torch.Tensor, inp: torch.Tensor, switch: _Switch) -> torch.Tensor:
    """The guided backward pass: the same graph, with the ReLU hooks on."""
    switch.on = True
    (guided,) = torch.autograd.grad(score, [inp])
    guided = guided.detach()
    switch.on = False
    return guided


def _saliency(
    method: Method, plain: torch.Tensor | None, guided: torch.Tensor | None, cam: torch.Tensor | None
) -> torch.Tensor:
    if method == "gradient":
        assert plain is not None
        return plain
    if method == "guided_backprop":
        assert guided is not None
        return guided
    if method == "gradcam":
        assert cam is not None
        return cam[:, None]
    assert guided is not None and cam is not None
    return guided * cam[:, None]


def _to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.float().cpu().numpy().astype(np.float32, copy=False)


def _grad_cam(a: torch.Tensor, grad: torch.Tensor, *, size: torch.Size) -> torch.Tensor:
    """Grad-CAM from feature map A and dScore/dA, both (N, K, h, w) -> (N, H, W) in [0, 1]."""
    alpha = grad.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha * a.float()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp(min=torch.finfo(cam.dtype).tiny)
    return cam / peak[:, None, None]


__all__ = ["METHODS", "Explanation", "Method", "explain", "guided_relus", "stop_checks"]
