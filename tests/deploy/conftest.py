"""Fixtures for tests/deploy (helpers live in deploy_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import Metric, exposition_names, kustomize

_RENDERED: dict[Path, list[dict[str, Any]]] = {}


@pytest.fixture(scope="session")
def render() -> Callable[[Path], list[dict[str, Any]]]:
    """render(dir) -> the objects `kubectl kustomize dir` outputs (cached for the session)."""

    def _render(directory: Path) -> list[dict[str, Any]]:
        if directory not in _RENDERED:
            _RENDERED[directory] = kustomize(directory)
        return _RENDERED[directory]

    return _render


@pytest.fixture(scope="session")
def metric_catalog() -> dict[str, Metric]:
    catalog = exposition_names()
    # The parser must really see the module's metrics, or every "exists" check is vacuous.
    assert "cnnserve_requests_total" in catalog and "cnnserve_request_duration_seconds_bucket" in catalog
    return catalog
