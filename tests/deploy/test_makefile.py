"""The Makefile's demo and serve targets, run by the real `make` with stand-ins for the venv's
`python` and `cnnserve` that log their command lines (the real ones would train, export and serve
for minutes): what gets built, what gets served, and when the demo marker is written."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from deploy_helpers import ROOT, require_tool

MARKER = ".demo-complete"
PORTS = "--grpc-port 8500 --metrics-port 9090 --http-port 8000"  # the Makefile's defaults
Make = Callable[..., list[str]]


@pytest.fixture
def make(tmp_path: Path) -> Make:
    """make(target, **variables) -> the commands the stand-ins received, one line each."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()  # the install stamp: no venv is created
    log = tmp_path / "commands"
    for tool in ("python", "cnnserve"):
        stand_in = venv / "bin" / tool
        # `export demo` creates the repository directory; so does the stand-in.
        stand_in.write_text(
            f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n'
            'while [ $# -gt 1 ]; do [ "$1" = --repository ] && mkdir -p "$2"; shift; done\n'
        )
        stand_in.chmod(0o755)
    executable = require_tool("make", "runs the Makefile's targets")

    def run(target: str, **variables: str) -> list[str]:
        log.write_text("")
        overrides = [f"{k}={v}" for k, v in {"VENV": str(venv), **variables}.items()]
        result = subprocess.run(
            [executable, "--no-print-directory", "-C", str(ROOT), target, *overrides],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return log.read_text().splitlines()

    return run


def publish(repository: Path, name: str) -> None:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "1" / "metadata.json").write_text("{}")


def test_serve_models_builds_and_loads_only_the_selected_models(make: Make, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    selection = "lenet5,resnet50:1+2,lenet5:all"
    assert make("serve", REPOSITORY=str(repository), MODELS=selection) == [
        f"python -m export demo --repository {repository} --models lenet5,resnet50",
        f"cnnserve serve --repository {repository} --models {selection} {PORTS}",
    ]
    assert not (repository / MARKER).exists(), "two models are not the demo set"
    # Already there (or a model of your own): nothing is built, nothing is re-verified.
    publish(repository, "lenet5")
    publish(repository, "mine")
    assert make("serve", REPOSITORY=str(repository), MODELS="mine, lenet5") == [
        f"cnnserve serve --repository {repository} --models mine, lenet5 {PORTS}"
    ]
    publish(repository, "resnet50")
    assert make("serve", REPOSITORY=str(repository), MODELS="resnet50,vgg19") == [
        f"python -m export demo --repository {repository} --models vgg19",
        f"cnnserve serve --repository {repository} --models resnet50,vgg19 {PORTS}",
    ]


def test_serve_without_models_builds_the_demo_set_once(make: Make, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    serve = f"cnnserve serve --repository {repository} {PORTS}"
    assert make("serve", REPOSITORY=str(repository)) == [
        f"python -m export demo --repository {repository}",
        serve,
    ]
    assert (repository / MARKER).exists()
    assert make("serve", REPOSITORY=str(repository)) == [serve]


def test_demo_models_builds_those_and_writes_no_marker(make: Make, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    repository.mkdir()
    assert make("demo", REPOSITORY=str(repository), MODELS="vgg19,lenet5:2") == [
        f"python -m export demo --repository {repository} --models lenet5,vgg19"
    ]
    assert not (repository / MARKER).exists()
    assert make("demo", REPOSITORY=str(repository)) == [f"python -m export demo --repository {repository}"]
    assert (repository / MARKER).exists()


def test_make_help_and_readme_document_models() -> None:
    executable = require_tool("make", "runs the Makefile's targets")
    result = subprocess.run(
        [executable, "--no-print-directory", "-C", str(ROOT), "help"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)  # the colours
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "MODELS=" in lines["serve"] and "MODELS=" in lines["demo"], result.stdout
    assert "make serve MODELS=" in (ROOT / "README.md").read_text()
