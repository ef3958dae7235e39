"""`cnnserve score --embeddings DIR`: the vectors, written as `.npy` shards next to the row index.

Why `.npy` shards plus the rows file as the index, not Parquet: `.npy` is numpy's own format (no
pyarrow in a scoring environment, which must stay light), every array tool reads it
(`np.load(f, mmap_mode="r")` maps a shard without reading it), and a shard is one contiguous
float32 matrix, the layout similarity search libraries take as it is. The rows file (JSONL or
CSV, as without --embeddings) stays the one index: each successful row names its vector as
{"file": "<shard>.npy", "row": i}. `read_embeddings` joins them back.

Crash safety, the resume rule of `cnnserve score` kept: a successful row is written only after the
shard holding its vector is on disk (written to a temporary name, fsync'ed, renamed), so a row
never points at a vector that is not there. Vectors are held until `shard_rows` of them fill a
shard (and at the end, SIGTERM included); a SIGKILL loses at most one shard's worth, which the next
run scores again. Error rows carry no vector and are written at once. A shard is never rewritten:
a resumed run starts a new one (shards are numbered after the highest one of this output).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from service.client.score.rows import RowWriter, output_format, parsed_rows

DEFAULT_SHARD_ROWS = 4096


def shard_prefix(output: str) -> str:
    """The shards' file name prefix: the rows file's name without its extension, so the shards of
    `--shard 3/8 -o scores-3-of-8.jsonl` and those of the other shards can share a directory."""
    return Path(output).name.rsplit(".", 1)[0] or "embeddings"


class EmbeddingWriter:
    """The rows (a RowWriter) and their vectors, one `.npy` shard every `shard_rows` vectors."""

    def __init__(self, rows: RowWriter, directory: str, *, shard_rows: int = DEFAULT_SHARD_ROWS) -> None:
        self.rows = rows
        self.directory = Path(directory)
        self.prefix = shard_prefix(rows.output)
        self.shard_rows = max(1, shard_rows)
        self._pending: list[tuple[dict[str, Any], np.ndarray]] = []
        self._next_shard = _next_shard_index(self.directory, self.prefix)
        self.shards_written = 0

    def write(self, row: dict[str, Any], vector: np.ndarray | None = None) -> None:
        """An error row (no vector) goes to the rows at once; a successful one waits for its shard."""
        if vector is None:
            self.rows.write(row)
            return
        if self._pending and vector.shape != self._pending[0][1].shape:
            raise ValueError(f"a vector of shape {vector.shape} among vectors of {self._pending[0][1].shape}")
        self._pending.append((row, vector))
        if len(self._pending) >= self.shard_rows:
            self._write_shard()

    def _write_shard(self) -> None:
        if not self._pending:
            return
        name = f"{self.prefix}-{self._next_shard:05d}.npy"
        self.directory.mkdir(parents=True, exist_ok=True)
        matrix = np.stack([vector for _, vector in self._pending]).astype("<f4", copy=False)
        tmp = self.directory / f".{name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, matrix)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / name)
        _fsync_directory(self.directory)
        for i, (row, _) in enumerate(self._pending):
            self.rows.write({**row, "embedding": {"file": name, "row": i}})
        self.rows.sync()
        self._pending.clear()
        self._next_shard += 1
        self.shards_written += 1

    def flush(self) -> float:
        return self.rows.flush()

    def sync(self) -> None:
        self.rows.sync()

    def close(self, *, create: bool = True) -> None:
        """Write the last (partial) shard and its rows, then close the rows."""
        try:
            self._write_shard()
        finally:
            self.rows.close(create=create)


def _fsync_directory(directory: Path) -> None:
    """The rename itself durable before the rows that name the shard are written."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _next_shard_index(directory: Path, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)\.npy$")
    indices = [
        int(m[1]) for p in (directory.iterdir() if directory.is_dir() else []) if (m := pattern.match(p.name))
    ]
    return max(indices, default=-1) + 1


def read_embeddings(output: str, directory: str) -> tuple[list[str], np.ndarray]:
    """The paths of a `cnnserve score --embeddings` run's successful rows, in file order, and their
    vectors as one float32 matrix [n, D] (rows without a vector, the error rows, are left out)."""
    paths: list[str] = []
    vectors: list[np.ndarray] = []
    shards: dict[str, np.ndarray] = {}
    for record in parsed_rows(output, output_format(output, None)):
        ref = record.get("embedding")
        if record.get("error") or not ref:
            continue
        name = str(ref["file"])
        if name not in shards:
            shards[name] = np.load(Path(directory) / name, mmap_mode="r")
        paths.append(str(record["path"]))
        vectors.append(np.asarray(shards[name][int(ref["row"])]))
    if not vectors:
        return paths, np.zeros((0, 0), dtype=np.float32)
    return paths, np.stack(vectors).astype(np.float32, copy=False)


__all__ = ["DEFAULT_SHARD_ROWS", "EmbeddingWriter", "read_embeddings", "shard_prefix"]
