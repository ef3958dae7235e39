"""The client side of `cnnserve` against a real server on the demo repository: `cnnserve models`,
and CnnserveClient.classify with PIL images and pixel arrays."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from server_process import ServerProcess

from export import digits
from service.cli import main
from service.client import CnnserveClient

pytestmark = pytest.mark.integration


def test_models_lists_the_demo_repository(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--address", server.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == ["lenet5", "resnet18"]
    assert "yes (digits)" in rows["lenet5"] and "no (random weights)" in rows["resnet18"]
    assert all("classify" in row and "ExecutionProvider" in row for row in rows.values())
    assert main(["models", "--json", "--address", server.address]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["lenet5"]["trained"] and not records["resnet18"]["trained"]


def test_classify_takes_pil_images_and_pixels_as_the_same_png(server: ServerProcess) -> None:
    index = int(digits.split_indices()[1][0])
    image = digits.render(index)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    with CnnserveClient(server.address, timeout_s=30) as client:
        expected = client.classify(buffer.getvalue(), model="lenet5", top_k=3).classes
        assert client.classify(image, model="lenet5", top_k=3).classes == expected
        assert client.classify(np.asarray(image), model="lenet5", top_k=3).classes == expected
