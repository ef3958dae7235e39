"""`python -m bench` (`make bench`): serving and gradient benchmarks against same-run baselines.

python -m bench                      # everything, ~30 minutes on 2 cores (gradients at 256+512 px)
python -m bench --quick              # 4 s windows instead of 12
python -m bench --parts resnet,lenet # a subset: resnet, lenet, proxy, style, gradients, startup
python -m bench --no-write           # print the table, leave BENCHMARKS.md alone
python -m bench --parts startup      # start-up time and memory (issue 13; bench/startup.py)

BENCHMARKS.md's generated sections are written by a run of every default part; a run of some parts
only prints its table (its rows would replace the full table), unless --out names a file.

`startup` is not in the default run: it builds a third repository with every demo model (2.5 min
and 2.6 GB of memory for VGG-19's export, once) and its three server starts took 5.4 min on 2 busy
cores, more than the ~3 minutes `make bench` should grow by. Name it with --parts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPOSITORY = ROOT / "artifacts" / "bench_repository"
PARTS = ("resnet", "lenet", "proxy", "style", "gradients")  # the default run
EXTRA_PARTS = ("startup",)  # only when named with --parts (see the docstring: why)
LISTENING = re.compile(r"listening grpc=(?P<grpc>\S+) metrics=(?P<metrics>\S+) http=(?P<http>\S+)")

# Targets (ratios are served / raw unless noted).
LATENCY_OVERHEAD_TARGET_S = 0.003  # served c=1 p50 <= raw batch-1 p50 + 3 ms
THROUGHPUT_TARGET = 0.95  # served c=16 images/s >= 0.95 x raw best batch images/s
EMBED_CONCURRENCY = 16  # Embed is measured right after Classify at this concurrency (issue 14)
EMBED_COST_TARGET = 1.05  # Embed's time per image <= 1.05 x Classify's
REST_RATE_TARGET = 0.95  # REST's image route at c=16 >= 0.95 x gRPC Classify's throughput (issue 15)
ECHO_TARGET = 0.7  # lenet Classify req/s >= 0.7 x bare echo server req/s


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Row:
    section: str
    metric: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    ok: bool | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> None:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        log(f"{row.section} | {row.metric}: {row.value} {row.baseline} {row.ratio} {row.target}")

    def table(self) -> str:
        lines = [
            "| part | metric | value | baseline (same run) | ratio | target | ok |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            ok = "" if r.ok is None else ("yes" if r.ok else "**no**")
            cells = (r.section, r.metric, r.value, r.baseline, r.ratio, r.target, ok)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


# --- machine and environment ----------------------------------------------------------------------


def machine_lines() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for mod in ("torch", "onnxruntime", "grpc", "numpy"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001
            versions.append(f"{mod} missing")
    load = os.getloadavg()
    return [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- uname: `{' '.join(platform.uname())}`",
        f"- nproc: {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable); CPU: {cpu}",
        f"- python {platform.python_version()}; {'; '.join(versions)}",
        f"- load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    ]


def other_cpu_users(exclude: set[int]) -> list[str]:
    """Processes (not ours) that used noticeable CPU over one second: the noise we shared with."""

    def ticks() -> dict[int, tuple[int, str]]:
        out = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                comm = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(cmd.split()[:5]))
                comm = comm or stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                out[int(d.name)] = (int(fields[11]) + int(fields[12]), comm)
            except (OSError, ValueError, IndexError):
                continue
        return out

    before = ticks()
    time.sleep(1.0)
    after = ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (t, comm) in after.items():
        if pid in exclude or pid not in before:
            continue
        cpu = (t - before[pid][0]) / hz
        if cpu >= 0.1:
            busy.append(f"`{comm[:70]}` {cpu:.0%}")
    return busy


@dataclass
class CpuSplit:
    """Cores used over a window: by the process's `top` busiest threads, its other threads, the
    rest of the machine, and idle."""

    top: float
    rest_of_process: float
    rest_of_machine: float
    idle: float


class CpuWindow:
    """Per-thread CPU of one process (and the machine's) between construction and `split()`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._start = time.monotonic()
        self._threads = self._thread_ticks()
        self._machine = self._machine_ticks()

    def _thread_ticks(self) -> dict[str, int]:
        out = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue  # the thread ended
            fields = stat[stat.rindex(")") + 2 :].split()
            out[task.name] = int(fields[11]) + int(fields[12])
        return out

    @staticmethod
    def _machine_ticks() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    def split(self, top: int) -> CpuSplit:
        hz = os.sysconf("SC_CLK_TCK")
        seconds = time.monotonic() - self._start
        now = self._thread_ticks()
        used = sorted((t - self._threads.get(k, 0) for k, t in now.items()), reverse=True)
        total, idle = self._machine_ticks()
        span = total - self._machine[0]
        cores = os.cpu_count() or 1
        idle_cores = (idle - self._machine[1]) / span * cores if span else 0.0
        process = sum(used) / hz / seconds
        top_cores = sum(used[:top]) / hz / seconds
        return CpuSplit(top_cores, process - top_cores, max(0.0, cores - idle_cores - process), idle_cores)


# --- repository and inputs --------------------------------------------------------------------------


def build_repository(root: Path) -> dict[str, Path]:
    from export.demo import demo
    from export.repository import latest, scan

    log(f"model repository {root} (lenet5 trained, resnet50 random; reused when verified)")
    demo(root, ["lenet5", "resnet50"], out=sys.stderr, progress=None)
    versions = scan(root)
    paths = {}
    for name in ("lenet5", "resnet50"):
        v = latest(versions, name)
        assert v is not None, name
        paths[name] = v.onnx_path
    return paths


def jpeg_224() -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:224, 0:224] / 224
    img = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * x * y)], axis=2) + 0.08 * rng.standard_normal((224, 224, 3))
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def digit_png() -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(img).ellipse((8, 4, 24, 28), outline=255, width=3)  # a zero
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- subprocesses -------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Child:
    """A subprocess whose output lines are collected; `wait_for` a regex in them."""

    def __init__(self, args: list[str]) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := rx.search(line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    tail = "\n".join(self.lines[-30:])
                    raise RuntimeError(f"{pattern!r} not seen (exit {self.process.poll()}):\n{tail}")
                self._cond.wait(min(left, 0.5))

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def serve_args(repository: Path, *extra: str) -> list[str]:
    """`python -m service serve` on free ports with text logs (the lines the parts wait for)."""
    return [
        sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
        "--metrics-port", "0", "--http-port", str(free_port()), "--repository", str(repository),
        "--log-format", "text", *extra,
    ]  # fmt: skip


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (http_port 0 turns REST off rather than picking one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server(Child):
    def __init__(self, repository: Path, *extra: str) -> None:
        super().__init__(serve_args(repository, *extra))
        m = self.wait_for(LISTENING.pattern, 180)
        self.address, self.metrics_address, self.http_address = m["grpc"], m["metrics"], m["http"]
        self._wait_serving()

    def _wait_serving(self, timeout: float = 600) -> None:  # VGG-19's warm-up takes minutes when busy
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError("server not SERVING:\n" + "\n".join(self.lines[-30:]))

    def batch_histogram(self, model: str) -> dict[str, float]:
        """Cumulative cnnserve_batch_size buckets (le -> count) plus _count and _sum for `model`."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10) as r:
            body = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(body):
            if family.name != "cnnserve_batch_size":
                continue
            for s in family.samples:
                if s.labels.get("model") != model:
                    continue
                if s.name.endswith("_bucket"):
                    out[s.labels["le"]] = s.value
                elif s.name.endswith("_count"):
                    out["count"] = s.value
                elif s.name.endswith("_sum"):
                    out["sum"] = s.value
        return out


def batch_distribution(before: dict[str, float], after: dict[str, float]) -> tuple[str, float]:
    """'1:12% 2:5% ... ' over the buckets (count of batches with size in (prev, le]) and the mean."""
    les = sorted((k for k in after if k not in ("count", "sum")), key=lambda k: float(k))
    parts = []
    prev = 0.0
    total = after.get("count", 0) - before.get("count", 0)
    low = 1
    for le in les:
        cum = after[le] - before.get(le, 0.0)
        n = cum - prev
        prev = cum
        if le == "+Inf":
            break
        high = int(float(le))
        if n > 0 and total > 0:
            parts.append(f"{low if low == high else f'{low}-{high}'}: {n / total:.0%}")
        low = high + 1
    mean = (after.get("sum", 0) - before.get("sum", 0)) / total if total else 0.0
    return ", ".join(parts) or "no batches", mean


# --- statistics -----------------------------------------------------------------------------------------


def pct(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q)) if samples else float("nan")


def ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


# --- parts -------------------------------------------------------------------------------------------


def part_resnet(args: argparse.Namespace, paths: dict[str, Path], report: Report) -> None:
    from bench.raw_ort import measure_latency, measure_throughput, open_session

    log("resnet50: raw ONNX Runtime in-process")
    session = open_session(paths["resnet50"])
    session.warmup([1, 8, 16])
    # Three rounds over the batch sizes, median per size: a neighbour's burst on the shared cores
    # then skews one round of every size instead of all of one size.
    rounds = [measure_throughput(session, [1, 8, 16], min_duration_s=args.raw_seconds / 3) for _ in range(3)]
    points = [sorted((r[i] for r in rounds), key=lambda p: p.images_per_s)[1] for i in range(len(rounds[0]))]
    latency = measure_latency(session, iterations=args.latency_iterations)
    del session
    raw_best = max(points, key=lambda p: p.images_per_s)
    for p in points:
        report.add("resnet50 raw ORT", f"throughput batch {p.batch_size}", f"{p.images_per_s:.1f} img/s",
                   ratio=f"{p.images_per_s / raw_best.images_per_s:.2f} of best")  # fmt: skip
    report.add("resnet50 raw ORT", "batch-1 latency p50 / p99", f"{ms(latency.p50_s)} / {ms(latency.p99_s)}")
    report.raw["resnet50_raw"] = {"throughput": [p.__dict__ for p in points], "latency": latency.__dict__}

    for frontends in args.resnet_frontends:
        _resnet_served(args, paths, report, latency.p50_s, latency.p99_s, raw_best, frontends)


def _resnet_served(args: argparse.Namespace, paths: dict[str, Path], report: Report, raw_p50: float,
                   raw_p99: float, raw_best: Any, frontends: int) -> None:  # fmt: skip
    """The served rows of one `serve --frontends N` (row names carry N unless it is 1)."""
    from bench.load import run_load
    from service._proto.cnnserve.v1 import inference_pb2 as pb

    layout = "" if frontends == 1 else f" --frontends {frontends}"
    key = "" if frontends == 1 else f"_frontends_{frontends}"
    log(f"resnet50: starting the server{layout}")
    server = Server(args.repository, "--workers", "0", "--frontends", str(frontends))
    try:
        request = pb.ClassifyRequest(model="resnet50", top_k=5, image=pb.ImageInput(encoded=jpeg_224()))
        h0 = server.batch_histogram("resnet50")
        c1 = run_load(server.address, request, concurrency=1, processes=1, duration_s=args.seconds)
        h1 = server.batch_histogram("resnet50")
        p50, p99, p999 = (pct(c1.latencies_s, q) for q in (50, 99, 99.9))
        target = raw_p50 + LATENCY_OVERHEAD_TARGET_S
        row = f"resnet50 served{layout} c=1"
        report.add(row, "latency p50 (JPEG 224)", ms(p50), f"raw b1 p50 {ms(raw_p50)}",
                   f"{p50 / raw_p50:.2f}x (+{(p50 - raw_p50) * 1e3:.1f} ms)",
                   f"<= raw + 3 ms ({ms(target)})", p50 <= target)  # fmt: skip
        report.add(row, "latency p99 / p99.9", f"{ms(p99)} / {ms(p999)}", f"raw b1 p99 {ms(raw_p99)}",
                   f"{p99 / raw_p99:.2f}x")  # fmt: skip
        report.add(row, "requests (errors)", f"{c1.completed} ({c1.errors})",
                   ratio=f"{c1.completed / c1.seconds:.1f} req/s")  # fmt: skip
        dist, mean = batch_distribution(h0, h1)
        report.add(row, "batch sizes (/metrics)", f"mean {mean:.2f}: {dist}")
        served: dict[str, Any] = {"c1": {"p50": p50, "p99": p99, "p999": p999, "n": c1.completed}}
        if frontends == 1:
            floor_p50 = floor_latency(paths["resnet50"].parent, request, args.seconds)
            report.add("resnet50 minimal Python server c=1 (bench.floor)", "latency p50 (JPEG 224)",
                       ms(floor_p50), f"raw b1 p50 {ms(raw_p50)}",
                       f"+{(floor_p50 - raw_p50) * 1e3:.1f} ms "
                       f"(served - floor {(p50 - floor_p50) * 1e3:+.1f} ms)", "context", None)  # fmt: skip
            served["c1"]["floor_p50"] = floor_p50

        for concurrency in args.resnet_concurrency:
            cpu = CpuWindow(server.process.pid)
            result = run_load(server.address, request, concurrency=concurrency, processes=args.client_procs,
                              duration_s=args.seconds)  # fmt: skip
            # ONNX Runtime's intra-op threads (one per core: the runner thread and its pool) are the
            # server's busiest; everything else shares the same cores with them. (Under --frontends
            # N the processes are children: CpuWindow then counts the supervisor alone.)
            split = cpu.split(top=os.cpu_count() or 1)
            h2 = server.batch_histogram("resnet50")
            rate = result.completed / result.seconds
            row = f"resnet50 served{layout} c={concurrency}"
            report.add(row, "throughput (JPEG 224)", f"{rate:.1f} img/s",
                       f"raw best b{raw_best.batch_size} {raw_best.images_per_s:.1f} img/s",
                       f"{rate / raw_best.images_per_s:.2f}", f">= {THROUGHPUT_TARGET}",
                       rate / raw_best.images_per_s >= THROUGHPUT_TARGET)  # fmt: skip
            report.add(row, "latency p50 / p99", f"{ms(pct(result.latencies_s, 50))} / "
                       f"{ms(pct(result.latencies_s, 99))}", ratio=f"errors {result.errors}")  # fmt: skip
            dist, mean = batch_distribution(h1, h2)
            h1 = h2
            report.add(row, "batch sizes (/metrics)", f"mean {mean:.2f}: {dist}")
            if frontends == 1:
                report.add(row, "CPU, cores (whole load incl. warm-up)",
                           f"ORT threads {split.top:.2f}, rest of server {split.rest_of_process:.2f}, "
                           f"clients + others {split.rest_of_machine:.2f}, idle {split.idle:.2f}",
                           ratio=f"non-ORT {(split.rest_of_process + split.rest_of_machine) / rate * 1e3:.1f}"
                           " ms/img", target="context", ok=None)  # fmt: skip
            if result.error_samples:
                report.notes.append(f"resnet50 errors: {result.error_samples[:3]}")
            served[f"c{concurrency}"] = {"images_per_s": rate, "n": result.completed, "cpu": split.__dict__}
            if frontends == 1 and concurrency == EMBED_CONCURRENCY:
                served[f"embed_c{concurrency}"] = _embed_row(args, server, report, rate, concurrency)
                served[f"rest_c{concurrency}"] = _rest_row(args, server, report, rate, concurrency)
        if c1.error_samples:
            report.notes.append(f"resnet50 errors: {c1.error_samples[:3]}")
        report.raw[f"resnet50_served{key}"] = served
    finally:
        server.stop()


def _embed_row(
    args: argparse.Namespace, server: Server, report: Report, classify_rate: float, concurrency: int
) -> dict[str, Any]:
    """Embed at `concurrency` right after Classify at the same concurrency, on the same server:
    the embedding costs a copy of 2048 floats per image and a bigger answer, not another pass."""
    from bench.load import run_load
    from service._proto.cnnserve.v1 import inference_pb2 as pb

    request = pb.EmbedRequest(model="resnet50", image=pb.ImageInput(encoded=jpeg_224()))
    result = run_load(server.address, request, concurrency=concurrency, processes=args.client_procs,
                      duration_s=args.seconds, kind="embed")  # fmt: skip
    rate = result.completed / result.seconds
    cost = classify_rate / rate if rate > 0 else float("inf")
    report.add(f"resnet50 Embed c={concurrency}", "throughput (JPEG 224, 2048 floats back)",
               f"{rate:.1f} img/s", f"Classify c={concurrency} {classify_rate:.1f} img/s",
               f"{cost:.2f}x the cost", f"<= {EMBED_COST_TARGET}x", cost <= EMBED_COST_TARGET)  # fmt: skip
    if result.error_samples:
        report.notes.append(f"resnet50 Embed errors: {result.error_samples[:3]}")
    return {"images_per_s": rate, "n": result.completed, "cost_vs_classify": cost, "errors": result.errors}


def _rest_row(
    args: argparse.Namespace, server: Server, report: Report, grpc_rate: float, concurrency: int
) -> dict[str, Any]:
    """The same JPEG to the REST image route at `concurrency`, right after gRPC Classify at the
    same concurrency on the same server: what HTTP/1.1 + JSON cost against HTTP/2 + protobuf."""
    from bench.load import run_load
    from service._proto.cnnserve.v1 import inference_pb2 as pb

    request = pb.ClassifyRequest(model="resnet50", image=pb.ImageInput(encoded=jpeg_224()))
    result = run_load(server.http_address, request, concurrency=concurrency, processes=args.client_procs,
                      duration_s=args.seconds, kind="rest")  # fmt: skip
    rate = result.completed / result.seconds
    ratio = rate / grpc_rate if grpc_rate > 0 else 0.0
    p50 = pct(result.latencies_s, 50) * 1e3 if result.latencies_s else float("nan")
    report.add(f"resnet50 REST c={concurrency}", "throughput (JPEG 224, POST .../classify)",
               f"{rate:.1f} img/s (p50 {p50:.0f} ms)", f"gRPC Classify c={concurrency} {grpc_rate:.1f} img/s",
               f"{ratio:.2f}x gRPC", f">= {REST_RATE_TARGET}x", ratio >= REST_RATE_TARGET)  # fmt: skip
    if result.error_samples:
        report.notes.append(f"resnet50 REST errors: {result.error_samples[:3]}")
    return {"images_per_s": rate, "n": result.completed, "vs_grpc": ratio, "errors": result.errors}


def floor_latency(model_dir: Path, request: Any, seconds: float) -> float:
    """c=1 p50 of bench.floor (the minimal inline Python server) for this model and request."""
    from bench.load import run_load

    floor = Child([sys.executable, "-m", "bench.floor", str(model_dir)])
    try:
        address = floor.wait_for(r"listening (\S+)", 180)[1]
        result = run_load(address, request, concurrency=1, processes=1, duration_s=seconds)
    finally:
        floor.stop()
    if result.errors:
        raise RuntimeError(f"bench.floor answered errors: {result.error_samples}")
    return pct(result.latencies_s, 50)


def part_style(args: argparse.Namespace, report: Report) -> None:
    """Classification c=1 latency of a server with one gradient worker (default settings), alone and
    while a real Stylize RPC runs on that worker, in alternating windows (bench.gradients)."""
    from bench.gradients import style_interference
    from export.demo import demo
    from service._proto.cnnserve.v1 import inference_pb2 as pb

    log(f"style: model repository {args.style_repository} (resnet50, vgg19 random; reused when verified)")
    demo(args.style_repository, ["resnet50", "vgg19"], out=sys.stderr, progress=None)
    log(f"style: c=1 resnet50 latency alone and next to a {args.style_size} px Stylize RPC (--workers 1)")
    server = Server(args.style_repository, "--workers", "1")
    try:
        request = pb.ClassifyRequest(model="resnet50", top_k=5, image=pb.ImageInput(encoded=jpeg_224()))
        r = style_interference(server.address, request, style_size=args.style_size, seconds=2 * args.seconds)
    finally:
        server.stop()
    report.add("resnet50 c=1, 1 gradient worker", "latency p50 / p99, no gradient job",
               f"{ms(r.alone_p50_s)} / {ms(r.alone_p99_s)}", ratio=f"n={r.alone_n}")  # fmt: skip
    report.add("resnet50 c=1 + Stylize RPC", "latency p50 / p99",
               f"{ms(r.loaded_p50_s)} / {ms(r.loaded_p99_s)}", f"no job p99 {ms(r.alone_p99_s)}",
               f"p99 {r.loaded_p99_s / r.alone_p99_s:.2f}x", "report")  # fmt: skip
    report.add("Stylize RPC (served)", f"{r.style_size} px iterations/s, next to the classifier",
               f"{r.style_steps_per_s:.2f} it/s", ratio=f"{r.style_steps} iterations")  # fmt: skip
    report.raw["style_interference"] = r.__dict__
    if r.errors:
        report.notes.append(f"resnet50 next to Stylize: {r.errors} classification errors")
    report.notes.append(
        "Stylize next to classification: one server, default settings (`--workers 1`, torch threads ="
        " cores / workers, ORT threads = cores), classify windows alternating without and with a"
        " Stylize call in flight (started before, cancelled after each window). The worker and ONNX"
        " Runtime compete for the same cores: the p99 under it measures CPU sharing; `--torch-threads`"
        " and `--intra-op-threads` split the cores between them."
    )


def part_lenet(args: argparse.Namespace, paths: dict[str, Path], report: Report) -> None:
    from bench.load import echo_response, run_load
    from service._proto.cnnserve.v1 import inference_pb2 as pb

    request = pb.ClassifyRequest(model="lenet5", top_k=5, image=pb.ImageInput(encoded=digit_png()))
    log(f"lenet5: server vs bare echo (request {request.ByteSize()} B, echo response "
        f"{echo_response().ByteSize()} B), concurrency {args.lenet_concurrency}")  # fmt: skip
    lenet_dir = paths["lenet5"].parent
    echo = Child([sys.executable, "-m", "bench.load", "echo"])
    floor = Child([sys.executable, "-m", "bench.floor", str(lenet_dir)])
    bare = Child([sys.executable, "-m", "bench.floor", str(lenet_dir), "--no-model"])
    server = Server(args.repository, "--workers", "0")
    try:
        echo_address = echo.wait_for(r"listening (\S+)", 60)[1]
        floor_address = floor.wait_for(r"listening (\S+)", 120)[1]
        bare_address = bare.wait_for(r"listening (\S+)", 120)[1]
        with_real: list[Any] = []
        with_echo: list[Any] = []
        with_floor: list[Any] = []
        with_bare: list[Any] = []
        half = args.seconds / 2
        # A/B/C/D twice so drifting background load hits every side alike.
        for _ in range(2):
            for address, out in ((echo_address, with_echo), (server.address, with_real),
                                 (floor_address, with_floor), (bare_address, with_bare)):  # fmt: skip
                out.append(run_load(address, request, concurrency=args.lenet_concurrency,
                                    processes=args.client_procs, duration_s=half))  # fmt: skip
        real_rate, echo_rate, floor_rate, bare_rate = (
            sum(r.completed for r in runs) / (2 * half)
            for runs in (with_real, with_echo, with_floor, with_bare)
        )
        errors = sum(r.errors for r in with_real)
        report.add("lenet5 Classify", f"requests/s (c={args.lenet_concurrency})", f"{real_rate:.0f} req/s",
                   f"bare grpc.aio echo {echo_rate:.0f} req/s", f"{real_rate / echo_rate:.2f}",
                   f">= {ECHO_TARGET}", real_rate / echo_rate >= ECHO_TARGET)  # fmt: skip
        report.add("lenet5 minimal Python server (bench.floor)",
                   "requests/s: decode, preprocess, ORT, respond",
                   f"{floor_rate:.0f} req/s", f"echo {echo_rate:.0f} req/s",
                   f"{floor_rate / echo_rate:.2f} (served/floor {real_rate / floor_rate:.2f})", "context",
                   None)  # fmt: skip
        report.add("lenet5 minimal Python server, no model", "requests/s: decode, preprocess, respond",
                   f"{bare_rate:.0f} req/s", f"echo {echo_rate:.0f} req/s", f"{bare_rate / echo_rate:.2f}",
                   "context", None)  # fmt: skip
        floor_errors = [r.error_samples[:2] for r in (*with_floor, *with_bare) if r.errors]
        if floor_errors:
            report.notes.append(f"lenet5 minimal server errors: {floor_errors}")
        lat = [x for r in with_real for x in r.latencies_s]
        elat = [x for r in with_echo for x in r.latencies_s]
        report.add("lenet5 Classify", "latency p50 / p99", f"{ms(pct(lat, 50))} / {ms(pct(lat, 99))}",
                   f"echo {ms(pct(elat, 50))} / {ms(pct(elat, 99))}", ratio=f"errors {errors}")  # fmt: skip
        h0 = server.batch_histogram("lenet5")
        dist, mean = batch_distribution({}, h0)
        report.add("lenet5 Classify", "batch sizes (/metrics)", f"mean {mean:.2f}: {dist}")
        stream = run_load(server.address, request, concurrency=args.stream_window, processes=1,
                          duration_s=args.seconds / 2, kind="stream")  # fmt: skip
        h1 = server.batch_histogram("lenet5")
        srate = stream.completed / stream.seconds
        report.add("lenet5 ClassifyStream", f"images/s (1 stream, {args.stream_window} in flight)",
                   f"{srate:.0f} img/s", f"unary c={args.lenet_concurrency} {real_rate:.0f} req/s",
                   f"{srate / real_rate:.2f}", "report", None)  # fmt: skip
        dist, mean = batch_distribution(h0, h1)
        report.add("lenet5 ClassifyStream", "batch sizes (/metrics)", f"mean {mean:.2f}: {dist}")
        # The REST image route beside gRPC at the same concurrency, alternated: where the protocol's
        # own cost shows (a LeNet-5 call is ~1 ms of work; ResNet-50's row hides it under the model).
        rest_runs: list[Any] = []
        grpc_runs: list[Any] = []
        for _ in range(2):
            for address, kind, out in ((server.http_address, "rest", rest_runs),
                                       (server.address, "unary", grpc_runs)):  # fmt: skip
                out.append(run_load(address, request, concurrency=args.lenet_concurrency,
                                    processes=args.client_procs, duration_s=half, kind=kind))  # fmt: skip
        rest_rate, grpc_rate = (sum(r.completed for r in x) / (2 * half) for x in (rest_runs, grpc_runs))
        rest_lat = [x for r in rest_runs for x in r.latencies_s]
        report.add("lenet5 REST classify", f"requests/s (c={args.lenet_concurrency}), p50",
                   f"{rest_rate:.0f} req/s, {ms(pct(rest_lat, 50))}", f"gRPC Classify {grpc_rate:.0f} req/s",
                   f"{rest_rate / grpc_rate:.2f}x gRPC", f">= {REST_RATE_TARGET}x",
                   rest_rate / grpc_rate >= REST_RATE_TARGET)  # fmt: skip
        for r in [*with_real, stream, *rest_runs]:
            if r.error_samples:
                report.notes.append(f"lenet5 errors: {r.error_samples[:3]}")
                break
        report.raw["lenet5"] = {
            "served_rps": real_rate, "echo_rps": echo_rate, "stream_ips": srate,
            "floor_rps": floor_rate, "floor_no_model_rps": bare_rate, "rest_rps": rest_rate,
            "rest_vs_grpc_rps": grpc_rate,
        }  # fmt: skip
    finally:
        server.stop()
        for child in (echo, floor, bare):
            child.stop()


def part_proxy(args: argparse.Namespace, paths: dict[str, Path], report: Report) -> None:
    """The CPU proxy of a GPU server (bench/proxy.py): lenet5 on 224x224 JPEGs, served against the
    raw pipeline in 1 process and on every core."""
    from bench.load import run_load
    from bench.proxy import raw_pipeline
    from service._proto.cnnserve.v1 import inference_pb2 as pb

    lenet_dir = paths["lenet5"].parent
    jpeg = jpeg_224()
    cores = os.cpu_count() or 1
    raw_seconds = max(3.0, args.seconds / 2)
    log(f"proxy: raw pipeline (decode + preprocess + ORT per image) in 1 and {cores} processes")
    one = raw_pipeline(lenet_dir, jpeg, seconds=raw_seconds, processes=1)
    every = raw_pipeline(lenet_dir, jpeg, seconds=raw_seconds, processes=cores)
    add = report.add
    add("proxy raw pipeline", "images/s, lenet5 on 224x224 JPEGs", f"{one:.0f} img/s (1 process)",
        f"{every:.0f} img/s ({cores} processes)", f"{one / every:.2f}", "context", None)  # fmt: skip
    request = pb.ClassifyRequest(model="lenet5", top_k=5, image=pb.ImageInput(encoded=jpeg))
    raw: dict[str, Any] = {"raw_one": one, "raw_all": every, "cores": cores}
    for frontends in args.proxy_frontends:
        flags = ("--models", "lenet5", "--workers", "0", "--frontends", str(frontends))
        server = Server(args.repository, *flags)
        try:
            log(f"proxy: served Classify c=16 and ClassifyStream, --frontends {frontends}")
            # Distinct connections, as from many clients: the kernel hands each connection to one
            # frontend process (SO_REUSEPORT), so one connection would load one frontend alone.
            unary = run_load(server.address, request, concurrency=16, processes=args.client_procs,
                             duration_s=args.seconds, connections=16)  # fmt: skip
            stream = run_load(server.address, request, concurrency=args.stream_window, processes=1,
                              duration_s=args.seconds, kind="stream",
                              connections=args.proxy_streams)  # fmt: skip
            c1 = run_load(server.address, request, concurrency=1, processes=1, duration_s=args.seconds / 2)
        finally:
            server.stop()
        stream_name = f"ClassifyStream ({args.proxy_streams} streams, {args.stream_window} in flight)"
        rows = (("Classify c=16 (16 connections)", unary, 0.5), (stream_name, stream, 0.7))
        for name, result, target in rows:
            rate = result.completed / result.seconds
            add(f"proxy --frontends {frontends} {name}", f"images/s (errors {result.errors})",
                f"{rate:.0f} img/s",
                f"raw {every:.0f} img/s all cores; {one:.0f} one",
                f"{rate / every:.2f} ({rate / one:.2f} of one)",
                f">= {target} all cores (issue 12)", rate / every >= target)  # fmt: skip
            if result.error_samples:
                report.notes.append(f"proxy errors: {result.error_samples[:3]}")
        add(f"proxy --frontends {frontends} Classify c=1", "latency p50 / p99",
            f"{ms(pct(c1.latencies_s, 50))} / {ms(pct(c1.latencies_s, 99))}",
            ratio=f"errors {c1.errors}")  # fmt: skip
        raw[f"frontends_{frontends}"] = {
            "unary_c16": unary.completed / unary.seconds, "stream": stream.completed / stream.seconds,
            "c1_p50": pct(c1.latencies_s, 50),
        }  # fmt: skip
    report.raw["proxy"] = raw


def part_gradients(args: argparse.Namespace, report: Report) -> None:
    import torch

    from bench.gradients import TARGET_RATIO, bench_dream, bench_guided, bench_style

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for size in args.grad_sizes:
        for fn in (bench_guided, bench_dream, bench_style):
            log(f"gradients: {fn.__name__} {size} px")
            r = fn(size, device=device, quick=args.quick)
            results.append(r)
            steps = "images/s" if r.name == "guided" else "steps/s"
            report.add(f"gradients {r.name}", f"{size} px, s per {r.unit}; {steps}",
                       f"{r.ours_s:.3f} s; {r.steps_per_s:.2f}", f"raw torch {r.raw_s:.3f} s",
                       f"{r.ratio:.2f} ({r.ratio_min:.2f}-{r.ratio_max:.2f})", f"<= {TARGET_RATIO}",
                       r.ok)  # fmt: skip
    report.raw["gradients"] = [r.__dict__ for r in results]


# --- main ----------------------------------------------------------------------------------------------


def write_markdown(path: Path, report: Report, args: argparse.Namespace, machine: list[str], busy: Any,
                   elapsed: float) -> None:  # fmt: skip
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench"
        + (" --quick" if args.quick else "")
        + f"`, {elapsed / 60:.1f} min). Every served number is compared with a baseline measured in the"
        " same run (raw ONNX Runtime in-process, a bare grpc.aio echo server, a minimal Python server"
        " doing only the essential work (bench.floor), raw PyTorch loops).",
        "",
        "## Machine",
        "",
        *machine,
        "",
        "## Results",
        "",
        report.table(),
        "",
        "## How it was measured",
        "",
        "- Models: `artifacts/bench_repository` (lenet5 trained on the UCI digits, resnet50 with seeded"
        " random weights; speed does not depend on the weights). Server: `python -m service serve`"
        " subprocess with default settings (dynamic batching max 16, 2 ms queue delay, ORT threads ="
        " cores) and"
        " `--workers 0`.",
        "- Served load: one asyncio grpc.aio client ("
        + (f"{args.client_procs} spawned processes" if args.client_procs > 1 else "in the bench process")
        + f") with N tasks issuing requests back to back (c=N), {args.seconds:.0f} s windows after a warm-up"
        " (lenet: echo/server/floor/floor-without-model, twice, in halves). Throughput counts"
        " completions inside the window;"
        " latencies are client-side, of those completions.",
        "  Requests: a 224x224 JPEG (q90) for resnet50 (decoded and preprocessed by the server), a 32x32"
        " PNG for lenet5. The echo server answers a fixed 5-class response to the same request.",
        "- Floor: `bench.floor`, a bare grpc.aio server doing only the essential work of a Classify"
        " inline on its event loop with the service's own code (decode with the pixel cap and EXIF,"
        " preprocess, one ONNX Runtime call per request on a session built like the service's,"
        " softmax, top-k, response; no batching, no metrics, no thread hops); `--no-model` skips the"
        " ONNX Runtime call. What a hand-rolled Python server reaches here: a target below it cannot"
        " be met by a Python server on this machine.",
        "- Proxy (`bench.proxy`): lenet5 fed a 224x224 JPEG, so inference is almost free and the serving"
        " path is the work, as on a GPU. Baseline: the raw pipeline (service.images decode +"
        " preprocessing + one ONNX Runtime call per image, session built like the service's) in one"
        " process and in one spawned process per core at once; served: `--models lenet5 --workers 0`,"
        " Classify at c=16 and one ClassifyStream, against the all-core raw figure (issue 12's targets).",
        "- CPU at c=16: per-thread CPU of the server process from /proc over the whole load (warm-up"
        " included); the busiest threads, one per core, are ONNX Runtime's intra-op threads; the"
        " rest of the machine is the load client and any neighbour.",
        "- Raw ORT: `bench.raw_ort` session built exactly as the service builds it, back-to-back runs at"
        f" batch 1/8/16 (median of 3 interleaved rounds, {args.raw_seconds:.0f} s per size in all) and"
        f" {args.latency_iterations} batch-1 latency"
        " samples (p99 of 100 samples is close to the max).",
        "- Gradients: `bench.gradients` (ours vs a minimal PyTorch loop in the same process, paired"
        " samples, one warm-up round; ratio = median of the paired ratios, the per-round spread in"
        " brackets), target ratio <= 1.2.",
        *([STARTUP_METHOD] if "startup" in args.parts else []),
        "",
        "## Noise",
        "",
        f"- {os.cpu_count()} cores shared by the server, the load-generating client (which also decodes the"
        " responses and serialises requests: on 2 cores it takes CPU the server would otherwise use, so"
        " served throughput is a lower bound) and whatever else runs on the box.",
        "- Other processes using CPU (1 s samples) at the start: "
        + (", ".join(busy[0]) or "none seen")
        + "; at the end: "
        + (", ".join(busy[1]) or "none seen")
        + ".",
        "- Ratios are more stable than absolute numbers; rerun before drawing conclusions from a few %.",
        *[f"- {n}" for n in report.notes],
        "",
    ]
    kept = kept_sections(path.read_text() if path.exists() else "")
    path.write_text("\n".join(lines) + ("\n" + kept if kept else ""))


STARTUP_METHOD = (
    "- Start-up (`bench.startup`, issue 13): each scenario a fresh `python -m service serve` over"
    " `artifacts/bench_startup_repository` (the six demo models, random weights but lenet5's), timed"
    ' from the spawn: grpc.health.v1 Check "" and List every 50 ms on one channel, the server\'s'
    " `ready in` and per-model `loaded ... in S s (warm-up ...: S s)` log lines, and the RSS of the"
    " server's process tree from /proc 2 s after SERVING and 2 s after the gradient workers report"
    " ready (they start after SERVING). GB = 10^9 bytes."
)

# The sections write_markdown writes; every other "## " section of BENCHMARKS.md (the soak, GPU runs,
# hand-added notes) was written by someone else and is kept, in its order, after them.
GENERATED_SECTIONS = ("## Machine", "## Results", "## How it was measured", "## Noise")


def kept_sections(text: str) -> str:
    """The "## " sections of `text` that write_markdown does not generate, verbatim."""
    kept: list[str] = []
    keep = False
    for line in text.splitlines():
        if line.startswith("## "):
            keep = line.strip() not in GENERATED_SECTIONS
        elif line.startswith("# "):
            keep = False
        if keep:
            kept.append(line)
    return "\n".join(kept).rstrip() + "\n" if kept else ""


def report_path(args: argparse.Namespace) -> Path | None:
    """Where the report goes: --out, else BENCHMARKS.md when every default part ran (a partial
    run's rows would replace the full table's); None with --no-write."""
    if args.no_write:
        return None
    if args.out is not None:
        return Path(args.out)
    return ROOT / "BENCHMARKS.md" if set(PARTS) <= set(args.parts) else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts of {','.join(PARTS + EXTRA_PARTS)} (default {','.join(PARTS)};"
        " startup, minutes, only when named)",
    )
    p.add_argument("--quick", action="store_true", help="short windows (4 s), fewer raw samples")
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument("--seconds", type=float, default=None, help="per served measurement (default 12; quick 4)")
    p.add_argument("--raw-seconds", type=float, default=None, help="per raw batch size (default 5; quick 2)")
    p.add_argument(
        "--latency-iterations", type=int, default=None, help="raw batch-1 samples (default 100; quick 30)"
    )
    p.add_argument("--client-procs", type=int, default=1, help="client processes for concurrency > 1")
    p.add_argument("--lenet-concurrency", type=int, default=16)
    p.add_argument("--stream-window", type=int, default=64)
    p.add_argument(
        "--proxy-frontends",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 2],
        help="the proxy part's `serve --frontends` values, comma-separated",
    )
    p.add_argument(
        "--proxy-streams", type=int, default=4, help="the proxy part's ClassifyStreams (one connection each)"
    )
    p.add_argument(
        "--resnet-frontends",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1],
        help="the resnet part's `serve --frontends` values, comma-separated (default 1)",
    )
    p.add_argument(
        "--resnet-concurrency",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[16],
        help="the resnet part's throughput concurrencies, comma-separated (default 16; a GPU: 16,64)",
    )
    p.add_argument("--style-size", type=int, default=256, help="Stylize image side next to classification")
    p.add_argument("--style-repository", type=Path, default=ROOT / "artifacts" / "bench_style_repository")
    p.add_argument(
        "--grad-sizes", default=None, help="comma-separated image sides (default 256,512; quick 64)"
    )
    p.add_argument(
        "--startup-repository",
        type=Path,
        default=ROOT / "artifacts" / "bench_startup_repository",
        help="the startup part's repository: every demo model, built on first use",
    )
    p.add_argument("--startup-runs", type=int, default=1, help="server starts per startup scenario (median)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds per startup server start")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the report here (default BENCHMARKS.md, and only after a run of every default part)",
    )
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    p.add_argument("--json", type=Path, help="also write the raw numbers as JSON here")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(args.parts) - set(PARTS) - set(EXTRA_PARTS) - {"repo"}
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}")
    if args.startup_runs < 1:
        p.error("--startup-runs must be at least 1")
    args.seconds = args.seconds or (4.0 if args.quick else 12.0)
    args.raw_seconds = args.raw_seconds or (2.0 if args.quick else 5.0)
    args.latency_iterations = args.latency_iterations or (30 if args.quick else 100)
    args.grad_sizes = [int(s) for s in (args.grad_sizes or ("64" if args.quick else "256,512")).split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    machine = machine_lines()
    busy_at_start = other_cpu_users({os.getpid()})
    report = Report()
    # The lenet5 + resnet50 repository, for the parts that serve it (a startup-only run has its own).
    paths = (
        build_repository(args.repository) if {"resnet", "lenet", "proxy", "repo"} & set(args.parts) else {}
    )
    if "resnet" in args.parts:
        part_resnet(args, paths, report)
    if "style" in args.parts:
        part_style(args, report)
    if "lenet" in args.parts:
        part_lenet(args, paths, report)
    if "proxy" in args.parts:
        part_proxy(args, paths, report)
    if "gradients" in args.parts:
        part_gradients(args, report)
    if "startup" in args.parts:
        from bench.startup import part_startup

        part_startup(args.startup_repository, report, runs=args.startup_runs, timeout_s=args.startup_timeout)
    elapsed = time.perf_counter() - started
    busy = (busy_at_start, other_cpu_users({os.getpid()}))
    print("\n".join(machine))
    print()
    print(report.table())
    for n in report.notes:
        print(f"note: {n}")
    out = report_path(args)
    if out is not None:
        write_markdown(out, report, args, machine, busy, elapsed)
        log(f"wrote {out}")
    elif not args.no_write:
        log("a run of some parts: BENCHMARKS.md left alone (--out FILE writes this table)")
    if args.json:
        args.json.write_text(json.dumps(report.raw, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
