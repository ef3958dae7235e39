"""`cnnserve score`: classify a whole directory (or glob, or list of files) over ClassifyStream and
write one row per image to a JSONL or CSV file; resumable, shardable, retrying.

    cnnserve score /data/input --address=cnnserve:8500 --model=resnet50 \\
        --shard=3/8 --output=/data/output/scores-3-of-8.jsonl

Inputs: directories (recursive, files ending in .jpg/.jpeg/.png/.webp, any case), globs (`**`
allowed), plain files, and list files (`@list.txt` or `--list FILE`, one path a line, `#` comments).
Every path is made absolute (relative ones, also in list files, against the current directory) and
normalised (no `.`, `..` or doubled slashes; symlinks are kept as named, since a link's target may
change between runs, as Kubernetes volume links do), so the same image named two ways is one path.
The paths are de-duplicated and sorted; `--shard i/N` (0-based) keeps the paths whose position in
that sorted listing is i modulo N, so N shards partition the set exactly.

Output rows (`--format`, else from the extension: .csv is CSV, anything else JSONL):
  JSONL: {"path", "model", "version", "classes": [{"index", "label", "probability"}...], "error"}
  CSV:   path, model, version, index, label, probability (the top-1), classes (the top-k as JSON),
         error
`path` is the absolute path (above). `error` is "" on success, else "CODE: message" (a gRPC
status code name); an error row carries the model and version asked for (0: the latest), a
successful one the version that answered. Each row is written as its answer arrives, flushed
within 20 ms, fsync'ed every 2 s and at the end (SIGTERM included). No row, no file: a server that
cannot be reached leaves no empty output behind.

Resuming: when the output exists, its rows are read first (a partial last line, left by a killed
run, is cut off) and every path that already has a row is skipped, so rerunning the same command
finishes the work and never duplicates a row. One output holds one model's rows: an output with
rows of another model, or of another version when --version names one, is refused (exit 2)
before anything is changed. Rows of older versions of this command name paths as they were typed;
relative ones are read against the current directory. `--retry-failed` also scores again the
paths whose row is an error: those rows are removed first (the file is rewritten atomically).

Retries: items answered UNAVAILABLE or RESOURCE_EXHAUSTED are sent again after an exponential
backoff with jitter (0.1 s doubling up to 5 s, times a random 0.5..1), up to --max-attempts in all.
The channel uses the client's default options (service.client.default_channel_options: round_robin
over every address the target resolves to, gRPC retries of UNAVAILABLE/CANCELLED for unary calls
only). ClassifyStream is deliberately outside that gRPC policy, so gRPC never retries underneath
the scorer and the two never multiply. When the stream breaks (or the server ends it: a replica
draining) it is reopened, with the same backoff, and every item not yet answered is sent again;
the run gives up after --max-attempts stream failures in a row with no answer in between.
--deadline is per image: an image not answered in time gets a DEADLINE_EXCEEDED row (a late answer
is ignored).

SIGTERM or SIGINT stops the run: the rows written so far are flushed and valid, the summary is
printed, and rerunning the same command resumes.

Exit status: 0 when every path of the shard has a successful row, 1 when any has an error row
(from this run or an earlier one), 2 on usage errors (a refused output included) or when the
server cannot be reached (the stream keeps failing), 128 + the signal's number when stopped
(143: SIGTERM, 130: SIGINT), 141 when standard output is closed early (`| head`).
"""

from __future__ import annotations

import argparse
import csv
import glob
import heapq
import io
import itertools
import json
import os
import queue
import random
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
CSV_FIELDS = ["path", "model", "version", "index", "label", "probability", "classes", "error"]
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
FSYNC_INTERVAL_S = 2.0
FLUSH_INTERVAL_S = 0.02
_GLOB_CHARS = frozenset("*?[")


# --- inputs ------------------------------------------------------------------------------------


def _read_list(list_file: str) -> list[str]:
    text = sys.stdin.read() if list_file == "-" else Path(list_file).read_text()
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def _directory(directory: str) -> Iterator[str]:
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(root, name)


def normalise(path: str) -> str:
    """The key a path is scored and resumed under: absolute, normalised, symlinks kept."""
    return os.path.abspath(path)


def collect_paths(inputs: Iterable[str], list_files: Iterable[str] = ()) -> list[str]:
    """Every image path named by `inputs` (directories, globs, files, @list files) and the list
    files, normalised, de-duplicated and sorted. A file named explicitly is kept whatever its
    extension (the server will judge it); a directory or glob contributes files only. Raises
    FileNotFoundError for an input that is none of these."""
    paths: set[str] = set()
    pending = [*inputs, *(f"@{f}" for f in list_files)]
    for item in pending:
        if item.startswith("@"):
            paths.update(_read_list(item[1:]))
        elif os.path.isdir(item):
            paths.update(_directory(item))
        elif os.path.isfile(item):
            paths.add(item)
        elif _GLOB_CHARS & set(item):
            for match in glob.glob(item, recursive=True):
                if os.path.isdir(match):
                    paths.update(_directory(match))
                elif os.path.isfile(match):
                    paths.add(match)
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    return sorted({normalise(p) for p in paths})


def parse_shard(text: str) -> tuple[int, int]:
    """ "i/N" -> (i, N), 0 <= i < N."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"shard must be INDEX/COUNT, e.g. 0/8 (got {text!r})") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index must be in 0..COUNT-1 (got {text!r})")
    return index, count


def shard_paths(paths: Sequence[str], index: int, count: int) -> list[str]:
    """The paths whose position in the sorted listing is `index` modulo `count`."""
    return list(sorted(paths)[index::count])


# --- output ------------------------------------------------------------------------------------


def output_format(output: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    return "csv" if output.lower().endswith(".csv") else "jsonl"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def make_row(
    path: str, *, model: str = "", version: int = 0, classes: Sequence[Any] = (), error: str = ""
) -> dict[str, Any]:
    return {
        "path": path,
        "model": model,
        "version": version,
        "classes": [
            {"index": c.index, "label": c.label, "probability": round(float(c.probability), 6)}
            for c in classes
        ],
        "error": _one_line(error),
    }


def format_row(row: dict[str, Any], fmt: str) -> str:
    """One row as one line (newline included)."""
    if fmt == "jsonl":
        return json.dumps(row, ensure_ascii=False) + "\n"
    top = row["classes"][0] if row["classes"] else {"index": "", "label": "", "probability": ""}
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(
        [
            row["path"], row["model"], row["version"], top["index"], top["label"], top["probability"],
            json.dumps(row["classes"], ensure_ascii=False) if row["classes"] else "", row["error"],
        ]
    )  # fmt: skip
    return buffer.getvalue()


def csv_header() -> str:
    return ",".join(CSV_FIELDS) + "\n"


@dataclass
class Existing:
    """What an earlier run left in the output file (paths normalised)."""

    ok: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    truncated_bytes: int = 0  # the partial last line cut off
    relative: int = 0  # rows naming a relative path (written by an older `cnnserve score`)
    duplicated: int = 0  # paths with more than one row (an older `cnnserve score` typed them twice)


@dataclass(frozen=True)
class _Row:
    path: str
    model: str
    version: int
    error: str
    line: str


def _parse_lines(text: str, fmt: str, name: str) -> list[_Row]:
    """Each complete row."""
    rows: list[_Row] = []
    lines = text.splitlines(keepends=True)
    if fmt == "csv":
        if not lines:
            return rows
        if lines[0] != csv_header():
            raise ValueError(f"{name}: not a `cnnserve score` CSV file (header {lines[0].strip()!r})")
        lines = lines[1:]
    for number, line in enumerate(lines, 2 if fmt == "csv" else 1):
        if not line.strip():
            continue
        try:
            if fmt == "jsonl":
                record = json.loads(line)
            else:
                (cells,) = list(csv.reader([line]))
                record = dict(zip(CSV_FIELDS, cells, strict=True))
            row = _Row(
                str(record["path"]),
                str(record.get("model") or ""),
                int(record.get("version") or 0),
                str(record.get("error") or ""),
                line,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{name}:{number}: unreadable row ({exc}); fix or move the file") from None
        rows.append(row)
    return rows


def _mismatch(rows: Sequence[_Row], model: str, version: int) -> str | None:
    """Why rows cannot be resumed for `model` (and `version`, when not 0), or None. A row with no
    model is an error row of an older `cnnserve score`, which did not record it: it matches any.
    An error row's version 0 (it asked for the latest) matches any version."""
    others = sorted({r.model for r in rows if r.model and r.model != model})
    if others:
        return f"it holds rows of model {', '.join(others)}, and this run asks for {model}"
    if version:
        versions = sorted({r.version for r in rows if r.model and r.version not in (0, version)})
        if versions:
            listed = ", ".join(map(str, versions))
            return f"it holds rows of {model} version {listed}, and this run asks for version {version}"
    return None


def read_existing(
    output: str, fmt: str, *, drop_failed: bool = False, model: str | None = None, version: int = 0
) -> Existing:
    """Read (and repair) an existing output: cut a partial last line; with `drop_failed`, rewrite
    the file without its error rows. A missing file is an empty result. With `model`, an output
    holding rows of another model (or of another version, when `version` is not 0) is refused
    with ValueError before anything is changed."""
    existing = Existing()
    try:
        with open(output, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return existing
    complete = data[: data.rfind(b"\n") + 1]
    existing.truncated_bytes = len(data) - len(complete)
    rows = _parse_lines(complete.decode("utf-8"), fmt, output)
    problem = None if model is None else _mismatch(rows, model, version)
    if problem is not None:
        raise ValueError(
            f"{output}: {problem}; one output holds one model's rows: give another --output "
            "(or the model and version of its rows to resume it)"
        )
    counts = Counter(normalise(row.path) for row in rows)
    existing.duplicated = sum(count > 1 for count in counts.values())
    for row in rows:
        path = normalise(row.path)
        existing.relative += not os.path.isabs(row.path)
        if row.error:
            existing.failed.add(path)
        else:
            existing.ok.add(path)
            existing.failed.discard(path)
    existing.failed -= existing.ok
    if drop_failed and existing.failed:
        kept = [row.line for row in rows if not row.error]
        tmp = f"{output}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if fmt == "csv":
                f.write(csv_header())
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
        existing.failed = set()
    elif existing.truncated_bytes:
        with open(output, "r+b") as f:
            f.truncate(len(complete))
            os.fsync(f.fileno())
    return existing


class RowWriter:
    """Appends rows, flushing each; fsync every FSYNC_INTERVAL_S and on close. The file is opened
    (created, a CSV's header written) with the first row, so a run that never got an answer leaves
    no empty output behind."""

    def __init__(self, output: str, fmt: str) -> None:
        self.output = output
        self.fmt = fmt
        self._stdout = output == "-"
        self._file: TextIO | None = None
        self._synced = self._flushed = time.monotonic()
        self._dirty = False

    def _open(self) -> TextIO:
        if self._stdout:
            file = sys.stdout
            new = True
        else:
            new = not os.path.exists(self.output) or os.path.getsize(self.output) == 0
            os.makedirs(os.path.dirname(os.path.abspath(self.output)), exist_ok=True)
            file = open(self.output, "a", encoding="utf-8", newline="")  # noqa: SIM115
        if new and self.fmt == "csv":
            file.write(csv_header())
        return file

    def write(self, row: dict[str, Any]) -> None:
        """Buffered: the scorer calls flush() whenever it has no answer waiting, and the buffer
        goes to the file at most FLUSH_INTERVAL_S later (rows lost to a SIGKILL in between are
        scored again by the next run)."""
        if self._file is None:
            self._file = self._open()
        self._file.write(format_row(row, self.fmt))
        self._dirty = True

    def flush(self) -> float:
        """Flush unless flushed less than FLUSH_INTERVAL_S ago; the seconds until it is due (0: done)."""
        now = time.monotonic()
        if not self._dirty or self._file is None:
            return 0.0
        if now - self._flushed < FLUSH_INTERVAL_S:
            return self._flushed + FLUSH_INTERVAL_S - now
        self._flushed = now
        self._dirty = False
        self._file.flush()
        if not self._stdout and now - self._synced >= FSYNC_INTERVAL_S:
            self.sync()
        return 0.0

    def sync(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        if not self._stdout:
            os.fsync(self._file.fileno())
        self._synced = time.monotonic()

    def close(self, *, create: bool = True) -> None:
        """Sync and close. `create`: open the output even with no row written, so a finished run
        over nothing new still leaves its output (a CSV with its header)."""
        if self._file is None and create:
            self._file = self._open()
        if self._file is None:
            return
        self.sync()
        if not self._stdout:
            self._file.close()


# --- progress ----------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A bar redrawn on a TTY (at most 10 times a second), else one line every `interval_s`."""

    def __init__(self, total: int, *, quiet: bool, interval_s: float, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.interval_s = 0.1 if self.tty else interval_s
        self.start = time.monotonic()
        self._last = self.start

    def update(self, done: int, failed: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.quiet or (not force and now - self._last < self.interval_s):
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = _duration((self.total - done) / rate) if rate > 0 else "?"
        share = done / self.total if self.total else 1.0
        text = f"{done}/{self.total} {share:4.0%} {rate:.1f} img/s ETA {eta} failed {failed}"
        if self.tty:
            width = 30
            filled = int(width * share)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
        else:
            self.stream.write(f"score: {text}\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()


# --- the scorer --------------------------------------------------------------------------------


@dataclass
class Item:
    path: str
    attempts: int = 0  # times sent
    sent_at: float = 0.0
    key: str = ""  # id of the attempt in flight


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0
    scored: int = 0
    failed: int = 0
    earlier_failed: int = 0
    retries: int = 0
    reconnects: int = 0
    elapsed_s: float = 0.0

    @property
    def rate(self) -> float:
        return (self.scored + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        text = (
            f"scored {self.scored}, failed {self.failed}, skipped {self.skipped} (already in the output), "
            f"{self.rate:.1f} img/s over {self.elapsed_s:.1f} s"
        )
        if self.retries or self.reconnects:
            text += f"; {self.retries} retries, {self.reconnects} reconnects"
        if self.earlier_failed:
            text += f"; {self.earlier_failed} failed in an earlier run (--retry-failed to retry)"
        return text


def read_file(path: str) -> bytes:
    """The file's bytes, with raw os calls: about half the CPU of open().read() per small image,
    which on a machine shared with the server is throughput."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        chunks = [os.read(fd, max(size, 1) + 1)]
        while chunks[-1]:  # the file grew, or st_size was not its length (e.g. a pipe): read on
            chunks.append(os.read(fd, 1 << 20))
        return b"".join(chunks)
    finally:
        os.close(fd)


def backoff_s(attempt: int, rng: random.Random) -> float:
    """Delay before attempt `attempt + 1` (attempt >= 1): exponential, capped, jittered."""
    return float(min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (attempt - 1)) * rng.uniform(0.5, 1.0))


class _Stream:
    """One ClassifyStream call: requests fed through a queue, responses read by a thread into the
    scorer's event queue, tagged with this stream's generation."""

    def __init__(self, stub: Any, generation: int, events: queue.SimpleQueue[tuple[Any, ...]]) -> None:
        # Lists of requests: the scorer hands over a refill of the window at once (one wake-up of
        # gRPC's sending thread per refill, not one per image).
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.call = stub.ClassifyStream(itertools.chain.from_iterable(iter(self.requests.get, None)))
        self.generation = generation
        self._thread = threading.Thread(target=self._read, args=(events,), daemon=True, name="score-recv")
        self._thread.start()

    def _read(self, events: queue.SimpleQueue[tuple[Any, ...]]) -> None:
        try:
            for response in self.call:
                events.put(("response", self.generation, response))
            events.put(("end", self.generation, None))
        except grpc.RpcError as exc:
            events.put(("broken", self.generation, exc))

    def close(self, cancel: bool = True) -> None:
        self.requests.put(None)
        if cancel:
            self.call.cancel()


class Scorer:
    def __init__(
        self,
        stub: Any,
        *,
        model: str,
        version: int,
        top_k: int,
        window: int,
        max_attempts: int,
        deadline_s: float | None,
        writer: RowWriter,
        progress: Progress,
        rng: random.Random | None = None,
    ) -> None:
        from service._proto.cnnserve.v1 import inference_pb2 as pb

        self.pb = pb
        self.stub = stub
        self.model, self.version, self.top_k = model, version, top_k
        self.window = max(1, window)
        self.refill = max(1, self.window // 4)
        self.max_attempts = max(1, max_attempts)
        self.deadline_s = deadline_s
        self.writer = writer
        self.progress = progress
        self.rng = rng or random.Random()
        self.summary = Summary()
        # Why the run gave up, when it did: the stream kept failing (code, details).
        self.fatal: tuple[grpc.StatusCode, str] | None = None
        self.stopped_by: int | None = None  # the signal that stopped the run
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    def stop(self, signum: int) -> None:
        """Stop the run at once, keeping every row written; safe in a signal handler
        (SimpleQueue.put is reentrant), and it wakes the scorer's wait."""
        self.stopped_by = signum
        self._events.put(("stop", None, None))

    def _finish(self, item: Item, row: dict[str, Any]) -> None:
        self.writer.write(row)
        if row["error"]:
            self.summary.failed += 1
        else:
            self.summary.scored += 1

    def _fail(self, item: Item, error: str) -> None:
        # The model and version asked for: the row says what it failed to be scored with.
        self._finish(item, make_row(item.path, model=self.model, version=self.version, error=error))

    def run(self, paths: Sequence[str]) -> Summary:
        start = time.monotonic()
        pending: deque[Item] = deque(Item(p) for p in paths)
        delayed: list[tuple[float, int, Item]] = []  # (due, tiebreak, item)
        inflight: dict[str, Item] = {}
        events = self._events
        generation = 0
        stream: _Stream | None = None
        reconnect_failures = 0  # consecutive stream failures without an answer in between
        reconnect_at = 0.0
        counter = 0
        next_deadline_check = 0.0
        self.progress.update(0, 0, force=True)

        def requeue_inflight() -> None:
            for item in sorted(inflight.values(), key=lambda i: i.path, reverse=True):
                pending.appendleft(item)
            inflight.clear()

        while (pending or delayed or inflight) and self.stopped_by is None:
            now = time.monotonic()
            if stream is None:
                if now < reconnect_at:
                    time.sleep(min(reconnect_at - now, 0.5))
                    continue
                generation += 1
                stream = _Stream(self.stub, generation, events)
            # Fill the window: due retries first, then new paths; in refills of at least a quarter
            # window, so that reading files and waking the sending thread happen in batches.
            batch: list[Any] = []
            refill = len(inflight) <= self.window - self.refill or events.empty()
            while refill and len(inflight) < self.window:
                if delayed and delayed[0][0] <= now:
                    item = heapq.heappop(delayed)[2]
                elif pending:
                    item = pending.popleft()
                else:
                    break
                try:
                    data = read_file(item.path)
                except OSError as exc:
                    code = {FileNotFoundError: "NOT_FOUND", PermissionError: "PERMISSION_DENIED"}.get(
                        type(exc), "UNKNOWN"
                    )
                    self._fail(item, f"{code}: {exc.strerror or exc}")
                    continue
                item.attempts += 1
                counter += 1
                item.key = f"{counter}"
                item.sent_at = time.monotonic()
                inflight[item.key] = item
                batch.append(
                    self.pb.ClassifyStreamRequest(
                        id=item.key,
                        request=self.pb.ClassifyRequest(
                            model=self.model,
                            version=self.version,
                            top_k=self.top_k,
                            image=self.pb.ImageInput(encoded=data),
                        ),
                    )
                )
            if batch:
                stream.requests.put(batch)
            # Wait for an answer, the next due retry, a per-image deadline or a progress tick.
            if not inflight and not pending and not delayed:
                break
            try:
                kind, gen, payload = events.get_nowait()
            except queue.Empty:
                flush_due = self.writer.flush()  # nothing waiting: write the rows out now
                self.progress.update(self.summary.scored + self.summary.failed, self.summary.failed)
                wake = now + (0.25 if self.deadline_s is not None else 1.0)
                if flush_due:
                    wake = min(wake, time.monotonic() + flush_due)
                if delayed:
                    wake = min(wake, delayed[0][0])
                try:
                    kind, gen, payload = events.get(timeout=max(0.0, wake - time.monotonic()))
                except queue.Empty:
                    kind, gen, payload = "tick", generation, None
            if kind == "stop":
                break
            if gen != generation:
                continue  # an event of a stream already given up
            if kind == "response":
                reconnect_failures = 0
                if payload.id not in inflight:
                    continue  # a late answer for an attempt already given up
                item = inflight.pop(payload.id)
                if payload.WhichOneof("outcome") == "result":
                    r = payload.result
                    self._finish(
                        item, make_row(item.path, model=r.model, version=r.version, classes=r.classes)
                    )
                    continue
                code = _status_code(payload.error.code)
                if code in RETRYABLE and item.attempts < self.max_attempts:
                    self.summary.retries += 1
                    due = time.monotonic() + backoff_s(item.attempts, self.rng)
                    counter += 1
                    heapq.heappush(delayed, (due, counter, item))
                    continue
                self._fail(item, f"{code.name}: {payload.error.message}")
            elif kind in ("broken", "end"):
                # The stream is gone (or the server ended it early): reopen and re-send.
                code = payload.code() if kind == "broken" else grpc.StatusCode.UNAVAILABLE
                details = (payload.details() or "") if kind == "broken" else "the server ended the stream"
                if kind == "end" and not inflight:
                    stream = None  # a clean end with nothing outstanding: a new stream when needed
                    continue
                stream.close()
                stream = None
                requeue_inflight()
                reconnect_failures += 1
                retryable = code in RETRYABLE or code in (
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.INTERNAL,
                )
                if not retryable or reconnect_failures >= self.max_attempts:
                    self.fatal = (code, details)
                    break
                self.summary.reconnects += 1
                reconnect_at = time.monotonic() + backoff_s(reconnect_failures, self.rng)
            # Per-image deadlines, checked a few times a second.
            if self.deadline_s is not None and time.monotonic() >= next_deadline_check:
                now = time.monotonic()
                next_deadline_check = now + 0.25
                for key, item in list(inflight.items()):
                    if now - item.sent_at >= self.deadline_s:
                        del inflight[key]
                        self._fail(item, f"DEADLINE_EXCEEDED: no answer within {self.deadline_s:g} s")
            self.progress.update(self.summary.scored + self.summary.failed, self.summary.failed)
        if stream is not None:
            stream.close()
        self.summary.elapsed_s = time.monotonic() - start
        self.progress.update(self.summary.scored + self.summary.failed, self.summary.failed, force=True)
        self.progress.finish()
        return self.summary


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


# --- the command -------------------------------------------------------------------------------


def _stop_on(signals: Sequence[int], scorer: Scorer) -> dict[int, Any]:
    """Route `signals` to scorer.stop (a Job's pod is stopped with SIGTERM, a terminal with ^C);
    the previous handlers, to restore. Signals are only the main thread's to handle."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, lambda n, _: scorer.stop(n)) for signum in signals}


def _note(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(f"cnnserve score: {text}", file=sys.stderr)


def score_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
    from service.client import connection_hint, default_channel_options, not_connected

    try:
        shard = parse_shard(args.shard) if args.shard else (0, 1)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.inputs and not args.list:
        parser.error("give at least one directory, glob, file or @list (or --list FILE)")
    try:
        paths = shard_paths(collect_paths(args.inputs, args.list), *shard)
    except OSError as exc:
        print(f"cnnserve score: {exc}", file=sys.stderr)
        return 2
    fmt = output_format(args.output, args.format)
    existing = Existing()
    if args.output != "-":
        try:
            existing = read_existing(
                args.output, fmt, drop_failed=args.retry_failed, model=args.model, version=args.version
            )
        except ValueError as exc:
            print(f"cnnserve score: {exc}", file=sys.stderr)
            return 2
        if existing.truncated_bytes:
            _note(args, f"cut a partial last row ({existing.truncated_bytes} bytes) of {args.output}")
        if existing.relative:
            _note(
                args,
                f"{existing.relative} rows of {args.output} name relative paths (an older cnnserve score "
                "wrote paths as typed): read against the current directory",
            )
        if existing.duplicated:
            _note(
                args, f"{args.output} holds several rows for {existing.duplicated} path(s); each counts once"
            )
    done = existing.ok | existing.failed
    todo = [p for p in paths if p not in done]
    writer = RowWriter(args.output, fmt)
    progress = Progress(len(todo), quiet=args.quiet, interval_s=args.progress_interval)
    channel = grpc.insecure_channel(args.address, options=default_channel_options())
    scorer = Scorer(
        pb_grpc.InferenceStub(channel),  # type: ignore[no-untyped-call]
        model=args.model,
        version=args.version,
        top_k=args.top_k,
        window=args.window,
        max_attempts=args.max_attempts,
        deadline_s=args.deadline,
        writer=writer,
        progress=progress,
    )
    previous = _stop_on((signal.SIGTERM, signal.SIGINT), scorer)
    finished = False
    try:
        summary = scorer.run(todo)
        finished = scorer.fatal is None and scorer.stopped_by is None
    finally:
        try:
            writer.close(create=finished)
        finally:
            channel.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    summary.total = len(paths)
    summary.skipped = len(paths) - len(todo)
    summary.earlier_failed = len(existing.failed & set(paths))
    print(f"cnnserve score: {summary.line()}", file=sys.stderr)
    if scorer.stopped_by is not None:
        name = signal.Signals(scorer.stopped_by).name
        resume = "" if args.output == "-" else "; rerun the same command to resume"
        print(f"cnnserve score: stopped by {name}{resume}", file=sys.stderr)
        return 128 + scorer.stopped_by
    if scorer.fatal is not None:
        code, details = scorer.fatal
        print(f"cnnserve score: giving up, the stream keeps failing: {code.name}: {details}", file=sys.stderr)
        if not_connected(code, details):
            print(f"cnnserve score: {connection_hint(args.address)}", file=sys.stderr)
        return 2
    return 1 if summary.failed or summary.earlier_failed else 0


def register_score(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "score",
        help="classify a directory of images into a JSONL/CSV file (resumable, shardable)",
        description=(__doc__ or "").split("\n\n", 2)[2].split("\n\n")[0]
        + " Rerunning resumes; exit status 1 if any image failed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n", 3)[3],
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="directory, glob, image file or @LIST")
    parser.add_argument(
        "--list", action="append", default=[], metavar="FILE", help="file of paths, one a line"
    )
    parser.add_argument("--model", required=True, help="model name (see `cnnserve models`)")
    parser.add_argument("--version", type=int, default=0, help="model version (default 0: the latest)")
    parser.add_argument("--top-k", type=int, default=0, help="classes per image (default: the server's, 5)")
    parser.add_argument("--address", default="localhost:8500", help="server host:port (default %(default)s)")
    parser.add_argument(
        "--output", "-o", default="-", help="output file (default: standard output, not resumable)"
    )
    parser.add_argument("--format", choices=["jsonl", "csv"], help="default: csv for *.csv, else jsonl")
    parser.add_argument("--shard", metavar="I/N", help="score only the paths at position I modulo N")
    parser.add_argument("--window", type=int, default=64, help="images in flight (default %(default)s)")
    parser.add_argument(
        "--deadline", type=float, default=60.0, help="seconds per image (default %(default)s)"
    )
    parser.add_argument(
        "--max-attempts", type=int, default=6, help="tries per image on UNAVAILABLE/RESOURCE_EXHAUSTED "
        "(default %(default)s)"
    )  # fmt: skip
    parser.add_argument(
        "--retry-failed", action="store_true", help="score again the paths whose earlier row is an error"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    parser.add_argument(
        "--progress-interval", type=float, default=10.0, metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (default %(default)s)",
    )  # fmt: skip
    parser.set_defaults(func=score_command, subparser=parser)
