"""Every byte ONNX Runtime reads is covered by a sha256 in metadata.json: external data must not only
stay inside the model's folder (test_session.py) but also be a file metadata.json lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from test_session import CHW, CPU_CHOICE, SETTINGS, linear_model, reference

from service.catalog import ModelLoadError
from service.engine import session as session_mod
from service.engine.session import ModelSession, check_external_data


def external_model(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """model.onnx with every initializer in folder/weights.bin."""
    model, w, b = linear_model()
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    onnx.save(
        model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
        size_threshold=0,
    )  # fmt: skip
    return path, w, b


def test_external_data_that_metadata_does_not_list_is_refused_before_a_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, _ = external_model(tmp_path / "m" / "1")
    opened: list[str] = []
    monkeypatch.setattr(session_mod.ort, "InferenceSession", lambda *a, **k: opened.append(str(a[0])))
    with pytest.raises(ModelLoadError, match="'weights.bin', which metadata.json does not list"):
        ModelSession(
            path, settings=SETTINGS, provider=CPU_CHOICE, input_shape=CHW,
            listed_files={"model.onnx", "weights.pt"},
        )  # fmt: skip
    assert opened == []


def test_listed_external_data_loads(tmp_path: Path) -> None:
    path, w, b = external_model(tmp_path / "m" / "1")
    assert check_external_data(path, {"model.onnx", "weights.bin"}) == [path.parent.resolve() / "weights.bin"]
    sess = ModelSession(
        path, settings=SETTINGS, provider=CPU_CHOICE, input_shape=CHW,
        listed_files={"model.onnx", "weights.pt", "weights.bin"},
    )  # fmt: skip
    x = np.ones((2, *CHW), np.float32)
    np.testing.assert_allclose(sess.run(x), reference(x, w, b), rtol=1e-4, atol=1e-4)
