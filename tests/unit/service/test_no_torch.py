"""The classification side of the serving process never imports PyTorch: it reads the repository,
runs ONNX Runtime and answers gRPC. torch costs ~1 s of start-up and hundreds of MB of memory in
every process that imports it (the gradient worker processes import it on purpose)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    "module",
    [
        "service.engine.engine",
        "service.frontend.server",  # the gRPC process of the coming frontend/engine split
        "service.frontend.gradient_tier",
        "export.repository",
        "service.catalog",
        "service.worker.jobs",  # the serving process builds and prices gradient jobs
        "service.worker.pool",  # and runs the pool that spawns the PyTorch processes
    ],
)
def test_importing_the_module_does_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "False", f"importing {module} imports torch"


@pytest.mark.parametrize("module", ["service.frontend.server", "service.engine.remote"])
def test_the_frontend_imports_no_onnx_runtime_either(module: str) -> None:
    """A frontend process decodes and speaks gRPC; the engine behind its protocol runs ONNX Runtime
    (server.py builds the in-process engine only when it serves, inside a function; engine.remote
    is what a frontend holds instead when the engine is a process of its own)."""
    heavy = "any(m.startswith('onnxruntime') or m == 'torch' for m in sys.modules)"
    code = f"import sys, {module}; print({heavy})"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "False"


def test_the_catalog_imports_no_onnx_runtime_either() -> None:
    """The gradient tier selects its models with it and never opens an ONNX Runtime session."""
    code = "import sys, service.catalog; print(any(m.startswith('onnxruntime') for m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "False"
