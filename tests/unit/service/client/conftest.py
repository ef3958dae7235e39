"""The client tests run the real server wiring over `servicer_fakes`' engine double, which lives one
directory up, shared with the servicer tests. pytest puts only a test's own directory on sys.path
(rootdir import mode, no __init__.py files), so that one is added here."""

from __future__ import annotations

import sys
from pathlib import Path

_SERVICE_TESTS = str(Path(__file__).resolve().parents[1])
if _SERVICE_TESTS not in sys.path:
    sys.path.insert(0, _SERVICE_TESTS)
