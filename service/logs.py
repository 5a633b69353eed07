"""Structured logs: one JSON object per line (or plain text), each with the request id of the
request being served, taken from a context variable set by the request middleware."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# Which of the service's processes wrote a line: "supervisor", "engine", "worker".
_process = {"name": ""}

# Attributes every LogRecord has; anything else came in through ``extra=`` and is logged.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        if _process["name"]:
            entry["process"] = _process["name"]
            entry["pid"] = record.process
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = request_id.get()
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        who = f"{_process['name']}[{record.process}] " if _process["name"] else ""
        line = (
            f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {who}{record.name}: "
            f"{record.getMessage()}"
            + (f" [{rid}]" if rid else "")
            + (f" {fields}" if fields else "")
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str = "info", fmt: str = "json", process: str = "") -> None:
    """Send the service's and uvicorn's logs to stderr in one format; uvicorn's access log is
    replaced by the service's own (which knows the request id and the image count)."""
    _process["name"] = process
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
