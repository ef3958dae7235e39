"""`cnnserve score`'s inputs: discovery (directories, globs, files, @list files), the key a path is
scored and resumed under (`normalise`), and sharding. (command.py's docstring has the rules.)"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
_GLOB_CHARS = frozenset("*?[")


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
