"""The job interface the worker pool calls: loading model versions, validation against the caps, cost,
dispatch to the algorithms with progress and cancellation, picklability, and the PNG rendering."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from export.models import build
from export.preprocessing import DIGITS, IMAGENET
from service.errors import Cancelled, InvalidArgument, NotFound
from service.settings import Settings
from service.worker import rendering
from service.worker.tasks import (
    DreamParams,
    DreamResult,
    DreamTask,
    ExplainResult,
    ExplainTask,
    Limits,
    ProgressUpdate,
    StyleParams,
    StylizeResult,
    StylizeTask,
    TorchModel,
    WorkerState,
    estimate_cost,
    handle,
    load_models,
    validate_task,
    worker_config,
)

REPO_ROOT = Path(__file__).resolve().parents[4]


class Ctx:
    """A JobContext as the pool provides it: records progress, stops after `stop_after` checks."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.updates: list[ProgressUpdate] = []
        self.checks = 0
        self.stop_after = stop_after

    def should_stop(self) -> bool:
        self.checks += 1
        return self.stop_after is not None and self.checks > self.stop_after

    def progress(self, update: Any) -> None:
        self.updates.append(update)


def write_version(root: Path, name: str, version: int, arch: str, model: torch.nn.Module) -> Path:
    """A repository version as `python -m export` writes it for an in-memory model (model.onnx,
    weights.pt and a schema-1 metadata.json), so the workers' parity self-test has the ONNX model to
    check against. One change: every version offers explain and dream (metadata.json is not hashed),
    so the jobs' plain-gradient path is tested on LeNet-5 too, which has no ReLU to guide."""
    from export.onnx_export import export_to_repository

    path = export_to_repository(arch, root, model=model, name=name, version=version).version.path
    meta = json.loads((path / "metadata.json").read_text())
    meta["capabilities"].update(explain=True, dream=True)
    (path / "metadata.json").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repository")
    torch.manual_seed(0)
    lenet_v1, lenet_v2, googlenet = build("lenet5"), build("lenet5"), build("googlenet")
    return {
        "lenet_v1": write_version(root, "digits", 1, "lenet5", lenet_v1),
        "lenet_v2": write_version(root, "digits", 2, "lenet5", lenet_v2),
        "googlenet": write_version(root, "inception", 1, "googlenet", googlenet),
        "root": root,
    }


@pytest.fixture(scope="module")
def state(repository: dict[str, Path]) -> WorkerState:
    config = {
        "models": [str(repository[k]) for k in ("lenet_v1", "lenet_v2", "googlenet")],
        "device": "cpu",
        "torch_threads": 0,
        "limits": {"max_iterations": 50, "max_image_side": 128, "max_batch": 4},
    }
    return load_models(pickle.loads(pickle.dumps(config)))


@pytest.fixture(scope="module")
def vgg_state() -> WorkerState:
    torch.manual_seed(0)
    module = build("vgg19")
    for p in module.parameters():
        p.requires_grad_(False)
    model = TorchModel("styles", 1, "vgg19", module, 1000, (3, 224, 224), IMAGENET, {"stylize": True})
    return WorkerState(models={("styles", 1): model}, device="cpu", limits=Limits(max_iterations=20))


def digits(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 1, 32, 32)).astype(np.float32)


def picture(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x / w, y / h, ((x // 8 + y // 8) % 2) * 0.8], axis=2).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Loading


def test_load_models_loads_every_version_with_its_weights(
    repository: dict[str, Path], state: WorkerState
) -> None:
    assert sorted(state.models) == [("digits", 1), ("digits", 2), ("inception", 1)]
    assert state.device == "cpu"
    assert state.limits == Limits(max_iterations=50, max_image_side=128, max_batch=4)
    loaded = state.get("digits", 1)
    assert loaded.architecture == "lenet5" and loaded.num_classes == 10 and loaded.input_shape == (1, 32, 32)
    assert loaded.preprocessing == DIGITS
    saved = torch.load(repository["lenet_v1"] / "weights.pt", weights_only=True)
    for k, v in loaded.module.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    assert not loaded.module.training
    assert all(not p.requires_grad for p in loaded.module.parameters())
    assert state.get("digits", 0).version == 2  # 0 = latest loaded
    with pytest.raises(NotFound, match="'digits' version 3"):
        state.get("digits", 3)
    with pytest.raises(NotFound, match="'nope'"):
        state.get("nope", 0)


def test_load_models_refuses_weights_that_do_not_match_their_checksum(tmp_path: Path) -> None:
    torch.manual_seed(0)
    directory = write_version(tmp_path, "digits", 1, "lenet5", build("lenet5"))
    meta = json.loads((directory / "metadata.json").read_text())
    meta["files"]["weights.pt"]["sha256"] = "0" * 64
    (directory / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match=r"weights\.pt sha256 .* differs from metadata\.json's"):
        load_models({"models": [str(directory)], "device": "cpu"})
    del meta["files"]["weights.pt"]["sha256"]
    (directory / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match=r"files\['weights\.pt'\] must be"):
        load_models({"models": [str(directory)], "device": "cpu"})


def test_worker_config_comes_from_the_settings(repository: dict[str, Path]) -> None:
    settings = Settings(
        repository=repository["root"],
        device="cpu",
        workers=2,
        torch_threads=1,
        max_task_iterations=77,
        max_task_image_side=96,
        max_task_batch=3,
        worker_nice=4,
    )
    config = worker_config(settings, [repository["lenet_v1"]])
    assert config["torch_threads"] == 1 and config["device"] == "cpu" and config["nice"] == 4
    config["nice"] = 0  # in this process: the rest of the test session must not be reniced
    loaded = load_models(pickle.loads(pickle.dumps(config)))
    assert loaded.limits == Limits(max_iterations=77, max_image_side=96, max_batch=3)
    assert Limits.from_settings(settings) == loaded.limits
    assert list(loaded.models) == [("digits", 1)]


def test_a_worker_lowers_its_cpu_priority_by_nice() -> None:
    """Gradient workers run below the server (settings.worker_nice, default 10), so classification
    threads win where they share cores. A child process: renicing is for the rest of its life."""
    code = (
        "import os; from service.worker.tasks import load_models; before = os.nice(0); "
        "load_models({'models': [], 'device': 'cpu', 'nice': 7}); print(os.nice(0) - before)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "7"
    assert Settings().worker_nice == 10


def test_the_task_module_does_not_import_torch() -> None:
    """The serving process builds and prices tasks without loading PyTorch."""
    code = "import sys, service.worker.tasks, service.worker.rendering; sys.exit('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# --------------------------------------------------------------------------------------------------
# Explain


def test_explain_job(state: WorkerState) -> None:
    x = digits(3)
    result = handle(state, ExplainTask("digits", 0, x, targets=(1, 2, 3), plain_gradient=True), Ctx())
    assert isinstance(result, ExplainResult)
    assert (result.model, result.version) == ("digits", 2)
    assert result.saliency.shape == (3, 1, 32, 32) and result.saliency.dtype == np.float32
    assert result.plain is not None and result.cam is None
    np.testing.assert_array_equal(result.classes, [1, 2, 3])
    assert len(result.pngs) == 3
    picture_ = rendering.decode_png(result.pngs[0])
    assert picture_.shape == (32, 32)
    np.testing.assert_array_equal(
        picture_, rendering.to_uint8(rendering.saliency_to_image(result.saliency[0]))[:, :, 0]
    )
    assert result.seconds > 0
    # the worker's own model gives the same map as calling the algorithm directly
    from service.worker.guided_backprop import explain

    direct = explain(state.get("digits", 2).module, torch.from_numpy(x), [1, 2, 3])
    np.testing.assert_array_equal(direct.saliency, result.saliency)


def test_explain_validation(state: WorkerState) -> None:
    with pytest.raises(InvalidArgument, match="target class 10 is out of range; the model has 10 classes"):
        handle(state, ExplainTask("digits", 1, digits(1), targets=(10,)), Ctx())
    with pytest.raises(InvalidArgument, match="5 inputs; the limit is max_task_batch=4"):
        handle(state, ExplainTask("digits", 1, digits(5)), Ctx())
    with pytest.raises(InvalidArgument, match=r"shape \(3, 32, 32\); model 'digits' takes \(1, 32, 32\)"):
        handle(state, ExplainTask("digits", 1, np.zeros((1, 3, 32, 32), np.float32)), Ctx())
    with pytest.raises(InvalidArgument, match="NaN or Inf"):
        handle(state, ExplainTask("digits", 1, np.full((1, 1, 32, 32), np.nan, np.float32)), Ctx())
    with pytest.raises(InvalidArgument, match="float \\(N, C, H, W\\) tensor"):
        handle(state, ExplainTask("digits", 1, np.zeros((32, 32), np.uint8)), Ctx())
    with pytest.raises(InvalidArgument, match="unknown explain method 'lime'"):
        handle(state, ExplainTask("digits", 1, digits(1), method="lime"), Ctx())
    with pytest.raises(InvalidArgument, match="unknown saliency rendering 'heatmap'"):
        handle(state, ExplainTask("digits", 1, digits(1), render="heatmap"), Ctx())  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        handle(state, ExplainTask("missing", 0, digits(1)), Ctx())


# --------------------------------------------------------------------------------------------------
# Dream


def test_dream_job_with_progress_and_previews(state: WorkerState) -> None:
    image = picture(64, 80)
    ctx = Ctx()
    task = DreamTask("inception", 1, image, DreamParams(octaves=2, steps=2, preview_every=2))
    result = handle(state, task, ctx)
    assert isinstance(result, DreamResult)
    assert result.layers == (("inception4c", 1.0),)  # GoogLeNet's default: the notebook's inception_4c
    assert result.image.shape == (64, 80, 3) and 0 <= result.image.min() and result.image.max() <= 1
    assert result.octave_sizes == ((64, 80), (46, 57)) and result.steps == 4
    assert result.objective_after > result.objective_before
    np.testing.assert_array_equal(rendering.decode_png(result.png), rendering.to_uint8(result.image))
    assert [(u.kind, u.step, u.total_steps, u.octave) for u in ctx.updates] == [
        ("dream", 1, 4, 1),
        ("dream", 2, 4, 1),
        ("dream", 3, 4, 2),
        ("dream", 4, 4, 2),
    ]
    previews = [rendering.decode_png(u.preview_png) for u in ctx.updates if u.preview_png is not None]
    assert [p.shape for p in previews] == [(46, 57, 3), (64, 80, 3)]
    # uint8 images are accepted as well and mean the same pixels
    again = handle(state, DreamTask("inception", 1, rendering.to_uint8(image), task.params), Ctx())
    assert again.image.shape == (64, 80, 3)


def test_dream_validation(state: WorkerState) -> None:
    with pytest.raises(
        InvalidArgument, match="64 steps \\(4 octaves x 16\\); the limit is max_task_iterations=50"
    ):
        handle(state, DreamTask("inception", 1, picture(128, 128), DreamParams(steps=16)), Ctx())
    with pytest.raises(InvalidArgument, match="160x64; its longer side exceeds max_task_image_side=128"):
        handle(state, DreamTask("inception", 1, picture(64, 160)), Ctx())
    with pytest.raises(InvalidArgument, match="both sides must be at least 32"):
        handle(state, DreamTask("inception", 1, picture(16, 64)), Ctx())
    with pytest.raises(InvalidArgument, match="values must lie in \\[0, 1\\]") as info:
        handle(state, DreamTask("inception", 1, picture(64, 64) * 255), Ctx())
    assert info.value.reason == "not_an_image"
    with pytest.raises(InvalidArgument, match="has 1 channel\\(s\\); model 'inception' takes 3"):
        handle(state, DreamTask("inception", 1, picture(64, 64)[:, :, 0]), Ctx())
    with pytest.raises(InvalidArgument, match="no layer 'inception9z'"):
        handle(
            state, DreamTask("inception", 1, picture(64, 64), DreamParams(layers={"inception9z": 1.0})), Ctx()
        )
    with pytest.raises(InvalidArgument, match="channel 600 is out of range"):
        params = DreamParams(
            layers={"inception4c": 1.0}, channels={"inception4c": (600,)}, octaves=1, steps=1
        )
        handle(state, DreamTask("inception", 1, picture(64, 64), params), Ctx())


def test_a_stopped_job_raises_cancelled(state: WorkerState) -> None:
    ctx = Ctx(stop_after=2)
    with pytest.raises(Cancelled, match="after 2 of"):
        handle(state, DreamTask("inception", 1, picture(64, 64), DreamParams(octaves=2, steps=5)), ctx)
    assert len(ctx.updates) == 2


# --------------------------------------------------------------------------------------------------
# Stylize


def test_stylize_job(vgg_state: WorkerState) -> None:
    ctx = Ctx()
    task = StylizeTask(
        "styles",
        1,
        picture(48, 56),
        (picture(40, 40)[:, ::-1].copy(), picture(64, 64).transpose(1, 0, 2).copy()),
        style_blend=(2.0, 1.0),
        params=StyleParams(iterations=4, preview_every=4),
    )
    result = handle(vgg_state, task, ctx)
    assert isinstance(result, StylizeResult)
    assert result.image.shape == (48, 56, 3) and result.iterations == 4
    assert result.losses["total"] <= result.initial_losses["total"]
    assert [u.step for u in ctx.updates] == [1, 2, 3, 4]
    assert ctx.updates[-1].preview_png is not None and set(ctx.updates[0].losses) >= {"style", "total"}
    np.testing.assert_array_equal(rendering.decode_png(result.png), rendering.to_uint8(result.image))


def test_stylize_validation(state: WorkerState, vgg_state: WorkerState) -> None:
    content, style = picture(48, 48), picture(48, 48)
    with pytest.raises(InvalidArgument, match="30 iterations; the limit is max_task_iterations=20"):
        handle(
            vgg_state, StylizeTask("styles", 1, content, (style,), params=StyleParams(iterations=30)), Ctx()
        )
    with pytest.raises(InvalidArgument, match="2 blend weights for 1 style images"):
        handle(vgg_state, StylizeTask("styles", 1, content, (style,), style_blend=(1.0, 1.0)), Ctx())
    with pytest.raises(InvalidArgument, match="at least one style image"):
        handle(vgg_state, StylizeTask("styles", 1, content, ()), Ctx())
    # metadata says this GoogLeNet version cannot stylize
    with pytest.raises(InvalidArgument, match="does not support stylize"):
        handle(state, StylizeTask("inception", 1, content, (style,), params=StyleParams(iterations=1)), Ctx())


# --------------------------------------------------------------------------------------------------
# Cost, validation without a model, pickling


def test_estimate_cost_in_pass_pixels() -> None:
    x = digits(4)
    assert estimate_cost(ExplainTask("m", 1, x)) == 4 * 32 * 32 * 2  # one forward + one backward
    assert estimate_cost(ExplainTask("m", 1, x, method="gradient")) == 4 * 32 * 32 * 2
    assert estimate_cost(ExplainTask("m", 1, x, plain_gradient=True)) == 4 * 32 * 32 * 3
    assert estimate_cost(ExplainTask("m", 1, x, method="guided_gradcam")) == 4 * 32 * 32 * 3
    assert estimate_cost(ExplainTask("m", 1, x, method="gradcam")) == 4 * 32 * 32 * 2

    octaves = [(96, 96), (69, 69), (49, 49), (35, 35)]  # the default 4 octaves at 1.4
    expected = sum(h * w for h, w in octaves) * 10 * 2 + 2 * 96 * 96
    assert estimate_cost(DreamTask("m", 1, picture(96, 96))) == expected
    # max_side shrinks the work, and the price with it
    assert estimate_cost(DreamTask("m", 1, picture(192, 192), DreamParams(max_side=96))) == expected

    stylize = StylizeTask("m", 1, picture(64, 64), (picture(100, 50),), params=StyleParams(iterations=100))
    assert estimate_cost(stylize) == 64 * 64 * 100 * 2 + 64 * 64 + 64 * 32
    big = StylizeTask("m", 1, picture(1000, 1000), (picture(100, 100),), params=StyleParams(iterations=10))
    assert estimate_cost(big) == 512 * 512 * 10 * 2 + 512 * 512 + 512 * 512  # max_side 512, style_scale 1


def test_validate_task_needs_no_model() -> None:
    limits = Limits(max_iterations=100, max_image_side=64, max_batch=2)
    validate_task(ExplainTask("m", 1, digits(2)), limits)
    validate_task(DreamTask("m", 1, picture(64, 64), DreamParams(octaves=2, steps=50)), limits)
    with pytest.raises(InvalidArgument, match="max_task_iterations=100"):
        validate_task(DreamTask("m", 1, picture(64, 64), DreamParams(octaves=2, steps=51)), limits)
    with pytest.raises(InvalidArgument, match="style_scale makes the style images 128x128"):
        validate_task(
            StylizeTask(
                "m",
                1,
                picture(64, 64),
                (picture(64, 64),),
                params=StyleParams(style_scale=2.0, iterations=10),
            ),
            limits,
        )
    with pytest.raises(InvalidArgument, match="stylize got 3 style images; the limit is max_task_batch=2"):
        validate_task(StylizeTask("m", 1, picture(64, 64), (picture(64, 64),) * 3), limits)


def test_params_reject_nonsense() -> None:
    with pytest.raises(InvalidArgument, match="steps must be at least 1"):
        DreamParams(steps=0)
    with pytest.raises(InvalidArgument, match="weight of layer 'a' must be a finite number"):
        DreamParams(layers={"a": float("nan")})
    with pytest.raises(InvalidArgument, match="channels given for layer 'b', which is not a target"):
        DreamParams(layers={"a": 1.0}, channels={"b": (1,)})
    with pytest.raises(InvalidArgument, match="style_weight must be a finite number >= 0"):
        StyleParams(style_weight=-1.0)
    with pytest.raises(InvalidArgument, match="2 style_layer_weights for 5 style layers"):
        StyleParams(style_layer_weights=(1.0, 2.0))


def test_tasks_results_and_updates_survive_pickling(state: WorkerState) -> None:
    task = DreamTask(
        "inception",
        1,
        picture(40, 40),
        DreamParams(layers={"inception3a": 2.0}, channels={"inception3a": (1, 2)}),
    )
    back = pickle.loads(pickle.dumps(task))
    assert back.params == task.params and back.model == task.model
    np.testing.assert_array_equal(back.image, task.image)
    result = handle(state, ExplainTask("digits", 1, digits(1), method="guided_gradcam"), Ctx())
    copy_ = pickle.loads(pickle.dumps(result))
    np.testing.assert_array_equal(copy_.saliency, result.saliency)
    assert copy_.cam is not None and copy_.pngs == result.pngs
    update = ProgressUpdate("dream", 1, 2, {"objective": 1.0}, octave=1, preview_png=b"x")
    assert pickle.loads(pickle.dumps(update)) == update


# --------------------------------------------------------------------------------------------------
# Rendering


def test_rendering_round_trips_and_validates() -> None:
    image = picture(20, 30)
    png = rendering.encode_png(image)
    np.testing.assert_array_equal(rendering.decode_png(png), rendering.to_uint8(image))
    assert rendering.to_float_image(rendering.to_uint8(image)).dtype == np.float32
    for bad, message in (
        (np.zeros((4, 4, 4), np.float32), "shape"),
        (np.zeros((4, 4, 3), np.int32), "dtype"),
        (np.full((4, 4), -0.5, np.float32), "values must lie"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            rendering.to_float_image(bad)

    saliency = np.zeros((3, 8, 8), np.float32)
    saliency[0, 2, 2] = 1.0
    saliency[1, 5, 5] = -1.0
    signed = rendering.saliency_to_image(saliency, "signed")
    assert signed.shape == (8, 8, 3)
    assert signed[2, 2, 0] > 0.5 > signed[5, 5, 1]  # positive above grey, negative below
    magnitude = rendering.saliency_to_image(saliency, "magnitude")
    assert magnitude.shape == (8, 8, 1) and magnitude[2, 2, 0] == magnitude[5, 5, 0] == 1.0
    assert (rendering.saliency_to_image(np.zeros((1, 4, 4)), "signed") == 0.5).all()
    assert rendering.decode_png(rendering.saliency_png(saliency)).shape == (8, 8, 3)
