"""Rules between settings, checked where the settings are built: a default must never break them, and
a value that breaks one is refused at start with a message naming both settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service import cli
from service.settings import Settings


def test_the_connection_age_grace_lets_the_longest_gradient_job_finish_by_default() -> None:
    defaults = Settings()
    assert defaults.connection_age_grace_s >= defaults.max_task_duration_s
    longer_jobs = Settings(max_task_duration_s=900)
    assert longer_jobs.connection_age_grace_s == 900  # unset: follows the job cap
    assert Settings(max_connection_age_grace_s=1200).connection_age_grace_s == 1200
    assert Settings(max_connection_age_grace_s=0, workers=0).connection_age_grace_s == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_connection_age_grace_s": 30},  # the old default against the default 300 s job cap
        {"max_connection_age_grace_s": 300, "max_task_duration_s": 600},
        {"max_connection_age_grace_s": 10, "workers": 0, "worker_address": "workers:8600"},
    ],
)
def test_a_grace_shorter_than_a_gradient_job_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="max_connection_age_grace_s=.* is below max_task_duration_s="):
        Settings(**kwargs)  # type: ignore[arg-type]


def test_without_gradient_rpcs_any_grace_is_allowed() -> None:
    assert Settings(max_connection_age_grace_s=5, workers=0).connection_age_grace_s == 5


def test_the_cli_names_both_settings(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--max-connection-age-grace-s", "30"])
    with pytest.raises(SystemExit) as info:
        cli.settings_from_args(args, parser)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "max_connection_age_grace_s=30 is below max_task_duration_s=300" in err
    assert "Value error" not in err


def test_warmup_batch_sizes() -> None:
    assert Settings().warmup_sizes(4) == [1, 4]  # auto
    assert Settings().warmup_sizes(4, fixed_shape=True) == [4]  # auto, CUDA at one fixed shape
    assert Settings(warmup_batch_sizes="all").warmup_sizes(4) == [1, 2, 3, 4]
    assert Settings(warmup_batch_sizes="none").warmup_sizes(16) == []
    listed = Settings(warmup_batch_sizes=" 16, 1,8,8 ")
    assert listed.warmup_batch_sizes == "1,8,16"
    assert listed.warmup_sizes(16) == [1, 8, 16] and listed.warmup_sizes(10) == [1, 8]
    for bad in ("some", "0,4", "1;2", "300"):
        with pytest.raises(ValidationError, match="warmup_batch_sizes"):
            Settings(warmup_batch_sizes=bad)
