"""The gradient processes compute with the network ONNX Runtime serves.

For every architecture of the zoo (GoogLeNet with and without transform_input) a version is exported
from a checkpoint file, as a user does with `python -m export onnx ARCH --weights FILE`, then loaded
the way each gradient process loads it (`load_models`). On the same input the process's logits must
equal ONNX Runtime's on model.onnx within 1e-4 relative (max |diff| / max |logit|).

The embedding is held to the same bound here, for every architecture with trained-like weights
(VGG-19, ResNet-101 and ResNet-152 in the slow run):
model.onnx's `features` output against the process's module's penultimate activations (a forward
hook on the head, ArchSpec.head), the input of the layer that makes the logits.

The load-time parity self-test is tested too: a version whose metadata.json lost the exporter's
build arguments is refused for gradient jobs (FAILED_PRECONDITION, with the reason in the pool's
ready summary) while the other versions load.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.models import ARCHITECTURES, build
from export.publish import export_to_repository
from service.errors import FailedPrecondition
from service.worker.loading import LoadedModels, load_models

RELATIVE_BOUND = 1e-4

# (architecture, build_kwargs given to the export; None: the exporter's own default)
CASES = [(arch, None) for arch in ARCHITECTURES] + [("googlenet", {"transform_input": False})]
# The three largest take 80 s of the default run between them (2 cores) and hold no code path the
# others miss (ResNet-50 has the bottlenecks, AlexNet the big classifier): `make test-all` runs them.
SLOW = {"vgg19", "resnet101", "resnet152"}
PARAMS = [pytest.param(case, marks=pytest.mark.slow) if case[0] in SLOW else case for case in CASES]


def case_id(case: tuple[str, dict[str, bool] | None]) -> str:
    arch, kwargs = case
    return arch if kwargs is None else f"{arch}-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


def fixed_input(shape: tuple[int, ...], batch: int = 2) -> np.ndarray:
    """Not the export's verification batch (seed 0): an input the export never checked."""
    return np.random.default_rng(1234).standard_normal((batch, *shape)).astype(np.float32)


def ort_outputs(onnx_path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, features = session.run(["logits", "features"], {"input": x})
    return np.asarray(logits, dtype=np.float64), np.asarray(features, dtype=np.float64)


def relative(a: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(a - reference).max() / np.abs(reference).max())


def load(directory: Path) -> LoadedModels:
    # What each gradient process runs at start (the pool's initializer), the config as it crosses spawn.
    config = {"models": [str(directory)], "device": "cpu", "torch_threads": 0}
    return load_models(pickle.loads(pickle.dumps(config)))


@pytest.mark.parametrize("case", PARAMS, ids=case_id)
def test_process_logits_equal_onnx_runtime_for_a_version_exported_from_a_checkpoint(
    case: tuple[str, dict[str, bool] | None], tmp_path: Path, make_checkpoint: Callable[..., Path]
) -> None:
    arch, kwargs = case
    weights = make_checkpoint(arch, tmp_path / f"{arch}.pth")
    exported = export_to_repository(arch, tmp_path / "repository", weights=weights, build_kwargs=kwargs)
    version = exported.version
    if arch == "googlenet":  # torchvision's published weights expect the transform: the default
        expected = True if kwargs is None else kwargs["transform_input"]
        assert version.build_kwargs == {"transform_input": expected}

    state = load(version.path)
    assert state.refused == {}
    model = state.get(version.name, version.version)
    x = fixed_input(version.input_shape)
    penultimate: list[torch.Tensor] = []
    head = model.module.get_submodule(ARCHITECTURES[arch].head)
    handle = head.register_forward_hook(lambda _m, inputs, _o: penultimate.append(inputs[0]))
    with torch.no_grad():
        worker = model.module(torch.from_numpy(x)).double().numpy()
    handle.remove()
    served, features = ort_outputs(version.onnx_path, x)
    assert relative(worker, served) <= RELATIVE_BOUND
    assert (worker.argmax(1) == served.argmax(1)).all()
    assert features.shape == (2, version.metadata["features"]["shape"][0])
    assert relative(penultimate[0].double().numpy(), features) <= RELATIVE_BOUND

    if arch == "googlenet":
        # Control: the checkpoint is alive enough that the other transform_input setting (what the
        # processes built before they read build_kwargs) is far outside the bound.
        wrong = build(arch, transform_input=not version.build_kwargs["transform_input"])
        wrong.load_state_dict(torch.load(version.weights_path, weights_only=True))
        with torch.no_grad():
            assert relative(wrong(torch.from_numpy(x)).double().numpy(), served) > 1e-2


def test_a_version_failing_the_parity_self_test_is_refused_for_gradient_jobs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, make_checkpoint: Callable[..., Path]
) -> None:
    root = tmp_path / "repository"
    weights = make_checkpoint("googlenet", tmp_path / "googlenet.pth")
    good = export_to_repository("googlenet", root, weights=weights, name="inception").version
    lost = export_to_repository("googlenet", root, weights=weights, name="inception").version
    # metadata.json is not in its own sha256 manifest: a hand edit (or an older exporter) that drops
    # build_kwargs makes the processes build GoogLeNet without the input transform ONNX Runtime applies.
    meta = json.loads(lost.metadata_path.read_text())
    del meta["build_kwargs"]
    lost.metadata_path.write_text(json.dumps(meta))

    config = {"models": [str(good.path), str(lost.path)], "device": "cpu"}
    with caplog.at_level("ERROR", logger="service.worker.loading"):
        state = load_models(pickle.loads(pickle.dumps(config)))

    assert list(state.offered) == [("inception", 1)]
    assert list(state.refused) == [("inception", 2)]
    reason = state.refused[("inception", 2)]
    assert "disagrees with model.onnx" in reason and "relative diff" in reason
    assert "not offering inception:2 for gradient RPCs" in caplog.text
    assert state.ready_summary() == {"refused": {"inception:2": reason}}
    for version in (2, 0):  # 0 is the latest: never silently an older version instead
        with pytest.raises(FailedPrecondition, match="'inception' version 2 is not offered") as info:
            state.get("inception", version)
        assert info.value.reason == "parity_failed"
    assert state.get("inception", 1).version == 1
