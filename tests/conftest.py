"""Shared fixtures: one small model repository built once per session, for any test that needs one.

`model_repository` is what `python -m export demo --models lenet5,resnet18` builds: lenet5 v1
trained on the digits (25 epochs, seed 0, about 10 s) and resnet18 v1 with seeded random weights.
Treat it as read-only; `model_repository_copy` gives a test its own copy to modify.
`vgg19_repository` holds VGG-19 (the style network), built once and cached across sessions.
`make_checkpoint(arch, path)` writes a checkpoint file with input-sensitive weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Servers the unit tests build in this process (Settings(...) without an http_port) leave REST off:
# its default port, 8000, is one port for every test at once. Tests of REST ask for a port of their
# own; subprocess servers get theirs from server_process.py (which drops CNNSERVE_* variables).
os.environ["CNNSERVE_HTTP_PORT"] = "0"


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


# VGG-19's repository is built once and cached across sessions under the system temp dir: exporting it
# costs about 1 min and 2.6 GB of memory on a 2-core machine, and it takes 1.1 GB of disk (model.onnx
# plus weights.pt). The cache key covers everything that shapes the files (the export package's
# sources and the torch/onnx versions), so a changed exporter builds a fresh one and removes the
# stale ones.
VGG19_CACHE = Path(tempfile.gettempdir()) / "cnnserve-test-cache"


def _vgg19_key() -> str:
    import onnx
    import torch

    digest = hashlib.sha256(f"torch {torch.__version__} onnx {onnx.__version__}".encode())
    export_dir = Path(__file__).resolve().parents[1] / "export"
    for path in sorted(export_dir.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".txt"):
            digest.update(str(path.relative_to(export_dir)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def vgg19_repository() -> Path:
    """A repository holding only vgg19 v1, seeded random weights, exactly as `python -m export demo
    --models vgg19` builds it. Read-only: it is shared with later sessions (see VGG19_CACHE)."""
    import fcntl

    VGG19_CACHE.mkdir(parents=True, exist_ok=True)
    key = _vgg19_key()
    final = VGG19_CACHE / f"vgg19-{key}"
    with open(VGG19_CACHE / "vgg19.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then reuse its result
        if not (final / ".complete").exists():
            for stale in VGG19_CACHE.glob("vgg19-*"):
                shutil.rmtree(stale, ignore_errors=True)
            building = VGG19_CACHE / f"vgg19-{key}.building"
            # a subprocess, so the export's ~2.6 GB peak is given back before the tests run
            result = subprocess.run(
                [sys.executable, "-m", "export", "demo", "--models", "vgg19", "--repository", str(building)],
                cwd=Path(__file__).resolve().parents[1],
                capture_output=True,
                text=True,
                timeout=900,
            )
            if result.returncode != 0:
                raise RuntimeError(f"exporting vgg19 failed ({result.returncode}):\n{result.stderr[-4000:]}")
            (building / ".complete").touch()
            building.rename(final)  # atomic: a half-built repository is never found under `final`
    return final


def _he_initialised(model: Any, seed: int) -> Any:
    """Conv and linear weights drawn as He et al. (std sqrt(2 / fan_in)), biases 0. GoogLeNet's own
    init (a truncated normal of std 0.01) lets its activations vanish to ~1e-11 logits and a uniform
    softmax: an input transform then hardly moves them, so a test could not tell two networks apart."""
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()
    return model


@pytest.fixture(scope="session")
def make_checkpoint() -> Callable[..., Path]:
    """make_checkpoint(arch, path, seed=7) -> path: a checkpoint file (a state_dict, as torchvision's
    published checkpoints are, GoogLeNet's aux heads included) whose logits depend on the input."""

    def make(arch: str, path: Path, seed: int = 7) -> Path:
        import torch

        from export.models import build

        torch.save(_he_initialised(build(arch), seed).state_dict(), path)
        return path

    return make


def onnx_classifier(
    *,
    channels: int = 3,
    side: int = 32,
    classes: int = 5,
    layout: str = "NCHW",
    batch: int | str = "batch",
    seed: int = 0,
) -> Any:
    """A small image classifier as an ONNX ModelProto built with onnx.helper (no exporter, no
    torch: milliseconds): Conv 3x3 stride 2 -> Relu -> GlobalAveragePool -> Flatten -> Gemm. Input
    "image" [batch, C, H, W] (layout "NHWC": [batch, H, W, C], transposed inside), output "logits"
    [batch, classes]; `batch` a symbolic name or a fixed size."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [batch, channels, side, side] if layout == "NCHW" else [batch, side, side, channels]
    nodes = []
    first = "image"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]))
        first = "nchw"
    nodes += [
        helper.make_node("Conv", [first, "w", "b"], ["conv"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((8, channels, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b"),
        numpy_helper.from_array(rng.standard_normal((classes, 8)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32) * 0.1, "fc_b"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="session")
def build_onnx_classifier() -> Callable[..., Any]:
    """`onnx_classifier` itself, for tests that edit the graph before saving it (a fixture, because
    test modules cannot import this conftest by name: every test folder has its own conftest.py)."""
    return onnx_classifier


@pytest.fixture(scope="session")
def make_onnx_classifier() -> Callable[..., Path]:
    """make_onnx_classifier(path, **options) -> path: `onnx_classifier(**options)` saved at path."""

    def make(path: Path, **options: Any) -> Path:
        import onnx

        onnx.save_model(onnx_classifier(**options), str(path))
        return path

    return make
