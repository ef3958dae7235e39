"""A small model repository of linear ONNX models (metadata.json schema 1), for the engine's and the
classify path's tests. logits = flatten(input) @ W + b, so every probability can be recomputed
with numpy from the same preprocessing; the `features` output (the embedding) is flatten(input)
itself, unless a version is written as one exported before embeddings (features=False). `repo` is
a fixture: import it into a test module."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from export.preprocessing import Preprocessing, to_tensor
from service.settings import Settings

RGB8 = Preprocessing(color_mode="RGB", resize=8, crop=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
GRAY8 = Preprocessing(color_mode="L", resize=8, crop=8, mean=(0.5,), std=(0.25,))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_version(
    root: Path,
    name: str,
    version: int,
    *,
    p: Preprocessing = RGB8,
    classes: int = 4,
    fp16: bool = False,
    seed: int = 0,
    features: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Write root/name/version/{model.onnx, weights.pt, metadata.json}; return (W, b)."""
    c = p.channels
    rng = np.random.default_rng(seed)
    dtype = np.float16 if fp16 else np.float32
    w = (rng.standard_normal((c * p.crop * p.crop, classes)) * 0.3).astype(dtype)
    b = rng.standard_normal(classes).astype(dtype)
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    dim = c * p.crop * p.crop
    features_nodes = [helper.make_node("Identity", ["flat"], ["features"])] if features else []
    features_outputs = [helper.make_tensor_value_info("features", elem, ["N", dim])] if features else []
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
            *features_nodes,
        ],
        name,
        [helper.make_tensor_value_info("input", elem, ["N", c, p.crop, p.crop])],
        [helper.make_tensor_value_info("logits", elem, ["N", classes]), *features_outputs],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    folder = root / name / str(version)
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    (folder / "weights.pt").write_bytes(b"not used by the classification engine " + bytes([seed]))
    files = {
        f: {"sha256": sha256(folder / f), "bytes": (folder / f).stat().st_size}
        for f in ("model.onnx", "weights.pt")
    }
    dt = "float16" if fp16 else "float32"
    meta = {
        "schema_version": 1,
        "name": name,
        "version": version,
        "architecture": "linear",
        "input": {"name": "input", "shape": [c, p.crop, p.crop], "dtype": dt},
        "output": {"name": "logits", "shape": [classes], "dtype": dt},
        "num_classes": classes,
        "preprocessing": p.to_dict(),
        "labels": [f"class{i}" for i in range(classes)],
        "trained": False,
        "trained_on": None,
        "parameters": int(w.size + b.size),
        "flops": int(2 * w.size),
        "fp16": fp16,
        "source_checkpoint_sha256": None,
        "files": files,
        "opset": 18,
        "exporters": {"torch": "test", "onnx": onnx.__version__, "onnxscript": "test", "onnxruntime": "test"},
        "exported_at": "2026-11-25T22:00:00Z",
        "verification": {"batch": 2, "max_abs_diff": 0.0, "relative_diff": 0.0, "top1_equal": True},
        # No PyTorch module behind these: no gradient RPC of any kind.
        "capabilities": {
            "classify": True,
            "explain": False,
            "dream": False,
            "stylize": False,
            "feature_maps": False,
            "filters": False,
        },
    }
    if features:
        meta["features"] = {"name": "features", "shape": [dim], "dtype": dt, "layer": "flatten"}
        meta["capabilities"] = {**meta["capabilities"], "embed": True}  # type: ignore[dict-item]
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2))
    return w, b


@pytest.fixture
def repo(tmp_path: Path) -> dict[str, Any]:
    root = tmp_path / "repo"
    weights = {
        ("rgb", 1): add_version(root, "rgb", 1, seed=1),
        ("rgb", 2): add_version(root, "rgb", 2, seed=2),
        ("gray", 1): add_version(root, "gray", 1, p=GRAY8, classes=3, seed=3),
        ("half", 1): add_version(root, "half", 1, fp16=True, seed=4),
    }
    return {"root": root, "weights": weights}


def settings_for(root: Path, **kw: Any) -> Settings:
    params: dict[str, Any] = {
        "repository": root,
        "device": "cpu",
        "intra_op_threads": 1,
        "max_batch_size": 4,
        "preprocess_threads": 2,
        "ort_cache_dir": "none",  # never the developer's ~/.cache; test_ort_cache.py gives its own
    }
    params.update(kw)
    return Settings(**params)


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), timeout=60))


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def random_image(seed: int, size: tuple[int, int] = (12, 10)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def expected_probs(images: list[np.ndarray], p: Preprocessing, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = np.stack([to_tensor(Image.fromarray(a), p) for a in images]).astype(w.dtype)
    logits = x.reshape(len(x), -1).astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
