"""The images the client accepts, as ImageInput messages: encoded bytes or a file path as they are,
a PIL image or uint8 pixels as a lossless PNG, a float32/float16 array as a preprocessed tensor."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from service._proto.cnnserve.v1 import inference_pb2 as pb

ImageLike = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", np.ndarray, Image.Image]

# Modes PNG stores as they are; any other (CMYK, YCbCr, F, ...) is converted to RGB first.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})


def _png(image: Image.Image) -> bytes:
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    # Level 1: lossless all the same, and several times faster to encode than the default 6; the
    # few percent of extra bytes cost less than the CPU on any network worth serving over.
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _pixels(array: np.ndarray) -> Image.Image:
    """A uint8 [H, W] or [H, W, C] (C 1, 3, 4: L, RGB, RGBA) array as a PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(
            f"uint8 pixels must be [H, W] or [H, W, C] with C 1, 3 or 4, got shape {list(array.shape)} "
            "(a preprocessed tensor is float32 or float16)"
        )
    return Image.fromarray(np.ascontiguousarray(array))


def image_input(image: ImageLike) -> pb.ImageInput:
    """An image as an ImageInput message: encoded bytes or a file path as they are, a PIL image or
    uint8 pixels as a PNG, a float32/float16 array as a preprocessed tensor (module docstring)."""
    if isinstance(image, Image.Image):
        return pb.ImageInput(encoded=_png(image))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            return pb.ImageInput(encoded=_png(_pixels(image)))
        if image.dtype not in (np.float32, np.float16):
            raise TypeError(
                f"array images must be uint8 pixels or a float32/float16 tensor, got {image.dtype}"
            )
        data = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<"))
        return pb.ImageInput(
            tensor=pb.Tensor(shape=list(data.shape), dtype=data.dtype.name, data=data.tobytes())
        )
    if isinstance(image, bytes | bytearray | memoryview):
        return pb.ImageInput(encoded=bytes(image))
    if isinstance(image, str | os.PathLike):
        return pb.ImageInput(encoded=Path(image).read_bytes())
    raise TypeError(f"unsupported image type {type(image).__name__}")
