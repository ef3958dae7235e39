"""CnnserveClient.classify_stream's contract (the caller's own errors, per-item deadlines) and the
image kinds CnnserveClient accepts, against the real server wiring (engine double)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from servicer_fakes import FakeEngine, Harness

from service.client import CnnserveClient, CnnserveError, image_input


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness(FakeEngine())
    yield h
    h.close()


@pytest.fixture
def engine(harness: Harness) -> Iterator[FakeEngine]:
    yield harness.engine
    harness.engine.delay_s = 0.0


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (32, 32), value).save(buf, "PNG")
    return buf.getvalue()


# --- the caller's own errors -------------------------------------------------------------------


def test_plain_paths_instead_of_pairs_raise_type_error(harness: Harness, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_png(0))
    with CnnserveClient(harness.address, timeout_s=10) as client, pytest.raises(TypeError, match="pairs"):
        list(client.classify_stream([str(path)], model="lenet5"))  # type: ignore[list-item]


def test_a_missing_file_raises_file_not_found(harness: Harness, tmp_path: Path) -> None:
    items = [("ok", _png(0)), ("gone", tmp_path / "missing.png")]
    with CnnserveClient(harness.address, timeout_s=10) as client, pytest.raises(FileNotFoundError):
        list(client.classify_stream(items, model="lenet5"))


def test_an_error_of_the_callers_generator_is_raised_as_it_is(harness: Harness) -> None:
    class Mine(Exception):
        pass

    def items() -> Iterator[tuple[str, bytes]]:
        yield "a", _png(0)
        raise Mine("the caller's own bug")

    with CnnserveClient(harness.address, timeout_s=10) as client, pytest.raises(Mine):
        list(client.classify_stream(items(), model="lenet5"))


def test_a_duplicate_id_in_flight_is_a_value_error(harness: Harness, engine: FakeEngine) -> None:
    engine.delay_s = 0.5  # the first "a" is still in flight when the second is taken
    with CnnserveClient(harness.address, timeout_s=10) as client, pytest.raises(ValueError, match="unique"):
        list(client.classify_stream([("a", _png(0)), ("a", _png(0))], model="lenet5"))


# --- deadlines ---------------------------------------------------------------------------------


def _slowly(count: int, every_s: float) -> Iterator[tuple[str, bytes]]:
    for i in range(count):
        if i:
            time.sleep(every_s)
        yield str(i), _png(0)


def test_the_deadline_is_per_item_not_for_the_whole_stream(harness: Harness) -> None:
    """One image every 0.4 s for 1.6 s under a 1 s client timeout: every item is answered."""
    with CnnserveClient(harness.address, timeout_s=1.0) as client:
        results = list(client.classify_stream(_slowly(5, 0.4), model="lenet5"))
    assert sorted(r.id for r in results) == ["0", "1", "2", "3", "4"]
    assert all(r.error is None for r in results), [r.error for r in results]


def test_the_caller_may_still_bound_the_whole_stream(harness: Harness) -> None:
    with CnnserveClient(harness.address, timeout_s=10) as client, pytest.raises(CnnserveError) as info:
        list(client.classify_stream(_slowly(5, 0.3), model="lenet5", stream_timeout_s=0.5))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_an_item_not_answered_in_time_is_its_own_deadline_error(harness: Harness, engine: FakeEngine) -> None:
    engine.delay_s = 3.0
    start = time.monotonic()
    with CnnserveClient(harness.address, timeout_s=10) as client:
        items = [("a", _png(0)), ("b", _png(0))]
        results = list(client.classify_stream(items, model="lenet5", timeout_s=0.3))
    elapsed = time.monotonic() - start
    assert sorted(r.id for r in results) == ["a", "b"]
    for r in results:
        assert r.result is None and r.error is not None
        assert r.error.code == grpc.StatusCode.DEADLINE_EXCEEDED and "0.3 s" in r.error.message
    # Not held until the server's answers (3 s) arrive: the late answers are dropped.
    assert elapsed < 2.0


# --- image kinds -------------------------------------------------------------------------------


def _decoded(image: object) -> np.ndarray:
    message = image_input(image)  # type: ignore[arg-type]
    assert message.WhichOneof("kind") == "encoded"
    with Image.open(io.BytesIO(message.encoded)) as decoded:
        assert decoded.format == "PNG"
        return np.asarray(decoded)


def test_pil_images_and_uint8_pixels_are_sent_as_lossless_png() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    assert np.array_equal(_decoded(rgb), rgb)
    assert np.array_equal(_decoded(gray), gray)
    assert np.array_equal(_decoded(gray[:, :, None]), gray)
    assert np.array_equal(_decoded(rgba), rgba)
    assert np.array_equal(_decoded(Image.fromarray(rgb)), rgb)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert np.array_equal(_decoded(cmyk), np.asarray(cmyk.convert("RGB")))


@pytest.mark.parametrize(
    ("image", "error"),
    [
        (np.zeros((3, 8, 8, 2), np.uint8), ValueError),
        (np.zeros((8, 8, 2), np.uint8), ValueError),
        (np.zeros((8, 8), np.int64), TypeError),
        (12, TypeError),
    ],
)
def test_other_arrays_are_refused(image: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        image_input(image)  # type: ignore[arg-type]


def test_classify_accepts_pil_images_and_pixel_arrays(harness: Harness) -> None:
    """The server sees exactly the pixels: the same answer as the PNG file of the same image."""
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "PNG")
    with CnnserveClient(harness.address, timeout_s=10) as client:
        expected = client.classify(buf.getvalue(), model="lenet5", top_k=10).classes
        assert client.classify(gray, model="lenet5", top_k=10).classes == expected
        assert client.classify(Image.fromarray(gray), model="lenet5", top_k=10).classes == expected
        white = np.full((32, 32, 3), 255, np.uint8)
        assert client.classify(white, model="lenet5", top_k=1).classes[0].index == 2
        (batch_white,) = client.classify_batch([Image.new("L", (32, 32), 255)], model="lenet5", top_k=1)
        assert batch_white.classes[0].index == 2
