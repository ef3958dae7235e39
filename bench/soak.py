"""`make soak` (`python -m bench.soak`): a long mixed load against one real server with a gradient
worker, checking that nothing is lost and nothing leaks or slows down. Not part of CI or `make test`.

    python -m bench.soak                      # 10,000 requests at concurrency 8 (see BENCHMARKS.md)
    python -m bench.soak --requests 2000      # a shorter run
    python -m bench.soak --no-write           # print the table, leave BENCHMARKS.md alone
    python -m bench.soak --frontends 2        # the same under `serve --frontends 2` (issue 12)

The mix (DEFAULT_MIX; seeded and shuffled, so every tenth of the run sees the same mix): Classify
on lenet5 (60%, 32x32 PNG digits) and resnet18 (36%, 160x160 JPEGs), Explain on resnet18 (2.5%,
guided backprop of one 96x96 image), and a few small DreamUnary (0.75%, resnet18, 64x64, 1 octave
of 3 steps) and StylizeUnary (0.75%, VGG-19, 64x64 content and style, 3 Adam steps). The gradient
jobs queue for the one worker, so their latency is mostly that queue. The client uses
service.client.default_channel_options() (the documented retry policy), so errors are also
counted on the server (every non-OK code in cnnserve_requests_total), where a retry cannot hide
them.

Checks (exit status 1 when one fails):
- 0 errors, client side and server side; no worker or engine restart;
- RSS growth under 100 MB: the server and all its descendants (the gradient worker), summed from
  /proc, at the end versus right after the warm-up (its own unmeasured pass of the same mix), and
  versus the lowest total sampled (every second) during the run;
- p99 latency of the last tenth of the measured requests at most 20% above the first tenth's, for
  each classification kind (the gradient kinds are reported: a tenth holds too few of them for a
  p99 to mean much). A faster last tenth passes: the check is for slowing down.

The models come from `artifacts/soak_repository`, built on first use with `python -m export demo`
(lenet5 trained, resnet18 and vgg19 seeded random weights; vgg19 takes about a minute and 2.6 GB of
memory to export, once) and reused after.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.__main__ import ROOT, Server, log, machine_lines, other_cpu_users

DEFAULT_REPOSITORY = ROOT / "artifacts" / "soak_repository"
MODELS = ("lenet5", "resnet18", "vgg19")
# kind -> share of the requests. Classification dominates, as in production; the gradient kinds
# are the "few small dreams and stylizations" (and explanations) that exercise the worker.
DEFAULT_MIX = {
    "classify lenet5": 0.6,
    "classify resnet18": 0.36,
    "explain resnet18": 0.025,
    "dream resnet18": 0.0075,
    "stylize vgg19": 0.0075,
}
CLASSIFY_KINDS = ("classify lenet5", "classify resnet18")
RSS_GROWTH_LIMIT_BYTES = 100 * 1024 * 1024
P99_DRIFT_LIMIT = 0.20
DEADLINE_S = 300.0
SECTION = "## Soak"


# --- requests -------------------------------------------------------------------------------------


def _encode(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _rgb(rng: np.random.Generator, side: int) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side] / side
    f = rng.uniform(2, 12, 3)
    img = np.stack([np.sin(f[0] * x), np.cos(f[1] * y), np.sin(f[2] * x * y)], axis=2) * 0.4 + 0.5
    img += 0.05 * rng.standard_normal((side, side, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _digit(rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("L", (32, 32), 0)
    x0, y0 = rng.integers(4, 10, 2)
    ImageDraw.Draw(img).ellipse((int(x0), int(y0), int(x0) + 16, int(y0) + 20), outline=255, width=3)
    return np.asarray(img)


@dataclass(frozen=True)
class Kind:
    name: str
    method: str  # an InferenceStub attribute
    requests: tuple[Any, ...]  # variants, used in turn


def build_kinds(seed: int = 0) -> dict[str, Kind]:
    from service._proto.cnnserve.v1 import inference_pb2 as pb

    rng = np.random.default_rng(seed)
    digits = [pb.ImageInput(encoded=_encode(_digit(rng), "PNG")) for _ in range(8)]
    photos = [pb.ImageInput(encoded=_encode(_rgb(rng, 160), "JPEG")) for _ in range(8)]
    small = [pb.ImageInput(encoded=_encode(_rgb(rng, 96), "PNG")) for _ in range(4)]
    tiny = [pb.ImageInput(encoded=_encode(_rgb(rng, 64), "PNG")) for _ in range(4)]
    return {
        "classify lenet5": Kind(
            "classify lenet5", "Classify",
            tuple(pb.ClassifyRequest(model="lenet5", top_k=3, image=i) for i in digits),
        ),
        "classify resnet18": Kind(
            "classify resnet18", "Classify",
            tuple(pb.ClassifyRequest(model="resnet18", top_k=5, image=i) for i in photos),
        ),
        "explain resnet18": Kind(
            "explain resnet18", "Explain",
            tuple(pb.ExplainRequest(model="resnet18", images=[i]) for i in small),
        ),
        "dream resnet18": Kind(
            "dream resnet18", "DreamUnary",
            tuple(
                pb.DreamRequest(model="resnet18", image=i, octaves=1, steps=3, jitter=4, seed=n)
                for n, i in enumerate(tiny)
            ),
        ),
        "stylize vgg19": Kind(
            "stylize vgg19", "StylizeUnary",
            tuple(
                pb.StylizeRequest(
                    model="vgg19", content=tiny[n], styles=[pb.StyleImage(image=tiny[(n + 1) % 4])],
                    iterations=3, optimizer=pb.STYLE_OPTIMIZER_ADAM, max_side=64, seed=n,
                )
                for n in range(4)
            ),
        ),
    }  # fmt: skip


def plan(mix: dict[str, float], count: int, rng: random.Random) -> list[str]:
    """`count` kinds in the proportions of `mix` (rounded, at least one each), shuffled."""
    total = sum(mix.values())
    kinds = [k for k, w in mix.items() for _ in range(max(1, round(count * w / total)))]
    rng.shuffle(kinds)
    return kinds


# --- load -------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    kind: str
    latency_s: float
    error: str = ""


def run_load(address: str, kinds: dict[str, Kind], sequence: Sequence[str], concurrency: int,
             progress: Callable[[int], None] | None = None) -> list[Outcome]:  # fmt: skip
    """Send `sequence` (kind names) over one channel with the default client options, from
    `concurrency` threads each taking the next request as soon as its previous one is answered."""
    import grpc

    from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
    from service.client import default_channel_options

    outcomes: list[Outcome | None] = [None] * len(sequence)
    lock = threading.Lock()
    next_index = 0
    done = 0

    with grpc.insecure_channel(address, options=default_channel_options()) as channel:
        stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]

        def worker() -> None:
            nonlocal next_index, done
            while True:
                with lock:
                    i = next_index
                    next_index += 1
                if i >= len(sequence):
                    return
                kind = kinds[sequence[i]]
                request = kind.requests[i % len(kind.requests)]
                start = time.perf_counter()
                error = ""
                try:
                    getattr(stub, kind.method)(request, timeout=DEADLINE_S)
                except grpc.RpcError as exc:
                    error = f"{exc.code().name}: {exc.details()}"
                outcomes[i] = Outcome(i, kind.name, time.perf_counter() - start, error)
                with lock:
                    done += 1
                    n = done
                if progress is not None:
                    progress(n)

        threads = [threading.Thread(target=worker, name=f"soak-{n}", daemon=True) for n in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(o is not None for o in outcomes)
    return [o for o in outcomes if o is not None]


# --- the server's side: RSS from /proc, counters from /metrics ----------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and every descendant (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # gone, or a zombie


def tree_rss(root: int) -> tuple[int, dict[int, int]]:
    per = {pid: rss_bytes(pid) for pid in process_tree(root)}
    return sum(per.values()), per


def roles(per: dict[int, int], root: int) -> str:
    """'server 1900 MiB, worker 800 MiB, ...' (children named from their command lines; under
    `--frontends N` the supervisor's frontend, engine and gradient processes are spawned children
    too, and a gradient worker is a grandchild: "spawned process" names them all alike)."""
    parts = []
    for pid, rss in sorted(per.items()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            cmd = ""
        role = (
            "server" if pid == root
            else "resource tracker" if "resource_tracker" in cmd
            else "spawned process" if "spawn_main" in cmd
            else f"pid {pid}"
        )  # fmt: skip
        parts.append(f"{role} {rss / 2**20:.0f} MiB")
    return ", ".join(parts)


class RssSampler:
    """Samples tree_rss(root) every `interval_s` in a thread; keeps the peak and the low point."""

    def __init__(self, root: int, interval_s: float = 1.0) -> None:
        self.root = root
        self.peak = 0
        self.low = sys.maxsize
        self.samples = 0
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            total = tree_rss(self.root)[0]
            self.peak, self.low = max(self.peak, total), min(self.low, total)
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def server_counters(metrics_address: str) -> dict[str, float]:
    """Non-OK RPCs by method and code, and the restart counters, from GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=30) as r:
        body = r.read().decode()
    out: dict[str, float] = {"ok": 0.0}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == "cnnserve_requests_total":
                key = "ok" if s.labels["code"] == "OK" else f"{s.labels['method']} {s.labels['code']}"
                out[key] = out.get(key, 0.0) + s.value
            elif s.name in ("cnnserve_worker_restarts_total", "cnnserve_engine_restarts_total"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def wait_gradients_serving(address: str, timeout_s: float = 300.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.frontend.server import GRADIENTS_SERVICE

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                request = health_pb2.HealthCheckRequest(service=GRADIENTS_SERVICE)
                if stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"gradient workers not SERVING after {timeout_s:.0f} s")


# --- report ----------------------------------------------------------------------------------------


def p99(values: Sequence[float]) -> float:
    return float(np.percentile(values, 99)) if len(values) else float("nan")


def _p99_cell(values: Sequence[float]) -> str:
    return f"{_ms(p99(values))} (n={len(values)})" if values else "- (n=0)"


@dataclass
class Report:
    rows: list[list[str]] = field(default_factory=list)
    checks: list[tuple[str, bool]] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)

    def check(self, what: str, ok: bool) -> None:
        self.checks.append((what, ok))
        log(f"{'ok  ' if ok else 'FAIL'} {what}")

    @property
    def passed(self) -> bool:
        return all(ok for _, ok in self.checks)

    def table(self) -> str:
        head = ["kind", "requests", "errors", "p50", "p99", "max", "p99 first tenth", "p99 last tenth",
                "drift"]  # fmt: skip
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def analyse(outcomes: Sequence[Outcome], report: Report) -> None:
    n = len(outcomes)
    tenth = max(1, n // 10)
    order = list(DEFAULT_MIX)
    kinds = sorted({o.kind for o in outcomes}, key=lambda k: order.index(k) if k in order else len(order))
    for kind in [*kinds, "all"]:
        mine = [o for o in outcomes if kind in ("all", o.kind)]
        ok = [o.latency_s for o in mine if not o.error]
        first = [o.latency_s for o in mine if o.index < tenth and not o.error]
        last = [o.latency_s for o in mine if o.index >= n - tenth and not o.error]
        drift = p99(last) / p99(first) - 1 if first and last else float("nan")
        report.rows.append([
            kind, str(len(mine)), str(sum(1 for o in mine if o.error)),
            _ms(float(np.percentile(ok, 50))) if ok else "-", _ms(p99(ok)) if ok else "-",
            _ms(max(ok)) if ok else "-",
            _p99_cell(first), _p99_cell(last), "-" if kind == "all" or np.isnan(drift) else f"{drift:+.0%}",
        ])  # fmt: skip
        if kind in CLASSIFY_KINDS:
            report.check(
                f"{kind}: p99 of the last tenth {_ms(p99(last))} <= 1.2 x the first tenth's"
                f" {_ms(p99(first))} ({drift:+.0%})",
                bool(drift <= P99_DRIFT_LIMIT),
            )


def section_title(frontends: int) -> str:
    """Each process layout keeps its own section: `## Soak`, `## Soak (--frontends 2)`."""
    return SECTION if frontends == 1 else f"{SECTION} (--frontends {frontends})"


def write_section(path: Path, text: str, title: str = SECTION) -> None:
    """Replace (or append) the `title` section of BENCHMARKS.md, leaving the rest alone."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def section(report: Report, args: argparse.Namespace, machine: list[str], busy: tuple[list[str], list[str]],
            elapsed_s: float) -> str:  # fmt: skip
    mix = ", ".join(f"{k} {w * 100:g}%" for k, w in DEFAULT_MIX.items())
    layout = f" --frontends {args.frontends}" if args.frontends > 1 else ""
    return "\n".join([
        section_title(args.frontends),
        "",
        f"Written by `make soak` (`python -m bench.soak{layout}`, {elapsed_s / 60:.1f} min):"
        f" {args.requests} requests after a {args.warmup}-request warm-up, concurrency"
        f" {args.concurrency}, one `python -m service serve` with `--workers 1{layout}`; the client"
        " uses `default_channel_options()`."
        f" Mix: {mix}. Verdict: "
        + ("**pass**" if report.passed else "**FAIL**") + ".",
        "",
        *machine,
        "- other processes using CPU (1 s samples) at the start: " + (", ".join(busy[0]) or "none seen")
        + "; at the end: " + (", ".join(busy[1]) or "none seen"),
        "",
        report.table(),
        "",
        *[f"- {fact}" for fact in report.facts],
        *[f"- check {'passed' if ok else '**FAILED**'}: {what}" for what, ok in report.checks],
        "",
    ])  # fmt: skip


# --- main ------------------------------------------------------------------------------------------


def ort_distribution() -> str:
    """Which ONNX Runtime wheel is installed (onnxruntime-gpu runs on its CPU provider here)."""
    from importlib import metadata

    names = [
        f"{d.metadata['Name']} {d.version}"
        for d in metadata.distributions()
        if (d.metadata["Name"] or "").lower().startswith("onnxruntime")
    ]
    return ", ".join(sorted(names)) or "not installed"


def build_repository(root: Path) -> None:
    from export.demo import demo

    log(f"model repository {root} ({', '.join(MODELS)}; reused when verified)")
    demo(root, list(MODELS), out=sys.stderr, progress=None)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--requests", type=int, default=10_000, help="measured requests (default %(default)s)")
    p.add_argument("--warmup", type=int, default=500, help="unmeasured requests first (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--frontends", type=int, default=1, help="serve --frontends N (default %(default)s: in-process)"
    )
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="do not write the Soak section of BENCHMARKS.md")
    p.add_argument("--json", type=Path, help="also write every request's outcome here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    build_repository(args.repository)
    machine = machine_lines()
    total_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    machine.append(
        f"- memory: {total_mem / 2**30:.1f} GiB; no GPU; ONNX Runtime package {ort_distribution()}"
    )
    busy_start = other_cpu_users({os.getpid()})
    report = Report()
    kinds = build_kinds(args.seed)
    rng = random.Random(args.seed)
    # The warm-up runs each kind a few times first (first calls allocate: ORT arenas, torch caches).
    warmup = [k for k in DEFAULT_MIX for _ in range(3)] + plan(DEFAULT_MIX, args.warmup, rng)
    measured = plan(DEFAULT_MIX, args.requests, rng)

    server = Server(args.repository, "--workers", "1", "--frontends", str(args.frontends))
    try:
        log(f"server {server.address} (pid {server.process.pid}); waiting for the gradient worker")
        wait_gradients_serving(server.address)
        providers = sorted(set(re.findall(r"on (\w+ExecutionProvider)", "\n".join(server.lines))))
        report.facts.append(f"ONNX Runtime provider(s): {', '.join(providers) or 'unknown'}")
        log(f"warm-up: {len(warmup)} requests")
        warm = run_load(server.address, kinds, warmup, args.concurrency)
        warm_errors = [o.error for o in warm if o.error]
        before = server_counters(server.metrics_address)
        time.sleep(1.0)
        rss_before, per_before = tree_rss(server.process.pid)
        roles_before = roles(per_before, server.process.pid)
        log(f"after warm-up: RSS {rss_before / 2**20:.0f} MiB ({roles_before})")

        last_log = [time.monotonic()]
        t0 = time.perf_counter()

        def progress(n: int) -> None:
            if time.monotonic() - last_log[0] >= 30 or n == len(measured):
                last_log[0] = time.monotonic()
                rss = tree_rss(server.process.pid)[0]
                rate = n / (time.perf_counter() - t0)
                log(f"{n}/{len(measured)} done ({rate:.1f} req/s), RSS {rss / 2**20:.0f} MiB")

        log(f"measured run: {len(measured)} requests at concurrency {args.concurrency}")
        with RssSampler(server.process.pid) as sampler:
            outcomes = run_load(server.address, kinds, measured, args.concurrency, progress)
        run_s = time.perf_counter() - t0
        time.sleep(1.0)
        rss_after, per_after = tree_rss(server.process.pid)
        roles_after = roles(per_after, server.process.pid)
        after = server_counters(server.metrics_address)
    finally:
        server.stop(timeout=120)
    busy_end = other_cpu_users({os.getpid()})

    analyse(outcomes, report)
    errors = [o for o in outcomes if o.error]
    server_errors = {k: after.get(k, 0) - before.get(k, 0) for k in after if k not in ("ok",)}
    server_errors = {k: v for k, v in server_errors.items() if v}
    growth = rss_after - rss_before
    # The end of the warm-up may be a high point (allocator caches not yet trimmed): growth over the
    # lowest total sampled during the run is checked as well, so a drop cannot hide a later leak.
    low = min(rss_before, sampler.low, rss_after)
    growth_from_low = rss_after - low
    report.facts += [
        f"measured run: {len(outcomes)} requests in {run_s:.0f} s ({len(outcomes) / run_s:.1f} req/s); "
        f"server answered OK {after['ok'] - before['ok']:.0f} RPCs in it",
        f"RSS of the server and its {len(per_after) - 1} child process(es):"
        f" {rss_before / 2**20:.0f} MiB after warm-up, {rss_after / 2**20:.0f} MiB at the end"
        f" (growth {growth / 2**20:+.1f} MiB), lowest {low / 2**20:.0f} MiB, peak"
        f" {max(sampler.peak, rss_after) / 2**20:.0f} MiB ({sampler.samples} samples, 1 s apart);"
        f" after warm-up: {roles_before}; at the end: {roles_after}",
        f"warm-up: {len(warm)} requests, {len(warm_errors)} errors",
    ]
    report.check(f"0 client errors (got {len(errors)}: {[o.error for o in errors[:3]]})", not errors)
    report.check(
        f"0 non-OK answers and restarts on the server (got {server_errors or 'none'})", not server_errors
    )
    report.check(
        f"RSS growth after warm-up {growth / 2**20:+.1f} MiB, and over the lowest point"
        f" {growth_from_low / 2**20:+.1f} MiB, < {RSS_GROWTH_LIMIT_BYTES / 2**20:.0f} MiB",
        max(growth, growth_from_low) < RSS_GROWTH_LIMIT_BYTES,
    )
    elapsed = time.perf_counter() - started
    text = section(report, args, machine, (busy_start, busy_end), elapsed)
    print(text)
    if not args.no_write:
        write_section(args.out, text, section_title(args.frontends))
        log(f"wrote the {section_title(args.frontends)!r} section of {args.out}")
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ for o in outcomes]))
    log(f"{'PASS' if report.passed else 'FAIL'} in {elapsed / 60:.1f} min")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
