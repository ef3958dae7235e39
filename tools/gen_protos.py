"""Regenerate the committed gRPC stubs in service/_proto/ from protos/.

    python tools/gen_protos.py            # write service/_proto/
    python tools/gen_protos.py --out DIR  # write DIR/service/_proto/ instead (the staleness test)

protoc runs with `-Iprotos`, so each file's descriptor is named by its path under protos/
(`cnnserve/v1/inference.proto`, `inference/grpc_predict_v2.proto`): the names server reflection
reports and grpcurl, Postman and `import` lines in clients' own .proto files expect. protoc then
writes imports of the other generated modules as `from cnnserve.v1 import inference_pb2`, which
would need protos/ on sys.path; `rewrite_imports` turns exactly those lines (and the module name
the generated classes report) into `service._proto.cnnserve.v1`, and leaves every other import
(`grpc`, `google.protobuf`) alone. Nothing else in the generated code changes.

The generator is pinned: grpcio-tools 1.65.5, whose protoc is 26.1 (protobuf Python 5.26.1). Why
that one: a client installs cnnserve beside other packages that pin protobuf (tritonclient 2.73 wants
protobuf < 7, others are still on 5.x), so the stubs must load on every protobuf from 5.26 to 7.x.
protoc stamps its Python gencode since 27 (protobuf 5.27): the stub calls
`runtime_version.ValidateProtobufRuntimeVersion(major, minor, patch)` at import, which raises on a
runtime older than the generator or more than one major newer, and warns one major newer. So no
stamped gencode loads, without an error or a warning, on 5.x, 6.x and 7.x alike. protoc 26.1 is the
last protoc that writes unstamped gencode, and its form is the one the current runtimes still build
(a serialized FileDescriptorProto given to `descriptor_pool.AddSerializedFile`, classes made by
`internal.builder`, `_loaded_options`; the same as protoc 35 writes, less the stamp). The runtime has
no version to check in it: the stubs load, warning-free, on 5.26.1 (the generator's own runtime) and
on every later one that still builds that form. That is tested, not assumed:
tests/unit/service/test_protos_fresh.py checks the stubs stay unstamped, and
tests/integration/test_light_client.py runs the client on the lowest and the highest protobuf (and
on 6.x beside tritonclient). A protobuf 8 that stops building this form would fail there first; the
`<8` cap in pyproject waits for that check. 1.65.5 is the last grpcio-tools with protoc 26.1; its gRPC
plugin stamps the *_pb2_grpc.py stubs GRPC_GENERATED_VERSION = '1.65.5' (they warn on an older
grpcio). pyproject's floors are these two stamps, grpcio>=1.65.5 and protobuf>=5.26.1, and a test
keeps them equal.

grpcio-tools 1.65.5 cannot share the project's environment (it requires protobuf < 6; the server runs
7.x), and need not: protoc is a compiled extension that imports no protobuf runtime. The generator is
installed alone, `pip install --no-deps --target`, into a cache folder ($XDG_CACHE_HOME/cnnserve, by
default ~/.cache/cnnserve), once, and run as `python -m grpc_tools.protoc` with that folder first on
the path. Nothing in the project imports grpc_tools: it is a regeneration tool, in no extra.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "service/_proto"
PACKAGE_MODULE = PACKAGE.replace("/", ".")
# The generator, pinned (see the module docstring): its two stamps are pyproject's floors.
GENERATOR = "grpcio-tools"
GENERATOR_VERSION = "1.65.5"
PROTOBUF_GENCODE_VERSION = "5.26.1"  # the protobuf Python version protoc 26.1 writes into the stubs


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def module_name(proto: str) -> str:
    """`cnnserve/v1/inference.proto` -> `cnnserve.v1.inference_pb2`, as protoc names its module."""
    return proto.removesuffix(".proto").replace("/", ".") + "_pb2"


def rewrite_imports(text: str, modules: Iterable[str]) -> str:
    """Generated code with each import of one of `modules` (protoc's names for the modules it
    generates, e.g. `cnnserve.v1.inference_pb2`) moved under service._proto.

    Rewrites the three forms protoc writes: `from a.b import c_pb2 as x` (*_pb2.py, *_pb2_grpc.py,
    *.pyi), `import c_pb2 as x` (a .proto at the top of protos/) and the module name passed to
    `_builder.BuildTopDescriptorsAndMessages` (the generated classes' __module__). A line naming any
    other module (`import grpc`, `from google.protobuf import ...`) is left as it is.
    """
    ours = set(modules)

    def from_import(match: re.Match[str]) -> str:
        package, name = match.group("package"), match.group("name")
        if f"{package}.{name}" not in ours:
            return match.group(0)
        return f"from {PACKAGE_MODULE}.{package} import {name}{match.group('rest')}"

    def plain_import(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in ours:
            return match.group(0)
        return f"from {PACKAGE_MODULE} import {name}{match.group('rest')}"

    def builder(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in ours:
            return match.group(0)
        return f"{match.group('head')}'{PACKAGE_MODULE}.{name}'"

    text = re.sub(
        r"^from (?P<package>[\w.]+) import (?P<name>\w+)(?P<rest>(?: as \w+)?)$",
        from_import,
        text,
        flags=re.M,
    )
    text = re.sub(r"^import (?P<name>\w+)(?P<rest>(?: as \w+)?)$", plain_import, text, flags=re.M)
    return re.sub(
        r"(?P<head>_builder\.BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'(?P<name>[\w.]+)'", builder, text
    )


def generator_cache() -> Path:
    """Where the pinned generator is installed: $XDG_CACHE_HOME/cnnserve or ~/.cache/cnnserve, one
    folder per generator version, interpreter and platform (protoc is a compiled extension)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnserve"
    tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
    return base / f"{GENERATOR}-{GENERATOR_VERSION}-{tag}"


def ensure_generator() -> Path:
    """The folder holding the pinned grpc_tools, installed there first if missing (pip, no deps)."""
    target = generator_cache()
    if (target / "grpc_tools" / "protoc.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Installed beside, then renamed: an interrupted install never passes for a complete one.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        subprocess.run(
            [
                sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                "--no-deps", "--only-binary=:all:", "--target", str(staging),
                f"{GENERATOR}=={GENERATOR_VERSION}",
            ],
            check=True,
        )  # fmt: skip
        try:
            staging.rename(target)
        except OSError:  # another run got there first
            if not (target / "grpc_tools" / "protoc.py").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def generate(out_root: Path) -> list[Path]:
    """Generate *_pb2.py, *_pb2.pyi and *_pb2_grpc.py under out_root/service/_proto/ with the pinned
    generator (installed first when missing).

    Returns the generated files. Raises RuntimeError when protoc fails.
    """
    generator = ensure_generator()
    package_dir = out_root / PACKAGE
    package_dir.mkdir(parents=True, exist_ok=True)
    well_known = generator / "grpc_tools" / "_proto"
    sources = [p.relative_to(PROTO_ROOT).as_posix() for p in proto_files()]
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={package_dir}",
        f"--pyi_out={package_dir}",
        f"--grpc_python_out={package_dir}",
        *sources,
    ]
    # The pinned grpc_tools first on the path, ahead of any other installed in this environment.
    path = os.pathsep.join(filter(None, [str(generator), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}\n{result.stderr}")
    modules = {module_name(source) for source in sources}
    for source in sources:
        stem = package_dir / source.removesuffix(".proto")
        for generated in (Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2.pyi"), Path(f"{stem}_pb2_grpc.py")):
            text = generated.read_text()
            rewritten = rewrite_imports(text, modules)
            if rewritten != text:
                generated.write_text(rewritten)
    # Package markers, so `service._proto.cnnserve.v1` imports as regular packages.
    for directory in [package_dir, *(d for d in package_dir.rglob("*") if d.is_dir())]:
        if directory.name == "__pycache__":
            continue
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated by tools/gen_protos.py; do not edit."""\n')
    return sorted(p for p in package_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT, help="root to generate into (default: the repo)")
    args = parser.parse_args(argv)
    files = generate(args.out)
    for f in files:
        print(f.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
