"""Random weights that stay numerically alive: what the demo's untrained ImageNet models get.

torchvision's init schemes are made for training, not for serving untrained: in eval mode a
batch-norm layer divides by its running variance, which at init is 1 whatever the layer's real
scale, so GoogLeNet's 0.01-std weights shrink the signal layer after layer (its logits came out at
1e-12: a uniform softmax, and DeepDream's objective 1e-16), and VGG-19's classifier leaves logits
of std 0.05 (nearly uniform too). Measured on scikit-learn's china.jpg: logit std 0.89 (alexnet),
1.2e-12 (googlenet), 1.3 (resnet18), 15.9 (resnet50), 0.049 (vgg19).

`calibrate` fixes the scale without touching what the weights are:
1. batch-norm running statistics from a few forward passes in train mode (the standard way they
   get their values: the layers' own momentum=None cumulative average);
2. the final classifier layer (ArchSpec.head) scaled by one factor so the logits of those inputs
   have unit standard deviation.
The inputs are seeded random crops (and flips) of the two photos scikit-learn ships
(`load_sample_image`: china.jpg, flower.jpg), preprocessed as the model's preprocessing does: photo
statistics matter, since calibrating on N(0, 1) pixels left GoogLeNet's and ResNet-50's logits on
a photo at std 15-37 (a softmax of 0.999 for one random class). Deterministic for a seed; no
download. The weights stay random and marked untrained.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from export.preprocessing import Preprocessing, to_tensor

CALIBRATION_BATCHES = 2
CALIBRATION_BATCH_SIZE = 8
TARGET_LOGIT_STD = 1.0


def _inputs(preprocessing: Preprocessing, seed: int) -> list[torch.Tensor]:
    """CALIBRATION_BATCHES batches of random crops of the sample photos, preprocessed."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photos = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    rng = random.Random(seed)
    crops = []
    for i in range(CALIBRATION_BATCHES * CALIBRATION_BATCH_SIZE):
        photo = photos[i % len(photos)]
        width, height = photo.size
        side = int(min(width, height) * rng.uniform(0.35, 1.0))
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        crop = photo.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops.append(torch.from_numpy(to_tensor(crop, preprocessing)))
    n = CALIBRATION_BATCH_SIZE
    return [torch.stack(crops[i : i + n]) for i in range(0, len(crops), n)]


@torch.no_grad()
def calibrate(
    model: nn.Module, preprocessing: Preprocessing, head: str, *, seed: int = 0
) -> dict[str, float]:
    """Calibrate eval-mode `model` in place (module docstring); returns what it measured:
    {"logit_std_before", "logit_std_after", "batchnorm_layers"}. The model is left in eval mode."""
    inputs = _inputs(preprocessing, seed)
    model.eval()
    before = float(torch.cat([model(x) for x in inputs]).std())
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
        m.train()  # only the batch norms: dropout and the rest stay in eval mode
    try:
        for x in inputs:
            model(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
            m.eval()
    layer = model.get_submodule(head)
    assert isinstance(layer, nn.Linear)
    std = float(torch.cat([model(x) for x in inputs]).std())
    if std > 0:
        layer.weight.mul_(TARGET_LOGIT_STD / std)
        if layer.bias is not None:
            layer.bias.mul_(TARGET_LOGIT_STD / std)
    after = float(torch.cat([model(x) for x in inputs]).std())
    return {"logit_std_before": before, "logit_std_after": after, "batchnorm_layers": float(len(norms))}


__all__ = ["calibrate"]
