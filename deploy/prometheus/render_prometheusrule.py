"""Render deploy/prometheus/alerts.yml as a Prometheus Operator PrometheusRule.

alerts.yml is the single source of the alerting rules (promtool checks and unit-tests it); the
operator wants the same groups wrapped in a PrometheusRule object. Regenerate after editing
alerts.yml:

    .venv/bin/python deploy/prometheus/render_prometheusrule.py

tests/deploy/test_observability.py fails when the two have drifted apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCE = HERE / "alerts.yml"
TARGET = ROOT / "deploy" / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# Generated from deploy/prometheus/alerts.yml by deploy/prometheus/render_prometheusrule.py.
# Do not edit: edit alerts.yml, run the script, commit both.
"""


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML ships no stubs here
    """Multi-line strings (the PromQL expressions) as literal blocks, readable as in alerts.yml."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def build(rules_file: Path = SOURCE) -> dict[str, Any]:
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "cnnserve",
            "labels": {"app.kubernetes.io/name": "cnnserve", "app.kubernetes.io/component": "monitoring"},
        },
        "spec": {"groups": groups},
    }


def render(rules_file: Path = SOURCE) -> str:
    body: str = yaml.dump(build(rules_file), Dumper=_Dumper, sort_keys=False, width=200)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the PrometheusRule is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(
                f"{TARGET.relative_to(ROOT)} is out of date: run {Path(__file__).relative_to(ROOT)}",
                file=sys.stderr,
            )
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
