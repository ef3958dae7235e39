"""DIR/<model>/config.yaml (service/model_config.py): validation that names the file and the field,
the version policy, and how the catalog applies both (issue 13)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from linear_repo import repo  # noqa: F401 - the fixture

from service.catalog import ModelLoadError, loaded_model, select_versions
from service.model_config import (
    MAX_CONFIG_BYTES,
    ModelConfig,
    ModelConfigError,
    VersionPolicy,
    read_model_config,
)


def write(root: Path, model: str, text: str) -> Path:
    path = root / model / "config.yaml"
    path.write_text(text)
    return path


def test_no_file_is_an_empty_config(tmp_path: Path) -> None:
    assert read_model_config(tmp_path) == ModelConfig()


def test_a_full_config_is_read_yaml_or_json(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    yaml_text = """# a comment
max_batch_size: 64
max_queue_delay_s: 0.001
max_queue_size: 32
warmup_batch_sizes: [64, 1, 1]
device: cpu
version_policy: {latest: 2}
gradients: [explain]
"""
    config = read_model_config(write(tmp_path, "m", yaml_text).parent)
    assert config.max_batch_size == 64 and config.max_queue_delay_s == 0.001 and config.max_queue_size == 32
    assert config.warmup_batch_sizes == (1, 64)
    assert config.device == "cpu" and config.gradients == ("explain",)
    assert config.version_policy == VersionPolicy(latest=2)
    as_json = '{"max_batch_size": 8, "version_policy": {"specific": [1, 3]}, "warmup_batch_sizes": "none"}'
    config = read_model_config(write(tmp_path, "m", as_json).parent)
    assert config.max_batch_size == 8 and config.warmup_batch_sizes == "none"
    assert config.version_policy is not None and config.version_policy.specific == (1, 3)


@pytest.mark.parametrize(
    ("text", "field", "why"),
    [
        ("max_batch_size: 0", "max_batch_size", "greater than or equal to 1"),
        ("max_batch_size: lots", "max_batch_size", "integer"),
        ("max_queue_delay_s: -1", "max_queue_delay_s", "greater than or equal to 0"),
        ("instances: 0", "instances", "greater than or equal to 1"),
        ("precision: int8", "precision", "'exported', 'fp32' or 'fp16'"),
        ("fp16: true", "fp16", "Extra inputs are not permitted"),
        ("device: tpu", "device", "'auto', 'cpu' or 'cuda'"),
        ("gradients: [explain, paint]", "gradients.1", "'stylize', 'feature_maps' or 'filters'"),
        ("warmup_batch_sizes: [0]", "warmup_batch_sizes", "1..256"),
        ("version_policy: {latest: 1, all: true}", "version_policy", "exactly one of"),
        ("version_policy: {}", "version_policy", "exactly one of"),
        ("version_policy: {specific: []}", "version_policy", "version numbers"),
        ("version_policy: {newest: 1}", "version_policy.newest", "Extra inputs"),
    ],
)
def test_an_invalid_field_is_named_with_the_file(tmp_path: Path, text: str, field: str, why: str) -> None:
    (tmp_path / "m").mkdir()
    path = write(tmp_path, "m", text)
    with pytest.raises(ModelConfigError) as refused:
        read_model_config(path.parent)
    message = str(refused.value)
    assert message.startswith(f"{path}: {field}"), message
    assert why in message, message


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("max_batch_size: [", "not valid YAML"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("!!python/object:os.system {}", "not valid YAML"),
    ],
)
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str, why: str) -> None:
    (tmp_path / "m").mkdir()
    path = write(tmp_path, "m", text)
    with pytest.raises(ModelConfigError, match=why):
        read_model_config(path.parent)


def test_only_a_small_regular_file_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "elsewhere.yaml").write_text("max_batch_size: 4\n")
    os.symlink(tmp_path / "elsewhere.yaml", folder / "config.yaml")
    with pytest.raises(ModelConfigError, match="regular file"):
        read_model_config(folder)
    (folder / "config.yaml").unlink()
    write(tmp_path, "m", "#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ModelConfigError, match="more than"):
        read_model_config(folder)


def test_version_policy_chooses() -> None:
    assert VersionPolicy(latest=2).choose([3, 1, 2]) == [2, 3]
    assert VersionPolicy(latest=5).choose([1, 2]) == [1, 2]
    assert VersionPolicy(all=True).choose([2, 1]) == [1, 2]
    assert VersionPolicy(specific=(2,)).choose([1, 2, 3]) == [2]
    with pytest.raises(ValueError, match="version 4"):
        VersionPolicy(specific=(4,)).choose([1, 2])


def test_the_catalog_applies_the_version_policy_unless_versions_are_named(repo: dict[str, Any]) -> None:  # noqa: F811
    root = repo["root"]
    names = lambda chosen: sorted((v.name, v.version) for v in chosen.versions)  # noqa: E731
    assert names(select_versions(root, "rgb")) == [("rgb", 2)]
    write(root, "rgb", "version_policy: {all: true}\n")
    assert names(select_versions(root, "rgb")) == [("rgb", 1), ("rgb", 2)]
    assert ("rgb", 1) in names(select_versions(root, ""))  # every model: the policy too
    write(root, "rgb", "version_policy: {specific: [1]}\n")
    assert names(select_versions(root, "rgb")) == [("rgb", 1)]
    assert names(select_versions(root, "rgb:2")) == [("rgb", 2)]  # named versions win
    write(root, "rgb", "version_policy: {specific: [7]}\n")
    with pytest.raises(ModelLoadError, match="version 7"):
        select_versions(root, "rgb")


def test_a_model_with_an_invalid_config_is_left_out_and_the_others_stay(repo: dict[str, Any]) -> None:  # noqa: F811
    root = repo["root"]
    path = write(root, "rgb", "max_batch_size: -3\n")
    chosen = select_versions(root, "")
    assert "rgb" not in {v.name for v in chosen.versions} and {"gray", "half"} <= {
        v.name for v in chosen.versions
    }
    assert chosen.refused["rgb"].startswith(f"{path}: max_batch_size")


def test_the_gradients_list_narrows_the_capabilities(repo: dict[str, Any]) -> None:  # noqa: F811
    root = repo["root"]
    version = select_versions(root, "rgb").versions[0]
    meta = {
        **version.metadata,
        "capabilities": {"classify": True, "explain": True, "dream": True, "stylize": False},
    }
    model = loaded_model(meta, provider="", config=ModelConfig(gradients=("explain", "stylize")))
    assert model.capabilities == {
        "classify": True,
        "explain": True,
        "dream": False,
        "stylize": False,
        "feature_maps": False,
        "filters": False,
    }
    assert loaded_model(meta, provider="").capabilities["dream"] is True
    # feature maps and filters: every version with weights.pt (its metadata.json need not name
    # them), narrowed by the list like the other gradient RPCs
    everything = loaded_model(meta, provider="").capabilities
    assert everything["feature_maps"] is everything["filters"] is True
    narrowed = loaded_model(meta, provider="", config=ModelConfig(gradients=("filters",))).capabilities
    assert (narrowed["feature_maps"], narrowed["filters"], narrowed["explain"]) == (False, True, False)
    no_weights = {**meta, "files": {"model.onnx": meta["files"]["model.onnx"]}}
    assert loaded_model(no_weights, provider="").capabilities["feature_maps"] is False
