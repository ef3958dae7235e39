"""`python -m export`: every subcommand's happy path and its one-line refusals of bad input.

Most cases call `export.__main__.main(argv)` in-process (a subprocess costs seconds of imports on two
cores); two run the real `python -m export` to pin the process-level behaviour.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_runs import run_cli, tree

from export.demo import demo
from export.describe import describe_all
from export.models import build
from export.repository import load_metadata, scan

ROOT = Path(__file__).resolve().parents[3]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], code: int, message: str) -> str:
    got, out, err = run_cli(argv, capsys)
    assert got == code, (got, err)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err
    return err


@pytest.mark.parametrize("command", ["onnx", "train"])
def test_unknown_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    argv = [command, "lenet6"] + (["--repository", str(tmp_path / "r")] if command == "onnx" else [])
    _refused(argv, capsys, 2, "unknown architecture 'lenet6'; known: alexnet, alexnet_torchvision, googlenet")
    assert tree(tmp_path) == []


def test_demo_with_an_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["demo", "--repository", str(tmp_path / "r"), "--models", "resnet18,vgg"], capsys, 2, "'vgg'")
    assert tree(tmp_path) == []


def test_argument_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["onnx", "lenet5"], capsys, 2, "the following arguments are required: --repository")
    _refused(
        ["train", "lenet5", "--epochs", "0"], capsys, 2, "argument --epochs: 0 is not a positive integer"
    )
    _refused(["train", "lenet5", "--seed", "x"], capsys, 2, "argument --seed: 'x' is not an integer")
    _refused(
        ["onnx", "lenet5", "--repository", "r", "--version", "-3"], capsys, 2, "-3 is not a positive integer"
    )
    _refused(["frobnicate"], capsys, 2, "invalid choice: 'frobnicate'")
    _refused(
        ["onnx", "lenet5", "--repository", str(tmp_path), "--opset", "16"],
        capsys,
        2,
        "--opset must be between",
    )
    _refused(
        ["onnx", "lenet5", "--repository", str(tmp_path), "--name", "../x"],
        capsys,
        5,
        "'../x' is not allowed",
    )
    _refused(["train", "resnet50"], capsys, 2, "only lenet5 can be trained here")
    _refused(["demo", "--repository", str(tmp_path), "--models", ","], capsys, 2, "--models lists no model")
    assert tree(tmp_path) == []


@pytest.mark.parametrize("kind", ["missing", "corrupt", "code", "wrong-architecture", "wrong-shape"])
def test_bad_checkpoints_are_refused_and_leave_no_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    marker = tmp_path / "PWNED"
    checkpoint = tmp_path / "ckpt.pt"
    if kind == "corrupt":
        torch.save(build("lenet5").state_dict(), checkpoint)
        checkpoint.write_bytes(checkpoint.read_bytes()[:-300])
        message = "is corrupt or not a PyTorch checkpoint"
    elif kind == "code":

        class Payload:
            def __reduce__(self) -> tuple[Any, ...]:
                return (os.system, (f"touch {marker}",))

        torch.save({"features.0.weight": Payload()}, checkpoint)
        message = "was refused: it references posix.system"
    elif kind == "wrong-architecture":
        torch.save(build("alexnet").state_dict(), checkpoint)
        message = (
            "does not fit lenet5: 6 missing (features.3.weight, features.3.bias, features.6.weight, "
            "features.6.bias, classifier.2.weight, ... and 1 more); 12 unexpected (features.4.weight, "
        )
    elif kind == "wrong-shape":
        # (A checkpoint whose classifier head alone differs is a fine-tuned one: test_finetune.)
        torch.save(build("lenet5", in_channels=3).state_dict(), checkpoint)
        message = "1 wrongly shaped (features.0.weight [6, 3, 5, 5] (model [6, 1, 5, 5]))"
    else:
        message = f"checkpoint {checkpoint} does not exist"
    repository = tmp_path / "repo"
    (repository / "lenet5").mkdir(parents=True)
    before = tree(tmp_path)
    argv = ["onnx", "lenet5", "--weights", str(checkpoint), "--repository", str(repository)]
    _refused(argv, capsys, 3, message)
    assert tree(tmp_path) == before
    assert not marker.exists()


def test_unwritable_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    _refused(["onnx", "lenet5", "--repository", str(tmp_path / "file")], capsys, 5, "is not a directory")
    _refused(["onnx", "lenet5", "--repository", str(tmp_path / "file" / "r")], capsys, 5, "is not writable")
    _refused(["demo", "--repository", str(tmp_path / "file")], capsys, 5, "is not a directory")
    _refused(["demo", "--repository", str(tmp_path / "file" / "r")], capsys, 5, "is not writable")
    assert tree(tmp_path) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repository = tmp_path / "ro"
    repository.mkdir(mode=0o555)
    try:
        _refused(["onnx", "lenet5", "--repository", str(repository)], capsys, 5, "Permission denied")
    finally:
        repository.chmod(0o755)
    assert tree(repository) == []


def test_permission_denied_is_reported_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same refusal for root (who writes through permission bits), by failing mkdir itself."""
    repository = tmp_path / "ro"
    repository.mkdir()
    real_mkdir = Path.mkdir

    def denied(self: Path, *args: Any, **kwargs: Any) -> None:
        if repository in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    _refused(["onnx", "lenet5", "--repository", str(repository)], capsys, 5, f"{repository} is not writable")
    assert tree(repository) == []


def test_an_existing_version_is_refused_and_kept(
    model_repository_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p: p.read_bytes() for p in (model_repository_copy / "lenet5" / "1").iterdir()}
    argv = ["onnx", "lenet5", "--repository", str(model_repository_copy), "--version", "1"]
    _refused(argv, capsys, 5, "lenet5 version 1 already exists in")
    assert {p: p.read_bytes() for p in (model_repository_copy / "lenet5" / "1").iterdir()} == before
    assert sorted(p.name for p in (model_repository_copy / "lenet5").iterdir()) == ["1"]


def test_train_then_export_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "out" / "lenet5.pt"
    code, out, err = run_cli(
        ["train", "lenet5", "--epochs", "2", "--seed", "1", "--out", str(checkpoint)], capsys
    )
    assert code == 0, err
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert f"wrote {checkpoint} sha256 {digest}" in out and "held-out accuracy" in out
    assert (tmp_path / "out" / "lenet5.pt.sha256").read_text() == f"{digest}  lenet5.pt\n"
    assert [line.split()[1] for line in err.splitlines()] == ["1/2", "2/2"]  # one line per epoch

    repository = tmp_path / "repo"
    argv = ["onnx", "lenet5", "--weights", str(checkpoint), "--repository", str(repository), "--fp16"]
    code, out, err = run_cli([*argv, "--name", "digits16"], capsys)
    assert code == 0, err
    assert out.startswith(f"digits16 v1 -> {repository / 'digits16' / '1'}") and "held-out accuracy" in out
    meta = load_metadata(repository / "digits16" / "1")
    assert meta["source_checkpoint_sha256"] == digest and meta["trained_on"] == "digits"
    assert meta["fp16"] is True and meta["input"]["dtype"] == "float16" and meta["architecture"] == "lenet5"
    code, _, err = run_cli([*argv, "--name", "digits16", "--trained-on", "my-digits"], capsys)
    assert code == 0, err
    assert load_metadata(repository / "digits16" / "2")["trained_on"] == "my-digits"
    _refused(
        ["onnx", "lenet5", "--repository", str(repository), "--trained-on", "x"], capsys, 2, "--trained-on"
    )


def test_train_refuses_a_directory_as_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["train", "lenet5", "--out", str(tmp_path)], capsys, 2, "is a directory")


def test_describe_prints_the_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["describe", "--json", str(tmp_path / "rows.json")], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows == json.loads(json.dumps(describe_all()))
    assert [row["name"] for row in rows][:2] == ["lenet5", "alexnet"]
    for row in rows:
        assert row["name"] in out
    _refused(["describe", "--json", str(tmp_path / "missing" / "rows.json")], capsys, 1, "cannot write")


def test_demo_is_idempotent_and_replaces_only_a_corrupt_model(
    model_repository_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = model_repository_copy
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    code, out, err = run_cli(["demo", "--repository", str(root), "--models", "lenet5,resnet18"], capsys)
    assert code == 0, err
    assert [line.split()[:3] for line in out.splitlines()] == [
        ["lenet5", "v1", "up"],
        ["resnet18", "v1", "up"],
    ]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps

    weights = root / "resnet18" / "1" / "weights.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    outcomes = demo(root, ["lenet5", "resnet18"], out=None, progress=sys.stderr)
    assert [(o.name, o.version, o.exported) for o in outcomes] == [
        ("lenet5", 1, False),
        ("resnet18", 2, True),
    ]
    assert "warning: resnet18 v1 fails verification" in capsys.readouterr().err
    assert [v.key for v in scan(root)] == [("lenet5", 1), ("resnet18", 1), ("resnet18", 2)]
    # the new version is the same seeded export as the original one
    assert load_metadata(root / "resnet18" / "2")["files"] == load_metadata(root / "resnet18" / "1")["files"]


def test_demo_brings_a_version_from_before_embeddings_up_to_date(
    model_repository_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = model_repository_copy
    meta_path = root / "lenet5" / "1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["features"], meta["layers"]  # as exported before issue 14 (the model.onnx is kept)
    meta_path.write_text(json.dumps(meta))
    outcomes = demo(root, ["lenet5", "resnet18"], out=None, progress=sys.stderr)
    assert [(o.name, o.version, o.exported) for o in outcomes] == [
        ("lenet5", 2, True),
        ("resnet18", 1, False),
    ]
    assert "lenet5 v1 was exported before embeddings" in capsys.readouterr().err
    new = load_metadata(root / "lenet5" / "2")
    assert new["features"]["shape"] == [84] and new["trained"] is True
    assert load_metadata(root / "lenet5" / "1") == meta  # the old version is left as it was


def test_demo_exports_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["demo", "--repository", str(tmp_path / "r"), "--models", "googlenet"], capsys)
    assert code == 0, err
    (line,) = out.splitlines()
    fields = line.split()
    assert fields[:3] == ["googlenet", "v1", "exported"] and fields[5] == "MB" and "parity rel" in line
    (version,) = scan(tmp_path / "r")
    assert version.name == "googlenet" and not version.trained
    assert float(fields[3].rstrip("s")) > 0 and version.metadata["verification"]["top1_equal"] is True


def test_the_real_command_line(tmp_path: Path) -> None:
    """As a user runs it: the process exits with the status, stderr holds only the error line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = tmp_path / "missing.pt"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "onnx",
            "lenet5",
            "--weights",
            str(missing),
            "--repository",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 3
    assert result.stderr == f"error: checkpoint {missing} does not exist\n" and result.stdout == ""
    assert tree(tmp_path) == []
