"""Untrusted bytes -> PIL image -> model tensor, and validation of raw tensors.

Everything a client sends is hostile until checked: the format is sniffed from the magic bytes and
only the JPEG, PNG and WebP decoders ever see the data; the pixel count is checked from the header
before any pixel is decoded; a truncated or corrupt file is an error (never a half-grey image).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps

from export.preprocessing import Preprocessing, to_tensor
from service.errors import InvalidArgument

log = logging.getLogger(__name__)

# Pillow format names we decode. MPO is a JPEG with extra pictures (most phone cameras write it);
# Pillow's JPEG opener returns it as "MPO" and only the first picture is used.
_ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
_ALLOWED_OPENED = frozenset({"JPEG", "MPO", "PNG", "WEBP"})
_SUPPORTED_HINT = "send JPEG, PNG or WebP"
# Pillow's name for an opened image -> the name sniff_format gives its container (for messages).
_SNIFFED_NAME = {"MPO": "JPEG"}

# (prefix, name) of formats we recognise only to name them in the error message.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "HDR"),
    (b"P1", "PBM"),
    (b"P2", "PGM"),
    (b"P3", "PPM"),
    (b"P4", "PBM"),
    (b"P5", "PGM"),
    (b"P6", "PPM"),
    (b"<?xml", "SVG/XML"),
    (b"<svg", "SVG"),
)
_ISO_BMFF_BRANDS = {
    b"avif": "AVIF",
    b"avis": "AVIF",
    b"heic": "HEIC",
    b"heix": "HEIC",
    b"heim": "HEIC",
    b"heis": "HEIC",
    b"hevc": "HEIF",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
}


def sniff_format(data: bytes) -> str | None:
    """Name the container from its magic bytes: "JPEG", "PNG", "WEBP", another name, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        return _ISO_BMFF_BRANDS.get(data[8:12], "ISO-BMFF (" + data[8:12].decode("ascii", "replace") + ")")
    for prefix, name in _OTHER_SIGNATURES:
        if data.startswith(prefix):
            return name
    return None


def _effective_max_pixels(max_pixels: int) -> int:
    # Pillow warns above Image.MAX_IMAGE_PIXELS (and raises above twice that). We never lower or
    # raise that process-wide value; instead our own cap is the smaller of the two, so every image
    # Pillow would merely *warn* about is rejected here as well: its warning is an error in effect.
    # (warnings.catch_warnings() is not used on purpose: before Python 3.14 it swaps the process-wide
    # filter list and is not thread-safe, and decoding runs on a thread pool.)
    pillow_cap = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow_cap is None else min(max_pixels, pillow_cap)


def _too_many_pixels(width: int, height: int, limit: int) -> InvalidArgument:
    """The one message for an image over the pixel cap, whoever noticed it (our header check or
    Pillow's decompression-bomb check): Pillow's own wording never reaches a client."""
    return InvalidArgument(
        f"image is {width}x{height} = {width * height:,} pixels; at most {limit:,} are allowed "
        "(max_image_pixels)",
        reason="too_many_pixels",
    )


def _declared_size(data: bytes, pillow_format: str) -> tuple[int, int] | None:
    """The size an image's header declares, parsed by the format's own Pillow plugin without
    Image.open's decompression-bomb check (the check is in open(), not in the plugin), for the
    message about an image that check refused. No pixel is decoded. None if it cannot be read."""
    Image.init()
    try:
        factory, _ = Image.OPEN[pillow_format]
        with factory(io.BytesIO(data), "") as header_only:
            width, height = header_only.size
            return int(width), int(height)
    except Exception:  # noqa: BLE001 - only a message depends on it
        return None


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode an encoded JPEG, PNG or WebP image, EXIF orientation applied.

    The declared size is checked against `max_pixels` from the header, before any pixel data is
    decoded; the whole image is then decoded, so truncation and corruption are caught here.

    Raises errors.InvalidArgument with reason `empty_image`, `unsupported_format`, `corrupt_image`
    or `too_many_pixels`.
    """
    return load_image(open_image(data, max_pixels=max_pixels))


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """decode_image's first half: sniff the format and parse the header only, refusing what
    decode_image refuses before any pixel is decoded. Finish with `load_image`; `image.size` is the
    declared size (checked against `max_pixels`)."""
    if not data:
        raise InvalidArgument("empty image: the request carried 0 bytes", reason="empty_image")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in the process switched Pillow to padding truncated images with grey: refuse to
        # serve predictions on made-up pixels rather than silently degrade.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; cnnserve requires it False")

    fmt = sniff_format(data)
    if fmt not in _ALLOWED_FORMATS:
        named = fmt if fmt is not None else "(unrecognised data)"
        raise InvalidArgument(
            f"unsupported image format {named}; {_SUPPORTED_HINT}", reason="unsupported_format"
        )

    limit = _effective_max_pixels(max_pixels)
    try:
        # open() parses the header only. `formats` keeps every other plugin away from client bytes.
        image = Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own cap (the warning arrives as an exception where warnings are errors): never
        # above ours (_effective_max_pixels), so the image is over our cap too; say so our way.
        size = _declared_size(data, fmt)
        if size is None:
            raise InvalidArgument(
                f"image declares more than {limit:,} pixels (max_image_pixels)", reason="too_many_pixels"
            ) from None
        raise _too_many_pixels(*size, limit) from None
    except Exception as exc:  # noqa: BLE001 - see below: a header the opener cannot parse is corrupt
        raise InvalidArgument(
            f"corrupt {fmt} image: cannot read its header ({exc})", reason="corrupt_image"
        ) from None

    # Deliberately no `with image:`: close() would free the decoded pixels load_image produces.
    if image.format not in _ALLOWED_OPENED:  # pragma: no cover - `formats` guarantees it
        raise InvalidArgument(
            f"unsupported image format {image.format}; {_SUPPORTED_HINT}", reason="unsupported_format"
        )
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"corrupt {fmt} image: size {width}x{height}", reason="corrupt_image")
    if width * height > limit:
        raise _too_many_pixels(width, height, limit)
    return image


def load_image(image: Image.Image) -> Image.Image:
    """decode_image's second half: decode every pixel of an image from `open_image` and apply its
    EXIF orientation. A truncated or corrupt file raises InvalidArgument(reason="corrupt_image")."""
    fmt = _SNIFFED_NAME.get(str(image.format), str(image.format))
    try:
        # load() decodes everything now: a truncated file raises instead of yielding grey pixels.
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's cap met while decoding (open_image checked the header against ours already).
        width, height = image.size
        raise _too_many_pixels(width, height, Image.MAX_IMAGE_PIXELS or width * height) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on client bytes means a bad file
        # Pillow's decoders signal bad data with OSError, SyntaxError, ValueError, struct.error,
        # IndexError... depending on the codec; all of them mean the client sent a broken file.
        log.debug("decoding a %s image failed", fmt, exc_info=exc)
        raise InvalidArgument(f"corrupt {fmt} image: {exc}", reason="corrupt_image") from None
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # noqa: BLE001
        # The pixels decoded fine; only the EXIF block is malformed. Browsers show such photos
        # unrotated, and so do we, rather than refuse a usable image.
        log.debug("ignoring malformed EXIF data in a %s image", fmt, exc_info=exc)
    return image


def image_to_tensor(
    image: Image.Image, preprocessing: Preprocessing, out: np.ndarray | None = None
) -> np.ndarray:
    """The model's float32 (C, H, W) input for a decoded image (written into `out` when given):
    `export.preprocessing.to_tensor`."""
    return to_tensor(image, preprocessing, out)


def _fmt_shape(shape: Iterable[object]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def check_tensor(
    arr: np.ndarray,
    *,
    shape: tuple[int, ...],
    dtype: np.dtype | Iterable[np.dtype],
) -> np.ndarray:
    """Validate a raw input tensor for a model whose single-image input shape is `shape` (C, H, W).

    Accepts one image (C, H, W) or a batch (N, C, H, W) with N >= 1, of `dtype` (or any of several
    dtypes); returns a C-contiguous (N, C, H, W) array. Raises errors.InvalidArgument naming the
    problem: wrong rank or shape, wrong dtype, an empty batch, NaN or infinite values.
    """
    allowed = [np.dtype(dtype)] if isinstance(dtype, np.dtype | type | str) else [np.dtype(d) for d in dtype]
    expected = _fmt_shape(("N", *shape))
    if not isinstance(arr, np.ndarray):
        raise InvalidArgument(f"expected a tensor of shape {expected}, got {type(arr).__name__}")
    if arr.ndim == len(shape) and tuple(arr.shape) == tuple(shape):
        arr = arr[None]
    elif arr.ndim != len(shape) + 1 or tuple(arr.shape[1:]) != tuple(shape):
        raise InvalidArgument(f"expected shape {expected}, got {_fmt_shape(arr.shape)}")
    if arr.shape[0] == 0:
        raise InvalidArgument(f"expected shape {expected} with N >= 1, got an empty batch")
    if arr.dtype not in allowed:
        names = " or ".join(d.name for d in allowed)
        raise InvalidArgument(f"expected dtype {names}, got {arr.dtype.name}")
    finite = np.isfinite(arr)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise InvalidArgument(
            f"tensor contains {int((~finite).sum())} NaN or infinite value(s), "
            f"the first at index {list(where)}"
        )
    return np.ascontiguousarray(arr)
