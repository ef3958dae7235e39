"""The client commands of `cnnserve` (classify, score, models, --version) as a new user meets them:
what they print and the exit status, when things work and when the address is wrong."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from servicer_fakes import FakeEngine, FakeModel, Harness

from service import cli
from service.client.score import scorer

HINT = "is cnnserve serving gRPC at {}? (the metrics port is not the gRPC port)"


@pytest.fixture(scope="module")
def server() -> Iterator[Harness]:
    h = Harness(
        FakeEngine(
            [
                FakeModel("lenet5", 1),
                FakeModel("lenet5", 2),
                FakeModel("resnet18", 1, architecture="resnet18", trained=False, trained_on=None),
            ]
        )
    )
    yield h
    h.close()


def _png(path: Path) -> Path:
    Image.new("L", (32, 32), 0).save(path, "PNG")
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("cnnserve 0.")


def test_classify_points_a_directory_to_score(
    server: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _png(tmp_path / "x.png")
    folder = tmp_path / "folder"
    folder.mkdir()
    status = cli.main(["classify", str(folder), str(image), "--model", "lenet5", "--address", server.address])
    captured = capsys.readouterr()
    assert status == 1
    assert f"{folder}: error: a directory; use `cnnserve score` for folders" in captured.err
    assert f"{image}: lenet5 v2" in captured.out  # the other images are still classified


@pytest.mark.parametrize("where", ["closed port", "metrics port"])
def test_classify_score_and_models_name_the_address_and_agree_on_exit_status_2(
    server: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, where: str,
) -> None:  # fmt: skip
    monkeypatch.setattr(scorer, "BACKOFF_INITIAL_S", 0.01)
    address = "127.0.0.1:1" if where == "closed port" else f"127.0.0.1:{server.server.metrics_port}"
    image = str(_png(tmp_path / "x.png"))
    commands = {
        "classify": ["classify", image, "--model", "lenet5"],
        "score": ["score", image, "--model", "lenet5", "--quiet", "--max-attempts", "2"],
        "models": ["models"],
    }
    for name, argv in commands.items():
        assert cli.main([*argv, "--address", address]) == 2, name
        err = capsys.readouterr().err
        assert f"cnnserve {name}: " in err and "UNAVAILABLE" in err, name
        assert HINT.format(address) in err, name


def test_a_call_failed_by_the_server_itself_gets_no_connection_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server still loading answers UNAVAILABLE too, but it is a cnnserve server: no hint."""
    loading = Harness(load=False)
    try:
        image = str(_png(tmp_path / "x.png"))
        assert cli.main(["classify", image, "--model", "lenet5", "--address", loading.address]) == 2
    finally:
        loading.close()
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "loading" in err and "is cnnserve serving" not in err


def test_models_prints_a_table_of_every_version(server: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--address", server.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "MODEL",
        "VERSION",
        "ARCHITECTURE",
        "TRAINED",
        "CAPABILITIES",
        "PROVIDER",
        "READY",
    ]
    assert [line.split()[:2] for line in lines[1:]] == [["lenet5", "1"], ["lenet5", "2"], ["resnet18", "1"]]
    assert "2 (latest)" in lines[2] and "yes (digits)" in lines[2] and "CPUExecutionProvider" in lines[2]
    assert "no (random weights)" in lines[3] and "classify" in lines[3]
    # Columns line up: every cell starts where its header does.
    start = lines[0].index("TRAINED")
    assert all(line[start:].startswith(("yes", "no")) for line in lines[1:])


def test_models_json(server: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--json", "--address", server.address]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["version"], r["versions"]) for r in records] == [
        ("lenet5", 1, [1, 2]),
        ("lenet5", 2, [1, 2]),
        ("resnet18", 1, [1]),
    ]
    lenet = records[1]
    assert lenet["trained"] is True and lenet["trained_on"] == "digits" and lenet["ready"] is True
    assert lenet["capabilities"] == ["classify"]  # no gradient workers in this server
    assert lenet["execution_provider"] == "CPUExecutionProvider" and lenet["input_shape"] == [1, 32, 32]
    assert records[2]["trained"] is False


# Each client command with its other required arguments: what --address's default applies to.
CLIENT_COMMANDS = {
    "classify": ["classify", "x.png", "--model", "m"],
    "score": ["score", "x", "--model", "m"],
    "models": ["models"],
    "explain": ["explain", "x.png", "--model", "m", "-o", "out.png"],
    "dream": ["dream", "x.png", "--model", "m", "-o", "out.png"],
    "stylize": ["stylize", "x.png", "y.png", "-o", "out.png"],
}


def test_every_client_command_defaults_to_cnnserve_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """CNNSERVE_ADDRESS names the server once for every client command (a shell, a Job's env);
    unset or empty: localhost:8500, `make serve`'s; --address wins over it. The help says which."""
    monkeypatch.delenv("CNNSERVE_ADDRESS", raising=False)
    for name, argv in CLIENT_COMMANDS.items():
        assert cli.build_parser().parse_args(argv).address == "localhost:8500", name
    monkeypatch.setenv("CNNSERVE_ADDRESS", "")
    assert cli.build_parser().parse_args(["models"]).address == "localhost:8500"
    monkeypatch.setenv("CNNSERVE_ADDRESS", "scorer.example:9500")
    parser = cli.build_parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, argv in CLIENT_COMMANDS.items():
        assert parser.parse_args(argv).address == "scorer.example:9500", name
        assert parser.parse_args([*argv, "--address", "h:1"]).address == "h:1", name
        help_text = " ".join(choices[name].format_help().split())
        assert "(default scorer.example:9500, from $CNNSERVE_ADDRESS)" in help_text, name


def test_cnnserve_address_reaches_the_server(
    server: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNNSERVE_ADDRESS", server.address)
    image = str(_png(tmp_path / "x.png"))
    assert cli.main(["models"]) == 0
    assert cli.main(["classify", image, "--model", "lenet5"]) == 0
    assert cli.main(["score", image, "--model", "lenet5", "--quiet", "-o", str(tmp_path / "rows.jsonl")]) == 0
    assert f"{image}: lenet5 v2" in capsys.readouterr().out
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 1


def test_the_model_flag_points_at_cnnserve_models() -> None:
    parser = cli.build_parser()
    for command in ("classify", "score"):
        subparser = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
        assert "see `cnnserve models`" in " ".join(subparser.format_help().split())


def test_untrained_weights_are_said_where_the_answers_are_read(
    server: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15's honest output: the server marks answers of untrained versions; classify (text and
    JSON) and score (JSONL rows, the summary) say so; trained answers carry no such word."""
    image = str(_png(tmp_path / "x.png"))
    warning = "untrained demo weights: answers are meaningless"
    assert cli.main(["classify", image, "--model", "resnet18", "--address", server.address]) == 0
    assert f"({warning})" in capsys.readouterr().out
    assert cli.main(["classify", image, "--model", "lenet5", "--address", server.address]) == 0
    assert warning not in capsys.readouterr().out
    assert cli.main(["classify", image, "--model", "resnet18", "--json", "--address", server.address]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["untrained"] is True and record["warning"] == warning

    out = tmp_path / "rows.jsonl"
    argv = ["score", image, "--model", "resnet18", "--address", server.address, "--quiet", "-o", str(out)]
    assert cli.main(argv) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["warning"] == warning and row["error"] == ""
    assert f"warning: resnet18 v1 has {warning}" in capsys.readouterr().err
    trained = tmp_path / "trained.jsonl"
    argv = ["score", image, "--model", "lenet5", "--address", server.address, "--quiet", "-o", str(trained)]
    assert cli.main(argv) == 0
    assert "warning" not in json.loads(trained.read_text()) and warning not in capsys.readouterr().err


def test_csv_rows_carry_the_warning_and_an_older_csv_keeps_its_columns(
    server: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [str(_png(tmp_path / f"{i}.png")) for i in range(2)]
    warning = "untrained demo weights: answers are meaningless"
    out = tmp_path / "rows.csv"
    argv = ["score", images[0], "--model", "resnet18", "--address", server.address, "--quiet", "-o", str(out)]
    assert cli.main(argv) == 0
    header, row = out.read_text().splitlines()
    assert header == "path,model,version,index,label,probability,classes,error,warning"
    assert row.endswith(f",{warning}")
    # A CSV written before the warning column: resumed in its own layout, the header unchanged.
    old = tmp_path / "old.csv"
    old_header = "path,model,version,index,label,probability,classes,error"
    old.write_text(f"{old_header}\n{images[0]},resnet18,1,0,digit 0,0.5,,\n")
    argv = ["score", *images, "--model", "resnet18", "--address", server.address, "--quiet", "-o", str(old)]
    assert cli.main(argv) == 0
    lines = old.read_text().splitlines()
    assert lines[0] == old_header and len(lines) == 3
    assert all(len(next(csv.reader([line]))) == 8 for line in lines)
    capsys.readouterr()
