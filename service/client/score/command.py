"""`cnnserve score`: classify a whole directory (or glob, or list of files) over ClassifyStream and
write one row per image to a JSONL or CSV file (and with --embeddings, each image's vector to .npy
shards); resumable, shardable, retrying.

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
         (+ "warning" when the version's weights are untrained: its answers mean nothing)
  CSV:   path, model, version, index, label, probability (the top-1), classes (the top-k as JSON),
         error, warning (a CSV written before the warning column keeps its columns on resume)
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

Embeddings (`--embeddings DIR`): the images go over EmbedStream instead, and each image's vector
(the model's `features`, L2-normalized with --normalize) is written into DIR as float32 `.npy`
shards of --shard-rows vectors, named after the output (scores-3-of-8-00000.npy, ...). The rows
file stays the index: a successful row names its vector ("embedding": {"file", "row"}; in CSV an
`embedding` column "FILE:ROW"), and carries the top-k classes of the same forward pass only with
--top-k. A row is written once its shard is on disk, so a killed run loses at most one shard's
worth of rows, scored again on resume; resuming, sharding and retries work as above. An output
written with --embeddings resumes only with them (and its shards in DIR), and vice versa.
`service.client.score.read_embeddings(OUTPUT, DIR)` gives back (paths, matrix).

SIGTERM or SIGINT stops the run: the rows written so far are flushed and valid, the summary is
printed, and rerunning the same command resumes.

Exit status: 0 when every path of the shard has a successful row, 1 when any has an error row
(from this run or an earlier one), 2 on usage errors (a refused output included) or when the
server cannot be reached (the stream keeps failing), 128 + the signal's number when stopped
(143: SIGTERM, 130: SIGINT), 141 when standard output is closed early (`| head`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import grpc

from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.client.channel import (
    add_address_argument,
    connection_hint,
    default_channel_options,
    not_connected,
)
from service.client.results import UNTRAINED_WARNING
from service.client.score.paths import collect_paths, parse_shard, shard_paths
from service.client.score.progress import Progress, Summary
from service.client.score.rows import Existing, RowWriter, output_format, read_existing
from service.client.score.scorer import Scorer
from service.client.score.vectors import DEFAULT_SHARD_ROWS, EmbeddingWriter


def _stop_on(signals: Sequence[int], scorer: Scorer) -> dict[int, Any]:
    """Route `signals` to scorer.stop (a Job's pod is stopped with SIGTERM, a terminal with ^C);
    the previous handlers, to restore. Signals are only the main thread's to handle."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, lambda n, _: scorer.stop(n)) for signum in signals}


def _note(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(f"cnnserve score: {text}", file=sys.stderr)


def _paths(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str] | None:
    """The paths of this run's shard; None (reported) when an input does not exist."""
    try:
        shard = parse_shard(args.shard) if args.shard else (0, 1)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.inputs and not args.list:
        parser.error("give at least one directory, glob, file or @list (or --list FILE)")
    try:
        return shard_paths(collect_paths(args.inputs, args.list), *shard)
    except OSError as exc:
        print(f"cnnserve score: {exc}", file=sys.stderr)
        return None


def _existing(args: argparse.Namespace, fmt: str) -> Existing | None:
    """What an earlier run left in the output (repaired, and without its error rows with
    --retry-failed); None (reported) when the output is refused."""
    existing = Existing()
    if args.output == "-":
        return existing
    try:
        existing = read_existing(
            args.output,
            fmt,
            drop_failed=args.retry_failed,
            model=args.model,
            version=args.version,
            embeddings=args.embeddings,
        )
    except ValueError as exc:
        print(f"cnnserve score: {exc}", file=sys.stderr)
        return None
    if existing.truncated_bytes:
        _note(args, f"cut a partial last row ({existing.truncated_bytes} bytes) of {args.output}")
    if existing.relative:
        _note(
            args,
            f"{existing.relative} rows of {args.output} name relative paths (an older cnnserve score "
            "wrote paths as typed): read against the current directory",
        )
    if existing.duplicated:
        _note(args, f"{args.output} holds several rows for {existing.duplicated} path(s); each counts once")
    return existing


def _run(args: argparse.Namespace, fmt: str, todo: list[str]) -> tuple[Scorer, Summary]:
    """Score `todo` into the output, SIGTERM and SIGINT stopping the run; the output is closed
    (synced) whatever happens."""
    rows = RowWriter(args.output, fmt, embeddings=args.embeddings is not None)
    writer = (
        rows
        if args.embeddings is None
        else EmbeddingWriter(rows, args.embeddings, shard_rows=args.shard_rows)
    )
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
        normalize=args.normalize,
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
    return scorer, summary


def _exit_status(args: argparse.Namespace, scorer: Scorer, summary: Summary) -> int:
    """Report how the run ended; its exit status (the module docstring's table)."""
    print(f"cnnserve score: {summary.line()}", file=sys.stderr)
    for model, version in sorted(scorer.untrained):
        print(f"cnnserve score: warning: {model} v{version} has {UNTRAINED_WARNING}", file=sys.stderr)
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


def score_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`cnnserve score`: the module docstring says what it does and what its exit status means."""
    if args.embeddings is not None and args.output == "-":
        parser.error("--embeddings needs --output FILE: the rows file is the index of the vectors")
    if args.shard_rows < 1:
        parser.error("--shard-rows must be at least 1")
    paths = _paths(args, parser)
    if paths is None:
        return 2
    fmt = output_format(args.output, args.format)
    existing = _existing(args, fmt)
    if existing is None:
        return 2
    done = existing.ok | existing.failed
    todo = [p for p in paths if p not in done]
    scorer, summary = _run(args, fmt, todo)
    summary.total = len(paths)
    summary.skipped = len(paths) - len(todo)
    summary.earlier_failed = len(existing.failed & set(paths))
    return _exit_status(args, scorer, summary)


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
    add_address_argument(parser)
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
    parser.add_argument(
        "--embeddings", metavar="DIR", help="also write each image's embedding into .npy shards in DIR"
    )
    parser.add_argument("--normalize", action="store_true", help="with --embeddings: L2-normalized vectors")
    parser.add_argument(
        "--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, metavar="N",
        help="with --embeddings: vectors per .npy shard (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    parser.add_argument(
        "--progress-interval", type=float, default=10.0, metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (default %(default)s)",
    )  # fmt: skip
    parser.set_defaults(func=score_command, subparser=parser)
