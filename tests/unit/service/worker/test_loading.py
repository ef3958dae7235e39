"""Loading the models a gradient process computes with (service/worker/loading.py): every version
with its weights, checksums, the config from the settings, and the process's CPU priority."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from job_helpers import REPO_ROOT, write_version

from export.models import build
from export.preprocessing import DIGITS
from export.repository import file_entry
from service.errors import NotFound
from service.settings import Settings
from service.worker import loading
from service.worker.loading import LoadedModels, load_models, load_models_config
from service.worker.params import Limits


def test_load_models_loads_every_version_with_its_weights(
    repository: dict[str, Path], state: LoadedModels
) -> None:
    assert sorted(state.offered) == [("digits", 1), ("digits", 2), ("inception", 1)]
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


@pytest.mark.parametrize("parity_process", [False, True], ids=["self-test here", "self-test apart"])
def test_load_models_refuses_weights_that_do_not_match_their_checksum(
    tmp_path: Path, parity_process: bool
) -> None:
    torch.manual_seed(0)
    directory = write_version(tmp_path, "digits", 1, "lenet5", build("lenet5"))
    meta = json.loads((directory / "metadata.json").read_text())
    meta["files"]["weights.pt"]["sha256"] = "0" * 64
    (directory / "metadata.json").write_text(json.dumps(meta))
    config = {"models": [str(directory)], "device": "cpu", "parity_process": parity_process}
    with pytest.raises(RuntimeError, match=r"weights\.pt sha256 .* differs from metadata\.json's"):
        load_models(config)
    del meta["files"]["weights.pt"]["sha256"]
    (directory / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match=r"files\['weights\.pt'\] must be"):
        load_models(config)


def test_the_parity_self_test_runs_apart_and_its_verdicts_reach_the_process(
    repository: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """settings.worker_parity_process (the default): the gradient process never imports ONNX
    Runtime, and gets the verdicts of the test run in its own process, a refusal included; the
    verdicts are shared with the pool's other processes, so a replacement starts no test at all."""
    # weights.pt of another LeNet-5 than the one model.onnx was exported from, hashes made to match:
    # only the parity self-test can tell.
    torch.manual_seed(1)
    swapped = write_version(tmp_path / "repository", "digits", 3, "lenet5", build("lenet5"))
    (swapped / "weights.pt").write_bytes((repository["lenet_v1"] / "weights.pt").read_bytes())
    meta = json.loads((swapped / "metadata.json").read_text())
    meta["files"]["weights.pt"] = file_entry(swapped / "weights.pt")
    (swapped / "metadata.json").write_text(json.dumps(meta))
    config = {
        "models": [str(repository["lenet_v1"]), str(swapped)],
        "device": "cpu",
        "verdict_dir": str(tmp_path),
        "parity_process": True,
    }
    code = (
        "import json, sys; from service.worker.loading import load_models; "
        f"state = load_models(json.loads({json.dumps(json.dumps(config))})); "
        "print(json.dumps(['onnxruntime' in sys.modules, sorted(state.offered), state.ready_summary()]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    imported_ort, offered, summary = json.loads(result.stdout.splitlines()[-1])
    assert not imported_ort
    assert offered == [["digits", 1]]
    assert "rebuilt from weights.pt disagrees with model.onnx" in summary["refused"]["digits:3"]

    def no_process(*args: object) -> None:
        raise AssertionError("a parity process was started for verdicts the pool already has")

    monkeypatch.setattr(loading, "_ParityProcess", no_process)
    replacement = load_models(config)
    assert replacement.ready_summary() == summary and list(replacement.offered) == [("digits", 1)]


def test_load_models_config_comes_from_the_settings(repository: dict[str, Path]) -> None:
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
    config = load_models_config(settings, [repository["lenet_v1"]])
    assert config["torch_threads"] == 1 and config["device"] == "cpu" and config["nice"] == 4
    assert config["parity_process"] is Settings().worker_parity_process is True
    config["nice"] = 0  # in this process: the rest of the test session must not be reniced
    loaded = load_models(pickle.loads(pickle.dumps(config)))
    assert loaded.limits == Limits(max_iterations=77, max_image_side=96, max_batch=3)
    assert Limits.from_settings(settings) == loaded.limits
    assert list(loaded.offered) == [("digits", 1)]
    assert loaded.memory_bytes == Settings().worker_model_memory_bytes == 1 << 30


def test_a_gradient_process_lowers_its_cpu_priority_by_nice() -> None:
    """Gradient processes run below the server (settings.worker_nice, default 10), so classification
    threads win where they share cores. A child process: renicing is for the rest of its life."""
    code = (
        "import os; from service.worker.loading import load_models; before = os.nice(0); "
        "load_models({'models': [], 'device': 'cpu', 'nice': 7}); print(os.nice(0) - before)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "7"
    assert Settings().worker_nice == 10
