"""Log set-up for the whole process: one format (`text` or `json`), one level, the request ID on every line.

`configure(fmt, level)` puts one handler on the root logger and routes uvicorn's loggers through it,
so uvicorn's own lines have the same format. The request being served is held in a context variable
(`REQUEST_ID`, set by the API's request-ID middleware; asyncio tasks and `asyncio.to_thread` copy
it), and every record gets it as `request_id`. JSON lines carry time, level, logger, message,
request_id, the trace and span ids when tracing is on, and any `extra` fields a caller passes (the
access log passes method, path, status, duration_ms). Nothing logs image bytes, token ids or keys.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("alit_request_id", default=None)
FORMATS = ("text", "json")
# attributes every LogRecord has; anything else on a record came from `extra=` and goes into the JSON line
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id",
                                                                          "trace_id", "span_id", "color_message"}
_trace_ids = None  # set by service.tracing when tracing is on: () -> (trace_id, span_id) or None


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (and, with tracing on, `trace_id` / `span_id`) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__["request_id"] = REQUEST_ID.get()
        ids = _trace_ids() if _trace_ids is not None else None
        trace_id, span_id = ids if ids else (None, None)
        record.__dict__.update(trace_id=trace_id, span_id=span_id)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = record.created
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z",
                "level": record.levelname, "logger": record.name, "message": record.getMessage(),
                "request_id": getattr(record, "request_id", None)}
        if getattr(record, "trace_id", None):
            line["trace_id"], line["span_id"] = getattr(record, "trace_id"), getattr(record, "span_id")  # noqa: B009
        for k, v in vars(record).items():
            if k not in _STANDARD and not k.startswith("_"):
                line[k] = v
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.__dict__["request_id"] = "-"
        return super().format(record)


def configure(fmt: str = "text", level: str = "INFO") -> None:
    """One handler on stderr for the root logger; uvicorn's loggers propagate to it."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        lg.setLevel(logging.NOTSET)
    for noisy in ("PIL", "multipart", "python_multipart", "grpc", "urllib3"):  # chunk-by-chunk debug lines
        logging.getLogger(noisy).setLevel(max(root.level, logging.INFO))


def set_trace_ids(fn) -> None:
    """service.tracing installs a function giving the current (trace_id, span_id) in hex, or None."""
    global _trace_ids
    _trace_ids = fn
