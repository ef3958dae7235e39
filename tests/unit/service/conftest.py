"""The tests of service/'s rooms (client/, engine/, frontend/, worker/, ...) share helpers that live
here: `servicer_fakes` (the engine double under the real server wiring) and `linear_repo` (a model
repository of linear ONNX models). pytest puts only a test's own directory on sys.path (prepend
import mode, no __init__.py files: test file names stay unique), so this one is added here."""

from __future__ import annotations

import sys
from pathlib import Path

_SERVICE_TESTS = str(Path(__file__).resolve().parent)
if _SERVICE_TESTS not in sys.path:
    sys.path.insert(0, _SERVICE_TESTS)
