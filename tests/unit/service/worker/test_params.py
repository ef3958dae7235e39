"""What a job may ask for (service/worker/params.py): parameters that make no sense are refused."""

from __future__ import annotations

import pytest

from service.errors import InvalidArgument
from service.worker.params import DreamParams, StyleParams


def test_params_reject_nonsense() -> None:
    with pytest.raises(InvalidArgument, match="steps must be at least 1"):
        DreamParams(steps=0)
    with pytest.raises(InvalidArgument, match="weight of layer 'a' must be a finite number"):
        DreamParams(layers={"a": float("nan")})
    with pytest.raises(InvalidArgument, match="channels given for layer 'b', which is not a target"):
        DreamParams(layers={"a": 1.0}, channels={"b": (1,)})
    with pytest.raises(InvalidArgument, match="style_weight must be a finite number >= 0"):
        StyleParams(style_weight=-1.0)
    with pytest.raises(InvalidArgument, match="2 style_layer_weights for 5 style layers"):
        StyleParams(style_layer_weights=(1.0, 2.0))
