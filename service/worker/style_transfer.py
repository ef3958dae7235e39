"""Neural style transfer (Gatys, Ecker & Bethge 2015) with VGG-19, optimising the pixels in [0, 1].

Network: the `features` of our torchvision-layout VGG-19 (export.models.vgg), layers named the usual
way from the module sequence (conv1_1 = features.0, relu1_1 = features.1, ..., pool5 = features.36).
The forward pass runs only up to the deepest layer a loss needs (relu5_1 = features.29 by default):
no classifier and nothing beyond. The model's ImageNet mean/std normalization is applied inside.

Losses (the defaults; weights 1 / 1e6 / 0 are those of PyTorch's Gatys tutorial, and they go with
these normalizations):
- content: mean squared error between the feature maps at `content_layer` (relu4_2) of the image and
  of the content image;
- style: sum over `style_layers` (relu1_1, relu2_1, relu3_1, relu4_1, relu5_1, each weight 1) of the
  mean squared error between Gram matrices, G = F F^T / (C*H*W) with F the (C, H*W) feature matrix.
  Dividing by C*H*W (rather than the paper's 1/(4 N^2 M^2) on the summed error) makes a layer's Gram
  independent of the image size, so style images of another size than the content compare directly.
  The features are taken *after* the ReLU, as Gatys et al. did (their Caffe ReLUs were in place, so
  "conv1_1" there is relu1_1 here); conv layers can be named explicitly instead;
- tv: mean squared difference between vertically and horizontally neighbouring pixels (summed).
total = content_weight * content + style_weight * style + tv_weight * tv.

Several style images: their Gram targets are blended, A_l = sum_i b_i G_l(style_i) / sum_i b_i; a
style with blend weight 0 is not even computed (so blend (1, 0) is exactly the first style alone).

Optimisation: L-BFGS (torch.optim.LBFGS, no line search, lr 1) by default, or Adam. `iterations`
counts objective evaluations (each a forward + backward), the unit of both the cost estimate and the
iteration cap. The image is clamped to [0, 1] before every evaluation; L-BFGS with clamping is not
monotone, so the returned image is the best evaluated one by total loss (every evaluated image is a
valid, clamped image whose loss we know exactly).

original_colors: luminance-only transfer as post-processing (Gatys et al. 2016, "Preserving color in
neural artistic style transfer"): the result's Y (YIQ) is combined with the content's I and Q.

Only the input gradient is computed: the parameters are frozen for the job (and restored), so no
weight gradient is ever computed or stored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.errors import Cancelled, Internal, InvalidArgument
from service.worker.model_state import frozen_model, model_device
from service.worker.params import StyleParams, fit_side, style_size


@dataclass(frozen=True)
class StyleProgress:
    step: int  # 1-based objective evaluation
    total_steps: int
    losses: Mapping[str, float]  # content, style, tv, total (weighted), best (lowest total so far)
    preview: np.ndarray | None  # float32 (h, w, 3), the evaluated image


@dataclass(frozen=True)
class StyleOutput:
    image: np.ndarray  # float32 (h, w, 3) in [0, 1] at the working size
    losses: Mapping[str, float]  # of the returned image (before original_colors), weighted
    initial_losses: Mapping[str, float]  # of the starting image
    iterations: int  # objective evaluations run
    best_iteration: int  # 1-based evaluation that produced the image
    history: tuple[float, ...]  # total loss at each evaluation


class _Diverged(Exception):
    """The loss became NaN or Inf; the optimisation stops with the best image so far."""


def vgg_layer_names(features: nn.Sequential) -> dict[str, int]:
    """conv{b}_{i} / relu{b}_{i} / pool{b} -> index in `features`, from the module sequence."""
    names: dict[str, int] = {}
    block, conv = 1, 0
    for index, module in enumerate(features):
        if isinstance(module, nn.Conv2d):
            conv += 1
            names[f"conv{block}_{conv}"] = index
        elif isinstance(module, nn.ReLU):
            names[f"relu{block}_{conv}"] = index
        elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
            names[f"pool{block}"] = index
            block, conv = block + 1, 0
    return names


# YIQ (NTSC 1953), rows: Y, I, Q.
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
    dtype=torch.float64,
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def rgb_to_yiq(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> YIQ."""
    return torch.einsum("ij,njhw->nihw", _RGB_TO_YIQ.to(x), x)


def yiq_to_rgb(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,njhw->nihw", _YIQ_TO_RGB.to(x), x)


def keep_original_colors(styled: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The styled image's luminance with the content's chroma (I, Q), clipped to [0, 1]."""
    s, c = rgb_to_yiq(styled), rgb_to_yiq(content)
    return yiq_to_rgb(torch.cat([s[:, :1], c[:, 1:]], dim=1)).clamp(0.0, 1.0)


class _SelfProduct(torch.autograd.Function):
    """m @ m.T with a backward that uses the symmetry of the product: dL/dm = (g + g.T) @ m, one
    (C, C) x (C, HW) matmul where autograd's mm backward does two. On VGG-19's style layers this made
    a Gram forward+backward 1.4-2.4x faster on CPU; the Grams are most of a style iteration's cost
    beyond the network's own forward and backward, though at 256 px that is only a few per cent (the
    iteration measured 1.07-1.08x a raw VGG-19 pass either way, on 1 busy core)."""

    @staticmethod
    def forward(ctx: Any, m: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(m)
        return m @ m.t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        m: torch.Tensor = ctx.saved_tensors[0]
        return (grad + grad.t()) @ m


def gram(f: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) -> (C, C) Gram matrix normalized by C*H*W."""
    _, c, h, w = f.shape
    m = f.reshape(c, h * w)
    product: torch.Tensor = _SelfProduct.apply(m)  # type: ignore[no-untyped-call]
    return product / (c * h * w)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean()


class _Features:
    """Runs VGG `features` up to the deepest needed index and returns the needed activations."""

    def __init__(
        self, model: nn.Module, params: StyleParams, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        features = getattr(model, "features", None)
        if not isinstance(features, nn.Sequential):
            raise InvalidArgument("stylize needs a VGG-style model with a `features` nn.Sequential")
        names = vgg_layer_names(features)
        wanted = [params.content_layer, *params.style_layers]
        for name in wanted:
            if name not in names:
                raise InvalidArgument(
                    f"VGG-19 has no layer {name!r}; use conv<b>_<i>, relu<b>_<i> or pool<b> names, "
                    "such as " + ", ".join(repr(n) for n in list(names)[:6]),
                    reason="unknown_layer",
                )
        self.content_index = names[params.content_layer]
        self.style_indices = [names[n] for n in params.style_layers]
        self.needed = {self.content_index, *self.style_indices}
        self.last = max(self.needed)
        self.trunk = [features[i] for i in range(self.last + 1)]
        device = model_device(model)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        x = (pixels - self.mean) / self.std
        out: dict[int, torch.Tensor] = {}
        for index, module in enumerate(self.trunk):
            x = module(x)
            if index in self.needed:
                following = self.trunk[index + 1] if index + 1 < len(self.trunk) else None
                # an in-place module after this one would overwrite the captured activation
                out[index] = x.clone() if getattr(following, "inplace", False) else x
        return out


def _to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidArgument(f"stylize images must be (H, W, 3) RGB arrays, got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None].to(device)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0.0, 1.0)


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x[0].detach().float().permute(1, 2, 0).cpu().numpy(), dtype=np.float32)


def stylize(
    model: nn.Module,
    content: np.ndarray,
    styles: Sequence[np.ndarray],
    params: StyleParams,
    *,
    blend: Sequence[float] | None = None,
    mean: Sequence[float],
    std: Sequence[float],
    progress: Callable[[StyleProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> StyleOutput:
    """Render `content` (float32 (H, W, 3) in [0, 1]) in the blended style of `styles`.

    blend: one weight >= 0 per style image (normalized to sum 1); None weighs them equally.
    progress: called after every objective evaluation; should_stop: checked before every evaluation,
    raising service.errors.Cancelled. Returns the best evaluated image at the working size
    (params.max_side).
    """
    weights = _blend_weights(styles, blend)
    device = model_device(model)
    with frozen_model(model):
        feats = _Features(model, params, mean, std)
        content_full = _to_tensor(content, device)
        work = fit_side(content_full.shape[-2], content_full.shape[-1], params.max_side)
        content_t = _resize(content_full, work)
        with torch.no_grad():
            content_target = feats(content_t)[feats.content_index].detach()
            style_targets = _style_targets(feats, styles, weights, work, params.style_scale, device)
        img = _initial_image(content_t, params, device)
        run = _Evaluations(feats, img, content_target, style_targets, params, progress, should_stop)
        _optimise(run, img, params)
        if not run.best_losses:
            raise Internal("style transfer produced no finite loss")
        result = run.best_img
        if params.original_colors:
            result = keep_original_colors(run.best_img, content_t)
        image = _to_numpy(result)
    return StyleOutput(
        image=image,
        losses=dict(run.best_losses),
        initial_losses=dict(run.initial),
        iterations=run.evals,
        best_iteration=run.best_eval,
        history=tuple(run.history),
    )


def _blend_weights(styles: Sequence[np.ndarray], blend: Sequence[float] | None) -> list[float]:
    if not styles:
        raise InvalidArgument("stylize needs at least one style image")
    weights = [1.0] * len(styles) if blend is None else [float(b) for b in blend]
    if len(weights) != len(styles) or any(not np.isfinite(b) or b < 0 for b in weights) or sum(weights) <= 0:
        raise InvalidArgument("stylize: give one blend weight >= 0 per style image, with a positive sum")
    return weights


def _style_targets(
    feats: _Features,
    styles: Sequence[np.ndarray],
    weights: Sequence[float],
    work: tuple[int, int],
    style_scale: float,
    device: torch.device,
) -> list[torch.Tensor]:
    """The blended Gram targets, one per style layer (a style of blend weight 0 is not computed)."""
    total_weight = sum(weights)
    targets = [torch.zeros(()) for _ in feats.style_indices]
    for image, b in zip(styles, weights, strict=True):
        if b == 0:
            continue
        s = _to_tensor(image, device)
        s = _resize(s, style_size(work, (s.shape[-2], s.shape[-1]), style_scale))
        out = feats(s)
        for k, index in enumerate(feats.style_indices):
            targets[k] = targets[k] + (b / total_weight) * gram(out[index])
    return targets


def _initial_image(content: torch.Tensor, params: StyleParams, device: torch.device) -> torch.Tensor:
    if params.init == "content":
        img = content.detach().clone()
    else:
        generator = torch.Generator().manual_seed(params.seed)
        img = torch.rand(content.shape, generator=generator).to(device)
    return img.requires_grad_(True)


class _Evaluations:
    """The objective the optimisers call (their closure): clamp the image, one forward + backward,
    report progress, keep the best image so far. Counts the evaluations against params.iterations."""

    def __init__(
        self,
        feats: _Features,
        img: torch.Tensor,
        content_target: torch.Tensor,
        style_targets: list[torch.Tensor],
        params: StyleParams,
        progress: Callable[[StyleProgress], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.feats, self.img, self.params = feats, img, params
        self.content_target, self.style_targets = content_target, style_targets
        self.layer_weights = params.style_layer_weights or (1.0,) * len(params.style_layers)
        self.progress, self.should_stop = progress, should_stop
        self.evals = 0
        self.best = float("inf")
        self.best_eval = 0
        self.best_img = img.detach().clone()
        self.best_losses: dict[str, float] = {}
        self.initial: dict[str, float] = {}
        self.history: list[float] = []

    def __call__(self) -> torch.Tensor:
        params, img = self.params, self.img
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(
                f"stylize stopped after {self.evals} of {params.iterations} iterations", reason="stopped"
            )
        with torch.no_grad():
            img.clamp_(0.0, 1.0)
        if img.grad is not None:
            img.grad.zero_()
        content_loss, style_loss, tv_loss = self._parts()
        loss = (
            params.content_weight * content_loss
            + params.style_weight * style_loss
            + params.tv_weight * tv_loss
        )
        loss.backward(inputs=[img])  # type: ignore[no-untyped-call]

        self.evals += 1
        value = float(loss.detach())
        losses = {
            "content": params.content_weight * float(content_loss.detach()),
            "style": params.style_weight * float(style_loss.detach()),
            "tv": params.tv_weight * float(tv_loss.detach()),
            "total": value,
        }
        if not self.initial:
            self.initial.update(losses)
        self.history.append(value)
        if not np.isfinite(value):
            raise _Diverged
        if value < self.best:
            self.best, self.best_eval = value, self.evals
            self.best_img.copy_(img.detach())
            self.best_losses.clear()
            self.best_losses.update(losses)
        if self.progress is not None:
            want_preview = params.preview_every > 0 and self.evals % params.preview_every == 0
            self.progress(
                StyleProgress(
                    step=self.evals,
                    total_steps=params.iterations,
                    losses={**losses, "best": float(self.best)},
                    preview=_to_numpy(img) if want_preview else None,
                )
            )
        return loss

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unweighted content, style and tv losses at the current image."""
        img, feats = self.img, self.feats
        out = feats(img)
        content_loss = F.mse_loss(out[feats.content_index], self.content_target)
        style_loss = img.new_zeros(())
        for k, index in enumerate(feats.style_indices):
            target = self.style_targets[k]
            style_loss = style_loss + self.layer_weights[k] * F.mse_loss(gram(out[index]), target)
        tv_loss = total_variation(img) if self.params.tv_weight > 0 else img.new_zeros(())
        return content_loss, style_loss, tv_loss


def _optimise(evaluate: _Evaluations, img: torch.Tensor, params: StyleParams) -> None:
    """params.iterations evaluations of L-BFGS or Adam; a non-finite loss ends the run early (the best
    finite image so far is kept)."""
    cap = params.iterations
    try:
        if params.optimizer == "lbfgs":
            # One step call runs the whole optimisation: max_eval bounds the closure evaluations.
            # The tolerances are 0 because torch's defaults are absolute: the mean-normalized
            # losses have per-pixel gradients that shrink with the image area, and at a few hundred
            # pixels a side L-BFGS would "converge" after one evaluation. The evaluation cap is
            # the stop; an exactly zero gradient (nothing to do) still ends it at once.
            lbfgs = torch.optim.LBFGS(
                [img],
                lr=params.lr,
                max_iter=cap,
                max_eval=cap,
                tolerance_grad=0.0,
                tolerance_change=0.0,
                history_size=params.lbfgs_history,
            )
            lbfgs.step(evaluate)  # type: ignore[no-untyped-call]
        else:
            adam = torch.optim.Adam([img], lr=params.lr)
            for _ in range(cap):
                evaluate()
                adam.step()
    except _Diverged:
        pass  # a non-finite loss: keep the best finite image so far


__all__ = [
    "StyleOutput",
    "StyleProgress",
    "gram",
    "keep_original_colors",
    "rgb_to_yiq",
    "stylize",
    "vgg_layer_names",
    "yiq_to_rgb",
]
