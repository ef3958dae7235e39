"""ModelSession: correct logits, fp16 served as exported, I/O checked against metadata, and model
files whose external data points outside their folder refused before ONNX Runtime opens them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from service.engine import session as session_mod
from service.engine.providers import CPU, CUDA, ProviderChoice, cuda_status, select_provider
from service.engine.session import (
    ModelLoadError,
    ModelRunError,
    ModelSession,
    check_external_data,
    session_options,
)
from service.settings import Settings

CHW = (3, 4, 4)
K = 5
SETTINGS = Settings(device="cpu", intra_op_threads=1)
CPU_CHOICE = ProviderChoice(CPU)


def linear_model(
    *, fp16: bool = False, input_name: str = "input", chw: tuple[int, ...] = CHW
) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """logits = flatten(input) @ W + b, with a dynamic batch dimension."""
    rng = np.random.default_rng(0)
    dtype = np.float16 if fp16 else np.float32
    features = int(np.prod(chw))
    w = rng.standard_normal((features, K)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [input_name], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info(input_name, elem, ["N", *chw])],
        [helper.make_tensor_value_info("logits", elem, ["N", K])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    return model, w, b


def save(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(model.SerializeToString())  # raw bytes: onnx.save would touch external data
    return path


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)


def test_logits_match_the_math(tmp_path: Path) -> None:
    model, w, b = linear_model()
    sess = ModelSession(save(model, tmp_path), settings=SETTINGS, provider=CPU_CHOICE, input_shape=CHW)
    assert sess.provider == CPU
    assert sess.input_shape == CHW and sess.num_classes == K and sess.batch_limit is None
    x = np.random.default_rng(1).standard_normal((6, *CHW)).astype(np.float32)
    out = sess.run(x)
    assert out.dtype == np.float32 and out.shape == (6, K)
    np.testing.assert_allclose(out, reference(x, w, b), rtol=1e-4, atol=1e-4)
    # Each row depends only on its own input: batching cannot mix images.
    np.testing.assert_allclose(sess.run(x[2:3]), out[2:3], rtol=1e-5, atol=1e-5)


def test_fp16_model_is_served_as_exported(tmp_path: Path) -> None:
    model, w, b = linear_model(fp16=True)
    sess = ModelSession(
        save(model, tmp_path), settings=SETTINGS, provider=CPU_CHOICE, input_dtype=np.float16, input_shape=CHW
    )
    x = np.random.default_rng(2).standard_normal((3, *CHW)).astype(np.float32)
    out = sess.run(x)  # float32 in, cast to float16 for the model
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference(x.astype(np.float16), w, b), rtol=2e-2, atol=5e-2)


def test_warmup_runs_every_batch_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = linear_model()
    sess = ModelSession(save(model, tmp_path), settings=SETTINGS, provider=CPU_CHOICE, input_shape=CHW)
    seen: list[int] = []
    real_run = sess.run
    monkeypatch.setattr(sess, "run", lambda x: seen.append(len(x)) or real_run(x))
    assert sess.warmup(range(1, 9)) >= 0
    assert seen == list(range(1, 9))


def test_a_fixed_batch_size_pads_and_drops_the_padding(tmp_path: Path) -> None:
    model, w, b = linear_model()
    sess = ModelSession(save(model, tmp_path), settings=SETTINGS, provider=CPU_CHOICE, input_shape=CHW)
    x = np.random.default_rng(4).standard_normal((8, *CHW)).astype(np.float32)
    unpadded = sess.run(x)
    shapes: list[tuple[int, ...]] = []
    real = sess._session.run
    sess._session.run = lambda names, feed: shapes.append(feed["input"].shape) or real(names, feed)  # type: ignore[method-assign]
    sess.fix_batch_size(8)
    for n in (1, 3, 8):
        out = sess.run(x[:n])
        assert out.shape == (n, K)  # the padding rows' outputs are dropped
        np.testing.assert_allclose(out, unpadded[:n], rtol=1e-5, atol=1e-5)
    assert shapes == [(8, *CHW)] * 3  # ONNX Runtime saw one shape only
    with pytest.raises(ModelRunError, match="over the fixed size 8"):
        sess.run(np.zeros((9, *CHW), np.float32))
    with pytest.raises(ValueError):
        sess.fix_batch_size(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_name": "data"}, "expected exactly one input named 'data'"),
        ({"input_shape": (3, 8, 8)}, "does not match metadata"),
        ({"input_dtype": np.float16}, "metadata says float16"),
        ({"output_name": "probs"}, "no output named 'probs'"),
    ],
)
def test_inputs_and_outputs_are_checked_against_metadata(tmp_path: Path, kwargs: dict, message: str) -> None:
    model, _, _ = linear_model()
    params = {"input_shape": CHW, **kwargs}
    with pytest.raises(ModelLoadError, match=message):
        ModelSession(save(model, tmp_path), settings=SETTINGS, provider=CPU_CHOICE, **params)


def test_session_options_follow_settings() -> None:
    so = session_options(Settings(graph_optimization_level="basic", intra_op_threads=3, inter_op_threads=2))
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 2
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert session_options(Settings(graph_optimization_level="disable")).graph_optimization_level == (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )


def test_a_session_that_falls_back_is_reported_or_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A choice naming CUDA whose session comes up on CPU anyway (what ORT does when CUDA breaks).
    model, _, _ = linear_model()
    path = save(model, tmp_path)
    asked = ProviderChoice(CUDA, options={"device_id": "0"}, device_id=0)
    monkeypatch.setattr(ProviderChoice, "session_providers", lambda self: [CPU])
    sess = ModelSession(path, settings=SETTINGS, provider=asked, input_shape=CHW)
    assert sess.provider == CPU  # the truth, not the request
    with pytest.raises(ModelLoadError, match="runs it on CPUExecutionProvider"):
        ModelSession(path, settings=SETTINGS, provider=asked, input_shape=CHW, require_provider=True)


# --- external data -----------------------------------------------------------------------------


def model_with_external_weight(location: str) -> onnx.ModelProto:
    model, w, _ = linear_model()
    tensor = next(t for t in model.graph.initializer if t.name == "W")
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=w.nbytes)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    return model


@pytest.fixture
def no_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if ONNX Runtime is asked to open the model at all."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("InferenceSession was created for a refused model")

    monkeypatch.setattr(session_mod.ort, "InferenceSession", forbidden)


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("../../etc/passwd", "'..'"),
        ("weights/../../../etc/passwd", "'..'"),
        ("..\\..\\etc\\passwd", "'..'"),
        ("/etc/passwd", "absolute"),
        ("C:\\Windows\\win.ini", "absolute"),
        ("", "empty location"),
        ("missing.bin", "does not exist"),
    ],
)
def test_external_data_outside_the_folder_is_refused(
    tmp_path: Path, no_session: None, location: str, why: str
) -> None:
    path = save(model_with_external_weight(location), tmp_path / "m" / "1")
    with pytest.raises(ModelLoadError, match="refusing to load") as info:
        ModelSession(path, settings=SETTINGS, provider=CPU_CHOICE, input_shape=CHW)
    assert why in str(info.value) and "'W'" in str(info.value)


def test_external_data_through_a_symlink_is_refused(tmp_path: Path, no_session: None) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x00" * 4096)
    folder = tmp_path / "m" / "1"
    path = save(model_with_external_weight("weights.bin"), folder)
    os.symlink(secret, folder / "weights.bin")
    with pytest.raises(ModelLoadError, match="symlink"):
        check_external_data(path)
    # A symlinked directory on the way is just as bad.
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", folder / "sub")
    (tmp_path / "outside" / "w.bin").write_bytes(b"\x00" * 4096)
    path = save(model_with_external_weight("sub/w.bin"), folder, "other.onnx")
    with pytest.raises(ModelLoadError, match="symlink"):
        check_external_data(path)


def test_external_data_in_a_node_attribute_is_checked(tmp_path: Path, no_session: None) -> None:
    model, _, _ = linear_model()
    value = numpy_helper.from_array(np.zeros(K, np.float32), "c")
    external_data_helper.set_external_data(value, location="../../../etc/shadow")
    value.ClearField("raw_data")
    value.data_location = TensorProto.EXTERNAL
    model.graph.node.append(helper.make_node("Constant", [], ["unused"], value=value))
    with pytest.raises(ModelLoadError, match="etc/shadow"):
        check_external_data(save(model, tmp_path))


def test_external_data_inside_the_folder_loads(tmp_path: Path) -> None:
    model, w, b = linear_model()
    folder = tmp_path / "m" / "1"
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert check_external_data(path) == [(folder / "weights.bin").resolve()]
    sess = ModelSession(path, settings=SETTINGS, provider=CPU_CHOICE, input_shape=CHW)
    x = np.ones((2, *CHW), np.float32)
    np.testing.assert_allclose(sess.run(x), reference(x, w, b), rtol=1e-4, atol=1e-4)


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07garbage that is not a protobuf\xff\xff")
    with pytest.raises(ModelLoadError):
        ModelSession(path, settings=SETTINGS, provider=CPU_CHOICE, input_shape=CHW)


# --- GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_status(0).usable, reason="no usable CUDA device")
@pytest.mark.parametrize("fp16", [False, True])
def test_cuda_io_binding_matches_cpu(tmp_path: Path, fp16: bool) -> None:
    model, _, _ = linear_model(fp16=fp16)
    path = save(model, tmp_path)
    dtype = np.float16 if fp16 else np.float32
    gpu = ModelSession(
        path,
        settings=Settings(device="cuda"),
        provider=select_provider(Settings(device="cuda")),
        input_dtype=dtype,
        input_shape=CHW,
        require_provider=True,
    )
    cpu = ModelSession(path, settings=SETTINGS, provider=CPU_CHOICE, input_dtype=dtype, input_shape=CHW)
    assert gpu.provider == CUDA
    gpu.warmup(range(1, 5))
    x = np.random.default_rng(3).standard_normal((4, *CHW)).astype(np.float32)
    # fp32 on CUDA uses TF32 tensor cores (ONNX Runtime's use_tf32 default): ~1e-3 relative.
    np.testing.assert_allclose(gpu.run(x), cpu.run(x), rtol=1e-2, atol=1e-2 if fp16 else 5e-3)


@pytest.mark.parametrize(("spinning", "entry"), [(False, "0"), (True, "1")])
def test_intra_op_spinning_follows_the_setting(spinning: bool, entry: str) -> None:
    so = session_options(Settings(intra_op_spinning=spinning))
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == entry


def test_the_cpu_memory_arena_is_off_unless_asked_for() -> None:
    """Settings.ort_cpu_mem_arena (issue 13): activations are returned after each run by default."""
    assert session_options(Settings()).enable_cpu_mem_arena is False
    assert session_options(Settings(ort_cpu_mem_arena=True)).enable_cpu_mem_arena is True
