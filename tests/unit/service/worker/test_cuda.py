"""The gradient jobs on a CUDA device agree with the same jobs on the CPU (marked `gpu`: never in
`make test`; run with `pytest -m gpu` on a machine whose torch sees a GPU).

The gradient process state is loaded twice from the same repository versions, once with device="cuda" and
once with device="cpu"; every job kind runs on both with the same inputs and seeds.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from job_helpers import Ctx, picture, write_version
from test_style_transfer import scene, texture

from export.models import build
from service.worker.handlers import handle
from service.worker.jobs import DreamJob, ExplainJob, StylizeJob
from service.worker.loading import LoadedModels, TorchModel, load_models
from service.worker.params import DreamParams, Limits, StyleParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"),
]


@pytest.fixture(autouse=True)
def full_fp32() -> Iterator[None]:
    """TF32 convolutions and matmuls (on by default for cuDNN on Ampere and later) round to 10-bit
    mantissas: fine for serving, but these tests compare the devices' arithmetic, so use full fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModels]:
    root = tmp_path_factory.mktemp("repository")
    torch.manual_seed(0)
    versions = [
        write_version(root, "digits", 1, "lenet5", build("lenet5")),
        write_version(root, "inception", 1, "googlenet", build("googlenet")),
        write_version(root, "resnet", 1, "resnet18", build("resnet18")),
    ]
    limits = {"max_iterations": 50, "max_image_side": 256, "max_batch": 4}
    loaded = {}
    for device in ("cuda", "cpu"):
        config = {"models": [str(v) for v in versions], "device": device, "limits": limits}
        loaded[device] = load_models(pickle.loads(pickle.dumps(config)))
    return loaded


def test_models_load_on_the_gpu(states: dict[str, LoadedModels]) -> None:
    assert states["cuda"].device.startswith("cuda")
    for name in ("digits", "inception", "resnet"):  # built on first use, on the process's device
        assert next(states["cuda"].get(name, 1).module.parameters()).is_cuda
        assert not next(states["cpu"].get(name, 1).module.parameters()).is_cuda


@pytest.mark.parametrize("method", ["guided_backprop", "guided_gradcam"])
@pytest.mark.parametrize(("model", "shape"), [("digits", (2, 1, 32, 32)), ("resnet", (2, 3, 224, 224))])
def test_explain_on_cuda_matches_cpu(
    states: dict[str, LoadedModels], model: str, shape: tuple[int, ...], method: str
) -> None:
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    task = ExplainJob(model, 1, x, targets=(3, 5), plain_gradient=True, method=method)
    on_gpu, on_cpu = handle(states["cuda"], task, Ctx()), handle(states["cpu"], task, Ctx())
    np.testing.assert_array_equal(on_gpu.classes, on_cpu.classes)
    for a, b in ((on_gpu.saliency, on_cpu.saliency), (on_gpu.plain, on_cpu.plain)):
        assert a.shape == b.shape and a.dtype == np.float32
        corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert corr > 0.999, corr


def test_dream_on_cuda_raises_the_objective_like_cpu(states: dict[str, LoadedModels]) -> None:
    image = picture(128, 160)
    # ResNet's He init keeps activations O(1); the random GoogLeNet's 0.01-std init makes them vanish.
    task = DreamJob("resnet", 1, image, DreamParams(layers={"layer3": 1.0}, octaves=2, steps=4, seed=3))
    on_gpu, on_cpu = handle(states["cuda"], task, Ctx()), handle(states["cpu"], task, Ctx())
    assert on_gpu.image.shape == on_cpu.image.shape == (128, 160, 3)
    assert 0 <= on_gpu.image.min() and on_gpu.image.max() <= 1
    assert (
        on_gpu.objective_after > on_gpu.objective_before and on_cpu.objective_after > on_cpu.objective_before
    )
    assert on_gpu.objective_after == pytest.approx(on_cpu.objective_after, rel=0.05)
    # Same seed, same jitter: the two devices take the same steps up to float noise.
    assert np.abs(on_gpu.image - on_cpu.image).mean() < 0.02


def test_stylize_on_cuda_cuts_the_style_loss() -> None:
    torch.manual_seed(0)
    module = build("vgg19").cuda().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    from export.preprocessing import IMAGENET

    model = TorchModel("styles", 1, "vgg19", module, 1000, (3, 224, 224), IMAGENET, {"stylize": True})
    state = LoadedModels(models={("styles", 1): model}, device="cuda:0", limits=Limits(max_iterations=100))
    content, style = scene(128), texture(128)
    ctx = Ctx()
    result = handle(
        state, StylizeJob("styles", 1, content, (style,), params=StyleParams(iterations=100)), ctx
    )
    assert result.image.shape == (128, 128, 3)
    # The oracle: at least 80% of the style loss gone in 100 evaluations at 128 px.
    assert result.losses["style"] <= 0.2 * result.initial_losses["style"]


def test_loaded_models_on_cuda_survive_a_checkpoint_path(tmp_path: Path) -> None:
    """device="cuda" without a GPU would raise; here it must load and keep weights on the GPU."""
    torch.manual_seed(0)
    version = write_version(tmp_path, "digits", 1, "lenet5", build("lenet5"))
    state = load_models({"models": [str(version)], "device": "cuda", "limits": {}})
    assert next(state.get("digits", 1).module.parameters()).device.type == "cuda"
