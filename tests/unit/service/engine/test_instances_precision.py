"""A model's config.yaml `instances` (ONNX Runtime sessions per version, each computing a batch at
once) and `precision` (fp16 at load, checked against float32) (issue 13), through the real engine."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from linear_repo import repo, run, settings_for  # noqa: F401 - repo is a fixture
from servicer_fakes import Harness

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service._proto.inference import grpc_predict_v2_pb2 as oip
from service._proto.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from service.catalog import ModelLoadError
from service.engine.engine import ClassificationEngine
from service.engine.precision import check_fp16
from service.observability import metrics


def configure(root: Path, model: str, text: str) -> None:
    (root / model / "config.yaml").write_text(text)


def linear(x: np.ndarray, weights: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    w, b = weights
    return x.reshape(len(x), -1).astype(np.float64) @ w.astype(np.float64) + b


def test_instances_run_batches_at_once_and_are_reported(
    repo: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import service.engine.engine as engine_mod

    monkeypatch.setattr(engine_mod.os, "cpu_count", lambda: 8)
    root = repo["root"]
    configure(root, "gray", "instances: 2\n")
    engine = ClassificationEngine(settings_for(root, models="gray,rgb", intra_op_threads=0))
    h = Harness(engine, repository=root, models="gray,rgb")  # type: ignore[arg-type]
    try:
        gray, rgb = engine.get("gray"), engine.get("rgb")
        assert engine.capacity(gray) == 256 + 2 * 4 and engine.capacity(rgb) == 256 + 4
        info = pb_grpc.InferenceStub(h.channel).GetModel(pb.GetModelRequest(name="gray"), timeout=5)
        # The 8 cores split between the two sessions; rgb's one session keeps ONNX Runtime's default.
        assert info.serving.instances == 2 and info.serving.intra_op_threads == 4
        assert info.serving.precision == "fp32"
        other = pb_grpc.InferenceStub(h.channel).GetModel(pb.GetModelRequest(name="rgb"), timeout=5)
        assert other.serving.instances == 1 and other.serving.intra_op_threads == 0
        config = oip_grpc.GRPCInferenceServiceStub(h.channel).ModelConfig(
            oip.ModelConfigRequest(name="gray"), timeout=5
        )
        assert [group.count for group in config.config.instance_group] == [2]
    finally:
        h.close()


def test_two_instances_answer_every_request_with_its_own_rows(repo: dict[str, Any]) -> None:  # noqa: F811
    root = repo["root"]
    configure(root, "gray", "instances: 2\nmax_batch_size: 2\nmax_queue_delay_s: 0\n")
    engine = ClassificationEngine(settings_for(root, models="gray"))
    engine.load()
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((1 + i % 3, 1, 8, 8)).astype(np.float32) for i in range(60)]

    async def main() -> None:
        await engine.start()
        gray = engine.get("gray")
        batches_before = (
            metrics.registry.get_sample_value("cnnserve_batch_size_count", {"model": "gray"}) or 0
        )

        async def one(x: np.ndarray) -> np.ndarray:
            logits, _ = await engine.run(gray, x, None, engine.reserve(gray, len(x)))
            return logits

        outputs = await asyncio.gather(*(one(x) for x in inputs))
        for x, y in zip(inputs, outputs, strict=True):
            np.testing.assert_allclose(y, linear(x, repo["weights"][("gray", 1)]), rtol=1e-4, atol=1e-4)
        batches = (
            metrics.registry.get_sample_value("cnnserve_batch_size_count", {"model": "gray"}) - batches_before
        )
        assert batches >= sum(len(x) for x in inputs) / 2  # batches of at most 2 rows
        assert len(engine._served[("gray", 1)].sessions) == 2
        await engine.stop()

    run(main)


def test_precision_fp16_converts_an_fp32_export_and_checks_it(repo: dict[str, Any]) -> None:  # noqa: F811
    root = repo["root"]
    configure(root, "rgb", "precision: fp16\nversion_policy: {latest: 1}\n")
    configure(root, "half", "precision: fp16\n")  # already an fp16 export: served as it is
    engine = ClassificationEngine(settings_for(root, models="rgb,half"))
    engine.load()
    rgb, half = engine.get("rgb"), engine.get("half")
    assert rgb.serving is not None and rgb.serving.precision == "fp16 (converted at load)"
    assert half.serving is not None and half.serving.precision == "fp16"
    assert rgb.input_dtype == np.dtype(np.float32)  # keep_io_types: clients send what they sent
    x = np.random.default_rng(3).standard_normal((4, 3, 8, 8)).astype(np.float32)

    async def main() -> None:
        await engine.start()
        logits, _ = await engine.run(rgb, x, None, engine.reserve(rgb, 4))
        await engine.stop()
        reference = linear(x, repo["weights"][("rgb", 2)])
        error = np.abs(logits - reference).max() / np.abs(reference).max()
        assert 0 < error < 1e-2  # float16's rounding, within the export's bound
        assert logits.dtype == np.float32

    run(main)


def test_precision_fp32_refuses_an_fp16_export_and_the_others_serve(repo: dict[str, Any]) -> None:  # noqa: F811
    root = repo["root"]
    configure(root, "half", "precision: fp32\n")
    engine = ClassificationEngine(settings_for(root, models="half,gray"))
    failures_before = (
        metrics.registry.get_sample_value(
            "cnnserve_model_load_failures_total", {"model": "half", "version": "1"}
        )
        or 0
    )
    engine.load()
    assert [m.name for m in engine.models()] == ["gray"]
    failures = metrics.registry.get_sample_value(
        "cnnserve_model_load_failures_total", {"model": "half", "version": "1"}
    )
    assert failures == failures_before + 1


def test_precision_fp16_refuses_a_model_float16_cannot_represent(repo: dict[str, Any]) -> None:  # noqa: F811
    root = repo["root"]
    configure(root, "gray", "precision: fp16\n")
    path = root / "gray" / "1" / "model.onnx"
    # Shrink gray's weights so its logits underflow float16 (random GoogLeNet's do: ~1e-11), keeping
    # metadata.json's sha256 right: only the fp16 check may refuse it.
    import json

    import onnx
    from linear_repo import sha256
    from onnx import numpy_helper

    model = onnx.load(str(path))
    for i, tensor in enumerate(model.graph.initializer):
        model.graph.initializer[i].CopyFrom(
            numpy_helper.from_array(numpy_helper.to_array(tensor) * 1e-9, tensor.name)
        )
    onnx.save(model, str(path))
    meta_path = path.parent / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["model.onnx"] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    meta_path.write_text(json.dumps(meta))
    engine = ClassificationEngine(settings_for(root, models="gray"))
    with pytest.raises(ModelLoadError, match="smallest normal"):
        engine.load()


def test_check_fp16_bounds() -> None:
    reference = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    check, refused = check_fp16(reference, reference + 1e-3)
    assert refused is None and check.relative_diff == pytest.approx(1e-3 / 3)
    _, refused = check_fp16(reference, reference + 0.1)
    assert refused is not None and "relative diff" in refused
    _, refused = check_fp16(reference, reference[:, ::-1])  # every top-1 differs
    assert refused is not None and "top-1 equal on 0%" in refused
    _, refused = check_fp16(reference * 1e5, np.full((2, 3), np.inf))
    assert refused is not None and "beyond float16" in refused
