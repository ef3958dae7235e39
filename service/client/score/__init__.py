"""`cnnserve score`: classify a directory (or glob, or list of files) over ClassifyStream into a
JSONL or CSV file; resumable, shardable, retrying. command.py's docstring is the full description
(also `cnnserve score --help`).

One concern a module, imports running down the list: paths.py (discovery, normalisation: the key a
path is resumed under, sharding), rows.py (row formats, reading an earlier output, the resume rules,
the writer), progress.py (the progress bar, the summary), scorer.py (the streaming loop, retries,
reconnects, deadlines), vectors.py (--embeddings: the .npy shards and reading them back),
command.py (arguments, signals, exit status).
"""

from __future__ import annotations

from service.client.score.command import register_score, score_command
from service.client.score.paths import collect_paths, normalise, parse_shard, shard_paths
from service.client.score.progress import Progress, Summary
from service.client.score.rows import (
    Existing,
    RowWriter,
    csv_header,
    format_row,
    make_row,
    output_format,
    read_existing,
)
from service.client.score.scorer import Scorer, backoff_s, read_file
from service.client.score.vectors import EmbeddingWriter, read_embeddings

__all__ = [
    "EmbeddingWriter",
    "Existing",
    "Progress",
    "RowWriter",
    "Scorer",
    "Summary",
    "backoff_s",
    "collect_paths",
    "csv_header",
    "format_row",
    "make_row",
    "normalise",
    "output_format",
    "parse_shard",
    "read_embeddings",
    "read_existing",
    "read_file",
    "register_score",
    "score_command",
    "shard_paths",
]
