"""export.repository: metadata.json schema 1, scanning, verification and atomic version writing."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from export import repository
from export.describe import describe
from export.errors import IntegrityError, MetadataError, RepositoryError, VersionExists
from export.preprocessing import DIGITS, IMAGENET
from export.repository import VersionWriter, latest, load_metadata, scan, verify_files

ROOT = Path(__file__).resolve().parents[3]
REFERENCE_CLASSES = ROOT.parent / "shared" / "reference" / "imagenet_classes.txt"

# Every key docs/ARCHITECTURE.md's example shows, plus the documented optional ones we write.
DOCUMENTED_KEYS = {
    "schema_version", "name", "version", "architecture", "input", "output", "num_classes",
    "preprocessing", "labels", "trained", "trained_on", "parameters", "flops", "fp16",
    "source_checkpoint_sha256", "files", "opset", "exporters", "exported_at", "verification",
    "capabilities", "features", "layers",
}  # fmt: skip
OPTIONAL_KEYS = {"training", "evaluation", "build_kwargs", "initialization"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_repository_layout_and_metadata_follow_the_contract(model_repository: Path) -> None:
    assert sorted(p.name for p in model_repository.iterdir()) == ["lenet5", "resnet18"]
    for name in ("lenet5", "resnet18"):
        version_dir = model_repository / name / "1"
        assert sorted(p.name for p in (model_repository / name).iterdir()) == ["1"]
        assert sorted(p.name for p in version_dir.iterdir()) == ["metadata.json", "model.onnx", "weights.pt"]
        meta = json.loads((version_dir / "metadata.json").read_text())
        assert set(meta) - OPTIONAL_KEYS == DOCUMENTED_KEYS
        assert meta["schema_version"] == 1 and meta["name"] == name and meta["version"] == 1
        assert meta["architecture"] == name
        for fname in ("model.onnx", "weights.pt"):
            path = version_dir / fname
            assert meta["files"][fname] == {"sha256": _sha256(path), "bytes": path.stat().st_size}
        assert set(meta["files"]) == {"model.onnx", "weights.pt"}
        assert meta["input"]["name"] == "input" and meta["output"]["name"] == "logits"
        assert meta["features"] == {
            "name": "features", "shape": [{"lenet5": 84, "resnet18": 512}[name]], "dtype": "float32",
            "layer": {"lenet5": "classifier.2", "resnet18": "fc"}[name],
        }  # fmt: skip
        layers = {entry["name"]: entry for entry in meta["layers"]}
        assert len(layers) == len(meta["layers"])
        if name == "resnet18":  # containers, blocks and leaves, with their output shapes
            assert layers["layer2"] == {"name": "layer2", "shape": [128, 28, 28], "kind": "Sequential"}
            assert layers["layer2.0.conv1"]["kind"] == "Conv2d" and layers["fc"]["shape"] == [1000]
        assert meta["input"]["dtype"] == meta["output"]["dtype"] == "float32" and meta["fp16"] is False
        described = describe(name)
        assert (
            meta["parameters"] == described["parameters_without_aux"] and meta["flops"] == described["flops"]
        )
        assert meta["opset"] == 18 and set(meta["exporters"]) == {
            "torch",
            "onnx",
            "onnxscript",
            "onnxruntime",
        }
        assert meta["exported_at"].endswith("Z")
        v = meta["verification"]
        assert v["batch"] == 4 and v["relative_diff"] <= 1e-4 and v["top1_equal"] is True
        assert meta["source_checkpoint_sha256"] is None

    lenet = load_metadata(model_repository / "lenet5" / "1")
    assert lenet["input"]["shape"] == [1, 32, 32] and lenet["output"]["shape"] == [10]
    assert lenet["labels"] == [str(d) for d in range(10)]
    assert lenet["preprocessing"] == DIGITS.to_dict()
    assert lenet["trained"] is True and lenet["trained_on"] == "digits"
    assert lenet["training"]["held_out_samples"] == 360 and lenet["training"]["held_out_accuracy"] >= 0.97
    assert lenet["evaluation"]["samples"] == 360 and lenet["evaluation"]["accuracy"] >= 0.97
    # tanh only: guided backprop would silently be a plain gradient, so explain is not offered
    assert lenet["capabilities"] == {
        "classify": True, "embed": True, "explain": False, "dream": False, "stylize": False,
        "feature_maps": True, "filters": True,
    }  # fmt: skip

    assert lenet["initialization"] is None  # trained weights
    resnet = load_metadata(model_repository / "resnet18" / "1")
    # the demo's random weights: seeded and calibrated to stay alive (export.calibration)
    assert resnet["initialization"]["seed"] == 0
    assert resnet["initialization"]["calibration"]["logit_std_after"] == pytest.approx(1.0, rel=1e-3)
    assert resnet["input"]["shape"] == [3, 224, 224] and resnet["output"]["shape"] == [1000]
    assert (
        resnet["labels"][:3] == ["tench", "goldfish", "great white shark"] and len(resnet["labels"]) == 1000
    )
    assert resnet["preprocessing"] == IMAGENET.to_dict()
    assert resnet["trained"] is False and resnet["trained_on"] is None
    assert resnet["training"] is None and resnet["evaluation"] is None
    assert resnet["capabilities"] == {
        "classify": True, "embed": True, "explain": True, "dream": True, "stylize": False,
        "feature_maps": True, "filters": True,
    }  # fmt: skip


def test_bundled_imagenet_classes_equal_the_reference_and_are_package_data() -> None:
    bundled = resources.files("export").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    lines = bundled.splitlines()
    assert (
        len(lines) == 1000 and len(set(lines)) >= 998 and all(line.strip() == line and line for line in lines)
    )
    if REFERENCE_CLASSES.exists():
        assert bundled == REFERENCE_CLASSES.read_text(encoding="utf-8")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "data/imagenet_classes.txt" in pyproject["tool"]["setuptools"]["package-data"]["export"]


def test_scan_reads_versions_sorted_and_ignores_build_dirs_and_strays(model_repository_copy: Path) -> None:
    root = model_repository_copy
    (root / "resnet18" / ".tmp-2-abcd").mkdir()
    (root / "resnet18" / ".tmp-2-abcd" / "model.onnx").write_bytes(b"partial")
    (root / "resnet18" / "latest").mkdir()
    (root / "resnet18" / "007").mkdir()
    (root / ".hidden").mkdir()
    (root / "README.txt").write_text("not a model")
    versions = scan(root)
    assert [v.key for v in versions] == [("lenet5", 1), ("resnet18", 1)]
    lenet = versions[0]
    assert lenet.path == root / "lenet5" / "1" and lenet.onnx_path == lenet.path / "model.onnx"
    assert lenet.input_shape == (1, 32, 32) and lenet.num_classes == 10 and lenet.dtype == "float32"
    assert lenet.preprocessing == DIGITS and lenet.labels == tuple("0123456789") and lenet.trained
    assert lenet.capabilities["classify"] and not lenet.fp16 and lenet.build_kwargs == {}
    assert lenet == copy.copy(lenet) and hash(lenet) == hash(copy.copy(lenet))


def test_scan_skips_a_broken_version_with_a_warning_or_raises_when_strict(
    model_repository_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = model_repository_copy
    broken = root / "resnet18" / "2"
    broken.mkdir()
    (broken / "metadata.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="export.repository"):
        versions = scan(root)
    assert [v.key for v in versions] == [("lenet5", 1), ("resnet18", 1)]
    assert f"skipping {broken}" in caplog.text and "is not valid JSON: Expecting property name" in caplog.text
    with pytest.raises(MetadataError, match=r"metadata\.json is not valid JSON: .* at line 1 column 2"):
        scan(root, strict=True)
    # the broken version's number is never reused
    assert repository.next_version(root, "resnet18") == 3


def test_scan_refuses_a_missing_root(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        scan(tmp_path / "absent")
    (tmp_path / "file").write_text("")
    with pytest.raises(RepositoryError, match="is not a directory"):
        scan(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert scan(tmp_path / "empty") == []


def test_a_version_in_the_wrong_directory_is_refused(model_repository_copy: Path) -> None:
    root = model_repository_copy
    (root / "lenet5" / "1").rename(root / "lenet5" / "4")
    with pytest.raises(MetadataError, match=r"says lenet5:1 but lies in lenet5/4"):
        scan(root, strict=True)


def test_verify_files_names_the_bad_file(model_repository_copy: Path) -> None:
    (version,) = [v for v in scan(model_repository_copy) if v.name == "lenet5"]
    verify_files(version)
    weights = version.weights_path
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(
        IntegrityError, match=r"weights\.pt sha256 [0-9a-f]{16}\.\.\. differs from metadata\.json's"
    ):
        verify_files(version)
    weights.write_bytes(bytes(data) + b"x")
    with pytest.raises(IntegrityError, match=r"weights\.pt has \d+ bytes, metadata\.json says \d+"):
        verify_files(version)
    version.onnx_path.unlink()
    with pytest.raises(IntegrityError, match=r"model\.onnx is missing"):
        verify_files(version)


def test_latest_picks_the_highest_version(model_repository_copy: Path) -> None:
    root = model_repository_copy
    meta = load_metadata(root / "resnet18" / "1")
    for number in (3, 10):
        with VersionWriter(root, "resnet18", number) as writer:
            for fname in ("model.onnx", "weights.pt"):
                (writer.path / fname).write_bytes((root / "resnet18" / "1" / fname).read_bytes())
            writer.commit(meta)
    versions = scan(root)
    found = latest(versions, "resnet18")
    assert found is not None and found.version == 10 and found.metadata["version"] == 10
    assert latest(versions, "vgg19") is None
    assert repository.next_version(root, "resnet18") == 11 and repository.next_version(root, "vgg19") == 1


def _meta_for(root: Path) -> dict[str, Any]:
    return load_metadata(root / "lenet5" / "1")


def _write_files(writer: VersionWriter, payload: bytes = b"x") -> None:
    for fname in ("model.onnx", "weights.pt"):
        (writer.path / fname).write_bytes(payload + fname.encode())


def test_a_version_appears_only_when_committed(model_repository_copy: Path) -> None:
    root = model_repository_copy
    writer = VersionWriter(root, "lenet5")
    _write_files(writer)
    assert writer.path.name.startswith(".tmp-2-") and writer.path.parent == root / "lenet5"
    assert [v.key for v in scan(root)] == [("lenet5", 1), ("resnet18", 1)]
    committed = writer.commit(_meta_for(root))
    assert committed.version == 2 and committed.path == root / "lenet5" / "2"
    assert sorted(p.name for p in (root / "lenet5").iterdir()) == ["1", "2"]
    verify_files(scan(root)[1])
    written = json.loads((root / "lenet5" / "2" / "metadata.json").read_text())
    assert written["version"] == 2 and written["files"]["model.onnx"]["bytes"] == len(b"xmodel.onnx")


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    with pytest.raises(RuntimeError, match="boom"), VersionWriter(root, "lenet5") as writer:
        _write_files(writer)
        raise RuntimeError("boom")
    assert not root.exists()  # directories the writer made are removed again when left empty
    (root / "lenet5").mkdir(parents=True)
    (root / "lenet5" / "keep.txt").write_text("")
    with pytest.raises(RuntimeError), VersionWriter(root, "lenet5"):
        raise RuntimeError("boom")
    assert sorted(p.name for p in (root / "lenet5").iterdir()) == ["keep.txt"]


def test_an_existing_version_is_never_overwritten(model_repository_copy: Path) -> None:
    root = model_repository_copy
    before = _sha256(root / "lenet5" / "1" / "model.onnx")
    with pytest.raises(VersionExists, match="lenet5 version 1 already exists in"):
        VersionWriter(root, "lenet5", 1)
    # Another exporter commits version 2 while ours is being built: ours must not replace it.
    ours = VersionWriter(root, "lenet5", 2)
    _write_files(ours, b"ours")
    theirs = VersionWriter(root, "lenet5", 2)
    _write_files(theirs, b"theirs")
    theirs.commit(_meta_for(root))
    with pytest.raises(VersionExists, match="lenet5 version 2 already exists"):
        ours.commit(_meta_for(root))
    assert (root / "lenet5" / "2" / "model.onnx").read_bytes() == b"theirsmodel.onnx"
    ours.abort()
    assert sorted(p.name for p in (root / "lenet5").iterdir()) == ["1", "2"]
    assert _sha256(root / "lenet5" / "1" / "model.onnx") == before


def test_concurrent_automatic_versions_both_land(model_repository_copy: Path) -> None:
    root = model_repository_copy
    first, second = VersionWriter(root, "lenet5"), VersionWriter(root, "lenet5")
    _write_files(first, b"first")
    _write_files(second, b"second")
    assert second.commit(_meta_for(root)).version == 2
    assert first.commit(_meta_for(root)).version == 3  # 2 was taken meanwhile: takes the next
    assert load_metadata(root / "lenet5" / "3")["files"]["model.onnx"]["sha256"] == _sha256(
        root / "lenet5" / "3" / "model.onnx"
    )


def test_an_automatic_version_lost_in_a_race_takes_the_next_number(
    model_repository_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Both exporters computed version 2; the other renamed first. Ours must not replace it."""
    root = model_repository_copy
    theirs = VersionWriter(root, "lenet5", 2)
    _write_files(theirs, b"theirs")
    theirs.commit(_meta_for(root))
    ours = VersionWriter(root, "lenet5")
    _write_files(ours, b"ours")
    real = repository.next_version
    stale = iter([2])
    monkeypatch.setattr(repository, "next_version", lambda r, n: next(stale, None) or real(r, n))
    with caplog.at_level(logging.INFO, logger="export.repository"):
        assert ours.commit(_meta_for(root)).version == 3
    assert "lenet5 version 2 was taken concurrently" in caplog.text
    assert (root / "lenet5" / "2" / "model.onnx").read_bytes() == b"theirsmodel.onnx"
    assert (root / "lenet5" / "3" / "model.onnx").read_bytes() == b"oursmodel.onnx"
    assert load_metadata(root / "lenet5" / "3")["version"] == 3


@pytest.mark.parametrize("name", ["", "../evil", ".tmp-1", "a/b", "x" * 101, "-lead"])
def test_bad_model_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(RepositoryError, match="is not allowed"):
        VersionWriter(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_repository_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(RepositoryError, match=r"repository .*file is not a directory"):
        VersionWriter(tmp_path / "file", "lenet5")
    with pytest.raises(RepositoryError, match="is not writable: Not a directory"):
        VersionWriter(tmp_path / "file" / "below", "lenet5")


def test_commit_refuses_metadata_that_would_not_read_back(model_repository_copy: Path) -> None:
    root = model_repository_copy
    meta = _meta_for(root)
    meta["labels"] = meta["labels"][:9]
    with (
        pytest.raises(MetadataError, match=r"field 'labels' must be a list of 10 strings"),
        VersionWriter(root, "lenet5") as writer,
    ):
        _write_files(writer)
        writer.commit(meta)
    assert sorted(p.name for p in (root / "lenet5").iterdir()) == ["1"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.update(schema_version=2), "schema_version 2 is not supported"),
        (lambda m: m.pop("flops"), "field 'flops' must be a non-negative integer, got missing"),
        (lambda m: m.update(version=0), "field 'version' must be a positive integer, got 0"),
        (lambda m: m["input"].update(dtype="int8"), "input: field 'dtype' must be float32 or float16"),
        (lambda m: m["output"].update(shape=[9]), r"output: field 'shape' must be \[num_classes\] = \[10\]"),
        (lambda m: m.update(fp16=True), "fp16 is true but the input dtype is float32"),
        (lambda m: m["files"].pop("weights.pt"), "'files' does not list weights.pt"),
        (
            lambda m: m["files"].update({"../x": m["files"]["model.onnx"]}),
            "'../x', which is not a plain file",
        ),
        (lambda m: m["files"]["model.onnx"].update(sha256="abc"), r"files\['model.onnx'\] must be"),
        (lambda m: m["preprocessing"].update(crop=28), r"preprocessing gives \[1, 28, 28\] but input shape"),
        (
            lambda m: m["verification"].pop("top1_equal"),
            "verification: field 'top1_equal' must be true or false",
        ),
        (
            lambda m: m.update(capabilities={"explain": True}),
            "field 'capabilities' must be an object of booleans",
        ),
        (lambda m: m.update(trained="yes"), "field 'trained' must be true or false"),
        (lambda m: m["input"].update(description=3), "input: field 'description' must be a string"),
    ],
)
def test_metadata_validation_names_the_field(model_repository: Path, mutate: Any, message: str) -> None:
    meta = copy.deepcopy(_meta_for(model_repository))
    repository.validate_metadata(copy.deepcopy(meta))
    mutate(meta)
    with pytest.raises(MetadataError, match=message) as info:
        repository.validate_metadata(meta, "x/metadata.json")
    assert str(info.value).startswith("x/metadata.json") and "\n" not in str(info.value)


def test_load_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match=r"metadata\.json does not exist"):
        load_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text("[1, 2]")
    with pytest.raises(MetadataError, match="not a JSON object"):
        load_metadata(tmp_path / "metadata.json")
