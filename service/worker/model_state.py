"""Model-state helpers the three algorithms share (guided_backprop.py, deepdream.py, style_transfer.py).

Every algorithm takes input gradients of a model that must leave exactly as it came: `frozen_model`
sets and restores the state around a call, `model_device` and `model_dtype` say where and in what
precision to build the input. torch, but nothing of the algorithms themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def frozen_model(model: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter requires grad, and grad mode on; all restored exactly afterwards.

    Restores each module's own `training` flag and each parameter's own `requires_grad`, so a model
    that came in with mixed settings leaves with the same ones.
    """
    training = [(m, m.training) for m in model.modules()]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in requires:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in requires:
            p.requires_grad_(flag)
        for m, flag in training:
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (else buffer); the CPU for a model with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter; float32 for a model with none."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


__all__ = ["frozen_model", "model_device", "model_dtype"]
