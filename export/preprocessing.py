"""The one image -> tensor transform, shared by training, export verification and the service.

Keeping it in one place is what makes a served model see exactly what it was trained on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes the model's input tensor."""

    color_mode: Literal["L", "RGB"]
    resize: int  # the shorter side is resized to this (bilinear)
    crop: int  # then center-cropped to crop x crop
    mean: tuple[float, ...]  # per channel, applied to pixel / 255
    std: tuple[float, ...]
    # Pixel values are flipped (v -> 255 - v) before normalization: for a model trained on light
    # strokes on a dark ground (white-on-black data) that is sent dark-on-light images. A user's
    # own model declares it (`--preprocessing`); the zoo's models never set it (describe_input).
    invert: bool = False

    def __post_init__(self) -> None:
        if self.color_mode not in ("L", "RGB"):
            raise ValueError(f"color_mode must be 'L' or 'RGB', got {self.color_mode!r}")
        if not self.crop >= 1:
            raise ValueError(f"crop must be a positive integer, got {self.crop!r}")
        if not isinstance(self.invert, bool):
            raise ValueError(f"invert must be true or false, got {self.invert!r}")
        if not all(math.isfinite(v) for v in self.mean) or not all(
            math.isfinite(v) and v > 0 for v in self.std
        ):
            raise ValueError(
                f"mean must be finite and std positive numbers, got {list(self.mean)}, {list(self.std)}"
            )
        channels = 1 if self.color_mode == "L" else 3
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} values for color mode {self.color_mode}")
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            color_mode=d["color_mode"],
            resize=int(d["resize"]),
            crop=int(d["crop"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            # Absent in metadata.json written before issue 18: no inversion.
            invert=d.get("invert", False),
        )


IMAGENET = Preprocessing(color_mode="RGB", resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def resize_and_crop(image: Image.Image, p: Preprocessing) -> Image.Image:
    """Convert to the model's colour mode, resize the shorter side, center-crop."""
    if image.mode != p.color_mode:
        # Palette/alpha images go through RGB(A) first so transparency and palettes convert sanely.
        if image.mode in ("P", "PA", "LA", "RGBA", "I", "I;16", "F", "CMYK", "YCbCr", "1"):
            image = image.convert("RGB")
        image = image.convert(p.color_mode)
    w, h = image.size
    short = min(w, h)
    if short != p.resize:
        scale = p.resize / short
        nw, nh = max(p.resize, round(w * scale)), max(p.resize, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BILINEAR)
        w, h = nw, nh
    if (w, h) != (p.crop, p.crop):
        left, top = (w - p.crop) // 2, (h - p.crop) // 2
        image = image.crop((left, top, left + p.crop, top + p.crop))
    return image


def to_tensor(image: Image.Image, p: Preprocessing, out: np.ndarray | None = None) -> np.ndarray:
    """A decoded PIL image -> normalized float32 array of shape (C, crop, crop), written into `out`
    (e.g. a row of a batch) when given.

    Each channel is normalized through a 256-entry lookup table of (v / 255 - mean) / std computed
    in float32, exactly the values the arithmetic gives, at a fraction of its cost (one gather per
    pixel instead of three float passes over the image).
    """
    image = resize_and_crop(image, p)
    pixels = np.asarray(image)
    if out is None:
        out = np.empty((p.channels, p.crop, p.crop), dtype=np.float32)
    elif out.shape != (p.channels, p.crop, p.crop) or out.dtype != np.float32:
        shape = (p.channels, p.crop, p.crop)
        raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {out.shape}")
    table = _normalization_table(p.mean, p.std, p.invert)
    if pixels.ndim == 2:
        np.take(table[0], pixels, out=out[0])
    else:
        for c in range(p.channels):
            np.take(table[c], pixels[:, :, c], out=out[c])
    return out


@functools.lru_cache(maxsize=256)
def _normalization_table(mean: tuple[float, ...], std: tuple[float, ...], invert: bool = False) -> np.ndarray:
    """[C, 256] float32: row c maps a pixel value v to (v / 255 - mean[c]) / std[c], with `invert`
    to ((255 - v) / 255 - mean[c]) / std[c]."""
    pixels = np.arange(256, dtype=np.float32)
    if invert:
        pixels = np.float32(255.0) - pixels
    values = pixels * np.float32(1.0 / 255.0)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    table = np.ascontiguousarray((values[None, :] - m) / s, dtype=np.float32)
    table.setflags(write=False)
    return table


# LeNet-5 on the UCI digits: the 8x8 images rendered to 32x32 grayscale (export.digits), then
# normalized with the training split's pixel mean and std (a test recomputes them).
DIGITS = Preprocessing(color_mode="L", resize=32, crop=32, mean=(0.3055,), std=(0.3235,))


def describe_input(p: Preprocessing) -> str:
    """What an image sent to a model with this preprocessing should show, for people: metadata.json's
    `input.description` when the exporter wrote one, and ModelInfo.input_description.

    The digits convention matters most: the UCI digits are bright strokes on a dark ground, tightly
    cropped, so a black-on-white drawing reads as another digit (a hand-drawn 7 scored `4 0.60`, its
    inverse `7 0.986`). The zoo's LeNet-5 does not invert: the polarity is the training data's, and a
    server-side flip would only move the surprise to the users who send UCI-like images. A user's own
    model may declare `invert` (its users send dark-on-light images); the description then says so.
    """
    if p == DIGITS:
        return (
            "one handwritten digit, white (bright) strokes on a black background, tightly cropped and "
            "centred, as in the UCI digits LeNet-5 was trained on; invert a black-on-white drawing "
            "before sending it. Any size: it is resized to 32x32 grayscale"
        )
    mode = "grayscale" if p.color_mode == "L" else "RGB"
    if p == IMAGENET:
        return (
            "a photo of one ImageNet object class, any size, RGB; the shorter side is resized to 256 "
            "and the centre 224x224 cropped, so keep the object in the middle"
        )
    described = (
        f"a {mode} image, any size; the shorter side is resized to {p.resize} and the centre "
        f"{p.crop}x{p.crop} cropped"
    )
    if p.invert:
        described += "; its pixel values are inverted (255 - v) before the model sees them"
    return described
