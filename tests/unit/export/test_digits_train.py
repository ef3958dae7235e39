"""export.digits (the data set, split and rendering) and export.train (LeNet-5 training)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export import digits
from export.checkpoints import load_weights
from export.errors import UsageError
from export.models import build
from export.preprocessing import DIGITS, to_tensor
from export.train import save_checkpoint, train_lenet5


def test_split_is_fixed_disjoint_complete_and_stratified() -> None:
    train, test = digits.split_indices()
    assert (len(train), len(test)) == (1437, 360)
    assert not set(train) & set(test)
    assert sorted([*train, *test]) == list(range(digits.num_samples()))
    again = digits.split_indices()
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    _, targets = digits.raw()
    overall = np.bincount(targets, minlength=10) / len(targets)
    held_out = np.bincount(targets[test], minlength=10) / len(test)
    # Stratified: every class's share of the held-out set is within one sample of its overall share.
    assert np.abs(held_out - overall).max() <= 1 / len(test) + 1e-9


def test_samples_are_8_bit_renderings_of_the_sklearn_values() -> None:
    from sklearn.datasets import load_digits

    images, targets = digits.raw()
    source = load_digits()
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8)
    assert np.array_equal(images, np.rint(source.images * 255 / 16).astype(np.uint8))
    assert np.array_equal(targets, source.target)
    assert images.max() == 255 and images.min() == 0
    assert digits.LABELS == tuple("0123456789")


def test_digits_normalization_constants_are_the_training_split_pixel_stats() -> None:
    mean, std = digits.pixel_stats()
    assert DIGITS.mean[0] == pytest.approx(mean, abs=1e-3)
    assert DIGITS.std[0] == pytest.approx(std, abs=1e-3)
    # and the normalized training inputs are then (close to) zero-mean, unit-variance
    split = digits.load_split()
    assert abs(float(split.x_train.mean())) < 5e-3
    assert abs(float(split.x_train.std()) - 1) < 5e-3


def test_a_rendered_png_gives_the_server_exactly_the_training_tensor() -> None:
    split = digits.load_split()
    for row in (0, 17, 359):
        index = int(split.test_index[row])
        image = digits.render(index)
        assert (image.size, image.mode) == ((32, 32), "L")
        buf = io.BytesIO()
        image.save(buf, "PNG")
        decoded = Image.open(io.BytesIO(buf.getvalue()))
        assert np.array_equal(to_tensor(decoded, DIGITS), split.x_test[row])
        assert digits.label(index) == split.y_test[row]


@pytest.mark.parametrize(
    ("index", "error", "message"),
    [(1797, IndexError, "out of range"), (-1798, IndexError, "out of range"), ("3", TypeError, "int")],
)
def test_bad_sample_indices_are_refused(index: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        digits.render(index)  # type: ignore[arg-type]


def test_trained_lenet5_reaches_97_percent_on_the_held_out_split(model_repository: Path) -> None:
    """Recomputed here with PyTorch from weights.pt, not read back from what training reported."""
    model = build("lenet5")
    load_weights(model, model_repository / "lenet5" / "1" / "weights.pt", "lenet5")
    split = digits.load_split()
    with torch.no_grad():
        predicted = model(torch.from_numpy(split.x_test.copy())).argmax(1).numpy()
    accuracy = float((predicted == split.y_test).mean())
    assert accuracy >= 0.97
    meta = (model_repository / "lenet5" / "1" / "metadata.json").read_text()
    assert f'"held_out_accuracy": {round(accuracy, 6)}' in meta


def test_training_is_reproducible_and_seeded() -> None:
    first = train_lenet5(epochs=1, seed=3, progress=None)
    second = train_lenet5(epochs=1, seed=3, progress=None)
    other = train_lenet5(epochs=1, seed=4, progress=None)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    assert not torch.equal(
        first.model.state_dict()["features.0.weight"], other.model.state_dict()["features.0.weight"]
    )
    assert first.history[0].loss == second.history[0].loss
    assert not torch.are_deterministic_algorithms_enabled()  # restored after training


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_a_bar_on_a_terminal_and_epoch_lines_everywhere() -> None:
    terminal, log = _Terminal(), io.StringIO()
    train_lenet5(epochs=2, progress=terminal)
    train_lenet5(epochs=2, progress=log)
    assert "[" in terminal.getvalue() and "\r" in terminal.getvalue() and "100%" in terminal.getvalue()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2
    assert lines[1].startswith("epoch   2/2") and "loss" in lines[1] and "held-out" in lines[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "--epochs must be between"),
        ({"seed": -1}, "--seed must be between"),
        ({"batch_size": 0}, "batch size must be positive"),
        ({"lr": float("nan")}, "learning rate"),
    ],
)
def test_bad_training_arguments_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        train_lenet5(progress=None, **kwargs)  # type: ignore[arg-type]


def test_save_checkpoint_writes_the_file_and_a_sha256sum_sidecar(tmp_path: Path) -> None:
    model = build("lenet5")
    path = tmp_path / "nested" / "lenet5.pt"
    digest = save_checkpoint(model.state_dict(), path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "nested" / "lenet5.pt.sha256").read_text() == f"{digest}  lenet5.pt\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["lenet5.pt", "lenet5.pt.sha256"]
    reloaded = build("lenet5")
    assert load_weights(reloaded, path, "lenet5") == digest
    assert torch.equal(
        reloaded.state_dict()["classifier.2.weight"], model.state_dict()["classifier.2.weight"]
    )
