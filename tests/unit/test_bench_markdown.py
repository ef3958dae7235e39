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


def test_only_a_run_of_every_default_part_rewrites_benchmarks_md() -> None:
    from pathlib import Path

    from bench.__main__ import ROOT, parse_args, report_path

    assert report_path(parse_args([])) == ROOT / "BENCHMARKS.md"
    assert report_path(parse_args(["--quick"])) == ROOT / "BENCHMARKS.md"
    assert report_path(parse_args(["--parts", "resnet,lenet,proxy,style,gradients,startup"])) is not None
    # A subset's rows would replace the whole table: printed only, unless a file is named.
    assert report_path(parse_args(["--parts", "startup"])) is None
    assert report_path(parse_args(["--parts", "resnet,lenet"])) is None
    assert report_path(parse_args(["--parts", "startup", "--out", "/tmp/x.md"])) == Path("/tmp/x.md")
    assert report_path(parse_args(["--no-write"])) is None
