"""export.onnx_export: dynamic-batch export, checker, ONNX Runtime parity, and refusals that leave nothing.

Each architecture is exported once per module into a shared repository; the parity checks then run
the exported file with ONNX Runtime on inputs of their own (a batch size the export never saw) against
the PyTorch model rebuilt from the version's weights.pt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from export import onnx_export
from export.checkpoints import load_weights
from export.errors import UsageError, VerificationError
from export.models import build, get_spec
from export.publish import ExportResult, export_to_repository
from export.repository import load_metadata, scan, verify_files

FAST = ["lenet5", "alexnet", "googlenet", "resnet18"]
SLOW = ["resnet34", "resnet50", "resnet101", "resnet152", "vgg19", "alexnet_torchvision"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportResult]:
    """The fast architectures, exported once for the module (about 20 s on two cores)."""
    root = tmp_path_factory.mktemp("onnx") / "repository"
    return {arch: export_to_repository(arch, root) for arch in FAST}


def _check_parity(result: ExportResult, arch: str) -> None:
    version = result.version
    verify_files(version)
    assert sorted(p.name for p in version.path.iterdir()) == ["metadata.json", "model.onnx", "weights.pt"]
    proto = onnx.load(str(version.onnx_path), load_external_data=False)
    assert not [t.name for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    onnx.checker.check_model(str(version.onnx_path), full_check=True)
    (inp,) = proto.graph.input
    out, features_out = proto.graph.output
    assert (inp.name, out.name, features_out.name) == ("input", "logits", "features")
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == list(get_spec(arch).input_shape)
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == TensorProto.FLOAT
    assert features_out.type.tensor_type.elem_type == TensorProto.FLOAT
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == 18

    # Recorded verification met the documented bound ...
    v = result.verification
    assert v.batch == 4 and v.relative_diff <= 1e-4 and v.top1_equal and v.provider == "CPUExecutionProvider"
    assert v.features_relative_diff is not None and v.features_relative_diff <= 1e-4
    assert version.metadata["verification"]["relative_diff"] == v.relative_diff
    assert version.metadata["verification"]["features_relative_diff"] == v.features_relative_diff
    # ... and an independent run agrees: new inputs, batch 3, model rebuilt from weights.pt; the
    # features against the PyTorch penultimate activations taken by a forward hook on the head.
    spec = get_spec(arch)
    model = build(arch, **version.build_kwargs)
    load_weights(model, version.weights_path, arch)
    penultimate: list[torch.Tensor] = []
    model.get_submodule(spec.head).register_forward_hook(lambda _m, i, _o: penultimate.append(i[0]))
    x = torch.randn(3, *spec.input_shape, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        expected = model(x).numpy()
    expected_features = penultimate[0].numpy()
    dim = {"lenet5": 84, "googlenet": 1024, "resnet18": 512, "resnet34": 512}.get(arch, 2048)
    dim = 4096 if arch.startswith(("alexnet", "vgg")) else dim
    assert expected_features.shape == (3, dim) and version.metadata["features"]["shape"] == [dim]
    session = ort.InferenceSession(str(version.onnx_path), providers=["CPUExecutionProvider"])
    got, got_features = session.run(["logits", "features"], {"input": x.numpy()})
    assert got.shape == (3, spec.num_classes) and got.dtype == np.float32
    for ort_out, torch_out in ((got, expected), (got_features, expected_features)):
        scale = float(np.abs(torch_out).max())
        assert scale > 0
        assert float(np.abs(ort_out - torch_out).max()) / scale <= 1e-4
    assert np.array_equal(got.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("arch", FAST)
def test_fast_architectures_export_with_parity(exported: dict[str, ExportResult], arch: str) -> None:
    _check_parity(exported[arch], arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", SLOW)
def test_large_architectures_export_with_parity(tmp_path: Path, arch: str) -> None:
    _check_parity(export_to_repository(arch, tmp_path), arch)


def test_random_weights_are_seeded_and_recorded_as_untrained(
    exported: dict[str, ExportResult], tmp_path: Path
) -> None:
    again = export_to_repository("lenet5", tmp_path)
    first = exported["lenet5"].version
    assert again.version.metadata["files"]["weights.pt"] == first.metadata["files"]["weights.pt"]
    other = export_to_repository("lenet5", tmp_path, seed=1)
    assert other.version.metadata["files"]["weights.pt"] != first.metadata["files"]["weights.pt"]
    assert first.metadata["trained"] is False and first.metadata["trained_on"] is None


def test_capabilities_follow_the_architecture(exported: dict[str, ExportResult]) -> None:
    caps = {arch: exported[arch].version.capabilities for arch in FAST}
    assert caps["lenet5"] == {
        "classify": True, "embed": True, "explain": False, "dream": False, "stylize": False,
        "feature_maps": True, "filters": True,
    }  # fmt: skip
    for arch in ("alexnet", "googlenet", "resnet18"):
        assert caps[arch] == {
            "classify": True,
            "embed": True,
            "explain": True,
            "dream": True,
            "stylize": False,
            "feature_maps": True,
            "filters": True,
        }
    assert onnx_export.STYLIZE_ARCHITECTURES == {"vgg19"}


def test_metadata_describes_the_expected_input(exported: dict[str, ExportResult]) -> None:
    from export.preprocessing import describe_input

    for arch in FAST:
        version = exported[arch].version
        assert version.metadata["input"]["description"] == describe_input(version.preprocessing)
    assert "white (bright) strokes" in exported["lenet5"].version.metadata["input"]["description"]


@pytest.mark.parametrize("arch", ["lenet5", "resnet18"])
def test_fp16_export_has_float16_io_and_meets_its_bound(tmp_path: Path, arch: str) -> None:
    result = export_to_repository(arch, tmp_path, fp16=True)
    meta = result.version.metadata
    assert meta["fp16"] is True and meta["input"]["dtype"] == meta["output"]["dtype"] == "float16"
    proto = onnx.load(str(result.version.onnx_path))
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert all(
        t.data_type == TensorProto.FLOAT16 for t in proto.graph.initializer if t.dims and len(t.dims) > 1
    )
    v = result.verification
    assert v.relative_diff <= onnx_export.FP16_MAX_RELATIVE_DIFF == 1e-2
    assert v.top1_agreement >= onnx_export.FP16_MIN_TOP1_AGREEMENT == 0.75
    assert meta["verification"]["reference"] == "pytorch float32"
    # weights.pt stays the float32 state_dict the gradient workers load
    state = torch.load(result.version.weights_path, weights_only=True)
    assert all(t.dtype != torch.float16 for t in state.values())


def _lenet_scaled(factor: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build("lenet5")
    with torch.no_grad():
        model.classifier[2].weight.mul_(factor)
        model.classifier[2].bias.mul_(factor)
    return model


@pytest.mark.parametrize(
    ("factor", "message"),
    [(1e-7, "below float16's smallest normal number"), (1e7, "beyond float16's largest number 65504")],
)
def test_fp16_is_refused_where_the_logits_do_not_fit_float16(
    tmp_path: Path, factor: float, message: str
) -> None:
    with pytest.raises(
        VerificationError, match=f"float16 export is meaningless for these weights: .*{message}"
    ):
        export_to_repository("lenet5", tmp_path, model=_lenet_scaled(factor), fp16=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # the same weights in float32 are fine
    export_to_repository("lenet5", tmp_path, model=_lenet_scaled(factor))


def test_a_parity_failure_is_refused_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sabotage the export (a different network's weights in model.onnx): the ORT check catches it."""
    real = onnx_export.export_onnx

    def wrong_weights(model: torch.nn.Module, *args: object, **kwargs: object) -> None:
        torch.manual_seed(99)
        real(build("lenet5"), *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_export, "export_onnx", wrong_weights)
    (tmp_path / "lenet5").mkdir()
    with pytest.raises(
        VerificationError, match=r"float32 ONNX model disagrees with PyTorch: relative diff .* > 0.0001"
    ):
        export_to_repository("lenet5", tmp_path)
    assert list((tmp_path / "lenet5").iterdir()) == []


def test_check_refuses_a_model_that_breaks_the_interface(tmp_path: Path) -> None:
    def save(name: str, inp: str, out: str, batch: int | str) -> Path:
        graph = helper.make_graph(
            [helper.make_node("Identity", [inp], [out])],
            "g",
            [helper.make_tensor_value_info(inp, TensorProto.FLOAT, [batch, 3])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, 3])],
        )
        path = tmp_path / name
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
        return path

    onnx_export.check(save("ok.onnx", "input", "logits", "N"), 18)
    with pytest.raises(VerificationError, match=r"has inputs \['x'\] and outputs \['logits'\]"):
        onnx_export.check(save("names.onnx", "x", "logits", "N"))
    with pytest.raises(VerificationError, match=r"has a fixed batch dimension \(2\)"):
        onnx_export.check(save("fixed.onnx", "input", "logits", 2))
    with pytest.raises(VerificationError, match="produced opset 18, not the requested 17"):
        onnx_export.check(save("opset.onnx", "input", "logits", "N"), 17)
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(VerificationError, match="junk.onnx fails onnx.checker"):
        onnx_export.check(tmp_path / "junk.onnx")


def test_external_data_is_folded_back_into_one_file(tmp_path: Path) -> None:
    weights = np.arange(4096, dtype=np.float32).reshape(64, 64)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 64])],
        [onnx.numpy_helper.from_array(weights, "W")],
    )
    path = tmp_path / "model.onnx"
    onnx.save_model(
        helper.make_model(graph),
        str(path),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "model.onnx.data").exists()
    onnx_export._inline_external_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    reloaded = onnx.load(str(path), load_external_data=False)
    assert np.array_equal(onnx.numpy_helper.to_array(reloaded.graph.initializer[0]), weights)


def test_opset_choices(tmp_path: Path) -> None:
    for bad in (16, 99):
        with pytest.raises(UsageError, match=f"--opset must be between 17 and 23, got {bad}"):
            export_to_repository("lenet5", tmp_path, opset=bad)
    result = export_to_repository("lenet5", tmp_path, opset=17)
    assert result.version.metadata["opset"] == 17
    proto = onnx.load(str(result.version.onnx_path))
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == 17
    assert [v.version for v in scan(tmp_path)] == [1]


def test_trained_lenet5_records_its_held_out_accuracy_measured_on_the_onnx_file(
    tmp_path: Path, lenet5_checkpoint: Path
) -> None:
    result = export_to_repository("lenet5", tmp_path, weights=lenet5_checkpoint, name="digits", version=5)
    meta = load_metadata(tmp_path / "digits" / "5")
    assert result.version.path == tmp_path / "digits" / "5"
    assert meta["trained"] is True and meta["trained_on"] == "digits"
    assert meta["source_checkpoint_sha256"] == meta["files"]["weights.pt"]["sha256"]  # saved unchanged
    assert meta["evaluation"]["samples"] == 360 and meta["evaluation"]["accuracy"] >= 0.97


def test_googlenet_from_a_checkpoint_gets_torchvision_input_transform(tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = tmp_path / "googlenet.pt"
    torch.save(build("googlenet").state_dict(), checkpoint)
    result = export_to_repository("googlenet", tmp_path / "repo", weights=checkpoint)
    assert result.version.build_kwargs == {"transform_input": True}
    assert result.version.metadata["trained_on"] == "imagenet"
    # the ONNX graph carries the transform: it matches the module built with it, not without
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(str(result.version.onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input": x.numpy()})
    with_transform = build("googlenet", transform_input=True)
    load_weights(with_transform, checkpoint, "googlenet")
    with torch.no_grad():
        expected = with_transform(x).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
