"""ClassificationEngine against a small model repository built here (linear_repo): model selection,
loading checks, warm-up and metrics. The request path in front of it: frontend/test_classify.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import onnx
import pytest
from linear_repo import GRAY8, settings_for, sha256
from onnx import TensorProto

from service import memory
from service.catalog import ModelLoadError
from service.engine.engine import ClassificationEngine
from service.engine.session import ModelSession
from service.errors import NotFound
from service.observability import metrics

# --- model selection -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ("", [("gray", 1), ("half", 1), ("rgb", 2)]),
        ("rgb", [("rgb", 2)]),
        ("rgb:1", [("rgb", 1)]),
        ("rgb:1+2,gray", [("gray", 1), ("rgb", 1), ("rgb", 2)]),
        ("rgb:all", [("rgb", 1), ("rgb", 2)]),
    ],
)
def test_selection_picks_the_versions(
    repo: dict[str, Any], models: str, expected: list[tuple[str, int]]
) -> None:
    engine = ClassificationEngine(settings_for(repo["root"], models=models))
    engine.load()
    assert [(m.name, m.version) for m in engine.models()] == expected


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ("nope", "'nope' is not in the repository"),
        ("rgb:3", "has no version 3"),
        ("rgb:x", "invalid model selection"),
    ],
)
def test_bad_selection_fails_the_start(repo: dict[str, Any], models: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        ClassificationEngine(settings_for(repo["root"], models=models)).load()


def test_get_and_not_found(repo: dict[str, Any]) -> None:
    engine = ClassificationEngine(settings_for(repo["root"], models="rgb:all,gray"))
    engine.load()
    assert engine.get("rgb").version == 2
    assert engine.get("rgb", 1).version == 1
    model = engine.get("gray")
    assert model.input_shape == (1, 8, 8) and model.num_classes == 3 and model.labels[2] == "class2"
    assert model.provider == "CPUExecutionProvider" and model.preprocessing == GRAY8
    with pytest.raises(NotFound, match="loaded models: gray, rgb"):
        engine.get("half")
    with pytest.raises(NotFound, match="loaded: 1, 2"):
        engine.get("rgb", 7)


# --- integrity -----------------------------------------------------------------------------------


def test_a_model_whose_files_do_not_match_is_not_loaded(
    repo: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    onnx_path = repo["root"] / "rgb" / "2" / "model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    onnx_path.write_bytes(bytes(data))
    engine = ClassificationEngine(settings_for(repo["root"], models="rgb:all,gray"))
    with caplog.at_level(logging.ERROR):
        engine.load()
    assert [(m.name, m.version) for m in engine.models()] == [("gray", 1), ("rgb", 1)]
    assert "rgb:2" in caplog.text and "model.onnx" in caplog.text
    with pytest.raises(NotFound):
        engine.get("rgb", 2)


def test_load_fails_when_no_model_is_left(repo: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    (repo["root"] / "gray" / "1" / "weights.pt").write_bytes(b"tampered")
    with pytest.raises(ModelLoadError, match="no model could be loaded"):
        ClassificationEngine(settings_for(repo["root"], models="gray")).load()
    assert "weights.pt" in caplog.text


def test_empty_or_missing_repository(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no models"):
        ClassificationEngine(settings_for(tmp_path / "empty")).load()
    with pytest.raises(ModelLoadError, match="does not exist"):
        ClassificationEngine(settings_for(tmp_path / "missing")).load()


def test_a_version_with_invalid_metadata_is_skipped(repo: dict[str, Any]) -> None:
    (repo["root"] / "rgb" / "2" / "metadata.json").write_text("{not json")
    engine = ClassificationEngine(settings_for(repo["root"], models="rgb"))
    engine.load()
    assert [(m.name, m.version) for m in engine.models()] == [("rgb", 1)]


def test_refused_external_data_skips_the_version(
    repo: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    # A model.onnx pointing at ../../etc/passwd, with metadata hashes that match it: integrity checks
    # pass, the external-data check still refuses it before ONNX Runtime opens the file.
    folder = repo["root"] / "rgb" / "2"
    model = onnx.load(str(folder / "model.onnx"))
    tensor = next(t for t in model.graph.initializer if t.name == "W")
    onnx.external_data_helper.set_external_data(tensor, location="../../etc/passwd")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    meta = json.loads((folder / "metadata.json").read_text())
    meta["files"]["model.onnx"] = {
        "sha256": sha256(folder / "model.onnx"),
        "bytes": (folder / "model.onnx").stat().st_size,
    }
    (folder / "metadata.json").write_text(json.dumps(meta))
    engine = ClassificationEngine(settings_for(repo["root"], models="rgb:all"))
    engine.load()
    assert [(m.name, m.version) for m in engine.models()] == [("rgb", 1)]
    assert "etc/passwd" in caplog.text


def test_each_load_gives_the_memory_it_freed_back_after_its_warm_up(
    repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading frees hundreds of MB that glibc would keep (service/memory.py): each version, loaded
    or refused, trims the heap once it is done, after its warm-up."""
    events: list[str] = []
    real = ModelSession.warmup

    def warmup(self: ModelSession, batch_sizes: Any) -> float:
        events.append(f"warm-up {self.path.parent.parent.name}")
        return real(self, batch_sizes)

    monkeypatch.setattr(ModelSession, "warmup", warmup)
    monkeypatch.setattr(memory, "trim_heap", lambda: events.append("trim") or True)
    (repo["root"] / "rgb" / "2" / "model.onnx").write_bytes(b"tampered")  # refused at verification
    ClassificationEngine(settings_for(repo["root"], models="rgb:all,gray", load_concurrency=1)).load()
    assert events == ["warm-up gray", "trim", "warm-up rgb", "trim", "trim"]


def test_warmup_covers_every_batch_size_and_metrics_are_set(
    repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[list[int]] = []
    real = ModelSession.warmup

    def recording(self: ModelSession, batch_sizes: Any) -> float:
        sizes.append(list(batch_sizes))
        return real(self, sizes[-1])

    monkeypatch.setattr(ModelSession, "warmup", recording)
    # auto (the default): 1 and the largest batch
    ClassificationEngine(settings_for(repo["root"], models="gray", max_batch_size=5)).load()
    assert sizes == [[1, 5]]
    # all: every size; a list: sizes over the batch limit skipped; none: no warm-up
    for setting, expected in (("all", [1, 2, 3, 4, 5]), ("8,1,4,4", [1, 4]), ("none", [])):
        sizes.clear()
        settings = settings_for(repo["root"], models="gray", max_batch_size=5, warmup_batch_sizes=setting)
        ClassificationEngine(settings).load()
        assert sizes == [expected]
    labels = {"model": "gray", "version": "1", "provider": "CPUExecutionProvider", "trained": "false"}
    assert metrics.registry.get_sample_value("cnnserve_model_info", labels) == 1
    assert (
        metrics.registry.get_sample_value(
            "cnnserve_execution_provider_info", {"provider": "CPUExecutionProvider"}
        )
        == 1
    )
