"""`python -m export import`: an ONNX image classifier from elsewhere becomes a repository version.

The graphs are built with onnx.helper (tests/conftest.py onnx_classifier: milliseconds, no
exporter). Good imports are served as the engine serves them (NCHW, a dynamic batch, every file
hashed); every bad one is refused with one `error:` line naming the problem, and nothing is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_runs import run_cli, tree
from onnx import TensorProto, helper

from export.repository import read_version, scan, verify_files

Build = Callable[..., Any]  # tests/conftest.py build_onnx_classifier
PREPROCESSING = {"color_mode": "RGB", "resize": 36, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "labels.txt").write_text("".join(f"class {i}\n" for i in range(5)))
    (tmp_path / "pre.json").write_text(json.dumps(PREPROCESSING))
    (tmp_path / "repo").mkdir()
    return tmp_path


def _import(work: Path, model: str, *extra: str) -> list[str]:
    return [
        "import", str(work / model), "--name", "mine", "--labels", str(work / "labels.txt"),
        "--preprocessing", str(work / "pre.json"), "--repository", str(work / "repo"), *extra,
    ]  # fmt: skip


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_import_writes_a_version_the_engine_can_serve(
    work: Path, make_onnx_classifier: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_onnx_classifier(work / "model.onnx")
    code, out, err = run_cli(_import(work, "model.onnx", "--trained-on", "my photos"), capsys)
    assert code == 0, err
    assert "mine v1" in out and "5 classes, input NCHW, batch dynamic" in out
    (version,) = scan(work / "repo", strict=True)
    verify_files(version)
    meta = version.metadata
    assert version.imported and meta["architecture"] == "imported-onnx"
    assert meta["labels"] == [f"class {i}" for i in range(5)] and meta["trained_on"] == "my photos"
    assert meta["preprocessing"] == {**PREPROCESSING, "invert": False}
    assert meta["input"] == {
        "name": "image",
        "shape": [3, 32, 32],
        "dtype": "float32",
        "description": (
            "a RGB image, any size; the shorter side is resized to 36 and the centre 32x32 cropped"
        ),
    }
    assert meta["output"] == {"name": "logits", "shape": [5], "dtype": "float32"}
    assert "features" not in meta and meta["layers"] == []
    assert meta["capabilities"] == {
        "classify": True, "embed": False, "explain": False, "dream": False, "stylize": False,
        "feature_maps": False, "filters": False,
    }  # fmt: skip
    assert set(meta["files"]) == {"model.onnx"}  # no weights.pt: nothing to build a module from
    assert meta["imported"]["source_sha256"] == meta["files"]["model.onnx"]["sha256"]
    # The version's graph computes exactly what the user's does.
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (want,) = _session(source).run(None, {"image": x})
    (got,) = _session(version.onnx_path).run(None, {"image": x})
    np.testing.assert_array_equal(got, want)


def test_a_fixed_batch_of_one_is_made_dynamic_and_runs_batches(
    work: Path, make_onnx_classifier: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    make_onnx_classifier(work / "fixed.onnx", batch=1)
    code, out, err = run_cli(_import(work, "fixed.onnx"), capsys)
    assert code == 0, err
    assert "batch made dynamic (was fixed 1)" in out
    (version,) = scan(work / "repo", strict=True)
    assert version.metadata["imported"]["batch"] == "made dynamic (was fixed 1)"
    graph = onnx.load(str(version.onnx_path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    (got,) = _session(version.onnx_path).run(None, {"image": np.ones((4, 3, 32, 32), np.float32)})
    assert got.shape == (4, 5)


def test_nhwc_gets_a_transpose_in_front_and_serves_nchw(
    work: Path, make_onnx_classifier: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_onnx_classifier(work / "nhwc.onnx", layout="NHWC")
    code, out, err = run_cli(_import(work, "nhwc.onnx"), capsys)
    assert code == 0, err
    assert "input NHWC" in out
    (version,) = scan(work / "repo", strict=True)
    meta = version.metadata
    assert meta["imported"]["layout"] == "NHWC" and meta["input"]["shape"] == [3, 32, 32]
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    (want,) = _session(source).run(None, {"image": x.transpose(0, 2, 3, 1)})
    (got,) = _session(version.onnx_path).run(None, {meta["input"]["name"]: x})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_external_data_inside_the_folder_is_copied_into_the_version(
    work: Path, capsys: pytest.CaptureFixture[str], build_onnx_classifier: Build
) -> None:
    onnx_classifier = build_onnx_classifier
    (work / "weights").mkdir()
    onnx.save_model(
        onnx_classifier(), str(work / "ext.onnx"), save_as_external_data=True,
        all_tensors_to_one_file=True, location="weights/ext.bin", size_threshold=0,
    )  # fmt: skip
    code, _, err = run_cli(_import(work, "ext.onnx"), capsys)
    assert code == 0, err
    (version,) = scan(work / "repo", strict=True)
    assert set(version.metadata["files"]) == {"model.onnx", "model.onnx.data"}
    verify_files(version)
    (work / "weights" / "ext.bin").unlink()  # the version never reads the user's file
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert _session(version.onnx_path).run(None, {"image": x})[0].shape == (1, 5)


def _two_inputs(path: Path, onnx_classifier: Build) -> None:
    model = onnx_classifier()
    model.graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["batch", 5]))
    model.graph.node[-1].output[0] = "raw"
    model.graph.node.append(helper.make_node("Mul", ["raw", "scale"], ["logits"]))
    onnx.save_model(model, str(path))


def _no_batch_axis(path: Path, onnx_classifier: Build) -> None:
    model = onnx_classifier()
    graph = model.graph
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("image3", TensorProto.FLOAT, [3, 32, 32]))
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), "axes"))
    graph.node.insert(0, helper.make_node("Unsqueeze", ["image3", "axes"], ["image"]))
    onnx.save_model(model, str(path))


def _text_input(path: Path, onnx_classifier: Build) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["logits"])],
        "text",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("logits", TensorProto.STRING, ["batch"])],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _baked_batch(path: Path, onnx_classifier: Build) -> None:
    """Batch 1 fixed in a Reshape too: made dynamic, it cannot run a batch of 2."""
    model = onnx_classifier(batch=1)
    graph = model.graph
    flatten = next(n for n in graph.node if n.op_type == "Flatten")
    flatten.CopyFrom(helper.make_node("Reshape", ["pool", "shape"], ["flat"]))
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, 8], np.int64), "shape"))
    onnx.save_model(model, str(path))


def _external_outside(path: Path, onnx_classifier: Build) -> None:
    onnx.save_model(
        onnx_classifier(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location="data.bin", size_threshold=0,
    )  # fmt: skip
    (path.parent / "data.bin").rename(path.parent.parent / "outside.bin")
    _relocate(path, "../outside.bin")


def _relocate(path: Path, location: str) -> None:
    """Point every external tensor of the model at `path` to `location`."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))


def _external_absolute(path: Path, onnx_classifier: Build) -> None:
    _external_outside(path, onnx_classifier)
    _relocate(path, str(path.parent.parent / "outside.bin"))


def _external_symlink(path: Path, onnx_classifier: Build) -> None:
    _external_outside(path, onnx_classifier)
    os.symlink(path.parent.parent / "outside.bin", path.parent / "link.bin")
    _relocate(path, "link.bin")


BAD = {
    "two-inputs": (_two_inputs, "it has 2 inputs ['image', 'scale']; an image classifier takes exactly one"),
    "no-batch-axis": (_no_batch_axis, "its input 'image3' [3, 32, 32] has no batch axis"),
    "text-input": (_text_input, "its input 'text' is a string tensor; an image classifier takes one float"),
    "batch-baked-in": (_baked_batch, "ONNX Runtime cannot run it on a batch of 2"),
    "external-outside": (_external_outside, "keeps its data in '../outside.bin', a path with '..'"),
    "external-absolute": (_external_absolute, "an absolute path; external data must be a plain file inside"),
    "external-symlink": (_external_symlink, "a path through the symlink link.bin"),
    "not-onnx": (
        lambda p, _: p.write_bytes(b"\x00garbage" * 10),
        "cannot import bad.onnx: it is not an ONNX model",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_imports_are_refused_and_write_nothing(
    work: Path, capsys: pytest.CaptureFixture[str], kind: str, build_onnx_classifier: Build
) -> None:
    (work / "models").mkdir()
    make, message = BAD[kind]
    make(work / "models" / "bad.onnx", build_onnx_classifier)
    before = tree(work / "repo")
    code, out, err = run_cli(_import(work, "models/bad.onnx"), capsys)
    assert code == 4, (code, err)
    assert err.count("\n") == 1 and err.startswith("error: cannot import bad.onnx: "), err
    assert message in err, err
    assert out == "" and tree(work / "repo") == before


def test_labels_and_preprocessing_that_do_not_fit_are_refused(
    work: Path, make_onnx_classifier: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    make_onnx_classifier(work / "model.onnx")
    (work / "three.txt").write_text("a\nb\nc\n")
    (work / "twice.txt").write_text("a\nb\na\n")
    cases = [
        (["--labels", str(work / "three.txt")], 2, "has 3 labels but the model has 5 classes"),
        (["--labels", str(work / "twice.txt")], 2, "names 'a' twice (lines 1 and 3)"),
        (
            ["--color-mode", "L", "--mean", "0.5", "--std", "0.2"],
            4,
            "has 3 channels but the preprocessing gives 1",
        ),
        (["--crop", "28", "--resize", "28"], 4, "has height 32 but the preprocessing crops 28x28"),
        (["--std", "0,1,1"], 2, "std must be positive"),
        (["--layout", "NHWC"], 4, "(NHWC) has 32 channels but the preprocessing gives 3"),
    ]
    for extra, code, message in cases:
        got, out, err = run_cli([*_import(work, "model.onnx"), *extra], capsys)
        assert (got, out) == (code, ""), (extra, err)
        assert message in err, err
    (work / "bad.json").write_text('{"colour_mode": "RGB"}')
    got, _, err = run_cli([*_import(work, "model.onnx"), "--preprocessing", str(work / "bad.json")], capsys)
    assert got == 2 and "unknown keys ['colour_mode']" in err
    got, _, err = run_cli(
        ["import", str(work / "model.onnx"), "--name", "x", "--labels", str(work / "labels.txt"),
         "--repository", str(work / "repo")], capsys,
    )  # fmt: skip
    assert got == 2 and "must give color_mode, crop, mean, std" in err
    assert tree(work / "repo") == []


def test_an_imported_version_fails_validation_if_it_claims_gradients(
    work: Path, make_onnx_classifier: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from export.errors import MetadataError

    make_onnx_classifier(work / "model.onnx")
    assert run_cli(_import(work, "model.onnx"), capsys)[0] == 0
    path = work / "repo" / "mine" / "1" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["capabilities"]["explain"] = True
    path.write_text(json.dumps(meta))
    with pytest.raises(MetadataError, match=r"no PyTorch module, yet its capabilities offer \['explain'\]"):
        read_version(path.parent)


def test_a_final_softmax_is_dropped_so_probabilities_are_not_squashed_twice(
    work: Path, capsys: pytest.CaptureFixture[str], build_onnx_classifier: Build
) -> None:
    model = build_onnx_classifier()
    model.graph.node[-1].output[0] = "raw"
    model.graph.node.append(helper.make_node("Softmax", ["raw"], ["logits"], axis=-1))
    onnx.save_model(model, str(work / "softmax.onnx"))
    assert run_cli(_import(work, "softmax.onnx"), capsys)[0] == 0
    (version,) = scan(work / "repo", strict=True)
    assert version.metadata["imported"]["softmax_dropped"] is True
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    (probabilities,) = _session(work / "softmax.onnx").run(None, {"image": x})
    (logits,) = _session(version.onnx_path).run(None, {"image": x})
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(1, keepdims=True), probabilities, rtol=1e-5, atol=1e-7)
