"""Receptive fields computed from a network's kernels, strides, paddings and dilations.

Which input pixels can a unit of a layer see? For every spatial axis the answer is an affine
interval: unit i of a layer sees input rows [start + i * jump, end + i * jump) (before clipping to
the image), where `jump` is the product of the strides on the way and start/end grow with each
kernel and padding. A convolution or pooling with kernel k, stride s, padding p and dilation d
turns (jump, start, end) into (jump * s, start - p * jump, end + (d * (k - 1) - p) * jump).

Rather than one hand-written rule per block type (ResNet's blocks, GoogLeNet's Inception), the
analysis watches one forward pass on the meta device (no arithmetic, no copy of the weights)
through a TorchFunctionMode and carries a field along with every tensor the pass makes:

- conv2d, max_pool2d, avg_pool2d apply the rule above;
- an op whose output keeps the spatial size of its inputs (ReLU, batch norm, LRN, dropout, the
  residual `+`, Inception's channel `cat`, GoogLeNet's transform_input) takes the union of its
  inputs' fields. That is how the branches of a block combine: ResNet's main branch (two or three
  convolutions) contains its 1x1 shortcut's field, so it dominates; an Inception block's field is
  the widest of its branches (the 3x3 ones, or the pool branch's 3x3 max pool);
- anything else that changes the spatial size or drops the spatial axes (adaptive pooling to
  another size, flatten, linear) sees the whole input: `Field.whole`. That is a superset, so it
  is never wrong about which pixels a unit cannot see.

Why here and not in service/worker: it is a property of the architecture, like FLOPs
(export/describe.py) and the addressable layers (export/layers.py), so the exporter can record
it one day and the gradient processes use it now for Explain's neuron target.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class Axis:
    """Unit i of one spatial axis sees input indices [start + i * jump, end + i * jump)."""

    jump: int
    start: int
    end: int

    def through(self, kernel: int, stride: int, padding: int, dilation: int) -> Axis:
        return Axis(
            jump=self.jump * stride,
            start=self.start - padding * self.jump,
            end=self.end + (dilation * (kernel - 1) - padding) * self.jump,
        )

    def union(self, other: Axis) -> Axis | None:
        if self.jump != other.jump:
            return None  # not an affine interval any more: the caller falls back to the whole input
        return Axis(self.jump, min(self.start, other.start), max(self.end, other.end))


IDENTITY = Axis(1, 0, 1)


@dataclass(frozen=True)
class Field:
    """The receptive field of a layer's units: one Axis for rows and one for columns, or None for
    `whole` (a unit sees the entire input: a layer without spatial size, or one the analysis cannot
    place)."""

    rows: Axis | None
    cols: Axis | None

    @property
    def whole(self) -> bool:
        return self.rows is None or self.cols is None

    @property
    def size(self) -> tuple[int, int] | None:
        """(height, width) of an unclipped field, None for `whole`."""
        if self.rows is None or self.cols is None:
            return None
        return self.rows.end - self.rows.start, self.cols.end - self.cols.start

    def at(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The input region unit (y, x) sees, clipped to a height x width input:
        (top, left, bottom, right), rows [top, bottom) and columns [left, right)."""
        if self.rows is None or self.cols is None:
            return 0, 0, height, width
        r, c = self.rows, self.cols
        return (
            max(0, r.start + y * r.jump),
            max(0, c.start + x * c.jump),
            min(height, r.end + y * r.jump),
            min(width, c.end + x * c.jump),
        )


WHOLE = Field(None, None)


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1])) if value else (1, 1)
    return int(value), int(value)


def _through(field: Field, kernel: Any, stride: Any, padding: Any, dilation: Any) -> Field:
    if field.rows is None or field.cols is None:
        return WHOLE
    (kh, kw), (dh, dw) = _pair(kernel), _pair(dilation)
    # stride None (pooling's default) means the kernel size
    (sh, sw) = _pair(stride) if stride not in (None, (), []) else (kh, kw)
    if isinstance(padding, str):  # "valid" or "same" (stride 1): left padding of "same" is half
        (ph, pw) = (0, 0) if padding == "valid" else ((dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2)
    else:
        (ph, pw) = _pair(padding)
    return Field(field.rows.through(kh, sh, ph, dh), field.cols.through(kw, sw, pw, dw))


def _union(fields: Sequence[Field]) -> Field:
    out = fields[0]
    for f in fields[1:]:
        if out.rows is None or out.cols is None or f.rows is None or f.cols is None:
            return WHOLE
        rows, cols = out.rows.union(f.rows), out.cols.union(f.cols)
        out = Field(rows, cols) if rows is not None and cols is not None else WHOLE
    return out


def _arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class _Tracker(TorchFunctionMode):
    """Carries a Field along with every tensor of a forward pass (the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        # id -> (tensor, field): the tensor is kept alive so its id is never reused in the pass
        self.fields: dict[int, tuple[torch.Tensor, Field]] = {}

    def mark(self, tensor: torch.Tensor, field: Field) -> None:
        self.fields[id(tensor)] = (tensor, field)

    def field(self, tensor: torch.Tensor) -> Field | None:
        entry = self.fields.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [
            (t, f) for t in _tensors((args, kwargs)) if (f := self.field(t)) is not None and t.dim() >= 2
        ]
        if not inputs:
            return out
        name = getattr(func, "__name__", "")
        first, field = inputs[0]
        for result in _tensors(out):
            if result.dim() < 3:
                self.mark(result, WHOLE)  # flattened: no spatial axes left
                continue
            if name == "conv2d":
                new = _through(
                    field,
                    _arg(args, kwargs, 1, "weight", None).shape[-2:],
                    _arg(args, kwargs, 3, "stride", 1),
                    _arg(args, kwargs, 4, "padding", 0),
                    _arg(args, kwargs, 5, "dilation", 1),
                )
            elif name in ("max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d"):
                avg = name == "avg_pool2d"
                new = _through(
                    field,
                    _arg(args, kwargs, 1, "kernel_size", 1),
                    _arg(args, kwargs, 2, "stride", None),
                    _arg(args, kwargs, 3, "padding", 0),
                    1 if avg else _arg(args, kwargs, 4, "dilation", 1),
                )
            elif all(t.shape[-2:] == result.shape[-2:] for t, _ in inputs):
                new = _union([f for _, f in inputs])  # elementwise, +, cat over channels
            else:
                new = WHOLE  # adaptive pooling to another size, interpolation, ...: see everything
            self.mark(result, new)
        return out


def receptive_fields(model: nn.Module, input_shape: Sequence[int], layers: Sequence[str]) -> dict[str, Field]:
    """The receptive field of each named module's output (module paths as in named_modules(), each
    run once by a forward pass: export.layers.addressable_layers), computed from one forward pass
    at `input_shape` (C, H, W) on the meta device. Raises ValueError for a name that is not a
    module or does not run."""
    modules = dict(model.named_modules())
    missing = [n for n in layers if not n or n not in modules]
    if missing:
        raise ValueError(f"no module {missing[0]!r}")
    found: dict[str, Field] = {}
    tracker = _Tracker()
    handles = []
    for name in layers:

        def hook(_m: nn.Module, _i: Any, output: Any, name: str = name) -> None:
            if name not in found and isinstance(output, torch.Tensor):
                field = tracker.field(output)
                found[name] = WHOLE if field is None or output.dim() < 3 else field

        handles.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    meta = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
    x = torch.empty(1, *input_shape, device="meta")
    try:
        model.eval()
        tracker.mark(x, Field(IDENTITY, IDENTITY))
        with torch.no_grad(), tracker:
            torch.func.functional_call(model, meta, (x,))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    not_run = [n for n in layers if n not in found]
    if not_run:
        raise ValueError(f"module {not_run[0]!r} does not run in a forward pass")
    return found


def receptive_field(model: nn.Module, input_shape: Sequence[int], layer: str) -> Field:
    """receptive_fields for one layer."""
    return receptive_fields(model, input_shape, [layer])[layer]


def field_size(field: Field) -> int | None:
    """The side of a square field (None for whole or non-square): for tests and logs."""
    size = field.size
    return size[0] if size is not None and size[0] == size[1] else None


__all__ = ["IDENTITY", "WHOLE", "Axis", "Field", "field_size", "receptive_field", "receptive_fields"]
