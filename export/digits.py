"""The UCI handwritten digits (scikit-learn's `load_digits`), the fixed split, and rendering.

The data ships inside the scikit-learn wheel (1,797 images, 8x8, values 0..16), so nothing is ever
downloaded. A sample becomes a model input exactly the way an image sent to the service does:

1. the 8x8 values are scaled to 8-bit grey levels, `round(v * 255 / 16)` (0..16 -> 0..255);
2. that 8x8 "L" image goes through `export.preprocessing.to_tensor(image, DIGITS)`: a bilinear
   resize to 32x32 (PIL), then `(pixel / 255 - mean) / std`.

`render(i)` returns step 2's 32x32 image *before* normalization, so a client that PNG-encodes it
and sends it to the server gets the very tensor LeNet-5 was trained on (to_tensor does not resize an
image that already is 32x32).

The split is fixed: `sklearn.model_selection.train_test_split` on the sample indices with
`test_size=0.2, random_state=0, stratify=targets`, i.e. 1,437 training and 360 held-out samples with
the same class proportions in both. The held-out samples are never trained on; the DIGITS mean/std
in `export.preprocessing` are the training split's pixel statistics (a test recomputes them).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from export.preprocessing import DIGITS, resize_and_crop, to_tensor

NUM_CLASSES = 10
LABELS: tuple[str, ...] = tuple(str(d) for d in range(NUM_CLASSES))
TEST_SIZE = 0.2
SPLIT_SEED = 0
SPLIT_DESCRIPTION = (
    "UCI handwritten digits (sklearn load_digits), stratified train_test_split "
    f"test_size={TEST_SIZE} random_state={SPLIT_SEED}"
)


@dataclass(frozen=True)
class DigitsSplit:
    """The training and held-out samples as model inputs (float32, N x 1 x 32 x 32) and labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_index: np.ndarray  # indices into load_digits() order
    test_index: np.ndarray


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.rint(np.asarray(data.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    targets = np.asarray(data.target, dtype=np.int64)
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def raw() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 samples as uint8 8x8 grey images (0..255) and their int64 labels (read-only)."""
    return _raw()


def num_samples() -> int:
    return len(_raw()[1])


def _check_index(index: int) -> int:
    n = num_samples()
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
        raise TypeError(f"digit sample index must be an int, got {type(index).__name__}")
    if not -n <= index < n:
        raise IndexError(f"digit sample index {index} is out of range; there are {n} samples")
    return int(index) % n


def image8(index: int) -> Image.Image:
    """Sample `index` as its native 8x8 grey ("L") image."""
    return Image.fromarray(_raw()[0][_check_index(index)])


def label(index: int) -> int:
    """The digit (0..9) sample `index` shows."""
    return int(_raw()[1][_check_index(index)])


def render(index: int) -> Image.Image:
    """Sample `index` as the 32x32 grey image the model sees, ready for `Image.save(..., "PNG")`.

    Feeding the result (or its PNG round trip) to `to_tensor(image, DIGITS)` gives exactly the
    training tensor of that sample.
    """
    return resize_and_crop(image8(index), DIGITS)


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """(train_index, test_index): the fixed stratified 80/20 split, each sorted ascending."""
    from sklearn.model_selection import train_test_split

    targets = _raw()[1]
    train, test = train_test_split(
        np.arange(len(targets)), test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=targets
    )
    return np.sort(train), np.sort(test)


def _tensors(indices: np.ndarray) -> np.ndarray:
    images = _raw()[0]
    out = np.empty((len(indices), 1, DIGITS.crop, DIGITS.crop), dtype=np.float32)
    for row, i in enumerate(indices):
        out[row] = to_tensor(Image.fromarray(images[i]), DIGITS)
    return out


@lru_cache(maxsize=1)
def load_split() -> DigitsSplit:
    """The split as normalized model inputs; computed once per process (about a second)."""
    train, test = split_indices()
    targets = _raw()[1]
    split = DigitsSplit(
        x_train=_tensors(train),
        y_train=targets[train].copy(),
        x_test=_tensors(test),
        y_test=targets[test].copy(),
        train_index=train,
        test_index=test,
    )
    for array in (split.x_train, split.y_train, split.x_test, split.y_test, train, test):
        array.setflags(write=False)
    return split


def pixel_stats(indices: np.ndarray | None = None) -> tuple[float, float]:
    """Mean and standard deviation of the rendered 32x32 pixels (scaled to 0..1) over `indices`.

    Defaults to the training split; these are the numbers DIGITS normalizes with.
    """
    if indices is None:
        indices = split_indices()[0]
    images = _raw()[0]
    pixels = (
        np.stack([np.asarray(resize_and_crop(Image.fromarray(images[i]), DIGITS)) for i in indices]).astype(
            np.float64
        )
        / 255.0
    )
    return float(pixels.mean()), float(pixels.std())
