"""Arrays <-> images for the gradient jobs: float pixel arrays, PNG bytes, saliency visualisations.

Conventions used by every gradient job:

- an *image array* is `float32 (H, W, C)` with values in [0, 1] (C = 1 or 3); `uint8 (H, W, C)` and
  `(H, W)` arrays are accepted on input and converted;
- a *saliency map* is the raw, signed gradient of one sample, `float32 (C, H, W)`, as
  `guided_backprop.explain` returns it.

Numpy and Pillow only (no torch), so the serving process can use it too. Decoding *untrusted* client
bytes is `service.images.decode_image`'s job (format sniffing, pixel caps); `decode_png` here is for
our own PNGs (tests, clients reading results back).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image

from service.errors import InvalidArgument

SaliencyStyle = Literal["signed", "magnitude"]

# The deprocessing of the guided-backprop literature (e.g. Springenberg et al.'s figures, the Keras
# visualisation recipes): centre, scale to unit std, then map +-5 std to [0, 1].
_SIGNED_SPREAD = 0.1
# Magnitude maps are scaled by this percentile instead of the max, so one hot pixel cannot turn the
# rest of the map black (Smilkov et al. 2017 clip at the 99th percentile for the same reason).
_MAGNITUDE_PERCENTILE = 99.0


def to_float_image(image: np.ndarray, *, name: str = "image") -> np.ndarray:
    """An image array (uint8 0..255 or float 0..1; (H, W), (H, W, 1) or (H, W, 3)) -> float32 (H, W, C).

    Raises InvalidArgument for anything else (wrong rank, channel count, NaN/Inf, values outside [0, 1]).
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise InvalidArgument(
            f"{name} must be an (H, W), (H, W, 1) or (H, W, 3) array, got shape {tuple(np.shape(image))}",
            reason="not_an_image",
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidArgument(f"{name} is empty (shape {arr.shape})", reason="not_an_image")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) * np.float32(1.0 / 255.0)
    if arr.dtype.kind != "f":
        raise InvalidArgument(f"{name} must be uint8 or float, got dtype {arr.dtype}", reason="not_an_image")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InvalidArgument(f"{name} contains NaN or Inf", reason="not_an_image")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise InvalidArgument(
            f"{name} values must lie in [0, 1] for float arrays, got [{arr.min():.4g}, {arr.max():.4g}]",
            reason="not_an_image",
        )
    return np.ascontiguousarray(arr)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 0..255 (rounded, clipped); uint8 passes through."""
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr
    out: np.ndarray = np.clip(np.rint(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return out


def pil_to_array(image: Image.Image, mode: Literal["L", "RGB"] = "RGB") -> np.ndarray:
    """A decoded PIL image -> float32 (H, W, C) in [0, 1], converted to `mode` first."""
    if image.mode != mode:
        if image.mode in ("P", "PA", "LA", "RGBA", "I", "I;16", "F", "CMYK", "YCbCr", "1"):
            image = image.convert("RGB")
        image = image.convert(mode)
    return to_float_image(np.asarray(image))


def encode_png(image: np.ndarray, *, compress_level: int = 1) -> bytes:
    """(H, W), (H, W, 1) or (H, W, 3) uint8 or float [0, 1] -> PNG bytes.

    compress_level 1: previews are encoded inside the optimisation loop, where speed beats size.
    """
    arr = to_uint8(np.asarray(image))
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"cannot encode an array of shape {arr.shape} as PNG")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes written by `encode_png` -> uint8 (H, W) or (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG":
            raise ValueError(f"not a PNG (got {im.format})")
        return np.asarray(im.convert("L" if im.mode in ("L", "1", "I", "I;16") else "RGB"))


def saliency_to_image(saliency: np.ndarray, style: SaliencyStyle = "signed") -> np.ndarray:
    """One sample's gradient map (C, H, W) -> a float32 (H, W, C') picture in [0, 1].

    signed: per map, subtract the mean, divide by the std, map +-5 std to [0, 1] (grey = 0); keeps the
        colour channels (C' = C): the usual guided-backprop rendering.
    magnitude: max over channels of |g|, divided by its 99th percentile and clipped (C' = 1): the
        saliency-map rendering of Simonyan et al. 2014.
    A map that is zero everywhere renders mid-grey (signed) or black (magnitude).
    """
    g = np.asarray(saliency, dtype=np.float32)
    if g.ndim == 2:
        g = g[None]
    if g.ndim != 3:
        raise ValueError(f"saliency must be (C, H, W) or (H, W), got shape {np.shape(saliency)}")
    if style == "signed":
        g = g - g.mean()
        std = float(g.std())
        out: np.ndarray = g / (std + 1e-12) * _SIGNED_SPREAD + 0.5 if std > 0 else np.full_like(g, 0.5)
        return np.asarray(np.clip(out, 0.0, 1.0).transpose(1, 2, 0), dtype=np.float32)
    if style == "magnitude":
        m = np.abs(g).max(axis=0)
        scale = float(np.percentile(m, _MAGNITUDE_PERCENTILE))
        if scale <= 0:
            scale = float(m.max())
        mag: np.ndarray = m / scale if scale > 0 else np.zeros_like(m)
        return np.asarray(np.clip(mag, 0.0, 1.0)[:, :, None], dtype=np.float32)
    raise ValueError(f"unknown saliency style {style!r}; use 'signed' or 'magnitude'")


def saliency_png(saliency: np.ndarray, style: SaliencyStyle = "signed") -> bytes:
    """`saliency_to_image` then `encode_png`."""
    return encode_png(saliency_to_image(saliency, style))


# --- grids: FeatureMaps' channels and Filters' kernels ------------------------------------------------

# Cells of a grid are this many pixels apart (the background between them is black).
GRID_GAP = 1


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) of a near-square grid holding `count` cells: columns = ceil(sqrt(count)),
    as few rows as fit (96 AlexNet kernels: 10 x 10; 16 channels: 4 x 4)."""
    cols = max(1, math.ceil(math.sqrt(count)))
    return max(1, math.ceil(count / cols)), cols


def min_max(cell: np.ndarray) -> np.ndarray:
    """One cell scaled to [0, 1] on its own (a constant cell is 0)."""
    cell = cell.astype(np.float32)
    lo, hi = float(cell.min()), float(cell.max())
    if not hi > lo:
        return np.zeros_like(cell)
    return (cell - lo) / (hi - lo)


def tile(cells: Sequence[np.ndarray], *, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    """Equal-sized (h, w) or (h, w, 3) cells in [0, 1], row-major in a grid GRID_GAP px apart (a
    near-square grid unless rows/cols say otherwise) -> float32 (H, W[, 3]) in [0, 1]."""
    if not cells:
        raise ValueError("tile needs at least one cell")
    if rows is None or cols is None:
        rows, cols = grid_shape(len(cells))
    h, w = cells[0].shape[:2]
    extra = cells[0].shape[2:]
    out = np.zeros((rows * h + (rows - 1) * GRID_GAP, cols * w + (cols - 1) * GRID_GAP, *extra), np.float32)
    for i, cell in enumerate(cells):
        r, c = divmod(i, cols)
        top, left = r * (h + GRID_GAP), c * (w + GRID_GAP)
        out[top : top + h, left : left + w] = cell
    return out


def feature_map_png(activations: np.ndarray, channels: Sequence[int]) -> bytes:
    """A layer's activations (C, H, W) or (C,) for one image -> PNG of `channels` (in that order),
    each min-max scaled, grey; a layer without spatial size is one row of 1x1 cells."""
    if activations.ndim == 1:
        values = activations[list(channels)].astype(np.float32)
        return encode_png(tile([np.full((1, 1), v) for v in min_max(values)], rows=1, cols=len(values)))
    if activations.ndim == 2:  # (C, L): one row of pixels per channel
        activations = activations[:, None, :]
    return encode_png(tile([min_max(activations[c]) for c in channels]))


def filters_png(weights: np.ndarray) -> bytes:
    """Conv2d weights (out, in, kH, kW) -> PNG, one cell per output channel, each kernel min-max
    scaled on its own: RGB for 3 input channels, else the mean over the input channels in grey."""
    cells = []
    for kernel in weights.astype(np.float32):
        if kernel.shape[0] == 3:
            cells.append(min_max(np.transpose(kernel, (1, 2, 0))))
        else:
            cells.append(min_max(kernel.mean(axis=0)))
    return encode_png(tile(cells))


__all__ = [
    "SaliencyStyle",
    "decode_png",
    "encode_png",
    "pil_to_array",
    "GRID_GAP",
    "feature_map_png",
    "filters_png",
    "grid_shape",
    "min_max",
    "saliency_png",
    "tile",
    "saliency_to_image",
    "to_float_image",
    "to_uint8",
]
