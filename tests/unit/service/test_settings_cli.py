"""`cnnserve`: every Settings field is a flag and an env var (flag > env > default); `classify`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from servicer_fakes import Harness

from service import cli
from service.__main__ import _argv
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CNNSERVE_"):
            monkeypatch.delenv(name)


def serve_settings(argv: list[str]) -> Settings:
    parser = cli.build_parser()
    args = parser.parse_args(["serve", *argv])
    return cli.settings_from_args(args, args.subparser)


def test_the_cli_names_the_settings_environment_prefix() -> None:
    """service.cli keeps its own copy (it must import without pydantic): the same as Settings'."""
    assert cli.ENV_PREFIX == Settings.model_config.get("env_prefix") == "CNNSERVE_"


def test_every_setting_is_a_documented_flag() -> None:
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    flat = " ".join(help_text.split())
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in help_text, flag
        assert f"CNNSERVE_{name.upper()}" in flat, name
        assert " ".join((field.description or "").split())[:40] in flat, name


def test_the_client_commands_address_variable_is_no_server_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """CNNSERVE_ADDRESS (the client commands' default server) shares the prefix: `cnnserve serve`
    in a shell that exports it neither fails on it (extra="forbid") nor reads it."""
    monkeypatch.setenv("CNNSERVE_ADDRESS", "elsewhere:1")
    assert "address" not in Settings.model_fields
    assert serve_settings([]).model_dump() == Settings.model_construct().model_dump()


def test_defaults_env_and_flag_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert serve_settings([]) == Settings()
    monkeypatch.setenv("CNNSERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("CNNSERVE_LOG_FORMAT", "json")
    settings = serve_settings([])
    assert (settings.max_batch_size, settings.log_format) == (8, "json")
    settings = serve_settings(
        ["--max-batch-size", "4", "--repository", "/srv/models", "--max-queue-delay-s", "0.01"]
    )
    assert settings.max_batch_size == 4  # flag beats env
    assert settings.log_format == "json"  # env beats default
    assert settings.repository == Path("/srv/models")
    assert settings.max_queue_delay_s == 0.01


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--grpc-port", "70000"], "--grpc-port"),
        (["--max-queue-delay-s", "soon"], "--max-queue-delay-s"),
    ],
)
def test_invalid_flag_values_are_usage_errors(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        serve_settings(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_frontends_is_a_serve_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_settings(["--frontends", "3"]).frontends == 3
    with pytest.raises(SystemExit) as info:
        cli.main(["worker", "--frontends", "2", "--repository", "nowhere"])
    assert info.value.code == 2
    assert "frontends is a `cnnserve serve` setting" in capsys.readouterr().err


def test_choices_are_checked_by_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        serve_settings(["--device", "tpu"])
    assert "invalid choice" in capsys.readouterr().err


def test_invalid_env_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CNNSERVE_MAX_QUEUE_SIZE", "-3")
    with pytest.raises(SystemExit):
        serve_settings([])
    assert "CNNSERVE_MAX_QUEUE_SIZE" in capsys.readouterr().err


def test_python_m_service_defaults_to_serve() -> None:
    assert _argv([]) == ["serve"]
    assert _argv(["--grpc-port", "0"]) == ["serve", "--grpc-port", "0"]
    assert _argv(["classify", "x.png", "--model", "m"]) == ["classify", "x.png", "--model", "m"]
    assert _argv(["--help"]) == ["--help"]
    assert _argv(["--version"]) == ["--version"]  # cnnserve --version, not serve --version


def test_console_help_runs_in_a_fresh_interpreter() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--max-batch-size" in result.stdout and "CNNSERVE_MAX_BATCH_SIZE" in result.stdout


@pytest.fixture(scope="module")
def server() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def _png(path: Path, value: int) -> Path:
    Image.new("L", (32, 32), value).save(path, "PNG")
    return path


def test_classify_prints_top_k_per_image(
    server: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [_png(tmp_path / "black.png", 0), _png(tmp_path / "white.png", 255)]
    status = cli.main(
        ["classify", *map(str, images), "--model", "lenet5", "--top-k", "3", "--address", server.address]
    )
    out = capsys.readouterr().out
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == f"{images[0]}: lenet5 v2"
    assert lines[1].startswith("  1. digit 0")  # fake engine: black -> class 0, white -> class 2
    assert lines[4] == f"{images[1]}: lenet5 v2"
    assert lines[5].startswith("  1. digit 2")
    assert len(lines) == 8


def test_classify_json_and_per_image_errors(
    server: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _png(tmp_path / "good.png", 0)
    gif = tmp_path / "anim.gif"
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "GIF")
    gif.write_bytes(buf.getvalue())
    missing = tmp_path / "missing.png"
    status = cli.main(
        [
            "classify",
            str(good),
            str(gif),
            str(missing),
            "--model",
            "lenet5",
            "--top-k",
            "1",
            "--json",
            "--address",
            server.address,
        ]
    )
    captured = capsys.readouterr()
    assert status == 1
    records = json.loads(captured.out)
    assert [r["image"] for r in records] == [str(good)]
    assert records[0]["classes"][0]["index"] == 0
    assert f"{gif}: error INVALID_ARGUMENT" in captured.err and "GIF" in captured.err
    assert f"{missing}: error" in captured.err


def test_classify_unknown_model_fails(
    server: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _png(tmp_path / "x.png", 0)
    assert cli.main(["classify", str(image), "--model", "nope", "--address", server.address]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_worker_pool_timeouts_come_from_the_settings() -> None:
    from service.frontend.server import Server

    class NoModels:
        ready = False

        def models(self) -> list[object]:
            return []

    def pool(**settings: object) -> object:
        return Server(Settings(**settings), engine=NoModels())._make_pool()  # type: ignore[arg-type]

    configured = pool(worker_start_timeout_s=42.0, worker_stop_grace_s=3.5)
    assert (configured._start_timeout_s, configured._stop_grace_s) == (42.0, 3.5)  # type: ignore[attr-defined]
    default = pool()
    assert (default._start_timeout_s, default._stop_grace_s) == (300.0, 10.0)  # type: ignore[attr-defined]
    assert pool(grace_period_s=2.0)._stop_grace_s == 2.0  # type: ignore[attr-defined]  # 0: from grace_period_s
    assert serve_settings(["--worker-stop-grace-s", "4"]).worker_stop_grace_s == 4.0
