"""`cnnserve score`'s output: the row formats (JSONL, CSV), reading what an earlier run left (the
resume and the one-model-per-output rules), and the writer that appends, flushes and fsyncs."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from service.client.score.paths import normalise

CSV_FIELDS = ["path", "model", "version", "index", "label", "probability", "classes", "error"]
# The untrained-weights warning (make_row); a CSV column since issue 15: a CSV written before it
# keeps its columns when resumed (RowWriter follows the header it finds).
WARNING_FIELD = "warning"
# With --embeddings (service/client/score/vectors.py): where the row's vector is, "FILE:ROW" in CSV,
# {"file", "row"} in JSONL; empty (absent) on an error row.
EMBEDDING_FIELD = "embedding"
_OPTIONAL_CSV_FIELDS = (WARNING_FIELD, EMBEDDING_FIELD)  # in this order, after CSV_FIELDS
FSYNC_INTERVAL_S = 2.0
FLUSH_INTERVAL_S = 0.02


def output_format(output: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    return "csv" if output.lower().endswith(".csv") else "jsonl"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def make_row(
    path: str,
    *,
    model: str = "",
    version: int = 0,
    classes: Sequence[Any] = (),
    error: str = "",
    warning: str = "",
) -> dict[str, Any]:
    """One row; `warning` (a JSONL row's "warning" key, only when set; a CSV's `warning` column)
    says the answer means nothing (the server marked the version untrained)."""
    row = {
        "path": path,
        "model": model,
        "version": version,
        "classes": [
            {"index": c.index, "label": c.label, "probability": round(float(c.probability), 6)}
            for c in classes
        ],
        "error": _one_line(error),
    }
    if warning:
        row["warning"] = warning
    return row


def csv_fields(*, embeddings: bool = False, warning: bool = True) -> list[str]:
    """A CSV output's columns: the new file's layout (`warning` off: one written before it)."""
    return [*CSV_FIELDS, *([WARNING_FIELD] if warning else []), *([EMBEDDING_FIELD] if embeddings else [])]


def format_row(row: dict[str, Any], fmt: str, *, fields: Sequence[str] | None = None) -> str:
    """One row as one line (newline included); a CSV row has the cells of `fields` (default:
    csv_fields())."""
    if fmt == "jsonl":
        return json.dumps(row, ensure_ascii=False) + "\n"
    top = row["classes"][0] if row["classes"] else {"index": "", "label": "", "probability": ""}
    ref = row.get(EMBEDDING_FIELD)
    cells = {
        "path": row["path"], "model": row["model"], "version": row["version"], "index": top["index"],
        "label": top["label"], "probability": top["probability"],
        "classes": json.dumps(row["classes"], ensure_ascii=False) if row["classes"] else "",
        "error": row["error"], WARNING_FIELD: row.get(WARNING_FIELD, ""),
        EMBEDDING_FIELD: f"{ref['file']}:{ref['row']}" if ref else "",
    }  # fmt: skip
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([cells[name] for name in fields or csv_fields()])
    return buffer.getvalue()


def csv_header(*, embeddings: bool = False, warning: bool = True) -> str:
    return ",".join(csv_fields(embeddings=embeddings, warning=warning)) + "\n"


def parse_csv_header(line: str, name: str) -> list[str]:
    """The columns a `cnnserve score` CSV's header line names; ValueError for any other line."""
    fields = line.strip().split(",")
    extra = fields[len(CSV_FIELDS) :]
    if fields[: len(CSV_FIELDS)] != CSV_FIELDS or extra != [f for f in _OPTIONAL_CSV_FIELDS if f in extra]:
        raise ValueError(f"{name}: not a `cnnserve score` CSV file (header {line.strip()!r})")
    return fields


def _embedding_cell(cell: str) -> dict[str, Any] | None:
    if not cell:
        return None
    name, _, row = cell.rpartition(":")
    return {"file": name, "row": int(row)}


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
    embedding: dict[str, Any] | None = None


def _records(text: str, fmt: str, name: str) -> list[tuple[int, str, dict[str, Any]]]:
    """(line number, line, record) of each complete row; a CSV's embedding cell parsed."""
    lines = text.splitlines(keepends=True)
    fields = CSV_FIELDS
    if fmt == "csv":
        if not lines:
            return []
        fields = parse_csv_header(lines[0], name)
        lines = lines[1:]
    records = []
    for number, line in enumerate(lines, 2 if fmt == "csv" else 1):
        if not line.strip():
            continue
        try:
            if fmt == "jsonl":
                record = json.loads(line)
            else:
                (cells,) = list(csv.reader([line]))
                record = dict(zip(fields, cells, strict=True))
                record[EMBEDDING_FIELD] = _embedding_cell(record.get(EMBEDDING_FIELD, ""))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name}:{number}: unreadable row ({exc}); fix or move the file") from None
        records.append((number, line, record))
    return records


def parsed_rows(output: str, fmt: str) -> list[dict[str, Any]]:
    """The records of an output's complete rows (a partial last line left out)."""
    with open(output, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1].decode("utf-8")
    return [record for _, _, record in _records(complete, fmt, output)]


def _parse_lines(text: str, fmt: str, name: str) -> list[_Row]:
    """Each complete row."""
    rows: list[_Row] = []
    for number, line, record in _records(text, fmt, name):
        try:
            embedding = record.get(EMBEDDING_FIELD)
            row = _Row(
                str(record["path"]),
                str(record.get("model") or ""),
                int(record.get("version") or 0),
                str(record.get("error") or ""),
                line,
                dict(embedding) if embedding else None,
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


def _embeddings_mismatch(rows: Sequence[_Row], embeddings: str | None) -> str | None:
    """Why the successful rows cannot be resumed with (or without) --embeddings, or None."""
    ok = [r for r in rows if not r.error]
    if embeddings is None and any(r.embedding for r in ok):
        return "it was written with --embeddings; give the --embeddings directory to resume it"
    if embeddings is not None:
        if any(not r.embedding for r in ok):
            return "it was written without --embeddings: its rows have no vectors"
        try:
            check_shards(((r.path, r.embedding or {}) for r in ok), embeddings)
        except ValueError as exc:
            return str(exc)
    return None


def check_shards(references: Iterable[tuple[str, dict[str, Any]]], directory: str) -> None:
    """ValueError unless every (path, {"file", "row"}) names a row of an existing shard in
    `directory`: a resumed run trusts the rows as done only when their vectors are there."""
    rows_of: dict[str, int] = {}
    for path, ref in references:
        name = str(ref.get("file", ""))
        if name not in rows_of:
            shard = Path(directory) / name
            if "/" in name or not name.endswith(".npy") or not shard.is_file():
                raise ValueError(
                    f"the row of {path} names the vector file {name!r}, which is not in {directory}; "
                    "give the --embeddings directory of the earlier run (or another --output)"
                )
            rows_of[name] = int(np.load(shard, mmap_mode="r").shape[0])
        if not 0 <= int(ref.get("row", -1)) < rows_of[name]:
            raise ValueError(
                f"the row of {path} names row {ref.get('row')} of {name}, which has {rows_of[name]}"
            )


def read_existing(
    output: str,
    fmt: str,
    *,
    drop_failed: bool = False,
    model: str | None = None,
    version: int = 0,
    embeddings: str | None = None,
) -> Existing:
    """Read (and repair) an existing output: cut a partial last line; with `drop_failed`, rewrite
    the file without its error rows. A missing file is an empty result. With `model`, an output
    holding rows of another model (or of another version, when `version` is not 0) is refused
    with ValueError before anything is changed, as is one whose rows have vectors when this run
    has no `embeddings` directory, or lack them (or name shards missing from it) when it has."""
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
    problem = problem or _embeddings_mismatch(rows, embeddings)
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
            if fmt == "csv":  # the file's own header: its layout is kept
                f.write(complete.decode("utf-8").splitlines(keepends=True)[0])
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

    def __init__(self, output: str, fmt: str, *, embeddings: bool = False) -> None:
        self.output = output
        self.fmt = fmt
        # A CSV's columns: a new file's layout, or, appending, the header the file has.
        self.fields = csv_fields(embeddings=embeddings)
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
            if not new and self.fmt == "csv":
                with open(self.output, encoding="utf-8", newline="") as existing:
                    self.fields = parse_csv_header(existing.readline(), self.output)
            os.makedirs(os.path.dirname(os.path.abspath(self.output)), exist_ok=True)
            file = open(self.output, "a", encoding="utf-8", newline="")  # noqa: SIM115
        if new and self.fmt == "csv":
            file.write(",".join(self.fields) + "\n")
        return file

    def write(self, row: dict[str, Any]) -> None:
        """Buffered: the scorer calls flush() whenever it has no answer waiting, and the buffer
        goes to the file at most FLUSH_INTERVAL_S later (rows lost to a SIGKILL in between are
        scored again by the next run)."""
        if self._file is None:
            self._file = self._open()
        self._file.write(format_row(row, self.fmt, fields=self.fields))
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
