"""Guided backprop / Guided Grad-CAM: the guided rule on every ReLU call, model hygiene, and two
behavioural oracles (class-insensitivity on a random VGG-19, stroke focus on a trained LeNet-5)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from export.models import build
from export.preprocessing import DIGITS, IMAGENET, Preprocessing, resize_and_crop, to_tensor
from service.errors import Cancelled, InvalidArgument
from service.worker.guided_backprop import _Switch, explain, guided_relus
from service.worker.handlers import handle
from service.worker.jobs import ExplainJob, ExplainResult, ProgressUpdate
from service.worker.loading import LoadedModels, TorchModel
from service.worker.params import Limits


def scene(size: int) -> Image.Image:
    """A deterministic picture with edges, flat regions and colours (no natural images offline)."""
    im = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(im)
    for y in range(size):
        d.line([(0, y), (size, y)], fill=(int(40 + 100 * y / size), 90, int(200 - 120 * y / size)))
    d.ellipse([size * 0.1, size * 0.15, size * 0.55, size * 0.6], fill=(230, 200, 40))
    d.rectangle([size * 0.5, size * 0.5, size * 0.9, size * 0.85], fill=(200, 30, 30))
    d.polygon(
        [(size * 0.2, size * 0.9), (size * 0.45, size * 0.6), (size * 0.6, size * 0.95)], fill=(20, 160, 60)
    )
    d.line([(0, size * 0.3), (size, size * 0.75)], fill=(250, 250, 250), width=max(1, size // 40))
    return im


def imagenet_input(size: int) -> torch.Tensor:
    p = Preprocessing(color_mode="RGB", resize=size, crop=size, mean=IMAGENET.mean, std=IMAGENET.std)
    return torch.from_numpy(to_tensor(scene(size), p))[None]


def small_net(inplace: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(inplace=inplace),
        nn.Linear(32, 7),
    ).eval()


class SharedReLUNet(nn.Module):
    """One ReLU module applied twice in a forward (what guided backprop must still handle)."""

    def __init__(self, shared: bool, inplace: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.relu2 = self.relu if shared else nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu2(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def relu_input_grads(model: nn.Module, run: Callable[[], object]) -> list[torch.Tensor]:
    """Run `run()` and return the gradient that reached each ReLU call's input, one per call.

    A pre-hook hands the ReLU a private copy of its input and hooks that copy, so the captured gradient
    is exactly what left the ReLU (for in-place ReLUs too: the hook sees the pre-modification value).
    """
    captured: list[torch.Tensor] = []

    def pre(m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        own = inputs[0].clone()
        own.register_hook(lambda g: captured.append(g.detach().clone()))
        return (own,)

    handles = [m.register_forward_pre_hook(pre) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return captured


def all_hooks_empty(model: nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
        for m in model.modules()
    )


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# --------------------------------------------------------------------------------------------------
# The guided rule


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_every_gradient_leaving_a_relu_is_non_negative(inplace: bool) -> None:
    model = small_net(inplace)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    guided = relu_input_grads(model, lambda: explain(model, x, method="guided_backprop"))
    plain = relu_input_grads(model, lambda: explain(model, x, method="gradient"))
    assert len(guided) == len(plain) == 4
    for g in guided:
        assert g.min() >= 0
        assert g.max() > 0  # the signal did get through
    # ...while ordinary backprop sends negative gradients through the same ReLUs (so the check bites)
    assert all(p.min() < 0 for p in plain)


def test_guided_rule_on_random_vgg19() -> None:
    model = build("vgg19")
    x = imagenet_input(48)
    grads = relu_input_grads(model, lambda: explain(model, x, [0]))
    assert len(grads) == 18  # 16 convolutional + 2 fully connected ReLUs
    assert all(g.min() >= 0 for g in grads)


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_a_relu_module_reused_twice_gets_the_rule_on_both_calls(inplace: bool) -> None:
    torch.manual_seed(3)
    shared = SharedReLUNet(shared=True, inplace=inplace).eval()
    separate = SharedReLUNet(shared=False).eval()
    separate.load_state_dict(shared.state_dict())
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(4))

    grads = relu_input_grads(shared, lambda: explain(shared, x))
    assert len(grads) == 2  # one capture per call of the single module
    assert all(g.min() >= 0 and g.max() > 0 for g in grads)
    np.testing.assert_array_equal(explain(shared, x).saliency, explain(separate, x).saliency)


def test_inplace_and_out_of_place_relus_give_identical_maps() -> None:
    a, b = small_net(inplace=False), small_net(inplace=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    for method in ("guided_backprop", "guided_gradcam"):
        # Grad-CAM at the last conv's ReLU: in-place there, so the feature map itself was overwritten.
        ea = explain(a, x, method=method, cam_layer="6" if method == "guided_gradcam" else None)
        eb = explain(b, x, method=method, cam_layer="6" if method == "guided_gradcam" else None)
        assert np.abs(ea.saliency).max() > 0
        np.testing.assert_array_equal(ea.saliency, eb.saliency)


def test_without_relus_guided_equals_the_plain_gradient() -> None:
    torch.manual_seed(0)
    lenet = build("lenet5")  # tanh throughout
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    e = explain(lenet, x, method="guided_backprop", plain_gradient=True)
    assert e.plain is not None and np.abs(e.plain).max() > 0
    np.testing.assert_array_equal(e.saliency, e.plain)


def test_plain_gradient_is_the_autograd_input_gradient() -> None:
    model = small_net()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    targets = [1, 4]
    e = explain(model, x, targets, method="gradient")
    xr = x.clone().requires_grad_(True)
    model(xr)[torch.arange(2), torch.tensor(targets)].sum().backward()
    np.testing.assert_allclose(e.saliency, xr.grad.numpy(), rtol=1e-5, atol=1e-8)
    assert e.plain is not None
    np.testing.assert_array_equal(e.plain, e.saliency)
    for p in model.parameters():  # the reference backward above filled these; clear for hygiene
        p.grad = None


def test_batched_maps_equal_per_sample_maps() -> None:
    model = small_net()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    for method in ("guided_backprop", "guided_gradcam", "gradient"):
        batched = explain(model, x, [0, 3, 3, 6], method=method)
        for i, t in enumerate([0, 3, 3, 6]):
            single = explain(model, x[i : i + 1], [t], method=method)
            np.testing.assert_allclose(batched.saliency[i], single.saliency[0], rtol=1e-4, atol=1e-9)
            assert batched.probabilities[i] == pytest.approx(single.probabilities[0], rel=1e-5)


def test_default_target_is_the_predicted_class() -> None:
    model = small_net()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits = model(x)
    e = explain(model, x)
    np.testing.assert_array_equal(e.classes, logits.argmax(1).numpy())
    np.testing.assert_array_equal(e.predicted, e.classes)
    np.testing.assert_allclose(e.probabilities, torch.softmax(logits, 1).max(1).values.numpy(), rtol=1e-5)
    explicit = explain(model, x, e.classes.tolist())
    np.testing.assert_array_equal(explicit.saliency, e.saliency)


def test_the_predicted_class_comes_with_its_probability_whatever_the_target() -> None:
    model = small_net()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        softmax = torch.softmax(model(x), 1)
    targets = [(int(c) + 1) % 7 for c in softmax.argmax(1)]  # never the top-1
    e = explain(model, x, targets)
    np.testing.assert_allclose(e.predicted_probabilities, softmax.max(1).values.numpy(), rtol=1e-5)
    np.testing.assert_allclose(e.probabilities, softmax[torch.arange(4), targets].numpy(), rtol=1e-5)
    assert (e.predicted_probabilities > e.probabilities).all()


# --------------------------------------------------------------------------------------------------
# Model hygiene


def test_forward_output_is_unchanged_while_the_hooks_are_on() -> None:
    model = small_net()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        before = model(x)
    switch = _Switch()
    switch.on = True
    with guided_relus(model, switch) as hooked:
        assert hooked == 4
        during = model(x.clone().requires_grad_(True)).detach()
    np.testing.assert_array_equal(before.numpy(), during.numpy())


def test_the_model_is_left_exactly_as_it_was() -> None:
    model = small_net(inplace=True)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # A mixed starting state that a blanket model.train()/requires_grad_() would not restore.
    model[0].requires_grad_(False)
    model.train()
    model[9].eval()
    flags = [(m, m.training) for m in model.modules()]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    for method in ("guided_backprop", "guided_gradcam", "gradient"):
        explain(model, x, method=method, plain_gradient=True)
    assert all_hooks_empty(model)
    assert all(m.training == flag for m, flag in flags)
    assert [p.requires_grad for p in model.parameters()] == [False, False] + [True] * 8
    assert all(p.grad is None for p in model.parameters())  # no weight gradient was ever computed
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, params[k], rtol=0, atol=0)


def test_hooks_are_removed_when_explain_fails_midway() -> None:
    model = small_net()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(InvalidArgument, match="out of range"):
        explain(model, x, [7], method="guided_gradcam")  # raised after the hooked forward pass
    assert all_hooks_empty(model)
    assert all(p.requires_grad for p in model.parameters())


def test_invalid_arguments() -> None:
    model = small_net()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(InvalidArgument, match="target class -1 is out of range; the model has 7 classes"):
        explain(model, x, [0, -1])
    with pytest.raises(InvalidArgument, match="2 targets for 1 inputs"):
        explain(model, x[:1], [0, 1])
    with pytest.raises(InvalidArgument, match="unknown explain method"):
        explain(model, x, method="lime")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="no layer 'features.99'"):
        explain(model, x, method="guided_gradcam", cam_layer="features.99")


# --------------------------------------------------------------------------------------------------
# Guided Grad-CAM


def test_guided_gradcam_is_guided_backprop_times_the_upsampled_cam() -> None:
    model = build("vgg19")
    x = imagenet_input(64)
    gb = explain(model, x, [5], method="guided_backprop")
    gc = explain(model, x, [5], method="guided_gradcam")
    assert gc.cam_layer == "avgpool"  # its input is the last conv feature map (features[-1])
    assert gc.cam is not None and gc.cam.shape == (1, 64, 64)
    assert gc.cam.min() >= 0 and gc.cam.max() == pytest.approx(1.0)
    np.testing.assert_allclose(gc.saliency, gb.saliency * gc.cam[:, None], rtol=1e-5, atol=1e-12)
    named = explain(model, x, [5], method="guided_gradcam", cam_layer="features.36")
    assert named.cam_layer == "features.36"
    np.testing.assert_allclose(named.cam, gc.cam, rtol=1e-5, atol=1e-6)  # the same tensor, named

    alone = explain(model, x, [5], method="gradcam")  # the heatmap by itself, no guided pass
    assert alone.saliency.shape == (1, 1, 64, 64) and alone.cam_layer == "avgpool"
    np.testing.assert_allclose(alone.saliency[:, 0], gc.cam, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(alone.cam, alone.saliency[:, 0])
    assert alone.plain is None and alone.probabilities == pytest.approx(gc.probabilities)


# --------------------------------------------------------------------------------------------------
# Behavioural oracles


def test_random_vgg19_guided_maps_are_class_insensitive_but_plain_gradients_are_not() -> None:
    """Guided backprop mostly reconstructs the image (Nie et al. 2018; Adebayo et al. 2018): even with
    random weights, the maps for two different classes are nearly the same picture, whereas plain
    gradients for two classes differ. Measured at 112 px: guided ~0.9999, plain ~0.07."""
    torch.manual_seed(0)
    model = build("vgg19")
    x = imagenet_input(112)
    a = explain(model, x, [3], plain_gradient=True)
    b = explain(model, x, [700], plain_gradient=True)
    assert a.plain is not None and b.plain is not None
    guided_corr, plain_corr = corr(a.saliency, b.saliency), corr(a.plain, b.plain)
    assert guided_corr >= 0.9, guided_corr
    assert plain_corr <= 0.5, plain_corr


def _digits() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The UCI digits as LeNet-5 inputs (the DIGITS transform) and their ink (32x32 grey in [0, 1])."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)
    x = np.stack([to_tensor(Image.fromarray(i), DIGITS) for i in images])
    ink = np.stack(
        [np.asarray(resize_and_crop(Image.fromarray(i), DIGITS), dtype=np.float32) / 255 for i in images]
    )
    return torch.from_numpy(x), torch.from_numpy(data.target.astype(np.int64)), ink


def _train_lenet(x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    model = build("lenet5")
    generator = torch.Generator().manual_seed(0)
    steps = epochs * ((len(x) + 31) // 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 32):
            batch = order[i : i + 32]
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def test_trained_lenet5_maps_concentrate_on_the_strokes() -> None:
    """Most of the map's mass lies on the digit's strokes, and training is what puts it there.

    LeNet-5 uses tanh, so guided backprop is the plain gradient here. Strokes: rendered ink > 0.25
    (about 46% of the pixels). Measured: trained ~0.63 of the mass on strokes, the same network with
    random weights ~0.55 (its unpadded convolutions favour the centre, where digits are).
    """
    x, y, ink = _digits()
    train, held_out = slice(0, 1400), slice(1400, 1464)
    trained = _train_lenet(x[train], y[train], epochs=10)
    with torch.no_grad():
        accuracy = float((trained(x[1400:]).argmax(1) == y[1400:]).float().mean())
    assert accuracy > 0.85
    torch.manual_seed(1)
    untrained = build("lenet5")

    strokes = ink[held_out] > 0.25

    def mass_on_strokes(model: nn.Module) -> float:
        mass = np.abs(explain(model, x[held_out], y[held_out].tolist()).saliency[:, 0])
        return float(((mass * strokes).sum((1, 2)) / mass.sum((1, 2))).mean())

    on_strokes, control = mass_on_strokes(trained), mass_on_strokes(untrained)
    assert on_strokes > 0.5, on_strokes
    assert on_strokes > strokes.mean() + 0.1, (on_strokes, strokes.mean())
    assert on_strokes > control + 0.04, (on_strokes, control)


def test_explain_does_not_touch_a_deep_copy() -> None:
    """explain mutates nothing observable: a deep copy taken before behaves identically after."""
    model = small_net()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(12))
    explain(model, x, method="guided_gradcam", plain_gradient=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Stopping a batch: deadlines and cancellation reach the middle of the forward and backward passes

SMALL_NET_LEAVES = 12  # small_net's modules, each checking once per pass


class StopAfter:
    """A should_stop() that turns true after `n` checks (never when n is None), counting every check."""

    def __init__(self, n: int | None = None) -> None:
        self.n = n
        self.checks = 0
        self.updates: list[object] = []

    def __call__(self) -> bool:
        return self.should_stop()

    def should_stop(self) -> bool:  # the JobContext side, for handlers.handle
        self.checks += 1
        return self.n is not None and self.checks > self.n

    def progress(self, update: object) -> None:
        self.updates.append(update)

    def report(self, payload: object) -> None:
        pass


@pytest.mark.parametrize(
    ("method", "backward_passes"),
    [("guided_backprop", 1), ("guided_gradcam", 2), ("gradcam", 1), ("gradient", 1)],
)
def test_should_stop_is_checked_at_every_layer_of_every_pass(method: str, backward_passes: int) -> None:
    model = small_net()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    never = StopAfter()
    watched = explain(model, x, method=method, should_stop=never)  # type: ignore[arg-type]
    assert never.checks == SMALL_NET_LEAVES * (1 + backward_passes)
    reference = explain(model, x, method=method)  # type: ignore[arg-type]
    np.testing.assert_array_equal(watched.saliency, reference.saliency)  # the checks change nothing
    assert all_hooks_empty(model)


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
@pytest.mark.parametrize(
    ("stop_after", "phase"), [(0, "forward"), (5, "forward"), (SMALL_NET_LEAVES + 3, "backward")]
)
def test_a_stop_ends_the_batch_within_one_layer(inplace: bool, stop_after: int, phase: str) -> None:
    model = small_net(inplace=inplace)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    stop = StopAfter(stop_after)
    with pytest.raises(Cancelled, match=f"during the {phase} pass") as info:
        explain(model, x, method="guided_backprop", should_stop=stop)
    assert info.value.reason == "stopped"
    assert stop.checks == stop_after + 1  # raised at the first check that saw the stop
    assert all_hooks_empty(model)  # and the model is left as it came
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def _toy_models() -> LoadedModels:
    toy = TorchModel(
        name="toy",
        version=1,
        architecture="custom",
        module=small_net(),
        num_classes=7,
        input_shape=(3, 16, 16),
        preprocessing=Preprocessing(
            color_mode="RGB", resize=16, crop=16, mean=IMAGENET.mean, std=IMAGENET.std
        ),
        capabilities={"classify": True, "explain": True},
    )
    return LoadedModels(models={("toy", 1): toy}, device="cpu", limits=Limits(max_batch=8))


def test_explain_job_counts_its_images_as_steps_and_stops_within_one_layer() -> None:
    """The Explain job path (handlers.handle): a deadline or cancellation that lands in the middle of a
    batch stops it there, not after the whole batch; a finished batch reports its images as steps."""
    worker = _toy_models()
    inputs = np.random.default_rng(7).standard_normal((4, 3, 16, 16)).astype(np.float32)
    task = ExplainJob(model="toy", version=1, inputs=inputs, method="guided_gradcam", render=None)

    ctx = StopAfter()
    result = handle(worker, task, ctx)
    assert isinstance(result, ExplainResult) and result.saliency.shape == (4, 3, 16, 16)
    assert ctx.updates == [ProgressUpdate(kind="explain", step=4, total_steps=4, losses={})]
    full_pass = ctx.checks

    ctx = StopAfter(SMALL_NET_LEAVES // 2)  # halfway through the forward pass of the whole batch
    with pytest.raises(Cancelled, match="during the forward pass"):
        handle(worker, task, ctx)
    assert ctx.checks == SMALL_NET_LEAVES // 2 + 1 < full_pass and ctx.updates == []
    assert all_hooks_empty(worker.models[("toy", 1)].module)
