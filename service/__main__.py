"""`python -m service ...` is the `cnnserve` command; with no subcommand it is `cnnserve serve`."""

from __future__ import annotations

import sys

from service.cli import main


def _argv(argv: list[str]) -> list[str]:
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        return ["serve", *argv]
    return argv


if __name__ == "__main__":
    sys.exit(main(_argv(sys.argv[1:])))
