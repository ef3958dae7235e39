"""Helpers of the `python -m export` command-line tests: run it in-process, list what it wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.__main__ import main


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m export ARGV`, argparse's exits included."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def tree(root: Path) -> list[str]:
    """Every path under `root`, relative and sorted ([] when it does not exist): what a refused
    command must leave unchanged."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
