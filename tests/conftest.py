"""Shared fixtures: one small model repository built once per session, for any test that needs one.

`model_repository` is what `python -m export demo --models lenet5,resnet18` builds: lenet5 v1
trained on the digits (25 epochs, seed 0, about 10 s) and resnet18 v1 with seeded random weights.
Treat it as read-only; `model_repository_copy` gives a test its own copy to modify.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.demo import demo

    root = tmp_path_factory.mktemp("model_repository") / "repository"
    demo(root, ["lenet5", "resnet18"], out=None, progress=None)
    return root


@pytest.fixture
def model_repository_copy(model_repository: Path, tmp_path: Path) -> Path:
    """A private copy of `model_repository` (about 47 MB) the test may change."""
    return Path(shutil.copytree(model_repository, tmp_path / "repository"))


@pytest.fixture(scope="session")
def lenet5_checkpoint(model_repository: Path) -> Path:
    """The trained LeNet-5's state_dict (weights.pt of model_repository's lenet5 v1)."""
    return model_repository / "lenet5" / "1" / "weights.pt"
