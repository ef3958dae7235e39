"""Running a job in a gradient process (service/worker/handlers.py): dispatch to the algorithms with
progress and cancellation, and the checks against the loaded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from job_helpers import Ctx, digits, picture

from service.errors import Cancelled, InvalidArgument, NotFound
from service.worker import rendering
from service.worker.handlers import handle
from service.worker.jobs import (
    DreamJob,
    DreamResult,
    ExplainJob,
    ExplainResult,
    StylizeJob,
    StylizeResult,
)
from service.worker.loading import LoadedModels
from service.worker.params import DreamParams, StyleParams


def test_explain_job(state: LoadedModels) -> None:
    x = digits(3)
    result = handle(state, ExplainJob("digits", 0, x, targets=(1, 2, 3), plain_gradient=True), Ctx())
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
    # the process's own model gives the same map as calling the algorithm directly
    from service.worker.guided_backprop import explain

    direct = explain(state.get("digits", 2).module, torch.from_numpy(x), [1, 2, 3])
    np.testing.assert_array_equal(direct.saliency, result.saliency)


def test_explain_validation(state: LoadedModels) -> None:
    with pytest.raises(InvalidArgument, match="target class 10 is out of range; the model has 10 classes"):
        handle(state, ExplainJob("digits", 1, digits(1), targets=(10,)), Ctx())
    with pytest.raises(InvalidArgument, match="5 inputs; the limit is max_task_batch=4"):
        handle(state, ExplainJob("digits", 1, digits(5)), Ctx())
    with pytest.raises(InvalidArgument, match=r"shape \(3, 32, 32\); model 'digits' takes \(1, 32, 32\)"):
        handle(state, ExplainJob("digits", 1, np.zeros((1, 3, 32, 32), np.float32)), Ctx())
    with pytest.raises(InvalidArgument, match="NaN or Inf"):
        handle(state, ExplainJob("digits", 1, np.full((1, 1, 32, 32), np.nan, np.float32)), Ctx())
    with pytest.raises(InvalidArgument, match="float \\(N, C, H, W\\) tensor"):
        handle(state, ExplainJob("digits", 1, np.zeros((32, 32), np.uint8)), Ctx())
    with pytest.raises(InvalidArgument, match="unknown explain method 'lime'"):
        handle(state, ExplainJob("digits", 1, digits(1), method="lime"), Ctx())
    with pytest.raises(InvalidArgument, match="unknown saliency rendering 'heatmap'"):
        handle(state, ExplainJob("digits", 1, digits(1), render="heatmap"), Ctx())  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        handle(state, ExplainJob("missing", 0, digits(1)), Ctx())


def test_dream_job_with_progress_and_previews(state: LoadedModels) -> None:
    image = picture(64, 80)
    ctx = Ctx()
    task = DreamJob("inception", 1, image, DreamParams(octaves=2, steps=2, preview_every=2))
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
    again = handle(state, DreamJob("inception", 1, rendering.to_uint8(image), task.params), Ctx())
    assert again.image.shape == (64, 80, 3)


def test_dream_validation(state: LoadedModels) -> None:
    with pytest.raises(
        InvalidArgument, match="64 steps \\(4 octaves x 16\\); the limit is max_task_iterations=50"
    ):
        handle(state, DreamJob("inception", 1, picture(128, 128), DreamParams(steps=16)), Ctx())
    with pytest.raises(InvalidArgument, match="160x64; its longer side exceeds max_task_image_side=128"):
        handle(state, DreamJob("inception", 1, picture(64, 160)), Ctx())
    with pytest.raises(InvalidArgument, match="both sides must be at least 32"):
        handle(state, DreamJob("inception", 1, picture(16, 64)), Ctx())
    with pytest.raises(InvalidArgument, match="values must lie in \\[0, 1\\]") as info:
        handle(state, DreamJob("inception", 1, picture(64, 64) * 255), Ctx())
    assert info.value.reason == "not_an_image"
    with pytest.raises(InvalidArgument, match="has 1 channel\\(s\\); model 'inception' takes 3"):
        handle(state, DreamJob("inception", 1, picture(64, 64)[:, :, 0]), Ctx())
    with pytest.raises(InvalidArgument, match="no layer 'inception9z'"):
        handle(
            state, DreamJob("inception", 1, picture(64, 64), DreamParams(layers={"inception9z": 1.0})), Ctx()
        )
    with pytest.raises(InvalidArgument, match="channel 600 is out of range"):
        params = DreamParams(
            layers={"inception4c": 1.0}, channels={"inception4c": (600,)}, octaves=1, steps=1
        )
        handle(state, DreamJob("inception", 1, picture(64, 64), params), Ctx())


def test_a_stopped_job_raises_cancelled(state: LoadedModels) -> None:
    ctx = Ctx(stop_after=2)
    with pytest.raises(Cancelled, match="after 2 of"):
        handle(state, DreamJob("inception", 1, picture(64, 64), DreamParams(octaves=2, steps=5)), ctx)
    assert len(ctx.updates) == 2


def test_stylize_job(vgg_state: LoadedModels) -> None:
    ctx = Ctx()
    task = StylizeJob(
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


def test_stylize_validation(state: LoadedModels, vgg_state: LoadedModels) -> None:
    content, style = picture(48, 48), picture(48, 48)
    with pytest.raises(InvalidArgument, match="30 iterations; the limit is max_task_iterations=20"):
        handle(
            vgg_state, StylizeJob("styles", 1, content, (style,), params=StyleParams(iterations=30)), Ctx()
        )
    with pytest.raises(InvalidArgument, match="2 blend weights for 1 style images"):
        handle(vgg_state, StylizeJob("styles", 1, content, (style,), style_blend=(1.0, 1.0)), Ctx())
    with pytest.raises(InvalidArgument, match="at least one style image"):
        handle(vgg_state, StylizeJob("styles", 1, content, ()), Ctx())
    # metadata says this GoogLeNet version cannot stylize
    with pytest.raises(InvalidArgument, match="does not support stylize"):
        handle(state, StylizeJob("inception", 1, content, (style,), params=StyleParams(iterations=1)), Ctx())
