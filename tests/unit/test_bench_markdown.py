"""`make bench` rewrites its own sections of BENCHMARKS.md and keeps everybody else's."""

from __future__ import annotations

from bench.__main__ import kept_sections

OLD = """# Benchmarks

Written by `make bench`.

## Machine

- old machine

## Results

| old | table |

## Soak

| kind | p99 |
| classify | 4 ms |

## How it was measured

- old method

## GPU: one NVIDIA H200 (hand-added)

numbers

## Noise

- old noise
"""


def test_only_the_generated_sections_are_replaced() -> None:
    kept = kept_sections(OLD)
    soak = "## Soak\n\n| kind | p99 |\n| classify | 4 ms |\n"
    assert kept == soak + "\n## GPU: one NVIDIA H200 (hand-added)\n\nnumbers\n"
    assert "old machine" not in kept and "old noise" not in kept and "old method" not in kept


def test_nothing_to_keep() -> None:
    assert kept_sections("") == ""
    assert kept_sections("# Benchmarks\n\n## Results\n\nx\n") == ""
