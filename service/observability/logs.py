"""Process logging: one root handler on stderr, text or JSON lines, UTC timestamps."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from service.settings import Settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (+ exc_info when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    """Root logging to stderr in settings.log_format at settings.log_level (UTC timestamps)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
