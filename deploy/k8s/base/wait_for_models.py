"""wait-for-models: the init container of the serving and worker pods (deploy/README.md, step 2).

Blocks until the model repository holds everything the pod will load, so the server starts once,
with its whole model set, instead of crash-looping on an empty volume or going Ready with the first
model the cnnserve-models Job happened to export (the server loads its models once, at start):

* CNNSERVE_MODELS set (`cnnserve serve --models` syntax: NAME, NAME:VERSION[+VERSION...] or
  NAME:all, comma-separated): until every named model has a complete version, and every pinned
  version exists. Versions appear atomically (built under .tmp-*, renamed into place with their
  metadata.json), so `<name>/<version>/metadata.json` means complete. No marker is needed: this is
  the way to publish your own models without the Job.
* CNNSERVE_MODELS empty (the server loads every model it finds): until REPOSITORY/.demo-complete
  exists, which the cnnserve-models Job writes after its last model (as `make demo` does locally).
  The marker stays on the volume, so a re-run of the Job never blocks pods again.

It never gives up: it says every 10 s what it still waits for and what the repository holds, so
`kubectl -n cnnserve logs <pod> -c wait-for-models` explains an `Init:0/1`. A malformed
CNNSERVE_MODELS is left to the server, which refuses it with a precise message.

Mounted from a ConfigMap (base/kustomization.yaml); tests/deploy/test_manifests.py runs it.
Standard library only: the init container has 64 MiB.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

MARKER = ".demo-complete"
POLL_S = 10.0
# The server's model selection syntax (service/catalog.py, parse_model_selection).
_ITEM = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)(?::(?P<versions>all|[1-9][0-9]*(?:\+[1-9][0-9]*)*))?$"
)
_VERSION = re.compile(r"^[1-9][0-9]*$")


def versions(root: Path) -> list[str]:
    """Complete versions in the repository, as "name/version"."""
    return sorted(
        f"{p.parent.parent.name}/{p.parent.name}"
        for p in root.glob("*/*/metadata.json")
        if _VERSION.match(p.parent.name) and not p.parent.parent.name.startswith(".")
    )


def wanted(spec: str) -> list[tuple[str, str | None]] | None:
    """CNNSERVE_MODELS -> [(name, version or None for any)]; None if malformed."""
    out: list[tuple[str, str | None]] = []
    for raw in spec.split(","):
        match = _ITEM.match(raw.strip())
        if match is None:
            return None
        pinned = match["versions"]
        if pinned is None or pinned == "all":
            out.append((match["name"], None))
        else:
            out.extend((match["name"], v) for v in pinned.split("+"))
    return out


def missing(root: Path, spec: str) -> list[str]:
    """What the pod still waits for; empty when it may start."""
    if not spec:
        return [] if (root / MARKER).is_file() else [str(root / MARKER)]
    have = set(versions(root))
    gaps = []
    for name, version in wanted(spec) or []:
        if version is None:
            if not any(v.split("/")[0] == name for v in have):
                gaps.append(f"{name} (any version)")
        elif f"{name}/{version}" not in have:
            gaps.append(f"{name} version {version}")
    return gaps


def main() -> int:
    root = Path(os.environ.get("CNNSERVE_REPOSITORY") or "/models")
    spec = os.environ.get("CNNSERVE_MODELS", "").strip()
    if spec and wanted(spec) is None:
        print(f"CNNSERVE_MODELS={spec!r} is malformed: not waiting; the server will say why", flush=True)
        return 0
    if spec:
        why = f"the models CNNSERVE_MODELS={spec} selects"
    else:
        why = (
            "the marker the cnnserve-models Job writes after its last model "
            "(kubectl -n cnnserve logs job/cnnserve-models). Publishing your own models instead? "
            f"Create {root / MARKER} once they are all in place, or list them in CNNSERVE_MODELS"
        )
    while gaps := missing(root, spec):
        found = ", ".join(versions(root)) or "nothing yet"
        print(f"waiting for {'; '.join(gaps)}: {why}. Found so far: {found}", flush=True)
        time.sleep(POLL_S)
    print(f"model repository ready: {', '.join(versions(root))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
