"""`python -m export onnx ARCH --weights FILE` for a fine-tuned checkpoint: the user's classes (read
from the classifier head, or --num-classes), labels (--labels) and preprocessing (--preprocessing,
flags) go into metadata.json, and the gradient processes accept the version as they do the zoo's.
LeNet-5 with seeded random weights stands in for any architecture: the code path is the same."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import run_cli, tree
from PIL import Image

from export.models import build
from export.preprocessing import Preprocessing, to_tensor
from export.repository import scan, verify_files


@pytest.fixture
def three_classes(tmp_path: Path) -> Path:
    """A LeNet-5 checkpoint with a 3-class head, its labels, and an inverting preprocessing."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        torch.save(build("lenet5", num_classes=3).state_dict(), tmp_path / "ft.pt")
    (tmp_path / "labels.txt").write_text("circle\nsquare\ntriangle\n")
    (tmp_path / "pre.json").write_text(
        json.dumps({"color_mode": "L", "resize": 40, "crop": 32, "mean": [0.1], "std": [0.3], "invert": True})
    )
    return tmp_path


def test_a_fine_tuned_checkpoint_exports_with_its_classes_labels_and_preprocessing(
    three_classes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.worker.loading import _build_module, _check_version

    work = three_classes
    code, out, err = run_cli(
        ["onnx", "lenet5", "--weights", str(work / "ft.pt"), "--labels", str(work / "labels.txt"),
         "--preprocessing", str(work / "pre.json"), "--name", "shapes", "--repository", str(work / "repo")],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "shapes v1" in out and "held-out accuracy" not in out  # no digits score for other classes
    (version,) = scan(work / "repo", strict=True)
    verify_files(version)
    meta = version.metadata
    assert meta["num_classes"] == 3 and meta["output"]["shape"] == [3]
    assert meta["labels"] == ["circle", "square", "triangle"]
    assert meta["preprocessing"] == {
        "color_mode": "L", "resize": 40, "crop": 32, "mean": [0.1], "std": [0.3], "invert": True,
    }  # fmt: skip
    assert "inverted (255 - v)" in meta["input"]["description"]
    assert meta["trained"] and meta["trained_on"] is None and meta["evaluation"] is None
    assert meta["build_kwargs"] == {}  # num_classes is metadata.json's own field
    assert meta["parameters"] == sum(p.numel() for p in build("lenet5", num_classes=3).parameters())
    assert meta["capabilities"]["feature_maps"] and meta["capabilities"]["filters"]
    # The gradient processes rebuild it from weights.pt and prove it against model.onnx.
    _check_version(version)
    assert _build_module(version).classifier[2].out_features == 3


def test_what_does_not_fit_is_refused_naming_it_and_nothing_is_written(
    three_classes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = three_classes
    (work / "two.txt").write_text("a\nb\n")
    (work / "repo").mkdir()
    base = ["onnx", "lenet5", "--weights", str(work / "ft.pt"), "--repository", str(work / "repo")]
    labels = ["--labels", str(work / "labels.txt")]
    cases = [
        ([*labels, "--num-classes", "10"], 3,
         "does not fit lenet5 with --num-classes 10: its classifier head classifier.2.weight is [3, 84]"),
        ([], 2, "lenet5 with 3 classes (not digits's 10) needs their names: --labels FILE"),
        (["--labels", str(work / "two.txt")], 2, "has 2 labels but the model has 3 classes"),
        ([*labels, "--crop", "28", "--resize", "28"], 2,
         "lenet5 cannot take the preprocessing's input [1, 28, 28] (its own is [1, 32, 32])"),
        ([*labels, "--color-mode", "RGB"], 2, "color_mode RGB needs 3 mean and std values, got 1 and 1"),
    ]  # fmt: skip
    for extra, code, message in cases:
        got, out, err = run_cli([*base, *extra], capsys)
        assert (got, out) == (code, ""), (extra, err)
        assert err.startswith("error: ") and message in err, err
    assert tree(work / "repo") == []


def test_invert_flips_pixels_before_normalization() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    plain = Preprocessing(color_mode="L", resize=32, crop=32, mean=(0.2,), std=(0.5,))
    inverted = Preprocessing(color_mode="L", resize=32, crop=32, mean=(0.2,), std=(0.5,), invert=True)
    np.testing.assert_array_equal(
        to_tensor(Image.fromarray(pixels, "L"), inverted),
        to_tensor(Image.fromarray(255 - pixels, "L"), plain),
    )
    assert Preprocessing.from_dict(plain.to_dict()) == plain and plain.to_dict()["invert"] is False
    # metadata.json written before `invert` existed reads as not inverted.
    old = {k: v for k, v in inverted.to_dict().items() if k != "invert"}
    assert Preprocessing.from_dict(old) == plain
