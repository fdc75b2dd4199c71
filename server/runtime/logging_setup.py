"""Structured logs: one line per record, JSON or key=value, with the record's extra fields
(stream_id, code, ...) as fields. Per-chunk records are DEBUG only."""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict:
    fields = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
    if record.exc_info:
        fields["exc"] = logging.Formatter().formatException(record.exc_info)
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        f = _fields(record)
        head = f"{f.pop('ts')} {f.pop('level'):<5} {f.pop('logger')}: {f.pop('msg')}"
        exc = f.pop("exc", None)
        tail = " ".join(f"{k}={json.dumps(v, default=str) if isinstance(v, str) and ' ' in v else v}" for k, v in f.items())
        return f"{head} {tail}".rstrip() + (f"\n{exc}" if exc else "")


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger("nemostream")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
