"""An imported ONNX model (export/importing.py: no weights.pt, no PyTorch module) in the service's
rooms without a server: the catalog's capabilities and hints, the gradient tier's catalog (keeps it,
checks no weights.pt), the gradient processes (never load it), and the gradient backend the serving
process and the tier share (FAILED_PRECONDITION naming the reason, before anything reaches a pool)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from export.importing import import_onnx
from export.preprocessing import Preprocessing
from service.catalog import (
    IMPORTED_NO_GRADIENTS,
    LoadedModel,
    imported,
    loaded_model,
    no_features_hint,
)
from service.errors import FailedPrecondition
from service.frontend.gradient_tier import ModelCatalog
from service.frontend.gradients import GRADIENT_CAPABILITIES, LocalGradients
from service.settings import Settings
from service.worker import loading


@pytest.fixture(scope="module")
def imported_repository(
    tmp_path_factory: pytest.TempPathFactory, make_onnx_classifier: Callable[..., Path]
) -> Path:
    base = tmp_path_factory.mktemp("imported")
    source = make_onnx_classifier(base / "user.onnx", classes=3)
    import_onnx(
        source, base / "repository", name="mine", labels=["a", "b", "c"],
        preprocessing=Preprocessing("RGB", 32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    )  # fmt: skip
    return base / "repository"


def _model(repository: Path) -> LoadedModel:
    from export.repository import read_version

    version = read_version(repository / "mine" / "1")
    return loaded_model(version.metadata, provider="CPUExecutionProvider", path=version.path)


def test_the_catalog_offers_classify_only_and_an_honest_features_hint(imported_repository: Path) -> None:
    model = _model(imported_repository)
    assert imported(model) and model.architecture == "imported-onnx"
    assert {k for k, v in model.capabilities.items() if v} == {"classify"}
    hint = no_features_hint(model)
    assert "--features-output NAME" in hint and "python -m export onnx" not in hint


def test_the_gradient_tier_lists_it_without_a_weights_check(imported_repository: Path) -> None:
    catalog = ModelCatalog(Settings(repository=imported_repository, workers=1))
    catalog.load()
    (model,) = catalog.models()
    assert (model.name, model.version) == ("mine", 1) and imported(model)


def test_the_gradient_processes_never_load_it(imported_repository: Path) -> None:
    loaded = loading.load_models({"models": [str(imported_repository / "mine" / "1")], "device": "cpu"})
    assert loaded.offered == {} and loaded.refused == {} and loaded.models == {}


class _Rpc:
    model = ""


@pytest.mark.parametrize("kind", sorted(GRADIENT_CAPABILITIES))
def test_every_gradient_rpc_is_refused_before_the_pool(imported_repository: Path, kind: str) -> None:
    model = _model(imported_repository)
    state: Any = SimpleNamespace(check_ready=lambda: None, resolve_model=lambda name, version: model)
    pool: Any = SimpleNamespace(submit=None, ready_summary=None)
    backend = LocalGradients(state, pool)
    with pytest.raises(FailedPrecondition) as info:
        backend._prepare("mine", 0, kind, _Rpc())  # type: ignore[arg-type]
    assert info.value.reason == "imported_onnx"
    assert IMPORTED_NO_GRADIENTS in info.value.message and kind in info.value.message
