"""service.catalog: the model selection, metadata.json -> LoadedModel, and the one "latest" rule.
(The selection against a real repository and ONNX Runtime sessions: test_engine.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.preprocessing import DIGITS
from service.catalog import (
    Catalog,
    LoadedModel,
    ModelLoadError,
    Selection,
    parse_model_selection,
    select_versions,
)
from service.errors import NotFound


def model(name: str, version: int) -> LoadedModel:
    return LoadedModel(
        name, version, "lenet5", (1, 32, 32), np.dtype("float32"), 10, (), DIGITS, True, "digits", 1, 1,
        "CPUExecutionProvider", {"classify": True}, {},
    )  # fmt: skip


def test_parse_model_selection() -> None:
    assert parse_model_selection("") is None
    assert parse_model_selection(" a , b:2,c:1+3,d:all") == {
        "a": Selection(latest=True),
        "b": Selection(versions=frozenset({2})),
        "c": Selection(versions=frozenset({1, 3})),
        "d": Selection(all=True),
    }
    assert parse_model_selection("a:1,a") == {"a": Selection(latest=True, versions=frozenset({1}))}
    for bad in ("a:", "a:0", "a:x", "a:1+", ":1", "a b", "a,,b"):
        with pytest.raises(ValueError, match="invalid model selection"):
            parse_model_selection(bad)


def test_latest_is_the_highest_version_loaded() -> None:
    catalog = Catalog([model("digits", 3), model("digits", 1), model("other", 2)])
    assert len(catalog) == 3
    assert [(m.name, m.version) for m in catalog.models()] == [("digits", 1), ("digits", 3), ("other", 2)]
    assert catalog.get("digits").version == 3
    assert catalog.get("digits", 1).version == 1
    with pytest.raises(NotFound, match="'digits' has no loaded version 2; loaded: 1, 3"):
        catalog.get("digits", 2)
    with pytest.raises(NotFound, match="'nope' is not loaded; loaded models: digits, other"):
        catalog.get("nope")
    with pytest.raises(NotFound, match="loaded models: none"):
        Catalog().get("digits")


def test_select_versions_refuses_what_the_repository_cannot_give(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        select_versions(tmp_path / "missing", "")
    with pytest.raises(ModelLoadError, match="no models found"):
        select_versions(tmp_path, "")
    with pytest.raises(ModelLoadError, match="invalid model selection"):
        select_versions(tmp_path, "a:0")
