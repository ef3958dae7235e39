"""export.checkpoints: weights-only, strict, all-or-nothing checkpoint loading."""

from __future__ import annotations

import json
import os
import pickle
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from export.checkpoints import extract_state_dict, load_weights, mismatch, read_checkpoint
from export.errors import CheckpointError
from export.models import build

REFERENCE = (
    Path(__file__).resolve().parents[3].parent / "shared" / "reference" / "torchvision_state_dicts.json"
)


def _lenet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return build("lenet5").state_dict()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was modified by a refused load"


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model_state_dict": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {"model": sd},
        lambda sd: OrderedDict((f"module.{k}", v) for k, v in sd.items()),
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["bare", "state_dict", "model_state_dict", "model", "module-prefix", "wrapped-and-prefixed"],
)
def test_accepted_layouts_load_every_tensor(tmp_path: Path, wrap: Any) -> None:
    state = _lenet_state()
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(state), path)
    model = build("lenet5")
    digest = load_weights(model, path, "lenet5")
    assert len(digest) == 64
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_missing_file_directory_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint .*nope\.pt does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_checkpoint(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt is empty"):
        read_checkpoint(tmp_path / "empty.pt")


def test_corrupt_files_are_refused_with_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(_lenet_state(), good)
    data = good.read_bytes()
    rng = random.Random(0)
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "garbage.pt": os.urandom(4096),
        # Seeded garbage as a legacy pickle: many reach torch's weights-only unpickler with an
        # opcode on an empty stack (IndexError), which once escaped as a bare traceback.
        **{f"garbage-{i}.pt": b"\x80\x02" + rng.randbytes(256) for i in range(200)},
        "text.pt": b"hello, I am not a checkpoint\n",
        "flipped.pt": data[:100] + bytes([data[100] ^ 0xFF]) + data[101:200],
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(tmp_path / name)
        message = str(info.value)
        assert name in message and "\n" not in message, message


@pytest.mark.parametrize("container", ["torch.save", "raw-pickle-protocol-2"])
def test_a_pickle_carrying_code_is_refused_and_never_runs(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    if container == "torch.save":
        torch.save({"conv.weight": torch.zeros(1), "x": Payload()}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"conv.weight": Payload()}, f, protocol=2)
    # Prove the payload is live: an unrestricted unpickler would create the marker.
    assert not marker.exists()
    model = build("lenet5")
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=r"refused: it references (posix|os|nt)\.system") as info:
        load_weights(model, path, "lenet5")
    assert "\n" not in str(info.value)
    assert not marker.exists()
    _assert_unchanged(model, before)


def test_the_payload_really_would_run_without_weights_only(tmp_path: Path) -> None:
    """Control for the test above: the crafted file is dangerous, so refusing it means something."""
    marker = tmp_path / "RAN"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump(Payload(), f, protocol=2)
    with open(path, "rb") as f:
        pickle.load(f)  # noqa: S301 - deliberately unsafe, on our own file
    assert marker.exists()


def test_another_architectures_checkpoint_is_refused_listing_the_differences(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(build("resnet18").state_dict(), path)
    model = build("lenet5")
    before = _snapshot(model)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, path, "lenet5")
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} does not fit lenet5: 10 missing (features.0.weight, ")
    # resnet18 has 122 entries, 20 of them num_batches_tracked (reported like any unexpected key)
    listed = "conv1.weight, bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, ... and 117 more"
    assert f"122 unexpected ({listed})" in message
    assert "\n" not in message
    _assert_unchanged(model, before)


def test_wrong_shapes_are_reported_with_both_shapes(tmp_path: Path) -> None:
    path = tmp_path / "five.pt"
    torch.save(build("lenet5", num_classes=5).state_dict(), path)
    model = build("lenet5")
    before = _snapshot(model)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, path, "lenet5")
    assert str(info.value).endswith(
        "does not fit lenet5: 2 wrongly shaped (classifier.2.weight [5, 84] (model [10, 84]), "
        "classifier.2.bias [5] (model [10]))"
    )
    _assert_unchanged(model, before)


def test_a_near_miss_is_never_partially_loaded(tmp_path: Path) -> None:
    state = _lenet_state()
    del state["classifier.2.bias"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    model = build("lenet5")
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=r"1 missing \(classifier\.2\.bias\)"):
        load_weights(model, path, "lenet5")
    _assert_unchanged(model, before)


def test_non_tensor_entries_and_non_dicts_are_refused(tmp_path: Path) -> None:
    for payload, message in (
        (
            {"features.0.weight": torch.zeros(1), "note": "hi", "step": 3},
            "2 entries are not tensors (note, step)",
        ),
        ([torch.zeros(1)], "holds a list, not a state_dict"),
        ({}, "empty state_dict"),
    ):
        path = tmp_path / "odd.pt"
        torch.save(payload, path)
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_weights(build("lenet5"), path, "lenet5")


def test_pre_0_4_batchnorm_checkpoints_without_num_batches_tracked_load(tmp_path: Path) -> None:
    """torchvision's published ResNet files predate BatchNorm's num_batches_tracked counter."""
    torch.manual_seed(0)
    state = {k: v for k, v in build("resnet18").state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(state, path)
    model = build("resnet18")
    load_weights(model, path, "resnet18")
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])
    assert mismatch(build("resnet18"), state) is None


def _reference(name: str) -> dict[str, list[int]]:
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} is not available")
    data: dict[str, Any] = json.loads(REFERENCE.read_text())
    return data[name]["state_dict"]


@pytest.mark.parametrize("arch", ["googlenet", "resnet18"])
def test_a_torchvision_format_checkpoint_loads(tmp_path: Path, arch: str) -> None:
    """Tensors with exactly torchvision's keys and shapes (aux heads included for GoogLeNet)."""
    shapes = _reference(arch)
    generator = torch.Generator().manual_seed(0)
    state = {
        k: (torch.tensor(5) if k.endswith("num_batches_tracked") else torch.randn(s, generator=generator))
        for k, s in shapes.items()
    }
    path = tmp_path / f"{arch}.pth"
    torch.save(state, path)
    model = build(arch)
    load_weights(model, path, arch)
    key = "aux1.fc2.weight" if arch == "googlenet" else "layer4.1.conv2.weight"
    assert torch.equal(model.state_dict()[key], state[key])


def test_extract_state_dict_keeps_order_and_drops_only_a_common_module_prefix() -> None:
    state = OrderedDict([("module.b", torch.zeros(1)), ("module.a", torch.ones(1))])
    assert list(extract_state_dict(state)) == ["b", "a"]
    mixed = OrderedDict([("module.b", torch.zeros(1)), ("a", torch.ones(1))])
    assert list(extract_state_dict(mixed)) == ["module.b", "a"]
