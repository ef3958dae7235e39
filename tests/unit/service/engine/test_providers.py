"""Execution provider selection: CUDA only when it really works, a clear error when it was demanded."""

from __future__ import annotations

import pytest

from service.engine import providers
from service.engine.providers import (
    CPU,
    CUDA,
    CudaStatus,
    ProviderUnavailable,
    cuda_status,
    probe_cuda,
    select_provider,
)
from service.settings import Settings

CUDA_USABLE = cuda_status(0).usable


def test_cpu_when_asked() -> None:
    choice = select_provider(Settings(device="cpu"))
    assert choice.name == CPU and not choice.is_cuda
    assert choice.session_providers() == [CPU]


@pytest.mark.skipif(CUDA_USABLE, reason="this machine has a usable GPU")
def test_auto_falls_back_to_cpu_and_says_why() -> None:
    choice = select_provider(Settings(device="auto"))
    assert choice.name == CPU
    assert "CUDA is not usable" in choice.reason


@pytest.mark.skipif(CUDA_USABLE, reason="this machine has a usable GPU")
def test_cuda_requested_without_a_gpu_is_a_startup_error() -> None:
    with pytest.raises(
        ProviderUnavailable, match="device=cuda was requested but CUDA device 0 is not usable"
    ):
        select_provider(Settings(device="cuda"))


@pytest.mark.skipif(CUDA_USABLE, reason="this machine has a usable GPU")
def test_the_provider_list_of_the_wheel_is_not_trusted() -> None:
    # onnxruntime-gpu lists CUDA even here; the real probe still says no, with ORT's reason.
    status = probe_cuda(0)
    assert not status.usable
    assert status.reason


def test_unusable_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "cuda_status", lambda *a: CudaStatus(False, "libcudnn.so.9 missing"))
    assert select_provider(Settings(device="auto")).name == CPU
    with pytest.raises(ProviderUnavailable, match="libcudnn.so.9 missing"):
        select_provider(Settings(device="cuda"))


def test_usable_cuda_carries_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "cuda_status", lambda *a: CudaStatus(True, "probe ok"))
    for device in ("auto", "cuda"):
        choice = select_provider(
            Settings(device=device, cuda_device_id=1, cudnn_conv_algo_search="EXHAUSTIVE")
        )
        assert choice.is_cuda and choice.device_id == 1
        assert choice.session_providers() == [
            (CUDA, {"device_id": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"}),
            CPU,
        ]


def test_a_probe_that_dies_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "_PROBE_SCRIPT", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)")
    status = probe_cuda(0)
    assert not status.usable and "boom" in status.reason


def test_a_probe_that_hangs_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "_PROBE_SCRIPT", "import time; time.sleep(30)")
    monkeypatch.setattr(providers, "PROBE_TIMEOUT_S", 0.5)
    status = probe_cuda(0)
    assert not status.usable and "did not finish" in status.reason


def test_a_probe_that_falls_back_is_not_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    script = 'import json; print(json.dumps({"ok": False, "error": "onnxruntime fell back to CPU"}))'
    monkeypatch.setattr(providers, "_PROBE_SCRIPT", script)
    assert probe_cuda(0) == CudaStatus(False, "onnxruntime fell back to CPU")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_USABLE, reason="no usable CUDA device")
def test_auto_picks_a_working_gpu() -> None:
    choice = select_provider(Settings(device="auto"))
    assert choice.is_cuda and choice.device_id == 0
    assert select_provider(Settings(device="cuda")).is_cuda
