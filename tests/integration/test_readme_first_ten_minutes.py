"""README.md's "First ten minutes", run as written: every fenced block marked `<!-- first-ten-minutes -->`,
in order, as one bash script in an empty folder, against a real server holding what the section
uses from `make serve`'s demo set (lenet5 and resnet18 from `demo_repository`, vgg19 from the cached
`vgg19_repository`) with one gradient worker.

The one change made to the commands is the address: the client commands find the server through
CNNSERVE_ADDRESS (which they read for --address's default; the section's commands give none), and
curl's `localhost:8000` becomes the server's REST port. The folder holds `.venv`, a link to this
interpreter's venv, so `source .venv/bin/activate` is the section's own first step and `cnnserve`
is the entry point `make install` put there (an editable install: this checkout's code, which
clean_env's PYTHONPATH also puts first).

Its cost in the default run is the vgg19 server (loading VGG-19 into ONNX Runtime and the worker's
parity self-test) and the commands themselves, the style transfer mostly (10 iterations at 128 px);
a cold `vgg19_repository` cache first exports VGG-19 (about 1 min, conftest.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from server_process import ROOT, ServerProcess, clean_env, module_server

from service.frontend.server import GRADIENTS_SERVICE

pytestmark = pytest.mark.integration

BLOCK = re.compile(r"<!-- first-ten-minutes -->\n```sh\n(?P<code>.*?)```", re.S)
SEPARATOR = "=== next block ==="
VENV = Path(sys.prefix)


def blocks() -> list[str]:
    found = BLOCK.findall((ROOT / "README.md").read_text())
    assert len(found) == 6, "README's first-ten-minutes blocks changed; update this test"
    return found


@pytest.fixture(scope="module")
def server(
    demo_repository: Path, vgg19_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("first-ten-minutes") / "repository"
    repository.mkdir()
    for model in (demo_repository / "lenet5", demo_repository / "resnet18", vgg19_repository / "vgg19"):
        (repository / model.name).symlink_to(model, target_is_directory=True)
    # One image at a time here: warming VGG-19 up at make serve's largest batch (16) would cost
    # seconds of CPU and change nothing the section shows.
    for process in module_server(repository, "--workers", "1", "--max-batch-size", "1"):
        process.wait_serving(GRADIENTS_SERVICE, timeout=240)  # explain and stylize need the worker
        yield process


def _top(text: str, image: str) -> list[str]:
    """The labels `cnnserve classify` printed for `image`, best first."""
    labels = []
    for line in text.split(f"{image}: ", 1)[1].splitlines()[1:]:
        if match := re.match(r"\s+\d+\. (.+?)\s{2,}", line):
            labels.append(match[1])
        elif not line.startswith("  ("):  # the untrained warning; anything else: the next image
            break
    return labels


def test_the_first_ten_minutes_run_as_written(server: ServerProcess, tmp_path: Path) -> None:
    if not (VENV / "bin" / "activate").is_file():
        pytest.skip(f"{VENV} is not a venv (no bin/activate): run the tests as make test does")
    (tmp_path / ".venv").symlink_to(VENV, target_is_directory=True)
    code = f"\necho '{SEPARATOR}'\n".join(blocks())
    assert code.count("localhost:8000") == 1 and "localhost:8500" not in code
    code = code.replace("localhost:8000", server.http_address)
    env = {**clean_env(), "CNNSERVE_ADDRESS": server.address}
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", code],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    models, images, classify, gradients, curl, score = result.stdout.split(SEPARATOR + "\n")
    assert images == ""

    rows = {line.split()[0]: line for line in models.splitlines()[1:]}
    assert sorted(rows) == ["lenet5", "resnet18", "vgg19"]
    assert "yes (digits)" in rows["lenet5"] and "no (random weights)" in rows["resnet18"]

    # What the prose after the classify block says.
    assert "(untrained demo weights: answers are meaningless)" in classify.split("digit.png: ")[0]
    assert len(_top(classify, "china.jpg")) == 3
    assert _top(classify, "digit.png")[0] == "1" and _top(classify, "drawn.png")[0] == "0"
    assert "untrained" not in classify.split("digit.png: ")[1]

    tour = tmp_path / "tour"
    for name, size in (("saliency.png", (224, 224)), ("styled.png", (128, 85))):
        with Image.open(tour / name) as image:
            assert image.format == "PNG" and image.size == size, name
            image.load()  # the whole file decodes
    assert gradients.count("(untrained demo weights: answers are meaningless)") == 2
    assert "styled.png: 128x85 china.jpg in the style of flower.jpg (vgg19 v1): 10 iterations" in gradients

    answer = json.loads(curl)
    assert answer["model"] == "resnet18" and len(answer["classes"]) == 3 and answer["untrained"] is True

    lines = (tour / "rows.jsonl").read_text().splitlines()
    assert len(lines) == 20 and all(json.loads(line)["error"] == "" for line in lines)
    right = re.fullmatch(r"(\d+) of 20 digits right", score.strip())
    assert right is not None and int(right[1]) >= 17, score  # a trained LeNet-5, not a broken one

    # `cnnserve` was the venv's entry point, running this checkout's code.
    which = subprocess.run(
        ["bash", "-c", "source .venv/bin/activate && command -v cnnserve && "
         "python -c 'import service; print(service.__file__)'"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    assert Path(which[0]).resolve() == (VENV / "bin" / "cnnserve").resolve()
    assert Path(which[1]).resolve() == (ROOT / "service" / "__init__.py").resolve()
