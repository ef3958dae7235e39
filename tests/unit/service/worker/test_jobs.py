"""The job interface (service/worker/jobs.py): torch-free, cost in pass-pixels, validation against the
caps without a model, and jobs, results and updates that survive pickling."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
from job_helpers import REPO_ROOT, Ctx, digits, picture

from service.errors import InvalidArgument
from service.worker.handlers import handle
from service.worker.jobs import (
    DreamJob,
    ExplainJob,
    ProgressUpdate,
    StylizeJob,
    estimate_cost,
    validate_job,
)
from service.worker.loading import LoadedModels
from service.worker.params import DreamParams, Limits, StyleParams


def test_the_job_modules_do_not_import_torch() -> None:
    """The serving process builds and prices jobs, and builds the pool, without loading PyTorch."""
    code = (
        "import sys, service.worker.jobs, service.worker.params, service.worker.rendering, "
        "service.worker.loading, service.worker.handlers, service.worker.pool; "
        "sys.exit('torch' in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_estimate_cost_in_pass_pixels() -> None:
    x = digits(4)
    assert estimate_cost(ExplainJob("m", 1, x)) == 4 * 32 * 32 * 2  # one forward + one backward
    assert estimate_cost(ExplainJob("m", 1, x, method="gradient")) == 4 * 32 * 32 * 2
    assert estimate_cost(ExplainJob("m", 1, x, plain_gradient=True)) == 4 * 32 * 32 * 3
    assert estimate_cost(ExplainJob("m", 1, x, method="guided_gradcam")) == 4 * 32 * 32 * 3
    assert estimate_cost(ExplainJob("m", 1, x, method="gradcam")) == 4 * 32 * 32 * 2

    octaves = [(96, 96), (69, 69), (49, 49), (35, 35)]  # the default 4 octaves at 1.4
    expected = sum(h * w for h, w in octaves) * 10 * 2 + 2 * 96 * 96
    assert estimate_cost(DreamJob("m", 1, picture(96, 96))) == expected
    # max_side shrinks the work, and the price with it
    assert estimate_cost(DreamJob("m", 1, picture(192, 192), DreamParams(max_side=96))) == expected

    stylize = StylizeJob("m", 1, picture(64, 64), (picture(100, 50),), params=StyleParams(iterations=100))
    assert estimate_cost(stylize) == 64 * 64 * 100 * 2 + 64 * 64 + 64 * 32
    big = StylizeJob("m", 1, picture(1000, 1000), (picture(100, 100),), params=StyleParams(iterations=10))
    assert estimate_cost(big) == 512 * 512 * 10 * 2 + 512 * 512 + 512 * 512  # max_side 512, style_scale 1


def test_validate_job_needs_no_model() -> None:
    limits = Limits(max_iterations=100, max_image_side=64, max_batch=2)
    validate_job(ExplainJob("m", 1, digits(2)), limits)
    validate_job(DreamJob("m", 1, picture(64, 64), DreamParams(octaves=2, steps=50)), limits)
    with pytest.raises(InvalidArgument, match="max_task_iterations=100"):
        validate_job(DreamJob("m", 1, picture(64, 64), DreamParams(octaves=2, steps=51)), limits)
    with pytest.raises(InvalidArgument, match="style_scale makes the style images 128x128"):
        validate_job(
            StylizeJob(
                "m",
                1,
                picture(64, 64),
                (picture(64, 64),),
                params=StyleParams(style_scale=2.0, iterations=10),
            ),
            limits,
        )
    with pytest.raises(InvalidArgument, match="stylize got 3 style images; the limit is max_task_batch=2"):
        validate_job(StylizeJob("m", 1, picture(64, 64), (picture(64, 64),) * 3), limits)


def test_jobs_results_and_updates_survive_pickling(state: LoadedModels) -> None:
    task = DreamJob(
        "inception",
        1,
        picture(40, 40),
        DreamParams(layers={"inception3a": 2.0}, channels={"inception3a": (1, 2)}),
    )
    back = pickle.loads(pickle.dumps(task))
    assert back.params == task.params and back.model == task.model
    np.testing.assert_array_equal(back.image, task.image)
    result = handle(state, ExplainJob("digits", 1, digits(1), method="guided_gradcam"), Ctx())
    copy_ = pickle.loads(pickle.dumps(result))
    np.testing.assert_array_equal(copy_.saliency, result.saliency)
    assert copy_.cam is not None and copy_.pngs == result.pngs
    update = ProgressUpdate("dream", 1, 2, {"objective": 1.0}, octave=1, preview_png=b"x")
    assert pickle.loads(pickle.dumps(update)) == update
