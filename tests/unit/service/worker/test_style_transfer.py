"""Neural style transfer on a random-weight VGG-19 at CI sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from export.models import build
from export.preprocessing import IMAGENET
from service.errors import Cancelled, InvalidArgument
from service.worker.params import StyleParams
from service.worker.style_transfer import (
    StyleOutput,
    StyleProgress,
    gram,
    rgb_to_yiq,
    stylize,
    vgg_layer_names,
)


def scene(size: int) -> np.ndarray:
    im = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(im)
    for y in range(size):
        d.line([(0, y), (size, y)], fill=(int(40 + 100 * y / size), 90, int(200 - 120 * y / size)))
    d.ellipse([size * 0.1, size * 0.15, size * 0.55, size * 0.6], fill=(230, 200, 40))
    d.rectangle([size * 0.5, size * 0.5, size * 0.9, size * 0.85], fill=(200, 30, 30))
    return np.asarray(im, dtype=np.float32) / 255.0


def texture(size: int, seed: int = 0, hue: tuple[int, int, int] = (240, 120, 20)) -> np.ndarray:
    """A style image: diagonal stripes and rings."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), (20, 20, 60))
    d = ImageDraw.Draw(im)
    for i in range(0, size * 2, max(2, size // 10)):
        d.line([(i, 0), (i - size, size)], fill=hue, width=max(1, size // 32))
    for _ in range(12):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(size // 20 + 1, size // 6 + 1))
        d.ellipse([x - r, y - r, x + r, y + r], outline=(60, 200, 230), width=2)
    return np.asarray(im, dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def vgg() -> nn.Module:
    torch.manual_seed(0)
    return build("vgg19")


def run(model: nn.Module, content: np.ndarray, styles: list[np.ndarray], **kw: object) -> StyleOutput:
    blend = kw.pop("blend", None)
    progress = kw.pop("progress", None)
    should_stop = kw.pop("should_stop", None)
    return stylize(
        model,
        content,
        styles,
        StyleParams(**kw),  # type: ignore[arg-type]
        blend=blend,  # type: ignore[arg-type]
        mean=IMAGENET.mean,
        std=IMAGENET.std,
        progress=progress,  # type: ignore[arg-type]
        should_stop=should_stop,  # type: ignore[arg-type]
    )


def test_layer_names_follow_the_vgg19_convention(vgg: nn.Module) -> None:
    names = vgg_layer_names(vgg.features)
    assert (names["conv1_1"], names["relu1_1"], names["relu2_1"], names["relu3_1"]) == (0, 1, 6, 11)
    assert (names["relu4_1"], names["conv4_2"], names["relu4_2"], names["relu5_1"], names["pool5"]) == (
        20,
        21,
        22,
        29,
        36,
    )


def test_lbfgs_cuts_the_style_loss_by_80_percent_in_100_evaluations(vgg: nn.Module) -> None:
    """128 px, defaults (content 1, style 1e6, L-BFGS from the content image). Measured: -98.6%."""
    out = run(vgg, scene(128), [texture(128)], iterations=100)
    assert out.iterations == 100  # the cap counts objective evaluations, exactly
    reduction = 1 - out.losses["style"] / out.initial_losses["style"]
    assert reduction >= 0.8, reduction
    assert out.image.shape == (128, 128, 3) and out.image.min() >= 0 and out.image.max() <= 1
    # the returned image is the best evaluated one
    assert out.losses["total"] == pytest.approx(min(out.history))
    assert out.history[out.best_iteration - 1] == pytest.approx(out.losses["total"])


def test_lbfgs_runs_every_evaluation_even_when_the_gradients_are_small(vgg: nn.Module) -> None:
    """Regression: torch's absolute default tolerances stopped L-BFGS after one evaluation when the
    content and style are alike at 256 px (per-pixel gradients below 1e-7 with mean-normalized losses)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:256] / 256
    smooth = np.stack([x, y, 0.5 + 0.5 * np.sin(8 * x * y)], axis=2)
    content, style = (
        np.clip(smooth + 0.05 * rng.standard_normal(smooth.shape), 0, 1).astype(np.float32) for _ in "ab"
    )
    out = run(vgg, content, [style], iterations=3)
    assert out.iterations == 3
    assert out.losses["style"] < out.initial_losses["style"]


def test_the_returned_image_really_has_the_reported_loss(vgg: nn.Module) -> None:
    content, style = scene(64), texture(64)
    out = run(vgg, content, [style], iterations=30)
    # Re-evaluate the returned image on its own: starting from it, the first evaluation is its loss.
    again = run(vgg, content, [style], iterations=1, init="content")
    assert again.initial_losses["style"] > out.losses["style"]
    check = stylize(
        vgg,
        out.image,
        [style],
        StyleParams(iterations=1, content_weight=0.0),
        mean=IMAGENET.mean,
        std=IMAGENET.std,
    )
    assert check.initial_losses["style"] == pytest.approx(out.losses["style"], rel=1e-4)


def test_adam_also_reduces_the_style_loss(vgg: nn.Module) -> None:
    out = run(vgg, scene(64), [texture(64)], iterations=40, optimizer="adam")
    assert out.iterations == 40
    assert out.losses["style"] < 0.5 * out.initial_losses["style"]


def test_blend_weights_one_and_zero_equal_the_single_style(vgg: nn.Module) -> None:
    content, first, second = scene(64), texture(64, 0), texture(64, 1, hue=(30, 220, 60))
    single = run(vgg, content, [first], iterations=8)
    blended = run(vgg, content, [first, second], iterations=8, blend=(1.0, 0.0))
    np.testing.assert_array_equal(single.image, blended.image)
    other = run(vgg, content, [first, second], iterations=8, blend=(0.5, 0.5))
    assert not np.array_equal(single.image, other.image)


def test_blended_targets_are_the_weighted_mean_of_the_grams(vgg: nn.Module) -> None:
    """A 3:1 blend sits between the two styles: its style loss against each pure style target is
    lower than the other pure style's."""
    content, first, second = scene(64), texture(64, 0), texture(64, 1, hue=(30, 220, 60))
    a = run(vgg, content, [first], iterations=1)
    b = run(vgg, content, [second], iterations=1)
    mix = run(vgg, content, [first, second], iterations=1, blend=(3.0, 1.0))
    # style loss is quadratic in the target; with the same start image, the mixture's loss lies between.
    lo, hi = sorted((a.initial_losses["style"], b.initial_losses["style"]))
    assert mix.initial_losses["style"] < hi
    assert mix.initial_losses["style"] != pytest.approx(lo, rel=1e-3)


def test_style_weight_zero_keeps_the_content_image(vgg: nn.Module) -> None:
    content = scene(64)
    out = run(vgg, content, [texture(64)], iterations=20, style_weight=0.0)
    np.testing.assert_array_equal(out.image, content)


def test_original_colors_keep_the_contents_chroma(vgg: nn.Module) -> None:
    content, style = scene(64), texture(64)
    plain = run(vgg, content, [style], iterations=15)
    kept = run(vgg, content, [style], iterations=15, original_colors=True)

    def yiq(a: np.ndarray) -> np.ndarray:
        return rgb_to_yiq(torch.from_numpy(a.transpose(2, 0, 1).copy())[None].double())[0].numpy()

    content_yiq, plain_yiq, kept_yiq = yiq(content), yiq(plain.image), yiq(kept.image)
    unclipped = ((kept.image > 1e-4) & (kept.image < 1 - 1e-4)).all(axis=2)
    assert unclipped.mean() > 0.5
    np.testing.assert_allclose(kept_yiq[1:, unclipped], content_yiq[1:, unclipped], atol=1e-5)
    np.testing.assert_allclose(kept_yiq[0, unclipped], plain_yiq[0, unclipped], atol=1e-5)
    # the plain transfer did change the chroma (so the comparison means something); with original
    # colours only pixels clipped back into the RGB cube differ (measured 0.18 vs 0.024 on average)
    plain_shift = np.abs(plain_yiq[1:] - content_yiq[1:]).mean()
    assert plain_shift > 0.05
    assert np.abs(kept_yiq[1:] - content_yiq[1:]).mean() < 0.5 * plain_shift


def test_no_weight_gradients_and_no_layers_beyond_relu5_1(vgg: nn.Module) -> None:
    ran: list[str] = []
    handles = [
        vgg.features[30].register_forward_hook(lambda m, i, o: ran.append("conv5_2")),
        vgg.classifier.register_forward_hook(lambda m, i, o: ran.append("classifier")),
        vgg.features[29].register_forward_hook(lambda m, i, o: ran.append("relu5_1")),
    ]
    try:
        run(vgg, scene(48), [texture(48)], iterations=3)
    finally:
        for h in handles:
            h.remove()
    assert "relu5_1" in ran and "conv5_2" not in ran and "classifier" not in ran
    assert all(p.grad is None and p.requires_grad for p in vgg.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vgg.modules())
    assert not vgg.training


def test_style_scale_resizes_the_style_images(vgg: nn.Module) -> None:
    sizes: list[tuple[int, int]] = []
    handle = vgg.features[0].register_forward_pre_hook(lambda m, i: sizes.append(tuple(i[0].shape[-2:])))
    try:
        run(vgg, scene(64), [texture(200)], iterations=1, style_scale=0.5)
        run(vgg, scene(100), [texture(64)], iterations=1, max_side=80)
    finally:
        handle.remove()
    # content target, style target, one evaluation; then the same with max_side
    assert sizes == [(64, 64), (32, 32), (64, 64), (80, 80), (80, 80), (80, 80)]


def test_noise_init_is_seeded(vgg: nn.Module) -> None:
    a = run(vgg, scene(48), [texture(48)], iterations=3, init="noise", seed=3)
    b = run(vgg, scene(48), [texture(48)], iterations=3, init="noise", seed=3)
    c = run(vgg, scene(48), [texture(48)], iterations=3, init="noise", seed=4)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)


def test_progress_and_should_stop(vgg: nn.Module) -> None:
    updates: list[StyleProgress] = []
    run(vgg, scene(48), [texture(48)], iterations=6, preview_every=3, progress=updates.append)
    assert [u.step for u in updates] == [1, 2, 3, 4, 5, 6]
    assert all(set(u.losses) == {"content", "style", "tv", "total", "best"} for u in updates)
    assert [u.step for u in updates if u.preview is not None] == [3, 6]
    assert updates[-1].losses["best"] == min(u.losses["total"] for u in updates)

    calls = {"n": 0}

    def stop_after_four() -> bool:
        calls["n"] += 1
        return calls["n"] > 4

    with pytest.raises(Cancelled, match="after 4 of 50 iterations"):
        run(vgg, scene(48), [texture(48)], iterations=50, should_stop=stop_after_four)
    assert all(p.requires_grad for p in vgg.parameters())


def test_total_variation_smooths(vgg: nn.Module) -> None:
    content, style = scene(48), texture(48)
    rough = run(vgg, content, [style], iterations=15)
    smooth = run(vgg, content, [style], iterations=15, tv_weight=1e3)

    def tv(a: np.ndarray) -> float:
        return float(np.square(np.diff(a, axis=0)).mean() + np.square(np.diff(a, axis=1)).mean())

    assert smooth.losses["tv"] > 0 and rough.losses["tv"] == 0
    assert tv(smooth.image) < tv(rough.image)


def test_invalid_arguments(vgg: nn.Module) -> None:
    with pytest.raises(InvalidArgument, match="VGG-19 has no layer 'relu6_1'"):
        run(vgg, scene(48), [texture(48)], iterations=1, style_layers=("relu1_1", "relu6_1"))
    with pytest.raises(InvalidArgument, match="blend weight"):
        run(vgg, scene(48), [texture(48), texture(48)], iterations=1, blend=(0.0, 0.0))
    with pytest.raises(InvalidArgument, match="needs a VGG-style model"):
        torch.manual_seed(0)
        run(build("resnet18"), scene(48), [texture(48)], iterations=1)
    with pytest.raises(InvalidArgument, match="iterations"):
        StyleParams(iterations=0)


def test_gram_is_size_normalized() -> None:
    f = torch.rand(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    tiled = f.repeat(1, 1, 2, 2)  # the same statistics on four times the area
    torch.testing.assert_close(gram(f), gram(tiled))


def test_gram_gradient_is_autograds_gradient_of_the_plain_product() -> None:
    """gram's hand-written backward ((g + g.T) @ m, one matmul) is the exact gradient of m @ m.T."""
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(1, 6, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randn(6, 6, dtype=torch.float64, generator=gen)
    weights = torch.randn(6, 6, dtype=torch.float64, generator=gen)  # a non-symmetric upstream gradient

    def plain(x: torch.Tensor) -> torch.Tensor:
        m = x.reshape(6, 35)
        return (m @ m.t()) / (6 * 35)

    for loss in (lambda g: ((g - target) ** 2).mean(), lambda g: (weights * g).sum()):
        (ours,) = torch.autograd.grad(loss(gram(f)), [f])
        (reference,) = torch.autograd.grad(loss(plain(f)), [f])
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(gram, (f,))
