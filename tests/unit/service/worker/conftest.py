"""Fixtures of the gradient-job tests: one repository of LeNet-5 (two versions) and GoogLeNet, loaded
as a gradient process loads it, and a VGG-19 for style transfer; built once for the directory."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from job_helpers import write_version

from export.models import build
from export.preprocessing import IMAGENET
from service.worker.loading import LoadedModels, TorchModel, load_models
from service.worker.params import Limits


@pytest.fixture(scope="package")
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


@pytest.fixture(scope="package")
def state(repository: dict[str, Path]) -> LoadedModels:
    config = {
        "models": [str(repository[k]) for k in ("lenet_v1", "lenet_v2", "googlenet")],
        "device": "cpu",
        "torch_threads": 0,
        "limits": {"max_iterations": 50, "max_image_side": 128, "max_batch": 4},
    }
    return load_models(pickle.loads(pickle.dumps(config)))


@pytest.fixture(scope="package")
def vgg_state() -> LoadedModels:
    torch.manual_seed(0)
    module = build("vgg19")
    for p in module.parameters():
        p.requires_grad_(False)
    model = TorchModel("styles", 1, "vgg19", module, 1000, (3, 224, 224), IMAGENET, {"stylize": True})
    return LoadedModels(models={("styles", 1): model}, device="cpu", limits=Limits(max_iterations=20))
