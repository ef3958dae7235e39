"""Arrays to PNGs and back (service/worker/rendering.py)."""

from __future__ import annotations

import numpy as np
import pytest
from job_helpers import picture

from service.errors import InvalidArgument
from service.worker import rendering


def test_rendering_round_trips_and_validates() -> None:
    image = picture(20, 30)
    png = rendering.encode_png(image)
    np.testing.assert_array_equal(rendering.decode_png(png), rendering.to_uint8(image))
    assert rendering.to_float_image(rendering.to_uint8(image)).dtype == np.float32
    for bad, message in (
        (np.zeros((4, 4, 4), np.float32), "shape"),
        (np.zeros((4, 4, 3), np.int32), "dtype"),
        (np.full((4, 4), -0.5, np.float32), "values must lie"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            rendering.to_float_image(bad)

    saliency = np.zeros((3, 8, 8), np.float32)
    saliency[0, 2, 2] = 1.0
    saliency[1, 5, 5] = -1.0
    signed = rendering.saliency_to_image(saliency, "signed")
    assert signed.shape == (8, 8, 3)
    assert signed[2, 2, 0] > 0.5 > signed[5, 5, 1]  # positive above grey, negative below
    magnitude = rendering.saliency_to_image(saliency, "magnitude")
    assert magnitude.shape == (8, 8, 1) and magnitude[2, 2, 0] == magnitude[5, 5, 0] == 1.0
    assert (rendering.saliency_to_image(np.zeros((1, 4, 4)), "signed") == 0.5).all()
    assert rendering.decode_png(rendering.saliency_png(saliency)).shape == (8, 8, 3)
