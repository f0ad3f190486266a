"""Log output: text lines (the default) or one JSON object per line (``--log-format
json``, ``logFormat: json``), for a log pipeline that parses fields, not prose.

Every JSON line has ``ts`` (RFC 3339, UTC), ``level``, ``logger`` and ``message``; a
worker's lines add ``worker``; a request's line (logger ``pullgate.access``, one per
request, denials at WARNING) adds the request's fields: ``request_id``, ``front``,
``method``, ``path``, ``status``, ``bytes``, ``duration_ms``, ``registry``,
``repository``, ``reference``, ``digest``, ``verdict``, ``code``, ``reason`` (those
that apply).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def __init__(self, *, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            line["worker"] = self._worker
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


def configure(level: str, fmt: str = "text", *, worker: int | None = None) -> None:
    """Set up the root logger for one process (the supervisor, a worker, a command)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker=worker))
    else:
        name = "%(name)s" if worker is None else f"worker{worker} %(name)s"
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.replace("%(name)s", name)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
