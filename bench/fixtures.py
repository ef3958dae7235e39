"""Inputs the gradient benchmarks share: bench.gradients, and the style job of bench.load.

A synthetic picture (no natural images offline) and a network held as a gradient process holds it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
    """A deterministic float32 (size, size, 3) picture in [0, 1]: colour ramps, a sine pattern and a
    little noise drawn with `seed`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(8 * x * y)], axis=2)
    return np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1).astype(np.float32)


def frozen_on(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device` in eval mode with no parameter requiring grad, as service.worker.loading
    leaves it: only input gradients are ever computed."""
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


__all__ = ["frozen_on", "synthetic_image"]
