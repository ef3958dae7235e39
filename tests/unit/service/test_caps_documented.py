"""Every request cap is documented where an operator looks: `cnnserve serve --help` says what a
request over it gets, and the README's "Request caps" table lists its setting, environment variable
and default. (That a request over each cap really gets INVALID_ARGUMENT naming it is tested on a real
server in tests/integration/test_security.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service import cli
from service.settings import Settings

README = Path(__file__).resolve().parents[3] / "README.md"
# The caps a request can exceed and is answered INVALID_ARGUMENT for.
INVALID_ARGUMENT_CAPS = [
    "max_deadline_s",
    "max_image_pixels",
    "max_images_per_request",
    "max_top_k",
    "max_task_iterations",
    "max_task_batch",
    "max_task_image_side",
    "max_task_cost",
]
# Refused by gRPC itself or by admission control: RESOURCE_EXHAUSTED.
RESOURCE_CAPS = ["max_message_bytes", "max_queue_size", "max_concurrent_rpcs"]
DEADLINE_CAPS = ["max_task_duration_s"]  # a job running into it is stopped: DEADLINE_EXCEEDED


def _answer(cap: str) -> str:
    if cap in INVALID_ARGUMENT_CAPS:
        return "INVALID_ARGUMENT"
    return "RESOURCE_EXHAUSTED" if cap in RESOURCE_CAPS else "DEADLINE_EXCEEDED"


def _serve_help() -> str:
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    return " ".join(serve.format_help().split())


def _help_of(flag: str, text: str) -> str:
    """The help text of one flag: from its name to the next flag's entry."""
    match = re.search(rf"{re.escape(flag)} (?:N|X|SECONDS|VALUE) (.*?)\[env ", text)
    assert match, flag
    return match.group(1)


def _readme_rows() -> dict[str, list[str]]:
    section = README.read_text().split("### Request caps", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("max_"):
            rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("cap", INVALID_ARGUMENT_CAPS + RESOURCE_CAPS + DEADLINE_CAPS)
def test_help_says_what_a_request_over_the_cap_gets(cap: str) -> None:
    text = _serve_help()
    expected = _answer(cap)
    assert expected in _help_of("--" + cap.replace("_", "-"), text)


@pytest.mark.parametrize("cap", INVALID_ARGUMENT_CAPS + RESOURCE_CAPS + DEADLINE_CAPS)
def test_readme_table_lists_setting_env_var_default_and_answer(cap: str) -> None:
    rows = _readme_rows()
    assert cap in rows, f"README's Request caps table has no row for {cap}"
    _, env, default, answer = rows[cap]
    assert env == f"CNNSERVE_{cap.upper()}"
    value = Settings.model_fields[cap].default
    shown = default.replace(",", "").replace(" MiB", "")
    if cap == "max_message_bytes":
        assert int(shown) * 1024 * 1024 == value
    else:
        assert float(shown) == float(value), (cap, default, value)
    expected = _answer(cap)
    assert expected in answer
