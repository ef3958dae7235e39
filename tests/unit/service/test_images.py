"""service.images: what a hostile or careless client can send, and what a correct image becomes."""

from __future__ import annotations

import io
import resource
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from export.preprocessing import DIGITS, Preprocessing
from service.errors import InvalidArgument
from service.images import check_tensor, decode_image, image_to_tensor, sniff_format

MAX = 40_000_000
SMALL_RGB = Preprocessing(color_mode="RGB", resize=8, crop=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(w: int = 40, h: int = 30) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    arr[..., 2] = 77
    return Image.fromarray(arr, "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_declaring(width: int, height: int, idat_raw_bytes: int = 1 << 20) -> bytes:
    """A valid-looking grayscale PNG whose IHDR claims width x height over a tiny compressed IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * idat_raw_bytes, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def reason_of(data: bytes, max_pixels: int = MAX) -> tuple[str, str]:
    with pytest.raises(InvalidArgument) as info:
        decode_image(data, max_pixels=max_pixels)
    return info.value.reason, info.value.message


# --- accepted formats --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "kw"), [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True})]
)
def test_decodes_supported_formats(fmt: str, kw: dict[str, object]) -> None:
    source = rgb()
    image = decode_image(encode(source, fmt, **kw), max_pixels=MAX)
    assert image.size == (40, 30)
    assert image.mode == "RGB"
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(source, dtype=np.int16))
    assert diff.max() <= (0 if fmt != "JPEG" else 12)


def test_exif_orientation_is_applied() -> None:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; display rotated 90 degrees clockwise
    data = encode(Image.fromarray(arr, "RGB"), "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(data, max_pixels=MAX)
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top  # what was on the left is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    assert image.getexif().get(0x0112, 1) == 1  # not rotated twice downstream


# --- refused inputs ----------------------------------------------------------------------------


def test_empty_bytes() -> None:
    assert reason_of(b"")[0] == "empty_image"


@pytest.mark.parametrize(("fmt", "name"), [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF"), ("ICO", "ICO")])
def test_other_formats_are_refused_by_name(fmt: str, name: str) -> None:
    reason, message = reason_of(encode(rgb(32, 32), fmt))
    assert reason == "unsupported_format"
    assert message == f"unsupported image format {name}; send JPEG, PNG or WebP"


def test_unrecognised_bytes_are_refused() -> None:
    reason, message = reason_of(b"definitely not an image, just text")
    assert reason == "unsupported_format"
    assert "unrecognised" in message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_images_are_corrupt(fmt: str) -> None:
    data = encode(rgb(64, 64), fmt)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    reason, message = reason_of(data[: len(data) * 2 // 3])
    assert reason == "corrupt_image"
    assert fmt in message


def test_garbage_after_a_valid_signature_is_corrupt() -> None:
    assert reason_of(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)[0] == "corrupt_image"
    assert reason_of(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)[0] == "corrupt_image"


def test_png_with_bad_idat_is_corrupt() -> None:
    data = bytearray(encode(rgb(32, 32), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 40] = b"\xaa" * 30  # inside the compressed stream (CRC now wrong too)
    assert reason_of(bytes(data))[0] == "corrupt_image"


def test_pixel_cap_from_the_header() -> None:
    reason, message = reason_of(encode(rgb(100, 100), "PNG"), max_pixels=5_000)
    assert reason == "too_many_pixels"
    assert "100x100" in message and "5,000" in message
    decode_image(encode(rgb(100, 50), "PNG"), max_pixels=5_000)  # exactly at the cap is fine


def test_header_bomb_is_refused_without_allocating() -> None:
    bomb = png_declaring(20_000, 20_000)  # 400 Mpx (400 MB as grayscale) in a few kilobytes
    assert len(bomb) < 48 * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for max_pixels in (MAX, 10**12):  # our cap, then Pillow's own (never raised by us)
        reason, message = reason_of(bomb, max_pixels=max_pixels)
        assert reason == "too_many_pixels"
        # One form whoever refused it, with the declared size; never Pillow's own wording.
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        assert message == (
            f"image is 20000x20000 = 400,000,000 pixels; at most {limit:,} are allowed (max_image_pixels)"
        )
        assert "decompression bomb" not in message.lower() and "Image size" not in message
    # Under Pillow's limits but over ours: refused by our own check of the header.
    reason, message = reason_of(png_declaring(8_000, 8_000), max_pixels=MAX)
    assert reason == "too_many_pixels" and "8000x8000" in message
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"peak memory grew by {grown_kib} KiB"


def test_pillow_bomb_warning_is_an_error_even_when_warnings_are_ignored() -> None:
    # 100 Mpx: above Pillow's MAX_IMAGE_PIXELS (warning), below twice it (error). Our cap is higher
    # still, so only Pillow's signal stands between this image and a 100 MB decode.
    data = png_declaring(10_000, 10_000)
    assert Image.MAX_IMAGE_PIXELS is not None and 10_000 * 10_000 > Image.MAX_IMAGE_PIXELS
    expected = f"image is 10000x10000 = 100,000,000 pixels; at most {Image.MAX_IMAGE_PIXELS:,} are allowed"
    assert reason_of(data, max_pixels=10**12) == ("too_many_pixels", expected + " (max_image_pixels)")
    with warnings.catch_warnings():  # pytest: warnings are errors; here, as in production, they are not
        warnings.simplefilter("ignore")
        assert reason_of(data, max_pixels=10**12) == ("too_many_pixels", expected + " (max_image_pixels)")
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # untouched: no global side effect


def test_truncated_images_setting_is_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(rgb(), "PNG"), max_pixels=MAX)


def test_sniff_format() -> None:
    assert sniff_format(encode(rgb(), "PNG")) == "PNG"
    assert sniff_format(encode(rgb(), "JPEG")) == "JPEG"
    assert sniff_format(encode(rgb(), "WEBP")) == "WEBP"
    assert sniff_format(b"\x00\x00\x00\x1cftypavif") == "AVIF"
    assert sniff_format(b"xyz") is None


# --- colour modes -> tensors -------------------------------------------------------------------


def test_grayscale_rgba_and_palette_become_rgb_tensors() -> None:
    gray = Image.new("L", (16, 16), 128)
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 255] + [0] * 765)
    for source, expected in ((gray, (128, 128, 128)), (rgba, (255, 0, 0)), (palette, (0, 0, 255))):
        image = decode_image(encode(source, "PNG"), max_pixels=MAX)
        tensor = image_to_tensor(image, SMALL_RGB)
        assert tensor.shape == (3, 8, 8) and tensor.dtype == np.float32
        want = (np.asarray(expected, dtype=np.float32) / 255 - 0.5) / 0.25
        np.testing.assert_allclose(tensor[:, 4, 4], want, atol=1e-5)


def test_color_image_becomes_a_grayscale_tensor_for_lenet() -> None:
    image = decode_image(encode(rgb(64, 48), "PNG"), max_pixels=MAX)
    tensor = image_to_tensor(image, DIGITS)
    assert tensor.shape == (1, 32, 32) and tensor.dtype == np.float32


# --- raw tensors -------------------------------------------------------------------------------


def test_check_tensor_accepts_one_image_or_a_batch() -> None:
    single = np.zeros((3, 224, 224), dtype=np.float32)
    out = check_tensor(single, shape=(3, 224, 224), dtype=np.dtype(np.float32))
    assert out.shape == (1, 3, 224, 224)
    batch = np.zeros((2, 3, 224, 224), dtype=np.float16)
    assert check_tensor(batch, shape=(3, 224, 224), dtype=[np.float32, np.float16]).shape == (2, 3, 224, 224)
    strided = np.zeros((2, 3, 224, 448), dtype=np.float32)[..., ::2]
    assert check_tensor(strided, shape=(3, 224, 224), dtype=np.dtype(np.float32)).flags.c_contiguous


@pytest.mark.parametrize(
    ("arr", "message"),
    [
        (np.zeros((2, 3, 32, 32), np.float32), "expected shape [N,3,224,224], got [2,3,32,32]"),
        (np.zeros((3, 224), np.float32), "expected shape [N,3,224,224], got [3,224]"),
        (np.zeros((0, 3, 224, 224), np.float32), "got an empty batch"),
        (np.zeros((1, 3, 224, 224), np.float64), "expected dtype float32, got float64"),
        (np.zeros((1, 3, 224, 224), np.uint8), "expected dtype float32, got uint8"),
    ],
)
def test_check_tensor_names_the_problem(arr: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_tensor(arr, shape=(3, 224, 224), dtype=np.dtype(np.float32))
    assert message in info.value.message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_tensor_rejects_non_finite_values(bad: float) -> None:
    arr = np.zeros((2, 1, 4, 4), dtype=np.float32)
    arr[1, 0, 2, 3] = bad
    with pytest.raises(InvalidArgument) as info:
        check_tensor(arr, shape=(1, 4, 4), dtype=np.dtype(np.float32))
    assert "NaN or infinite" in info.value.message and "[1, 0, 2, 3]" in info.value.message


def test_open_image_reads_the_header_only_and_load_image_finishes() -> None:
    from service.images import load_image, open_image

    buf = io.BytesIO()
    Image.new("L", (40, 30), 7).save(buf, format="PNG")
    data = buf.getvalue()
    opened = open_image(data, max_pixels=10_000)
    assert opened.size == (40, 30) and opened.format == "PNG"
    assert opened._im is None  # nothing decoded yet
    assert np.asarray(load_image(opened)).max() == 7
    with pytest.raises(InvalidArgument) as info:
        open_image(data, max_pixels=1000)  # the cap is checked from the header
    assert info.value.reason == "too_many_pixels"
    with pytest.raises(InvalidArgument) as info:
        load_image(open_image(data[: len(data) - 30], max_pixels=10_000))  # truncated pixel data
    assert info.value.reason == "corrupt_image" and "corrupt PNG image" in info.value.message
