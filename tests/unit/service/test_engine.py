"""ClassificationEngine against a small model repository built here (metadata.json schema 1).

The models are linear: logits = flatten(input) @ W + b, so every probability the engine returns can
be recomputed with numpy from the same preprocessing.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from export.preprocessing import Preprocessing, to_tensor
from service.catalog import ModelLoadError
from service.classify import engine as engine_mod
from service.classify.engine import ClassificationEngine
from service.classify.session import ModelSession
from service.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from service.observability import metrics
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
) -> tuple[np.ndarray, np.ndarray]:
    """Write root/name/version/{model.onnx, weights.pt, metadata.json}; return (W, b)."""
    c = p.channels
    rng = np.random.default_rng(seed)
    dtype = np.float16 if fp16 else np.float32
    w = (rng.standard_normal((c * p.crop * p.crop, classes)) * 0.3).astype(dtype)
    b = rng.standard_normal(classes).astype(dtype)
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
        ],
        name,
        [helper.make_tensor_value_info("input", elem, ["N", c, p.crop, p.crop])],
        [helper.make_tensor_value_info("logits", elem, ["N", classes])],
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
        "capabilities": {"classify": True, "explain": False, "dream": False, "stylize": False},
    }
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


def test_warmup_covers_every_batch_size_and_metrics_are_set(
    repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[list[int]] = []
    real = ModelSession.warmup

    def recording(self: ModelSession, batch_sizes: Any) -> float:
        sizes.append(list(batch_sizes))
        return real(self, sizes[-1])

    monkeypatch.setattr(ModelSession, "warmup", recording)
    ClassificationEngine(settings_for(repo["root"], models="gray", max_batch_size=5)).load()
    assert sizes == [[1, 2, 3, 4, 5]]
    # warmup_batch_sizes limits it (a list: sizes over the batch limit skipped; none: no warm-up)
    for setting, expected in (("8,1,4,4", [1, 4]), ("none", [])):
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


# --- requests ------------------------------------------------------------------------------------


def test_classify_images_matches_numpy_and_keeps_order(repo: dict[str, Any]) -> None:
    w, b = repo["weights"][("rgb", 2)]
    arrays = [random_image(i, (12 + i, 10)) for i in range(7)]  # 7 > max_batch_size 4: two batches

    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="rgb"))
        await asyncio.to_thread(engine.load)
        assert not engine.ready
        await engine.start()
        assert engine.ready
        probs, timings = await engine.classify_images(engine.get("rgb"), [png(a) for a in arrays], None)
        assert probs.dtype == np.float32 and probs.shape == (7, 4)
        np.testing.assert_allclose(probs, expected_probs(arrays, RGB8, w, b), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        assert timings.decode_s > 0 and timings.preprocess_s > 0 and timings.inference_s > 0
        assert timings.queue_s >= 0
        await engine.stop()
        assert not engine.ready
        with pytest.raises(Unavailable):
            await engine.classify_images(engine.get("rgb"), [png(arrays[0])], None)

    run(main)


def test_one_bad_image_names_its_index(repo: dict[str, Any]) -> None:
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")

    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="rgb"))
        engine.load()
        await engine.start()
        model = engine.get("rgb")
        with pytest.raises(InvalidArgument) as info:
            await engine.classify_images(model, [png(random_image(0)), gif.getvalue(), b""], None)
        assert info.value.message.startswith(
            ("image 1: unsupported image format GIF", "image 2: empty image")
        )
        with pytest.raises(InvalidArgument) as info:
            await engine.classify_images(model, [gif.getvalue()], None)
        assert info.value.message == "unsupported image format GIF; send JPEG, PNG or WebP"
        with pytest.raises(InvalidArgument, match="max_images_per_request"):
            await engine.classify_images(model, [b"x"] * 257, None)
        await engine.stop()

    run(main)


def test_grayscale_model_and_tensor_paths(repo: dict[str, Any]) -> None:
    w, b = repo["weights"][("gray", 1)]

    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="gray"))
        engine.load()
        await engine.start()
        model = engine.get("gray")
        color = random_image(5)
        probs, _ = await engine.classify_images(model, [png(color)], None)
        np.testing.assert_allclose(probs, expected_probs([color], GRAY8, w, b), rtol=1e-4, atol=1e-6)
        x = np.random.default_rng(9).standard_normal((3, 1, 8, 8)).astype(np.float32)
        logits, timings = await engine.infer(model, x, None)
        want = x.reshape(3, -1).astype(np.float64) @ w + b
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
        assert timings.decode_s == 0 and timings.inference_s > 0
        probs, _ = await engine.classify_tensors(model, x[0], None)  # a single (C, H, W) tensor
        np.testing.assert_allclose(probs[0], np.exp(want[0]) / np.exp(want[0]).sum(), rtol=1e-4)
        with pytest.raises(InvalidArgument, match=r"expected shape \[N,1,8,8\], got \[2,3,8,8\]"):
            await engine.infer(model, np.zeros((2, 3, 8, 8), np.float32), None)
        with pytest.raises(InvalidArgument, match="NaN or infinite"):
            await engine.infer(model, np.full((1, 1, 8, 8), np.nan, np.float32), None)
        await engine.stop()

    run(main)


def test_fp16_model(repo: dict[str, Any]) -> None:
    w, b = repo["weights"][("half", 1)]
    image = random_image(11)

    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="half"))
        engine.load()
        await engine.start()
        model = engine.get("half")
        assert model.input_dtype == np.float16
        probs, _ = await engine.classify_images(model, [png(image)], None)
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs, expected_probs([image], RGB8, w, b), atol=2e-2)
        x = np.zeros((1, 3, 8, 8), np.float32)
        x[0, 0, 0, 0] = 1e6  # fine in float32, inf in float16
        with pytest.raises(InvalidArgument, match="NaN or infinite"):
            await engine.classify_tensors(model, x, None)
        logits, _ = await engine.infer(model, np.zeros((2, 3, 8, 8), np.float16), None)
        assert logits.dtype == np.float32
        np.testing.assert_allclose(logits, np.broadcast_to(b.astype(np.float32), (2, 4)), atol=1e-3)
        await engine.stop()

    run(main)


def test_concurrent_requests_share_batches_and_get_their_own_answers(repo: dict[str, Any]) -> None:
    w, b = repo["weights"][("rgb", 2)]
    arrays = [random_image(100 + i) for i in range(24)]
    before = metrics.registry.get_sample_value("cnnserve_batch_size_count", {"model": "rgb"}) or 0.0

    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="rgb", max_batch_size=8))
        engine.load()
        await engine.start()
        model = engine.get("rgb")
        results = await asyncio.gather(*(engine.classify_images(model, [png(a)], None) for a in arrays))
        for a, (probs, _) in zip(arrays, results, strict=True):
            np.testing.assert_allclose(probs, expected_probs([a], RGB8, w, b), rtol=1e-4, atol=1e-6)
        await engine.stop()

    run(main)
    batches = (
        metrics.registry.get_sample_value("cnnserve_batch_size_count", {"model": "rgb"}) or 0.0
    ) - before
    assert batches < len(arrays)  # merged: fewer ONNX Runtime calls than requests


def test_deadline(repo: dict[str, Any]) -> None:
    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="rgb"))
        engine.load()
        await engine.start()
        with pytest.raises(DeadlineExceeded):
            await engine.classify_images(engine.get("rgb"), [png(random_image(1))], time.monotonic() - 0.01)
        with pytest.raises(DeadlineExceeded):
            await engine.infer(engine.get("rgb"), np.zeros((1, 3, 8, 8), np.float32), time.monotonic() - 0.01)
        await engine.stop()

    run(main)


def test_softmax_is_stable() -> None:
    logits = np.array([[1000.0, 1000.0, -1000.0], [-1e4, 0.0, 1e4]], dtype=np.float32)
    probs = engine_mod.softmax(logits)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], atol=1e-7)


def test_a_single_image_is_decoded_on_the_event_loop_when_tiny_or_alone(
    repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preprocessing pool is skipped (two thread hops cost more than they buy) for one tiny
    image for a tiny model, always, and for one image of at most IDLE_INLINE_MAX_PIXELS when no other
    classification is in progress. Anything else, or a small file declaring a bigger image than
    the case allows (parsed from the header first), still goes to the pool."""
    import threading

    from service.classify.engine import IDLE_INLINE_MAX_PIXELS, INLINE_MAX_BYTES

    w, b = repo["weights"][("gray", 1)]

    async def main() -> None:
        engine = ClassificationEngine(settings_for(repo["root"], models="gray", preprocess_threads=2))
        engine.load()
        await engine.start()
        model = engine.get("gray")
        pool_calls: list[int] = []
        on_pool = engine._on_pool

        async def counted(jobs: Any, deadline: float | None) -> Any:
            jobs = list(jobs)
            pool_calls.append(len(jobs))
            return await on_pool(jobs, deadline)

        monkeypatch.setattr(engine, "_on_pool", counted)
        color = random_image(5)
        declared_big = png(np.zeros((200, 200, 3), np.uint8))  # a small file, 40,000 pixels
        assert len(declared_big) <= INLINE_MAX_BYTES
        medium = random_image(6, (300, 200))  # 60,000 pixels, a file far over INLINE_MAX_BYTES
        assert len(png(medium)) > INLINE_MAX_BYTES
        over = png(np.zeros((600, 600, 3), np.uint8))
        assert 600 * 600 > IDLE_INLINE_MAX_PIXELS

        # Alone: every single image up to the idle cap is decoded on the loop.
        for image in (color, medium):
            probs, timings = await engine.classify_images(model, [png(image)], None)
            np.testing.assert_allclose(probs, expected_probs([image], GRAY8, w, b), rtol=1e-4, atol=1e-6)
            assert timings.decode_s > 0
        await engine.classify_images(model, [declared_big], None)
        assert pool_calls == []
        await engine.classify_images(model, [over], None)
        await engine.classify_images(model, [png(color), png(color)], None)
        assert pool_calls == [1, 2]
        with pytest.raises(InvalidArgument, match="corrupt"):  # refused on the loop, as on the pool
            await engine.classify_images(model, [b"\x89PNG\r\n\x1a\n" + b"\x00" * 40], None)

        # Busy: another request holds a pool thread (its decoding waits for `gate`).
        gate = threading.Event()
        blocker_images = [over]
        prepare = engine._prepare

        def gated(served: Any, images: list[bytes], *args: Any, **kwargs: Any) -> Any:
            if images is blocker_images:
                assert gate.wait(30)
            return prepare(served, images, *args, **kwargs)

        monkeypatch.setattr(engine, "_prepare", gated)
        pool_calls.clear()
        blocker = asyncio.create_task(engine.classify_images(model, blocker_images, None))
        while pool_calls != [1]:
            await asyncio.sleep(0.001)
        probs, _ = await engine.classify_images(model, [png(color)], None)  # tiny: still inline
        np.testing.assert_allclose(probs, expected_probs([color], GRAY8, w, b), rtol=1e-4, atol=1e-6)
        assert pool_calls == [1]
        probs, _ = await engine.classify_images(model, [png(medium)], None)
        np.testing.assert_allclose(probs, expected_probs([medium], GRAY8, w, b), rtol=1e-4, atol=1e-6)
        await engine.classify_images(model, [declared_big], None)
        assert pool_calls == [1, 1, 1]
        gate.set()
        await blocker
        assert engine._active == 0
        await engine.stop()

    run(main)


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (16, 8), (None, 1)])
def test_preprocessing_takes_half_the_cores_by_default(
    monkeypatch: pytest.MonkeyPatch, cores: int | None, threads: int
) -> None:
    from service.classify import engine as engine_mod

    monkeypatch.setattr(engine_mod.os, "cpu_count", lambda: cores)
    assert engine_mod.default_preprocess_threads() == threads
