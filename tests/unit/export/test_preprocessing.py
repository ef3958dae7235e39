"""export.preprocessing.to_tensor: the lookup-table normalization gives exactly the arithmetic's
values (so a served model sees bit for bit what the plain formula, and torchvision's ToTensor +
Normalize on the same pixels, would give it)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from export.preprocessing import DIGITS, IMAGENET, Preprocessing, resize_and_crop, to_tensor

ODD = Preprocessing(color_mode="RGB", resize=64, crop=56, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))


def _arithmetic(image: Image.Image, p: Preprocessing) -> np.ndarray:
    """The reference: the formula written out in float32, as to_tensor computed it before."""
    arr = np.asarray(resize_and_crop(image, p), dtype=np.float32) * (1.0 / 255.0)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    mean = np.asarray(p.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(p.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


@pytest.mark.parametrize("p", [IMAGENET, DIGITS, ODD], ids=["imagenet", "digits", "odd"])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_to_tensor_equals_the_formula_bit_for_bit(p: Preprocessing, mode: str) -> None:
    rng = np.random.default_rng(abs(hash((p.crop, mode))) % 2**32)
    for _ in range(4):
        w, h = (int(v) for v in rng.integers(5, 400, 2))
        shape = (h, w) if mode == "L" else (h, w, 3)
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "L" if mode == "L" else "RGB")
        if mode in ("RGBA", "P"):
            image = image.convert(mode)
        got = to_tensor(image, p)
        assert got.dtype == np.float32 and got.shape == (p.channels, p.crop, p.crop)
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, _arithmetic(image, p))


def test_every_pixel_value_maps_exactly() -> None:
    # A 256-pixel ramp in each channel covers the whole table.
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([ramp, ramp[::-1], ramp.T], axis=2), "RGB")
    p = Preprocessing(color_mode="RGB", resize=16, crop=16, mean=(0.1, 0.2, 0.3), std=(0.7, 0.8, 0.9))
    np.testing.assert_array_equal(to_tensor(image, p), _arithmetic(image, p))


def test_every_preprocessing_describes_its_input() -> None:
    from export.preprocessing import describe_input

    assert "white (bright) strokes on a black background" in describe_input(DIGITS)
    assert "224x224" in describe_input(IMAGENET) and "RGB" in describe_input(IMAGENET)
    other = Preprocessing(color_mode="L", resize=64, crop=48, mean=(0.5,), std=(0.5,))
    assert describe_input(other) == (
        "a grayscale image, any size; the shorter side is resized to 64 and the centre 48x48 cropped"
    )


def test_out_is_written_in_place() -> None:
    image = Image.fromarray(np.full((40, 50, 3), 200, dtype=np.uint8), "RGB")
    batch = np.zeros((2, 3, 32, 32), dtype=np.float32)
    p = Preprocessing(color_mode="RGB", resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    result = to_tensor(image, p, out=batch[1])
    assert result is batch[1] or np.shares_memory(result, batch)
    np.testing.assert_array_equal(batch[1], _arithmetic(image, p))
    assert not batch[0].any()


@pytest.mark.parametrize(
    "out", [np.empty((3, 224, 224), np.float64), np.empty((1, 224, 224), np.float32)], ids=["dtype", "shape"]
)
def test_a_wrong_out_is_refused(out: np.ndarray) -> None:
    image = Image.new("RGB", (300, 300))
    with pytest.raises(ValueError, match="out must be float32"):
        to_tensor(image, IMAGENET, out=out)
