"""The `startup` part of `python -m bench` (issue 13): where a server's start-up time and memory go.

Each scenario starts a fresh `python -m service serve` over artifacts/bench_startup_repository (the
six demo models of `python -m export demo`, built on first use: VGG-19 takes about a minute and
2.6 GB of memory once, then it is reused) and measures, from the moment the process is spawned:

* when the `listening` line appears (imports, ports bound), when grpc.health.v1 reports the
  overall service "" SERVING (Check every 50 ms on one channel) and when each `model:<name>` first
  reports SERVING (List in the same poll);
* the server's own account of that time: its `ready in S s` line and, per model, its
  `loaded NAME:V on PROVIDER in S s (warm-up of batch sizes ...: S s)` line (load seconds include
  verification, session creation and warm-up), summed per scenario;
* when the gradient worker(s) report ready (`gradient workers ready in`: they start after SERVING);
* the RSS of the server's process tree (server, gradient worker(s), the multiprocessing resource
  tracker), 2 s after SERVING and 2 s after the gradient workers are ready: idle, everything loaded.

Scenarios: all six models with `--workers 1`; `--models resnet50 --workers 1`; `--models
lenet5,vgg19`, where what counts is how soon lenet5 serves while VGG-19 still loads. Targets are
issue 13's. Sizes are GB = 10^9 bytes (the stricter reading of the targets).
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.__main__ import LISTENING, Child, Report, log, serve_args

DEFAULT_TIMEOUT_S = 300.0
POLL_INTERVAL_S = 0.05
SETTLE_S = 2.0  # "idle": this long after SERVING (and after the gradient workers are ready)
GB = 1e9

READY = re.compile(r"\bready in (?P<seconds>\d+(?:\.\d+)?)s: serving ")
LOADED = re.compile(
    r"\bloaded (?P<name>[^\s:]+):(?P<version>\d+) on (?P<provider>\S+) in (?P<load>\d+(?:\.\d+)?) s"
    # Older servers: "(warm-up of ...)"; now "(verify X s, session Y s, ...; warm-up of ...)".
    r" \((?:[^()]*?[;,] )?warm-up of batch sizes (?P<sizes>[^:]*): (?P<warmup>\d+(?:\.\d+)?) s\)"
)
WORKERS_READY = re.compile(r"\bgradient workers ready in (?P<seconds>\d+(?:\.\d+)?)s: (?P<count>\d+) worker")
WORKERS_FAILED = re.compile(r"\bthe gradient workers failed to start")
NOT_SERVING = re.compile(r"\bnot serving (?P<label>\S+): (?P<reason>.*)")


# --- the server's log ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLoad:
    """One `loaded ...` line: load_s includes verification, session creation and warm_up_s."""

    name: str
    version: int
    provider: str
    load_s: float
    warm_up_s: float
    line: int  # index in the log, to find when it was printed


@dataclass
class StartupLog:
    ready_s: float | None = None  # the server's `ready in` (engine load + start, its own clock)
    loads: list[ModelLoad] = field(default_factory=list)
    workers_ready_s: float | None = None  # `gradient workers ready in` (pool start, its own clock)
    workers_failed: bool = False
    not_serving: list[str] = field(default_factory=list)  # `not serving X: why` lines

    @property
    def load_s(self) -> float:
        return sum(m.load_s for m in self.loads)

    @property
    def warm_up_s(self) -> float:
        return sum(m.warm_up_s for m in self.loads)


def parse_startup_log(lines: Sequence[str]) -> StartupLog:
    """The start-up figures `python -m service serve --log-format text` logs, from its output lines."""
    out = StartupLog()
    for i, line in enumerate(lines):
        if m := LOADED.search(line):
            out.loads.append(
                ModelLoad(
                    m["name"], int(m["version"]), m["provider"], float(m["load"]), float(m["warmup"]), i
                )
            )
        elif (m := READY.search(line)) and out.ready_s is None:
            out.ready_s = float(m["seconds"])
        elif (m := WORKERS_READY.search(line)) and out.workers_ready_s is None:
            out.workers_ready_s = float(m["seconds"])
        elif WORKERS_FAILED.search(line):
            out.workers_failed = True
        elif m := NOT_SERVING.search(line):
            out.not_serving.append(f"{m['label']}: {m['reason']}")
    return out


# --- one server start --------------------------------------------------------------------------------


class StampedChild(Child):
    """A Child that also records when (seconds since it was spawned) each output line arrived."""

    def __init__(self, args: list[str]) -> None:
        self.stamps: list[float] = []
        self.t0 = time.monotonic()
        super().__init__(args)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self.stamps.append(time.monotonic() - self.t0)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def seconds_at(self, pattern: re.Pattern[str]) -> float | None:
        with self._cond:
            for line, stamp in zip(self.lines, self.stamps, strict=False):
                if pattern.search(line):
                    return stamp
        return None

    def tail(self, n: int = 30) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    flags: tuple[str, ...]
    models: tuple[str, ...]  # the model:<name> health services to wait for
    serving_target_s: float | None = None  # process start -> "" SERVING
    first_model: str | None = None  # a model that should serve before the others are loaded ...
    first_model_target_s: float | None = None  # ... within this many seconds of process start
    rss_target_bytes: float | None = None


@dataclass
class Run:
    """One start of one scenario. Seconds are since the process was spawned."""

    listening_s: float
    serving_s: float  # health "" SERVING
    model_serving_s: dict[str, float]  # model name -> first SERVING of model:<name>
    model_loaded_s: dict[str, float]  # model name -> when its `loaded` line was printed
    workers_ready_at_s: float | None  # when `gradient workers ready` was printed
    rss_at_serving: dict[str, int]  # role -> bytes, SETTLE_S after SERVING
    rss_idle: dict[str, int]  # role -> bytes, SETTLE_S after the gradient workers are ready
    log: StartupLog


def rss_by_role(root: int) -> dict[str, int]:
    """RSS of `root`'s process tree split into server (root), gradient worker(s) (spawned
    children) and other (the multiprocessing resource tracker, anything else)."""
    from bench.soak import tree_rss

    _, per = tree_rss(root)
    out = {"server": 0, "gradient worker": 0, "other": 0}
    for pid, rss in per.items():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            cmd = ""
        role = "server" if pid == root else "gradient worker" if "spawn_main" in cmd else "other"
        out[role] += rss
    return out


def _poll_health(
    child: StampedChild, address: str, models: Sequence[str], deadline: float
) -> dict[str, float]:
    """Seconds since spawn at which "" and each `model:<name>` first answered SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    serving = health_pb2.HealthCheckResponse.SERVING
    wanted = [f"model:{m}" for m in models]
    seen: dict[str, float] = {}
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            tick = time.monotonic()
            if tick > deadline:
                raise TimeoutError(f"health not SERVING within the scenario timeout:\n{child.tail()}")
            if child.process.poll() is not None:
                raise RuntimeError(f"server exited ({child.process.returncode}):\n{child.tail()}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == serving:
                    seen.setdefault("", time.monotonic() - child.t0)
                listed = stub.List(health_pb2.HealthListRequest(), timeout=1).statuses
                for name, status in listed.items():
                    if status.status == serving:
                        seen.setdefault(name, time.monotonic() - child.t0)
            except grpc.RpcError:
                pass  # not accepting yet, or busy: the next tick asks again
            if "" in seen:
                # A model that failed to load never serves: give the rest a second, no more.
                if all(w in seen for w in wanted) or time.monotonic() - child.t0 > seen[""] + 1.0:
                    return seen
            time.sleep(max(0.0, POLL_INTERVAL_S - (time.monotonic() - tick)))


def _sleep_until(child: StampedChild, at_s: float) -> None:
    time.sleep(max(0.0, at_s - (time.monotonic() - child.t0)))


def run_scenario(repository: Path, scenario: Scenario, timeout_s: float = DEFAULT_TIMEOUT_S) -> Run:
    """Start the server, measure, always stop it."""
    child = StampedChild(serve_args(repository, *scenario.flags))
    deadline = child.t0 + timeout_s
    try:
        address = child.wait_for(LISTENING.pattern, timeout_s)["grpc"]
        listening_s = child.seconds_at(LISTENING) or 0.0
        seen = _poll_health(child, address, scenario.models, deadline)
        serving_s = seen[""]
        _sleep_until(child, serving_s + SETTLE_S)
        rss_at_serving = rss_by_role(child.process.pid)
        workers_line = re.compile(f"{WORKERS_READY.pattern}|{WORKERS_FAILED.pattern}")
        child.wait_for(workers_line.pattern, max(1.0, deadline - time.monotonic()))
        workers_at = child.seconds_at(WORKERS_READY)
        _sleep_until(child, (workers_at or serving_s) + SETTLE_S)
        rss_idle = rss_by_role(child.process.pid)
    finally:
        child.stop()
    parsed = parse_startup_log(child.lines)
    return Run(
        listening_s=listening_s,
        serving_s=serving_s,
        model_serving_s={k.removeprefix("model:"): v for k, v in seen.items() if k.startswith("model:")},
        model_loaded_s={m.name: child.stamps[m.line] for m in parsed.loads},
        workers_ready_at_s=workers_at,
        rss_at_serving=rss_at_serving,
        rss_idle=rss_idle,
        log=parsed,
    )


# --- the part ------------------------------------------------------------------------------------------


def scenarios(all_models: Sequence[str]) -> list[Scenario]:
    return [
        Scenario(
            "all", f"startup all {len(all_models)} models (--workers 1)", ("--workers", "1"),
            tuple(all_models), serving_target_s=10.0, rss_target_bytes=1.5 * GB,
        ),
        Scenario(
            "resnet50", "startup resnet50 alone (--workers 1)", ("--models", "resnet50", "--workers", "1"),
            ("resnet50",), serving_target_s=4.0, rss_target_bytes=0.6 * GB,
        ),
        Scenario(
            "lenet5+vgg19", "startup --models lenet5,vgg19", ("--models", "lenet5,vgg19"),
            ("lenet5", "vgg19"), first_model="lenet5", first_model_target_s=2.0,
        ),
    ]  # fmt: skip


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _median_dict(dicts: Sequence[dict[str, Any]]) -> dict[str, float]:
    keys = dict.fromkeys(k for d in dicts for k in d)
    return {k: statistics.median(d[k] for d in dicts if k in d) for k in keys}


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _gb(value: float) -> str:
    return f"{value / GB:.2f} GB"


def _roles(rss: dict[str, float]) -> str:
    return " + ".join(f"{role} {_gb(b)}" for role, b in rss.items() if b)


def report_runs(report: Report, scenario: Scenario, runs: Sequence[Run]) -> None:
    """Rows for one scenario: medians over `runs` (one start each)."""
    section = scenario.title + (f" (median of {len(runs)})" if len(runs) > 1 else "")
    add = report.add
    serving = statistics.median(r.serving_s for r in runs)
    listening = statistics.median(r.listening_s for r in runs)
    ready = _median([r.log.ready_s for r in runs])
    target = scenario.serving_target_s
    add(section, 'process start -> health "" SERVING', _s(serving),
        f"listening at {_s(listening)}; server's `ready in` {_s(ready)}",
        f"{serving / target:.2f} of target" if target else "",
        f"<= {target:g} s (issue 13)" if target else "report",
        serving <= target if target else None)  # fmt: skip

    model_serving = _median_dict([r.model_serving_s for r in runs])
    model_loaded = _median_dict([r.model_loaded_s for r in runs])
    missing = [m for m in scenario.models if m not in model_serving]
    add(section, "model:<name> first SERVING",
        ", ".join(f"{m} {model_serving[m]:.2f} s" for m in scenario.models if m in model_serving)
        + (f"; never: {', '.join(missing)}" if missing else ""),
        "`loaded` line printed at " + ", ".join(f"{m} {s:.2f} s" for m, s in model_loaded.items()),
        ok=False if missing else None)  # fmt: skip
    if scenario.first_model is not None and scenario.first_model_target_s is not None:
        first = model_serving.get(scenario.first_model)
        others = [m for m in scenario.models if m != scenario.first_model]
        add(section, f"model:{scenario.first_model} SERVING while {', '.join(others)} loads", _s(first),
            f"its `loaded` line at {_s(model_loaded.get(scenario.first_model))}",
            "" if first is None else f"{first / scenario.first_model_target_s:.2f} of target",
            f"<= {scenario.first_model_target_s:g} s (issue 13)",
            first is not None and first <= scenario.first_model_target_s)  # fmt: skip

    loads = _median([r.log.load_s for r in runs])
    warm = _median([r.log.warm_up_s for r in runs])
    per_model = _median_dict([{m.name: m.load_s for m in r.log.loads} for r in runs])
    per_warm = _median_dict([{m.name: m.warm_up_s for m in r.log.loads} for r in runs])
    providers = sorted({m.provider for r in runs for m in r.log.loads})
    add(section, "`loaded` lines: sum of load s (of which warm-up)", f"{_s(loads)} ({_s(warm)})",
        "; ".join(f"{m} {per_model[m]:.2f} ({per_warm[m]:.2f})" for m in per_model),
        f"{warm / loads:.0%} warm-up" if loads and warm is not None else "",
        f"report ({', '.join(providers)})")  # fmt: skip
    workers = _median([r.workers_ready_at_s for r in runs])
    workers_own = _median([r.log.workers_ready_s for r in runs])
    add(section, "gradient workers ready (after SERVING)", _s(workers),
        f"pool's own `ready in` {_s(workers_own)}",
        ok=False if any(r.log.workers_failed for r in runs) else None)  # fmt: skip

    at_serving = _median_dict([r.rss_at_serving for r in runs])
    idle = _median_dict([r.rss_idle for r in runs])
    add(
        section,
        f"RSS of the process tree {SETTLE_S:g} s after SERVING",
        _gb(sum(at_serving.values())),
        _roles(at_serving),
        ratio="workers still loading" if workers and workers > serving + SETTLE_S else "",
    )
    total = sum(idle.values())
    rss_target = scenario.rss_target_bytes
    add(section, f"idle RSS of the process tree ({SETTLE_S:g} s after the workers are ready)", _gb(total),
        _roles(idle), f"{total / rss_target:.2f} of target" if rss_target else "",
        f"<= {_gb(rss_target)} (issue 13)" if rss_target else "report",
        total <= rss_target if rss_target else None)  # fmt: skip
    failed = sorted({line for r in runs for line in r.log.not_serving})
    if failed:
        report.notes.append(f"{scenario.title}: models not loaded: {'; '.join(failed)}")


def part_startup(
    repository: Path, report: Report, *, runs: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Build or reuse `repository` (every demo model), run each scenario `runs` times, add the rows."""
    from export.demo import DEMO_MODELS, demo

    log(f"startup: model repository {repository} ({', '.join(DEMO_MODELS)}; reused when verified)")
    demo(repository, list(DEMO_MODELS), out=sys.stderr, progress=None)
    raw: dict[str, Any] = {}
    for scenario in scenarios(DEMO_MODELS):
        done: list[Run] = []
        try:
            for i in range(runs):
                log(f"startup: {scenario.title}, run {i + 1}/{runs}")
                done.append(run_scenario(repository, scenario, timeout_s))
        except Exception as exc:  # noqa: BLE001 - one failed scenario must not lose the others
            lines = str(exc).splitlines() or [""]
            # The first line says what failed; the server's last ERROR line (in the tail) says why.
            why = next((line for line in reversed(lines) if " ERROR " in line), "")
            summary = f"{type(exc).__name__}: {lines[0]}" + (f" {why.split(' ERROR ', 1)[1]}" if why else "")
            report.add(scenario.title, "error", summary[:300], ok=False)
            report.notes.append(f"{scenario.title} failed: {exc}"[:2000])
        if done:
            report_runs(report, scenario, done)
            raw[scenario.key] = [
                {k: v for k, v in r.__dict__.items() if k != "log"}
                | {"ready_s": r.log.ready_s, "loads": [m.__dict__ for m in r.log.loads]}
                for r in done
            ]
    report.raw["startup"] = raw
